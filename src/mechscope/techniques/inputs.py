"""Inputs shared by the techniques: equal-length prompt pairs, answer ids and metric values.

Techniques that read fixed positions (patching, ablation, attribution patching, EAP) need
prompts of one token length within a batch; these helpers give a clear error when they differ.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..core.errors import InputError, InputTypeError
from ..core.model import HookedModel
from ..core.types import Answer, TextOrTokens


def equal_length_tokens(model: HookedModel, x: TextOrTokens, purpose: str = "patching") -> torch.Tensor:
    """Text, texts or tokens -> ``[batch, pos]`` on the model's device; a clear error when texts differ in length."""
    if isinstance(x, torch.Tensor):
        return (x[None] if x.dim() == 1 else x).to(model.device)
    if not isinstance(x, (str, list, tuple)):
        raise InputTypeError(f"{purpose} takes text, a list of texts or tokens [batch, pos]; got {type(x).__name__}")
    tokens, mask = model.tokenize(x)
    if not bool(mask.all()):
        raise InputError(f"{purpose} needs prompts of one token length within a batch (it reads fixed positions); "
                         f"got lengths {mask.sum(-1).tolist()}")
    return tokens


def prompt_pair(model: HookedModel, clean: TextOrTokens, corrupted: TextOrTokens) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens for a clean/corrupted pair (text or tokens); an error showing both when lengths differ."""
    a, b = equal_length_tokens(model, clean), equal_length_tokens(model, corrupted)
    if a.shape != b.shape:
        def show(t):
            return model.to_str_tokens(t[0]) if model.tokenizer is not None else t[0].tolist()

        raise InputError(
            f"clean and corrupted prompts must have the same token length; got {tuple(a.shape)} and "
            f"{tuple(b.shape)}.\n  clean:     {show(a)}\n  corrupted: {show(b)}"
        )
    return a, b


def answer_ids(model: HookedModel, x: Answer, n: int) -> torch.Tensor:
    """Answers (single-token strings or ids; one, or one per prompt) -> ``[n]`` ids on the model's device."""
    if isinstance(x, str):
        x = [x]
    if isinstance(x, (list, tuple)):
        x = [model.to_single_token(t) if isinstance(t, str) else int(t) for t in x]
    t = torch.as_tensor(x, dtype=torch.long).reshape(-1)
    if t.numel() == 1:
        t = t.expand(n)
    if t.numel() != n:
        raise InputError(f"expected one answer per prompt ({n}), got {t.numel()}")
    if bool(((t < 0) | (t >= model.cfg.d_vocab)).any()):
        raise InputError(f"answer ids must be in 0..{model.cfg.d_vocab - 1}, got {t.tolist()}")
    return t.to(model.device)


def metric_value(v: object, n: int) -> torch.Tensor:
    """A metric's output as a float tensor: a scalar or ``[n]`` (one per prompt); an error otherwise."""
    v = torch.as_tensor(v).detach().float()
    if v.dim() > 1 or (v.dim() == 1 and v.shape[0] not in (1, n)):
        raise InputError(f"the metric must return a scalar or one value per prompt ([{n}]), got shape {tuple(v.shape)}")
    return v


def check_range(what: str, values: Sequence[int] | None, limit: int) -> list[int]:
    """``values`` (or all of ``0..limit-1`` when None) as a list, each checked to lie in ``0..limit-1``."""
    if values is None:
        return list(range(limit))
    out = [int(v) for v in values]
    bad = [v for v in out if not 0 <= v < limit]
    if bad:
        raise InputError(f"{what} {bad} out of range: valid {what} are 0..{limit - 1}")
    return out
