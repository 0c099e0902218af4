"""The hook API: names, errors, lifecycle, backward hooks, cache shorthand."""

import pytest
import torch

from mechscope import HookedModel, act_name
from tiny import V, tiny_hf

TOKENS = torch.randint(0, V, (2, 6), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def model():
    return HookedModel(tiny_hf("llama", "eager"))


def test_hook_names_listed_and_unknown_suggests(model):
    assert "blocks.0.hook_resid_pre" in model.hook_names
    assert "blocks.2.attn.hook_rot_q" in model.hook_names
    assert "ln_final.hook_normalized" in model.hook_names
    with pytest.raises(KeyError) as e:
        model.run_with_cache(TOKENS, names_filter="blocks.0.hook_resid_prre")
    assert "blocks.0.hook_resid_pre" in str(e.value)
    with pytest.raises(KeyError, match="Did you mean"):
        model.run_with_hooks(TOKENS, fwd_hooks=[("blocks.1.attn.hook_patern", lambda a, h: None)])


def test_hooks_removed_after_exception(model):
    def boom(act, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        model.run_with_hooks(TOKENS, fwd_hooks=[("blocks.1.hook_resid_pre", boom)])
    assert not model.manager._installed and not model.manager._entries
    assert all(not b._forward_pre_hooks for b in model.parts.layers)
    model(TOKENS)  # runs clean


def test_context_keeps_user_hooks(model):
    seen = []
    handle = model.add_hook("blocks.0.hook_mlp_out", lambda a, h: seen.append(h.name))
    with model.hooks([("blocks.0.hook_mlp_out", lambda a, h: None)]):
        model(TOKENS)
    model(TOKENS)
    assert seen == ["blocks.0.hook_mlp_out"] * 2
    handle.remove()
    model(TOKENS)
    assert len(seen) == 2


def test_filter_and_hook_point(model):
    layers = []
    model.run_with_hooks(TOKENS, fwd_hooks=[(lambda n: n.endswith("hook_z"), lambda a, h: layers.append(h.layer()))])
    assert layers == list(range(model.cfg.n_layers))


def test_bad_return_shape_is_clear(model):
    with pytest.raises(ValueError, match="same shape"):
        model.run_with_hooks(TOKENS, fwd_hooks=[("blocks.0.hook_attn_out", lambda a, h: a[:, :1])])


def test_backward_hooks_give_gradients(model):
    grads = {}

    def save(g, hook):
        grads[hook.name] = g.detach()

    names = ["blocks.1.hook_resid_pre", "blocks.1.hook_resid_mid", "blocks.1.attn.hook_pattern",
             "blocks.1.attn.hook_z"]
    with model.hooks(bwd_hooks=[(n, save) for n in names]):
        logits = model(TOKENS)
        logits[:, -1, 5].sum().backward()
    assert set(grads) == set(names)
    # check resid_pre's gradient against autograd on a leaf patched in at the same point
    leaf = {}

    def make_leaf(act, hook):
        leaf["x"] = act.detach().requires_grad_(True)
        return leaf["x"]

    model.hf.zero_grad()
    out = model.run_with_hooks(TOKENS, fwd_hooks=[("blocks.1.hook_resid_pre", make_leaf)])
    out[:, -1, 5].sum().backward()
    torch.testing.assert_close(leaf["x"].grad, grads["blocks.1.hook_resid_pre"])
    assert not model.manager._entries


def test_cache_shorthand(model):
    _, cache = model.run_with_cache(TOKENS, names_filter=["blocks.1.hook_resid_post", "blocks.0.attn.hook_pattern",
                                                          "blocks.2.ln1.hook_normalized"])
    assert cache["resid_post", 1] is cache["blocks.1.hook_resid_post"]
    assert cache["pattern", 0].shape == (2, 4, 6, 6)
    assert cache["normalized", 2, "ln1"] is cache["blocks.2.ln1.hook_normalized"]
    assert act_name("resid_post", -1, n_layers=3) == "blocks.2.hook_resid_post"
    with pytest.raises(KeyError, match="not recorded"):
        cache["resid_pre", 0]
    assert len(cache) == 3


def test_default_cache_skips_result_and_pos_slice(model):
    _, cache = model.run_with_cache(TOKENS)
    assert "blocks.0.attn.hook_result" not in cache.keys()
    _, last = model.run_with_cache(TOKENS, names_filter=["blocks.0.hook_resid_post", "blocks.0.attn.hook_pattern"],
                                   pos_slice=-1)
    assert last["resid_post", 0].shape == (2, 1, 32)
    assert last["pattern", 0].shape == (2, 4, 1, 6)
    torch.testing.assert_close(last["resid_post", 0][:, 0], cache["resid_post", 0][:, -1])


def test_accumulated_resid_and_logit_lens_identity(model):
    logits, cache = model.run_with_cache(TOKENS)
    stack, labels = cache.accumulated_resid(apply_ln=True, return_labels=True)
    assert labels[-1] == "final_post" and stack.shape[0] == model.cfg.n_layers + 1
    torch.testing.assert_close(model.unembed(stack[-1]), logits, atol=1e-5, rtol=1e-5)


def test_mismatched_mask_and_bad_tokens(model):
    with pytest.raises(ValueError, match="attention_mask shape"):
        model(TOKENS, attention_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"\[batch, pos\]"):
        model(torch.zeros(1, 2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="stop_at_layer"):
        model(TOKENS, stop_at_layer=9)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "phi3", "gemma3"])
def test_backward_hooks_fire_on_every_hook_point(arch):
    """Every hook point that the logits depend on gets its gradient, including those fired on views
    (q/k/v of separate or fused projections, fused gate/up), and the gradient matches a leaf patched in."""
    from tiny import tiny_hf as make

    m = HookedModel(make(arch, "eager"))
    skip = {"hook_pos_embed"} if "hook_pos_embed" not in m.hook_names else set()
    names = [n for n in m.hook_names if n not in skip and not n.endswith("hook_attn_scores")]
    grads = {}

    def save(g, hook):
        grads[hook.name] = g.detach()

    with m.hooks(bwd_hooks=[(n, save) for n in names]):
        m(TOKENS)[:, -1, 5].sum().backward()
    missing = [n for n in names if n not in grads]
    assert not missing, missing
    for name in ("blocks.1.attn.hook_q", "blocks.1.attn.hook_v", "blocks.1.mlp.hook_pre"):
        leaf = {}

        def make_leaf(act, hook):
            leaf["x"] = act.detach().requires_grad_(True)
            return leaf["x"]

        m.run_with_hooks(TOKENS, fwd_hooks=[(name, make_leaf)])[:, -1, 5].sum().backward()
        torch.testing.assert_close(leaf["x"].grad, grads[name], msg=name)
    # logits are unchanged by backward hooks on view-based points
    with m.hooks(bwd_hooks=[(n, save) for n in names]):
        torch.testing.assert_close(m(TOKENS), m.hf(TOKENS).logits)
