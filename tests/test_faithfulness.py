"""Circuit faithfulness: ablation modes, the normalisation, CPR/CMD arithmetic, choosing a circuit from the curve."""

import pytest
import torch

from mechscope import HookedModel
from mechscope.analysis.validation import Estimate
from mechscope.circuits.discovery import choose_from_curve, find_circuit
from mechscope.circuits.faithfulness import Ablator, FaithfulnessCurve, ablatable, cpr_cmd, curve_sizes
from mechscope.core.hookpoints import act_name
from mechscope.datasets import TaskDataset
from tiny import V, tiny_hf

G = torch.Generator().manual_seed(5)
N = 12
CLEAN = torch.randint(0, V, (N, 6), generator=G)
CORR = CLEAN.clone()
CORR[:, 2] = (CORR[:, 2] + 7) % V


@pytest.fixture(scope="module")
def setup():
    model = HookedModel(tiny_hf("llama"))
    ds = TaskDataset("toy", CLEAN, CORR, torch.full((N,), 3), torch.full((N,), 5), ["x"] * N, ["y"] * N)
    return model, ds


def test_counterfactual_ablation_equals_explicit_patching_of_that_path(setup):
    """CF-ablating one head and one MLP is exactly running the clean prompt with their outputs taken from the
    corrupted run of the same prompt, hooked by hand."""
    model, ds = setup
    abl = Ablator(model, ds, ds.metric, ablatable(model), "cf")
    got = abl.ablated(["L1H2", "L0.mlp"])
    z, mlp = act_name("z", 1), act_name("mlp_out", 0)
    _, cx = model.run_with_cache(CORR, names_filter=[z, mlp])

    def put_head(act, hook):
        act = act.clone()
        act[:, :, 2] = cx[z][:, :, 2]
        return act

    with torch.no_grad():
        want = ds.metric(model.run_with_hooks(CLEAN, fwd_hooks=[(z, put_head), (mlp, lambda a, hook: cx[mlp])]))
    assert torch.allclose(got, want.float(), atol=1e-5)
    assert not torch.allclose(got, abl.full, atol=1e-4)  # the ablation changed something


def test_stacked_ablations_equal_one_pass_each(setup, monkeypatch):
    """Many circuits as stacked copies of the prompts (random circuits, curve points, knockouts) give the metric of
    one forward pass each, within 1e-5, in both modes; a set asked for twice runs once; and the curve built from
    stacked passes is the curve built one circuit at a time."""
    import random

    import mechscope.circuits.faithfulness as F

    model, ds = setup
    monkeypatch.setattr(F, "STACK_TOKENS", 5 * N * CLEAN.shape[1])  # 5 copies a pass: several passes, one partial
    for mode in ("cf", "mean"):
        abl = Ablator(model, ds, ds.metric, ablatable(model), mode)
        rng = random.Random(0)
        circuits = [rng.sample(abl.pool, k) for k in (1, 2, 3, 5, 8, 1, 4) for _ in range(2)] + [[], abl.pool]
        one = [abl._forward([abl._outside(c)])[0] for c in circuits]  # one forward pass each
        before = abl.passes
        new = {frozenset(x for x in abl.pool if x not in set(c)) for c in circuits} - set(abl.memo)
        many = abl.kept_many(circuits + circuits[:3])
        assert 0 < len(new) < len(circuits) and abl.passes - before == -(-len(new) // 5)  # each new set once
        assert max(float((a - b).abs().max()) for a, b in zip(one, many)) <= 1e-5
        assert not all(torch.allclose(many[0], m) for m in many[1:])  # the copies really differ
        rankings = {"a": abl.pool[::-1], "b": abl.pool}
        seq = F.curve_over_sizes(abl.faithfulness, rankings, abl.pool, None, 2, 0, "test")
        fresh = Ablator(model, ds, ds.metric, ablatable(model), mode)
        stacked = F.curve_over_sizes(fresh.faithfulness, rankings, fresh.pool, None, 2, 0, "test",
                                     many=fresh.faithfulness_many)
        for name in rankings:
            assert [e.value for e in seq.curves[name]] == pytest.approx([e.value for e in stacked.curves[name]], abs=1e-5)
        assert seq.random == pytest.approx(stacked.random, abs=1e-5)


def test_normalised_faithfulness_is_0_for_the_empty_circuit_and_1_for_the_whole_model(setup):
    model, ds = setup
    for mode in ("cf", "mean"):
        abl = Ablator(model, ds, ds.metric, ablatable(model), mode)
        assert abl.faithfulness(abl.pool).value == pytest.approx(1.0, abs=1e-6)
        assert abl.faithfulness([]).value == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="ablation mode must be one of cf, mean"):
        Ablator(model, ds, ds.metric, ablatable(model), "zero")


def test_mean_mode_ablates_to_the_mean_over_the_corrupted_prompts(setup):
    model, ds = setup
    abl = Ablator(model, ds, ds.metric, ["L0H1"], "mean")
    z = act_name("z", 0)
    _, cx = model.run_with_cache(CORR, names_filter=z)
    mean = cx[z][:, :, 1].mean(0)

    def put(act, hook):
        act = act.clone()
        act[:, :, 1] = mean
        return act

    with torch.no_grad():
        want = ds.metric(model.run_with_hooks(CLEAN, fwd_hooks=[(z, put)])).float()
    assert torch.allclose(abl.ablated(["L0H1"]), want, atol=1e-5)


def test_cpr_and_cmd_against_hand_computed_curves():
    # x = 0, .25, .5, 1 and y = 0, .5, 1, 1: CPR = .25*.25 + .25*.75 + .5*1 = .75; CMD = .25*.75 + .25*.25 = .25
    assert cpr_cmd([0.25, 0.5, 1.0], [0.5, 1.0, 1.0]) == pytest.approx((0.75, 0.25))
    # overshooting 1 counts against CMD: y = 0, 1.5, 1 -> |1 - y| = 1, .5, 0: CMD = .5*.75 + .5*.25 = .5
    assert cpr_cmd([0.5, 1.0], [1.5, 1.0]) == pytest.approx((0.5 * 0.75 + 0.5 * 1.25, 0.5))
    # a curve at 1 from the first point: CPR 1 - x0/2, CMD x0/2
    cpr, cmd = cpr_cmd([0.1, 1.0], [1.0, 1.0])
    assert cpr == pytest.approx(0.95) and cmd == pytest.approx(0.05)
    e = Estimate(0.5, 0.4, 0.6)
    curve = FaithfulnessCurve([1, 2], [0.25, 0.5], {"r": [e, e]}, [0.0, 0.0], 4)
    assert curve.scores["r"]["cpr"] == pytest.approx(cpr_cmd([0.25, 0.5], [0.5, 0.5])[0])


def test_curve_sizes_are_fine_enough_to_choose_from():
    assert curve_sizes(12) == [1, 2, 4, 8, 12]
    fine = curve_sizes(300, fine=True)
    assert fine[:6] == [1, 2, 3, 4, 5, 6] and fine[-1] == 300 and all(b > a for a, b in zip(fine, fine[1:]))
    assert all(b <= max(a + 1, int(a * 1.25)) for a, b in zip(fine, fine[1:-1]))


class _Known:
    """A stand-in ablator whose faithfulness of the top-k is a known function of k."""

    def __init__(self, f):
        self.f, self.full, self.calls = f, torch.zeros(20), []

    def faithfulness(self, kept):
        self.calls.append(len(kept))
        v = self.f(len(kept))
        return Estimate(v, v, v)


def test_the_circuit_is_the_smallest_top_k_that_reaches_the_target():
    ranking = [f"L0H{i}" for i in range(40)]
    known = _Known(lambda k: min(1.0, k / 20))  # reaches 0.8 first at k = 16
    nodes, points, rule = choose_from_curve(known, ranking, 0.8)
    assert nodes == ranking[:16] and "16 components" in rule and dict(points)[16] == pytest.approx(0.8)
    assert dict(points)[15] < 0.8  # the size below was measured, so 16 is the smallest
    # not monotone: the first size that reaches the target wins, and bisection stays below it
    bumpy = _Known(lambda k: 0.9 if k in (3, 30) else 0.1)
    nodes, _, _ = choose_from_curve(bumpy, ranking, 0.8)
    assert len(nodes) == 3
    never = _Known(lambda k: 0.5 if k == 12 else 0.2)
    nodes, _, rule = choose_from_curve(never, ranking, 0.8)
    assert len(nodes) == 12 and rule.startswith("NO circuit")


def test_find_circuit_keeps_opposing_components_out_and_states_its_ablation(setup):
    model, ds = setup
    res = find_circuit(model, ds, target=0.8, n_random=3)
    assert res.opposing and all(v <= -0.05 for v in res.opposing.values())
    assert not set(res.opposing) & set(res.nodes)
    assert any(n.endswith(".mlp") for n in res.node_scores) or res.extra["kept"].startswith("every head and MLP")
    text = res.summary()
    assert "counterfactual" in text and "opposing the behaviour" in text and "chosen: " in text
    assert res.extra["held_out_curve"].curves["patching (signed)"][-1].value == pytest.approx(1.0, abs=1e-6)
    # the search curve the choice was made on is reported, and the chosen size reached the target there
    # (or the rule says that none did)
    pts = dict(res.extra["search_curve"])
    assert pts[len(res.nodes)] >= 0.8 or res.rule.startswith("NO circuit")
    heads_only = find_circuit(model, ds, target=0.8, n_random=0, ablate_mlps=False, ablation="mean")
    assert all(not n.endswith(".mlp") for n in heads_only.nodes)
    assert "EVERY MLP KEPT" in heads_only.summary() and "mean activation" in heads_only.summary()


def test_patching_every_pair_once_then_restricting_equals_patching_the_split(setup):
    """Per-prompt effects computed once on every pair, averaged over a split's pairs, are the split's own patching
    (heads and MLPs, raw and normalised, clean and corrupted values) within 1e-5: other splits reuse them."""
    from mechscope.circuits.discovery import circuit_hooks, patch_components
    from mechscope.techniques.inputs import prepare_task

    model, ds = setup
    every = patch_components(model, prepare_task(model, ds, circuit_hooks(model)))
    for seed in (0, 3):
        pairs = ds.split_pairs(0.5, seed)[0]
        search = ds.split(0.5, seed)[0]
        assert torch.equal(search.clean, ds.clean[pairs])  # split and split_pairs agree
        alone = patch_components(model, prepare_task(model, search, circuit_hooks(model)))
        for a, b in zip(every, alone):
            r = a.restrict(pairs)
            assert torch.allclose(r.values, b.values, atol=1e-5) and torch.allclose(r.normalized(), b.normalized(),
                                                                                    atol=1e-5)
            assert r.clean_value == pytest.approx(b.clean_value, abs=1e-5)
            assert r.corrupted_value == pytest.approx(b.corrupted_value, abs=1e-5)
        assert not torch.allclose(every[0].values, alone[0].values, atol=1e-4)  # the split really differs
