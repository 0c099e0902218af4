"""Edge attribution and circuit discovery."""

import pytest
import torch

from mechscope import HookedModel
from mechscope.circuits.discovery import edge_attribution, find_circuit
from mechscope.core.errors import InputError
from mechscope.datasets import TaskDataset
from tiny import V, tiny_hf

G = torch.Generator().manual_seed(11)
CLEAN = torch.randint(0, V, (8, 6), generator=G)
CORR = CLEAN.clone()
CORR[:, 2] = (CORR[:, 2] + 7) % V


def metric(logits):
    return logits[:, -1, 3] - logits[:, -1, 5]


def _assert_logit_edges_sum_to_the_linear_change(model, eap) -> None:
    """Every upstream output sums (with constant biases) to the final residual stream, so the edge scores
    into the logits add up to (resid_clean - resid_corrupted) . dM/d resid_final."""
    name = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    _, cc = model.run_with_cache(CLEAN, names_filter=name)
    g = {}

    def leaf(act, hook):
        g["x"] = act.detach().requires_grad_(True)
        return g["x"]

    with torch.enable_grad():
        metric(model.run_with_hooks(CORR, fwd_hooks=[(name, leaf)])).sum().backward()
    want = float(((cc[name] - g["x"].detach()) * g["x"].grad).sum() / CLEAN.shape[0])
    into_logits = sum(s for (u, r), s in eap.items() if r == "logits")
    assert abs(into_logits - want) < 1e-4 * max(1.0, abs(want))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
def test_edges_into_logits_sum_to_the_linear_change(arch):
    model = HookedModel(tiny_hf(arch, "eager" if arch == "gemma3" else "sdpa"))
    eap = edge_attribution(model, CLEAN, CORR, metric)
    n = model.cfg.n_layers
    _assert_logit_edges_sum_to_the_linear_change(model, eap)
    # readers only read from earlier components
    q0 = "L1H0.q"
    assert ("L2H0", q0) not in eap and ("L1H0", "L1.mlp_in") in eap and ("L1.mlp", q0) not in eap
    assert ("L0H1", q0) in eap
    ig = edge_attribution(model, CLEAN, CORR, metric, ig_steps=3)
    assert set(ig) == set(eap)
    # the per-head q/k/v readers split the attention block's gradient exactly
    block = edge_attribution(model, CLEAN, CORR, metric, per_head=False)
    c = model.cfg
    kv = "G" if c.n_kv_heads != c.n_heads else "H"
    for l in range(1, n):
        per_head = [f"L{l}H{h}.q" for h in range(c.n_heads)]
        per_head += [f"L{l}{kv}{g}.{s}" for g in range(c.n_kv_heads) for s in "kv"]
        for u in ("embed", "L0H0", f"L{l - 1}.mlp"):
            total = sum(eap[(u, r)] for r in per_head)
            want = block[(u, f"L{l}.attn_in")]
            assert abs(total - want) < 1e-4 * max(1.0, abs(want)), (arch, u, l, total, want)
        assert any(abs(eap[("embed", r)]) > 1e-6 for r in per_head)


def test_edge_attribution_finds_k_composition_in_the_toy_induction_model(toy):
    """In the attention-only toy, the previous-token head feeds the induction heads through their keys."""
    from mechscope.circuits.heads import detect_heads

    model = toy.model
    found = detect_heads(model)
    prev = found["previous-token"].top(1)[0][0]
    ind = found["induction"].top(1)[0][0]
    g = torch.Generator().manual_seed(4)
    n = 12
    a = torch.randint(2, 64, (16, n), generator=g)
    bos = torch.zeros(16, 1, dtype=torch.long)
    clean = torch.cat([bos, a, a], 1)  # [BOS] A A
    # corrupt the first copy: the queries (second copy) are unchanged, what they can match is not
    corrupted = torch.cat([bos, torch.randint(2, 64, (16, n), generator=g), a], 1)

    def metric(logits):  # log-prob of the clean repeat's next tokens, summed over the second copy
        lp = logits[:, n + 1:-1].log_softmax(-1)
        return lp.gather(-1, clean[:, n + 2:, None]).squeeze(-1).sum(-1)

    eap = edge_attribution(model, clean, corrupted, metric, ig_steps=5)
    h = int(ind.split("H")[1])
    into = {r: eap[(prev, f"L1H{h}.{r}")] for r in "qkv"}
    assert into["k"] > 0 and into["k"] > 10 * max(abs(into["q"]), abs(into["v"])), into
    from_l0 = {u: eap[(u, f"L1H{h}.k")] for u in [f"L0H{x}" for x in range(model.cfg.n_heads)]}
    assert max(from_l0, key=from_l0.get) == prev, from_l0


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


@pytest.mark.parametrize("arch", ["gpt_neox", "falcon", "phi", "gptj", "cohere"])
def test_eap_on_parallel_residual_blocks(arch):
    """Attention and MLP both read resid_pre: the MLP reader is the gradient through the MLP path alone."""
    model = HookedModel(tiny_hf(arch))
    assert model.cfg.parallel_residual
    eap = edge_attribution(model, CLEAN, CORR, metric)
    n, c = model.cfg.n_layers, model.cfg
    assert ("L1H0", "L1.mlp_in") not in eap and ("L0H0", "L1.mlp_in") in eap  # a layer's heads do not feed its MLP
    _assert_logit_edges_sum_to_the_linear_change(model, eap)
    _, cc = model.run_with_cache(CLEAN, names_filter="hook_embed")
    # the per-head readers still split the attention share exactly
    block = edge_attribution(model, CLEAN, CORR, metric, per_head=False)
    kv = "G" if c.n_kv_heads != c.n_heads else "H"
    for l in range(n):
        heads = [f"L{l}H{h}.q" for h in range(c.n_heads)] + [f"L{l}{kv}{k}.{s}" for k in range(c.n_kv_heads) for s in "kv"]
        total = sum(eap[("embed", r)] for r in heads)
        assert abs(total - block[("embed", f"L{l}.attn_in")]) < 1e-4 * max(1.0, abs(total)), (arch, l)
        assert eap[("embed", f"L{l}.mlp_in")] == pytest.approx(block[("embed", f"L{l}.mlp_in")], abs=1e-6)
    if arch == "cohere":
        return  # a gated MLP: the independent check below reads a plain x W_in + b
    # independent: feed the MLP (only) from a leaf copy of resid_pre and take that leaf's gradient
    l = 1
    W_in, b_in = model.W_in[l], model.b_in[l]
    norm = model.ln2(l) if "blocks.0.ln2.hook_normalized" in model.hook_names else model.ln1(l)
    box = {}

    def grab(act, hook):
        box["leaf"] = act.detach().clone().requires_grad_(True)

    def mlp_from_leaf(act, hook):
        pre = norm(box["leaf"]) @ W_in.to(act.dtype) + b_in.to(act.dtype)
        assert torch.allclose(pre, act, atol=1e-5)  # the same MLP input, but only the MLP reads the leaf
        return pre

    with torch.enable_grad():
        metric(model.run_with_hooks(CORR, fwd_hooks=[(f"blocks.{l}.hook_resid_pre", grab),
                                                     (f"blocks.{l}.mlp.hook_pre", mlp_from_leaf)])).sum().backward()
    delta = cc["hook_embed"] - model.run_with_cache(CORR, names_filter="hook_embed")[1]["hook_embed"]
    want = float((delta * box["leaf"].grad).sum() / CLEAN.shape[0])
    assert eap[("embed", f"L{l}.mlp_in")] == pytest.approx(want, abs=1e-5 * max(1.0, abs(want)))


def test_screened_head_patching_keeps_the_exact_values_of_its_candidates():
    from mechscope.circuits.discovery import _screened_heads
    from mechscope.techniques.patching import patch

    model = HookedModel(tiny_hf("llama"))
    ds = TaskDataset("toy", CLEAN, CORR, torch.full((8,), 3), torch.full((8,), 5), ["x"] * 8, ["y"] * 8)
    full = patch(model, CLEAN, CORR, ds.metric, site="z")
    from mechscope.techniques.inputs import prepare

    part = _screened_heads(model, prepare(model, CLEAN, CORR, ds.metric), screen=5)
    assert part.stats["screened"]["patched"] == 5 and part.stats["screened"]["of"] == 12
    fv, pv = full.normalized(), part.normalized()
    patched = pv != 0
    assert int(patched.sum()) <= 5 and torch.allclose(pv[patched], fv[patched], atol=1e-6)  # exact where run
    assert bool((pv[~patched] == 0).all())  # the rest: no effect, by construction
    # the candidates are the heads attribution patching ranks highest, and they hold the largest true effect here
    assert float(fv.abs().max()) == pytest.approx(float(pv.abs().max()), abs=1e-6)
    res = find_circuit(model, ds, node_threshold=0.0, max_nodes=3, n_random=1, screen_heads=8)
    ref = find_circuit(model, ds, node_threshold=0.0, max_nodes=3, n_random=1, screen_heads=None)
    assert res.nodes == ref.nodes  # the 8 best-estimated of 12 heads hold the 3 components the full search finds


def test_faithfulness_curve_scores_and_bounds(tmp_path):
    from mechscope.circuits.faithfulness import FaithfulnessCurve, _area, faithfulness_curve

    model = HookedModel(tiny_hf("llama"))
    ds = TaskDataset("toy", CLEAN, CORR, torch.full((8,), 3), torch.full((8,), 5), ["x"] * 8, ["y"] * 8)
    res = find_circuit(model, ds, node_threshold=0.0, max_nodes=3, n_random=2, curve=True)
    cv = res.extra["curve"]
    assert cv.sizes == [1, 2, 4, 8, 15] and cv.fraction[-1] == 1.0 and set(cv.curves) == {"patching", "eap", "eap-ig"}
    for c in cv.curves.values():  # every head and MLP kept: nothing is ablated, so faithfulness is exactly 1
        assert c[-1].value == pytest.approx(1.0, abs=1e-6)
    assert cv.random[-1] == pytest.approx(1.0, abs=1e-6)
    sc = cv.scores
    # CPR is the area under the curve from (0, 0): recomputed by hand for the patching ranking
    ys = [0.0] + [e.value for e in cv.curves["patching"]]
    xs = [0.0] + cv.fraction
    assert sc["patching"]["cpr"] == pytest.approx(sum((xs[i + 1] - xs[i]) * (ys[i + 1] + ys[i]) / 2
                                                      for i in range(len(xs) - 1)))
    assert sc["patching"]["cmd"] >= 0 and "CPR" in res.summary() and res.to_dict()["curve"]["scores"]
    assert cv.plot(tmp_path / "curve.png").stat().st_size > 1000
    # a curve faithful from the first component scores the area from (0, 0): 0.75 at sizes 1 and 2 of 2
    assert _area([0, 0.5, 1], [1, 1, 1]) == pytest.approx(1.0)
    perfect = FaithfulnessCurve([1, 2], [0.5, 1.0], {"p": [res.faithfulness.__class__(1, 1, 1)] * 2}, [0.0, 1.0], 2)
    assert perfect.scores["p"]["cpr"] == pytest.approx(0.75) and perfect.scores["random"]["cpr"] == pytest.approx(0.25)
    with pytest.raises(ValueError, match=r"sizes \[99\] out of range: 1\.\.15"):
        faithfulness_curve(model, ds, {"p": ["L0H0"]}, sizes=[99])


def test_one_prepared_pair_serves_every_technique_with_the_same_numbers_and_two_runs():
    """Patching, attribution patching and EAP given one PreparedPair read its clean and corrupted runs (one forward
    pass each, counted) and give exactly what they give from the raw prompts."""
    from mechscope.circuits.discovery import circuit_hooks
    from mechscope.techniques.attribution_patching import attribution_patch
    from mechscope.techniques.inputs import PreparedPair, prepare
    from mechscope.techniques.patching import patch

    model = HookedModel(tiny_hf("llama"))
    ds = TaskDataset("toy", CLEAN, CORR, torch.full((8,), 3), torch.full((8,), 5), ["x"] * 8, ["y"] * 8)
    pair = prepare(model, CLEAN, CORR, ds.metric, circuit_hooks(model))
    calls = []
    real = model.run_with_cache
    model.run_with_cache = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        got = {"resid": patch(model, pair, site="resid_pre").values, "z": patch(model, pair, site="z").values,
               "mlp": patch(model, pair, site=["blocks.0.hook_mlp_out", "blocks.1.hook_mlp_out"]).values,
               "attr": attribution_patch(model, pair, sites=("z",))["z"].values}
        eap = edge_attribution(model, pair)
    finally:
        model.run_with_cache = real
    assert len(calls) == 2  # one clean and one corrupted run, shared by all five
    want = {"resid": patch(model, CLEAN, CORR, ds.metric, site="resid_pre").values,
            "z": patch(model, CLEAN, CORR, ds.metric, site="z").values,
            "mlp": patch(model, CLEAN, CORR, ds.metric, site=["blocks.0.hook_mlp_out", "blocks.1.hook_mlp_out"]).values,
            "attr": attribution_patch(model, CLEAN, CORR, ds.metric, sites=("z",))["z"].values}
    for k in want:
        assert torch.allclose(got[k], want[k], atol=1e-6), k
    ref = edge_attribution(model, CLEAN, CORR, ds.metric)
    assert max(abs(eap[e] - ref[e]) for e in ref) < 1e-6
    with pytest.raises(InputError, match="pass it alone"):
        patch(model, pair, CORR, site="z")
    with pytest.raises(InputError, match="and a metric"):
        patch(model, CLEAN, CORR)
    assert isinstance(pair, PreparedPair) and len(pair) == 8 and pair.value("clean").shape == (8,)


def test_per_pair_effects_give_each_split_what_patching_it_alone_gives(tmp_path):
    """Issue 35 §1: the heads' and MLPs' patching kept per prompt pair and averaged over a split's pairs equals patching
    that split alone (1e-5), screened or not; a later split patches only the (component, pair) cells no earlier one
    did; a stage store replays the blocks; find_circuit and replicate_split choose the same circuits with it."""
    from mechscope.circuits.discovery import PairEffects, circuit_hooks, patch_components, replicate_split
    from mechscope.techniques.inputs import prepare_task
    from mechscope.workflows.stages import StageCache

    model = HookedModel(tiny_hf("llama"))
    g = torch.Generator().manual_seed(5)
    clean = torch.randint(0, V, (12, 6), generator=g)
    corr = clean.clone()
    corr[:, 2] = (corr[:, 2] + 7) % V
    ds = TaskDataset("toy", clean, corr, torch.full((12,), 3), torch.full((12,), 5), ["x"] * 12, ["y"] * 12)
    cells = 12 * (model.cfg.n_layers * model.cfg.n_heads + model.cfg.n_layers)  # every (component, pair)
    for screen in (None, 4):
        effects, cache = PairEffects(model, ds), StageCache(tmp_path / f"s{screen}", model, ds)
        for seed in range(3):
            idx = ds.split_pairs(0.5, seed)[0]
            pair = prepare_task(model, ds.subset(idx), circuit_hooks(model))
            before = dict(effects.cells)
            h, m = effects.components(idx, pair, screen, cache)
            rh, rm = patch_components(model, pair, screen)
            for a, b in ((h, rh), (m, rm)):
                assert torch.allclose(a.values, b.values, atol=1e-5, rtol=1e-5)
                assert torch.allclose(a.normalized(), b.normalized(), atol=1e-5)
                assert torch.allclose(a.per_prompt, b.per_prompt, atol=1e-5, rtol=1e-5)
                assert a.clean_value == pytest.approx(b.clean_value, abs=1e-5) and a.values.shape == b.values.shape
            assert h.stats.get("screened", {}).get("patched") == rh.stats.get("screened", {}).get("patched")
            if seed:  # a later split shares pairs with the earlier ones: those cells are read, not patched
                assert effects.cells["reused"] > before["reused"]
            again = dict(effects.cells)
            effects.components(idx, pair, screen, cache)  # the same split again: nothing to patch
            assert effects.cells["patched"] == again["patched"]
        assert effects.cells["patched"] <= cells and effects.cells["reused"] > 0
        replay = PairEffects(model, ds)
        n_hits, n_misses = len(cache.hits), len(cache.misses)
        for seed in range(3):
            idx = ds.split_pairs(0.5, seed)[0]
            replay.components(idx, prepare_task(model, ds.subset(idx)), screen, cache)
        assert cache.misses[n_misses:] == [] and "component_pairs" in cache.hits[n_hits:]  # every block from disk
        assert torch.equal(replay.heads.isnan(), effects.heads.isnan())
    effects = PairEffects(model, ds)
    res = find_circuit(model, ds, n_random=1, effects=effects)
    ref = find_circuit(model, ds, n_random=1)
    assert res.nodes == ref.nodes and res.faithfulness.value == pytest.approx(ref.faithfulness.value, abs=1e-5)
    for seed in (1, 2):
        got, want = replicate_split(model, ds, seed, effects=effects), replicate_split(model, ds, seed)
        assert got[0] == want[0] and got[1].value == pytest.approx(want[1].value, abs=1e-5)
    with pytest.raises(InputError, match="another dataset"):
        find_circuit(model, ds.subset(list(range(10))), effects=effects)
    with pytest.raises(InputError, match="no other metric"):
        find_circuit(model, ds, metric=metric, effects=effects)
