"""The patching engine: what :func:`~mechscope.techniques.patching.patch` runs, apart from its API and result.

Three parts, each testable alone: the plan (:func:`plan_patches`: every patch as a job with its site, rows and
positions), the runs (:func:`run_patches`: the base and source runs, then the jobs in chunks of batched forward passes
that start at the patched block from the cached residual stream and reuse the keys and values of unchanged earlier
positions), and the writes into activations (:func:`write_patch`, shared with the one-pass-per-patch reference).
The maths and the guarantees are in :mod:`mechscope.techniques.patching`'s docstring.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..batching import BatchState, map_batches
from ..core.errors import InputError, UnknownNameError
from ..core.hookpoints import PATCH_SITES, act_name, block_name, split_name
from ..core.hooks import HookPoint
from ..core.model import HookedModel
from ..core.progress import bar
from ..core.types import Metric, TextOrTokens
from ..core.work import add_floor
from .inputs import PreparedPair, check_range, metric_value, prompt_pair, reads_last_only

#: patching sites by shorthand: (hook suffix, what a head index refers to); from the hook-point registry
SITES = PATCH_SITES


# ---------------------------------------------------------------------------------- the plan
def resid_in_name(start: int, n_layers: int) -> str:
    """The hook holding what enters block ``start``: its ``hook_resid_pre``, or the last block's output for the final norm."""
    return block_name(start, "hook_resid_pre") if start < n_layers else block_name(n_layers - 1, "hook_resid_post")


@dataclass
class _Job:
    layer: int  # layer of the hook point (for grids)
    start: int  # block to start the run at
    name: str | None  # hook to patch (None: patch the input of block `start`)
    pos: int | None
    head: int | None
    key: tuple  # index into the result grid
    p0: int = 0  # first position that must be recomputed
    stop: int | None = None  # a whole-sequence patch writes positions < stop (the prompt's, before an answer)


@dataclass
class PatchPlan:
    """What :func:`patch` will do: the jobs, the grid they fill, and which tokens are base and source."""

    site: str | list[str]
    direction: str
    base: torch.Tensor  # [N, P] the run patched into
    source: torch.Tensor  # [N, P] the run patched from
    jobs: list[_Job]
    axes: tuple[str, ...]
    labels: dict[str, list]
    pair: PreparedPair | None = None  # the prepared task whose clean and corrupted runs the patches start from

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.base.shape)


def _site_jobs(model, site, layers, positions, heads, per_position, P) -> tuple[list[_Job], tuple, dict]:
    suffix, head_kind = SITES[site]
    positions = check_range("positions", positions, P)
    if head_kind == "expert":  # only the MoE blocks have a router
        layers = [l for l in layers if l in (model.cfg.moe_layers or [])]
    layer_labels = {"layer": [str(l) for l in layers]}
    if head_kind is None:  # [layer, pos]; resid_pre/post patch the stream entering a block directly
        start_of = {"resid_pre": 0, "resid_post": 1}
        jobs = [_Job(l, l + start_of.get(site, 0), None if site in start_of else block_name(l, suffix), p, None,
                     (li, pi), p) for li, l in enumerate(layers) for pi, p in enumerate(positions)]
        return jobs, ("layer", "pos"), {**layer_labels, "pos": positions}
    n_heads = {"head": model.cfg.n_heads, "kv_head": model.cfg.n_kv_heads, "expert": model.cfg.n_experts}[head_kind]
    heads = check_range(f"{head_kind}s", heads, n_heads)
    head_labels = {head_kind: [str(h) for h in heads]}
    if per_position:  # [layer, pos, head]; a pattern patch changes every later query, so it starts at 0
        jobs = [_Job(l, l, block_name(l, suffix), p, h, (li, pi, hi), 0 if site == "pattern" else p)
                for li, l in enumerate(layers) for pi, p in enumerate(positions) for hi, h in enumerate(heads)]
        return jobs, ("layer", "pos", head_kind), {**layer_labels, "pos": positions, **head_labels}
    jobs = [_Job(l, l, block_name(l, suffix), None, h, (li, hi), 0)
            for li, l in enumerate(layers) for hi, h in enumerate(heads)]
    return jobs, ("layer", head_kind), {**layer_labels, **head_labels}


def _hook_jobs(model, names: list[str]) -> tuple[list[_Job], tuple, dict]:
    """Any hook names, each patched whole (or through a user function)."""
    jobs = []
    for i, name in enumerate(names):
        model.manager.check(name)
        layer, _ = split_name(name)
        if layer is None:  # embeddings: run from the tokens (-1); the final norm: from the last block's output
            layer = model.cfg.n_layers if name.startswith("ln_final") else -1
        jobs.append(_Job(layer, layer, name, None, None, (i,), 0))
    return jobs, ("hook",), {"hook": names}


def plan_patches(model: HookedModel, clean: TextOrTokens | PreparedPair, corrupted: TextOrTokens | None,
                 site: str | Sequence[str] = "resid_pre", direction: str = "denoise",
                 layers: Sequence[int] | None = None, positions: Sequence[int] | None = None,
                 heads: Sequence[int] | None = None, per_position: bool = False) -> PatchPlan:
    """Check the arguments and list the patches (see :func:`patch` for their meaning). ``clean`` may be a
    :class:`~mechscope.techniques.inputs.PreparedPair` (``corrupted`` None): the patches then start from its runs."""
    if direction not in ("denoise", "noise"):
        raise InputError(f"direction must be 'denoise' or 'noise', got {direction!r}")
    if isinstance(site, str) and site not in SITES and not model.has_hook(site):
        raise UnknownNameError(f"unknown patching site {site!r}; use one of {sorted(SITES)} or a hook name "
                               f"(model.hook_names)")
    pair = clean if isinstance(clean, PreparedPair) else None
    if pair is not None and corrupted is not None:
        raise InputError("a prepared pair carries its own corrupted prompts: pass it alone")
    clean_t, corr_t = (pair.clean, pair.corrupted) if pair is not None else prompt_pair(model, clean, corrupted)
    base, source = (corr_t, clean_t) if direction == "denoise" else (clean_t, corr_t)
    stop = pair.prompt_len if pair is not None else None
    if isinstance(site, str) and site in SITES:
        layers = check_range("layers", layers, model.cfg.n_layers)
        if positions is None and stop is not None:  # the prompt's positions, not the answer continuation's
            positions = range(stop)
        jobs, axes, labels = _site_jobs(model, site, layers, positions, heads, per_position, clean_t.shape[1])
    else:
        jobs, axes, labels = _hook_jobs(model, [site] if isinstance(site, str) else list(site))
    for j in jobs:
        j.stop = stop if j.pos is None else None
    return PatchPlan(site, direction, base, source, jobs, axes, labels, pair)


# ---------------------------------------------------------------------------------- the runs
@dataclass
class _BaseRuns:
    """The unpatched base and source runs: the caches patches start from and read, and the metric on them."""

    base: object  # ActivationCache
    src: object
    base_logits: torch.Tensor
    clean_value: torch.Tensor
    corr_value: torch.Tensor
    base_value: torch.Tensor
    keep_last: bool


def kv_prefix_exact(model: HookedModel) -> bool:
    """Whether :func:`kv_hook_names` hold what attention caches, so that a prefix's keys and values can stand in for
    running it: keys after the rotary embedding (a ``hook_rot_k``), or keys of a model without one. Falcon rotates
    inside its own attention code, past every hook: its prefixes are run again instead."""
    return model.has_hook(act_name("rot_k", 0)) or model.cfg.positional != "rotary"


def kv_hook_names(model: HookedModel) -> tuple[list[str], list[str]]:
    """Per layer, the hooks holding the keys and values attention uses (post-rotary keys where there are any)."""
    k = "attn.hook_rot_k" if model.has_hook(act_name("rot_k", 0)) else "attn.hook_k"
    n = model.cfg.n_layers
    return [block_name(l, k) for l in range(n)], [block_name(l, "attn.hook_v") for l in range(n)]


def _base_runs(model, plan: PatchPlan, metric, last_position_only) -> _BaseRuns:
    n = model.cfg.n_layers
    N, P = plan.shape
    knames, vnames = kv_hook_names(model)
    site_names = {j.name for j in plan.jobs if j.name is not None}
    inputs = {block_name(j.start, "hook_resid_pre") for j in plan.jobs if 0 <= j.start < n}
    src_resid = {resid_in_name(j.start, n) for j in plan.jobs if j.name is None}
    base_names = inputs | set(knames) | set(vnames) | site_names | {block_name(n - 1, "hook_resid_post")} | src_resid
    src_names = site_names | src_resid
    if plan.pair is not None:  # the prepared task's runs, shared with the other techniques given it
        base_which, src_which = ("corrupted", "clean") if plan.direction == "denoise" else ("clean", "corrupted")
        (base_logits, base), (src_logits, src) = plan.pair.run(base_which, base_names), plan.pair.run(src_which,
                                                                                                        src_names)
    else:
        base_logits, base = model.run_with_cache(plan.base, names_filter=sorted(base_names))
        src_logits, src = model.run_with_cache(plan.source, names_filter=sorted(src_names))
        add_floor(2 * N * P * n)  # the two unpatched runs every patch starts from
    clean_logits, corr_logits = (src_logits, base_logits) if plan.direction == "denoise" else (base_logits, src_logits)
    if last_position_only is None:
        keep_last = all(reads_last_only(metric, lg[:, -1:], P) for lg in (clean_logits, corr_logits))
    else:
        keep_last = last_position_only
    return _BaseRuns(base, src, base_logits, metric_value(metric(clean_logits), N),
                     metric_value(metric(corr_logits), N), metric_value(metric(base_logits), N), keep_last)


def _chunk_hooks(chunk: list[_Job], start: int, src, rows_of, p0: int, fn, n: int) -> list:
    """Forward hooks writing each job's source values into its rows, for jobs patched after block ``start``."""
    by_name: dict[str, list[int]] = {}
    for i, job in enumerate(chunk):
        if not (job.name is None and job.start == start):
            by_name.setdefault(job.name or resid_in_name(job.start, n), []).append(i)
    hooks = []
    for name, idxs in by_name.items():
        def hook(act, h, _idxs=idxs):
            act = act.clone()
            for i in _idxs:
                write_patch(act, src[h.name], rows_of[i], chunk[i], p0, fn, h)
            return act
        hooks.append((name, hook))
    return hooks


def _run_chunk(model, plan: PatchPlan, runs: _BaseRuns, chunk: list[_Job], fn) -> torch.Tensor:
    """One batched forward pass for the jobs of ``chunk``: logits ``[J*N, pos, d_vocab]``."""
    n = model.cfg.n_layers
    N, P = plan.shape
    start, p0, J = min(j.start for j in chunk), min(j.p0 for j in chunk), len(chunk)
    rows_of = [torch.arange(i * N, (i + 1) * N, device=model.device) for i in range(J)]
    x = runs.base[resid_in_name(start, n)][:, p0:].repeat(J, 1, 1) if start >= 0 else None  # [J*N, P-p0, d]
    for i, job in enumerate(chunk):  # patches of the stream entering `start` are written into x directly
        if job.name is None and job.start == start:
            write_patch(x, runs.src[resid_in_name(start, n)], rows_of[i], job, p0, fn, None)
    past = prefix_cache(model, runs.base, p0, J * N) if p0 > 0 else None
    pos_ids = torch.arange(p0, P, device=model.device).expand(J * N, P - p0)
    with model.hooks(_chunk_hooks(chunk, start, runs.src, rows_of, p0, fn, n)):
        if start < 0:  # embedding hooks: a full forward pass from the tokens
            return model(plan.base.repeat(J, 1))
        logits = model.run_from(start, x, position_ids=pos_ids, past_key_values=past,
                                logits_to_keep=1 if runs.keep_last else 0)
    if not runs.keep_last and p0 > 0:
        logits = torch.cat([runs.base_logits[:, :p0].repeat(J, 1, 1), logits], dim=1)
    return logits


def run_patches(model: HookedModel, plan: PatchPlan, metric: Metric, fn: Callable | None = None, batch_size: int | None = None,
                reuse_prefix: bool = True, last_position_only: bool | None = None, overhead_tokens: float = 40.0,
                skip_identical: bool = True) -> tuple[dict[tuple, torch.Tensor], _BaseRuns, dict]:
    """Run every patch of ``plan``; returns ``({grid key: metric value}, the base runs, engine statistics)``."""
    n = model.cfg.n_layers
    N, P = plan.shape
    runs = _base_runs(model, plan, metric, last_position_only)
    per_chunk = max(1, (batch_size * N if batch_size else _rows_budget(model, P, N, not runs.keep_last)) // N)
    if not reuse_prefix or not kv_prefix_exact(model):
        for j in plan.jobs:
            j.p0 = 0
    values: dict[tuple, torch.Tensor] = {}
    live = []
    for j in plan.jobs:  # a patch that writes bit-identical values changes nothing: the base run's value, exactly
        if fn is None and skip_identical and _is_noop(j, runs.base, runs.src, n_resid=n):
            values[j.key] = runs.base_value
        else:
            live.append(j)
    chunks = _schedule(live, per_chunk, P, n, overhead_tokens)
    token_layers, passes, state = 0, 0, BatchState()

    def run(chunk: list[_Job]) -> int:  # one batched pass; returns its token-layers
        logits = _run_chunk(model, plan, runs, chunk, fn)
        for i, job in enumerate(chunk):
            values[job.key] = metric_value(metric(logits[i * N:(i + 1) * N]), N)
        start, p0 = min(j.start for j in chunk), min(j.p0 for j in chunk)
        return len(chunk) * N * (P - p0) * (n - max(start, 0))

    for chunk in bar(chunks, desc=f"patching ({len(live)} patches)"):  # out of memory: half-size passes (mechscope.batching)
        done = map_batches(lambda s, e, _c=chunk: run(_c[s:e]), len(chunk), len(chunk), what="patching", state=state)
        token_layers, passes = token_layers + sum(done), passes + len(done)
    stats = {"forward_passes": passes, "patches": len(plan.jobs), "skipped_identical": len(plan.jobs) - len(live),
             "token_layers": token_layers,
             "floor_token_layers": sum(N * (P - j.p0) * (n - max(j.start, 0)) for j in live),
             "naive_token_layers": len(plan.jobs) * N * P * n, "last_position_only": runs.keep_last}
    add_floor(stats["floor_token_layers"])
    return values, runs, stats


# ---------------------------------------------------------------------------------- engine parts
def write_patch(act: torch.Tensor, src: torch.Tensor, rows: torch.Tensor, job: _Job, p0: int,
                fn: Callable | None, hook: HookPoint | None) -> None:
    """In place: patch ``act`` rows ``rows`` (one per prompt) with the source activation ``src`` [N, ...]."""
    pattern = hook is not None and hook.name.endswith(("hook_pattern", "hook_attn_scores"))
    src, rows = src.to(act.device), rows.to(act.device)  # the hook's layer may sit on another device
    if fn is not None:
        act[rows] = fn(act[rows], src, hook)
        return
    stop = job.stop if job.stop is not None else src.shape[2 if pattern else 1]
    if job.pos is None and job.head is None:
        if pattern:
            act[rows, :, :stop - p0] = src[:, :, p0:stop]
        else:
            act[rows, :stop - p0] = src[:, p0:stop]
    elif job.head is None:
        act[rows, job.pos - p0] = src[:, job.pos]
    elif pattern:  # [batch, head, q, k]
        if job.pos is None:
            act[rows, job.head, :stop - p0] = src[:, job.head, p0:stop]
        else:
            act[rows, job.head, job.pos - p0] = src[:, job.head, job.pos]
    elif job.pos is None:
        act[rows, :stop - p0, job.head] = src[:, p0:stop, job.head]
    else:
        act[rows, job.pos - p0, job.head] = src[:, job.pos, job.head]


def _is_noop(job: _Job, base, src, n_resid: int) -> bool:
    """Would this patch write exactly the values already there?"""
    name = job.name or resid_in_name(job.start, n_resid)
    a, b = base[name], src[name]
    if name.endswith(("hook_pattern", "hook_attn_scores")):
        idx = (slice(None), job.head if job.head is not None else slice(None),
               job.pos if job.pos is not None else slice(None))
    else:
        idx = (slice(None), job.pos if job.pos is not None else slice(None)) + \
              ((job.head,) if job.head is not None else ())
    return torch.equal(a[idx], b[idx])


def prefix_cache(model: HookedModel, cache: dict, p0: int, rows: int) -> object:
    """An HF DynamicCache holding the base run's keys/values for positions < p0, repeated for ``rows``. One prompt's
    (a shared prefix's) is broadcast, not copied: the cache's first extension makes the one copy it needs."""
    from transformers import DynamicCache

    knames, vnames = kv_hook_names(model)
    n = cache[knames[0]].shape[0]
    c = DynamicCache(config=model.hf.config)
    reps = rows // n

    def rows_of(t: torch.Tensor) -> torch.Tensor:
        t = t[:, :p0].transpose(1, 2)  # [n, kv heads, p0, d_head]
        return t.expand(reps, *t.shape[1:]) if n == 1 else t.repeat(reps, 1, 1, 1)

    for l, (kn, vn) in enumerate(zip(knames, vnames)):
        c.update(rows_of(cache[kn]), rows_of(cache[vn]), l)
    return c


def _rows_budget(model, P: int, n_prompts: int, keep_all: bool) -> int:
    from ..batching import compute_cap
    from ..compute import free_memory, patching_bytes

    elt = torch.finfo(model.dtype).bits // 8
    per_row = patching_bytes(model.cfg.to_dict(), 1, P, elt, all_logits=keep_all)
    rows = int(0.25 * free_memory(model.device) // max(per_row, 1))
    knee = compute_cap(model.device, P)  # a CPU runs no faster past its knee; memory grows on (mechscope.batching)
    rows = max(n_prompts, min(rows, 256 * n_prompts, knee if knee is not None else rows))
    return rows - rows % n_prompts


def _schedule(jobs: list[_Job], per_chunk: int, P: int, L: int, overhead: float) -> list[list[_Job]]:
    """Group jobs into batched passes, trading batch size against skipped blocks and reused prefixes.

    A pass starts at the lowest block of its jobs and recomputes from the lowest ``p0``; its cost is
    ``(L - start) * (overhead + jobs * (P - p0))`` in token-layers (``overhead``: the fixed cost of
    running one block once, in token-layers). Minimised by dynamic programming over the jobs sorted by
    (start, -p0), with at most ``per_chunk`` jobs per pass.
    """
    js = sorted(jobs, key=lambda j: (j.start, -j.p0))
    m = len(js)
    best = [0.0] + [float("inf")] * m
    cut = [0] * (m + 1)
    for e in range(1, m + 1):
        p0 = P
        for s in range(e - 1, max(0, e - per_chunk) - 1, -1):
            p0 = min(p0, js[s].p0)
            cost = best[s] + (L - max(js[s].start, 0)) * (overhead + (e - s) * (P - p0))
            if cost < best[e]:
                best[e], cut[e] = cost, s
    e, parts = m, []
    while e > 0:
        parts.append(js[cut[e]:e])
        e = cut[e]
    return parts[::-1]
