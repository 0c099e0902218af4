"""Sharded sweeps: patching, ablation, EAP and harvesting over many prompts, split across ranks and restarts.

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
from typing import Callable, Sequence

import torch

from .analysis.validation import bootstrap_ci
from .core.errors import InputError
from .core.files import atomic_write, clear_leftovers, read_safetensors
from .core.model import HookedModel
from .core.progress import bar
from .distributed import Dist, split
from .techniques.ablation import AblationResult, ablate
from .techniques.patching import PatchResult, patch

METRICS = ("logit", "logit_diff", "prob")


def metric_fn(spec: Sequence) -> Callable[[torch.Tensor], torch.Tensor]:
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


def _shard_key(spec: dict, tensors: list[torch.Tensor]) -> str:
    """The content hash naming a shard's file: its specification and its input tensors."""
    h = hashlib.sha256(json.dumps(spec, sort_keys=True).encode())
    for t in tensors:
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:24]


def _check_pairs(clean: torch.Tensor, corrupted: torch.Tensor) -> None:
    if clean.shape != corrupted.shape or clean.dim() != 2:
        raise InputError(f"clean and corrupted must be [n, pos] of one shape, got {tuple(clean.shape)} and "
                         f"{tuple(corrupted.shape)}")


def _pair_tokens(clean: torch.Tensor, corrupted: torch.Tensor) -> Callable[[range], list[torch.Tensor]]:
    """A shard's input tensors for its content hash: its clean and corrupted prompts."""
    return lambda r: [clean[r.start:r.stop], corrupted[r.start:r.stop]]


def run_sharded(compute: Callable[[range], tuple[dict[str, torch.Tensor], dict[str, str]]], n: int, spec: dict,
                shard_tokens: Callable[[range], list[torch.Tensor]], folder: str | Path, shard_size: int,
                dist: Dist | None = None, progress: bool = True) -> tuple[list[dict], list[dict], dict]:
    """The engine of every sharded sweep: items ``[0, n)`` in shards of ``shard_size``, dealt over the ranks.

    ``compute(range) -> (tensors, metadata)`` runs one shard; its result is written atomically to
    ``folder/shard-<hash>.safetensors``, the hash covering ``spec`` and the shard's tokens
    (``shard_tokens(range)``), so a finished shard is never computed again. Every rank returns the
    tensors and metadata of all shards in order, and ``{shards, shards_computed, shards_reused}``.
    """
    from safetensors import safe_open
    from safetensors.torch import save

    dist = dist or Dist.single()
    if shard_size < 1:
        raise InputError(f"shard_size must be >= 1, got {shard_size}")
    if n < 1:
        raise InputError("a sweep needs at least one item")
    folder = Path(folder)
    shards = [range(s, min(s + shard_size, n)) for s in range(0, n, shard_size)]
    keys = [_shard_key(spec, shard_tokens(r)) for r in shards]
    paths = [folder / f"shard-{k}.safetensors" for k in keys]
    mine = split(len(shards), dist.world)[dist.rank]
    for i in mine:  # a rank killed mid-write (SIGKILL, or torchrun's SIGTERM) leaves a temporary file
        clear_leftovers(paths[i])
    todo = [i for i in mine if not paths[i].exists()]
    desc = f"sweep shards (rank {dist.rank})" if dist.active else "sweep shards"
    for i in bar(todo, desc=desc) if progress else todo:
        tensors, meta = compute(shards[i])
        meta = {**meta, "spec": json.dumps(spec, sort_keys=True), "items": f"{shards[i].start}:{shards[i].stop}"}
        atomic_write(paths[i], save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=meta))
    done = torch.tensor([float(len(todo))], dtype=torch.float64)
    dist.sum_many_([done])
    dist.barrier()  # every shard is on disk (a shared folder) before anyone reads
    results, metas = [], []
    for p in paths:
        results.append(read_safetensors(p, "a sweep shard"))
        with safe_open(str(p), "pt") as f:
            metas.append(f.metadata() or {})
    return results, metas, {"shards": len(shards), "shards_computed": int(done),
                            "shards_reused": len(shards) - int(done), "spec": spec}


def sharded_patch(model: HookedModel, clean: torch.Tensor, corrupted: torch.Tensor, metric: Sequence,
                  site: str = "resid_pre", folder: str | Path = "sweep", shard_size: int = 8,
                  dist: Dist | None = None, progress: bool = True, **patch_kwargs) -> PatchResult:
    """:func:`~mechscope.techniques.patching.patch` over ``clean``/``corrupted`` ``[n, pos]`` in shards of prompts.

    The gathered per-prompt values give the same result as one :func:`patch` call (to float rounding);
    ``stats`` says how many shards were computed and how many reused. ``metric`` is a spec (see the
    module docstring). Other keyword arguments go to ``patch`` and into the specification.
    """
    _check_pairs(clean, corrupted)
    fn = metric_fn(metric)
    spec = {"technique": "patch", "site": site, "metric": list(metric), "model": model_fingerprint(model),
            "kwargs": {k: v for k, v in sorted(patch_kwargs.items())}}

    def compute(r: range):
        c, x = clean[r.start:r.stop], corrupted[r.start:r.stop]
        res = patch(model, c, x, fn, site=site, **patch_kwargs)
        with torch.no_grad():
            m_clean, m_corr = fn(model(c)), fn(model(x))
        per = res.per_prompt if res.per_prompt is not None else res.values[..., None]  # a one-prompt shard
        return ({"per_prompt": per.float(), "clean": m_clean, "corrupted": m_corr},
                {"axes": json.dumps(list(res.axes)), "labels": json.dumps(res.labels), "direction": res.direction})

    parts, metas, stats = run_sharded(compute, clean.shape[0], spec,
                                      _pair_tokens(clean, corrupted),
                                      folder, shard_size, dist, progress)
    per_prompt = torch.cat([p["per_prompt"] for p in parts], dim=-1)
    c, x = torch.cat([p["clean"] for p in parts]), torch.cat([p["corrupted"] for p in parts])
    m = metas[0]
    return PatchResult(site, m["direction"], per_prompt.mean(-1), tuple(json.loads(m["axes"])), json.loads(m["labels"]),
                       float(c.mean()), float(x.mean()), per_prompt, stats)


def sharded_ablate(model: HookedModel, tokens: torch.Tensor, metric: Sequence, components: Sequence[str],
                   method: str = "zero", reference: torch.Tensor | None = None, folder: str | Path = "sweep",
                   shard_size: int = 8, dist: Dist | None = None, seed: int = 0, progress: bool = True) -> AblationResult:
    """:func:`~mechscope.techniques.ablation.ablate` over ``tokens [n, pos]`` in shards of prompts.

    Mean ablation replaces with the mean over ``reference`` (default: all of ``tokens``), the same
    for every shard, so the gathered per-prompt values equal one call's; the CI is bootstrapped over
    all prompts. Resample ablation draws per batch and is refused here.
    """
    if method not in ("zero", "mean"):
        raise InputError(f"sharded ablation supports method 'zero' or 'mean', got {method!r} (resampling draws "
                         f"depend on the batch; run it with ablate in one process)")
    fn = metric_fn(metric)
    ref = tokens if (method == "mean" and reference is None) else reference
    spec = {"technique": "ablate", "metric": list(metric), "components": [str(c) for c in components],
            "method": method, "model": model_fingerprint(model),
            "reference": _shard_key({}, [ref]) if ref is not None else None}

    def compute(r: range):
        res = ablate(model, tokens[r.start:r.stop], fn, list(components), method=method, reference=ref, seed=seed,
                     n_boot=1)
        return {"baseline": res.baseline, "ablated": res.ablated}, {"components": json.dumps(res.components)}

    parts, metas, stats = run_sharded(compute, tokens.shape[0], spec, lambda r: [tokens[r.start:r.stop]], folder,
                                      shard_size, dist, progress)
    base = torch.cat([p["baseline"] for p in parts])
    abl = torch.cat([p["ablated"] for p in parts])
    return AblationResult(json.loads(metas[0]["components"]), method, base, abl,
                          bootstrap_ci(abl - base, seed=seed), extra={"sweep": stats})


def sharded_harvest(model: HookedModel, hook: str, tokens: torch.Tensor, folder: str | Path = "sweep",
                    shard_size: int = 8, dist: Dist | None = None, progress: bool = True, **harvest_kwargs) -> torch.Tensor:
    """:func:`~mechscope.sae.data.harvest` (for probes and SAEs) over ``tokens [n, pos]`` in shards of sequences;
    the gathered rows equal one call's, in order."""
    from .sae.data import harvest

    spec = {"technique": "harvest", "hook": hook, "model": model_fingerprint(model),
            "kwargs": {k: v for k, v in sorted(harvest_kwargs.items())}}
    parts, _, _ = run_sharded(lambda r: ({"acts": harvest(model, hook, tokens[r.start:r.stop], **harvest_kwargs)}, {}),
                              tokens.shape[0], spec, lambda r: [tokens[r.start:r.stop]], folder, shard_size, dist,
                              progress)
    return torch.cat([p["acts"] for p in parts])


def sharded_eap(model: HookedModel, clean: torch.Tensor, corrupted: torch.Tensor, metric: Sequence,
                folder: str | Path = "sweep", shard_size: int = 8, dist: Dist | None = None, ig_steps: int = 0,
                per_head: bool = True, progress: bool = True) -> dict[tuple[str, str], float]:
    """:func:`~mechscope.circuits.discovery.edge_attribution` (EAP, EAP-IG) over prompts in shards.

    Each shard's scores are its mean over its prompts; the gathered scores are the prompt-weighted mean
    of the shards', which is the mean over all prompts that one call gives (to float rounding).
    """
    from .circuits.discovery import edge_attribution

    _check_pairs(clean, corrupted)
    fn = metric_fn(metric)
    spec = {"technique": "eap", "metric": list(metric), "ig_steps": ig_steps, "per_head": per_head,
            "model": model_fingerprint(model)}

    def compute(r: range):
        scores = edge_attribution(model, clean[r.start:r.stop], corrupted[r.start:r.stop], fn, ig_steps, per_head)
        keys = sorted(scores)
        return ({"scores": torch.tensor([scores[k] for k in keys], dtype=torch.float64)},
                {"keys": json.dumps(keys), "n": str(len(r))})

    parts, metas, _ = run_sharded(compute, clean.shape[0], spec,
                                  _pair_tokens(clean, corrupted),
                                  folder, shard_size, dist, progress)
    keys = [tuple(k) for k in json.loads(metas[0]["keys"])]
    total = sum(int(m["n"]) for m in metas)
    acc = sum(p["scores"] * int(m["n"]) for p, m in zip(parts, metas)) / total
    return {k: float(v) for k, v in zip(keys, acc)}
