"""Models split across memory and disk (accelerate's device_map + offload_folder) against the in-memory model.

Each tiny model is saved, then loaded twice: whole in memory, and with ``max_memory`` set to half
its weights so that the rest is offloaded to disk (its parameters stay on ``meta`` between
forward passes). Everything must agree exactly, or to 1e-5 where a technique reorders sums.
"""

import pytest
import torch

import mechscope
from mechscope.core.placement import offloaded, param
from tiny import V, tiny_hf

TOKENS = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(4))
ARCHS = ["llama", "gpt2", "gemma3", "gpt_neox_seq", "phi3"]


def _load_pair(path, tmp, budget):
    ref = mechscope.load(str(path), attn_implementation="eager")
    off = mechscope.load(str(path), attn_implementation="eager", max_memory={"cpu": budget},
                         offload_folder=str(tmp / "offload"))
    return ref, off


@pytest.fixture(scope="module", params=ARCHS)
def pair(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"off-{request.param}")
    hf = tiny_hf(request.param, "eager")
    nbytes = sum(p.numel() * p.element_size() for p in hf.parameters())
    hf.save_pretrained(tmp / "m")
    ref, off = _load_pair(tmp / "m", tmp, nbytes // 2)
    devices = set(off.cfg.device_map.values())
    assert "disk" in devices and "cpu" in devices, off.cfg.device_map  # really split: memory and disk
    return request.param, ref, off


def metric(logits):
    return logits[:, -1, 3] - logits[:, -1, 5]


def test_placement_is_reported_and_weights_are_on_meta(pair):
    _, ref, off = pair
    assert off.cfg.device == "cpu" and off.cfg.device_map is not None and ref.cfg.device_map is None
    assert offloaded(off.hf) and not offloaded(ref.hf)
    metas = [n for n, p in off.hf.named_parameters() if p.device.type == "meta"]
    assert metas, "nothing was offloaded"
    name = metas[0]
    module = off.hf.get_submodule(name.rsplit(".", 1)[0])
    real = param(module, name.rsplit(".", 1)[1])
    assert real.device.type == "cpu" and torch.equal(real, ref.hf.get_parameter(name))
    assert getattr(module, name.rsplit(".", 1)[1]).device.type == "meta"  # left offloaded


def test_logits_and_every_hook_equal(pair):
    _, ref, off = pair
    with torch.no_grad():
        assert torch.equal(ref(TOKENS), off(TOKENS))
        l1, c1 = ref.run_with_cache(TOKENS, names_filter=lambda n: True)
        l2, c2 = off.run_with_cache(TOKENS, names_filter=lambda n: True)
    assert torch.equal(l1, l2) and sorted(c1.keys()) == sorted(c2.keys())
    for k in c1.keys():
        assert torch.equal(c1[k], c2[k]), k
    _, on_meta = off.run_with_cache(TOKENS, names_filter="blocks.1.hook_resid_post", device="meta")
    assert on_meta["resid_post", 1].device.type == "meta"  # the cache lands where it is told


def test_residual_identities_hold_on_the_offloaded_model(pair):
    _, _, off = pair
    with torch.no_grad():
        logits, cache = off.run_with_cache(TOKENS, names_filter=lambda n: True)
    n = off.cfg.n_layers
    for l in range(n):
        torch.testing.assert_close(cache["resid_mid", l], cache["resid_pre", l] + cache["attn_out", l])
        torch.testing.assert_close(cache["resid_post", l], cache["resid_mid", l] + cache["mlp_out", l])
        torch.testing.assert_close(cache["result", l].sum(-2) + off.b_O[l], cache["attn_out", l],
                                   atol=1e-5, rtol=1e-5)
    normed = off.ln_final(cache["resid_post", n - 1])
    torch.testing.assert_close(off.unembed(normed), logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache.decompose_resid().sum(0), cache["resid_post", n - 1], atol=1e-4, rtol=1e-4)


def test_weight_views_read_real_weights(pair):
    _, ref, off = pair
    for name in ("W_E", "W_U", "b_U", "W_Q", "W_K", "W_V", "W_O", "b_O", "W_in", "W_out", "b_in", "b_out"):
        a, b = getattr(ref, name), getattr(off, name)
        assert b.device.type != "meta" and torch.equal(a, b), name
    assert torch.equal(ref.ln_final.gain, off.ln_final.gain) and torch.equal(ref.ln1(1).gain, off.ln1(1).gain)


def test_patching_run_from_and_dla_equal(pair):
    from mechscope.techniques.attribution import direct_logit_attribution
    from mechscope.techniques.patching import patch

    _, ref, off = pair
    corrupted = TOKENS.flip(1)
    for kw in ({"site": "resid_pre"}, {"site": "z", "per_position": True}, {"site": "mlp_out"}):
        a, b = patch(ref, TOKENS, corrupted, metric, **kw), patch(off, TOKENS, corrupted, metric, **kw)
        torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=1e-5)
        assert b.stats["forward_passes"] < b.stats["patches"]  # the batched, prefix-reusing engine ran
    with torch.no_grad():
        resid = off(TOKENS, stop_at_layer=2)
        torch.testing.assert_close(off.run_from(2, resid), ref.run_from(2, resid), atol=1e-6, rtol=1e-6)
    d1, d2 = direct_logit_attribution(ref, TOKENS, 3, 5), direct_logit_attribution(off, TOKENS, 3, 5)
    torch.testing.assert_close(d1.values, d2.values, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(d1.heads, d2.heads, atol=1e-5, rtol=1e-5)
    assert abs(d2.error) < 1e-4


def test_gradient_techniques_equal(pair):
    from mechscope.circuits.discovery import edge_attribution
    from mechscope.techniques.attribution_patching import attribution_patch

    _, ref, off = pair
    corrupted = TOKENS.flip(1)
    a, b = attribution_patch(ref, TOKENS, corrupted, metric), attribution_patch(off, TOKENS, corrupted, metric)
    for site in a:
        torch.testing.assert_close(a[site].values, b[site].values, atol=1e-5, rtol=1e-5)
    e1, e2 = edge_attribution(ref, TOKENS, corrupted, metric), edge_attribution(off, TOKENS, corrupted, metric)
    assert e1.keys() == e2.keys() and max(abs(e1[k] - e2[k]) for k in e1) < 1e-5


def test_ablation_probes_harvest_and_steering_equal(pair):
    from mechscope.sae import harvest
    from mechscope.techniques.ablation import ablate
    from mechscope.techniques.probing import probe_sweep
    from mechscope.techniques.steering import steering_hook

    _, ref, off = pair
    toks = torch.randint(0, V, (8, 9), generator=torch.Generator().manual_seed(5))
    per_prompt = lambda lg: lg[:, -1, 3] - lg[:, -1, 5]  # noqa: E731
    a = ablate(ref, toks, per_prompt, ["L1H2", "L0.mlp"], method="mean")
    b = ablate(off, toks, per_prompt, ["L1H2", "L0.mlp"], method="mean")
    torch.testing.assert_close(a.ablated, b.ablated, atol=1e-5, rtol=1e-5)
    labels = (toks % 2).long()
    p1 = probe_sweep(ref, toks, labels, hooks=["blocks.1.hook_resid_post"], control=False)
    p2 = probe_sweep(off, toks, labels, hooks=["blocks.1.hook_resid_post"], control=False)
    assert p1.scores[0].value == p2.scores[0].value
    h1 = harvest(ref, "blocks.1.hook_resid_mid", toks, max_norm_ratio=None)
    h2 = harvest(off, "blocks.1.hook_resid_mid", toks, max_norm_ratio=None)
    assert torch.equal(h1, h2)
    d = torch.randn(ref.cfg.d_model, generator=torch.Generator().manual_seed(6))
    hook = [("blocks.1.hook_resid_post", steering_hook(d, 4.0))]
    with torch.no_grad():
        s1, s2 = ref.run_with_hooks(toks, fwd_hooks=hook), off.run_with_hooks(toks, fwd_hooks=hook)
    assert torch.equal(s1, s2) and not torch.allclose(s1, ref(toks))


def test_fully_offloaded_model(tmp_path):
    hf = tiny_hf("llama", "eager")
    hf.save_pretrained(tmp_path / "m")
    ref, off = _load_pair(tmp_path / "m", tmp_path, "1KB")
    assert set(off.cfg.device_map.values()) == {"disk"}
    with torch.no_grad():
        assert torch.equal(ref(TOKENS), off(TOKENS))
    assert torch.equal(ref.W_Q, off.W_Q)


@pytest.mark.slow
def test_default_model_offloaded_to_disk_equals_in_memory(smollm, tmp_path):
    from mechscope.techniques.attribution import direct_logit_attribution
    from mechscope.techniques.patching import patch

    nbytes = sum(p.numel() * p.element_size() for p in smollm.hf.parameters())
    off = mechscope.load("smollm2-135m", device="cpu", max_memory={"cpu": nbytes // 2},
                         offload_folder=str(tmp_path / "offload"))
    assert "disk" in set(off.cfg.device_map.values())
    clean, corrupted = "When Mary and John went to the store, John gave a drink to", \
        "When Mary and John went to the store, Mary gave a drink to"
    with torch.no_grad():
        l1, c1 = smollm.run_with_cache(clean, names_filter=lambda n: n.endswith(("resid_pre", "attn_out", "mlp_out")))
        l2, c2 = off.run_with_cache(clean, names_filter=lambda n: n.endswith(("resid_pre", "attn_out", "mlp_out")))
    assert torch.equal(l1, l2)
    for l in range(smollm.cfg.n_layers - 1):
        torch.testing.assert_close(c2["resid_pre", l] + c2["attn_out", l] + c2["mlp_out", l], c2["resid_pre", l + 1],
                                   atol=1e-4, rtol=1e-5)
    mary, john = smollm.to_single_token(" Mary"), smollm.to_single_token(" John")

    def ld(lg):
        return lg[:, -1, mary] - lg[:, -1, john]

    layers = [0, 10, 20, 29]
    a = patch(smollm, clean, corrupted, ld, site="resid_pre", layers=layers)
    b = patch(off, clean, corrupted, ld, site="resid_pre", layers=layers)
    torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=1e-5)
    d1 = direct_logit_attribution(smollm, clean, " Mary", " John")
    d2 = direct_logit_attribution(off, clean, " Mary", " John")
    torch.testing.assert_close(d1.values, d2.values, atol=1e-5, rtol=1e-5)
