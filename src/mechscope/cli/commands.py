"""Every ``mechscope`` command, each defined once: its arguments, its examples and its handler."""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

from ..analysis.viz import esc, page
from ..core.errors import InputError, NotFoundError
from ..core.files import atomic_write
from ..core.hookpoints import act_name
from ..core.result import Result
from .registry import Outcome, arg, command

MODEL = (
    arg("--model", default=None, help="alias, local HF folder, .gguf file or hub id (default: smollm2-135m)"),
    arg("--dtype", default=None, help="float32 (default), bfloat16 or float16"),
    arg("--device", default=None, help="cpu, cuda, ... (default: cuda if available)"),
    arg("--trust-remote-code", action="store_true",
        help="run the Python code a model folder or hub repository ships (off: such a model is refused)"),
)
TASK = (
    arg("--task", choices=["ioi", "factual", "greater-than", "induction"], default=None),
    arg("--task-file", default=None, help="your own task: a .jsonl or .csv with clean, corrupted, answer (and wrong, pos)"),
    arg("--n", type=int, default=8, help="prompts from the task generator"),
    arg("--seed", type=int, default=0),
    arg("--clean", default=None),
    arg("--corrupted", default=None),
    arg("--answer", default=None),
    arg("--wrong", default=None),
)
PICTURES = (
    arg("--png", default=None, help="write a PNG picture here"),
    arg("--html", default=None, help="write an offline HTML page here"),
)
SITE = (
    arg("--site", default="resid_pre", help="resid_pre|resid_mid|resid_post|attn_out|mlp_out|z|q|k|v|pattern"),
    arg("--direction", default="denoise", choices=["denoise", "noise"]),
    arg("--per-position", action="store_true", help="head sites: one patch per position"),
)
CORPUS = arg("--corpus", default=None, help="your text: a .txt file (its paragraphs), a folder of .txt files, a .jsonl "
                                           "('text' field) or hf:<dataset>[:<split>] (default: the standard "
                                           "library's docstrings)")
SAE_MODEL = MODEL + (arg("path", nargs="?", default=None,
                         help="an SAE folder (SAELens, Gemma Scope, Llama Scope, sparsify or dictionary_learning), or "
                              "hf://<org>/<repo>[@<revision>]/<folder>"),
                     arg("--release", default=None, help="a known SAE release (with --sae-id), e.g. gpt2-small-res-jb"),
                     arg("--sae-id", default=None, help="the SAE within --release, e.g. blocks.8.hook_resid_pre"),
                     arg("--eval-seqs", type=int, default=16, help="held-out sequences"),
                     arg("--seq-len", type=int, default=128), CORPUS)


def _load(args: argparse.Namespace):
    import mechscope  # through the package attribute, so that tests and users can substitute `mechscope.load`

    return mechscope.load(args.model or mechscope.DEFAULT_MODEL, device=args.device, dtype=args.dtype,
                          trust_remote_code=getattr(args, "trust_remote_code", False))


def _corpus(args: argparse.Namespace, model, split: str, n_seqs: int, seq_len: int) -> tuple:
    """Token rows ``[n, seq_len]`` from ``--corpus`` (its train or held-out split), and what they were: said on stderr
    and returned for the JSON output."""
    from .. import corpus
    from ..core.progress import stage

    texts, desc = corpus.from_spec(getattr(args, "corpus", None), split)
    toks = corpus.pack(model, texts, seq_len, n_seqs=n_seqs, source=f"the corpus ({desc})")
    if toks.shape[0] == 0:
        raise InputError(f"the corpus ({desc}, {split} split) gave no sequence of {seq_len} tokens; give more text "
                         f"or a shorter --seq-len")
    stage(f"corpus: {desc}, {split} split: {toks.shape[0]} sequences x {toks.shape[1]} = {toks.numel()} tokens")
    return toks, {"corpus": desc, "corpus_split": split, "corpus_tokens": int(toks.numel())}


def _pictures(args: argparse.Namespace, res: Result, title: str) -> Result:
    """Write ``--png`` and ``--html`` where given; return ``res``."""
    if getattr(args, "png", None):
        res.plot(args.png)
    if getattr(args, "html", None):
        atomic_write(args.html, page(title, res.to_html()))
    return res


def _task(args: argparse.Namespace, model):
    """``(clean, corrupted, metric, dataset)`` from ``--task`` or from ``--clean/--corrupted/--answer/--wrong``."""
    from .. import datasets as D
    from ..analysis.metrics import logit_diff

    if getattr(args, "task_file", None):
        if args.task:
            raise InputError("give --task or --task-file, not both")
        ds = D.load_task(model, args.task_file)
        return ds.clean, ds.corrupted, ds.metric, ds
    if args.task:
        makers = {"ioi": lambda: D.ioi(model, args.n, seed=args.seed), "factual": lambda: D.factual(model, args.n),
                  "greater-than": lambda: D.greater_than(model, args.n, seed=args.seed),
                  "induction": lambda: D.induction(model, args.n, seed=args.seed)}
        ds = makers[args.task]()
        return ds.clean, ds.corrupted, ds.metric, ds
    if not (args.clean and args.corrupted and args.answer):
        raise InputError("give --task, --task-file, or --clean, --corrupted and --answer (and usually --wrong)")
    a = model.to_single_token(args.answer)
    b = model.to_single_token(args.wrong) if args.wrong else None

    def metric(logits):
        return logits[:, -1, a] if b is None else logit_diff(logits, a, b)

    return args.clean, args.corrupted, metric, None


# ---------------------------------------------------------------------------------- model and compute
@command("env", "the device, its memory and dtype support", ("mechscope env", "mechscope env --json"))
def env_cmd(args: argparse.Namespace) -> Result:
    from ..compute import env

    return env()


@command("info", "the model card: architecture, sizes, hook names",
         ("mechscope info", "mechscope info --model ./my-hf-folder --hooks"), MODEL,
         arg("--hooks", action="store_true", help="list the hook points"))
def info_cmd(args: argparse.Namespace) -> Result:
    from ..core.hookpoints import table

    model = _load(args)
    d = {**model.cfg.to_dict(), "n_hook_points": len(model.hook_names)}
    text = [repr(model), "", "config:"] + [f"  {k:20} {v}" for k, v in d.items() if k != "extra"]
    if args.hooks:
        d["hook_names"] = model.hook_names
        per = [n.split(".", 2)[2] for n in model.hook_names if n.startswith("blocks.0.")]
        text += ["", "hook points (per block L):"] + [f"  blocks.L.{p}" for p in per]
        text += ["top level:"] + [f"  {n}" for n in model.hook_names if not n.startswith("blocks.")]
        text += ["", "meaning and shape (every family; see docs/hooks.md):", table()]
    return Outcome("\n".join(text), d)


@command("estimate", "memory needed for a run before loading (offline for well-known hub ids), and which GPUs fit it",
         ("mechscope estimate --batch 8 --seq-len 512 --cache all",
          "mechscope estimate --model meta-llama/Llama-3.1-8B --dtype bfloat16 --seq-len 1024 --sae-width 65536",
          "mechscope estimate --model gemma3-270m --sae-width 16384"), MODEL,
         arg("--batch", type=int, default=1), arg("--seq-len", type=int, default=128),
         arg("--cache", default=None, help="'all' or a comma list of hook names to cache"),
         arg("--sae-width", type=int, default=None),
         arg("--patch-rows", type=int, default=64, help="patched prompts per pass, for the GPU table's patching row"))
def estimate_cmd(args: argparse.Namespace) -> Result:
    from ..compute import config_for, estimate_memory, gpu_fit
    from ..loading import DEFAULT_MODEL

    cache = args.cache if args.cache in (None, "all") else args.cache.split(",")
    config = config_for(args.model or DEFAULT_MODEL)
    est = estimate_memory(config, dtype=args.dtype or "float32", batch=args.batch, seq_len=args.seq_len,
                          cache_names=cache, sae_width=args.sae_width)
    fit = gpu_fit(config, seq_len=args.seq_len, batch=max(1, args.batch), sae_width=args.sae_width,
                  patch_rows=args.patch_rows)
    return Outcome(f"{est.summary()}\n\n{fit.summary()}", {**est.to_dict(), "gpus": fit.to_dict()})


# ---------------------------------------------------------------------------------- techniques
@command("lens", "logit lens over a prompt", ('mechscope lens "The capital of France is" --target " Paris"',
                                               'mechscope lens "1 2 3 4" --png lens.png --html lens.html'),
         MODEL, arg("prompt"), arg("--target", action="append", help="answer token to track (repeatable)"), PICTURES)
def lens_cmd(args: argparse.Namespace) -> Result:
    from ..techniques.lens import logit_lens

    return _pictures(args, logit_lens(_load(args), args.prompt, targets=args.target or None), "logit lens")


@command("dla", "direct logit attribution of an answer (layers, heads, neurons)",
         ('mechscope dla "The capital of France is" --answer " Paris" --wrong " London" --png dla.png',),
         MODEL, arg("prompt", nargs="?", default=None, help="the prompt (or --task-file)"),
         arg("--answer", default=None, help="the answer token, e.g. ' Paris'"),
         arg("--wrong", default=None, help="a contrasting token: attribute the logit difference"),
         arg("--task-file", default=None, help="attribute each clean prompt of a task file to its first answer (and "
                                               "first wrong answer)"), PICTURES)
def dla_cmd(args: argparse.Namespace) -> Result:
    from .. import datasets as D
    from ..techniques.attribution import direct_logit_attribution

    model = _load(args)
    if args.task_file:
        if args.prompt or args.answer:
            raise InputError("give a prompt with --answer, or --task-file, not both")
        ds = D.load_task(model, args.task_file)
        res = direct_logit_attribution(model, ds.clean, ds.answers, ds.wrong)
    else:
        if not (args.prompt and args.answer):
            raise InputError("dla needs a prompt and --answer (or --task-file)")
        res = direct_logit_attribution(model, args.prompt, args.answer, args.wrong)
    return _pictures(args, res, "direct logit attribution")


@command("patch", "activation patching over layers x positions or heads",
         ("mechscope patch --task ioi --site resid_pre --png ioi.png",
          'mechscope patch --clean "The capital of France is" --corrupted "The capital of Poland is" '
          '--answer " Paris" --wrong " Warsaw" --site z'), MODEL, TASK, SITE, PICTURES)
def patch_cmd(args: argparse.Namespace) -> Result:
    from ..techniques.patching import patch

    model = _load(args)
    clean, corr, metric, _ = _task(args, model)
    res = patch(model, clean, corr, metric, site=args.site, direction=args.direction, per_position=args.per_position)
    return _pictures(args, res, "activation patching")


@command("attrib", "attribution patching: first-order estimate of every patch",
         ("mechscope attrib --task ioi --site z --per-position --json",), MODEL, TASK, SITE, PICTURES)
def attrib_cmd(args: argparse.Namespace) -> Result:
    from ..techniques.attribution_patching import attribution_patch

    model = _load(args)
    clean, corr, metric, _ = _task(args, model)
    res = attribution_patch(model, clean, corr, metric, sites=(args.site,), direction=args.direction,
                            per_position=args.per_position)[args.site]
    return _pictures(args, res, "attribution patching")


@command("ablate", "zero/mean/resample ablation of heads, neurons or layers, with a CI",
         ("mechscope ablate --task ioi L9H3 L10H1 --method mean", "mechscope ablate --task factual L3 --method resample"),
         MODEL, TASK, arg("components", nargs="+", help="L3H5 (head), L3N100 (neuron), L3.attn, L3.mlp, L3"),
         arg("--method", default="zero", choices=["zero", "mean", "resample"]), PICTURES)
def ablate_cmd(args: argparse.Namespace) -> Result:
    from ..techniques.ablation import ablate

    model = _load(args)
    clean, _, metric, _ = _task(args, model)
    return _pictures(args, ablate(model, clean, metric, args.components, method=args.method, seed=args.seed),
                     "ablation")


@command("tuned-lens", "train a tuned lens on the default corpus and compare with the logit lens",
         ("mechscope tuned-lens --steps 100 --out lens.safetensors",), MODEL,
         arg("--steps", type=int, default=100), arg("--seq-len", type=int, default=64),
         arg("--batch", type=int, default=4), arg("--out", default="tuned_lens.safetensors"),
         arg("--held-out-seqs", type=int, default=8), CORPUS, PICTURES)
def tuned_lens_cmd(args: argparse.Namespace) -> Result:
    import torch

    from ..techniques.lens import train_tuned_lens

    model = _load(args)
    train, info = _corpus(args, model, "train", args.steps * args.batch, args.seq_len)
    test, info_test = _corpus(args, model, "test", args.held_out_seqs, args.seq_len)
    lens, cmp = train_tuned_lens(model, torch.cat([train, test]), n_steps=args.steps, seq_len=args.seq_len,
                                 batch=args.batch, held_out_seqs=test.shape[0])
    path = lens.save(args.out)
    _pictures(args, cmp, "tuned lens")
    return Outcome(cmp.summary() + f"\nsaved {path}\ncorpus: {info['corpus']}",
                   {**cmp.to_dict(), "path": path, **info, "held_out_tokens": info_test["corpus_tokens"]})


@command("probe", "linear probes per layer for a context-dependent property, with a control task",
         ("mechscope probe --layers 0 10 20 27 --png probe.png",), MODEL,
         arg("--layers", type=int, nargs="*", default=None), arg("--n", type=int, default=32,
                                                                 help="sequences from the held-out corpus"),
         arg("--seq-len", type=int, default=64),
         arg("--shuffled", action="store_true", help="shuffled-label control instead of per-type labels"), CORPUS,
         PICTURES)
def probe_cmd(args: argparse.Namespace) -> Result:
    from ..techniques.probing import next_token_continues_word, probe_sweep

    model = _load(args)
    toks, _ = _corpus(args, model, "test", args.n, args.seq_len)
    layers = args.layers or list(range(0, model.cfg.n_layers, max(1, model.cfg.n_layers // 6)))
    res = probe_sweep(model, toks, next_token_continues_word(model, toks),
                      hooks=[act_name("resid_post", l) for l in layers], task="next token continues the word",
                      control="shuffled" if args.shuffled else True)
    return _pictures(args, res, "probe")


# ---------------------------------------------------------------------------------- circuits
@command("heads", "head detectors: previous-token, duplicate-token, induction, sink, copying",
         ("mechscope heads", "mechscope heads --html heads.html --json"), MODEL,
         arg("--html", default=None, help="write the heatmaps as an offline HTML page"))
def heads_cmd(args: argparse.Namespace) -> Result:
    from ..circuits.heads import detect_heads

    det = detect_heads(_load(args))
    if args.html:
        atomic_write(args.html, page("head detectors", "".join(d.to_html() for d in det.values())))
    return Outcome("\n\n".join(d.summary() for d in det.values()), det)


def parse_head(spec: str) -> tuple[int, int]:
    """``"18.6"`` or ``"L18H6"`` -> ``(18, 6)``."""
    m = re.fullmatch(r"L?(\d+)[.H](\d+)", spec.strip())
    if not m:
        raise InputError(f"cannot read head {spec!r}; write LAYER.HEAD (e.g. 18.6) or L18H6")
    return int(m.group(1)), int(m.group(2))


@command("check", "the identity suite on a loaded model: exact hooks, residual identities, live hook points",
         ("mechscope check", "mechscope check --model ./my-hf-folder --no-interventions --json"), MODEL,
         arg("--no-interventions", action="store_true", help="skip editing every hook point (faster)"))
def check_cmd(args: argparse.Namespace) -> Result:
    from ..core.check import check

    return check(_load(args), interventions=not args.no_interventions, progress=True)


@command("expert", "what does this expert do? routing, logit effect and ablation effect (LAYER.EXPERT)",
         ("mechscope expert 3.5 --model ./olmoe-folder", "mechscope expert L3E5 --json"), MODEL,
         arg("expert", help="LAYER.EXPERT, e.g. 3.5 (or L3E5)"), arg("--n", type=int, default=16,
                                                                    help="held-out sequences"))
def expert_cmd(args: argparse.Namespace) -> Result:
    from ..circuits.experts import expert_report
    from ..core.components import Component

    spec = args.expert.strip()
    comp = Component.parse(spec if spec.startswith("L") else "L{}E{}".format(*spec.split(".", 1)))
    if comp.kind != "expert":
        raise InputError(f"cannot read expert {args.expert!r}; write LAYER.EXPERT (e.g. 3.5) or L3E5")
    return expert_report(_load(args), comp.layer, comp.index, n_seqs=args.n)


@command("head", "what does this head do? an HTML report for one head (LAYER.HEAD)",
         ("mechscope head 18.6", "mechscope head L17H4 --out head.html"), MODEL,
         arg("head", help="LAYER.HEAD, e.g. 18.6 (or L18H6)"),
         arg("--out", default=None, help="HTML report path (default head_L{l}H{h}.html)"))
def head_cmd(args: argparse.Namespace) -> Result:
    from ..circuits.heads import head_report

    layer, head = parse_head(args.head)
    rep = head_report(_load(args), layer, head)
    path = rep.write(args.out or f"head_L{layer}H{head}.html")
    return Outcome(rep.summary() + f"\nreport: {path}", {**rep.to_dict(), "report": path})


@command("circuit", "find a circuit for a task: patching, EAP edges, faithfulness vs random circuits",
         ("mechscope circuit --task ioi --n 16 --png circuit.png", "mechscope circuit --task factual --threshold 0.1"),
         MODEL, TASK, arg("--threshold", type=float, default=0.05, help="minimum |normalised patching effect|"),
         arg("--ig-steps", type=int, default=0, help="EAP-IG interpolation steps (0: plain EAP)"),
         arg("--screen", type=int, default=64,
             help="patch exactly only the heads attribution patching ranks in the top N (0: every head)"),
         arg("--curve", default=None, metavar="PNG",
             help="also the faithfulness curve over circuit sizes (patching, EAP and EAP-IG rankings vs random, CPR/CMD), "
                  "drawn to PNG"), PICTURES)
def circuit_cmd(args: argparse.Namespace) -> Result:
    from ..circuits.discovery import find_circuit

    model = _load(args)
    _, _, _, ds = _task(args, model)
    if ds is None:
        raise InputError("circuit discovery needs a task dataset: pass --task or --task-file")
    res = find_circuit(model, ds, node_threshold=args.threshold, ig_steps=args.ig_steps,
                       screen_heads=args.screen or None, curve=args.curve is not None)
    if args.curve:
        res.extra["curve"].plot(args.curve)
    return _pictures(args, res, "circuit")


@command("toy", "train the 2-layer attention-only toy (induction with a known answer) and save it",
         ("mechscope toy --out attn-only-2l", "mechscope heads --model attn-only-2l"),
         arg("--out", default="attn-only-toy", help="folder for the HF model and tokenizer"),
         arg("--layers", type=int, default=2), arg("--heads", type=int, default=2),
         arg("--steps", type=int, default=800), arg("--seed", type=int, default=0))
def toy_cmd(args: argparse.Namespace) -> Result:
    from ..circuits.heads import detect_heads
    from ..circuits.toy import train_attn_only

    run = train_attn_only(n_layers=args.layers, n_heads=args.heads, steps=args.steps, seed=args.seed, progress=True)
    path = run.save(args.out)
    det = detect_heads(run.model)
    top = {k: det[k].top(3) for k in ("previous-token", "induction")}
    text = run.summary() + "\n" + "\n".join(det[k].summary(3) for k in top) + \
        f"\nsaved {path} (load it with --model {path})"
    return Outcome(text, {**run.to_dict(), "path": path, "top": top})


# ---------------------------------------------------------------------------------- SAEs
@command("sae train", "train an SAE on a corpus (default: the docstrings), save it (SAELens format) and evaluate it",
         ("mechscope sae train --hook blocks.15.hook_resid_post --arch topk --k 32 --width 4608 --out my-sae",
          "mechscope sae train --corpus my_corpus.txt --seqs 64 --steps 200 --out my-sae",
          "torchrun --nproc_per_node 2 -m mechscope sae train --steps 200 --out my-sae"),
         MODEL, arg("--hook", default="blocks.15.hook_resid_post"),
         arg("--arch", default="topk", choices=["relu", "topk", "batchtopk", "jumprelu"]),
         arg("--width", type=int, default=None, help="number of latents (default 8 x d_in)"),
         arg("--k", type=int, default=32, help="TopK/BatchTopK k"), arg("--l1", type=float, default=5.0),
         arg("--steps", type=int, default=1000), arg("--batch", type=int, default=1024),
         arg("--lr", type=float, default=3e-4), arg("--seqs", type=int, default=256, help="training sequences"),
         arg("--eval-seqs", type=int, default=16, help="held-out sequences for evaluation"),
         arg("--seq-len", type=int, default=128), arg("--out", default="sae-run"), arg("--resume", action="store_true"),
         arg("--partitions", type=int, default=0,
             help="split the training sequences into this many partitions, each sampled by its own generator "
                  "(default 0: min(64, --seqs, --batch), whatever the number of ranks); the same value gives the "
                  "same SAE on any number of ranks up to it, so adding ranks does not change the SAE"),
         arg("--acts", default=None, help="train on activation shards from harvest_to_disk (each rank reads its own)"),
         CORPUS)
def sae_train_cmd(args: argparse.Namespace) -> Result:
    from .. import distributed
    from ..core.progress import is_quiet, quiet, stage
    from ..distributed import split
    from ..sae import SAEConfig, TrainConfig, evaluate_sae, fit_sae, harvest, save_sae
    from ..sae.data import PartitionedSource, default_partitions

    with distributed.session() as dist, quiet(not dist.is_main or is_quiet()):
        model = _load(args)
        out = Path(args.out)
        tc = TrainConfig(steps=args.steps, batch_size=args.batch, lr=args.lr, partitions=args.partitions)
        if args.acts:
            source = PartitionedSource.from_shards(args.acts, args.batch, tc.seed, dist)
            info = {"corpus": f"activation shards in {args.acts}", "corpus_tokens": None}
        else:
            toks, info = _corpus(args, model, "train", args.seqs, args.seq_len)
            parts = args.partitions or default_partitions(toks.shape[0], args.batch)
            if parts < dist.world:
                raise InputError(f"{parts} partitions for {dist.world} ranks: each rank needs one; give more --seqs "
                                 f"or fewer ranks")
            mine = split(parts, dist.world)[dist.rank]
            stage(f"harvesting {args.hook} on {toks.numel()} tokens" + (
                f" (rank {dist.rank} of {dist.world}: partitions {list(mine)} of {parts})" if dist.active else ""))
            seqs = split(toks.shape[0], parts)  # partition p = the activations of sequences seqs[p]
            source = PartitionedSource({p: harvest(model, args.hook, toks[seqs[p].start:seqs[p].stop]) for p in mine},
                                       parts, args.batch, tc.seed, dist)
        cfg = SAEConfig(d_in=source.d_in, d_sae=args.width or 8 * source.d_in, architecture=args.arch, k=args.k,
                        hook_name=args.hook, model_name=model.cfg.model_name,
                        normalize_activations="expected_average_only_in", l1_coefficient=args.l1)
        run = fit_sae(source, cfg, tc, out=out / "train", resume=args.resume, dist=dist)
        if not dist.is_main:
            return Outcome(f"rank {dist.rank}: done", {"rank": dist.rank})
        path = save_sae(run.sae, out / "sae", log10_density=run.log10_density)
    held, held_info = _held_out(args, model)
    ev = evaluate_sae(model, run.sae, held)
    ranks = f" on {dist.world} ranks" if dist.active else ""
    return Outcome(f"saved {path}\n{ev.summary()}\ntrained{ranks} on {info['corpus']} ({info['corpus_tokens']} tokens)",
                   {**ev.to_dict(), "path": path, "training": run.to_dict(), **info, "world": dist.world,
                    "held_out_tokens": held_info["corpus_tokens"]})


def _held_out(args, model) -> tuple:
    return _corpus(args, model, "test", args.eval_seqs, args.seq_len)


def _load_sae(args):
    from ..sae import load_sae

    model = _load(args)
    if args.release or args.sae_id:
        if args.path or not (args.release and args.sae_id):
            raise InputError("give an SAE folder or hf:// path, or --release with --sae-id")
        return model, load_sae(release=args.release, sae_id=args.sae_id, model=model)
    if not args.path:
        raise InputError("name the SAE: a folder, hf://<org>/<repo>/<folder>, or --release and --sae-id")
    return model, load_sae(args.path, model)


@command("transcoders train", "train per-layer transcoders (each MLP's input -> its output) from one harvest pass, "
         "save them (SAELens layout, input and output hooks recorded) and evaluate each alone and all at once",
         ("mechscope transcoders train",
          "mechscope transcoders train --layers 0 1 2 --width 2304 --k 32 --steps 500 --out tc"),
         MODEL, arg("--layers", type=int, nargs="*", default=None, help="layers (default: all)"),
         arg("--arch", default="topk", choices=["topk", "batchtopk", "jumprelu"]),
         arg("--width", type=int, default=None, help="latents per layer (default 8 x d_model)"),
         arg("--k", type=int, default=32), arg("--no-skip", action="store_true", help="no linear skip connection"),
         arg("--steps", type=int, default=1000), arg("--batch", type=int, default=1024),
         arg("--lr", type=float, default=1e-3), arg("--seqs", type=int, default=256, help="training sequences"),
         arg("--eval-seqs", type=int, default=16), arg("--seq-len", type=int, default=128),
         arg("--out", default=None, help="folder (default: $MECHSCOPE_CACHE/transcoders/<model>, where "
                                        "`mechscope graph` looks)"), CORPUS)
def transcoders_train_cmd(args: argparse.Namespace) -> Result:
    from ..core.progress import stage
    from ..sae import SAEConfig, TrainConfig, save_many, train_many, transcoder_cache
    from ..sae.evaluate import evaluate_transcoders
    from ..techniques.inputs import check_range

    model = _load(args)
    args.out = args.out or str(transcoder_cache(model.cfg.model_name))
    layers = check_range("layers", args.layers, model.cfg.n_layers)
    toks, info = _corpus(args, model, "train", args.seqs, args.seq_len)
    d = model.cfg.d_model
    cfgs = [SAEConfig(d_in=d, d_sae=args.width or 8 * d, architecture=args.arch, k=args.k,
                      hook_name=model.mlp_input(l), hook_name_out=act_name("mlp_out", l),
                      skip=not args.no_skip, model_name=model.cfg.model_name,
                      normalize_activations="expected_average_only_in") for l in layers]
    stage(f"training {len(cfgs)} transcoders from one pass over {toks.numel()} tokens")
    res = train_many(model, toks, cfgs, TrainConfig(steps=args.steps, batch_size=args.batch, lr=args.lr))
    paths = save_many(res, args.out, [f"layer_{l}" for l in layers])
    held, held_info = _held_out(args, model)
    stage(f"evaluating on {held.numel()} held-out tokens")
    ev = evaluate_transcoders(model, [r.sae for r in res], held)
    atomic_write(Path(args.out) / "evaluation.json", json.dumps({**ev.to_dict(), "layers": layers, **info}, indent=2))
    return Outcome(f"{ev.summary()}\nsaved {len(paths)} transcoders under {args.out}/layer_<L> (and evaluation.json)"
                   f"\ntrained on {info['corpus']} ({info['corpus_tokens']} tokens)",
                   {**ev.to_dict(), "paths": paths, "layers": layers, **info,
                    "held_out_tokens": held_info["corpus_tokens"]})


@command("graph", "the attribution graph of one prompt through transcoders (a frozen replacement model): nodes, "
         "edges, pruning, replacement and completeness scores, an edge certificate, and an interactive HTML page",
         ('mechscope graph "The capital of the state containing Dallas is" --html graph.html',
          'mechscope graph "When Mary and John went to the store, John gave a drink to" --transcoders tc '
          "--max-features 2048 --labels 64 --html ioi.html --save ioi.safetensors"),
         MODEL, arg("prompt", help="the prompt (its next-token logits are explained)"),
         arg("--transcoders", default=None, help="folder of transcoders (default: $MECHSCOPE_CACHE/transcoders/<model>)"),
         arg("--target", nargs="*", default=None, help="target tokens (text, e.g. ' Paris'; default: the most likely "
                                                       "ones holding 95%% of the probability, at most 10)"),
         arg("--max-features", type=int, default=7500, help="feature rows to compute, most influential first"),
         arg("--batch", type=int, default=128, help="target rows per backward pass"),
         arg("--node-threshold", type=float, default=0.8), arg("--edge-threshold", type=float, default=0.98),
         arg("--certify", type=int, default=32, help="edges re-checked by perturbation (0: none)"),
         arg("--labels", type=int, default=0, help="label the pruned graph's features on this many corpus sequences"),
         arg("--label-top", type=int, default=150, help="how many of them (most influential first) get labels"),
         arg("--seq-len", type=int, default=64), CORPUS,
         arg("--html", default=None, help="write the interactive graph here"),
         arg("--save", default=None, help="write the graph here (.safetensors)"))
def graph_cmd(args: argparse.Namespace) -> Result:
    from ..core.progress import stage
    from ..graphs import attribution_graph
    from ..graphs.graph import FEATURE, LOGIT
    from ..graphs.html import graph_html
    from ..graphs.labels import label_features
    from ..sae import load_transcoders, transcoder_cache

    model = _load(args)
    folder = args.transcoders or transcoder_cache(model.cfg.model_name)
    tcs = load_transcoders(folder, model)
    targets = [model.to_single_token(t) for t in args.target] if args.target else None
    stage(f"attribution graph through {len(tcs)} transcoders from {folder}")
    g = attribution_graph(model, tcs, args.prompt, target_logits=targets, max_feature_nodes=args.max_features,
                          batch_size=args.batch, certify=args.certify)
    pruned = g.prune(args.node_threshold, args.edge_threshold)
    dashboards = {}
    if args.labels:
        toks, _ = _corpus(args, model, "train", args.labels, args.seq_len)
        kept = (pruned.keep & (g.kind == FEATURE)).nonzero(as_tuple=True)[0]
        dashboards = label_features(model, g, tcs, toks, g.top_features(args.label_top, among=kept))
    if args.save:
        g.save(args.save)
    if args.html:
        atomic_write(args.html, page(f"attribution graph: {args.prompt[:60]}",
                                     graph_html(pruned, dashboards) + f"<pre>{esc(g.summary())}\n"
                                     f"{esc(pruned.summary())}</pre>"))
    top = g.top_edges(10, into=int(g.nodes_of(LOGIT)[0]))
    lines = [g.summary(), pruned.summary(), f"strongest edges into {g.node_name(int(g.nodes_of(LOGIT)[0]))}:"]
    lines += [f"  {s:28s} {w:+.4f}" for s, _, w in top]
    return Outcome("\n".join(lines), {**g.to_dict(), "pruned": pruned.to_dict(),
                                      "top_edges_into_first_logit": top, "transcoders": str(folder)})


@command("sae eval", "evaluate a saved SAE on held-out text (L0, explained variance, CE loss recovered)",
         ("mechscope sae eval my-sae/sae",), SAE_MODEL)
def sae_eval_cmd(args: argparse.Namespace) -> Result:
    from ..sae import evaluate_sae

    model, sae = _load_sae(args)
    held, info = _held_out(args, model)
    ev = evaluate_sae(model, sae, held)
    return Outcome(f"{ev.summary()}\nevaluated on {info['corpus']} ({info['corpus_tokens']} held-out tokens)",
                   {**ev.to_dict(), **info})


@command("sae features", "the features that fire most on a text",
         ('mechscope sae features my-sae/sae --text "The capital of France is"',), SAE_MODEL,
         arg("--text", required=True, help="the text to read"), arg("--k", type=int, default=32,
                                                                     help="how many features to list"))
def sae_features_cmd(args: argparse.Namespace) -> Result:
    from ..sae.features import top_features

    model, sae = _load_sae(args)
    feats = top_features(model, sae, args.text, k=args.k)
    return Outcome("\n".join(f"feature {i:6d}  total activation {v:.3f}" for i, v in feats), {"features": feats})


@command("sae dashboard", "feature dashboards (offline HTML) for the densest features",
         ("mechscope sae dashboard my-sae/sae --out my-sae/dashboard",), SAE_MODEL,
         arg("--out", default="sae-dashboard", help="folder for index.html and one page per feature"))
def sae_dashboard_cmd(args: argparse.Namespace) -> Result:
    from ..sae.features import feature_stats, write_dashboards

    model, sae = _load_sae(args)
    held, info = _held_out(args, model)
    stats = feature_stats(model, sae, held, n_top=20)
    index = write_dashboards(model, sae, stats, args.out)
    return Outcome(f"dashboards for {len(stats.top)} features on {info['corpus']} ({info['corpus_tokens']} tokens): "
                   f"{index}", {"index": index, "features": list(stats.top), **info})


# ---------------------------------------------------------------------------------- projects and reports
@command("init", "scaffold a research project (README with hypothesis and validation plan, folders)",
         ("mechscope init ioi-circuit",), arg("name"), arg("--root", default="."))
def init_cmd(args: argparse.Namespace) -> Result:
    from ..project import init_project

    path = init_project(args.name, args.root)
    return Outcome(f"created {path}: edit README.md (question, hypothesis, falsification, validation plan)",
                   {"path": path})


@command("runs", "list and compare experiment records (runs/*/run.json)",
         ("mechscope runs", "mechscope runs --root my-project/runs --json"), arg("--root", default="runs"))
def runs_cmd(args: argparse.Namespace) -> Result:
    from ..project import list_runs, runs_table

    recs = list_runs(args.root)
    return Outcome(runs_table(recs) if recs else f"no runs under {args.root}/", recs)


@command("report", "an offline HTML report comparing experiment records",
         ("mechscope report --root runs --out runs.html", "mechscope report --root mechscope-demo/runs"),
         arg("--root", default="runs"), arg("--out", default="runs.html"))
def report_cmd(args: argparse.Namespace) -> Result:
    from ..project import list_runs, runs_report

    recs = list_runs(args.root)
    if not recs:
        raise NotFoundError(f"no run records under {args.root}/ (runs/<time>-<name>/run.json)")
    path = atomic_write(args.out, runs_report(recs))
    return Outcome(f"report of {len(recs)} runs: {path}", {"report": path, "runs": len(recs)})


@command("demo", "the demo investigation on the default model; writes an HTML report",
         ("mechscope demo", "mechscope demo --out demo-report"), MODEL,
         arg("--out", default="mechscope-demo", help="folder for report.html and its PNGs"))
def demo_cmd(args: argparse.Namespace) -> Result:
    import sys

    from ..project import Run
    from ..workflows import demo_investigation

    t0 = time.time()
    model = _load(args)
    print(f"loaded {model!r} in {time.time() - t0:.1f} s", file=sys.stderr, flush=True)
    with Run("demo", config={"model": model.cfg.model_name, "out": args.out}, seeds=[0],
             root=Path(args.out) / "runs") as run:
        rep = demo_investigation(model, args.out, echo=not args.json)
        run.log(**rep.metrics)
        run.artifact(Path(args.out) / "report.html")
        for item, evs in rep.checklist.evidence.items():  # reproducibility comes from the record itself
            for e in evs if item != "reproducibility" else []:
                run.check(item, e.text, f"{Path(args.out) / 'report.html'}{e.link or ''}")
    return Outcome(f"run record: {run.path}", {"report": Path(args.out) / "report.html",
                                                "sections": [s.title for s in rep.sections], "run": run.path,
                                                "metrics": rep.metrics})
