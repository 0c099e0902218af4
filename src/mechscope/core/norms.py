"""Normalisation layers as frozen-scale linear maps.

Every norm mechscope supports is linear in its input once the per-position scale is fixed:

    norm(x) = center(x) * scale(x) * gain + bias

with ``center`` the mean subtraction (LayerNorm only), ``scale = 1/sqrt(var + eps)``
(LayerNorm) or ``1/sqrt(mean(x^2) + eps)`` (RMSNorm), ``gain = w`` (or ``1 + w`` for Gemma),
and ``bias`` only for LayerNorm. Freezing ``scale`` from the actual forward pass is the
standard linearisation used by direct logit attribution (Elhage et al. 2021, "A Mathematical
Framework for Transformer Circuits"): the parts of a residual stream then pass through the
norm separately, and their images sum to the norm's output (minus ``bias``) exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .placement import param


@dataclass
class NormSpec:
    kind: str  # "layernorm" | "layernorm_plus_one" (Nemotron) | "rms" | "rms_plus_one" (Gemma)
    module: torch.nn.Module
    default_eps: float | None = None  # for norms whose epsilon lives in code, not on the module (OLMo)

    @property
    def centers(self) -> bool:
        """Whether the norm subtracts the mean (the LayerNorm kinds)."""
        return self.kind.startswith("layernorm")

    @property
    def eps(self) -> float:
        for attr in ("eps", "variance_epsilon", "epsilon"):
            if getattr(self.module, attr, None) is not None:
                return float(getattr(self.module, attr))
        if self.default_eps is not None:
            return self.default_eps
        raise AttributeError(f"cannot find epsilon on {type(self.module).__name__}")

    @property
    def gain(self) -> torch.Tensor:
        """``[d_model]``: the multiplicative weight actually applied (ones for a norm without weights: OLMo)."""
        w = param(self.module)
        if w is None:
            shape = getattr(self.module, "normalized_shape", None) or (self.module.hidden_size,)
            return torch.ones(tuple(shape)[-1])
        return (1.0 + w.float()).to(w.dtype) if self.kind.endswith("plus_one") else w

    @property
    def bias(self) -> torch.Tensor | None:
        """``[d_model]`` or None: the additive bias (LayerNorm kinds only)."""
        return param(self.module, "bias") if self.centers else None

    def center(self, x: torch.Tensor) -> torch.Tensor:
        """Mean subtraction over ``d_model`` for LayerNorm; identity for RMSNorm."""
        return x - x.mean(-1, keepdim=True) if self.centers else x

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., 1]``: the per-position factor the norm multiplies by, computed in fp32."""
        xf = x.float()
        if self.centers:
            var = xf.var(-1, keepdim=True, unbiased=False)
        else:
            var = xf.pow(2).mean(-1, keepdim=True)
        return torch.rsqrt(var + self.eps)

    def apply_frozen(self, parts: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Linear part of the norm with a frozen scale: ``center(parts) * scale * gain``.

        ``parts`` is ``[..., d_model]``; ``scale`` broadcasts against it (``[..., 1]``).
        The bias is not added: it is a separate, constant term.
        """
        out = self.center(parts.float()) * scale.to(parts.device).float() * self.gain.to(parts.device).float()
        return out.to(parts.dtype)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The norm of ``x`` computed from its parts, ``center(x) * scale(x) * gain + bias``, without calling the
        module (so no hook of the module fires: safe inside that hook)."""
        y = self.apply_frozen(x, self.scale(x))
        return y + self.bias.to(y.dtype) if self.bias is not None else y

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)
