"""Research projects and experiment records.

:func:`init_project` scaffolds a project whose README states the question, the hypothesis with
what would falsify it, and the validation plan. :class:`Run` records one experiment in
``runs/<time>-<name>/run.json``: the config, seeds, git commit, package versions, device, metrics
and artifact paths. The record is written atomically at the start (status ``running``), on every
``save()``, and at the end (``finished``, or ``failed`` with the error when the block raised),
so a crash leaves a record marked failed, never a missing or half-written one. A process killed
outright (SIGKILL, out of memory) cannot write anything: the record holds its pid and host, and
:func:`list_runs` shows such a run as ``stale`` once that process is gone.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

from .analysis.checklist import ITEMS, Checklist
from .analysis.viz import esc, page
from .compute import env
from .core.errors import InputError, MechscopeError
from .core.files import atomic_write, read_json

README = """# {name}

## Research question
What does the model compute, and how? (one sentence)

## Hypothesis
The mechanism we expect, stated so that an experiment could show it wrong.

## What would falsify it
The result that would make us drop the hypothesis (e.g. patching the proposed components
recovers less than half of the metric on held-out prompts).

## Validation plan
- Causal evidence: activation patching and ablation, not only attention patterns or DLA.
- Held-out prompts: search on one split (`dataset.split()`), confirm on the other.
- Several seeds: `mechscope.analysis.validation.across_seeds`.
- Effect sizes with bootstrap CIs; a baseline of random components of the same size.
- Alternative explanations to rule out: ...

## Layout
- `configs/`: experiment configs (JSON)
- `experiments/`: scripts, one per question
- `results/`: figures and tables that go into the write-up
- `notebooks/`: exploration
- `runs/`: records written by `mechscope.project.Run` (list them with `mechscope runs`)
"""

INSTRUCTIONS = """# Working in this project

For people and assistants alike:
- Every experiment runs inside `with mechscope.project.Run(name, config, seeds) as run:` and logs
  its metrics (`run.log(...)`) and figures (`run.artifact(path)`); nothing is reported without a
  run record.
- State the hypothesis and what would falsify it before running; update README.md when it changes.
- Claims need causal evidence on held-out prompts, several seeds, CIs, and a random baseline.
- Do not edit files under runs/ by hand.
"""


GITIGNORE = """# run records are written here by mechscope.project.Run; they are results, not code.
# Commit the ones a write-up cites with `git add -f runs/<run>`.
runs/*/
__pycache__/
.ipynb_checkpoints/
"""

#: the file that marks a project's root folder (found by walking up, as git finds .git)
MARKER = ".mechscope-project"


class ProjectExistsError(InputError, FileExistsError):
    """The project folder exists and is not empty."""


def init_project(name: str, root: str | Path = ".", git: bool = True) -> Path:
    """Create ``root/name`` with README.md, AGENTS.md, the configs/experiments/results/notebooks/runs folders and the
    project marker; with ``git``, ``git init`` and a first commit (what happened is in ``path/.mechscope-project``,
    and :func:`git_status_line` says it in words)."""
    if not name or "/" in name or name.startswith("."):
        raise InputError(f"project name must be a plain folder name, got {name!r}")
    path = Path(root) / name
    if path.exists() and any(path.iterdir()):
        raise ProjectExistsError(f"{path} exists and is not empty; choose another name")
    for sub in ("configs", "experiments", "results", "notebooks", "runs"):
        (path / sub).mkdir(parents=True, exist_ok=True)
        (path / sub / ".gitkeep").touch()
    atomic_write(path / "README.md", README.format(name=name))
    atomic_write(path / "AGENTS.md", INSTRUCTIONS)
    atomic_write(path / ".gitignore", GITIGNORE)
    atomic_write(path / "configs" / "example.json", json.dumps({"model": "smollm2-135m", "task": "ioi", "n": 32,
                                                                "seeds": [0, 1, 2]}, indent=2) + "\n")
    marker = {"name": name, "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    atomic_write(path / MARKER, json.dumps(marker, indent=2) + "\n")
    if git:
        _git_init(path)
    return path


def _git_init(path: Path) -> None:
    """``git init`` and a first commit of the scaffold, in a folder mechscope just created (so no repository config
    of anyone else's is in play). Failures are not errors: :func:`git_status_line` reports the state."""
    import shutil
    import subprocess

    if shutil.which("git") is None:
        return
    run = lambda *a: subprocess.run(["git", *a], cwd=path, capture_output=True, text=True, timeout=60)  # noqa: E731
    if run("init", "-q").returncode == 0:
        run("add", "-A")
        run("commit", "-q", "-m", "mechscope init: project scaffold")


def git_status_line(path: str | Path) -> str:
    """The project's git state in words: what a run record made there will say about reproducibility."""
    import shutil

    from .gitstate import git_dir, git_state

    path = Path(path)
    found = git_dir(path)
    if found is None or found[0].resolve() != path.resolve():
        why = "git is not installed" if shutil.which("git") is None else "not asked to" if found is None else \
            f"it lies inside the repository at {found[0]}"
        return (f"git: not initialised here ({why}); run `git init` and commit, or every run record will say "
                "'reproducibility: no git commit'")
    if git_state(path).commit is None:
        return ("git: initialised, but with no commit yet (set git user.name and user.email, then `git commit -am "
                "init`); until then run records say 'no git commit'")
    return "git: initialised, with a first commit of the scaffold"


def project_root(start: str | Path | None = None) -> Path | None:
    """The project holding ``start`` (default: the running script's folder, then the working folder): the nearest
    folder, walking up, with a ``.mechscope-project`` marker, as git finds ``.git``. None outside any project."""
    import sys

    starts = [Path(start)] if start is not None else []
    if start is None:
        main = getattr(sys.modules.get("__main__"), "__file__", None)
        if main:
            starts.append(Path(main).resolve().parent)
        starts.append(Path.cwd())
    for here in starts:
        here = here.resolve()
        for folder in (here, *here.parents):
            if (folder / MARKER).is_file():
                return folder
    return None


def falsification(start: str | Path | None = None) -> tuple[str, float] | None:
    """The falsification line of the project's README (the ``What would falsify it`` section :func:`init_project`
    writes) and the faithfulness threshold it names ("less than half" -> 0.5, "less than 40%" -> 0.4,
    "below 0.6" -> 0.6), or None when there is no project, no such section, or no threshold in it."""
    import re

    root = project_root(start)
    if root is None or not (root / "README.md").is_file():
        return None
    text = (root / "README.md").read_text(errors="replace")
    m = re.search(r"^##\s*What would falsify it\s*$(.*?)(?=^##\s|\Z)", text, re.M | re.S)
    if not m:
        return None
    section = " ".join(m.group(1).split())
    words = {"half": 0.5, "a half": 0.5, "a third": 1 / 3, "two thirds": 2 / 3, "a quarter": 0.25,
             "three quarters": 0.75}
    t = re.search(r"(?:less than|below|under|<)\s*(a half|half|a third|two thirds|a quarter|three quarters|"
                  r"\d+(?:\.\d+)?\s*%|0?\.\d+)", section, re.I)
    if not t:
        return None
    v = t.group(1).lower().strip()
    thr = words[v] if v in words else float(v.rstrip("%").strip()) / (100 if v.endswith("%") else 1)
    return section, thr


def runs_root(root: str | Path | None = None) -> Path:
    """Where run records go: ``root`` when absolute; else relative to the project root (:func:`project_root`), or to
    the working folder outside any project. The default ``root`` is ``runs``."""
    root = Path(root if root is not None else "runs")
    if root.is_absolute():
        return root
    proj = project_root()
    return (proj / root) if proj is not None else root


def provenance(cwd: str | Path | None = None) -> dict:
    """What reproduces a result: ``{"git": {"commit", "dirty"}, "versions": {package: version}}``.

    The commit is read without running git, and git is never run with a command the repository's own
    config names (:mod:`mechscope.gitstate`): a record made inside a cloned project runs none of its code."""
    from .gitstate import git_state

    return {"git": git_state(cwd or Path.cwd()).to_dict(), "versions": _versions()}


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("mechscope", "torch", "transformers", "numpy", "safetensors"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


class Run:
    """One experiment's record. Use as a context manager::

        with Run("ioi-patching", config={"n": 32}, seeds=[0]) as run:
            run.log(faithfulness=0.83)
            run.artifact("results/ioi.png")
    """

    def __init__(self, name: str, config: dict | None = None, seeds=None, root: str | Path | None = None,
                 notes: str = ""):
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-%f")
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in name)
        self.dir = runs_root(root) / f"{stamp}-{safe}"  # a relative root is the project's, wherever the script runs
        self.path = self.dir / "run.json"
        prov = provenance(next(p for p in (self.dir, *self.dir.parents) if p.exists()))
        e = env()
        self.record = {
            "name": name, "status": "created", "config": config or {}, "seeds": list(seeds or []),
            "notes": notes, "git": prov["git"], "versions": prov["versions"],
            "device": {"device": e.device, "name": e.device_name, "total_memory": e.total_memory},
            "started": datetime.now(timezone.utc).isoformat(), "finished": None, "duration_s": None,
            "metrics": {}, "artifacts": [], "error": None,
            "process": {"pid": os.getpid(), "host": socket.gethostname()},
        }
        self._t0 = None
        self.checklist = Checklist()

    def check(self, item: str, text: str, link: str | None = None) -> None:
        """Record evidence for a quality-checklist item (:data:`mechscope.analysis.checklist.ITEMS`); saved at once.

        ``run.check("causal", "mean-ablating the 3 top heads drops the logit difference by 62% [48, 75]",
        "results/ablation.html")``. Question, visualisation and reproducibility are also filled in from
        the record (notes or ``config["question"]``, image/HTML artifacts, seeds with a clean commit).
        """
        self.checklist.add(item, text, link)
        self.save()

    def save(self) -> Path:
        self.record["checklist"] = self.checklist.merged(record_checklist(self.record)).to_dict()
        return atomic_write(self.path, json.dumps(self.record, indent=2, default=str) + "\n")

    def log(self, **metrics) -> None:
        """Record metrics (numbers, lists, or small dicts); saved at once."""
        for k, v in metrics.items():
            if hasattr(v, "tolist"):
                v = v.tolist()
            self.record["metrics"][k] = v
        self.save()

    def artifact(self, path: str | Path) -> None:
        self.record["artifacts"].append(str(path))
        self.save()

    def __enter__(self) -> "Run":
        self.dir.mkdir(parents=True, exist_ok=False)
        self._t0 = time.time()
        self.record["status"] = "running"
        self.save()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.record["finished"] = datetime.now(timezone.utc).isoformat()
        self.record["duration_s"] = round(time.time() - self._t0, 3)
        if exc_type is None:
            self.record["status"] = "finished"
        else:
            self.record["status"] = "failed"
            self.record["error"] = {"type": exc_type.__name__, "message": str(exc),
                                    "traceback": traceback.format_exception(exc_type, exc, tb)[-3:]}
        self.save()
        return False


FIGURE_SUFFIXES = (".png", ".svg", ".pdf", ".html", ".jpg", ".jpeg")


def record_checklist(rec: dict) -> Checklist:
    """The checklist lines a run record proves by itself: the question, figures, and what reproduces it."""
    c = Checklist()
    question = (rec.get("config") or {}).get("question") or rec.get("notes")
    if question:
        c.add("question", str(question))
    else:
        c.missing("question", "no notes and no config['question'] in the record")
    figs = [a for a in rec.get("artifacts", []) if str(a).lower().endswith(FIGURE_SUFFIXES)]
    for a in figs:
        c.add("visualised", f"figure {Path(a).name}", str(a))
    if not figs:
        c.missing("visualised", "no image or HTML artifact recorded (run.artifact)")
    git, seeds = rec.get("git") or {}, rec.get("seeds") or []
    gaps = ([] if seeds else ["no seeds"]) + ([] if git.get("commit") else ["no git commit"]) + \
        (["uncommitted changes in the working tree"] if git.get("dirty") else [])
    if gaps:
        c.missing("reproducibility", "; ".join(gaps))
    else:
        v = rec.get("versions") or {}
        c.add("reproducibility", f"seeds {seeds}, commit {git['commit'][:10]} (clean), torch {v.get('torch')}, "
                                 f"transformers {v.get('transformers')}")
    return c


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (a zombie or a reused pid counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


#: the fields a run record's readers use, and what each must be (a record failing one is listed as unreadable)
_RECORD_FIELDS = {"metrics": (dict, "an object of metrics"), "status": (str, "a string"),
                  "seeds": (list, "a list"), "git": ((dict, type(None)), "an object"),
                  "checklist": ((dict, type(None)), "an object"), "process": ((dict, type(None)), "an object"),
                  "config": ((dict, type(None)), "an object"), "name": (str, "a string")}


def _read_record(p: Path) -> dict:
    """One run record; an unreadable one becomes a row saying why, so one bad file never hides the others."""
    try:
        rec = read_json(p, "a run record")
    except MechscopeError as e:
        return {"name": p.parent.name, "status": "unreadable", "error": {"message": str(e)}, "metrics": {}}
    bad = [f"{k!r} should be {what}, got {type(rec[k]).__name__}" for k, (types, what) in _RECORD_FIELDS.items()
           if k in rec and not isinstance(rec[k], types)]
    if bad:
        return {"name": p.parent.name, "status": "unreadable", "metrics": {},
                "error": {"message": f"{p}: {'; '.join(bad)}: not a run record mechscope wrote, or edited by hand"}}
    rec.setdefault("metrics", {})
    proc = rec.get("process") or {}
    if rec.get("status") == "running" and proc.get("host") == socket.gethostname() \
            and isinstance(proc.get("pid"), int) and not _alive(proc["pid"]):
        rec["status"] = "stale"  # its process is gone without finishing: killed (SIGKILL, out of memory, power)
    return rec


def list_runs(root: str | Path | None = None) -> list[dict]:
    """Every run record under ``root`` (default: the project's ``runs/``, see :func:`runs_root`), oldest first.

    An unreadable ``run.json`` is listed with status ``unreadable`` (and why) instead of breaking the
    listing; a ``running`` record whose process is no longer alive on this host is listed as ``stale``.
    """
    out = []
    for p in sorted(runs_root(root).glob("*/run.json")):
        rec = _read_record(p)
        rec["path"] = str(p.parent)
        out.append(rec)
    return out


def _checklist_of(rec: dict) -> Checklist:
    """A record's stored checklist, or (records from before checklists) the lines the record proves."""
    return Checklist.from_dict(rec["checklist"]) if isinstance(rec.get("checklist"), dict) else record_checklist(rec)


def number(x: int | float) -> str:
    """A metric as people read it: integers whole (a pid, a count), other numbers to 4 significant digits."""
    if isinstance(x, bool) or isinstance(x, int) or (isinstance(x, float) and x.is_integer() and abs(x) < 1e15):
        return str(int(x))
    return f"{x:.4g}"


def runs_table(records: list[dict]) -> str:
    """A plain-text comparison: one row per run, one column per metric that is a number."""
    keys = sorted({k for r in records for k, v in r.get("metrics", {}).items() if isinstance(v, (int, float))})
    head = f"{'run':40} {'status':10} {'checklist':9} " + " ".join(f"{k[:14]:>14}" for k in keys)
    lines = [head]
    for r in records:
        vals = " ".join(f"{number(r['metrics'][k]):>14}" if isinstance(r["metrics"].get(k), (int, float))
                        else f"{'-':>14}" for k in keys)
        c = _checklist_of(r)
        lines.append(f"{Path(r['path']).name[:40]:40} {str(r.get('status', '?'))[:10]:10} "
                     f"{f'{len(ITEMS) - len(c.unmet)}/{len(ITEMS)}':9} {vals}")
    return "\n".join(lines)


def runs_report(records: list[dict], title: str = "experiment records") -> str:
    """An offline HTML page comparing run records: status, quality checklist, seeds, commit and numeric metrics,
    then each run's checklist (unmet lines flagged) and its full record folded away."""
    keys = sorted({k for r in records for k, v in r.get("metrics", {}).items() if isinstance(v, (int, float))})
    head = "".join(f"<th>{esc(k)}</th>" for k in ["run", "status", "checklist", "seeds", "commit"] + keys)
    rows = []
    for r in records:
        commit = (r.get("git") or {}).get("commit") or ""
        unmet = _checklist_of(r).unmet
        cells = [Path(r["path"]).name, r.get("status", "?"), f"{len(ITEMS) - len(unmet)}/{len(ITEMS)}"
                 + (f" (not met: {', '.join(unmet)})" if unmet else ""), r.get("seeds", []), commit[:10]]
        cells += [number(r["metrics"][k]) if isinstance(r.get("metrics", {}).get(k), (int, float)) else ""
                  for k in keys]
        rows.append("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>")
    details = "".join(f"<h3 id='{esc(Path(r['path']).name)}'>{esc(Path(r['path']).name)}</h3>"
                      f"<h4>quality checklist</h4>{_checklist_of(r).to_html()}"
                      f"<details><summary>the full record</summary><pre>{esc(json.dumps(r, indent=2, default=str))}"
                      f"</pre></details>" for r in records)
    return page(title, f"<table class='ms-heat'><tr>{head}</tr>{''.join(rows)}</table>{details}")

