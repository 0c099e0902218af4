"""DLA sums exactly to the logit difference on every architecture; heads and neurons refine layers."""

import pytest
import torch

from mechscope import HookedModel
from mechscope.techniques.attribution import direct_logit_attribution
from tiny import ARCHS, V, tiny_hf

TOKENS = torch.randint(0, V, (3, 8), generator=torch.Generator().manual_seed(9))


@pytest.mark.parametrize("arch", ARCHS)
def test_dla_is_exact(arch):
    model = HookedModel(tiny_hf(arch, "eager" if arch == "gemma2" else "sdpa"))
    res = direct_logit_attribution(model, TOKENS, answer=[3, 4, 5], wrong=[6, 7, 8])
    with torch.no_grad():
        normed = model.ln_final(model(TOKENS, stop_at_layer=model.cfg.n_layers))
        raw = normed[:, -1] @ model.W_U + model.b_U  # before soft-capping
        logits = model(TOKENS)[:, -1]
    rows = torch.arange(3)
    want = raw[rows, [3, 4, 5]] - raw[rows, [6, 7, 8]]
    torch.testing.assert_close(res.per_prompt_target, want, atol=1e-5, rtol=1e-5)
    if not model.cfg.final_softcap:
        torch.testing.assert_close(want, logits[rows, [3, 4, 5]] - logits[rows, [6, 7, 8]], atol=1e-5, rtol=1e-5)
    # the parts sum to the whole, per prompt
    torch.testing.assert_close(res.per_prompt.sum(0), res.per_prompt_target, atol=1e-4, rtol=1e-4)
    assert abs(res.error) < 1e-4
    # heads (+ their bias terms) sum to their layer's attention term; neurons (+ bias) to the MLP term
    for l in range(model.cfg.n_layers):
        attn = res.values[res.components.index(f"L{l}.attn")]
        mlp = res.values[res.components.index(f"L{l}.mlp")]
        torch.testing.assert_close(res.heads[l].sum() + res.head_bias[l], attn, atol=1e-4, rtol=1e-4)
        neurons = res.extra["neuron_contributions"][l].sum() + res.extra["mlp_bias"][l]
        if l in (model.cfg.moe_layers or []):  # an MoE block: its experts (+ the shared expert) make up the MLP term
            neurons = neurons + res.extra["expert_contributions"][l].sum()
        torch.testing.assert_close(neurons, mlp, atol=1e-4, rtol=1e-4)


def test_dla_single_answer_and_outputs(tmp_path):
    model = HookedModel(tiny_hf("gpt2"))
    res = direct_logit_attribution(model, TOKENS, answer=3)
    assert res.values.shape[0] == len(res.components)
    assert "pos_embed" in res.components
    assert len(res.neurons) == 20 and all(0 <= l < model.cfg.n_layers for l, _, _ in res.neurons)
    assert "largest heads" in res.summary()
    assert res.plot(tmp_path / "d.png").stat().st_size > 1000
    assert "<table" in res.to_html()
    with pytest.raises(ValueError, match="one answer per prompt"):
        direct_logit_attribution(model, TOKENS, answer=[1, 2])


@pytest.mark.slow
def test_dla_on_real_model_padded_batch(smollm):
    prompts = ["The capital of France is", "The capital of Germany is the city of"]
    res = direct_logit_attribution(smollm, prompts, answer=[" Paris", " Berlin"], wrong=[" London", " London"])
    logits = smollm(prompts)
    toks, mask = smollm.tokenize(prompts)
    last = mask.sum(-1) - 1
    want = torch.stack([logits[i, last[i], smollm.to_single_token(a)] - logits[i, last[i], smollm.to_single_token(" London")]
                        for i, a in enumerate([" Paris", " Berlin"])])
    torch.testing.assert_close(res.per_prompt_target, want.detach(), atol=1e-3, rtol=1e-4)
    assert abs(res.error) < 1e-3 and res.target > 2


def test_attribution_patching_is_first_order_and_correlates():
    from mechscope.analysis.metrics import logit_diff
    from mechscope.techniques.attribution_patching import attribution_patch
    from mechscope.techniques.patching import patch

    model = HookedModel(tiny_hf("llama"))
    clean = TOKENS[:2]
    corr = clean.clone()
    corr[:, 3] = (corr[:, 3] + 5) % V
    metric = lambda lg: logit_diff(lg, torch.tensor([3, 4]), torch.tensor([5, 6]))  # noqa: E731
    est = attribution_patch(model, clean, corr, metric, sites=("resid_pre", "z", "attn_out"))
    true = patch(model, clean, corr, metric, site="resid_pre")
    # exact where the patch is zero (identical activations): estimate == base value
    torch.testing.assert_close(est["resid_pre"].values[:, :3], true.values[:, :3], atol=1e-5, rtol=1e-5)
    # cross-check one entry against an explicit gradient
    x = {}

    def leaf(act, hook):
        x["a"] = act.detach().requires_grad_(True)
        return x["a"]

    with torch.enable_grad():
        out = model.run_with_hooks(corr, fwd_hooks=[("blocks.1.hook_attn_out", leaf)])
        metric(out).mean().backward()
    _, c_clean = model.run_with_cache(clean, names_filter="blocks.1.hook_attn_out")
    want = ((c_clean["attn_out", 1] - x["a"].detach()) * x["a"].grad).sum(-1).mean(0) * 2  # mean metric -> sum
    got = est["attn_out"].values[1] - est["attn_out"].corrupted_value
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert est["z"].values.shape == (3, 4)
    with pytest.raises(KeyError, match="unknown attribution sites"):
        attribution_patch(model, clean, corr, metric, sites=("resid",))


@pytest.mark.slow
def test_attribution_patching_tracks_true_patching_on_ioi(smollm):
    from mechscope.analysis.metrics import logit_diff
    from mechscope.techniques.attribution_patching import attribution_patch
    from mechscope.techniques.patching import patch

    clean = ["When Mary and John went to the store, John gave a drink to",
             "When Tom and James went to the park, James gave a ball to"]
    corr = ["When Mary and John went to the store, Mary gave a drink to",
            "When Tom and James went to the park, Tom gave a ball to"]
    ans = torch.tensor([smollm.to_single_token(" Mary"), smollm.to_single_token(" Tom")])
    wrong = torch.tensor([smollm.to_single_token(" John"), smollm.to_single_token(" James")])
    metric = lambda lg: logit_diff(lg, ans, wrong)  # noqa: E731
    est = attribution_patch(smollm, clean, corr, metric, sites=("resid_pre", "attn_out"))
    for site, floor in (("resid_pre", 0.7), ("attn_out", 0.9)):
        true = patch(smollm, clean, corr, metric, site=site)
        r = torch.corrcoef(torch.stack([est[site].normalized().flatten(), true.normalized().flatten()]))[0, 1]
        assert r > floor, (site, float(r))
