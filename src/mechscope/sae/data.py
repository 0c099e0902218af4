"""Activation storage for SAE training: safetensors shards on disk and a shuffling buffer.

:func:`harvest_to_disk` streams activations into ``folder/shard_00000.safetensors`` ... Each shard
is written to a temporary name and renamed, and ``manifest.json`` (written last, atomically)
lists only complete shards, so a crash never leaves a half shard that looks whole; a rerun
resumes after the last listed shard. Several SAEs can then train on one harvest
(:func:`load_shards`, or :func:`mechscope.sae.train.train_sae_sweep`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors.torch import load_file, save

from ..viz import atomic_write


def _manifest(folder: Path) -> dict:
    p = folder / "manifest.json"
    return json.loads(p.read_text()) if p.exists() else {"shards": [], "rows_done": 0}


def harvest_to_disk(model, hook_name: str, tokens: torch.Tensor, folder: str | Path, seqs_per_shard: int = 64,
                    batch_size: int = 8) -> Path:
    """Harvest ``hook_name`` on ``tokens [n, pos]`` into shards of ``seqs_per_shard`` sequences (resumable)."""
    from .train import harvest

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    man = _manifest(folder)
    if man.get("hook_name") not in (None, hook_name):
        raise ValueError(f"{folder} holds activations of {man['hook_name']}, not {hook_name}")
    man["hook_name"] = hook_name
    start = man["rows_done"]
    for s in range(start, tokens.shape[0], seqs_per_shard):
        acts = harvest(model, hook_name, tokens[s:s + seqs_per_shard], batch_size)
        name = f"shard_{len(man['shards']):05d}.safetensors"
        atomic_write(folder / name, save({"acts": acts.contiguous()}, metadata={"hook_name": hook_name}))
        man["shards"].append({"file": name, "rows": int(acts.shape[0]), "d": int(acts.shape[1])})
        man["rows_done"] = min(s + seqs_per_shard, tokens.shape[0])
        atomic_write(folder / "manifest.json", json.dumps(man, indent=2))
    return folder


def load_shards(folder: str | Path) -> torch.Tensor:
    """All complete shards listed in the manifest as one ``[n, d]`` tensor (files not listed are ignored)."""
    folder = Path(folder)
    man = _manifest(folder)
    if not man["shards"]:
        raise FileNotFoundError(f"no complete activation shards in {folder}")
    return torch.cat([load_file(str(folder / s["file"]))["acts"] for s in man["shards"]])


def shuffled_batches(chunks: Iterable[torch.Tensor], batch_size: int, buffer_size: int = 65536,
                     seed: int = 0) -> Iterator[torch.Tensor]:
    """Mix a stream of ``[n, d]`` chunks through a buffer of ``buffer_size`` rows and yield shuffled batches.

    When the buffer is full, half of it (shuffled) is emitted as batches, so consecutive batches mix
    rows from many chunks; the remainder is flushed at the end.
    """
    g = torch.Generator().manual_seed(seed)
    buf: list[torch.Tensor] = []
    n = 0
    for c in chunks:
        buf.append(c)
        n += c.shape[0]
        if n >= buffer_size:
            allrows = torch.cat(buf)[torch.randperm(n, generator=g)]
            half = (n // 2) // batch_size * batch_size
            for s in range(0, half, batch_size):
                yield allrows[s:s + batch_size]
            buf, n = [allrows[half:]], n - half
    if n:
        allrows = torch.cat(buf)[torch.randperm(n, generator=g)]
        for s in range(0, n - batch_size + 1, batch_size):
            yield allrows[s:s + batch_size]
