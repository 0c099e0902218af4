"""The ``mechscope`` command line. Nothing in the package imports this module."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

EXAMPLES = {
    "env": "mechscope env\n  mechscope env --json",
    "info": "mechscope info\n  mechscope info --model ./my-hf-folder --hooks",
    "estimate": "mechscope estimate --batch 8 --seq-len 512 --cache all\n  mechscope estimate --model gemma3-270m --sae-width 16384",
    "lens": "mechscope lens \"The capital of France is\" --target \" Paris\"\n  mechscope lens \"1 2 3 4\" --png lens.png --html lens.html",
    "demo": "mechscope demo\n  mechscope demo --out demo-report",
    "dla": "mechscope dla \"The capital of France is\" --answer \" Paris\" --wrong \" London\" --png dla.png",
    "patch": "mechscope patch --task ioi --site resid_pre --png ioi.png\n  mechscope patch --clean \"The capital of France is\" "
             "--corrupted \"The capital of Poland is\" --answer \" Paris\" --wrong \" Warsaw\" --site z",
    "attrib": "mechscope attrib --task ioi --site z --per-position --json",
    "ablate": "mechscope ablate --task ioi L9H3 L10H1 --method mean\n  mechscope ablate --task factual L3 --method resample",
    "tuned-lens": "mechscope tuned-lens --steps 100 --out lens.safetensors",
    "sae": "mechscope sae train --hook blocks.15.hook_resid_post --arch topk --k 32 --width 4608 --out my-sae\n"
           "  mechscope sae eval my-sae/sae\n  mechscope sae features my-sae/sae --text \"The capital of France is\"\n"
           "  mechscope sae dashboard my-sae/sae --out my-sae/dashboard",
    "circuit": "mechscope circuit --task ioi --n 16 --png circuit.png\n  mechscope circuit --task factual --threshold 0.1",
    "probe": "mechscope probe --layers 0 10 20 27 --png probe.png",
    "init": "mechscope init ioi-circuit",
    "report": "mechscope report --root runs --out runs.html\n  mechscope report --root mechscope-demo/runs",
    "runs": "mechscope runs\n  mechscope runs --root my-project/runs --json",
    "heads": "mechscope heads\n  mechscope heads --html heads.html --json",
    "head": "mechscope head 18.6\n  mechscope head L17H4 --out head.html",
    "toy": "mechscope toy --out attn-only-2l\n  mechscope heads --model attn-only-2l",
}


def _add_model(p):
    p.add_argument("--model", default=None, help="alias, local HF folder, .gguf file or hub id (default: smollm2-135m)")
    p.add_argument("--dtype", default=None, help="float32 (default) or bfloat16")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")


def _load(args):
    import mechscope

    return mechscope.load(args.model or mechscope.DEFAULT_MODEL, device=args.device, dtype=args.dtype)


def cmd_env(args):
    from .compute import env

    e = env()
    return e.to_dict(), e.summary()


def cmd_info(args):
    model = _load(args)
    c = model.cfg
    d = c.to_dict()
    d["n_hook_points"] = len(model.hook_names)
    text = [repr(model), "", "config:"] + [f"  {k:20} {v}" for k, v in d.items() if k != "extra"]
    if args.hooks:
        d["hook_names"] = model.hook_names
        per = [n.split(".", 2)[2] for n in model.hook_names if n.startswith("blocks.0.")]
        text += ["", "hook points (per block L):"] + [f"  blocks.L.{p}" for p in per]
        text += ["top level:"] + [f"  {n}" for n in model.hook_names if not n.startswith("blocks.")]
    return d, "\n".join(text)


def cmd_estimate(args):
    from .compute import estimate_memory
    from .loading import DEFAULT_MODEL

    est = estimate_memory(args.model or DEFAULT_MODEL, dtype=args.dtype or "float32", batch=args.batch,
                          seq_len=args.seq_len, cache_names=args.cache, sae_width=args.sae_width)
    return est.to_dict(), est.summary()


def cmd_lens(args):
    from .lens import logit_lens

    model = _load(args)
    res = logit_lens(model, args.prompt, targets=args.target or None)
    if args.png:
        res.plot(args.png)
    if args.html:
        from .viz import atomic_write, page

        atomic_write(args.html, page("logit lens", res.to_html()))
    return res.to_dict(), res.summary()


def cmd_demo(args):
    from .workflows import demo_investigation

    t0 = time.time()
    model = _load(args)
    print(f"loaded {model!r} in {time.time() - t0:.1f} s", flush=True)
    from .project import Run

    with Run("demo", config={"model": model.cfg.model_name, "out": args.out}, seeds=[0],
             root=Path(args.out) / "runs") as run:
        rep = demo_investigation(model, args.out)
        run.log(**rep.metrics)
        run.artifact(Path(args.out) / "report.html")
    path = Path(args.out) / "report.html"
    return {"report": str(path), "sections": [s.title for s in rep.sections], "run": str(run.path)}, \
        f"run record: {run.path}"


def _task(args, model):
    """(clean, corrupted, metric, dataset) from --task or from --clean/--corrupted/--answer/--wrong."""
    from . import datasets as D
    from .metrics import logit_diff

    if args.task:
        makers = {"ioi": lambda: D.ioi(model, args.n, seed=args.seed), "factual": lambda: D.factual(model, args.n),
                  "greater-than": lambda: D.greater_than(model, args.n, seed=args.seed),
                  "induction": lambda: D.induction(model, args.n, seed=args.seed)}
        ds = makers[args.task]()
        return ds.clean, ds.corrupted, ds.metric, ds
    if not (args.clean and args.corrupted and args.answer):
        raise ValueError("give --task, or --clean, --corrupted and --answer (and usually --wrong)")
    a = model.to_single_token(args.answer)
    b = model.to_single_token(args.wrong) if args.wrong else None

    def metric(logits):
        if b is None:
            return logits[:, -1, a]
        return logit_diff(logits, a, b)

    return args.clean, args.corrupted, metric, None


def _write_outputs(args, res, title):
    from .viz import atomic_write, page

    if getattr(args, "png", None):
        res.plot(args.png)
    if getattr(args, "html", None):
        atomic_write(args.html, page(title, res.to_html()))


def cmd_dla(args):
    from .attribution import direct_logit_attribution

    model = _load(args)
    res = direct_logit_attribution(model, args.prompt, args.answer, args.wrong)
    _write_outputs(args, res, "direct logit attribution")
    return {"components": dict(zip(res.components, res.values.tolist())), "heads": res.heads.tolist(),
            "target": res.target, "error": res.error, "neurons": res.neurons}, res.summary()


def cmd_patch(args):
    from .patching import patch

    model = _load(args)
    clean, corr, metric, _ = _task(args, model)
    res = patch(model, clean, corr, metric, site=args.site, direction=args.direction, per_position=args.per_position)
    _write_outputs(args, res, "activation patching")
    return {"values": res.values.tolist(), "normalized": res.normalized().tolist(), "axes": res.axes,
            "clean": res.clean_value, "corrupted": res.corrupted_value, "stats": res.stats}, res.summary()


def cmd_attrib(args):
    from .attribution import attribution_patch

    model = _load(args)
    clean, corr, metric, _ = _task(args, model)
    res = attribution_patch(model, clean, corr, metric, sites=(args.site,), direction=args.direction,
                            per_position=args.per_position)[args.site]
    _write_outputs(args, res, "attribution patching")
    return {"values": res.values.tolist(), "normalized": res.normalized().tolist(), "axes": res.axes}, res.summary()


def cmd_ablate(args):
    from .ablation import ablate

    model = _load(args)
    clean, _, metric, _ = _task(args, model)
    res = ablate(model, clean, metric, args.components, method=args.method, seed=args.seed)
    _write_outputs(args, res, "ablation")
    e = res.effect
    return {"effect": e.value, "ci": [e.low, e.high], "baseline": res.baseline.tolist(),
            "ablated": res.ablated.tolist()}, res.summary()


def cmd_tuned_lens(args):
    from .lens import train_tuned_lens

    model = _load(args)
    lens, cmp = train_tuned_lens(model, n_steps=args.steps, seq_len=args.seq_len, batch=args.batch)
    path = lens.save(args.out)
    _write_outputs(args, cmp, "tuned lens")
    return {"path": str(path), "logit_lens_kl": cmp.logit_lens_kl.tolist(),
            "tuned_lens_kl": cmp.tuned_lens_kl.tolist()}, cmp.summary() + f"\nsaved {path}"


def cmd_heads(args):
    from .heads import detect_heads
    from .viz import atomic_write, page

    model = _load(args)
    det = detect_heads(model)
    if args.html:
        atomic_write(args.html, page("head detectors", "".join(d.to_html() for d in det.values())))
    text = "\n\n".join(d.summary() for d in det.values())
    return {k: {"scores": v.scores.tolist(), "top": v.top(5)} for k, v in det.items()}, text


def _parse_head(spec: str) -> tuple[int, int]:
    import re

    m = re.fullmatch(r"L?(\d+)[.H](\d+)", spec.strip())
    if not m:
        raise ValueError(f"cannot read head {spec!r}; write LAYER.HEAD (e.g. 18.6) or L18H6")
    return int(m.group(1)), int(m.group(2))


def cmd_head(args):
    from .heads import head_report

    layer, head = _parse_head(args.head)
    model = _load(args)
    rep = head_report(model, layer, head)
    path = rep.write(args.out or f"head_L{layer}H{head}.html")
    return {"head": rep.name, "scores": rep.scores, "ov_self_rate": rep.ov_self_rate, "report": str(path)}, \
        rep.summary() + f"\nreport: {path}"


def cmd_toy(args):
    from .heads import detect_heads
    from .toy import train_attn_only

    run = train_attn_only(n_layers=args.layers, n_heads=args.heads, steps=args.steps, seed=args.seed, progress=True)
    path = run.save(args.out)
    det = detect_heads(run.model)
    top = {k: det[k].top(3) for k in ("previous-token", "induction")}
    text = run.summary() + "\n" + "\n".join(det[k].summary(3) for k in top) + f"\nsaved {path} (load it with --model {path})"
    return {"path": str(path), "final_loss": run.losses[-1], "seconds": run.seconds, "top": top}, text


def cmd_sae(args):
    from . import corpus
    from .sae import SAEConfig, TrainConfig, evaluate_sae, harvest, load_sae, save_sae, train_sae
    from .sae.features import feature_stats, top_features, write_dashboards

    model = _load(args)
    test = corpus.pack(model, corpus.default_corpus("test"), args.seq_len, n_seqs=args.eval_seqs)
    if args.action == "train":
        out = Path(args.out)
        toks = corpus.pack(model, corpus.default_corpus("train"), args.seq_len, n_seqs=args.seqs)
        print(f"harvesting {args.hook} on {toks.numel()} tokens", flush=True)
        acts = harvest(model, args.hook, toks)
        cfg = SAEConfig(d_in=acts.shape[1], d_sae=args.width or 8 * acts.shape[1], architecture=args.arch, k=args.k,
                        hook_name=args.hook, model_name=model.cfg.model_name,
                        normalize_activations="expected_average_only_in", l1_coefficient=args.l1)
        sae = train_sae(acts, cfg, TrainConfig(steps=args.steps, batch_size=args.batch, lr=args.lr),
                        out=out / "train", resume=args.resume)
        path = save_sae(sae, out / "sae", log10_density=sae.extra_state["log10_density"])
        ev = evaluate_sae(model, sae, test)
        return {"path": str(path), "l0": ev.l0, "explained_variance": ev.explained_variance,
                "ce_recovered": ev.ce_recovered, "dead_fraction": ev.dead_fraction}, f"saved {path}\n{ev.summary()}"
    sae = load_sae(args.path, model)
    if args.action == "eval":
        ev = evaluate_sae(model, sae, test)
        return {"l0": ev.l0, "explained_variance": ev.explained_variance, "mse": ev.mse, "ce_clean": ev.ce_clean,
                "ce_sae": ev.ce_sae, "ce_zero": ev.ce_zero, "ce_recovered": ev.ce_recovered,
                "dead_fraction": ev.dead_fraction}, ev.summary()
    if args.action == "features":
        if not args.text:
            raise ValueError("give --text to list the features that fire most on it")
        feats = top_features(model, sae, args.text, k=args.k)
        return {"features": feats}, "\n".join(f"feature {i:6d}  total activation {v:.3f}" for i, v in feats)
    stats = feature_stats(model, sae, test, n_top=20)
    index = write_dashboards(model, sae, stats, args.out)
    return {"index": str(index), "features": list(stats.top)}, f"dashboards for {len(stats.top)} features: {index}"


def cmd_circuit(args):
    from .circuit import find_circuit

    model = _load(args)
    _, _, _, ds = _task(args, model)
    if ds is None:
        raise ValueError("circuit discovery needs a task dataset: pass --task")
    res = find_circuit(model, ds, node_threshold=args.threshold, ig_steps=args.ig_steps)
    _write_outputs(args, res, "circuit")
    f = res.faithfulness
    return {"nodes": res.nodes, "edges": res.edges, "faithfulness": [f.value, f.low, f.high],
            "random_faithfulness": [e.value for e in res.random_faithfulness],
            "knockout": [res.knockout.value, res.knockout.low, res.knockout.high]}, res.summary()


def cmd_probe(args):
    from . import corpus
    from .probing import next_token_continues_word, probe_sweep

    model = _load(args)
    toks = corpus.pack(model, corpus.default_corpus("test"), args.seq_len, n_seqs=args.n)
    layers = args.layers or list(range(0, model.cfg.n_layers, max(1, model.cfg.n_layers // 6)))
    res = probe_sweep(model, toks, next_token_continues_word(model, toks),
                      hooks=[f"blocks.{l}.hook_resid_post" for l in layers], task="next token continues the word",
                      control="shuffled" if args.shuffled else True)
    _write_outputs(args, res, "probe")
    return {"hooks": res.hooks, "scores": [e.value for e in res.scores],
            "control": [e.value for e in res.control] if res.control else None,
            "selectivity": [e.value for e in res.selectivity] if res.selectivity else None}, res.summary()


def cmd_init(args):
    from .project import init_project

    path = init_project(args.name, args.root)
    return {"path": str(path)}, f"created {path}: edit README.md (question, hypothesis, falsification, validation plan)"


def cmd_report(args):
    from .project import list_runs, runs_report
    from .viz import atomic_write

    recs = list_runs(args.root)
    if not recs:
        raise FileNotFoundError(f"no run records under {args.root}/ (runs/<time>-<name>/run.json)")
    path = atomic_write(args.out, runs_report(recs))
    return {"report": str(path), "runs": len(recs)}, f"report of {len(recs)} runs: {path}"


def cmd_runs(args):
    from .project import list_runs, runs_table

    recs = list_runs(args.root)
    if not recs:
        return [], f"no runs under {args.root}/"
    return recs, runs_table(recs)


COMMANDS = {
    "env": (cmd_env, "the device, its memory and dtype support"),
    "info": (cmd_info, "the model card: architecture, sizes, hook names"),
    "estimate": (cmd_estimate, "memory needed for a run, before loading, with advice"),
    "lens": (cmd_lens, "logit lens over a prompt"),
    "dla": (cmd_dla, "direct logit attribution of an answer (layers, heads, neurons)"),
    "patch": (cmd_patch, "activation patching over layers x positions or heads"),
    "attrib": (cmd_attrib, "attribution patching: first-order estimate of every patch"),
    "ablate": (cmd_ablate, "zero/mean/resample ablation of heads, neurons or layers, with a CI"),
    "tuned-lens": (cmd_tuned_lens, "train a tuned lens on the default corpus and compare with the logit lens"),
    "sae": (cmd_sae, "sparse autoencoders: train, eval, features, dashboard"),
    "circuit": (cmd_circuit, "find a circuit for a task: patching, EAP edges, faithfulness vs random circuits"),
    "probe": (cmd_probe, "linear probes per layer for a context-dependent property, with a control task"),
    "init": (cmd_init, "scaffold a research project (README with hypothesis and validation plan, folders)"),
    "runs": (cmd_runs, "list and compare experiment records (runs/*/run.json)"),
    "report": (cmd_report, "an offline HTML report comparing experiment records"),
    "heads": (cmd_heads, "head detectors: previous-token, duplicate-token, induction, sink, copying"),
    "head": (cmd_head, "what does this head do? an HTML report for one head (LAYER.HEAD)"),
    "toy": (cmd_toy, "train the 2-layer attention-only toy (induction with a known answer) and save it"),
    "demo": (cmd_demo, "the demo investigation on the default model; writes an HTML report"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mechscope",
        description="Mechanistic interpretability on any Hugging Face causal LM.",
        epilog="examples:\n  " + "\n  ".join(v.split("\n")[0] for v in EXAMPLES.values()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (fn, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_, epilog="examples:\n  " + EXAMPLES[name],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--json", action="store_true", help="print machine-readable JSON instead of text")
        p.set_defaults(func=fn)
        if name not in ("env", "init", "runs", "report", "toy"):
            _add_model(p)
        if name == "info":
            p.add_argument("--hooks", action="store_true", help="list the hook points")
        if name == "estimate":
            p.add_argument("--batch", type=int, default=1)
            p.add_argument("--seq-len", type=int, default=128)
            p.add_argument("--cache", default=None, help="'all' or a comma list of hook names to cache")
            p.add_argument("--sae-width", type=int, default=None)
        if name == "lens":
            p.add_argument("prompt")
            p.add_argument("--target", action="append", help="answer token to track (repeatable), e.g. ' Paris'")
            p.add_argument("--png", default=None)
            p.add_argument("--html", default=None)
        if name == "demo":
            p.add_argument("--out", default="mechscope-demo", help="folder for report.html and its PNGs")
        if name == "dla":
            p.add_argument("prompt")
            p.add_argument("--answer", required=True, help="the answer token, e.g. ' Paris'")
            p.add_argument("--wrong", default=None, help="a contrasting token: attribute the logit difference")
        if name == "sae":
            p.add_argument("action", choices=["train", "eval", "features", "dashboard"])
            p.add_argument("path", nargs="?", default=None, help="an SAE folder (SAELens format) for eval/features/dashboard")
            p.add_argument("--hook", default="blocks.15.hook_resid_post")
            p.add_argument("--arch", default="topk", choices=["relu", "topk", "batchtopk", "jumprelu"])
            p.add_argument("--width", type=int, default=None, help="number of latents (default 8 x d_in)")
            p.add_argument("--k", type=int, default=32, help="TopK/BatchTopK k; with 'features': how many to list")
            p.add_argument("--l1", type=float, default=5.0)
            p.add_argument("--steps", type=int, default=1000)
            p.add_argument("--batch", type=int, default=1024)
            p.add_argument("--lr", type=float, default=3e-4)
            p.add_argument("--seqs", type=int, default=256, help="training sequences from the corpus")
            p.add_argument("--eval-seqs", type=int, default=16, help="held-out sequences for evaluation")
            p.add_argument("--seq-len", type=int, default=128)
            p.add_argument("--out", default="sae-run")
            p.add_argument("--resume", action="store_true")
            p.add_argument("--text", default=None)
        if name == "circuit":
            p.add_argument("--threshold", type=float, default=0.05, help="minimum |normalised patching effect|")
            p.add_argument("--ig-steps", type=int, default=0, help="EAP-IG interpolation steps (0: plain EAP)")
        if name in ("patch", "attrib", "ablate", "circuit"):
            p.add_argument("--task", choices=["ioi", "factual", "greater-than", "induction"], default=None)
            p.add_argument("--n", type=int, default=8, help="prompts from the task generator")
            p.add_argument("--seed", type=int, default=0)
            p.add_argument("--clean", default=None)
            p.add_argument("--corrupted", default=None)
            p.add_argument("--answer", default=None)
            p.add_argument("--wrong", default=None)
        if name in ("patch", "attrib"):
            p.add_argument("--site", default="resid_pre",
                           help="resid_pre|resid_mid|resid_post|attn_out|mlp_out|z|q|k|v|pattern")
            p.add_argument("--direction", default="denoise", choices=["denoise", "noise"])
            p.add_argument("--per-position", action="store_true", help="head sites: one patch per position")
        if name == "ablate":
            p.add_argument("components", nargs="+", help="L3H5 (head), L3N100 (neuron), L3.attn, L3.mlp, L3")
            p.add_argument("--method", default="zero", choices=["zero", "mean", "resample"])
        if name == "tuned-lens":
            p.add_argument("--steps", type=int, default=100)
            p.add_argument("--seq-len", type=int, default=64)
            p.add_argument("--batch", type=int, default=4)
            p.add_argument("--out", default="tuned_lens.safetensors")
        if name == "probe":
            p.add_argument("--layers", type=int, nargs="*", default=None)
            p.add_argument("--n", type=int, default=32, help="sequences from the held-out corpus")
            p.add_argument("--seq-len", type=int, default=64)
            p.add_argument("--shuffled", action="store_true", help="shuffled-label control instead of per-type labels")
        if name == "init":
            p.add_argument("name")
            p.add_argument("--root", default=".")
        if name in ("runs", "report"):
            p.add_argument("--root", default="runs")
        if name == "report":
            p.add_argument("--out", default="runs.html")
        if name == "toy":
            p.add_argument("--out", default="attn-only-toy", help="folder for the HF model and tokenizer")
            p.add_argument("--layers", type=int, default=2)
            p.add_argument("--heads", type=int, default=2)
            p.add_argument("--steps", type=int, default=800)
            p.add_argument("--seed", type=int, default=0)
        if name == "heads":
            p.add_argument("--html", default=None, help="write the heatmaps as an offline HTML page")
        if name == "head":
            p.add_argument("head", help="LAYER.HEAD, e.g. 18.6 (or L18H6)")
            p.add_argument("--out", default=None, help="HTML report path (default head_L{l}H{h}.html)")
        if name in ("dla", "patch", "attrib", "ablate", "tuned-lens", "probe", "circuit"):
            p.add_argument("--png", default=None, help="write a PNG picture here")
            p.add_argument("--html", default=None, help="write an offline HTML page here")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    if getattr(args, "cache", None) and args.cache != "all":
        args.cache = args.cache.split(",")
    try:
        data, text = args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, KeyError, FileNotFoundError, OSError, TypeError) as e:
        if os.environ.get("MECHSCOPE_DEBUG"):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"mechscope {args.command}: error: {msg}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(data, indent=2, default=str))
    else:
        print(text)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
