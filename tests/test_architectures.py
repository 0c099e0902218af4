"""Exactness of the hook points on a tiny random model of every supported architecture."""

import pytest
import torch

from mechscope import HookedModel
from tiny import ARCHS, SLIDING, V, tiny_hf

TOKENS = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(1))


def wrap(arch, base="sdpa"):
    try:
        hf = tiny_hf(arch, base)
    except (ValueError, ImportError) as e:  # an implementation the family refuses
        pytest.skip(str(e))
    with torch.no_grad():
        ref = hf(input_ids=TOKENS).logits
    return HookedModel(hf), ref


@pytest.mark.parametrize("arch", ARCHS)
def test_every_hook_cached_logits_exact_eager(arch):
    model, ref = wrap(arch, "eager")
    with torch.no_grad():
        names = lambda n: True  # noqa: E731 - every hook, hook_result included
        logits, cache = model.run_with_cache(TOKENS, names_filter=names)
    assert len(cache) == len(model.hook_names)
    assert torch.equal(logits, ref)


@pytest.mark.parametrize("arch", ARCHS)
def test_hooks_inert_with_sdpa(arch):
    model, ref = wrap(arch, "sdpa")
    no_pattern = lambda n: not n.endswith(("hook_pattern", "hook_attn_scores"))  # noqa: E731
    with torch.no_grad():
        logits, cache = model.run_with_cache(TOKENS, names_filter=no_pattern)
        assert torch.equal(logits, ref)
        assert torch.equal(model(TOKENS), ref)
        # caching patterns switches those layers to eager maths: equal up to kernel reordering
        logits2, _ = model.run_with_cache(TOKENS)
    torch.testing.assert_close(logits2, ref, atol=1e-5, rtol=1e-5)


@pytest.fixture(params=ARCHS)
def cached(request):
    model, ref = wrap(request.param, "eager")
    with torch.no_grad():
        logits, cache = model.run_with_cache(TOKENS, names_filter=lambda n: True)
    return request.param, model, logits, cache


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def test_residual_stream_algebra(cached):
    arch, model, logits, cache = cached
    n = model.cfg.n_layers
    for l in range(n - 1):
        assert torch.equal(cache["resid_post", l], cache["resid_pre", l + 1])
    for l in range(n):
        pre, mid, post = cache["resid_pre", l], cache["resid_mid", l], cache["resid_post", l]
        close(mid, pre + cache["attn_out", l])
        close(post, mid + cache["mlp_out", l])
    embeds = cache["embed"] + (cache["pos_embed"] if "hook_pos_embed" in model.hook_names else 0)
    close(cache["resid_pre", 0], embeds)
    # decompose_resid sums back to the final residual stream
    close(cache.decompose_resid().sum(0), cache["resid_post", n - 1], tol=1e-4)


def test_head_results_sum_to_attn_out(cached):
    arch, model, logits, cache = cached
    for l in range(model.cfg.n_layers):
        res = cache["result", l]
        assert res.shape == (*TOKENS.shape, model.cfg.n_heads, model.cfg.d_model)
        bias = model.b_O[l]
        if model.family.attn_post_norm:  # post-norm: the bias passes the frozen norm too (zero here)
            assert not bias.any()
        close(res.sum(-2) + bias, cache["attn_out", l])
        # computing results from z alone agrees with the recorded ones
        close(model.head_results(l, cache["z", l]), res)
    stack = cache.stack_head_results()
    assert stack.shape[0] == model.cfg.n_layers * model.cfg.n_heads


def test_unembedding_reproduces_logits(cached):
    arch, model, logits, cache = cached
    final = cache["resid_post", model.cfg.n_layers - 1]
    normed = model.ln_final(final)
    assert torch.equal(normed, cache["ln_final.hook_normalized"])
    raw = normed @ model.W_U + model.b_U
    cap = model.cfg.final_softcap
    close(torch.tanh(raw / cap) * cap if cap else raw, logits)
    # frozen-scale linearisation: components through the final norm sum to its output minus the bias
    stack = cache.apply_ln_to_stack(cache.decompose_resid())
    bias = model.ln_final.bias if model.ln_final.bias is not None else 0
    close(stack.sum(0) + bias, normed, tol=1e-4)


def test_patterns_are_causal_distributions(cached):
    arch, model, logits, cache = cached
    if "blocks.0.attn.hook_pattern" not in model.hook_names:
        assert not model.family.attn_fn  # only a family with its own attention code has no pattern hook
        pytest.skip(f"{arch} computes attention in its own code: no hook_pattern (see docs/hooks.md)")
    pos = TOKENS.shape[1]
    q = torch.arange(pos)[:, None]
    k = torch.arange(pos)[None, :]
    for l in range(model.cfg.n_layers):
        pat = cache["pattern", l]
        assert pat.shape == (2, model.cfg.n_heads, pos, pos)
        if model.family.attn_sinks:  # a learned sink logit takes part of each row's mass, then is dropped
            assert ((pat.sum(-1) < 1 + 1e-6) & (pat.sum(-1) > 0)).all()
        else:
            close(pat.sum(-1), torch.ones(2, model.cfg.n_heads, pos))
        allowed = k <= q
        window = SLIDING.get(arch)
        types = model.cfg.layer_types
        if window and (types is None or types[l] == "sliding_attention"):
            allowed = allowed & (q - k < window)
        assert (pat[..., ~allowed] == 0).all(), f"layer {l} attends outside its mask"
        assert (pat[..., allowed] > 0).all()
    if arch in SLIDING:  # the window really binds somewhere
        assert any(model.cfg.layer_types is None or t == "sliding_attention" for t in model.cfg.layer_types or [None])


def test_writing_cache_back_is_exact(cached):
    arch, model, logits, cache = cached
    hooks = [(name, lambda act, hook: cache[hook.name].clone()) for name in model.hook_names]
    with torch.no_grad():
        out = model.run_with_hooks(TOKENS, fwd_hooks=hooks)
    assert torch.equal(out, logits)


def test_writes_change_downstream(cached):
    arch, model, logits, cache = cached
    for name in ["blocks.1.hook_resid_mid", "blocks.1.attn.hook_result", "blocks.1.attn.hook_v",
                 "blocks.1.mlp.hook_pre", "blocks.1.attn.hook_pattern", "blocks.1.attn.hook_z", "hook_embed"]:
        if name not in model.hook_names:
            continue
        with torch.no_grad():
            out = model.run_with_hooks(TOKENS, fwd_hooks=[(name, lambda a, h: a * 0.5)])
        assert not torch.allclose(out, logits), name


def test_zero_head_z_equals_zero_W_O_slice(cached):
    arch, model, logits, cache = cached
    layer, head = 1, 2
    with torch.no_grad():
        def zero(z, hook):
            z = z.clone()
            z[:, :, head] = 0
            return z

        hooked = model.run_with_hooks(TOKENS, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", zero)])
        o = model.attn_module(layer)
        from mechscope.core.families import get_path
        proj = get_path(o, model.family.o)
        saved = proj.weight.detach().clone()
        d = model.cfg.d_head
        if model.family.conv1d:
            proj.weight.data[head * d:(head + 1) * d, :] = 0
        else:
            proj.weight.data[:, head * d:(head + 1) * d] = 0
        edited = model(TOKENS)
        proj.weight.data.copy_(saved)
    close(hooked, edited)
    assert not torch.allclose(hooked, logits)


def test_weight_views_match_activations(cached):
    arch, model, logits, cache = cached
    c = model.cfg
    for l in range(c.n_layers):
        x = cache[model.attn_input(l)]
        close(torch.einsum("bpm,hmd->bphd", x, model.W_Q[l]) + model.b_Q[l], cache["q", l])
        close(torch.einsum("bpm,hmd->bphd", x, model.W_K_kv[l]) + model.b_K[l][:: c.n_groups], cache["k", l])
        close(torch.einsum("bpm,hmd->bphd", x, model.W_V_kv[l]) + model.b_V[l][:: c.n_groups], cache["v", l])
        assert model.W_K.shape == (c.n_layers, c.n_heads, c.d_model, c.d_head)
        # expanded K: head h reads KV head h // n_groups
        assert torch.equal(model.W_K[l, c.n_heads - 1], model.W_K_kv[l, (c.n_heads - 1) // c.n_groups])
        if l in (c.moe_layers or []):
            continue  # an MoE block has no single MLP: tests/test_moe.py checks its experts
        x2 = cache[model.mlp_input(l)]
        close(x2 @ model.W_in_layer(l) + model.b_in_layer(l), cache["pre_linear" if c.gated_mlp else "pre", l])
        if c.gated_mlp:
            close(x2 @ model.W_gate_layer(l), cache["pre", l])
        mlp_out = cache["post", l] @ model.W_out_layer(l) + model.b_out_layer(l)
        if not c.post_norms:
            close(mlp_out, cache["mlp_out", l])
        if not c.qk_norm and c.positional == "learned":
            close(cache["q", l], cache["q", l])  # no rotary: q is what attention uses
    close(model.W_E[TOKENS], cache["embed"])


def test_padding_matches_single_prompts(cached):
    arch, model, logits, cache = cached
    toks = TOKENS.clone()
    mask = torch.ones_like(toks)
    mask[1, 6:] = 0
    with torch.no_grad():
        batched = model(toks, attention_mask=mask)
        single = model(toks[1:, :6])
    close(batched[1, :6], single[0], tol=1e-4)
    left = torch.cat([torch.zeros(1, 3, dtype=torch.long), toks[1:, :6]], dim=1)
    lmask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 6, dtype=torch.long)], dim=1)
    with torch.no_grad():
        lb = model(left, attention_mask=lmask)
    close(lb[0, 3:], single[0], tol=1e-4)


def test_stop_at_layer_returns_resid_pre(cached):
    arch, model, logits, cache = cached
    with torch.no_grad():
        out = model(TOKENS, stop_at_layer=2)
    assert torch.equal(out, cache["resid_pre", 2])
    assert torch.equal(model(TOKENS, stop_at_layer=model.cfg.n_layers), cache["resid_post", model.cfg.n_layers - 1])


def test_run_from_any_block_reproduces_logits(cached):
    """Running blocks L.. from the cached stream entering L gives the model's logits (the patching engine's path)."""
    arch, model, logits, cache = cached
    with torch.no_grad():
        for layer in (0, 1, model.cfg.n_layers - 1):
            close(model.run_from(layer, cache["resid_pre", layer]), logits, tol=1e-5)
