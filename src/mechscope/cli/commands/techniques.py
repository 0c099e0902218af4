"""Commands for one technique each: lens, dla, patch, attrib, ablate, tuned-lens, probe."""

from __future__ import annotations

import argparse

from ...core.errors import InputError
from ...core.hookpoints import act_name
from ...core.result import Result
from ..registry import Outcome, arg, command
from .common import CORPUS, MODEL, PICTURES, SITE, TASK, _corpus, _load, _pictures, _say_answer_scoring, _task


@command("lens", "logit lens over a prompt", ('mechscope lens "The capital of France is" --target " Paris"',
                                               'mechscope lens "1 2 3 4" --png lens.png --html lens.html'),
         MODEL, arg("prompt", help="the text to read"),
         arg("--target", action="append", help="answer token to track (repeatable)"), PICTURES)
def lens_cmd(args: argparse.Namespace) -> Result:
    from ...techniques.lens import logit_lens

    return _pictures(args, logit_lens(_load(args), args.prompt, targets=args.target or None), "logit lens")


@command("dla", "direct logit attribution of an answer (layers, heads, neurons)",
         ('mechscope dla "The capital of France is" --answer " Paris" --wrong " London" --png dla.png',),
         MODEL, arg("prompt", nargs="?", default=None, help="the prompt (or --task-file)"),
         arg("--answer", default=None, help="the answer token, e.g. ' Paris'"),
         arg("--wrong", default=None, help="a contrasting token: attribute the logit difference"),
         arg("--task-file", default=None, help="attribute each clean prompt of a task file to its first answer (and "
                                               "first wrong answer)"), PICTURES)
def dla_cmd(args: argparse.Namespace) -> Result:
    from ... import datasets as D
    from ...techniques.attribution import direct_logit_attribution

    model = _load(args)
    if args.task_file:
        if args.prompt or args.answer:
            raise InputError("give a prompt with --answer, or --task-file, not both")
        ds = D.load_task(args.task_file, model, answer_tokens="first")  # DLA reads one logit: an answer's first token
        _say_answer_scoring(ds)
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
    from ...techniques.patching import patch

    model = _load(args)
    clean, corr, metric, _ = _task(args, model)
    res = patch(model, clean, corr, metric, site=args.site, direction=args.direction, per_position=args.per_position)
    return _pictures(args, res, "activation patching")


@command("attrib", "attribution patching: first-order estimate of every patch",
         ("mechscope attrib --task ioi --site z --per-position --json",), MODEL, TASK, SITE, PICTURES)
def attrib_cmd(args: argparse.Namespace) -> Result:
    from ...techniques.attribution_patching import attribution_patch

    model = _load(args)
    clean, corr, metric, _ = _task(args, model)
    res = attribution_patch(model, clean, corr, metric, sites=(args.site,), direction=args.direction,
                            per_position=args.per_position)[args.site]
    return _pictures(args, res, "attribution patching")


@command("ablate", "zero/mean/resample ablation of heads, neurons or layers, with a CI",
         ("mechscope ablate --task ioi L9H3 L10H1 --method mean", "mechscope ablate --task factual L3 --method resample"),
         MODEL, TASK, arg("components", nargs="+", help="L3H5 (head), L3N100 (neuron), L3.attn, L3.mlp, L3"),
         arg("--method", default="zero", choices=["zero", "mean", "resample"],
             help="replace with zero, the mean over --reference, or another prompt's activation"),
         arg("--reference", default="clean", choices=["clean", "corrupted"],
             help="prompts the mean (or resample) comes from: the clean prompts themselves, or their corrupted "
                  "versions"),
         arg("--n-random", type=int, default=20, help="random component sets of the same size and kind, as the "
                                                     "baseline (0: none)"), PICTURES)
def ablate_cmd(args: argparse.Namespace) -> Result:
    from ...core.components import parse_components
    from ...core.progress import stage
    from ...techniques.ablation import ablate, compare_to_random

    model = _load(args)
    clean, corrupted, metric, ds = _task(args, model)
    if ds is not None and ds.prompt_len is not None:
        raise InputError("ablate reads one row per prompt, and answers of several tokens take a row each for the "
                         "answer and the wrong answer: use --answer-tokens first here, or patch, attrib, circuit or "
                         "investigate, which score them whole")
    reference = corrupted if args.reference == "corrupted" else None
    comps = parse_components(model, args.components)
    kinds = {c.kind for c in comps}
    if args.n_random and len(kinds) == 1 and kinds <= {"head", "neuron", "attn", "mlp", "expert"}:
        res = compare_to_random(model, clean, metric, comps, method=args.method, n_random=args.n_random,
                                reference=reference, seed=args.seed)
        _pictures(args, res.target, "ablation")
        return res
    if args.n_random:
        stage(f"no random baseline: the components mix kinds ({', '.join(sorted(kinds))}); ablate one kind (all "
              "heads, all neurons, ...) for a baseline")
    return _pictures(args, ablate(model, clean, metric, comps, method=args.method, reference=reference,
                                  seed=args.seed), "ablation")


@command("tuned-lens", "train a tuned lens on the default corpus and compare with the logit lens",
         ("mechscope tuned-lens --steps 100 --out lens.safetensors",), MODEL,
         arg("--steps", type=int, default=100, help="optimisation steps"),
         arg("--seq-len", type=int, default=64, help="tokens per sequence"),
         arg("--batch", type=int, default=4, help="sequences per step"),
         arg("--out", default="tuned_lens.safetensors", help="where to save the translators"),
         arg("--held-out-seqs", type=int, default=8, help="held-out sequences for the comparison"), CORPUS, PICTURES)
def tuned_lens_cmd(args: argparse.Namespace) -> Result:
    import torch

    from ...techniques.lens import train_tuned_lens

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
         arg("--layers", type=int, nargs="*", default=None, help="layers to probe (default: about six, evenly spaced)"),
         arg("--n", type=int, default=32,
                                                                 help="sequences from the held-out corpus"),
         arg("--seq-len", type=int, default=64, help="tokens per sequence"),
         arg("--shuffled", action="store_true", help="shuffled-label control instead of per-type labels"), CORPUS,
         PICTURES)
def probe_cmd(args: argparse.Namespace) -> Result:
    from ...techniques.probing import next_token_continues_word, probe_sweep

    model = _load(args)
    toks, _ = _corpus(args, model, "test", args.n, args.seq_len)
    layers = args.layers or list(range(0, model.cfg.n_layers, max(1, model.cfg.n_layers // 6)))
    res = probe_sweep(model, toks, next_token_continues_word(model, toks),
                      hooks=[act_name("resid_post", l) for l in layers], task="next token continues the word",
                      control="shuffled" if args.shuffled else True)
    return _pictures(args, res, "probe")

