"""Progress on long work: tqdm bars and one-line stages, on stderr, silenced with ``--quiet``.

Every loop that can take more than a few seconds (patching passes, EAP batches, harvests, probes,
evaluations, ablations over seeds, the demo's and ``find_circuit``'s stages) reports through
:func:`bar` or :func:`stage`. Output goes to stderr only, so ``--json`` on stdout stays clean.
``quiet()`` (the CLI's ``--quiet``, or ``MECHSCOPE_QUIET=1``) turns everything off.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")
_STATE = {"quiet": bool(os.environ.get("MECHSCOPE_QUIET"))}


def is_quiet() -> bool:
    return _STATE["quiet"]


def set_quiet(value: bool = True) -> None:
    """Silence (or restore) every progress bar and stage line, the Hugging Face libraries' bars included."""
    _STATE["quiet"] = bool(value)
    _hf_bars(not value)


def _hf_bars(enabled: bool) -> None:
    """Turn the loading and download bars of transformers and huggingface_hub on or off (when they are installed)."""
    for mod in ("transformers.utils.logging", "huggingface_hub.utils"):
        try:
            m = __import__(mod, fromlist=["enable_progress_bars"])
        except ImportError:
            continue
        f = getattr(m, "enable_progress_bar" if enabled else "disable_progress_bar", None) or \
            getattr(m, "enable_progress_bars" if enabled else "disable_progress_bars", None)
        if f is not None:
            f()


@contextlib.contextmanager
def quiet(value: bool = True) -> Iterator[None]:
    """``with quiet(): ...`` runs without progress output."""
    old = _STATE["quiet"]
    set_quiet(value)
    try:
        yield
    finally:
        set_quiet(old)


def bar(iterable: Iterable[T] | None = None, desc: str = "", total: int | None = None, min_items: int = 2,
        **kwargs) -> "Iterable[T]":
    """A tqdm bar on stderr over ``iterable`` (or a manual bar when it is None); nothing when quiet or short."""
    from tqdm import tqdm  # plain text on stderr, in terminals and notebooks alike

    n = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
    disable = is_quiet() or (n is not None and n < min_items)
    return tqdm(iterable, desc=f"mechscope {desc}".strip(), total=n, file=sys.stderr, disable=disable, leave=False,
                **kwargs)


def stage(message: str) -> None:
    """One line of progress on stderr (``mechscope: <message>``), unless quiet."""
    if not is_quiet():
        print(f"mechscope: {message}", file=sys.stderr, flush=True)
