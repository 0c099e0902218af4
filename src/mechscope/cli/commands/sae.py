"""Commands for sparse autoencoders and transcoders: sae train/eval/features/dashboard, transcoders train."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ...core.errors import InputError
from ...core.files import atomic_write
from ...core.hookpoints import act_name
from ...core.result import Result
from ..registry import Outcome, arg, command
from .common import CORPUS, MODEL, SAE_MODEL, _corpus, _held_out, _load, _load_sae

TRAINING = (  # what an SAE and a transcoder run share: the optimisation and the data it reads
    arg("--steps", type=int, default=1000, help="optimisation steps"),
    arg("--batch", type=int, default=1024, help="activations (tokens) per step"),
    arg("--seqs", type=int, default=256, help="training sequences"),
    arg("--eval-seqs", type=int, default=16, help="held-out sequences for evaluation"),
    arg("--seq-len", type=int, default=128, help="tokens per sequence"),
)


@command("sae train", "train an SAE on a corpus (default: the docstrings), save it (SAELens format) and evaluate it",
         ("mechscope sae train --hook blocks.15.hook_resid_post --arch topk --k 32 --width 4608 --out my-sae",
          "mechscope sae train --corpus my_corpus.txt --seqs 64 --steps 200 --out my-sae",
          "torchrun --nproc_per_node 2 -m mechscope sae train --steps 200 --out my-sae"),
         MODEL, arg("--hook", default="blocks.15.hook_resid_post", help="the hook point whose activations it reconstructs"),
         arg("--arch", default="topk", choices=["relu", "topk", "batchtopk", "jumprelu", "matryoshka"],
             help="the activation: ReLU with an L1 penalty, TopK, BatchTopK, JumpReLU, or Matryoshka BatchTopK"),
         arg("--width", type=int, default=None, help="number of latents (default 8 x d_in)"),
         arg("--k", type=int, default=32, help="TopK/BatchTopK: active latents per token"),
         arg("--prefixes", type=int, nargs="*", default=None,
             help="Matryoshka: the nested prefix sizes, ending at --width (default width/8 width/4 width/2 width)"),
         arg("--l1", type=float, default=5.0, help="ReLU/JumpReLU: sparsity penalty coefficient"),
         TRAINING,
         arg("--lr", type=float, default=3e-4, help="Adam learning rate"),
         arg("--out", default="sae-run", help="run folder: train/ (checkpoints) and sae/ (the SAE)"),
         arg("--resume", action="store_true", help="continue from the newest checkpoint in --out"),
         arg("--partitions", type=int, default=0,
             help="split the training sequences into this many partitions, each sampled by its own generator "
                  "(default 0: min(64, --seqs, --batch), whatever the number of ranks); the same value gives the "
                  "same SAE on any number of ranks up to it, so adding ranks does not change the SAE"),
         arg("--acts", default=None, help="train on activation shards from harvest_to_disk (each rank reads its own)"),
         CORPUS)
def sae_train_cmd(args: argparse.Namespace) -> Result:
    from ... import distributed
    from ...core.progress import is_quiet, quiet
    from ...core.work import WorkMeter
    from ...sae import evaluate_sae

    with distributed.session() as dist, quiet(not dist.is_main or is_quiet()):
        model = _load(args)
        model.manager.check(args.hook)  # before the corpus is read and packed
        meter = WorkMeter(model)  # the harvest, the training and the evaluation, each against its floor
        with meter:
            done = _train_one_sae(args, model, dist, meter)
        if done is None:
            return Outcome(f"rank {dist.rank}: done", {"rank": dist.rank})
    path, run, info = done
    held, held_info = _held_out(args, model)  # the main rank alone, once the ranks' group is gone
    with meter, meter.stage("evaluation (no floor claimed)"):
        ev = evaluate_sae(model, run.sae, held)
    ranks = f" on {dist.world} ranks" if dist.active else ""
    return Outcome(f"saved {path}\n{ev.summary()}\ntrained{ranks} on {info['corpus']} ({info['corpus_tokens']} tokens)"
                   f"\n{meter.log.summary()}",
                   {**ev.to_dict(), "path": path, "training": run.to_dict(), **info, "world": dist.world,
                    "held_out_tokens": held_info["corpus_tokens"], "work": meter.log.to_dict()})


def _train_one_sae(args: argparse.Namespace, model, dist, meter):
    """``sae train``'s harvest and training, and the saved SAE: ``(path, run, corpus info)`` (None on a rank other than
    the main one)."""
    from ...core.progress import stage
    from ...distributed import split
    from ...sae import SAEConfig, TrainConfig, fit_sae, save_sae
    from ...sae.data import PartitionedSource, default_partitions, harvest_partitions

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
        # partition p = the activations of sequences split(n, parts)[p]: one harvest over all of this rank's
        with meter.stage("harvest"):
            source = PartitionedSource(harvest_partitions(model, toks, parts, mine, hook=args.hook), parts,
                                       args.batch, tc.seed, dist)
    cfg = SAEConfig(d_in=source.d_in, d_sae=args.width or 8 * source.d_in, architecture=args.arch, k=args.k,
                    hook_name=args.hook, model_name=model.cfg.model_name, matryoshka_widths=tuple(args.prefixes or ()),
                    normalize_activations="expected_average_only_in", l1_coefficient=args.l1)
    with meter.stage("training (the dictionary alone)"):
        run = fit_sae(source, cfg, tc, out=out / "train", resume=args.resume, dist=dist)
    if not dist.is_main:
        return None
    return save_sae(run.sae, out / "sae", log10_density=run.log10_density), run, info


@command("transcoders train", "train per-layer transcoders (each MLP's input -> its output) or a cross-layer "
         "transcoder (--kind clt: each layer's features write into every later MLP output), from one harvest pass, "
         "save them and evaluate them",
         ("mechscope transcoders train",
          "mechscope transcoders train --layers 0 1 2 --width 2304 --k 32 --steps 500 --out tc",
          "mechscope transcoders train --kind clt --width 768 --k 8 --steps 2000 --out clt",
          "torchrun --nproc_per_node 2 -m mechscope transcoders train --kind clt --out clt"),
         MODEL, arg("--kind", choices=["plt", "clt"], default="plt",
                    help="plt: one transcoder per layer (SAELens layout, layer_<L>/); clt: a cross-layer transcoder "
                         "trained and saved in circuit-tracer's layout (<out>/clt, checkpoints in <out>/train)"),
         arg("--layers", type=int, nargs="*", default=None, help="layers (default: all)"),
         arg("--arch", default=None, choices=["topk", "batchtopk", "jumprelu", "matryoshka", "relu"],
             help="the activation (default: topk for plt, batchtopk for clt, which is saved as JumpReLU thresholds)"),
         arg("--width", type=int, default=None, help="latents per layer (default 8 x d_model)"),
         arg("--k", type=int, default=32, help="TopK/BatchTopK: active latents per token (and layer); JumpReLU (clt): "
                                               "about this many fire per layer at the start"),
         arg("--skip", action=argparse.BooleanOptionalAction, default=None,
             help="a linear skip connection per layer (default: on for plt, off for clt, as circuit-tracer's CLTs)"),
         arg("--reach", type=int, default=0, help="clt: target layers per source (0: every later layer; 1: per-layer "
                                                  "transcoders trained and saved as the CLT is)"),
         arg("--tied", action="store_true", help="clt: one decoder per source layer shared by its targets (L decoder "
                                                 "blocks instead of L(L+1)/2; see docs/sae.md for what it costs)"),
         arg("--input", choices=["resid_mid", "mlp_in"], default="resid_mid",
             help="clt: what the encoders read (the residual stream before the MLP, as circuit-tracer's CLTs, or the "
                  "MLP's normalised input)"),
         arg("--l0-coefficient", type=float, default=2e-4, help="clt JumpReLU: the L0 penalty per active feature"),
         TRAINING,
         arg("--lr", type=float, default=1e-3, help="Adam learning rate"),
         arg("--resume", action="store_true", help="clt: continue from the checkpoint in <out>/train"),
         arg("--partitions", type=int, default=0, help="clt: training sequences split into this many partitions "
                                                        "(default min(64, --seqs, --batch); the same value gives the "
                                                        "same CLT on any number of ranks up to it)"),
         arg("--out", default=None, help="folder (default: $MECHSCOPE_CACHE/transcoders/<model> for plt, where "
                                        "`mechscope graph` looks; <that>-clt for clt)"), CORPUS)
def transcoders_train_cmd(args: argparse.Namespace) -> Result:
    from ...core.progress import stage
    from ...sae import SAEConfig, TrainConfig, save_many, train_many, transcoder_cache
    from ...sae.evaluate import evaluate_transcoders
    from ...techniques.inputs import check_range

    if args.kind == "clt":
        return _train_clt_cmd(args)
    if args.arch == "relu" or args.reach or args.tied or args.resume or args.partitions:
        raise InputError("--arch relu, --reach, --tied, --resume and --partitions are for --kind clt; per-layer "
                         "transcoders train with topk, batchtopk, jumprelu or matryoshka")
    model = _load(args)
    args.out = args.out or str(transcoder_cache(model.cfg.model_name))
    layers = check_range("layers", args.layers, model.cfg.n_layers)
    toks, info = _corpus(args, model, "train", args.seqs, args.seq_len)
    d = model.cfg.d_model
    cfgs = [SAEConfig(d_in=d, d_sae=args.width or 8 * d, architecture=args.arch or "topk", k=args.k,
                      hook_name=model.mlp_input(l), hook_name_out=act_name("mlp_out", l),
                      skip=args.skip is not False, model_name=model.cfg.model_name,
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


def _train_clt_cmd(args: argparse.Namespace) -> Result:
    """``transcoders train --kind clt``: harvest every layer at once, train with the one dictionary trainer (resumable,
    torchrun), save in circuit-tracer's layout and evaluate per layer and all at once."""
    from ... import distributed
    from ...core.progress import is_quiet, quiet, stage
    from ...sae import TrainConfig, transcoder_cache
    from ...sae.clt_train import clt_config, train_clt
    from ...sae.evaluate import evaluate_clt
    from ...sae.replacement import save_replacement
    from ...techniques.inputs import check_range

    if args.arch == "matryoshka":
        raise InputError("--arch matryoshka is for per-layer transcoders; a CLT trains with batchtopk, jumprelu, "
                         "topk or relu")
    if args.reach < 0:
        raise InputError(f"--reach must be 0 (every later layer) or a positive number of layers, got {args.reach}")
    with distributed.session() as dist, quiet(not dist.is_main or is_quiet()):
        model = _load(args)
        out = Path(args.out or f"{transcoder_cache(model.cfg.model_name)}-clt")
        layers = check_range("layers", args.layers, model.cfg.n_layers)
        cfg = clt_config(model, args.width or 8 * model.cfg.d_model, layers, input=args.input,
                         architecture=args.arch or "batchtopk", k=args.k, reach=args.reach, tied=args.tied,
                         skip=bool(args.skip), l0_coefficient=args.l0_coefficient)
        toks, info = _corpus(args, model, "train", args.seqs, args.seq_len)
        tc = TrainConfig(steps=args.steps, batch_size=args.batch, lr=args.lr, partitions=args.partitions)
        stage(f"training a {cfg.kind.upper()} ({cfg.architecture}, {cfg.n_layers} layers x {cfg.d_sae} features, "
              f"{cfg.decoder_blocks()} decoder blocks) on {toks.numel()} tokens")
        run = train_clt(model, toks, cfg, tc, out=out / "train", resume=args.resume, dist=dist)
        if not dist.is_main:
            return Outcome(f"rank {dist.rank}: done", {"rank": dist.rank})
        path = save_replacement(run.sae, out / "clt", model=model)
    held, held_info = _held_out(args, model)
    stage(f"evaluating on {held.numel()} held-out tokens")
    ev = evaluate_clt(model, run.sae, held)
    atomic_write(out / "evaluation.json", json.dumps({**ev.to_dict(), **info, "training": run.to_dict()}, indent=2))
    side = json.loads((path / "mechscope.json").read_text())
    ct = "circuit-tracer reads it (config.yaml)" if side["circuit_tracer_reads_it"] else \
        "circuit-tracer cannot read it: " + "; ".join(side["why_not"])
    ranks = f" on {dist.world} ranks" if dist.active else ""
    return Outcome(f"{ev.summary()}\nsaved {path} in circuit-tracer's layout ({ct}); `mechscope graph --transcoders "
                   f"{path}` builds graphs on it\ntrained{ranks} on {info['corpus']} ({info['corpus_tokens']} tokens)",
                   {**ev.to_dict(), "path": path, "training": run.to_dict(), **info, "world": dist.world,
                    "held_out_tokens": held_info["corpus_tokens"], "circuit_tracer_reads_it":
                    side["circuit_tracer_reads_it"]})



EXPLAINER = (
    arg("--explainer-url", default=None, help="an OpenAI-compatible API base (a vLLM or llama.cpp server), e.g. "
                                              "http://127.0.0.1:8000/v1; default: the loaded model explains"),
    arg("--explainer-model", default="default", help="the model name sent to --explainer-url"),
    arg("--random", type=int, default=10, help="random directions explained and scored as the control"),
)


def _explain_kwargs(args: argparse.Namespace) -> dict:
    from ...sae.autointerp import EndpointExplainer

    ex = EndpointExplainer(args.explainer_url, model=args.explainer_model) if args.explainer_url else None
    return {"explainer": ex, "n_random": args.random}


def _feature_list(text: str | None, d_sae: int) -> list[int] | None:
    if not text:
        return None
    try:
        feats = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise InputError(f"--features takes comma-separated integers, e.g. 12,97; got {text!r}") from None
    bad = [f for f in feats if not 0 <= f < d_sae]
    if bad or not feats:
        raise InputError(f"--features must be in 0..{d_sae - 1} (the SAE has {d_sae}); got {bad}")
    return feats


@command("sae eval", "evaluate a saved SAE on held-out text: reconstruction and CE loss (core), and with --suite "
         "first-letter absorption, k-sparse probing and autointerp", (
             "mechscope sae eval my-sae/sae",
             "mechscope sae eval my-sae/sae --suite core,absorption,probing",
             "mechscope sae eval my-sae/sae --suite core,autointerp --explainer-url http://127.0.0.1:8000/v1"),
         SAE_MODEL,
         arg("--suite", default="core", help="comma-separated parts: core, absorption, probing, autointerp "
                                             "(core always runs)"),
         arg("--reseeds", type=int, default=3, help="data-order reseeds behind the absorption and probing intervals"),
         arg("--n-features", type=int, default=50, help="autointerp: features explained"), EXPLAINER)
def sae_eval_cmd(args: argparse.Namespace) -> Result:
    from ...sae import evaluate_sae
    from ...sae.evaluate import parse_suite

    suite = parse_suite(args.suite)
    if args.reseeds < 1:
        raise InputError(f"--reseeds must be at least 1 (3 or more for an interval), got {args.reseeds}")
    model, sae = _load_sae(args)
    held, info = _held_out(args, model)
    opts = {"autointerp": {**_explain_kwargs(args), "n_features": args.n_features}}
    ev = evaluate_sae(model, sae, held, suite=suite, reseeds=args.reseeds, options=opts)
    return Outcome(f"{ev.summary()}\nevaluated on {info['corpus']} ({info['corpus_tokens']} held-out tokens)",
                   {**ev.to_dict(), **info, "suite": list(suite)})


@command("sae explain", "explain SAE features with a language model and score the explanations by log-probabilities "
         "against shuffled and random-direction controls; saves explanations.json in the SAE folder", (
             "mechscope sae explain my-sae/sae",
             "mechscope sae explain my-sae/sae --features 12,97 --explainer-url http://127.0.0.1:8000/v1"),
         SAE_MODEL,
         arg("--features", default=None, help="comma-separated feature ids (default: --n-features sampled across "
                                              "firing-density bands)"),
         arg("--n-features", type=int, default=50, help="features to explain when --features is not given"),
         arg("--seqs", type=int, default=128, help="corpus sequences to draw contexts from"),
         arg("--no-save", action="store_true", help="do not write explanations.json into the SAE folder"), EXPLAINER)
def sae_explain_cmd(args: argparse.Namespace) -> Result:
    from ...sae.autointerp import explain_features

    model, sae = _load_sae(args)
    feats = _feature_list(args.features, sae.cfg.d_sae)
    toks, info = _corpus(args, model, "test", args.seqs, args.seq_len)
    if toks.shape[0] < args.seqs:
        toks, info = _corpus(args, model, "train", args.seqs, args.seq_len)
    res = explain_features(model, sae, toks, features=feats, n_features=args.n_features, **_explain_kwargs(args))
    where = ""
    if not args.no_save and args.path and Path(args.path).is_dir():
        where = f"\nsaved {res.save(args.path)} (dashboards, graph labels and investigate read it)"
    return Outcome(f"{res.summary()}\ncontexts from {info['corpus']} ({info['corpus_tokens']} tokens){where}",
                   {**res.to_dict(), **info})


@command("sae features", "the features that fire most on a text",
         ('mechscope sae features my-sae/sae --text "The capital of France is"',), SAE_MODEL,
         arg("--text", required=True, help="the text to read"), arg("--k", type=int, default=32,
                                                                     help="how many features to list"))
def sae_features_cmd(args: argparse.Namespace) -> Result:
    from ...sae.features import top_features

    model, sae = _load_sae(args)
    return top_features(model, sae, args.text, k=args.k)


@command("sae dashboard", "feature dashboards (offline HTML): features sampled across firing-density bands, or the "
         "ones you name", ("mechscope sae dashboard my-sae/sae --out my-sae/dashboard",
                           "mechscope sae dashboard my-sae/sae --features 12,97,2048"), SAE_MODEL,
         arg("--out", default="sae-dashboard", help="folder for index.html and one page per feature"),
         arg("--features", default=None, help="comma-separated feature ids (default: 20 sampled across firing-density "
                                              "bands, since the densest are rarely monosemantic)"),
         arg("--seqs", type=int, default=128, help="corpus sequences to find examples in: the held-out split when it "
                                                   "has that many, else the training split"),
         arg("--explain", action="store_true", help="explain and score the dashboards' features first (autointerp; "
                                                    "saved in the SAE folder) and show the explanations"), EXPLAINER)
def sae_dashboard_cmd(args: argparse.Namespace) -> Result:
    from ...core.progress import stage
    from ...sae.features import feature_stats, write_dashboards

    model, sae = _load_sae(args)
    feats = _feature_list(args.features, sae.cfg.d_sae)
    toks, info = _corpus(args, model, "test", args.seqs, args.seq_len)
    if toks.shape[0] < args.seqs:
        stage(f"the held-out split gave {toks.shape[0]} of {args.seqs} sequences: reading examples from the training "
              "split instead (dashboards are descriptive, not an evaluation)")
        toks, info = _corpus(args, model, "train", args.seqs, args.seq_len)
    stats = feature_stats(model, sae, toks, features=feats, n_top=20)
    explained = None
    if args.explain:
        from ...sae.autointerp import explain_features

        explained = explain_features(model, sae, toks, features=list(stats.top), **_explain_kwargs(args))
        sae.explanations.update(explained.explanations)
        if args.path and Path(args.path).is_dir():
            explained.save(args.path)
    source = f"{info['corpus']}, {info['corpus_split']} split"
    index = write_dashboards(model, sae, stats, args.out, source=source)
    how = "named with --features" if feats else "sampled across firing-density bands"
    bands = sorted(set(stats.bands.values()))
    return Outcome(f"dashboards for {len(stats.top)} features ({how}) on {source} ({info['corpus_tokens']} tokens): "
                   f"{index}" + (f"\ndensity bands: {'; '.join(bands)}" if bands else "")
                   + (f"\n{explained.summary()}" if explained is not None else ""),
                   {"index": index, "features": list(stats.top), "bands": stats.bands, **info,
                    **({"autointerp": explained.to_dict()} if explained is not None else {})})
