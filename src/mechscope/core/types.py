"""Type aliases for the arguments techniques take, so that signatures say what they accept."""

from __future__ import annotations

from typing import Any, Callable, Sequence, Union

import torch

#: text, a list of texts, or token ids ``[batch, pos]`` (or ``[pos]``)
TextOrTokens = Union[str, Sequence[str], torch.Tensor]
#: ``metric(logits [batch, pos, d_vocab]) -> scalar or [batch]``
Metric = Callable[[torch.Tensor], torch.Tensor]
#: a user hook ``fn(activation, hook_point) -> tensor or None``
HookFn = Callable[[torch.Tensor, Any], Union[torch.Tensor, None]]
#: a hook name, a list of names, or a predicate over names
NameFilter = Union[str, Sequence[str], Callable[[str], bool]]
#: ``[(name_or_filter, fn), ...]``
HookList = Sequence[tuple[NameFilter, HookFn]]
#: positions to keep: an int, a slice, a list, or None for all
PosSlice = Union[int, slice, Sequence[int], None]
#: answer tokens: a single-token string or id, one per prompt, or ``[batch]`` / ``[batch, k]`` ids
Answer = Union[str, int, Sequence[Union[str, int]], torch.Tensor]
#: components as strings (``"L5H3"``) or :class:`~mechscope.core.components.Component`, one or several
ComponentSpecs = Union[str, Any, Sequence[Any]]
#: a torch device or its name
Device = Union[str, torch.device]
#: an HF ``PretrainedConfig`` (typed loosely: any object with its attributes)
HFConfig = Any
#: an HF tokenizer
HFTokenizer = Any
