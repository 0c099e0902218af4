"""Project scaffolding and experiment records."""

import json

import pytest

from mechscope.cli import main
from mechscope.project import Run, init_project, list_runs, runs_table


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
