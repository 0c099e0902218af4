"""The torch and transformers releases mechscope is tested with, and one warning at import outside them.

mechscope wraps HF's own modules, so a transformers release that moves a module or changes the attention
interface can break hooks silently. pyproject states only lower bounds (an upper bound nothing measured
would lock users out the day a release ships); this table says what was measured. ``make compat`` runs the
identity suite against the newest releases on the package index, and ``mechscope check MODEL`` runs it on
the user's own install and model.
"""

from __future__ import annotations

import re
import warnings

# (oldest, newest) release measured, as (major, minor): the whole suite on the oldest pins, `make compat` on the newest
TESTED = {"torch": ((2, 13), (2, 15)), "transformers": ((5, 24), (5, 25))}


class UntestedVersionWarning(UserWarning):
    """An installed torch or transformers outside the releases mechscope was tested with."""


def _major_minor(version: str) -> tuple[int, int] | None:
    m = re.match(r"(\d+)\.(\d+)", version)
    return (int(m.group(1)), int(m.group(2))) if m else None


def untested(versions: dict[str, str]) -> list[str]:
    """One line per package in ``versions`` (``{"torch": "2.16.0"}``) outside :data:`TESTED`."""
    out = []
    for pkg, v in versions.items():
        mm, (lo, hi) = _major_minor(v), TESTED[pkg]
        if mm is not None and not lo <= mm <= hi:
            out.append(f"{pkg} {v} (tested: {lo[0]}.{lo[1]} to {hi[0]}.{hi[1]})")
    return out


_WARNED = False


def warn_if_untested() -> None:
    """Warn once per process when the installed torch or transformers is outside :data:`TESTED`."""
    global _WARNED
    if _WARNED:
        return
    _WARNED = True
    import torch
    import transformers

    lines = untested({"torch": torch.__version__, "transformers": transformers.__version__})
    if lines:
        warnings.warn(f"mechscope was not tested with {' and '.join(lines)}. Run `mechscope check MODEL` to run the "
                      f"identity suite (exact hooks, residual identities) on your install before trusting results.",
                      UntestedVersionWarning, stacklevel=3)
