"""The batched patching engine equals one forward pass per patch, on several architectures."""

import pytest
import torch

from mechscope import HookedModel
from mechscope.analysis.metrics import logit_diff
from mechscope.techniques.patching import patch, patch_naive
from tiny import V, tiny_hf

G = torch.Generator().manual_seed(5)
CLEAN = torch.randint(0, V, (2, 7), generator=G)
CORR = CLEAN.clone()
CORR[:, 2] = (CORR[:, 2] + 11) % V


def metric(logits):
    return logit_diff(logits, torch.tensor([3, 4]), torch.tensor([5, 6]))


def all_positions_metric(logits):  # reads every position: the engine must keep them all
    return logits[:, :, 3].mean(-1) - logits[:, :, 5].mean(-1)


CASES = [
    ("resid_pre", {}), ("resid_mid", {}), ("resid_post", {}), ("attn_out", {}), ("mlp_out", {}),
    ("z", {}), ("z", {"per_position": True}), ("q", {"per_position": True}), ("k", {}),
    ("v", {"per_position": True}), ("pattern", {}), ("pattern", {"per_position": True}),
]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "gemma3", "qwen3", "falcon", "gpt_bigcode_mha"])
@pytest.mark.parametrize("site,kw", CASES, ids=[f"{s}{'-pos' if k else ''}" for s, k in CASES])
def test_engine_equals_naive(arch, site, kw):
    model = HookedModel(tiny_hf(arch, "eager" if arch == "gemma3" else "sdpa"))
    if site == "pattern" and not model.has_hook("blocks.0.attn.hook_pattern"):
        pytest.skip(f"{arch} computes attention in its own code: no pattern hook")
    fast = patch(model, CLEAN, CORR, metric, site=site, batch_size=3, **kw)
    slow = patch_naive(model, CLEAN, CORR, metric, site=site, **kw)
    assert fast.values.shape == slow.values.shape
    torch.testing.assert_close(fast.values, slow.values, atol=1e-5, rtol=1e-5)
    if fast.stats["patches"] > model.cfg.n_layers:  # several patches per block: they must share passes
        assert fast.stats["forward_passes"] < fast.stats["patches"]
    assert not model.manager._entries


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_all_position_metric_and_direction(direction):
    model = HookedModel(tiny_hf("mistral"))  # sliding window 4 < 7 tokens
    fast = patch(model, CLEAN, CORR, all_positions_metric, site="resid_pre", direction=direction, batch_size=4)
    slow = patch_naive(model, CLEAN, CORR, all_positions_metric, site="resid_pre", direction=direction)
    assert fast.stats["last_position_only"] is False
    torch.testing.assert_close(fast.values, slow.values, atol=1e-5, rtol=1e-5)
    # endpoints: patching the whole residual stream at layer 0 recovers the source run exactly
    whole = patch(model, CLEAN, CORR, all_positions_metric, site="blocks.0.hook_resid_pre", direction=direction)
    target = whole.clean_value if direction == "denoise" else whole.corrupted_value
    assert abs(float(whole.values[0]) - target) < 1e-5


def test_hook_name_site_with_function_and_per_prompt():
    model = HookedModel(tiny_hf("llama"))
    half = lambda base, src, hook: (base + src) / 2  # noqa: E731
    names = ["blocks.1.hook_mlp_out", "blocks.2.attn.hook_z", "hook_embed"]
    fast = patch(model, CLEAN, CORR, metric, site=names, fn=half)
    slow = patch_naive(model, CLEAN, CORR, metric, site=names, fn=half)
    torch.testing.assert_close(fast.values, slow.values, atol=1e-5, rtol=1e-5)
    assert fast.per_prompt.shape == (3, 2)
    # positions before the corrupted token do not matter
    res = patch(model, CLEAN, CORR, metric, site="resid_pre")
    assert torch.allclose(res.normalized()[:, :2], torch.zeros(3, 2), atol=1e-5)
    assert torch.allclose(res.normalized()[0, 2], torch.tensor(1.0), atol=1e-5)


def test_errors_are_clear():
    model = HookedModel(tiny_hf("llama"))
    with pytest.raises(ValueError, match="same token length"):
        patch(model, CLEAN, CORR[:, :5], metric)
    with pytest.raises(KeyError, match="unknown patching site"):
        patch(model, CLEAN, CORR, metric, site="resid")
    with pytest.raises(ValueError, match="scalar or one value per prompt"):
        patch(model, CLEAN, CORR, lambda lg: lg[:, -1, :3])
    with pytest.raises(ValueError, match="direction"):
        patch(model, CLEAN, CORR, metric, direction="sideways")


def test_result_outputs(tmp_path):
    model = HookedModel(tiny_hf("llama"))
    res = patch(model, CLEAN, CORR, metric, site="z", per_position=True)
    assert res.values.shape == (3, 7, 4)
    assert "top 10" in res.summary()
    png = res.plot(tmp_path / "p.png")
    assert png.stat().st_size > 1000
    assert "<table" in res.to_html()


def test_reads_last_only_probe():
    from mechscope.techniques.inputs import reads_last_only

    last = torch.randn(2, 1, 11)
    assert reads_last_only(metric, last, 7)
    assert not reads_last_only(all_positions_metric, last, 7)
    assert not reads_last_only(lambda lg: lg[:, -2, 0], last, 7)
