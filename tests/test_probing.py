"""Probes: exact on planted signals, control tasks, directions (the default model's probe against its control task is checked
in the demo's test, tests/test_workflows.py)."""

import pytest
import torch

from mechscope import HookedModel
from mechscope.techniques.probing import control_labels, train_probe
from mechscope.techniques.steering import projection_ablation_hook, steering_hook
from tiny import tiny_hf


def test_probe_recovers_planted_direction():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(600, 20, generator=g)
    w = torch.zeros(20)
    w[3] = 1.0
    y = (X @ w > 0).long()
    p = train_probe(X[:400], y[:400])
    assert p.score(X[400:], y[400:]) > 0.95
    assert abs(float(p.direction[3])) > 0.9 and float(p.direction[3]) > 0
    r = train_probe(X[:400], X[:400] @ w * 2 + 1, kind="ridge", l2=1e-6)
    assert r.score(X[400:], X[400:] @ w * 2 + 1) > 0.999
    with pytest.raises(ValueError, match="examples"):
        train_probe(X, y[:10])


def test_control_labels_are_per_type():
    toks = torch.tensor([[1, 2, 1, 3], [2, 2, 3, 1]])
    lab = torch.tensor([[0, 1, 1, 0], [1, 0, 0, -1]])
    c = control_labels(toks, lab, seed=0)
    assert c[1, 3] == -1
    for t in (1, 2, 3):
        vals = {int(v) for v, m in zip(c[toks == t], lab[toks == t]) if m >= 0}
        assert len(vals) <= 1


def test_steering_and_projection_hooks():
    model = HookedModel(tiny_hf("llama"))
    d = torch.randn(32)
    toks = torch.randint(0, 97, (2, 5))
    _, cache = model.run_with_cache(toks, names_filter="blocks.1.hook_resid_post")
    seen = {}

    def grab(act, hook):
        seen["x"] = act.detach()

    with model.hooks([("blocks.1.hook_resid_post", projection_ablation_hook(d)), ("blocks.1.hook_resid_post", grab)]):
        model(toks)
    assert torch.allclose(seen["x"] @ (d / d.norm()), torch.zeros(2, 5), atol=1e-5)
    with model.hooks([("blocks.1.hook_resid_post", steering_hook(d, 2.0)), ("blocks.1.hook_resid_post", grab)]):
        model(toks)
    torch.testing.assert_close(seen["x"], cache["resid_post", 1] + 2.0 * d)




def test_probe_activations_stop_after_the_deepest_hook():
    """The activations a probe reads come from a pass that stops after the deepest hook (no later block, no
    unembedding), and equal a full pass's."""
    from mechscope.techniques.probing import _activations
    from tiny import V

    model = HookedModel(tiny_hf("llama"))
    toks = torch.randint(0, V, (5, 8), generator=torch.Generator().manual_seed(0))
    hooks = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_z"]
    ran = []
    hs = [b.register_forward_hook(lambda *a, _i=i: ran.append(_i)) for i, b in enumerate(model.parts.layers)]
    got = _activations(model, toks, hooks, None)
    for h in hs:
        h.remove()
    assert 2 not in ran and 1 in ran
    _, cache = model.run_with_cache(toks, names_filter=hooks)
    for h in hooks:
        torch.testing.assert_close(got[h], cache[h].float())
