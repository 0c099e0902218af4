"""The ground-truth zoo: planted circuits are what exact edge patching finds; edge AUROC; grading over seeds."""

import pytest
import torch

from mechscope.circuits.discovery import edge_attribution
from mechscope.circuits.zoo import edge_auroc, edge_patching, grade, planted
from mechscope.core.errors import InputError


@pytest.fixture(scope="module")
def two_hop():
    return planted("two-hop", seed=0)


@pytest.mark.parametrize("name", ["copier", "two-hop"])
def test_the_planted_circuit_is_the_one_exact_patching_finds(name, two_hop):
    pm = two_hop if name == "two-hop" else planted(name, seed=0)
    with torch.no_grad():
        clean, corrupted = pm.metric(pm.model(pm.clean)).mean(), pm.metric(pm.model(pm.corrupted)).mean()
    assert clean > 3 and corrupted < -3  # the model learned the task: the corruption flips the answer
    eap = edge_attribution(pm.model, pm.clean, pm.corrupted, pm.metric)
    exact = edge_patching(pm.model, pm.clean, pm.corrupted, pm.metric, list(eap))
    big = max(abs(v) for v in exact.values())
    assert all(abs(exact[e]) > 0.5 * big for e in pm.true_edges)  # every planted edge carries the effect ...
    assert all(abs(v) < 0.05 * big for e, v in exact.items() if e not in pm.true_edges)  # ... and nothing else
    assert edge_auroc(exact, pm.true_edges) == 1.0


def test_edge_patching_of_a_single_path_equals_patching_that_activation():
    pm = planted("copier", seed=0)
    model = pm.model
    got = edge_patching(model, pm.clean, pm.corrupted, pm.metric, [("embed", "L0H0.v")])[("embed", "L0H0.v")]
    _, cx = model.run_with_cache(pm.corrupted, names_filter="blocks.0.attn.hook_v")

    def put(act, hook):  # in one layer, L0H0's value reads only the embedding: the edge is that activation
        act = act.clone()
        act[:, :, 0] = cx["blocks.0.attn.hook_v"][:, :, 0]
        return act

    with torch.no_grad():
        ref = (pm.metric(model(pm.clean)) - pm.metric(model.run_with_hooks(pm.clean, fwd_hooks=[
            ("blocks.0.attn.hook_v", put)]))).mean()
    assert got == pytest.approx(float(ref), abs=1e-4) and abs(got) > 1


def test_edge_auroc():
    true = {("a", "x"), ("b", "x")}
    assert edge_auroc({("a", "x"): 3, ("b", "x"): -2, ("c", "x"): 1, ("d", "x"): 0}, true) == 1.0
    assert edge_auroc({("a", "x"): 0, ("b", "x"): 0.5, ("c", "x"): 1, ("d", "x"): 2}, true) == 0.0
    assert edge_auroc({("a", "x"): 1, ("b", "x"): 1, ("c", "x"): 1}, true) == 0.5  # ties count half
    assert edge_auroc({("a", "x"): 1, ("b", "x"): 3, ("c", "x"): 2, ("d", "x"): 9}, true, {("d", "x")}) == 0.5
    with pytest.raises(InputError, match="no entry for the true edges"):
        edge_auroc({("a", "x"): 1, ("c", "x"): 0}, true)
    with pytest.raises(InputError, match="unknown planted model"):
        planted("three-hop")


def test_grade_over_seeds():
    g = grade(["copier"], seeds=[0, 1], progress=False)
    assert g.per_seed["copier"]["patching"] == [1.0, 1.0] and len(g.per_seed["copier"]["eap-ig"]) == 2
    e = g.estimate("copier", "eap")
    assert e.low <= e.value <= e.high and "edge AUROC" in g.summary() and g.n_true["copier"] == 2
    assert g.to_dict()["mean"]["copier"]["patching"] == 1.0


def test_planted_induction_layer_1_forms_induction_heads_that_read_l0h0():
    pm = planted("induction", seed=0)
    eap = edge_attribution(pm.model, pm.clean, pm.corrupted, pm.metric)
    exact = edge_patching(pm.model, pm.clean, pm.corrupted, pm.metric, list(eap))
    scored = {e: abs(v) for e, v in exact.items() if e not in pm.unscored}
    true_min = min(scored[e] for e in pm.true_edges)
    false_max = max(v for e, v in scored.items() if e not in pm.true_edges)
    assert true_min > 3 * false_max, (true_min, false_max)
    assert ("L0H0", "L1H0.k") in pm.true_edges or ("L0H0", "L1H1.k") in pm.true_edges


def test_graphs_on_the_zoo_find_the_source_token(two_hop):
    from mechscope.graphs.zoo import graph_auroc

    assert graph_auroc(two_hop) == 1.0  # the answer's own embedding, two attention hops back, is the top source
    shifted = type(two_hop)(**{**two_hop.__dict__, "source_pos": two_hop.source_pos - 1})
    assert graph_auroc(shifted) < 0.5  # the check can fail: the position next to it is no source
    g = grade(["copier"], seeds=[0], progress=False, extra={"graph": graph_auroc})
    assert g.per_seed["copier"]["graph"] == [1.0]
