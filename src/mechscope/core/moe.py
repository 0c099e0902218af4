"""Mixture-of-experts hook sites: the router, the experts and the shared expert.

An MoE block (Shazeer et al. 2017; Mixtral, Jiang et al. 2024) routes each token to its top-k
experts and sums their outputs weighted by the router::

    logits  = router(x)                                      # hook_router_logits  [batch, pos, expert]
    weights, indices = route(logits)                         # hook_expert_weights / hook_expert_indices [.., top_k]
    mlp_out = sum_k weights_k * expert_{indices_k}(x)        # hook_expert_out     [batch, pos, top_k, d_model]
              (+ sigmoid(g(x)) * shared(x))                  # hook_shared_expert_out, hook_shared_expert_gate

HF's router returns ``(logits, weights, indices)`` and its experts module takes
``(x [T, d], indices [T, k], weights [T, k])``, so each hook site wraps one of them. When a hook
edits the logits or probabilities, the token is routed again with the family's own rule
(:func:`route`); expert outputs are computed on demand by calling HF's experts module once per
slot with that slot's expert and weight 1, so the expert maths is always HF's own.
"""

from __future__ import annotations

from typing import Callable

import torch

from .hookpoints import block_name
from .hooks import HookManager

ROUTING = ("softmax_topk", "topk_softmax", "sigmoid_topk")


def router_probs(logits: torch.Tensor, rule: str) -> torch.Tensor:
    """The router's distribution over experts, in float32: softmax of the logits (sigmoid for sigmoid routers)."""
    return torch.sigmoid(logits.float()) if rule == "sigmoid_topk" else torch.softmax(logits.float(), dim=-1)


def route(probs: torch.Tensor, top_k: int, rule: str, renorm: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights, indices)`` ``[..., top_k]`` from router probabilities, by the family's rule.

    ``softmax_topk``/``sigmoid_topk``: the top-k probabilities, renormalised to sum to 1 when the router
    does so (``norm_topk_prob``); ``topk_softmax`` (gpt-oss, GraniteMoE): a softmax over the top-k logits,
    which equals the top-k probabilities renormalised.
    """
    w, i = torch.topk(probs, top_k, dim=-1)
    if renorm or rule == "topk_softmax":
        w = w / w.sum(dim=-1, keepdim=True)
    return w, i


def install_router(manager: HookManager, router: torch.nn.Module, layer: int, rule: str, top_k: int,
                   rows: Callable[[], tuple[int, int]]) -> list:
    """The forward hook on a router: logits, probabilities, chosen experts and their weights, each editable."""
    names = {s: block_name(layer, f"mlp.hook_{s}") for s in ("router_logits", "router_probs", "expert_indices",
                                                              "expert_weights")}
    renorm = bool(getattr(router, "norm_topk_prob", True))

    def fire(short: str, t: torch.Tensor) -> torch.Tensor:
        return manager.fire(names[short], t) if manager.is_active(names[short]) else t

    def hook(module, args, output):
        logits, weights, indices = output[:3]
        b, p = rows()
        L = logits.view(b, p, -1)
        new_L = fire("router_logits", L)
        probs = router_probs(new_L, rule) if manager.is_active(names["router_probs"]) or new_L is not L else None
        if new_L is not L:  # edited logits: route again
            logits = new_L.reshape(logits.shape).to(logits.dtype)
            w, i = route(probs, top_k, rule, renorm)
            weights, indices = w.reshape(weights.shape).to(weights.dtype), i.reshape(indices.shape)
        if probs is not None:
            new_P = fire("router_probs", probs)
            if new_P is not probs:
                w, i = route(new_P, top_k, rule, renorm)
                weights, indices = w.reshape(weights.shape).to(weights.dtype), i.reshape(indices.shape)
        I, W = indices.view(b, p, -1), weights.view(b, p, -1)
        new_I, new_W = fire("expert_indices", I), fire("expert_weights", W)
        indices, weights = new_I.reshape(indices.shape), new_W.reshape(weights.shape).to(weights.dtype)
        if all(x is y for x, y in zip((logits, weights, indices), output[:3])):
            return None
        return (logits, weights, indices) + tuple(output[3:])

    return [router.register_forward_hook(hook)]


def expert_outputs(experts: torch.nn.Module, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``[T, top_k, d]``: each chosen expert's output for each token, computed by HF's experts module itself
    (one call per slot, with that slot's expert and weight 1; ``forward`` directly, so no hook re-fires)."""
    ones = torch.ones(indices.shape[0], 1, dtype=x.dtype, device=x.device)
    return torch.stack([experts.forward(x, indices[:, j:j + 1], ones) for j in range(indices.shape[1])], dim=1)


def install_experts(manager: HookManager, experts: torch.nn.Module, layer: int,
                    rows: Callable[[], tuple[int, int]]) -> list:
    """The forward hook on the experts module: ``hook_expert_out``; an edit replaces the output by
    ``sum_k weights_k * expert_out_k``."""
    name = block_name(layer, "mlp.hook_expert_out")

    def hook(module, args, output):
        if not manager.is_active(name):
            return None
        x, indices, weights = args[0], args[1], args[2]
        outs = expert_outputs(module, x, indices)
        b, p = rows()
        view = outs.view(b, p, *outs.shape[1:])
        new = manager.fire(name, view)
        if new is view and not manager.has_backward(name):
            return None
        new = new.reshape(outs.shape)
        return (new * weights[..., None].to(new.dtype)).sum(1).to(output.dtype)

    return [experts.register_forward_hook(hook)]
