"""Steering and projection hooks: add a direction to an activation, or remove it.

``steer``: ``x + alpha d`` at every position (Turner et al. 2023, "Activation Addition");
``project out``: ``x - (x . d) d`` with ``d`` normalised (the directional ablation of
Arditi et al. 2024); for mixtures of experts, :func:`expert_routing_hook` forces or forbids experts
at the router. Use them with ``model.run_with_hooks`` or ``model.generate(fwd_hooks=...)``;
directions come from probes (:attr:`Probe.direction`), SAE decoders or differences of means.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..core.errors import InputError


def steering_hook(direction: torch.Tensor, alpha: float) -> Callable:
    """A forward hook adding ``alpha * direction`` (``[d]``) at every position: ``x + alpha d``."""
    d = direction.detach()

    def hook(act, h):
        return act + alpha * d.to(act.device, act.dtype)

    return hook


def projection_ablation_hook(direction: torch.Tensor) -> Callable:
    """A forward hook removing the component along ``direction``: ``x - (x . d) d`` (``d`` normalised)."""
    d = (direction / direction.norm()).detach()

    def hook(act, h):
        dd = d.to(act.device, act.dtype)
        return act - (act @ dd)[..., None] * dd

    return hook


def expert_routing_hook(force: list[int] | tuple[int, ...] = (), forbid: list[int] | tuple[int, ...] = ()) -> Callable:
    """A hook on ``blocks.L.mlp.hook_router_logits`` that forbids experts (their logit becomes the dtype's minimum)
    and forces experts (their logit rises above every other); the block then routes each token again
    with its own rule, so a forced expert is chosen and a forbidden one never is."""
    force, forbid = list(force), list(forbid)
    if set(force) & set(forbid):
        raise InputError(f"an expert cannot be forced and forbidden at once: {sorted(set(force) & set(forbid))}")

    def hook(logits, h):
        out = logits.clone()
        if forbid:
            out[..., forbid] = torch.finfo(out.dtype).min
        if force:
            top = logits.max(dim=-1, keepdim=True).values
            out[..., force] = top + 1e4 + torch.arange(len(force), 0, -1, dtype=out.dtype, device=out.device)
        return out

    return hook
