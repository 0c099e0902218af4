"""What the long benches share: a results file in the cache that a rerun continues (``--fresh`` starts over)."""

from __future__ import annotations

import json
from pathlib import Path


def results_file(name: str, fresh: bool, file: str = "results.json") -> tuple[Path, Path, list[dict]]:
    """``(folder, its results file, the runs recorded so far)`` of the bench ``name`` under ``$MECHSCOPE_CACHE``."""
    from mechscope.loading import cache_dir

    out = cache_dir() / name
    out.mkdir(parents=True, exist_ok=True)
    path = out / file
    runs = [] if fresh or not path.exists() else json.loads(path.read_text())["runs"]
    return out, path, runs
