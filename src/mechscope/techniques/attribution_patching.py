"""Attribution patching: a first-order estimate of every activation patch at once.

``metric(patched) ~ metric(base) + (a_source - a_base) . d metric / d a |base`` for every layer,
position and head (Nanda 2023, "Attribution Patching"; Syed et al. 2023). One forward and one
backward pass on the base run and one forward pass on the source run, whatever the number of
patches. The sites come from the hook-point registry (:data:`mechscope.core.hookpoints.ATTRIB_SITES`).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..core.errors import InputError, UnknownNameError
from ..core.hookpoints import ATTRIB_SITES, block_name
from ..core.model import HookedModel
from ..core.types import Metric, TextOrTokens
from ..core.work import add_floor
from .inputs import PreparedPair, as_pair, prompt_positions_only
from .patching import PatchResult, label_result


def _base_gradients(model, base_t, metric, names: list[str], keep: int) -> tuple[dict, dict, torch.Tensor]:
    """Activations and metric gradients at ``names`` on the base run: ``(acts, grads, metric value)``."""
    acts, grads = {}, {}

    def save(act, hook):
        acts[hook.name] = act.detach()

    def keep_grad(g, hook):
        grads[hook.name] = g.detach()

    def leaf(act, hook):  # the graph starts at the embedding: no weight gradients are computed
        return act.detach().requires_grad_(True)

    add_floor(base_t.numel() * model.cfg.n_layers)  # the one forward (with its backward) the gradients need
    params = [p for p in model.hf.parameters() if p.requires_grad]
    try:
        for prm in params:
            prm.requires_grad_(False)
        with torch.enable_grad(), model.hooks([("hook_embed", leaf)] + [(x, save) for x in names],
                                              [(x, keep_grad) for x in names]):
            value = torch.as_tensor(metric(model(base_t, logits_to_keep=keep)))
            value.sum().backward()
    finally:
        for prm in params:
            prm.requires_grad_(True)
    return acts, grads, value.detach()


def _site_grid(site: str, deltas: list[torch.Tensor], per_position: bool) -> torch.Tensor:
    """Per-layer first-order effects ``(a_src - a_base) * grad`` summed to the site's grid, mean over prompts."""
    per_layer = []
    for d in deltas:
        if site == "pattern":  # [N, head, q, k]
            e = d.sum(-1).permute(0, 2, 1) if per_position else d.sum((-1, -2))
        elif site in ("z", "q", "k", "v"):  # [N, pos, head, d_head]
            e = d.sum(-1) if per_position else d.sum((1, -1))
        elif site == "post":  # neurons, summed over positions
            e = d.sum(1)
        else:  # [N, pos, d_model]
            e = d.sum(-1)
        per_layer.append(e.mean(0).cpu())
    return torch.stack(per_layer)


def _axes(site: str, grid: torch.Tensor, n_layers: int, P: int, per_position: bool) -> tuple[tuple, dict]:
    layers = [str(l) for l in range(n_layers)]
    if site in ("z", "q", "k", "v", "pattern"):
        hk = "kv_head" if site in ("k", "v") else "head"
        axes = ("layer", "pos", hk) if per_position else ("layer", hk)
        return axes, {"layer": layers, "pos": list(range(P)), hk: [str(h) for h in range(grid.shape[-1])]}
    if site == "post":
        return ("layer", "neuron"), {"layer": layers, "neuron": list(range(grid.shape[1]))}
    return ("layer", "pos"), {"layer": layers, "pos": list(range(P))}


def attribution_patch(model: HookedModel, clean: TextOrTokens | PreparedPair, corrupted: TextOrTokens | None = None,
                      metric: Metric | None = None, sites: Sequence[str] = ("resid_pre", "attn_out", "mlp_out", "z"),
                      direction: str = "denoise", per_position: bool = False) -> dict[str, PatchResult]:
    """Estimate every patch at ``sites`` at once; see the module docstring.

    Returns ``{site: PatchResult}`` with the axes of :func:`mechscope.techniques.patching.patch`
    (``[layer, pos]`` for residual sites; ``[layer, head]``, or ``[layer, pos, head]`` with
    ``per_position``, for ``z q k v pattern``; ``[layer, d_mlp]`` neurons for ``post``). The
    metric must be differentiable and return a scalar or one value per prompt. ``clean`` may be a
    :class:`~mechscope.techniques.inputs.PreparedPair` alone: the source run is then its (shared) run.
    """
    if direction not in ("denoise", "noise"):
        raise InputError(f"direction must be 'denoise' or 'noise', got {direction!r}")
    unknown = [s for s in sites if s not in ATTRIB_SITES]
    if unknown:
        raise UnknownNameError(f"unknown attribution sites {unknown}; use {sorted(ATTRIB_SITES)}")
    pair = as_pair(model, clean, corrupted, metric)
    metric, clean_t, corr_t = pair.metric, pair.clean, pair.corrupted
    P, n = clean_t.shape[1], model.cfg.n_layers
    base_t = corr_t if direction == "denoise" else clean_t
    names = [block_name(l, ATTRIB_SITES[s]) for s in sites for l in range(n)]
    src_logits, src = pair.run("clean" if direction == "denoise" else "corrupted", names)
    keep = pair.keep
    acts, grads, value = _base_gradients(model, base_t, metric, names, keep)
    base_value = float(value.float().mean())
    src_value = float(torch.as_tensor(metric(src_logits)).detach().float().mean())
    clean_v, corr_v = (src_value, base_value) if direction == "denoise" else (base_value, src_value)
    out = {}
    for s in sites:
        layer_names = [block_name(l, ATTRIB_SITES[s]) for l in range(n)]
        deltas = [prompt_positions_only(pair, (src[x] - acts[x]).float()) * grads[x].float() for x in layer_names]
        grid = base_value + _site_grid(s, deltas, per_position)
        axes, labels = _axes(s, grid, n, P, per_position)
        out[s] = label_result(
            PatchResult(f"{s} (attribution)", direction, grid, axes, labels, clean_v, corr_v,
                        stats={"method": "attribution patching", "forward_passes": 2, "backward_passes": 1}),
            model, clean_t, corr_t, metric)
    return out
