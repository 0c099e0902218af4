"""Steering and projection hooks: add a direction to an activation, or remove it.

``steer``: ``x + alpha d`` at every position (Turner et al. 2023, "Activation Addition");
``project out``: ``x - (x . d) d`` with ``d`` normalised (the directional ablation of
Arditi et al. 2024). Use them with ``model.run_with_hooks`` or ``model.generate(fwd_hooks=...)``;
directions come from probes (:attr:`Probe.direction`), SAE decoders or differences of means.
"""

from __future__ import annotations

from typing import Callable

import torch


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
