"""One protocol for every result mechscope returns.

A result is a dataclass that subclasses :class:`Result` and defines ``summary()``. It then has:

- ``str(r)`` / ``repr(r)``: the summary (declare the dataclass with ``repr=False``);
- ``to_html()``: an offline HTML fragment (by default the escaped summary; results with
  pictures override :meth:`_html_body` to add heatmaps above it);
- ``_repr_html_()``: the same, for notebooks;
- ``to_dict()``: JSON-ready data (tensors become lists, nested results and estimates become
  dicts), which is what every ``--json`` CLI output prints;
- ``plot(path)``: a PNG, where a picture applies.
"""

from __future__ import annotations

import dataclasses
import html
import math
from pathlib import Path
from typing import Any

import torch


def jsonable(x: Any) -> Any:
    """``x`` with tensors, paths, tuples, dataclasses and results turned into JSON types (NaN -> None)."""
    if isinstance(x, Result):
        return x.to_dict()
    if isinstance(x, torch.Tensor):
        return jsonable(x.detach().cpu().tolist())
    if isinstance(x, float):
        return None if math.isnan(x) or math.isinf(x) else x
    if isinstance(x, (str, int, bool)) or x is None:
        return x
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, dict):
        return {str(k) if not isinstance(k, tuple) else " -> ".join(map(str, k)): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set)):
        return [jsonable(v) for v in x]
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: jsonable(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if hasattr(x, "tolist"):
        return x.tolist()
    return str(x)


class Result:
    """Base of every result dataclass; see the module docstring."""

    #: fields left out of :meth:`to_dict` (large or derived objects such as fitted probes)
    _skip_in_dict: tuple[str, ...] = ()

    def summary(self) -> str:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def __str__(self) -> str:
        return self.summary()

    def __repr__(self) -> str:
        return self.summary()

    def _html_body(self) -> str:
        """HTML shown above the summary in :meth:`to_html` (pictures, tables)."""
        return ""

    def figures_html(self) -> str:
        """Only the pictures and tables of :meth:`to_html`, without the text summary (for reports that fold it)."""
        return self._html_body()

    def to_html(self) -> str:
        return self._html_body() + f"<pre>{html.escape(self.summary(), quote=True)}</pre>"

    def _repr_html_(self) -> str:
        return self.to_html()

    def to_dict(self) -> dict:
        """JSON-ready fields, plus the extra entries of :meth:`_dict_extra` (e.g. derived properties)."""
        out = {f.name: jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)
               if f.name not in self._skip_in_dict}
        out.update({k: jsonable(v) for k, v in self._dict_extra().items()})
        return out

    def _dict_extra(self) -> dict:
        return {}
