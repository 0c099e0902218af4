"""Type aliases for the arguments techniques take, so that signatures say what they accept."""

from __future__ import annotations

import abc
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


def checked(fn: Callable) -> Callable:
    """Check a public function's arguments against its annotations at the call, naming the argument, what was given
    and what is expected (a swapped or wrong argument otherwise fails deep inside torch with a message that names
    none of them). Annotations that are not plain classes or unions of them (callables, type variables, names only
    known to type checkers) are not checked; an ``int`` is accepted for ``float``."""
    import functools
    import inspect

    sig = inspect.signature(fn)
    wants: dict[str, tuple[type, ...]] | None = None

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        nonlocal wants
        if wants is None:
            wants = _runtime_types(fn, sig)
        if wants:
            try:
                bound = sig.bind_partial(*args, **kwargs).arguments
            except TypeError:
                return fn(*args, **kwargs)  # Python names the missing or extra argument itself
            for name, value in bound.items():
                want = wants.get(name)
                if want is not None and not isinstance(value, want):
                    from .errors import InputTypeError

                    order = ", ".join(sig.parameters)
                    other = next((o for o in bound if o != name and isinstance(bound[o], want)
                                  and (o not in wants or isinstance(value, wants[o]))), None)
                    swap = f"; are {name} and {other} swapped?" if other else ""
                    raise InputTypeError(f"{fn.__name__}: {name} must be {_names(want)}, got {type(value).__name__} "
                                         f"(the arguments are ({order}){swap})")
        return fn(*args, **kwargs)

    return wrapper


class _HookedModelLike(abc.ABC):  # noqa: B024 - checked through __subclasshook__ alone
    """What ``model`` arguments are checked against without importing core.model (which imports this module): any
    object with hook points and a cached forward pass, as HookedModel has."""

    @classmethod
    def __subclasshook__(cls, other):
        return all(any(n in vars(k) for k in other.__mro__) for n in ("run_with_cache", "hooks")) or NotImplemented


_HookedModelLike.__name__ = "HookedModel"


def _runtime_types(fn: Callable, sig) -> dict[str, tuple[type, ...]]:
    import collections.abc as cabc
    import types
    import typing

    out = {}
    for name, p in sig.parameters.items():
        ann = p.annotation
        if ann is p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        try:
            ann = eval(ann, fn.__globals__) if isinstance(ann, str) else ann  # noqa: S307 - the function's own annotation
        except Exception:  # noqa: BLE001 - a name only a type checker knows: not checked, except the model
            if name == "model":
                out[name] = (_HookedModelLike,)
            continue
        parts = typing.get_args(ann) if typing.get_origin(ann) in (Union, types.UnionType) else (ann,)
        classes = []
        for a in parts:
            a = typing.get_origin(a) or a  # list[int] -> list, Sequence[str] -> Sequence
            if a is None or a is type(None):
                classes.append(type(None))
            elif a is float:
                classes += [float, int]
            elif isinstance(a, type) and a not in (cabc.Callable, typing.Any):
                classes.append(a)
            else:
                classes = []
                break
        if classes:
            out[name] = tuple(classes)
    return out


def _names(types_: tuple[type, ...]) -> str:
    names = [t.__name__ for t in types_ if t is not int or float not in types_]
    names = ["None" if n == "NoneType" else n for n in names]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
