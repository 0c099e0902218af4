"""Mixture-of-experts blocks: their hook points, identities, routing edits, and expert-level techniques."""

import pytest
import torch

from mechscope import HookedModel
from mechscope.core.errors import InputError
from mechscope.core.moe import route, router_probs
from tiny import MOE_CONFIGS, V, tiny_hf

TOKENS = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(7))
MOE = list(MOE_CONFIGS)


@pytest.fixture(scope="module", params=MOE)
def moe(request):
    model = HookedModel(tiny_hf(request.param, "eager"))
    with torch.no_grad():
        logits, cache = model.run_with_cache(TOKENS, names_filter=lambda n: True)
    return request.param, model, logits, cache


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def test_experts_sum_to_the_mlp_output(moe):
    arch, model, logits, cache = moe
    c = model.cfg
    assert c.n_experts == 4 and c.top_k == 2 and c.moe_layers
    for l in c.moe_layers:
        out, w = cache["expert_out", l], cache["expert_weights", l]
        assert out.shape == (*TOKENS.shape, c.top_k, c.d_model) and cache["expert_indices", l].dtype == torch.long
        total = (out * w[..., None].to(out.dtype)).sum(-2)
        if ("shared_expert_out", l) in cache:
            shared = cache["shared_expert_out", l]
            if ("shared_expert_gate", l) in cache:
                shared = shared * torch.sigmoid(cache["shared_expert_gate", l])
            total = total + shared
        close(total * c.residual_scale, cache["mlp_out", l])


def test_router_hooks_agree_with_the_routing_rule(moe):
    arch, model, logits, cache = moe
    for l in model.cfg.moe_layers:
        probs = cache["router_probs", l]
        close(probs, router_probs(cache["router_logits", l], model.cfg.moe_routing))
        renorm = bool(getattr(model.parts.moe_part(l, "router"), "norm_topk_prob", True))
        w, i = route(probs, model.cfg.top_k, model.cfg.moe_routing, renorm)
        assert torch.equal(i.sort(-1).values, cache["expert_indices", l].sort(-1).values)
        close(w.sort(-1).values, cache["expert_weights", l].float().sort(-1).values)


def test_editing_every_moe_hook_changes_the_output(moe):
    arch, model, logits, cache = moe
    l = model.cfg.moe_layers[-1]
    edits = {"router_logits": lambda a, h: a.flip(-1), "router_probs": lambda a, h: a.flip(-1),
             "expert_indices": lambda a, h: (a + 1) % model.cfg.n_experts, "expert_weights": lambda a, h: a * 0.5,
             "expert_out": lambda a, h: a * 0.5, "shared_expert_out": lambda a, h: a * 0.5,
             "shared_expert_gate": lambda a, h: a - 3.0}
    for short, fn in edits.items():
        name = f"blocks.{l}.mlp.hook_{short}"
        if name not in model.hook_names:
            continue
        with torch.no_grad():
            out = model.run_with_hooks(TOKENS, fwd_hooks=[(name, fn)])
        assert not torch.allclose(out, logits), name


def test_forbidding_an_expert_reroutes_and_forcing_picks_it(moe):
    from mechscope.techniques.steering import expert_routing_hook

    arch, model, logits, cache = moe
    l = model.cfg.moe_layers[0]
    seen = {}

    def grab(a, h):
        seen[h.name] = a.clone()

    name = f"blocks.{l}.mlp.hook_router_logits"
    idx_name = f"blocks.{l}.mlp.hook_expert_indices"
    top = int(cache["expert_indices", l][0, 0, 0])
    with torch.no_grad():
        model.run_with_hooks(TOKENS, fwd_hooks=[(name, expert_routing_hook(forbid=[top])), (idx_name, grab)])
        assert not (seen[idx_name] == top).any()
        model.run_with_hooks(TOKENS, fwd_hooks=[(name, expert_routing_hook(force=[3])), (idx_name, grab)])
        assert (seen[idx_name] == 3).any(-1).all()
    with pytest.raises(InputError, match="forced and forbidden"):
        expert_routing_hook(force=[1], forbid=[1])


def test_zero_ablating_an_expert_equals_zeroing_its_weights(moe):
    """For bias-free experts, removing expert e's output is the same as setting its down projection to zero."""
    from mechscope.techniques.ablation import ablate

    arch, model, logits, cache = moe
    l = model.cfg.moe_layers[0]
    experts = model.parts.moe_part(l, "experts")
    if getattr(experts, "down_proj_bias", None) is not None:
        pytest.skip(f"{arch}'s experts have biases: a zero down projection still outputs the bias")
    e = int(cache["expert_indices", l][0, -1, 0])
    metric = lambda lg: lg[:, -1, 3] - lg[:, -1, 5]  # noqa: E731
    res = ablate(model, TOKENS, metric, [f"L{l}E{e}"], method="zero")
    saved = experts.down_proj.detach().clone()
    with torch.no_grad():
        experts.down_proj[e] = 0.0
        edited = metric(model(TOKENS))
        experts.down_proj.copy_(saved)
    close(res.ablated, edited)
    assert not torch.allclose(res.ablated, res.baseline)
    with pytest.raises(InputError, match="method='zero'"):
        ablate(model, TOKENS, metric, [f"L{l}E{e}"], method="mean")


def test_dla_refines_moe_blocks_into_experts(moe):
    from mechscope.techniques.attribution import direct_logit_attribution

    arch, model, logits, cache = moe
    res = direct_logit_attribution(model, TOKENS, 3, 5)
    assert abs(res.error) < 1e-4
    experts = res.extra["expert_contributions"]  # [layer, expert]
    for l in model.cfg.moe_layers:
        mlp = res.values[res.components.index(f"L{l}.mlp")]
        close(experts[l].sum() + res.extra["mlp_bias"][l], mlp, tol=1e-4)


def test_components_and_patching_the_router(moe):
    from mechscope.core.components import Component
    from mechscope.techniques.patching import patch, patch_naive

    arch, model, logits, cache = moe
    l = model.cfg.moe_layers[0]
    assert str(Component.parse(f"L{l}E3")) == f"L{l}E3"
    with pytest.raises(InputError, match="out of range"):
        Component.parse(f"L{l}E9").validate(model.cfg)
    corrupted = TOKENS.flip(1)
    metric = lambda lg: lg[:, -1, 3] - lg[:, -1, 5]  # noqa: E731
    fast = patch(model, TOKENS, corrupted, metric, site="router_logits")
    assert fast.axes == ("layer", "expert") and fast.values.shape == (len(model.cfg.moe_layers), model.cfg.n_experts)
    slow = patch_naive(model, TOKENS, corrupted, metric, site="router_logits")
    close(fast.values, slow.values)


def test_expert_report_routing_logits_and_ablation(moe):
    from mechscope.circuits.experts import expert_report
    from mechscope.techniques.ablation import ablate

    arch, model, logits, cache = moe
    l = model.cfg.moe_layers[0]
    toks = torch.randint(0, V, (6, 12), generator=torch.Generator().manual_seed(8))
    rep = expert_report(model, l, 1, tokens=toks)
    with torch.no_grad():
        _, c = model.run_with_cache(toks, names_filter=f"blocks.{l}.mlp.hook_expert_indices")
    rate = float((c["expert_indices", l] == 1).any(-1).float().mean())
    assert rep.route_rate == pytest.approx(rate) and rep.n_tokens == toks.numel()
    assert len(rep.promoted) == 10 and rep.promoted[0][1] >= rep.promoted[-1][1]

    def loss(lg):
        return torch.nn.functional.cross_entropy(lg[:, :-1].flatten(0, 1).float(), toks[:, 1:].flatten(),
                                                 reduction="none").view(6, -1).mean(-1)

    direct = ablate(model, toks, loss, [f"L{l}E1"], method="zero")
    assert rep.ablation.value == pytest.approx(float((direct.ablated - direct.baseline).mean()), abs=1e-5)
    assert f"expert L{l}E1" in rep.summary() and "<table>" in rep.to_html()
