"""Sharded sweeps: a technique over many prompts, split across ranks and across restarts.

A sweep is a plain specification (technique, site, metric as data, the prompts' content hash and
the model's) with a deterministic shard plan: prompts ``[i, i + shard_size)``, the shards dealt to
ranks in contiguous pieces (:func:`mechscope.distributed.split`, any number of ranks). Each shard's
result is written atomically under the hash of its specification and its tokens, so a rerun after
a crash (or with another number of ranks) computes only the shards that are missing. The gathered
result is assembled from per-prompt values, so it equals the one-process result to float rounding
(per-prompt metrics computed on a smaller batch).

Metrics are data, so that they hash: ``("logit", token)``, ``("logit_diff", answer, wrong)`` or
``("prob", token)``, each read at the last position.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

import torch

from .core.errors import InputError
from .core.files import atomic_write, read_safetensors
from .core.model import HookedModel
from .core.progress import bar
from .distributed import Dist, split
from .techniques.patching import PatchResult, patch

METRICS = ("logit", "logit_diff", "prob")


def metric_fn(spec: Sequence) -> callable:
    """The per-prompt metric ``[batch, pos, vocab] -> [batch]`` a spec names (last position)."""
    if not spec or spec[0] not in METRICS:
        raise InputError(f"metric spec must start with one of {METRICS}, got {spec!r}")
    kind, *toks = spec
    need = 2 if kind == "logit_diff" else 1
    if len(toks) != need or not all(isinstance(t, int) for t in toks):
        raise InputError(f"metric {kind!r} takes {need} token id(s), got {toks!r}")
    if kind == "logit":
        return lambda lg: lg[:, -1, toks[0]].float()
    if kind == "prob":
        return lambda lg: lg[:, -1].float().softmax(-1)[:, toks[0]]
    return lambda lg: (lg[:, -1, toks[0]] - lg[:, -1, toks[1]]).float()


def model_fingerprint(model: HookedModel) -> str:
    """A content key of the model: its name, config and a sum of a few weights (cheap, not cryptographic)."""
    h = hashlib.sha256(json.dumps(model.cfg.to_dict(), sort_keys=True, default=str).encode())
    with torch.no_grad():
        for p in list(model.hf.parameters())[:4]:
            if p.device.type != "meta":
                h.update(f"{float(p.float().sum()):.6e}".encode())
    return h.hexdigest()[:16]


def _shard_key(spec: dict, clean: torch.Tensor, corrupted: torch.Tensor) -> str:
    h = hashlib.sha256(json.dumps(spec, sort_keys=True).encode())
    h.update(clean.cpu().numpy().tobytes())
    h.update(corrupted.cpu().numpy().tobytes())
    return h.hexdigest()[:24]


def sharded_patch(model: HookedModel, clean: torch.Tensor, corrupted: torch.Tensor, metric: Sequence,
                  site: str = "resid_pre", folder: str | Path = "sweep", shard_size: int = 8,
                  dist: Dist | None = None, progress: bool = True, **patch_kwargs) -> PatchResult | None:
    """:func:`~mechscope.techniques.patching.patch` over ``clean``/``corrupted`` ``[n, pos]`` in shards.

    Each rank computes its shards that are not yet in ``folder``; then every rank returns the gathered
    result (``stats`` says how many shards were computed and how many reused). ``metric`` is a spec (see
    the module docstring). Other keyword arguments go to ``patch`` and into the specification.
    """
    dist = dist or Dist.single()
    if clean.shape != corrupted.shape or clean.dim() != 2:
        raise InputError(f"clean and corrupted must be [n, pos] of one shape, got {tuple(clean.shape)} and "
                         f"{tuple(corrupted.shape)}")
    if shard_size < 1:
        raise InputError(f"shard_size must be >= 1, got {shard_size}")
    fn = metric_fn(metric)
    folder = Path(folder)
    spec = {"technique": "patch", "site": site, "metric": list(metric), "model": model_fingerprint(model),
            "kwargs": {k: v for k, v in sorted(patch_kwargs.items())}}
    n = clean.shape[0]
    shards = [range(s, min(s + shard_size, n)) for s in range(0, n, shard_size)]
    keys = [_shard_key(spec, clean[r.start:r.stop], corrupted[r.start:r.stop]) for r in shards]
    mine = split(len(shards), dist.world)[dist.rank]
    computed = 0
    todo = [i for i in mine if not (folder / f"shard-{keys[i]}.safetensors").exists()]
    for i in bar(todo, desc=f"sweep shards (rank {dist.rank})" if dist.active else "sweep shards") if progress else todo:
        r = shards[i]
        c, x = clean[r.start:r.stop], corrupted[r.start:r.stop]
        res = patch(model, c, x, fn, site=site, **patch_kwargs)
        with torch.no_grad():
            m_clean, m_corr = fn(model(c)), fn(model(x))
        from safetensors.torch import save

        meta = {"spec": json.dumps(spec), "axes": json.dumps(list(res.axes)), "labels": json.dumps(res.labels),
                "direction": res.direction, "prompts": f"{r.start}:{r.stop}"}
        per = res.per_prompt if res.per_prompt is not None else res.values[..., None]  # a one-prompt shard
        atomic_write(folder / f"shard-{keys[i]}.safetensors",
                     save({"per_prompt": per.contiguous().float(), "clean": m_clean.contiguous(),
                           "corrupted": m_corr.contiguous()}, metadata=meta))
        computed += 1
    done = torch.tensor([float(computed)], dtype=torch.float64)
    dist.sum_many_([done])
    dist.barrier()  # every shard is on disk (a shared folder) before anyone reads
    return _assemble(folder, keys, spec, site, int(done), len(shards))


def _assemble(folder: Path, keys: list[str], spec: dict, site: str, computed: int, total: int) -> PatchResult:
    from safetensors import safe_open

    per, clean, corr = [], [], []
    for k in keys:
        path = folder / f"shard-{k}.safetensors"
        t = read_safetensors(path, "a sweep shard")
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        per.append(t["per_prompt"])
        clean.append(t["clean"])
        corr.append(t["corrupted"])
    per_prompt = torch.cat(per, dim=-1)
    c, x = torch.cat(clean), torch.cat(corr)
    return PatchResult(site, meta["direction"], per_prompt.mean(-1), tuple(json.loads(meta["axes"])),
                       json.loads(meta["labels"]), float(c.mean()), float(x.mean()), per_prompt,
                       {"shards": total, "shards_computed": computed, "shards_reused": total - computed,
                        "spec": spec})
