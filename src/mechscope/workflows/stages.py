"""Stages of a long investigation kept on disk, so that a killed run resumes and a rerun reuses what still holds.

A stage's file is named by a content key: the model's fingerprint, the dataset's tokens, answers and
metric, the stage's name and the parameters it depends on. A rerun with another faithfulness target
therefore finds the patching stages and recomputes only the choice; a run killed halfway finds every
stage it finished. Files are written to a temporary name and renamed, so a kill never leaves a
half-written stage, and they are read with ``torch.load(weights_only=True)``: plain tensors, numbers,
strings and containers, with the few result dataclasses named in :data:`STORABLE` rebuilt by name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from pathlib import Path
from typing import Callable, TypeVar

import torch

from ..analysis.validation import Estimate
from ..circuits.faithfulness import FaithfulnessCurve
from ..core.errors import MechscopeError
from ..core.files import atomic_write, read_torch
from ..core.model import HookedModel
from ..core.progress import stage as say
from ..datasets import TaskDataset
from ..sweeps import model_fingerprint
from ..techniques.patching import PatchResult

T = TypeVar("T")
#: the dataclasses a stage may hold, rebuilt field by field (never unpickled)
STORABLE = {cls.__name__: cls for cls in (PatchResult, Estimate, FaithfulnessCurve)}
_TAG = "__mechscope_dataclass__"


def register_storable(*classes: type) -> None:
    """Let stages hold these dataclasses too (a workflow's own results), rebuilt field by field."""
    STORABLE.update({c.__name__: c for c in classes})


def _encode(x):
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        if type(x).__name__ not in STORABLE:
            raise TypeError(f"a stage cannot hold a {type(x).__name__}; storable: {', '.join(STORABLE)}")
        return {_TAG: type(x).__name__, **{f.name: _encode(getattr(x, f.name)) for f in dataclasses.fields(x)}}
    if isinstance(x, dict):
        return {k: _encode(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_encode(v) for v in x)
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    raise TypeError(f"a stage cannot hold a {type(x).__name__}: tensors, numbers, strings, containers and "
                    f"{', '.join(STORABLE)} only")


def _decode(x):
    if isinstance(x, dict):
        if _TAG in x:
            fields = {k: _decode(v) for k, v in x.items() if k != _TAG}
            return STORABLE[x[_TAG]](**fields)
        return {k: _decode(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_decode(v) for v in x)
    return x


def dataset_fingerprint(data: TaskDataset) -> str:
    """A content key of a task: its token pairs, answers, wrong answers and metric label."""
    h = hashlib.sha256(json.dumps([data.name, list(data.metric_label)]).encode())
    for t in (data.clean, data.corrupted, data.answers, data.wrong):
        if t is not None:
            h.update(str(tuple(t.shape)).encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class StageCache:
    """Stages of one investigation of ``data`` on ``model`` under ``folder`` (``folder/<stage>-<key>.pt``).

    ``base``: the content key of another kind of run (a model pair and its corpus: ``mechscope diff``) in place of
    ``model`` and ``data``.

    Call it as ``find_circuit``'s ``memo``: ``cache(name, params, compute)`` returns the stored value when
    a stage with this name and these parameters was finished before, else computes and stores it.
    ``hits`` and ``misses`` list the stage names, for the report and the tests; ``enabled=False`` computes
    everything and stores nothing.
    """

    def __init__(self, folder: str | Path, model: HookedModel | None = None, data: TaskDataset | None = None,
                 enabled: bool = True, base: dict | None = None):
        self.folder, self.enabled = Path(folder), enabled
        self.base = base if base is not None else {"model": model_fingerprint(model), "data": dataset_fingerprint(data)}
        self.hits: list[str] = []
        self.misses: list[str] = []

    def path(self, name: str, params: dict) -> Path:
        key = json.dumps({**self.base, "stage": name, **params}, sort_keys=True, default=str)
        return self.folder / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"

    def __call__(self, name: str, params: dict, compute: Callable[[], T]) -> T:
        path = self.path(name, params)
        if self.enabled and path.exists():
            try:
                value = _decode(read_torch(path, f"the stored stage {name!r}"))
            except (MechscopeError, KeyError, TypeError) as e:  # damaged, or from another mechscope: recompute
                say(f"stage {name!r}: {path} is unreadable ({str(e).splitlines()[0][:200]}); computing it again")
            else:
                self.hits.append(name)
                say(f"stage {name!r}: reusing {path}")
                return value
        value = compute()
        self.misses.append(name)
        if self.enabled:
            buf = io.BytesIO()
            torch.save(_encode(value), buf)
            atomic_write(path, buf.getvalue())  # a kill leaves the old state or the new one, never half a file
        return value
