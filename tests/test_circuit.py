"""Edge attribution and circuit discovery."""

import pytest
import torch

from mechscope import HookedModel
from mechscope.circuit import edge_attribution, find_circuit
from mechscope.datasets import TaskDataset
from tiny import V, tiny_hf

G = torch.Generator().manual_seed(11)
CLEAN = torch.randint(0, V, (8, 6), generator=G)
CORR = CLEAN.clone()
CORR[:, 2] = (CORR[:, 2] + 7) % V


def metric(logits):
    return logits[:, -1, 3] - logits[:, -1, 5]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
def test_edges_into_logits_sum_to_the_linear_change(arch):
    model = HookedModel(tiny_hf(arch, "eager" if arch == "gemma3" else "sdpa"))
    eap = edge_attribution(model, CLEAN, CORR, metric)
    n = model.cfg.n_layers
    into_logits = sum(s for (u, r), s in eap.items() if r == "logits")
    # every upstream output sums (with constant biases) to the final residual stream, so the edge scores
    # into the logits add up to (resid_clean - resid_corrupted) . dM/d resid_final
    name = f"blocks.{n - 1}.hook_resid_post"
    _, cc = model.run_with_cache(CLEAN, names_filter=name)
    g = {}

    def leaf(act, hook):
        g["x"] = act.detach().requires_grad_(True)
        return g["x"]

    with torch.enable_grad():
        metric(model.run_with_hooks(CORR, fwd_hooks=[(name, leaf)])).sum().backward()
    want = float(((cc[name] - g["x"].detach()) * g["x"].grad).sum() / CLEAN.shape[0])
    assert abs(into_logits - want) < 1e-4 * max(1.0, abs(want))
    # readers only read from earlier components
    assert ("L2H0", "L1.attn_in") not in eap and ("L1H0", "L1.mlp_in") in eap and ("L1.mlp", "L1.attn_in") not in eap
    ig = edge_attribution(model, CLEAN, CORR, metric, ig_steps=3)
    assert set(ig) == set(eap)


def test_find_circuit_on_tiny_model(tmp_path):
    model = HookedModel(tiny_hf("llama"))
    ds = TaskDataset("toy", CLEAN, CORR, torch.full((8,), 3), torch.full((8,), 5), ["x"] * 8, ["y"] * 8)
    res = find_circuit(model, ds, node_threshold=0.0, max_nodes=5, n_random=2)
    assert len(res.nodes) == 5 and len(res.random_faithfulness) == 2
    assert all(u in res.nodes or u == "embed" for u, _, _ in res.edges)
    assert "faithfulness" in res.summary()
    assert res.plot(tmp_path / "c.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="no component"):
        find_circuit(model, ds, node_threshold=1e6)
    neox = HookedModel(tiny_hf("gpt_neox"))
    with pytest.raises(ValueError, match="parallel-residual"):
        edge_attribution(neox, CLEAN, CORR, metric)


@pytest.mark.slow
def test_ioi_circuit_on_real_model(smollm, tmp_path):
    from mechscope import datasets

    ds = datasets.ioi(smollm, 16, seed=0)
    res = find_circuit(smollm, ds, node_threshold=0.05, n_random=3)
    assert res.faithfulness.value > 0.4, res.summary()
    assert all(res.faithfulness.low > r.high for r in res.random_faithfulness), res.summary()
    assert res.knockout.high < 0
    assert any(n.startswith(("L20H0", "L23H3", "L17H4")) for n in res.nodes)
