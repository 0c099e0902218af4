"""Commands for heads, experts and circuits: heads, head, expert, circuit, investigate, toy."""

from __future__ import annotations

import argparse
import re

from ...analysis.viz import page
from ...circuits.discovery import SCREEN_HEADS
from ...core.errors import InputError
from ...core.files import atomic_write
from ...core.result import Result
from ..registry import Outcome, arg, command
from .common import MODEL, PICTURES, TASK, _load, _pictures, _task


@command("heads", "head detectors: previous-token, duplicate-token, induction, sink, copying",
         ("mechscope heads", "mechscope heads --html heads.html --json"), MODEL,
         arg("--html", default=None, help="write the heatmaps as an offline HTML page"))
def heads_cmd(args: argparse.Namespace) -> Result:
    from ...circuits.heads import detect_heads

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




@command("expert", "what does this expert do? routing, logit effect and ablation effect (LAYER.EXPERT)",
         ("mechscope expert 3.5 --model ./olmoe-folder", "mechscope expert L3E5 --json"), MODEL,
         arg("expert", help="LAYER.EXPERT, e.g. 3.5 (or L3E5)"), arg("--n", type=int, default=16,
                                                                    help="held-out sequences"))
def expert_cmd(args: argparse.Namespace) -> Result:
    from ...circuits.experts import expert_report
    from ...core.components import Component

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
    from ...circuits.heads import head_report

    layer, head = parse_head(args.head)
    rep = head_report(_load(args), layer, head)
    path = rep.write(args.out or f"head_L{layer}H{head}.html")
    return Outcome(rep.summary() + f"\nreport: {path}", {**rep.to_dict(), "report": path})


@command("circuit", "find a circuit for a task: the smallest that reaches a faithfulness target, EAP edges, vs random",
         ("mechscope circuit --task ioi --n 16 --png circuit.png", "mechscope circuit --task factual --ablation mean",
          "mechscope circuit --task-file my.jsonl --target 0.9"),
         MODEL, TASK,
         arg("--target", type=float, default=0.8,
             help="choose the smallest circuit whose faithfulness on the search prompts reaches this"),
         arg("--ablation", default="cf", choices=["cf", "mean"],
             help="how components outside the circuit are ablated: cf takes the corrupted run's activation of the "
                  "same prompt (MIB's standard), mean the mean over the corrupted prompts"),
         arg("--heads-only", action="store_true",
             help="build and judge the circuit from heads alone, keeping every MLP (the summary says so)"),
         arg("--threshold", type=float, default=None,
             help="instead of --target: keep every component whose normalised patching effect reaches this"),
         arg("--ig-steps", type=int, default=0, help="EAP-IG interpolation steps (0: plain EAP)"),
         arg("--n-random", type=int, default=20, help="random circuits of the same size, for the rank p-value (19 or "
                                                      "more can give p < 0.05)"),
         arg("--screen", type=int, default=SCREEN_HEADS,
             help="patch exactly only the heads attribution patching ranks in the top N (0: every head)"),
         arg("--curve", default=None, metavar="PNG",
             help="also the faithfulness curve over circuit sizes (patching, EAP and EAP-IG rankings vs random, CPR/CMD), "
                  "drawn to PNG"),
         arg("--edges", action="store_true",
             help="an edge circuit instead: the smallest top-k EAP-IG edges reaching --target, every other edge "
                  "ablated; the curve over MIB's edge fractions with CPR/CMD (--curve draws it)"),
         arg("--patching-top", type=int, default=0,
             help="with --edges: exactly patch the K edges EAP-IG ranks highest and choose from that ranking"),
         arg("--signed", action="store_true", help="with --edges: rank edges by signed score (MIB's signed option)"),
         PICTURES)
def circuit_cmd(args: argparse.Namespace) -> Result:
    from ...circuits.discovery import find_circuit

    model = _load(args)
    _, _, _, ds = _task(args, model)
    if ds is None:
        raise InputError("circuit discovery needs a task dataset: pass --task or --task-file")
    if args.edges:
        from ...circuits.edge_circuits import edge_circuit

        res = edge_circuit(model, ds, target=args.target, ablation=args.ablation, ig_steps=args.ig_steps or 5,
                           n_random=args.n_random, seed=args.seed, patching_top=args.patching_top, signed=args.signed)
        if args.curve:
            res.plot(args.curve)
        return _pictures(args, res, "edge circuit")
    from ...core.work import WorkMeter
    from ...project import falsification

    with WorkMeter(model) as meter:
        res = find_circuit(model, ds, target=args.target, ablation=args.ablation, ablate_mlps=not args.heads_only,
                           node_threshold=args.threshold, ig_steps=args.ig_steps,
                           screen_heads=args.screen or None, curve=args.curve is not None, n_random=args.n_random)
    res.extra["work"] = meter.log
    line = falsification()
    if line is not None:
        text, thr = line
        f = res.faithfulness
        said = ("FALSIFIED: the whole CI is below it" if f.high < thr else "not falsified: the whole CI is above it"
                if f.low >= thr else "undecided: the CI straddles it; use more prompts (--n)")
        res.extra["falsification"] = (f"your falsification line (README.md): \"{text[:200]}\" -> threshold "
                                      f"{thr:.2f}; faithfulness {f.value:.2f} [{f.low:.2f}, {f.high:.2f}]: {said}")
    if args.curve:
        res.extra["curve"].plot(args.curve)
    return _pictures(args, res, "circuit")


@command("investigate", "find the circuit for a behaviour end to end: check the pairs, patch, choose and validate a "
                        "circuit, read its components; one offline report (resumable)",
         ("mechscope investigate --task ioi --n 100", "mechscope investigate --task-file my.jsonl --out my-report",
          "mechscope investigate --task ioi --sae ./sae-folder --transcoders"),
         MODEL, TASK,
         arg("--out", default="mechscope-investigation", help="folder for report.html, its pictures and its stages"),
         arg("--target", type=float, default=0.8,
             help="choose the smallest circuit whose faithfulness on the search prompts reaches this"),
         arg("--ablation", default="cf", choices=["cf", "mean"], help="how components outside the circuit are ablated"),
         arg("--screen", type=int, default=SCREEN_HEADS,
             help="patch exactly only the heads attribution patching ranks in the top N (0: every head)"),
         arg("--n-random", type=int, default=20, help="random circuits of the same size"),
         arg("--split-seeds", type=int, default=3, help="random search/held-out splits the circuit is chosen on"),
         arg("--heads", type=int, default=3, help="head reports for the circuit's top N heads"),
         arg("--sae", default=None, help="an SAE folder (or hf://...): list its features at the key position"),
         arg("--transcoders", nargs="?", const=True, default=None,
             help="add an attribution graph of the first prompt: alone, from the cached transcoders; with a value, "
                  "from that replacement (a folder, hf://<org>/<repo>, or a published name such as "
                  "clt-gemma-2-2b-426k)"),
         arg("--fresh", action="store_true", help="recompute every stage instead of reusing OUT/stages"))
def investigate_cmd(args: argparse.Namespace) -> Result:
    from pathlib import Path

    from ...project import Run
    from ...workflows import investigate

    model = _load(args)
    _, _, _, ds = _task(args, model)
    if ds is None:
        ds = _one_pair_task(args, model)
    sae = None
    if args.sae:
        from ...sae import load_sae

        sae = load_sae(args.sae, model)
    out = Path(args.out)
    with Run("investigate", config={"model": model.cfg.model_name, "task": ds.name, "n": len(ds), "out": str(out),
                                    "target": args.target, "ablation": args.ablation}, seeds=[args.seed],
             root=out.resolve() / "runs") as run:
        rep = investigate(model, ds, out, target=args.target, ablation=args.ablation,
                          screen_heads=args.screen or None, n_random=args.n_random, split_seeds=args.split_seeds,
                          n_heads=args.heads, sae=sae, transcoders=args.transcoders or False, resume=not args.fresh,
                          echo=not args.json)
        run.log(**rep.metrics)
        run.artifact(out / "report.html")
    return Outcome(f"report: {out / 'report.html'}\nrun record: {run.path}",
                   {"report": out / "report.html", "sections": [s.title for s in rep.sections], "run": run.path,
                    "metrics": rep.metrics, "findings": [f.text for f in rep.findings]})


def _one_pair_task(args: argparse.Namespace, model):
    """``--clean/--corrupted/--answer/--wrong`` as a one-pair task (too few for CIs: the report says so)."""
    from ... import datasets as D
    from .common import check_answer_spaces

    if not (args.clean and args.corrupted and args.answer):
        raise InputError("give --task, --task-file, or --clean, --corrupted and --answer (and usually --wrong)")
    check_answer_spaces(args, model)
    return D.TaskDataset.from_texts(model, [args.clean], [args.corrupted], [args.answer],
                                    None if args.wrong is None else [args.wrong], name="one pair",
                                    answer_tokens=args.answer_tokens)


@command("toy", "train the 2-layer attention-only toy (induction with a known answer) and save it",
         ("mechscope toy --out attn-only-2l", "mechscope heads --model attn-only-2l"),
         arg("--out", default="attn-only-toy", help="folder for the HF model and tokenizer"),
         arg("--layers", type=int, default=2, help="attention layers"),
         arg("--heads", type=int, default=2, help="heads per layer"),
         arg("--steps", type=int, default=800, help="training steps"),
         arg("--seed", type=int, default=0, help="seed of the data and the initialisation"))
def toy_cmd(args: argparse.Namespace) -> Result:
    from ...circuits.heads import detect_heads
    from ...circuits.toy import train_attn_only

    run = train_attn_only(n_layers=args.layers, n_heads=args.heads, steps=args.steps, seed=args.seed, progress=True)
    path = run.save(args.out)
    det = detect_heads(run.model)
    top = {k: det[k].top(3) for k in ("previous-token", "induction")}
    text = run.summary() + "\n" + "\n".join(det[k].summary(3) for k in top) + \
        f"\nsaved {path} (load it with --model {path})"
    return Outcome(text, {**run.to_dict(), "path": path, "top": top})

