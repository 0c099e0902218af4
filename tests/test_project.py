"""Project scaffolding and experiment records."""

import json

import pytest

from mechscope.cli import main
from mechscope.project import Run, init_project, list_runs, runs_report, runs_table


def test_init_project(tmp_path):
    path = init_project("ioi", tmp_path)
    readme = (path / "README.md").read_text()
    for part in ("Research question", "Hypothesis", "falsify", "Validation plan"):
        assert part in readme
    assert (path / "AGENTS.md").exists() and (path / "runs").is_dir() and (path / "configs" / "example.json").exists()
    with pytest.raises(FileExistsError):
        init_project("ioi", tmp_path)
    with pytest.raises(ValueError):
        init_project("../x", tmp_path)


def test_run_records_success_and_failure(tmp_path):
    root = tmp_path / "runs"
    with Run("good", config={"n": 3}, seeds=[0, 1], root=root) as run:
        mid = json.loads(run.path.read_text())
        assert mid["status"] == "running"
        run.log(faithfulness=0.8, curve=[1, 2])
        run.artifact("results/x.png")
    rec = json.loads(run.path.read_text())
    assert rec["status"] == "finished" and rec["metrics"]["faithfulness"] == 0.8
    assert rec["seeds"] == [0, 1] and rec["versions"]["torch"] and rec["device"]["device"]
    assert rec["artifacts"] == ["results/x.png"] and rec["duration_s"] >= 0
    with pytest.raises(RuntimeError):
        with Run("bad", root=root) as run:
            run.log(step=1)
            raise RuntimeError("diverged")
    bad = json.loads(run.path.read_text())
    assert bad["status"] == "failed" and bad["error"]["message"] == "diverged" and bad["metrics"]["step"] == 1
    recs = list_runs(root)
    assert [r["name"] for r in recs] == ["good", "bad"]
    table = runs_table(recs)
    assert "faithfulness" in table and "failed" in table
    assert not list(root.rglob("*.tmp"))


def test_cli_init_and_runs(tmp_path, capsys):
    assert main(["init", "proj", "--root", str(tmp_path)]) == 0
    with Run("r1", root=tmp_path / "proj" / "runs") as run:
        run.log(acc=0.9)
    capsys.readouterr()
    assert main(["runs", "--root", str(tmp_path / "proj" / "runs"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["metrics"]["acc"] == 0.9
    assert main(["init", "proj", "--root", str(tmp_path)]) == 2
    capsys.readouterr()
    out = tmp_path / "r.html"
    assert main(["report", "--root", str(tmp_path / "proj" / "runs"), "--out", str(out)]) == 0
    html = out.read_text()
    assert "acc" in html and "finished" in html and "<script" not in html
    assert main(["report", "--root", str(tmp_path / "nothing")]) == 2


def test_checklist_is_filled_from_what_the_run_did(tmp_path):
    from mechscope.analysis.checklist import ITEMS

    with Run("bare", root=tmp_path) as run:
        run.log(x=1.0)
    rec = json.loads(run.path.read_text())
    assert rec["checklist"]["unmet"][:3] == ["question", "technique", "visualised"]  # nothing ticked by default
    with Run("full", config={"question": "which heads move names in IOI?"}, seeds=[0, 1, 2], root=tmp_path) as run:
        run.artifact("results/heads.png")
        run.check("technique", "activation patching of every head output")
        run.check("causal", "mean-ablating the top 3 heads drops the logit diff by 62% [48, 75]", "results/abl.html")
        run.check("edge_cases", "held-out half of the prompts; 3 seeds")
        run.check("alternatives", "3 random heads as a baseline: 4% [-2, 9]")
    ck = json.loads(run.path.read_text())["checklist"]
    assert ck["met"]["question"] and ck["met"]["visualised"] and ck["met"]["causal"]
    assert ck["evidence"]["causal"][0]["link"] == "results/abl.html"
    # reproducibility needs seeds and a clean commit: this checkout's state decides, and the record says which
    assert ck["met"]["reproducibility"] == (rec["git"]["commit"] is not None and not rec["git"]["dirty"])
    assert set(ck["met"]) == set(ITEMS)
    with pytest.raises(KeyError, match="unknown checklist item 'causality'"):
        run.check("causality", "x")
    html = runs_report(list_runs(tmp_path))
    assert "not met" in html and "ms-unmet" in html and "results/abl.html" in html
    rows = runs_table(list_runs(tmp_path)).splitlines()
    assert f" {6 + ck['met']['reproducibility']}/7 " in next(r for r in rows if "full" in r)
    assert " 0/7 " in next(r for r in rows if "bare" in r)  # no seeds: not reproducible either


def test_killed_runs_are_stale_and_bad_records_do_not_break_listing(tmp_path, capsys):
    import subprocess
    import sys

    code = ("import os, signal; from mechscope.project import Run\n"
            f"r = Run('killed', root={str(tmp_path)!r}); r.__enter__(); os.kill(os.getpid(), signal.SIGKILL)")
    subprocess.run([sys.executable, "-c", code], check=False)
    with Run("alive", root=tmp_path):
        statuses = {r["name"]: r["status"] for r in list_runs(tmp_path)}
    assert statuses == {"killed": "stale", "alive": "running"}
    (tmp_path / "zz-broken").mkdir()
    (tmp_path / "zz-broken" / "run.json").write_text('{"name": "broken", "sta')
    (tmp_path / "zz-list").mkdir()
    (tmp_path / "zz-list" / "run.json").write_text("[1, 2]")
    (tmp_path / "zz-metrics").mkdir()  # a record whose fields are not what its readers use
    (tmp_path / "zz-metrics" / "run.json").write_text('{"name": "m", "status": "done", "metrics": [1, 2]}')
    recs = list_runs(tmp_path)
    assert [r["status"] for r in recs][-3:] == ["unreadable", "unreadable", "unreadable"]
    assert "not valid JSON" in recs[-3]["error"]["message"]
    assert "'metrics' should be an object of metrics, got list" in recs[-1]["error"]["message"]
    assert main(["runs", "--root", str(tmp_path)]) == 0
    assert "stale" in capsys.readouterr().out
    assert main(["report", "--root", str(tmp_path), "--out", str(tmp_path / "r.html")]) == 0
    assert "unreadable" in (tmp_path / "r.html").read_text()


def _repo(path):
    import subprocess

    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
           "PATH": __import__("os").environ["PATH"], "HOME": str(path)}
    for cmd in (["git", "init", "-q"], ["git", "add", "."], ["git", "commit", "-q", "-m", "x"]):
        subprocess.run(cmd, cwd=path, check=True, env=env, capture_output=True)
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, env=env).stdout.strip()


@pytest.mark.parametrize("setting", ["core.fsmonitor", "filter", "core.hooksPath"])
def test_a_record_runs_no_command_a_cloned_repository_configures(tmp_path, setting, monkeypatch):
    """A project whose .git/config names a command (fsmonitor, a clean filter, hooks): recording a run inside it
    reads the commit from the files and never runs that command."""
    from mechscope.project import provenance

    (tmp_path / "a.txt").write_text("one\n")
    commit = _repo(tmp_path)
    marker = tmp_path.parent / f"pwned-{setting}"
    script = tmp_path / "evil.sh"
    script.write_text(f"#!/bin/sh\ntouch {marker}\ncat\n")
    script.chmod(0o755)
    with open(tmp_path / ".git" / "config", "a") as f:
        if setting == "core.fsmonitor":
            f.write(f"[core]\n\tfsmonitor = {script}\n")
        elif setting == "filter":
            f.write(f'[filter "evil"]\n\tclean = {script}\n')
            (tmp_path / ".gitattributes").write_text("*.txt filter=evil\n")
        else:
            (tmp_path / "hooks").mkdir()
            f.write(f"[core]\n\thooksPath = {tmp_path / 'hooks'}\n")
    (tmp_path / "a.txt").write_text("two\n")  # a changed file: what makes git status consult the filter
    monkeypatch.chdir(tmp_path)
    git = provenance()["git"]
    assert not marker.exists()
    assert git["commit"] == commit  # read from .git without git
    assert git["dirty"] is None and setting.split(".")[-1].lower() in git["dirty_unchecked"].lower()
    with Run("x", root=tmp_path / "runs") as run:
        pass
    assert not marker.exists() and json.loads(run.path.read_text())["git"]["commit"] == commit


def test_a_plain_repository_still_reports_dirty(tmp_path, monkeypatch):
    from mechscope.project import provenance

    (tmp_path / "a.txt").write_text("one\n")
    commit = _repo(tmp_path)
    assert provenance(tmp_path)["git"] == {"commit": commit, "dirty": False}
    (tmp_path / "a.txt").write_text("two\n")
    assert provenance(tmp_path)["git"] == {"commit": commit, "dirty": True}
    subprocess_free = tmp_path / "packed"
    subprocess_free.mkdir()
    (subprocess_free / "b.txt").write_text("b\n")
    c2 = _repo(subprocess_free)
    import subprocess
    subprocess.run(["git", "pack-refs", "--all"], cwd=subprocess_free, check=True)
    from mechscope.gitstate import git_dir, read_ref
    assert read_ref(git_dir(subprocess_free)[1]) == c2  # a commit only in packed-refs


def _resolve(dotted: str):
    """Import the longest module prefix of ``dotted`` and getattr the rest; raises when any part does not exist."""
    import importlib

    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for name in parts[i:]:
            obj = getattr(obj, name)
        return obj
    raise ModuleNotFoundError(dotted)


def test_every_code_name_in_generated_files_exists(tmp_path):
    import re

    path = init_project("names", tmp_path, git=False)
    names = set()
    for f in [p for p in path.rglob("*") if p.is_file() and p.suffix in (".md", ".json", "")]:
        names |= set(re.findall(r"\bmechscope(?:\.[A-Za-z_]\w*)+", f.read_text(errors="replace")))
    assert "mechscope.analysis.validation.across_seeds" in names and "mechscope.project.Run" in names
    for dotted in sorted(names):
        _resolve(dotted)  # raises for a name that does not exist
    with pytest.raises((ModuleNotFoundError, AttributeError)):
        _resolve("mechscope.validation.across_seeds")  # the name the README used to cite: the check can fail


def test_init_runs_git_and_records_are_reproducible(tmp_path, capsys):
    import shutil

    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    assert main(["init", "gitproj", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    path = tmp_path / "gitproj"
    assert (path / ".git").is_dir() and "git: initialised" in out
    if "first commit" not in out or "failed" in out:
        pytest.skip("git has no user identity here: " + out)
    with Run("after-init", seeds=[0], root=path / "runs") as run:
        pass
    rec = json.loads(run.path.read_text())
    assert rec["git"]["commit"] and rec["git"]["dirty"] is False  # runs/ is ignored: a record does not dirty the tree
    with Run("second", seeds=[0], root=path / "runs") as run2:
        pass
    assert json.loads(run2.path.read_text())["git"]["dirty"] is False
    assert main(["init", "plain", "--root", str(tmp_path), "--no-git"]) == 0
    assert "git: not initialised" in capsys.readouterr().out and not (tmp_path / "plain" / ".git").exists()


def test_run_finds_the_project_root_from_anywhere(tmp_path, monkeypatch):
    path = init_project("rooted", tmp_path, git=False)
    (path / "experiments" / "deep").mkdir()
    monkeypatch.chdir(path / "experiments" / "deep")
    with Run("inside") as run:
        pass
    assert run.dir.parent.resolve() == (path / "runs").resolve()  # not experiments/deep/runs
    monkeypatch.chdir(tmp_path)  # outside the project: the script's folder decides
    import sys

    monkeypatch.setattr(sys.modules["__main__"], "__file__", str(path / "experiments" / "x.py"), raising=False)
    with Run("from-outside") as run2:
        pass
    assert run2.dir.parent.resolve() == (path / "runs").resolve()
    assert not (tmp_path / "runs").exists()
    assert [r["name"] for r in list_runs()] == ["inside", "from-outside"]


def test_runs_table_prints_integers_whole(tmp_path):
    with Run("pid", root=tmp_path) as run:
        run.log(pid=14680, loss=0.123456)
    table = runs_table(list_runs(tmp_path))
    assert "14680" in table and "e+04" not in table and "0.1235" in table


def test_falsification_line_is_read_from_the_readme(tmp_path, monkeypatch):
    from mechscope.project import falsification

    path = init_project("fals", tmp_path, git=False)
    text, thr = falsification(path / "experiments")
    assert thr == 0.5 and "recovers less than half" in text  # the line init writes
    readme = path / "README.md"
    readme.write_text(readme.read_text().replace("recovers less than half of the metric", "recovers less than 40% of it"))
    assert falsification(path)[1] == 0.4
    readme.write_text("# no such section\n")
    assert falsification(path) is None
    assert falsification(tmp_path) is None  # outside any project


def test_circuit_cli_compares_with_the_falsification_line(tmp_path, monkeypatch, capsys, toy):
    import mechscope

    path = init_project("circ", tmp_path, git=False)
    monkeypatch.chdir(path)
    monkeypatch.setattr(mechscope, "load", lambda *a, **k: toy.model)
    assert main(["circuit", "--task", "induction", "--n", "12", "--n-random", "19", "--screen", "0"]) == 0
    out = capsys.readouterr().out
    assert "your falsification line (README.md)" in out and "threshold 0.50" in out
    assert "of 19 random circuits" in out and "rank p =" in out and "clean run" in out
    assert "chosen: " in out and "counterfactual" in out  # the default: chosen from the curve, CF ablation
    assert main(["circuit", "--task", "induction", "--n", "12", "--n-random", "0", "--screen", "0",
                 "--ablation", "mean", "--heads-only", "--target", "0.6"]) == 0
    out = capsys.readouterr().out
    assert "reaches 0.6" in out or "NO circuit" in out
    assert "mean activation" in out and "EVERY MLP KEPT" in out


def test_slow_test_budgets_fail_at_twice_and_order_the_longest_first():
    """tests/budget.toml: every slow test has a budget; one over twice its budget fails with a message naming the
    file; the budgeted tests start first, the longest first, one to each worker's starting share."""
    from types import SimpleNamespace

    from budgets import load, order, verdict

    budgets = load()
    assert "tests/test_workflows.py::test_demo_investigation_writes_report" in budgets
    assert verdict("t::a", 19.0, {"t::a": 10.0}) is None
    assert "more than twice its budget of 10 s in tests/budget.toml" in verdict("t::a", 21.0, {"t::a": 10.0})
    assert "has no budget in tests/budget.toml" in verdict("t::b", 1.0, {"t::a": 10.0})
    items = [SimpleNamespace(nodeid=f"t::{i}") for i in range(10)]
    got = [it.nodeid for it in order(items, {"t::8": 300.0, "t::9": 250.0, "t::3": 5.0}, 2)]
    assert sorted(got) == sorted(it.nodeid for it in items)  # nothing lost or repeated
    assert got[0] == "t::8" and got[5] == "t::9" and got[1] == "t::3"  # worker 0 starts at 0, worker 1 at 10 // 2
