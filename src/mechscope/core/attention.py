"""The attention function that hosts the attention-internal hook points.

transformers routes every attention call of the supported families through
``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]`` with the post-rotary query and key
``[batch, head, pos, d_head]``, the value ``[batch, kv_head, pos, d_head]``, the mask and the
scaling. We register two implementations, ``mechscope_sdpa`` and ``mechscope_eager``, that
delegate to HF's own ``sdpa`` or the family's own eager function when no attention-internal hook
is active at that layer, so an unhooked forward pass is HF's to the bit.

When ``hook_attn_scores`` or ``hook_pattern`` is active at a layer, that layer runs the eager
computation here (the only way to see the pattern)::

    scores  = softcap(q k^T * scaling) + mask        # hook_attn_scores [batch, head, q, k]
    pattern = softmax(scores)                        # hook_pattern     [batch, head, q, k]
                                                     #   (gpt-oss: softmax over [scores, sink], sink dropped)
    z       = pattern @ v                            # hook_z           [batch, q, head, d_head]

Masked entries of ``hook_attn_scores`` hold the dtype's most negative number (HF's additive
mask), not ``-inf``. Comparing a layer computed eagerly against HF's ``sdpa`` shows ~1e-6 of
fp32 drift from kernel reordering; compare against HF with ``attn_implementation="eager"``
for bit equality.
"""

from __future__ import annotations

import sys

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask, sdpa_mask

from .hookpoints import NEEDS_ATTN_FN

OWNER_ATTR = "_mechscope_owner"
IMPLEMENTATIONS = {"sdpa": "mechscope_sdpa", "eager": "mechscope_eager"}


def _family_eager(module):
    """The eager attention function defined in the module's own modeling file."""
    mod = sys.modules.get(type(module).__module__)
    fn = getattr(mod, "eager_attention_forward", None)
    if fn is None:  # pragma: no cover - every supported family defines one
        raise RuntimeError(f"{type(module).__name__} has no eager_attention_forward")
    return fn


def _additive_mask(mask, q_len: int, k_len: int, dtype, device):
    """HF eager's additive float mask from an sdpa boolean mask (or None: plain causal)."""
    minv = torch.finfo(dtype).min
    if mask is None:
        q_pos = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)
        keep = torch.arange(k_len, device=device)[None, :] <= q_pos
        return torch.where(keep, 0.0, minv).to(dtype)[None, None]
    if mask.dtype == torch.bool:
        return torch.where(mask, torch.tensor(0.0, dtype=dtype, device=device), minv)
    return mask


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """``[batch, kv_head, pos, d]`` -> ``[batch, kv_head * n_rep, pos, d]``; head h reads kv head h // n_rep."""
    if n_rep == 1:
        return x
    b, kv, s, d = x.shape
    return x[:, :, None].expand(b, kv, n_rep, s, d).reshape(b, kv * n_rep, s, d)


def _softmax_with_sinks(scores: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """``softmax([scores, sink])`` without the sink's column, in HF's order of operations (its rows sum to < 1)."""
    s = sinks.reshape(1, -1, 1, 1).expand(scores.shape[0], -1, scores.shape[-2], -1)
    combined = torch.cat([scores, s.to(scores.dtype)], dim=-1)
    combined = combined - combined.max(dim=-1, keepdim=True).values
    return torch.softmax(combined, dim=-1, dtype=combined.dtype)[..., :-1]


def _make(base: str):
    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        owner = getattr(module, OWNER_ATTR, None)
        active = owner.manager.active_by_layer.get(owner.layer) if owner is not None else None
        base_fn = sdpa_attention_forward if base == "sdpa" else _family_eager(module)
        if not active or not active & NEEDS_ATTN_FN:
            return base_fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        fire, prefix = owner.manager.fire, f"blocks.{owner.layer}."
        if "attn.hook_rot_q" in active:
            query = fire(prefix + "attn.hook_rot_q", query.transpose(1, 2)).transpose(1, 2)
        if "attn.hook_rot_k" in active:
            key = fire(prefix + "attn.hook_rot_k", key.transpose(1, 2)).transpose(1, 2)
        if "attn.hook_attn_scores" in active or "attn.hook_pattern" in active:
            if scaling is None:
                scaling = query.shape[-1] ** -0.5
            n_rep = query.shape[1] // key.shape[1]
            k, v = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
            scores = torch.matmul(query, k.transpose(2, 3)) * scaling
            softcap = kwargs.get("softcap")
            if softcap is not None:
                scores = torch.tanh(scores / softcap) * softcap
            scores = scores + _additive_mask(attention_mask, query.shape[2], k.shape[2], scores.dtype, scores.device)
            scores = fire(prefix + "attn.hook_attn_scores", scores)
            sinks = kwargs.get("s_aux")
            if sinks is not None:  # gpt-oss: a learned logit per head joins each softmax, then is dropped
                pattern = _softmax_with_sinks(scores, sinks)
            else:
                pattern = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
            pattern = fire(prefix + "attn.hook_pattern", pattern)
            if dropout and module.training:
                pattern = torch.nn.functional.dropout(pattern, p=dropout, training=True)
            out = torch.matmul(pattern, v).transpose(1, 2).contiguous()
            weights = pattern
        else:
            out, weights = base_fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        if "attn.hook_z" in active:
            out = fire(prefix + "attn.hook_z", out)
        if "attn.hook_result" in active:
            owner.manager.state.z[owner.layer] = out
        return out, weights

    attention.__name__ = f"mechscope_{base}_attention"
    return attention


_REGISTERED = False


def register() -> None:
    """Register ``mechscope_sdpa``/``mechscope_eager`` with transformers (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    for base, name in IMPLEMENTATIONS.items():
        AttentionInterface.register(name, _make(base))
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask if base == "sdpa" else eager_mask)
    _REGISTERED = True


class Owner:
    """Links an HF attention module to the hook manager and its layer index."""

    __slots__ = ("manager", "layer")

    def __init__(self, manager, layer: int):
        self.manager, self.layer = manager, layer
