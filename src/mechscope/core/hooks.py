"""Hook registry: user hook functions by TransformerLens name, attached lazily to HF modules.

A user hook is ``fn(activation, hook) -> Tensor | None``: returning a tensor replaces the
activation for everything downstream; returning ``None`` keeps it (in-place edits still count).
``hook`` is a :class:`HookPoint` with ``.name``, ``.layer()`` and a per-run ``.ctx`` dict.

PyTorch hooks are attached only while some user hook needs them and are removed when the
``with`` block that added them ends, even if the forward pass raised. A context never removes
hooks it did not add (TransformerLens #1636), so user hooks added with :meth:`add` survive.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch

from .errors import InputError, InputTypeError, UnknownNameError
from .hookpoints import split_name, unknown_hook_message
from .types import HookList, NameFilter

HookFn = Callable[[torch.Tensor, "HookPoint"], "torch.Tensor | None"]
NameOrFilter = "str | Callable[[str], bool]"


@dataclass
class HookPoint:
    """What a hook function receives as its second argument."""

    name: str
    ctx: dict = field(default_factory=dict)

    def layer(self) -> int | None:
        return split_name(self.name)[0]


class StopForward(Exception):
    """Raised internally to end a forward pass early (``stop_at_layer``)."""

    def __init__(self, value: torch.Tensor):
        super().__init__("forward stopped early")
        self.value = value


@dataclass
class PassState:
    """What one hook site hands to a later one within a single forward pass.

    ``resid_pre[L]``: the (possibly edited) stream entering block L, written by the block's
    pre-hook and read when ``hook_resid_mid`` is computed as ``resid_pre + attn_out``.
    ``z[L]``: the attention output per head, written by the attention function and read when
    ``hook_result`` is computed at the attention output. Cleared when the last hook is removed.
    """

    resid_pre: dict[int, torch.Tensor] = field(default_factory=dict)
    z: dict[int, torch.Tensor] = field(default_factory=dict)

    def clear(self) -> None:
        self.resid_pre.clear()
        self.z.clear()


@dataclass
class _Entry:
    name: str
    fn: HookFn
    direction: str  # "fwd" | "bwd"


class HookManager:
    """Keeps the active hook functions and the PyTorch handles that feed them.

    ``installer(group)`` is provided by the model: it attaches the PyTorch hooks serving one
    group of hook names and returns their handles. ``group_of(name)`` maps a hook name to the
    groups it needs (possibly none, for hooks fired from inside the attention function).
    """

    def __init__(self, hook_names: Iterable[str], group_of, installer):
        self.hook_names: list[str] = list(hook_names)
        self.known = set(self.hook_names)
        self._group_of = group_of
        self._installer = installer
        self._entries: list[_Entry] = []
        self._fwd: dict[str, list[HookFn]] = {}
        self._bwd: dict[str, list[HookFn]] = {}
        self._points: dict[str, HookPoint] = {}
        self._installed: dict[object, tuple[list, int]] = {}
        self.active_by_layer: dict[int, set[str]] = {}
        self.state = PassState()

    # ---- resolution -------------------------------------------------------------------
    def resolve(self, name_or_filter: NameFilter) -> list[str]:
        """Expand a name, a list of names, or a predicate into valid hook names."""
        if callable(name_or_filter):
            return [n for n in self.hook_names if name_or_filter(n)]
        if isinstance(name_or_filter, str):
            self.check(name_or_filter)
            return [name_or_filter]
        out = []
        for n in name_or_filter:
            out.extend(self.resolve(n))
        return out

    def check(self, name: str) -> None:
        if name not in self.known:
            raise UnknownNameError(unknown_hook_message(name, self.hook_names))

    # ---- state --------------------------------------------------------------------------
    def is_active(self, name: str) -> bool:
        return name in self._fwd or name in self._bwd

    def has_backward(self, name: str) -> bool:
        """Whether ``name`` has backward hooks: then a fired view must be put back into the graph."""
        return name in self._bwd

    def point(self, name: str) -> HookPoint:
        p = self._points.get(name)
        if p is None:
            p = self._points[name] = HookPoint(name)
        return p

    def _rebuild(self) -> None:
        fwd: dict[str, list[HookFn]] = defaultdict(list)
        bwd: dict[str, list[HookFn]] = defaultdict(list)
        for e in self._entries:
            (fwd if e.direction == "fwd" else bwd)[e.name].append(e.fn)
        self._fwd, self._bwd = dict(fwd), dict(bwd)
        by_layer: dict[int, set[str]] = defaultdict(set)
        for name in list(self._fwd) + list(self._bwd):
            layer, rest = split_name(name)
            if layer is not None:
                by_layer[layer].add(rest)
        self.active_by_layer = dict(by_layer)

    def _acquire(self, groups: Iterable) -> None:
        for g in groups:
            handles, count = self._installed.get(g, (None, 0))
            if handles is None:
                handles = self._installer(g)
            self._installed[g] = (handles, count + 1)

    def _release(self, groups: Iterable) -> None:
        for g in groups:
            handles, count = self._installed[g]
            if count <= 1:
                for h in handles:
                    h.remove()
                del self._installed[g]
            else:
                self._installed[g] = (handles, count - 1)

    def _groups(self, entries: list[_Entry]) -> list:
        out = []
        for e in entries:
            out.extend(self._group_of(e.name))
        return out

    def add(self, entries: list[_Entry]) -> list[_Entry]:
        groups = self._groups(entries)
        self._acquire(groups)
        self._entries.extend(entries)
        self._rebuild()
        return entries

    def remove(self, entries: list[_Entry]) -> None:
        ids = {id(e) for e in entries}
        kept = [e for e in self._entries if id(e) not in ids]
        removed = [e for e in self._entries if id(e) in ids]
        self._entries = kept
        self._rebuild()
        self._release(self._groups(removed))
        if not self._entries:
            self.state.clear()
            self._points.clear()

    def remove_all(self) -> None:
        self.remove(list(self._entries))

    @contextmanager
    def hooks(self, fwd_hooks: HookList = (), bwd_hooks: HookList = ()) -> Iterator[None]:
        """Attach ``[(name_or_filter, fn), ...]`` for the duration of the block."""
        entries = self.make_entries(fwd_hooks, "fwd") + self.make_entries(bwd_hooks, "bwd")
        self.add(entries)
        try:
            yield
        finally:
            self.remove(entries)

    def make_entries(self, hooks: HookList, direction: str) -> list[_Entry]:
        out = []
        for item in hooks:
            if not (isinstance(item, (tuple, list)) and len(item) == 2 and callable(item[1])):
                raise InputTypeError(
                    f"each {direction} hook must be a (name_or_filter, fn) pair with a callable fn, got {item!r}"
                )
            for name in self.resolve(item[0]):
                out.append(_Entry(name, item[1], direction))
        return out

    # ---- firing -------------------------------------------------------------------------
    def fire(self, name: str, act: torch.Tensor) -> torch.Tensor:
        """Run the forward hooks of ``name`` in order; attach its backward hooks to the result."""
        fns = self._fwd.get(name)
        if fns:
            point = self.point(name)
            for fn in fns:
                out = fn(act, point)
                if out is not None:
                    if not isinstance(out, torch.Tensor):
                        raise InputTypeError(f"hook on {name} returned {type(out).__name__}; return a Tensor or None")
                    if out.shape != act.shape:
                        raise InputError(
                            f"hook on {name} returned shape {tuple(out.shape)}, but the activation has shape "
                            f"{tuple(act.shape)}; a hook must return a tensor of the same shape"
                        )
                    if out.dtype != act.dtype or out.device != act.device:
                        out = _cast_back(name, out, act)
                    act = out
        bfns = self._bwd.get(name)
        if bfns and act.requires_grad:
            point = self.point(name)

            def on_grad(grad, _fns=bfns, _p=point):
                for fn in _fns:
                    out = fn(grad, _p)
                    if out is not None:
                        grad = out
                return grad

            act.register_hook(on_grad)
        return act


_WARNED_CASTS: set[tuple[str, str, str]] = set()


def _cast_back(name: str, out: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
    """A hook's result in another dtype or on another device, cast back to the activation's (the model's next layer
    reads that dtype); said once per hook and dtype pair."""
    key = (name, str(out.dtype), str(out.device))
    if key not in _WARNED_CASTS:
        _WARNED_CASTS.add(key)
        warnings.warn(f"hook on {name} returned {out.dtype} on {out.device}; the activation is {act.dtype} on "
                      f"{act.device}, so mechscope casts the result back (the model computes in {act.dtype}). Return "
                      f"the activation's dtype to silence this", stacklevel=4)
    return out.to(act.device, act.dtype)


class HookHandle:
    """Returned by :meth:`HookedModel.add_hook`; ``remove()`` detaches that hook only."""

    def __init__(self, manager, entries):
        self._manager, self._entries = manager, entries

    def remove(self) -> None:
        if self._entries:
            self._manager.remove(self._entries)
            self._entries = []
