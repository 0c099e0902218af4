"""`investigate`: the stages on the planted zoo, resuming after a kill, reusing stages, stopping when the model
does not do the task, and the command line."""

import importlib
import json
import re

import pytest
import torch

from mechscope import HookedModel
from mechscope.analysis.validation import Estimate
from mechscope.circuits.zoo import planted
from mechscope.cli import main
from mechscope.datasets import TaskDataset
from mechscope.techniques.patching import PatchResult
from mechscope.workflows import StageCache, investigate
from tiny import V, tiny_hf


@pytest.fixture(scope="module")
def two_hop():
    return planted("two-hop", seed=0, n_prompts=40)


def test_investigate_recovers_the_planted_circuit(two_hop, tmp_path):
    rep = investigate(two_hop.model, two_hop.task(), tmp_path, n_random=20, echo=False)
    assert sorted(rep.metrics["circuit"]) == ["L0H0", "L1H0"]  # the planted path, and nothing else
    assert rep.metrics["faithfulness"] > 0.95 and rep.metrics["split_shared"] == ["L0H0", "L1H0"]
    titles = [s.title for s in rep.sections]
    assert titles[0] == "1. does the model do the task?" and titles[-1].endswith("what to do next")
    assert any("depend on the split" in t for t in titles) and any("top 2 heads" in t for t in titles)
    html = (tmp_path / "report.html").read_text()
    assert (tmp_path / "head_L0H0.html").exists() and "head_L0H0.html" in html
    assert html.index("findings") < html.index("quality checklist") < html.index("1. does the model")
    rec = json.loads((tmp_path / "record.json").read_text())
    assert rec["checklist"]["met"]["causal"] and rec["checklist"]["met"]["edge_cases"]
    assert set(rep.metrics["cpr_cmd"]) == {"patching", "eap", "eap-ig", "random"}
    does, beats, knockout = rep.findings[:3]
    assert does.holds and knockout.holds
    # four heads hold only 6 circuits of two: the rank test against random ones cannot pass, and says why
    assert not beats.holds and "only 6 different circuits of this size exist" in rep.sections[4].html
    # every stage's work against its floor, the three splits' stages apart
    work = {w["name"]: w for w in rep.metrics["work"]["stages"]}
    assert {"patching: heads and MLPs [split 0]", "patching: heads and MLPs [split 1]", "validation: held-out [split 2]",
            "checking the pairs", "reading the components"} <= set(work)
    assert all(w["token_layers"] >= w["floor"] for w in work.values()) and work["edge attribution [split 0]"]["floor"]
    assert any("work per stage" in t for t in titles)


def test_a_killed_run_resumes_and_a_new_target_reuses_the_patching(two_hop, tmp_path, monkeypatch):
    ds = two_hop.task()

    def killed(*a, **k):
        raise KeyboardInterrupt

    module = importlib.import_module("mechscope.workflows.investigate")  # (the package exports the function)
    monkeypatch.setattr(module, "replicate_split", killed)  # killed after the circuit, before the splits
    with pytest.raises(KeyboardInterrupt):
        investigate(two_hop.model, ds, tmp_path, n_random=5, echo=False)
    assert not (tmp_path / "report.html").exists()
    assert not list((tmp_path / "stages").glob("*.tmp")) and not list((tmp_path / "stages").glob(".*tmp"))  # none half-written
    monkeypatch.undo()
    rep = investigate(two_hop.model, ds, tmp_path, n_random=5, echo=False)
    assert {"check", "resid", "component_pairs", "choice", "eap", "validation", "curve"} <= set(
        rep.metrics["stages_reused"])  # (this model has too few heads to screen)
    # the other splits: the pairs split 0 did not patch, their choice and their faithfulness
    assert set(rep.metrics["stages_computed"]) == {"component_pairs", "choice", "split_faithfulness"}
    reused = {w["name"]: w for w in rep.metrics["work"]["stages"]}["patching: residual stream [split 0]"]
    assert reused["token_layers"] == 0  # read from the store: no work
    again = investigate(two_hop.model, ds, tmp_path, n_random=5, echo=False, target=0.95)
    assert "choice" in again.metrics["stages_computed"]
    assert not {"screen", "component_pairs"} & set(again.metrics["stages_computed"])
    assert {"resid", "component_pairs", "eap", "check"} <= set(again.metrics["stages_reused"])
    fresh = investigate(two_hop.model, ds, tmp_path / "fresh", n_random=5, echo=False, resume=False)
    assert not fresh.metrics["stages_reused"] and fresh.metrics["circuit"] == rep.metrics["circuit"]


def test_stages_round_trip_and_a_damaged_stage_is_recomputed(tmp_path):
    model = HookedModel(tiny_hf("llama"))
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, V, (4, 5), generator=g)
    ds = TaskDataset("t", clean, clean.flip(0), torch.ones(4, dtype=torch.long), torch.zeros(4, dtype=torch.long),
                     ["a"] * 4, ["b"] * 4)
    cache = StageCache(tmp_path, model, ds)
    pr = PatchResult("z", "denoise", torch.randn(2, 3), ("layer", "head"), {"layer": [0, 1], "head": [0, 1, 2]}, 1.0,
                     -1.0, stats={"n": 3})
    value = {"p": pr, "e": [Estimate(0.5, 0.1, 0.9, n=4)], "t": (["a"], 2), "edges": {("x", "y"): 1.5}}
    calls = []
    assert cache("s", {"k": 1}, lambda: calls.append(1) or value) is value
    back = cache("s", {"k": 1}, lambda: calls.append(1) or value)
    assert calls == [1] and cache.hits == ["s"]
    assert torch.equal(back["p"].values, pr.values) and back["p"].labels == pr.labels and back["p"].stats == {"n": 3}
    assert back["e"][0] == value["e"][0] and back["t"] == (["a"], 2) and back["edges"] == {("x", "y"): 1.5}
    cache("s", {"k": 2}, lambda: calls.append(2) or 7)  # other parameters: another stage
    assert calls == [1, 2]
    path = cache.path("s", {"k": 1})
    path.write_bytes(b"not a torch file")
    assert cache("s", {"k": 1}, lambda: calls.append(3) or value) is value and calls[-1] == 3
    with pytest.raises(TypeError, match="cannot hold"):
        cache("bad", {}, lambda: cache)  # only named result classes are stored (never pickled objects)
    other = StageCache(tmp_path, model, TaskDataset("t", clean, clean, ds.answers, ds.wrong, ["a"] * 4, ["b"] * 4))
    assert other.path("s", {"k": 1}) != path  # another task: another key


def test_a_model_that_does_not_do_the_task_stops_with_that_finding(tmp_path):
    model = HookedModel(tiny_hf("llama"))  # random weights: no behaviour to explain
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(0, V, (24, 6), generator=g)
    corr = clean.clone()
    corr[:, 2] = (corr[:, 2] + 3) % V
    ds = TaskDataset("random", clean, corr, torch.full((24,), 4), torch.full((24,), 9), ["x"] * 24, ["y"] * 24)
    rep = investigate(model, ds, tmp_path, echo=False)
    assert [s.title for s in rep.sections] == ["1. does the model do the task?", "2. what to do next"]
    assert "does NOT reliably do this task" in rep.sections[0].text and not rep.findings[0].holds
    assert "the model does not do the task" in rep.sections[1].text and "circuit" not in rep.metrics


def test_investigate_command_on_a_task_file(monkeypatch, capsys, toy, tmp_path):
    import mechscope
    from mechscope.circuits.zoo import _induction_prompts

    monkeypatch.setattr(mechscope, "load", lambda *a, **k: toy.model)
    clean, corr, answer, wrong = _induction_prompts(24, 10, toy.model.cfg.d_vocab, torch.Generator().manual_seed(3))
    task = tmp_path / "task.jsonl"
    tok = toy.model.to_str_tokens
    rows = [{"clean": " ".join(tok(c)[1:]), "corrupted": " ".join(tok(x)[1:]), "answer": tok(a[None])[0],
             "wrong": tok(w[None])[0]} for c, x, a, w in zip(clean, corr, answer, wrong)]
    task.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "rep"
    assert main(["investigate", "--task-file", str(task), "--out", str(out), "--n-random", "5", "--split-seeds", "2",
                 "--screen", "0", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["metrics"]["accuracy"] > 0.9 and res["metrics"]["circuit"]
    assert (out / "report.html").exists() and list((out / "runs").glob("*/run.json"))
    assert any(re.search("circuit, validated on held-out", t) for t in res["sections"])


def test_the_sae_section_finds_a_feature_that_reads_the_difference(two_hop, tmp_path):
    """An SAE whose feature 7 reads the clean - corrupted difference at the key position: the report puts it on top,
    above the median feature active there (the control)."""
    from mechscope.sae import SAE, SAEConfig

    model, ds = two_hop.model, two_hop.task()
    hook = "blocks.1.hook_resid_pre"
    sae = SAE(SAEConfig(d_in=model.cfg.d_model, d_sae=32, architecture="relu", hook_name=hook), seed=0)
    with torch.no_grad():
        acts = [model.run_with_cache(t, names_filter=[hook])[1][hook] for t in (ds.clean, ds.corrupted)]
        for f, pos in ((7, 14), (9, 13)):  # the position after the corrupted one (layer 0 moves it there), and it
            d = (acts[0] - acts[1])[:, pos].mean(0)
            sae.W_enc[:, f] = 10 * d / d.norm()
    sae.explanations = {7: "the moved token", 9: "the moved token"}  # as `sae explain` leaves them (load_sae reads them)
    rep = investigate(model, ds, tmp_path, n_random=3, split_seeds=1, sae=sae, echo=False)
    sec = next(s for s in rep.sections if "SAE features" in s.title)
    assert rep.metrics["sae_top_features"][0] in (7, 9) and "control: the median" in sec.text
    assert "explanation: 'the moved token'" in sec.text
    assert rep.findings[-1].holds  # the top feature's difference is over 3x the typical active feature's
