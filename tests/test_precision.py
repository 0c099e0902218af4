"""Low precision end to end: every technique in bfloat16 and float16 against float32.

The same tiny model is cast to each dtype. The numerically sensitive parts (metrics, logit
differences, DLA sums, statistics, probe fits, SAE losses) compute in float32 whatever the model
dtype, so each result must be finite, in float32, and close to the float32 model's: within 5%
of the float32 spread (bf16 keeps 8 bits of mantissa, so activations carry ~0.4% relative error
per op).
"""

import copy

import pytest
import torch

from mechscope import HookedModel
from tiny import V, tiny_hf

N, P = 6, 8
TOKENS = torch.randint(0, V, (N, P), generator=torch.Generator().manual_seed(21))
CORRUPTED = torch.randint(0, V, (N, P), generator=torch.Generator().manual_seed(22))
DTYPES = [torch.bfloat16, torch.float16]
# Metric values are compared with |difference| <= 5% of the largest last-position logit of the float32 model
# (bf16 rounds each logit to ~0.4% of its size, and a metric subtracts two of them).


def metric(logits):
    return logits[:, -1, 3] - logits[:, -1, 5]


@pytest.fixture(scope="module")
def fp32():
    return HookedModel(tiny_hf("llama"))


@pytest.fixture(scope="module", params=DTYPES, ids=["bf16", "fp16"])
def low(request, fp32):
    return request.param, HookedModel(copy.deepcopy(fp32.hf).to(request.param))


def close(a, b, rel=0.05, scale=None):
    """``|a - b| <= rel * scale``; ``scale`` defaults to ``max |b|``."""
    a, b = torch.as_tensor(a).float(), torch.as_tensor(b).float()
    assert torch.isfinite(a).all()
    scale = max(float(b.abs().max()), 1e-3) if scale is None else scale
    assert float((a - b).abs().max()) <= rel * scale, (float((a - b).abs().max()), scale)


def logit_scale(model):
    """A metric is a difference of logits: its bf16 error is a fraction of the logits' size, not of the difference."""
    with torch.no_grad():
        return float(model(TOKENS)[:, -1].abs().max())


def test_forward_cache_and_metric_in_low_precision(fp32, low):
    dtype, model = low
    assert model.dtype == dtype and model.cfg.dtype == str(dtype).replace("torch.", "")
    with torch.no_grad():
        logits, cache = model.run_with_cache(TOKENS)
        ref = fp32(TOKENS)
    assert logits.dtype == dtype and cache["resid_post", 1].dtype == dtype
    close(metric(logits), metric(ref), scale=logit_scale(fp32))
    from mechscope.analysis.metrics import logit_diff

    assert logit_diff(logits, 3, 5).dtype == torch.float32  # metrics compute in float32


def test_dla_sums_in_float32(fp32, low):
    from mechscope.techniques.attribution import direct_logit_attribution

    _, model = low
    res, ref = direct_logit_attribution(model, TOKENS, 3, 5), direct_logit_attribution(fp32, TOKENS, 3, 5)
    assert res.values.dtype == torch.float32 and res.heads.dtype == torch.float32
    # the parts still sum to the model's own logit difference: the error is the bf16 rounding of the logits
    assert abs(res.error) < 0.02 * max(1.0, abs(res.target)), (res.error, res.target)
    close(res.values, ref.values, rel=0.08)


def test_patching_ablation_and_attribution_patching(fp32, low):
    from mechscope.techniques.ablation import ablate
    from mechscope.techniques.attribution_patching import attribution_patch
    from mechscope.techniques.patching import patch

    _, model = low
    for site in ("resid_pre", "z"):
        a, b = patch(model, TOKENS, CORRUPTED, metric, site=site), patch(fp32, TOKENS, CORRUPTED, metric, site=site)
        assert a.values.dtype == torch.float32
        close(a.values, b.values, scale=logit_scale(fp32))
    a = ablate(model, TOKENS, metric, ["L1H2", "L0.mlp"], method="mean")
    b = ablate(fp32, TOKENS, metric, ["L1H2", "L0.mlp"], method="mean")
    close(a.ablated, b.ablated, scale=logit_scale(fp32))
    assert a.effect.low <= a.effect.value <= a.effect.high
    a, b = attribution_patch(model, TOKENS, CORRUPTED, metric), attribution_patch(fp32, TOKENS, CORRUPTED, metric)
    for site in ("resid_pre", "z"):
        close(a[site].values, b[site].values, rel=0.1)


def test_eap_probes_lens_and_steering(fp32, low):
    from mechscope.circuits.discovery import edge_attribution
    from mechscope.techniques.probing import probe_sweep
    from mechscope.techniques.steering import steering_hook

    _, model = low
    e1, e2 = edge_attribution(model, TOKENS, CORRUPTED, metric), edge_attribution(fp32, TOKENS, CORRUPTED, metric)
    close(torch.tensor(list(e1.values())), torch.tensor(list(e2.values())), rel=0.1)
    labels = (TOKENS % 2).long()
    p = probe_sweep(model, TOKENS, labels, hooks=["blocks.1.hook_resid_post"], control=False)
    q = probe_sweep(fp32, TOKENS, labels, hooks=["blocks.1.hook_resid_post"], control=False)
    assert p.probes[0].weight.dtype == torch.float32 and abs(p.scores[0].value - q.scores[0].value) <= 0.2
    d = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        s = model.run_with_hooks(TOKENS, fwd_hooks=[("blocks.1.hook_resid_post", steering_hook(d, 3.0))])
        r = fp32.run_with_hooks(TOKENS, fwd_hooks=[("blocks.1.hook_resid_post", steering_hook(d, 3.0))])
    close(metric(s), metric(r), scale=logit_scale(fp32))


def test_sae_harvest_train_and_eval(fp32, low):
    from mechscope.sae import SAEConfig, TrainConfig, evaluate_sae, fit_sae, harvest

    _, model = low
    acts = harvest(model, "blocks.1.hook_resid_post", TOKENS)
    assert acts.dtype == torch.float32  # harvested rows are float32 for the trainer
    close(acts, harvest(fp32, "blocks.1.hook_resid_post", TOKENS))
    cfg = SAEConfig(d_in=model.cfg.d_model, d_sae=64, k=4, hook_name="blocks.1.hook_resid_post")
    run = fit_sae(acts, cfg, TrainConfig(steps=20, batch_size=32, log_every=10), progress=False)
    ev = evaluate_sae(model, run.sae, TOKENS)
    ev32 = evaluate_sae(fp32, run.sae, TOKENS)
    assert all(torch.isfinite(torch.tensor(x)) for x in (ev.ce_clean, ev.ce_sae, ev.ce_zero, ev.explained_variance))
    assert abs(ev.ce_sae - ev32.ce_sae) < 0.05 and abs(ev.ce_clean - ev32.ce_clean) < 0.05


# ---------------------------------------------------------------------------------- the default model
@pytest.fixture(scope="module")
def smollm_bf16():
    import mechscope

    return mechscope.load("smollm2-135m", dtype="bfloat16")


PROMPTS = ["The capital of France is", "The Eiffel Tower is located in the city of", "One, two, three, four,",
           "When Mary and John went to the store, John gave a drink to"]
IOI_CORRUPTED = "When Mary and John went to the store, Mary gave a drink to"


@pytest.mark.slow
def test_default_model_bf16_top1_and_dla(smollm, smollm_bf16):
    from mechscope.techniques.attribution import direct_logit_attribution

    toks, mask = smollm.tokenize(PROMPTS)
    with torch.no_grad():
        a, b = smollm(toks, attention_mask=mask), smollm_bf16(toks, attention_mask=mask)
    assert b.dtype == torch.bfloat16
    last, rows = mask.sum(-1) - 1, torch.arange(len(PROMPTS))
    assert torch.equal(a[rows, last].argmax(-1), b[rows, last].argmax(-1))  # top-1 agrees at every answer
    assert float((a.argmax(-1) == b.argmax(-1))[mask.bool()].float().mean()) > 0.9  # and at 97% of all positions
    d32 = direct_logit_attribution(smollm, PROMPTS[3], " Mary", " John")
    d16 = direct_logit_attribution(smollm_bf16, PROMPTS[3], " Mary", " John")
    # bf16 rounds every write to the residual stream to 8 bits of mantissa; the parts (summed in float32)
    # still give the bf16 model's own logit difference to 2% (measured: 0.3%), and the float32 one's to 5%
    assert abs(d16.error) < 0.02 * abs(d16.target), (d16.error, d16.target)
    assert abs(d16.target - d32.target) < 0.05 * abs(d32.target)
    assert float(torch.corrcoef(torch.stack([d32.values, d16.values]))[0, 1]) > 0.99


@pytest.mark.slow
def test_default_model_bf16_patching_and_induction_heads(smollm, smollm_bf16):
    from mechscope.circuits.heads import induction_scores
    from mechscope.techniques.patching import patch

    mary, john = smollm.to_single_token(" Mary"), smollm.to_single_token(" John")

    def ld(lg):
        return lg[:, -1, mary] - lg[:, -1, john]

    layers = list(range(0, 30, 3))
    p32 = patch(smollm, PROMPTS[3], IOI_CORRUPTED, ld, site="resid_pre", layers=layers)
    p16 = patch(smollm_bf16, PROMPTS[3], IOI_CORRUPTED, ld, site="resid_pre", layers=layers)
    corr = torch.corrcoef(torch.stack([p32.normalized().flatten(), p16.normalized().flatten()]))[0, 1]
    assert float(corr) > 0.99, float(corr)
    top = lambda s: {name for name, _ in s.top(4)}  # noqa: E731
    assert top(induction_scores(smollm_bf16)) == top(induction_scores(smollm))
