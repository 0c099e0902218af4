"""Where the fine-tune wrote: per weight matrix, the norm of ``ΔW = W_ft - W_base`` and its effective rank.

    relative change = ||ΔW||_F / ||W_base||_F
    effective rank  = exp(H(σ / Σσ))      (Roy & Vetterli 2007: the entropy of the normalised singular values)

For a LoRA adapter ``ΔW = s B A`` exactly (rank at most ``r``); for two models, the difference of every two-dimensional
parameter the two share. These are exact numbers (no sampling), so they need no interval; what they cannot say is
whether a change matters for behaviour (the activation methods say that).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.result import Result
from .pair import ModelPair


@dataclass
class ModuleDelta:
    name: str
    shape: tuple[int, int]
    delta_norm: float
    relative: float
    effective_rank: float


@dataclass(repr=False)
class WeightDiff(Result):
    """:class:`ModuleDelta` per changed matrix, largest relative change first; ``unchanged``: how many shared matrices
    are equal to the bit."""

    modules: list[ModuleDelta]
    unchanged: int
    source: str

    def summary(self) -> str:
        lines = [f"weight differences ({self.source}): {len(self.modules)} matrices changed, {self.unchanged} unchanged"]
        for d in self.modules[:12]:
            lines.append(f"  {d.name} {list(d.shape)}: ||ΔW|| {d.delta_norm:.4g} ({d.relative:.2%} of ||W||), "
                         f"effective rank {d.effective_rank:.1f}")
        if self.modules:
            by_layer: dict[str, float] = {}
            for d in self.modules:
                layer = next((p for p in d.name.split(".") if p.isdigit()), "other")
                by_layer[layer] = by_layer.get(layer, 0.0) + d.delta_norm ** 2
            top = max(by_layer, key=by_layer.get)
            lines.append(f"the largest change is in {'layer ' + top if top != 'other' else 'non-layer weights'} "
                         f"({by_layer[top] ** 0.5:.4g} summed Frobenius norm)")
        return "\n".join(lines)


def effective_rank(m: torch.Tensor) -> float:
    """``exp`` of the entropy of ``m``'s normalised singular values (1 for a rank-one matrix, ``min(shape)`` at most)."""
    s = torch.linalg.svdvals(m.double())
    s = s[s > s.max() * 1e-12] if s.numel() and float(s.max()) > 0 else s[:0]
    if not s.numel():
        return 0.0
    p = s / s.sum()
    return float(torch.exp(-(p * p.log()).sum()))


def _real(hf: torch.nn.Module, name: str) -> torch.Tensor | None:
    """Parameter ``name`` of ``hf`` as a real tensor, also when accelerate keeps it offloaded (on ``meta``)."""
    from ..core.placement import param

    mod, _, leaf = name.rpartition(".")
    try:
        return param(hf.get_submodule(mod), leaf)
    except AttributeError:
        return None


@torch.no_grad()
def weight_diff(pair: ModelPair) -> WeightDiff:
    """:class:`WeightDiff` of ``pair``: from the adapter's factors, or from the two models' shared matrices."""
    out, same = [], 0
    if pair.adapter is not None:
        for name in pair.adapter.names:
            d = pair.adapter.delta(name)
            w = _real(pair.base.hf, f"{name}.weight")
            ref = float(w.float().norm()) if w is not None else float("nan")
            out.append(ModuleDelta(name, tuple(d.shape), float(d.norm()), float(d.norm()) / ref if ref else float("nan"),
                                   effective_rank(d)))
        source = f"LoRA adapter, {len(pair.adapter.names)} adapted modules"
    else:
        base = dict(pair.base.hf.named_parameters())
        for name, w0 in pair.ft.hf.named_parameters():
            b0 = base.get(name)
            if b0 is None or b0.dim() != 2 or b0.shape != w0.shape:
                continue
            b, w = _real(pair.base.hf, name), _real(pair.ft.hf, name)  # offloaded weights read from where they live
            d = w.detach().float().cpu() - b.detach().float().cpu()
            if not bool(d.any()):
                same += 1
                continue
            n = float(d.norm())
            out.append(ModuleDelta(name.removesuffix(".weight"), tuple(d.shape), n, n / max(float(b.float().norm()), 1e-30),
                                   effective_rank(d)))
        source = "two models, every shared matrix"
    out.sort(key=lambda m: -m.relative if m.relative == m.relative else 0.0)
    return WeightDiff(out, same, source)
