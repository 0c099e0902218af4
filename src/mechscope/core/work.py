"""Work accounting: the forward passes a stage runs, against the floor its answer needs.

The unit is the **token-layer**: one token through one transformer block (a forward pass over ``[batch, pos]`` tokens
of an ``L``-block model is ``batch * pos * L``; a pass started at block ``l`` or stopped early counts only the blocks
it ran). A :class:`WorkMeter` counts what the model really ran, with a forward hook on each block while it is
open; the techniques say what their answer needs with :func:`add_floor` (the patching engine: each live patch from
its block and position on; an ablation: each distinct ablated set from its first ablated block on; a gradient
method: its own forward passes). ``ratio = token_layers / floor``: 1 is a stage that runs nothing twice; a stage far
above 1 repeats work, which is a bug to explain. Backward passes are not counted (a gradient method's backward costs
about two forwards, the same at the floor).
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


@dataclass(repr=False)
class StageWork(Result):
    """One stage's work: ``token_layers`` run (forward passes through the blocks), the ``floor`` its answer needs,
    and its wall time in ``seconds``."""

    name: str
    seconds: float
    token_layers: int
    floor: int

    @property
    def ratio(self) -> float:
        """Work run over the floor (NaN when the stage claims no floor)."""
        return self.token_layers / self.floor if self.floor else float("nan")

    def line(self) -> str:
        ratio = f"{self.ratio:5.2f}x" if self.floor else "  n/a"
        return (f"{self.name:<40} {self.seconds:7.1f} s  {self.token_layers:>14,} token-layers  floor "
                f"{self.floor:>14,}  {ratio}")

    def summary(self) -> str:
        return self.line()


@dataclass(repr=False)
class WorkLog(Result):
    """The stages of one run, in order, with their work against their floors (:class:`StageWork`)."""

    stages: list[StageWork] = field(default_factory=list)
    token_layers: int = 0  # everything the meter counted, in a stage or not
    floor: int = 0

    def summary(self) -> str:
        if not self.stages:
            return "work: no stage was run (every stage was read from the stage store)"
        staged = StageWork("", 0.0, sum(s.token_layers for s in self.stages), sum(s.floor for s in self.stages))
        rest = StageWork("outside the stages", 0.0, max(0, self.token_layers - staged.token_layers),
                         max(0, self.floor - staged.floor))
        total = StageWork("total", sum(s.seconds for s in self.stages), staged.token_layers + rest.token_layers,
                          staged.floor + rest.floor)
        rows = self.stages + ([rest] if rest.token_layers or rest.floor else []) + [total]
        return "\n".join(["work per stage (token-layers: tokens x transformer blocks run forward, backward passes "
                          "not counted; floor: what the answer needs; ratio = run / floor):"]
                         + [f"  {s.line()}" for s in rows])

    def to_dict(self) -> dict:
        return {"stages": [{"name": s.name, "seconds": round(s.seconds, 2), "token_layers": s.token_layers,
                            "floor": s.floor, "ratio": None if not s.floor else round(s.ratio, 3)}
                           for s in self.stages], "token_layers": self.token_layers, "floor": self.floor}


class WorkMeter:
    """Counts the token-layers ``model`` runs while open (``with WorkMeter(model) as w``), and the floors the
    techniques claim; :meth:`stage` splits them by stage into :attr:`log`. Opened again, it carries on counting (a
    command whose stages run in two places, such as ``sae train``'s evaluation after the ranks' group closes)."""

    def __init__(self, model) -> None:
        self.model = model
        self.token_layers = 0
        self.floor = 0
        self.log = WorkLog()
        self._handles: list = []
        self._open: list[list] = []

    def _count(self, module, args, kwargs, output) -> None:
        x = args[0] if args else kwargs.get("hidden_states")
        if x is not None and hasattr(x, "shape") and len(x.shape) >= 2:
            self.token_layers += int(x.shape[0]) * int(x.shape[1])

    def __enter__(self) -> "WorkMeter":
        self._handles = [b.register_forward_hook(self._count, with_kwargs=True)  # a completed block: a stopped one
                         # (stop_at_layer) never ran
                         for b in self.model.parts.layers]
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc) -> None:
        self.log.token_layers, self.log.floor = self.token_layers, self.floor
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
        frame = [time.perf_counter(), self.token_layers, self.floor, 0.0, 0, 0]  # t0, work0, floor0, inner s/w/f
        self._open.append(frame)
        try:
            yield
        finally:
            self._open.pop()
            t0, w0, f0, s_in, w_in, f_in = frame
            s, w, f = time.perf_counter() - t0, self.token_layers - w0, self.floor - f0
            last = self.log.stages[-1] if self.log.stages else None
            if last is not None and last.name == name:  # the same stage again straight after (a stage run in
                # parts): one row
                last.seconds, last.token_layers, last.floor = (last.seconds + s - s_in, last.token_layers + w - w_in,
                                                               last.floor + f - f_in)
            else:
                self.log.stages.append(StageWork(name, s - s_in, w - w_in, f - f_in))
            if self._open:
                parent = self._open[-1]
                parent[3], parent[4], parent[5] = parent[3] + s, parent[4] + w, parent[5] + f


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Mark a stage of the innermost open :class:`WorkMeter` (nothing when none is open): what a workflow's caller
    meters, the workflow only names."""
    if not _ACTIVE:
        yield
        return
    with _ACTIVE[-1].stage(name):
        yield
