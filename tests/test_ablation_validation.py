"""Ablation (zero, mean, resample) and the bootstrap statistics behind its CIs."""

import pytest
import torch

from mechscope import HookedModel
from mechscope.analysis.validation import bootstrap_ci, cohens_d, cohens_d_independent, paired_bootstrap
from mechscope.techniques.ablation import ablate, ablate_each, parse_components, replacement_values
from tiny import V, tiny_hf

TOKENS = torch.randint(0, V, (6, 7), generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def model():
    return HookedModel(tiny_hf("llama"))


def metric(logits):
    return logits[:, -1, 3] - logits[:, -1, 5]


def test_parse_components(model):
    comps = parse_components(model, ["L1H2", "L0N7", "L2.attn", "L1"])
    assert [str(c) for c in comps] == ["L1H2", "L0N7", "L2.attn", "L1.attn", "L1.mlp"]
    assert comps[0].hook == "blocks.1.attn.hook_z"
    for bad, msg in (("L9H0", "layer 9"), ("L1H9", "head 9"), ("head3", "cannot read")):
        with pytest.raises(ValueError, match=msg):
            parse_components(model, [bad])


def test_zero_head_ablation_equals_weight_edit(model):
    res = ablate(model, TOKENS, metric, "L1H2", method="zero")
    W = model.attn_module(1).o_proj.weight
    saved = W.detach().clone()
    with torch.no_grad():
        W[:, 2 * 8:3 * 8] = 0
        want = metric(model(TOKENS))
        W.copy_(saved)
    torch.testing.assert_close(res.ablated, want)
    torch.testing.assert_close(res.baseline, metric(model(TOKENS)).detach())
    assert res.effect.low <= res.effect.value <= res.effect.high


def test_mean_and_resample_values(model):
    comps = parse_components(model, ["L0N3", "L2.mlp"])
    ref = torch.randint(0, V, (10, 7), generator=torch.Generator().manual_seed(4))
    _, cache = model.run_with_cache(ref, names_filter=["blocks.0.mlp.hook_post", "blocks.2.hook_mlp_out"])
    vals = replacement_values(model, comps, TOKENS, "mean", reference=ref)
    torch.testing.assert_close(vals[comps[0]][0], cache["post", 0][:, :, 3].mean(0))
    torch.testing.assert_close(vals[comps[1]][3], cache["mlp_out", 2].mean(0))
    short = replacement_values(model, comps, TOKENS, "mean", reference=ref[:, :4])  # other length: global mean
    assert short[comps[1]].shape == (6, 7, 32)
    # resample from the batch itself never picks the prompt itself
    _, own = model.run_with_cache(TOKENS, names_filter="blocks.2.hook_mlp_out")
    for seed in range(5):
        r = replacement_values(model, comps[1:], TOKENS, "resample", seed=seed)[comps[1]]
        for i in range(6):
            assert not torch.equal(r[i], own["mlp_out", 2][i])
            assert any(torch.equal(r[i], own["mlp_out", 2][j]) for j in range(6))


def test_ablate_each_and_errors(model, tmp_path):
    res = ablate_each(model, TOKENS, metric, ["L0", "L2H1"], method="mean")
    assert [r.components for r in res] == [["L0.attn"], ["L0.mlp"], ["L2H1"]]
    assert "n=6 is too few" in res[0].summary()  # six prompts: the CI is refused, never "distinguishable"
    assert res[0].plot(tmp_path / "a.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="one value per prompt"):
        ablate(model, TOKENS, lambda lg: lg[:, -1, 3].mean(), "L0H0")
    with pytest.raises(ValueError, match="method"):
        ablate(model, TOKENS, metric, "L0H0", method="noise")


def test_bootstrap_and_effect_sizes():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, generator=g) + 1.0
    est = bootstrap_ci(x)
    assert est.low < float(x.mean()) < est.high and est.excludes(0.0)
    assert bootstrap_ci(x) == est  # seeded
    noise = bootstrap_ci(torch.randn(200, generator=g))
    assert not noise.excludes(0.0)
    wide = bootstrap_ci(x[:10])
    assert wide.high - wide.low > est.high - est.low
    assert bootstrap_ci([2.0]).low == 2.0
    a, b = torch.randn(50, generator=g) + 0.5, torch.randn(50, generator=g)
    assert paired_bootstrap(a, b).value == pytest.approx(float((a - b).mean()))
    assert cohens_d(a, b) == pytest.approx(float((a - b).mean() / (a - b).std()))
    assert cohens_d_independent(a + 10, a) > 5
    with pytest.raises(ValueError, match="zero spread"):
        cohens_d(torch.ones(5))


def test_across_seeds_and_shuffles():
    from mechscope.analysis.validation import across_seeds, shuffled_labels

    agg = across_seeds(lambda s: float(s) * 2, seeds=[1, 2, 3], name="x")
    assert float(agg.mean) == 4.0 and abs(float(agg.std) - 2.0) < 1e-9 and "3 seeds" in agg.summary()
    grid = across_seeds(lambda s: torch.full((2, 3), float(s)))
    assert grid.values.shape == (3, 2, 3)
    with pytest.raises(ValueError, match="shape"):
        across_seeds(lambda s: torch.zeros(s + 1))
    lab = torch.tensor([[0, 1, -1], [1, 1, 0]])
    sh = shuffled_labels(lab, 0)
    assert sh[0, 2] == -1 and sorted(sh[sh >= 0].tolist()) == sorted(lab[lab >= 0].tolist())


def test_random_components_and_baseline(model):
    from mechscope.techniques.ablation import compare_to_random, random_components

    r = random_components(model, 5, "head", exclude=["L0H0"], seed=1)
    assert len(set(r)) == 5 and "L0H0" not in r
    assert random_components(model, 5, "head", seed=1) != random_components(model, 5, "head", seed=2)
    assert len(random_components(model, 3, "neuron")) == 3
    with pytest.raises(ValueError, match="only"):
        random_components(model, 99, "head")
    cmp = compare_to_random(model, TOKENS, metric, ["L2H1", "L2H3"], method="zero", n_random=3)
    assert len(cmp.random_effects) == 3 and "random sets" in cmp.summary()
    with pytest.raises(ValueError, match="one kind"):
        compare_to_random(model, TOKENS, metric, ["L2H1", "L0N3"])


def test_a_run_resumed_from_the_plain_runs_stream_equals_the_full_pass(model):
    """An intervention whose hooks sit in block b or later, resumed from the unhooked run's stream entering b (or an
    earlier kept block), gives what the full pass gives (1e-5), for hooks at the block's input, inside it and at its
    output; compare_to_random's target and random sets equal each set ablated on its own by full passes."""
    from mechscope.techniques.ablation import compare_to_random, random_components
    from mechscope.techniques.inputs import batched_metric, hook_block, plain_run

    plain = plain_run(model, TOKENS, metric, [1, 2, 0, 99])  # block 0 and blocks past the last need no stream
    assert sorted(plain.streams) == [1, 2] and torch.allclose(plain.value, batched_metric(model, TOKENS, metric))
    assert (plain.resume_layer(0), plain.resume_layer(1), plain.resume_layer(3)) == (0, 1, 2)
    for name in ("blocks.1.hook_resid_pre", "blocks.1.hook_mlp_out", "blocks.2.attn.hook_z", "blocks.2.hook_mlp_out",
                 "blocks.2.hook_resid_post"):
        hooks = lambda s, e, _n=name: [(_n, lambda a, h: a * 0.5)]  # noqa: E731
        full = batched_metric(model, TOKENS, metric, hooks)
        resumed = batched_metric(model, TOKENS, metric, hooks, plain=plain, start=hook_block(name))
        assert torch.allclose(resumed, full, atol=1e-5) and not torch.allclose(full, plain.value, atol=1e-3), name
    # resumed past its hook, the hook never fires: why the start is the hook's own block
    late = batched_metric(model, TOKENS, metric, lambda s, e: [("blocks.1.hook_mlp_out", lambda a, h: a * 0.5)],
                          plain=plain, start=2)
    assert torch.allclose(late, plain.value, atol=1e-6)
    target = ["L2H1", "L1H3"]
    cmp = compare_to_random(model, TOKENS, metric, target, method="mean", n_random=3, seed=0)
    own = ablate(model, TOKENS, metric, target, "mean", seed=0)
    assert torch.allclose(cmp.target.ablated, own.ablated, atol=1e-5)
    assert torch.allclose(cmp.target.baseline, own.baseline, atol=1e-6)
    for i, e in enumerate(cmp.random_effects):
        st = random_components(model, 2, "head", target, 1 + i)
        assert e.value == pytest.approx(ablate(model, TOKENS, metric, st, "mean", seed=0).effect.value, abs=1e-5)


def test_ablate_resumes_at_its_first_ablated_block_and_its_reference_stops_after_its_last(model):
    """ablate's reference pass runs only up to the deepest ablated block, and the ablated pass starts at the first
    one; the values equal full passes (1e-5), for mean, resample and counterfactual values."""
    from mechscope.techniques.ablation import ablation_hooks
    from mechscope.techniques.inputs import batched_metric, stop_layer

    assert stop_layer(model, ["blocks.1.attn.hook_z", "blocks.0.hook_mlp_out"]) == 2
    assert stop_layer(model, ["blocks.2.hook_resid_post"]) == 3  # every block, no unembedding
    assert stop_layer(model, ["ln_final.hook_normalized"]) is None
    ref = torch.randint(0, V, (6, 7), generator=torch.Generator().manual_seed(9))
    comps = parse_components(model, ["L1H2", "L1.mlp"])
    for method in ("mean", "resample", "counterfactual"):
        ran = []
        hs = [blk.register_forward_hook(lambda m, a, k, o, _i=i: ran.append((_i, int(k.get("hidden_states", a[0] if a
                                                                                           else None).shape[0]))),
                                        with_kwargs=True) for i, blk in enumerate(model.parts.layers)]
        res = ablate(model, TOKENS, metric, ["L1H2", "L1.mlp"], method, reference=ref, seed=0)
        for h in hs:
            h.remove()
        full_batch = [i for i, b in ran if b == 6]  # (one prompt's pass checks which logits the metric reads)
        assert full_batch.count(2) == 2  # the plain run and the ablated run: the reference stopped at block 1
        assert full_batch.count(0) == 2  # the reference and the plain run: the ablated one started at block 1
        values = replacement_values(model, comps, TOKENS, method, ref, seed=0)
        full = batched_metric(model, TOKENS, metric, lambda s, e: ablation_hooks(model, comps, values))
        assert torch.allclose(res.ablated, full, atol=1e-5) and not torch.allclose(full, res.baseline, atol=1e-4), method


def test_logits_under_several_hook_sets_run_the_shared_blocks_once_and_equal_full_passes(model):
    from mechscope.techniques.inputs import logits_under

    def half(a, h):
        return a * 0.5

    sets = [[], [("blocks.2.hook_mlp_out", half)], [("blocks.1.attn.hook_z", half), ("blocks.2.hook_resid_post", half)]]
    want = [model.run_with_hooks(TOKENS, fwd_hooks=hs) for hs in sets]
    for got in (logits_under(model, TOKENS, sets), [None] + logits_under(model, TOKENS, sets[1:])):
        for g, w in zip(got[1:], want[1:]):
            assert torch.allclose(g, w, atol=1e-5) and not torch.allclose(w, want[0], atol=1e-3)
    assert torch.allclose(logits_under(model, TOKENS, sets)[0], want[0], atol=1e-6)
    assert logits_under(model, TOKENS, sets, keep=1)[1].shape[1] == 1


def test_bootstrap_resamples_in_batches_give_what_one_call_each_gives():
    """bootstrap_ci's resamples go through the statistic batched (vmap), in chunks, or one call each where the
    statistic cannot be batched: the same values either way, for a mean, a median, a ratio of means over columns
    (normalised faithfulness) and a statistic that reads a Python float."""
    from mechscope.analysis.validation import resampled
    from mechscope.circuits.faithfulness import normalised_ci

    g = torch.Generator().manual_seed(0)
    x, rows = torch.randn(30, dtype=torch.float64, generator=g), torch.randn(30, 3, dtype=torch.float64, generator=g)
    idx = torch.randint(0, 30, (500, 30), generator=g)
    ratio = lambda r: (r[:, 0].mean() - r[:, 2].mean()) / (r[:, 1].mean() - r[:, 2].mean())  # noqa: E731
    as_float = lambda r: torch.tensor(float(r.mean()))  # noqa: E731  (vmap cannot batch float())
    for stat, v in ((torch.mean, x), (torch.median, x), (ratio, rows), (as_float, x)):
        one_each = torch.stack([torch.as_tensor(stat(v[i])) for i in idx]).double()
        for chunk in (1 << 24, 100):  # one batch, and batches of a few resamples
            assert torch.equal(resampled(stat, v, idx, max_elements=chunk), one_each)
    est = normalised_ci(rows[:, 0] + 2, rows[:, 1] + 5, rows[:, 2])
    want = torch.stack([torch.as_tensor(ratio(torch.stack([rows[:, 0] + 2, rows[:, 1] + 5, rows[:, 2]], 1)[i]))
                        for i in torch.randint(0, 30, (2000, 30), generator=torch.Generator().manual_seed(0))])
    lo, hi = torch.quantile(want.double(), torch.tensor([0.025, 0.975], dtype=torch.float64))
    assert (est.low, est.high) == (float(lo), float(hi))
