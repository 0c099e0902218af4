"""Work accounting: the forward passes a stage runs, against the floor its answer needs.

The unit is the **token-layer**: one token through one transformer block (a forward pass over ``[batch, pos]`` tokens
of an ``L``-block model is ``batch * pos * L``; a pass started at block ``l`` or stopped early counts only the blocks
it ran). A :class:`WorkMeter` counts what the model really ran, with a forward hook on each block while it is
open; the techniques say what their answer needs with :func:`add_floor` (the patching engine: each live patch from
its block and position on; an ablation: each distinct ablated set from its first ablated block on; a gradient
method: its own forward passes). ``ratio = token_layers / floor``: 1 is a stage that runs nothing twice; a stage far
above 1 repeats work, which is a bug to explain. A gradient method's backward passes are not counted (one per forward,
about two forwards' cost, the same at the floor); an attribution graph's, which are most of its cost and whose rows
are batched across layers, are counted apart with :func:`add_backward`.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

from .result import Result

_ACTIVE: list["WorkMeter"] = []


def add_floor(token_layers: int) -> None:
    """Count ``token_layers`` of necessary work toward every open meter's floor (nothing when none is open)."""
    for m in _ACTIVE:
        m.floor += int(token_layers)


def add_backward(token_layers: int, floor: int) -> None:
    """Count a backward pass toward every open meter: ``token_layers`` it ran (rows x positions x the blocks the
    gradient went through) and the ``floor`` its rows need (each row through the blocks below its own target)."""
    for m in _ACTIVE:
        m.backward += int(token_layers)
        m.backward_floor += int(floor)


def _ratio(run: int, floor: int) -> str:
    return f"{run / floor:5.2f}x" if floor else "  n/a"


@dataclass(repr=False)
class StageWork(Result):
    """One stage's work: ``token_layers`` run (forward passes through the blocks), the ``floor`` its answer needs,
    its wall time in ``seconds``; and, for a stage that runs backward passes of its own (an attribution graph's
    rows), their ``backward`` token-layers against their ``backward_floor``."""

    name: str
    seconds: float
    token_layers: int
    floor: int
    backward: int = 0
    backward_floor: int = 0

    @property
    def ratio(self) -> float:
        """Work run over the floor (NaN when the stage claims no floor)."""
        return self.token_layers / self.floor if self.floor else float("nan")

    @property
    def backward_ratio(self) -> float:
        """Backward work run over its floor (NaN when the stage runs no counted backward pass)."""
        return self.backward / self.backward_floor if self.backward_floor else float("nan")

    def line(self) -> str:
        out = (f"{self.name:<40} {self.seconds:7.1f} s  {self.token_layers:>14,} token-layers  floor "
               f"{self.floor:>14,}  {_ratio(self.token_layers, self.floor)}")
        if self.backward or self.backward_floor:
            out += (f"  | backward {self.backward:>14,}  floor {self.backward_floor:>14,}  "
                    f"{_ratio(self.backward, self.backward_floor)}")
        return out

    def summary(self) -> str:
        return self.line()

    def _counts(self) -> list:
        return [self.seconds, self.token_layers, self.floor, self.backward, self.backward_floor]


@dataclass(repr=False)
class WorkLog(Result):
    """The stages of one run, in order, with their work against their floors (:class:`StageWork`)."""

    stages: list[StageWork] = field(default_factory=list)
    token_layers: int = 0  # everything the meter counted, in a stage or not
    floor: int = 0
    backward: int = 0
    backward_floor: int = 0

    def summary(self) -> str:
        if not self.stages:
            return "work: no stage was run (every stage was read from the stage store)"
        staged = [sum(c) for c in zip(*(s._counts() for s in self.stages))]
        rest = StageWork("outside the stages", 0.0, *(max(0, t - s) for t, s in zip(
            (self.token_layers, self.floor, self.backward, self.backward_floor), staged[1:])))
        total = StageWork("total", staged[0], *(s + r for s, r in zip(staged[1:], rest._counts()[1:])))
        rows = self.stages + ([rest] if any(rest._counts()[1:]) else []) + [total]
        return "\n".join(["work per stage (token-layers: tokens x transformer blocks run forward; floor: what the "
                          "answer needs; ratio = run / floor; a stage's own backward passes, where it runs them, "
                          "apart, as rows x positions x blocks):"]
                         + [f"  {s.line()}" for s in rows])

    def to_dict(self) -> dict:
        def one(s: StageWork) -> dict:
            d = {"name": s.name, "seconds": round(s.seconds, 2), "token_layers": s.token_layers, "floor": s.floor,
                 "ratio": None if not s.floor else round(s.ratio, 3)}
            if s.backward or s.backward_floor:
                d.update(backward=s.backward, backward_floor=s.backward_floor,
                         backward_ratio=None if not s.backward_floor else round(s.backward_ratio, 3))
            return d

        return {"stages": [one(s) for s in self.stages], "token_layers": self.token_layers, "floor": self.floor,
                "backward": self.backward, "backward_floor": self.backward_floor}


class WorkMeter:
    """Counts the token-layers ``model`` runs while open (``with WorkMeter(model) as w``), and the floors the
    techniques claim; :meth:`stage` splits them by stage into :attr:`log`. Opened again, it carries on counting (a
    command whose stages run in two places, such as ``sae train``'s evaluation after the ranks' group closes)."""

    def __init__(self, model) -> None:
        self.model = model
        self.token_layers = 0
        self.floor = 0
        self.backward = 0
        self.backward_floor = 0
        self.log = WorkLog()
        self._handles: list = []
        self._open: list[list] = []

    def _count(self, module, args, kwargs, output) -> None:
        x = args[0] if args else kwargs.get("hidden_states")
        if x is not None and hasattr(x, "shape") and len(x.shape) >= 2:
            self.token_layers += int(x.shape[0]) * int(x.shape[1])

    def _counts(self) -> list:
        return [time.perf_counter(), self.token_layers, self.floor, self.backward, self.backward_floor]

    def __enter__(self) -> "WorkMeter":
        self._handles = [b.register_forward_hook(self._count, with_kwargs=True)  # a completed block: a stopped one
                         # (stop_at_layer) never ran
                         for b in self.model.parts.layers]
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc) -> None:
        self.log.token_layers, self.log.floor = self.token_layers, self.floor
        self.log.backward, self.log.backward_floor = self.backward, self.backward_floor
        for h in self._handles:
            h.remove()
        self._handles = []
        if self in _ACTIVE:
            _ACTIVE.remove(self)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Count what runs inside the block as the stage ``name`` (a stage read from a store shows 0 work). A stage
        opened inside another is recorded on its own, and the outer one keeps only the rest; a stage of the same name
        as the one recorded just before adds to its row."""
        frame = [self._counts(), [0.0, 0, 0, 0, 0]]  # the counters at the start; what inner stages took
        self._open.append(frame)
        try:
            yield
        finally:
            self._open.pop()
            start, inner = frame
            took = [now - then for now, then in zip(self._counts(), start)]
            own = [t - i for t, i in zip(took, inner)]
            last = self.log.stages[-1] if self.log.stages else None
            if last is not None and last.name == name:  # the same stage again straight after (a stage run in
                # parts): one row
                (last.seconds, last.token_layers, last.floor, last.backward,
                 last.backward_floor) = (a + b for a, b in zip(last._counts(), own))
            else:
                self.log.stages.append(StageWork(name, *own))
            if self._open:
                self._open[-1][1] = [p + t for p, t in zip(self._open[-1][1], took)]


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Mark a stage of the innermost open :class:`WorkMeter` (nothing when none is open): what a workflow's caller
    meters, the workflow only names."""
    if not _ACTIVE:
        yield
        return
    with _ACTIVE[-1].stage(name):
        yield
