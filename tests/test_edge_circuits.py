"""Edge circuits: the edge ablator is exact at both ends and per edge, and recovers planted circuits."""

import json
import random

import pytest
import torch

from mechscope import HookedModel
from mechscope.circuits.edge_circuits import (
    EDGE_FRACTIONS,
    EdgeAblator,
    all_edges,
    edge_circuit,
    edge_patching_scores,
    edge_ranking,
)
from mechscope.circuits.edges import edge_attribution
from mechscope.circuits.zoo import edge_patching, planted
from mechscope.cli import main
from mechscope.core.errors import InputError
from mechscope.datasets import TaskDataset
from tiny import V, tiny_hf

G = torch.Generator().manual_seed(11)
N = 10
CLEAN = torch.randint(0, V, (N, 6), generator=G)
CORR = CLEAN.clone()
CORR[:, 1] = (CORR[:, 1] + 5) % V


def _task(n=N):
    return TaskDataset("toy", CLEAN[:n], CORR[:n], torch.full((n,), 3), torch.full((n,), 5), ["x"] * n, ["y"] * n)


@pytest.fixture(scope="module")
def two_hop():
    return planted("two-hop", seed=0, n_prompts=40)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen3"])
def test_every_edge_kept_is_the_model_and_none_is_the_corrupted_run(arch):
    """Keeping every edge reads the model's own inputs, keeping none the corrupted run's, in any family with
    sequential residuals (GQA in Llama, learned positions and LayerNorm in GPT-2, q/k norms in Qwen3)."""
    model = HookedModel(tiny_hf(arch))
    ds = _task()
    abl = EdgeAblator(model, ds, ds.metric, "cf")
    with torch.no_grad():
        clean, corr = ds.metric(model(CLEAN)).float(), ds.metric(model(CORR)).float()
    assert torch.allclose(abl.full, clean, atol=1e-5)
    assert torch.allclose(abl.empty, corr, atol=1e-4)
    assert abl.faithfulness(abl.edges).value == pytest.approx(1.0, abs=1e-6)
    mean = EdgeAblator(model, ds, ds.metric, "mean")
    assert torch.allclose(mean.full, clean, atol=1e-5) and not torch.allclose(mean.empty, corr, atol=1e-3)


def test_all_edges_are_the_edges_eap_scores():
    model = HookedModel(tiny_hf("llama"))  # grouped-query attention: k/v readers are KV groups
    eap = edge_attribution(model, CLEAN, CORR, _task().metric)
    edges = all_edges(model)
    assert set(eap) == set(edges) and len(edges) == len(set(edges))
    assert any(r.endswith(".k") and "G" in r for _, r in edges)


def test_removing_one_edge_equals_exact_edge_patching():
    """Ablating one edge and keeping every other is the zoo's exact edge patching (only that reader sees the
    sender's corrupted output), on a model with MLPs, GQA and RMSNorm."""
    model = HookedModel(tiny_hf("llama"))
    ds = _task()
    abl = EdgeAblator(model, ds, ds.metric, "cf")
    sample = random.Random(0).sample(abl.edges, 12) + [("embed", "logits"), ("L0.mlp", "L1H2.q"), ("L1H0", "L1.mlp_in")]
    ours = edge_patching_scores(abl, sample)
    ref = edge_patching(model, CLEAN, CORR, ds.metric, sample)
    assert max(abs(ours[e] - ref[e]) for e in sample) < 1e-4
    assert max(abs(v) for v in ref.values()) > 1e-3  # the edges carry something


def test_an_edge_set_is_checked():
    model = HookedModel(tiny_hf("llama"))
    ds = _task()
    abl = EdgeAblator(model, ds, ds.metric, "cf")
    with pytest.raises(InputError, match="not edges of this model's graph"):
        abl.kept([("L1H0", "L0H0.q")])  # a later head cannot feed an earlier one
    with pytest.raises(InputError, match="sequential residual stream"):
        EdgeAblator(HookedModel(tiny_hf("gpt_neox")), ds, ds.metric)  # parallel attention and MLP


def test_edge_ranking_by_magnitude_or_sign():
    scores = {("a", "x"): 0.5, ("b", "x"): -2.0, ("c", "x"): 1.0}
    assert edge_ranking(scores) == [("b", "x"), ("c", "x"), ("a", "x")]
    assert edge_ranking(scores, signed=True) == [("c", "x"), ("a", "x"), ("b", "x")]


def test_edge_circuit_recovers_the_planted_two_hop_edges(two_hop):
    res = edge_circuit(two_hop.model, two_hop.task(), patching_top=16, n_random=20)
    assert {(u, r) for u, r, _ in res.edges} == two_hop.true_edges
    assert res.faithfulness.low > 0.95 and res.p_value < 0.05
    curve = res.curve
    assert set(curve.curves) == {"eap", "eap-ig", "patching"} and len(curve.random) == len(curve.sizes)
    assert curve.fraction[-1] == 1.0 and curve.sizes[0] == max(1, round(EDGE_FRACTIONS[0] * res.n_edges))
    assert all(curve.scores[k]["cpr"] > curve.scores["random"]["cpr"] + 0.3 for k in curve.curves)
    text = res.summary()
    assert "edge circuit of 3 edges" in text and "CPR" in text and "counterfactual" in text
    assert res.nodes == ["L0H0", "L1H0"]
    json.dumps(res.to_dict(), default=str)


def test_circuit_cli_builds_an_edge_circuit(monkeypatch, capsys, toy, tmp_path):
    import mechscope

    monkeypatch.setattr(mechscope, "load", lambda *a, **k: toy.model)
    png = tmp_path / "edges.png"
    assert main(["circuit", "--task", "induction", "--n", "24", "--edges", "--n-random", "5", "--curve", str(png),
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["edges"] and 0 < out["n_edges"] and out["ranking"] == "eap-ig" and png.stat().st_size > 5000
