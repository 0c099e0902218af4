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
    from .compute import env, estimate_memory
    from .lens import logit_lens
    from .viz import atomic_write, esc, page

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    e = env()
    print(e.summary(), "\n", flush=True)
    model = _load(args)
    print(f"loaded {model!r} in {time.time() - t0:.1f} s\n", flush=True)
    est = estimate_memory(model, batch=8, seq_len=128, cache_names="all")
    print("memory estimate (batch 8 x 128 tokens, full cache):")
    print(est.summary(), "\n")
    prompt = "The capital of France is"
    res = logit_lens(model, prompt, targets=[" Paris"])
    print(res.summary())
    png = res.plot(out / "logit_lens.png")
    body = (f"<h3>environment</h3><pre>{esc(e.summary())}</pre>"
            f"<h3>model</h3><pre>{esc(repr(model))}</pre>"
            f"<h3>memory estimate</h3><pre>{esc(est.summary())}</pre>"
            f"<h3>logit lens: {esc(prompt)!s}</h3><img src='{png.name}' style='max-width:100%'>"
            f"{res.to_html()}")
    report = atomic_write(out / "report.html", page("mechscope demo", body))
    summary = f"\nreport: {report.resolve()}  ({time.time() - t0:.1f} s)"
    return {"report": str(report), "logit_lens": res.to_dict()}, summary


COMMANDS = {
    "env": (cmd_env, "the device, its memory and dtype support"),
    "info": (cmd_info, "the model card: architecture, sizes, hook names"),
    "estimate": (cmd_estimate, "memory needed for a run, before loading, with advice"),
    "lens": (cmd_lens, "logit lens over a prompt"),
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
        if name != "env":
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
