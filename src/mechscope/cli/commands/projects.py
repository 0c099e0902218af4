"""Commands for projects, records and reports: init, runs, report, demo."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ...core.errors import NotFoundError
from ...core.files import atomic_write
from ...core.result import Result
from ..registry import Outcome, arg, command
from .common import MODEL, _load


def _given_root(root: str | None) -> Path | None:
    """A --root typed on the command line is relative to the shell's folder; without one, the project's runs/."""
    return Path(root).resolve() if root else None


@command("init", "scaffold a research project (README with hypothesis and validation plan, folders)",
         ("mechscope init ioi-circuit",), arg("name", help="the project folder to create"),
         arg("--root", default=".", help="where to create it"),
         arg("--no-git", action="store_true", help="do not run git init in the new project"))
def init_cmd(args: argparse.Namespace) -> Result:
    from ...project import git_status_line, init_project

    path = init_project(args.name, args.root, git=not args.no_git)
    git = git_status_line(path)
    return Outcome(f"created {path}: edit README.md (question, hypothesis, falsification, validation plan)\n{git}",
                   {"path": path, "git": git})


@command("runs", "list and compare experiment records (runs/*/run.json)",
         ("mechscope runs", "mechscope runs --root my-project/runs --json"),
         arg("--root", default=None, help="the runs folder (default: runs/ of the project around the "
                                                              "working folder)"))
def runs_cmd(args: argparse.Namespace) -> Result:
    from ...project import list_runs, runs_root, runs_table

    root = _given_root(args.root)
    recs = list_runs(root)
    return Outcome(runs_table(recs) if recs else f"no runs under {runs_root(root)}/", recs)


@command("report", "an offline HTML report comparing experiment records",
         ("mechscope report --root runs --out runs.html", "mechscope report --root mechscope-demo/runs"),
         arg("--root", default=None, help="the runs folder (default: runs/ of the project around the working folder)"),
         arg("--out", default="runs.html", help="the HTML file to write"))
def report_cmd(args: argparse.Namespace) -> Result:
    from ...project import list_runs, runs_report, runs_root

    root = _given_root(args.root)
    recs = list_runs(root)
    if not recs:
        raise NotFoundError(f"no run records under {runs_root(root)}/ (runs/<time>-<name>/run.json)")
    path = atomic_write(args.out, runs_report(recs))
    return Outcome(f"report of {len(recs)} runs: {path}", {"report": path, "runs": len(recs)})


@command("demo", "the demo investigation on the default model; writes an HTML report",
         ("mechscope demo", "mechscope demo --out demo-report"), MODEL,
         arg("--out", default="mechscope-demo", help="folder for report.html and its PNGs"))
def demo_cmd(args: argparse.Namespace) -> Result:
    import sys

    from ...project import Run
    from ...workflows import demo_investigation

    t0 = time.time()
    model = _load(args)
    print(f"loaded {model!r} in {time.time() - t0:.1f} s", file=sys.stderr, flush=True)
    with Run("demo", config={"model": model.cfg.model_name, "out": args.out}, seeds=[0],
             root=Path(args.out).resolve() / "runs") as run:  # beside report.html, wherever the project is
        rep = demo_investigation(model, args.out, echo=not args.json)
        run.log(**rep.metrics)
        run.artifact(Path(args.out) / "report.html")
        for item, evs in rep.checklist.evidence.items():  # reproducibility comes from the record itself
            for e in evs if item != "reproducibility" else []:
                run.check(item, e.text, f"{Path(args.out) / 'report.html'}{e.link or ''}")
    return Outcome(f"run record: {run.path}", {"report": Path(args.out) / "report.html",
                                                "sections": [s.title for s in rep.sections], "run": run.path,
                                                "metrics": rep.metrics})
