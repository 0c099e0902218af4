"""Activation patching (causal tracing), with a batched engine that recomputes only what changes.

Denoising runs the corrupted prompt and patches in clean activations; noising runs the clean
prompt and patches in corrupted ones (Meng et al. 2022; Wang et al. 2022; Heimersheim & Nanda
2024, "How to use and interpret activation patching"). For each patch ``j``::

    value_j = metric(model(base with site_j := source activation at site_j))

The engine gives the same numbers as one forward pass per patch (:func:`patch_naive`, tested to
1e-5) but:

- batches many patches into one forward pass (batch size chosen from free memory);
- starts each run at the patched block from the base run's cached residual stream
  (:meth:`HookedModel.run_from`), instead of re-running the blocks before it;
- for a patch at position ``p``, reuses the base run's keys and values for positions ``< p``
  (they cannot change under a causal mask) and computes only positions ``>= p``;
- computes only the last position's logits when the metric reads nothing else (detected exactly:
  the metric stays finite when every earlier position is NaN, see :func:`reads_last_only`);
- does not run patches that write bit-identical values (e.g. before the first differing token).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from . import viz
from .hooks import split_name

# site -> (hook suffix, what a head index refers to)
SITES = {
    "resid_pre": ("hook_resid_pre", None),
    "resid_mid": ("hook_resid_mid", None),
    "resid_post": ("hook_resid_post", None),
    "attn_out": ("hook_attn_out", None),
    "mlp_out": ("hook_mlp_out", None),
    "z": ("attn.hook_z", "head"),
    "q": ("attn.hook_q", "head"),
    "k": ("attn.hook_k", "kv_head"),
    "v": ("attn.hook_v", "kv_head"),
    "pattern": ("attn.hook_pattern", "head"),
}

Metric = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class PatchResult:
    """Metric after each patch. ``values`` has one axis per entry of ``axes`` (e.g. ``("layer", "pos")``).

    ``per_prompt`` adds a last axis over prompts when the metric returns one value per prompt.
    ``clean_value``/``corrupted_value`` are the metric on the unpatched runs.
    """

    site: str
    direction: str
    values: torch.Tensor
    axes: tuple[str, ...]
    labels: dict[str, list[str]]
    clean_value: float
    corrupted_value: float
    per_prompt: torch.Tensor | None = None
    stats: dict = field(default_factory=dict)

    def normalized(self) -> torch.Tensor:
        """``(value - corrupted) / (clean - corrupted)``: 0 = corrupted behaviour, 1 = clean behaviour."""
        gap = self.clean_value - self.corrupted_value
        if abs(gap) < 1e-8:
            raise ValueError("clean and corrupted metrics are equal: the corruption does not change the metric")
        return (self.values - self.corrupted_value) / gap

    def ci(self, key: tuple, level: float = 0.95):
        """Bootstrap CI over prompts of the normalised value at ``key`` (needs a per-prompt metric)."""
        from .validation import bootstrap_ci

        if self.per_prompt is None:
            return None
        gap = self.clean_value - self.corrupted_value
        return bootstrap_ci((self.per_prompt[key] - self.corrupted_value) / gap, level=level)

    def _flat(self):
        v = self.normalized()
        idx = torch.nonzero(torch.ones_like(v, dtype=torch.bool))
        names = [" ".join(f"{a}={self.labels[a][int(i)]}" for a, i in zip(self.axes, row)) for row in idx]
        return v.flatten(), names

    def top(self, k: int = 10) -> list[tuple[str, float]]:
        """The ``k`` patches with the largest normalised effect."""
        v, names = self._flat()
        order = v.abs().argsort(descending=True)[:k]
        return [(names[int(i)], float(v[i])) for i in order]

    def summary(self, k: int = 10) -> str:
        lines = [f"activation patching ({self.direction}) at {self.site}: {tuple(self.values.shape)} patches "
                 f"over {' x '.join(self.axes)}",
                 f"metric: clean {self.clean_value:.4f}, corrupted {self.corrupted_value:.4f}",
                 f"top {k} by normalised effect (0 = corrupted, 1 = clean):"]
        v = self.normalized()
        order = v.flatten().abs().argsort(descending=True)[:k]
        for i in order:
            key = tuple(int(x) for x in torch.unravel_index(i, v.shape))
            name = " ".join(f"{a}={self.labels[a][j]}" for a, j in zip(self.axes, key))
            row = f"  {name:40s} {float(v[key]):+.3f}"
            est = self.ci(key)
            if est is not None:
                row += f"  95% CI [{est.low:+.3f}, {est.high:+.3f}] over {est.n} prompts"
                row += "" if est.excludes(0.0) else "  (not distinguishable from 0)"
            lines.append(row)
        if self.stats:
            lines.append("engine: " + ", ".join(f"{k}={v}" for k, v in self.stats.items()))
        return "\n".join(lines)

    __str__ = __repr__ = summary

    def _grid(self):
        v = self.normalized()
        if v.dim() == 1:
            return v[None], ["metric"], self.labels[self.axes[0]]
        if v.dim() == 2:
            return v, self.labels[self.axes[0]], self.labels[self.axes[1]]
        # [layer, pos, head] -> rows layer.head, columns pos
        L, P, H = v.shape
        rows = [f"{self.labels['layer'][l]}.{h}" for l in range(L) for h in range(H)]
        return v.permute(0, 2, 1).reshape(L * H, P), rows, self.labels["pos"]

    def plot(self, path: str | Path = "patching.png") -> Path:
        grid, rows, cols = self._grid()
        return viz.heatmap_png(grid, rows, cols, path, title=f"patching {self.site} ({self.direction}), normalised",
                               diverging=True, xlabel=self.axes[-1] if len(self.axes) < 3 else "pos",
                               ylabel=self.axes[0])

    def to_html(self) -> str:
        grid, rows, cols = self._grid()
        return viz.heatmap_html(grid, rows, cols, title=f"patching {self.site} ({self.direction}), normalised",
                                diverging=True) + f"<pre>{viz.esc(self.summary())}</pre>"

    def _repr_html_(self) -> str:
        return self.to_html()


# ---------------------------------------------------------------------------------- inputs
def equal_length_tokens(model, x, purpose: str = "patching") -> torch.Tensor:
    """Text, texts or tokens -> ``[batch, pos]`` on the model's device; a clear error when texts differ in length
    (techniques that read fixed positions cannot use padded batches)."""
    if isinstance(x, torch.Tensor):
        return (x[None] if x.dim() == 1 else x).to(model.device)
    tokens, mask = model.tokenize(x)
    if not bool(mask.all()):
        raise ValueError(f"{purpose} needs prompts of one token length within a batch (it reads fixed positions); "
                         f"got lengths {mask.sum(-1).tolist()}")
    return tokens


def prompt_pair(model, clean, corrupted) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens for a clean/corrupted pair (text or tokens); an error showing both when lengths differ."""
    a, b = equal_length_tokens(model, clean), equal_length_tokens(model, corrupted)
    if a.shape != b.shape:
        def show(t):
            return model.to_str_tokens(t[0]) if model.tokenizer is not None else t[0].tolist()

        raise ValueError(
            f"clean and corrupted prompts must have the same token length; got {tuple(a.shape)} and "
            f"{tuple(b.shape)}.\n  clean:     {show(a)}\n  corrupted: {show(b)}"
        )
    return a, b


def _check_metric_value(v, n: int) -> torch.Tensor:
    v = torch.as_tensor(v).detach().float()
    if v.dim() > 1 or (v.dim() == 1 and v.shape[0] not in (1, n)):
        raise ValueError(f"the metric must return a scalar or one value per prompt ([{n}]), got shape {tuple(v.shape)}")
    return v


@dataclass
class _Job:
    layer: int  # layer of the hook point (for grids)
    start: int  # block to start the run at
    name: str  # hook to patch (None: patch the input of block `start`)
    pos: int | None
    head: int | None
    key: tuple  # index into the result grid
    p0: int = 0  # first position that must be recomputed


def _jobs(model, site, layers, positions, heads, per_position, P) -> tuple[list[_Job], tuple, dict]:
    n = model.cfg.n_layers
    layers = list(range(n)) if layers is None else list(layers)
    if isinstance(site, str) and site in SITES:
        suffix, head_kind = SITES[site]
        jobs = []
        if head_kind is None:
            positions = list(range(P)) if positions is None else list(positions)
            for li, l in enumerate(layers):
                for pi, p in enumerate(positions):
                    if site == "resid_pre":
                        jobs.append(_Job(l, l, None, p, None, (li, pi), p))
                    elif site == "resid_post":
                        jobs.append(_Job(l, l + 1, None, p, None, (li, pi), p))
                    else:
                        jobs.append(_Job(l, l, f"blocks.{l}.{suffix}", p, None, (li, pi), p))
            return jobs, ("layer", "pos"), {"layer": [str(l) for l in layers], "pos": positions}
        n_heads = model.cfg.n_heads if head_kind == "head" else model.cfg.n_kv_heads
        heads = list(range(n_heads)) if heads is None else list(heads)
        if per_position:
            positions = list(range(P)) if positions is None else list(positions)
            for li, l in enumerate(layers):
                for pi, p in enumerate(positions):
                    for hi, h in enumerate(heads):
                        p0 = 0 if site == "pattern" else p
                        jobs.append(_Job(l, l, f"blocks.{l}.{suffix}", p, h, (li, pi, hi), p0))
            return jobs, ("layer", "pos", head_kind), {"layer": [str(l) for l in layers], "pos": positions,
                                                        head_kind: [str(h) for h in heads]}
        for li, l in enumerate(layers):
            for hi, h in enumerate(heads):
                jobs.append(_Job(l, l, f"blocks.{l}.{suffix}", None, h, (li, hi), 0))
        return jobs, ("layer", head_kind), {"layer": [str(l) for l in layers], head_kind: [str(h) for h in heads]}
    # any hook name(s), patched whole (or through a user function)
    names = [site] if isinstance(site, str) else list(site)
    jobs = []
    for i, name in enumerate(names):
        model.manager.check(name)
        layer, _ = split_name(name)
        if layer is None:  # embeddings: run from the tokens (-1); the final norm: from the last block's output
            layer = n if name.startswith("ln_final") else -1
        jobs.append(_Job(layer, layer, name, None, None, (i,), 0))
    return jobs, ("hook",), {"hook": names}


def _write(act: torch.Tensor, src: torch.Tensor, rows: torch.Tensor, job: _Job, p0: int, fn, hook) -> None:
    """In place: patch ``act`` rows ``rows`` (one per prompt) with the source activation ``src`` [N, ...]."""
    pattern = hook is not None and hook.name.endswith(("hook_pattern", "hook_attn_scores"))
    if fn is not None:
        act[rows] = fn(act[rows], src, hook)
        return
    if job.pos is None and job.head is None:
        act[rows] = src[:, p0:] if not pattern else src[:, :, p0:]
    elif job.head is None:
        act[rows, job.pos - p0] = src[:, job.pos]
    elif pattern:  # [batch, head, q, k]
        if job.pos is None:
            act[rows, job.head] = src[:, job.head, p0:]
        else:
            act[rows, job.head, job.pos - p0] = src[:, job.head, job.pos]
    elif job.pos is None:
        act[rows, :, job.head] = src[:, p0:, job.head]
    else:
        act[rows, job.pos - p0, job.head] = src[:, job.pos, job.head]


def _is_noop(job: _Job, base, src, n_resid: int) -> bool:
    """Would this patch write exactly the values already there?"""
    if job.name is None:
        name = f"blocks.{job.start}.hook_resid_pre" if job.start < n_resid else f"blocks.{n_resid - 1}.hook_resid_post"
    else:
        name = job.name
    a, b = base[name], src[name]
    if name.endswith(("hook_pattern", "hook_attn_scores")):
        idx = (slice(None), job.head if job.head is not None else slice(None),
               job.pos if job.pos is not None else slice(None))
    else:
        idx = (slice(None), job.pos if job.pos is not None else slice(None)) + \
              ((job.head,) if job.head is not None else ())
    return torch.equal(a[idx], b[idx])


def _kv_names(model):
    k = "attn.hook_rot_k" if "blocks.0.attn.hook_rot_k" in model.hook_names else "attn.hook_k"
    return [f"blocks.{l}.{k}" for l in range(model.cfg.n_layers)], [f"blocks.{l}.attn.hook_v" for l in range(model.cfg.n_layers)]


def _prefix_cache(model, cache, p0: int, rows: int):
    """An HF DynamicCache holding the base run's keys/values for positions < p0, repeated for ``rows``."""
    from transformers import DynamicCache

    knames, vnames = _kv_names(model)
    n = cache[knames[0]].shape[0]
    c = DynamicCache(config=model.hf.config)
    reps = rows // n
    for l, (kn, vn) in enumerate(zip(knames, vnames)):
        k = cache[kn][:, :p0].transpose(1, 2).repeat(reps, 1, 1, 1)
        v = cache[vn][:, :p0].transpose(1, 2).repeat(reps, 1, 1, 1)
        c.update(k, v, l)
    return c


def reads_last_only(metric, last_logits: torch.Tensor, n_pos: int, max_elements: int = 50_000_000) -> bool:
    """True when ``metric`` reads only the last position: it stays finite with every earlier position NaN.

    ``last_logits`` is ``[batch, 1, d_vocab]``. Exact, and needs only the last position's logits.
    """
    N, _, V = last_logits.shape
    if N * n_pos * V > max_elements:
        return False
    probe = torch.full((N, n_pos, V), float("nan"), dtype=last_logits.dtype, device=last_logits.device)
    probe[:, -1:] = last_logits
    try:
        a = torch.as_tensor(metric(probe)).float()
        b = torch.as_tensor(metric(last_logits)).float()
    except (IndexError, RuntimeError, ValueError):
        return False
    return bool(torch.isfinite(a).all()) and a.shape == b.shape and torch.allclose(a, b, atol=1e-6, rtol=1e-6)


def _rows_budget(model, P: int, n_prompts: int, keep_all: bool) -> int:
    from .compute import env

    c = model.cfg
    elt = torch.finfo(model.dtype).bits // 8
    logits = (P if keep_all else 1) * c.d_vocab * 4 * 3
    per_row = logits + P * (c.d_model * 24 + c.d_mlp * 4) * elt + c.n_heads * P * P * elt * 2
    per_row += c.n_layers * P * c.n_kv_heads * c.d_head * 2 * elt
    free = env().free_memory if model.device.type == "cpu" else torch.cuda.mem_get_info(model.device)[0]
    rows = int(0.25 * free // max(per_row, 1))
    rows = max(n_prompts, min(rows, 256 * n_prompts))
    return rows - rows % n_prompts


def _plan(jobs: list[_Job], per_chunk: int, P: int, L: int, overhead: float) -> list[list[_Job]]:
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


@torch.no_grad()
def patch(
    model,
    clean,
    corrupted,
    metric: Metric,
    site: str | Sequence[str] = "resid_pre",
    direction: str = "denoise",
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    per_position: bool = False,
    fn: Callable | None = None,
    batch_size: int | None = None,
    reuse_prefix: bool = True,
    last_position_only: bool | None = None,
    overhead_tokens: float = 40.0,
    skip_identical: bool = True,
) -> PatchResult:
    """Activation patching over a grid of sites; see the module docstring.

    ``clean``/``corrupted``: text, a list of texts, or tokens ``[batch, pos]`` of equal length.
    ``metric(logits [batch, pos, d_vocab]) -> scalar or [batch]``.
    ``site``: ``resid_pre|resid_mid|resid_post|attn_out|mlp_out`` (grid ``[layer, pos]``);
    ``z|q|k|v|pattern`` (grid ``[layer, head]``, or ``[layer, pos, head]`` with ``per_position``;
    ``k``/``v`` index KV heads); or any hook name / list of names (patched whole, or through
    ``fn(base_act, source_act, hook) -> act``).
    ``direction``: ``"denoise"`` (clean into corrupted) or ``"noise"`` (corrupted into clean).
    ``batch_size``: patched prompts per forward pass (default: from free memory).
    ``skip_identical``: a patch whose source values equal the base values bit for bit (e.g. every
    position before the first token where the prompts differ) is not run; its value is the base run's.
    """
    if direction not in ("denoise", "noise"):
        raise ValueError(f"direction must be 'denoise' or 'noise', got {direction!r}")
    if isinstance(site, str) and site not in SITES and site not in model.hook_names:
        raise KeyError(f"unknown patching site {site!r}; use one of {sorted(SITES)} or a hook name "
                       f"(model.hook_names)")
    clean_t, corr_t = prompt_pair(model, clean, corrupted)
    N, P = clean_t.shape
    base_t, src_t = (corr_t, clean_t) if direction == "denoise" else (clean_t, corr_t)
    jobs, axes, labels = _jobs(model, site, layers, positions, heads, per_position, P)
    knames, vnames = _kv_names(model)
    site_names = sorted({j.name for j in jobs if j.name is not None})
    input_names = sorted({f"blocks.{j.start}.hook_resid_pre" for j in jobs if 0 <= j.start < model.cfg.n_layers})
    base_names = sorted(set(input_names) | set(knames) | set(vnames) | set(site_names) |
                        {f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"})
    src_resid = sorted({f"blocks.{j.start}.hook_resid_pre" if j.start < model.cfg.n_layers else
                        f"blocks.{model.cfg.n_layers - 1}.hook_resid_post" for j in jobs if j.name is None})
    base_logits, base = model.run_with_cache(base_t, names_filter=sorted(set(base_names) | set(src_resid)))
    src_logits, src = model.run_with_cache(src_t, names_filter=sorted(set(site_names) | set(src_resid)))
    clean_logits, corr_logits = (src_logits, base_logits) if direction == "denoise" else (base_logits, src_logits)
    clean_value = _check_metric_value(metric(clean_logits), N)
    corr_value = _check_metric_value(metric(corr_logits), N)
    if last_position_only is None:
        keep_last = all(reads_last_only(metric, lg[:, -1:], P) for lg in (clean_logits, corr_logits))
    else:
        keep_last = last_position_only
    rows_per = batch_size * N if batch_size else _rows_budget(model, P, N, not keep_last)
    per_chunk = max(1, rows_per // N)
    if not reuse_prefix:
        for j in jobs:
            j.p0 = 0
    # a patch that writes bit-identical values changes nothing: its value is the base run's, exactly
    base_value = _check_metric_value(metric(base_logits), N)
    values: dict[tuple, torch.Tensor] = {}
    if fn is None and skip_identical:
        live = []
        for j in jobs:
            if _is_noop(j, base, src, n_resid=model.cfg.n_layers):
                values[j.key] = base_value
            else:
                live.append(j)
    else:
        live = jobs
    chunks = _plan(live, per_chunk, P, model.cfg.n_layers, overhead_tokens)
    n_resid = model.cfg.n_layers

    def resid_in(start):  # what enters block `start` (or the final norm)
        if start < 0:
            return None
        return base[f"blocks.{start}.hook_resid_pre"] if start < n_resid else base[f"blocks.{n_resid - 1}.hook_resid_post"]

    def src_resid_in(start):
        return src[f"blocks.{start}.hook_resid_pre"] if start < n_resid else src[f"blocks.{n_resid - 1}.hook_resid_post"]

    token_layers = 0
    for chunk in chunks:
        start = min(j.start for j in chunk)
        p0 = min(j.p0 for j in chunk)
        J = len(chunk)
        x = resid_in(start)[:, p0:].repeat(J, 1, 1) if start >= 0 else None  # [J*N, P-p0, d]
        rows_of = [torch.arange(i * N, (i + 1) * N, device=model.device) for i in range(J)]
        hooks = []
        by_name: dict[str, list[int]] = {}
        for i, job in enumerate(chunk):
            if job.name is None and job.start == start:
                _write(x, src_resid_in(start), rows_of[i], job, p0, fn, None)
            else:  # patched later in the pass, through a hook
                name = job.name or (f"blocks.{job.start}.hook_resid_pre" if job.start < n_resid
                                    else f"blocks.{n_resid - 1}.hook_resid_post")
                by_name.setdefault(name, []).append(i)
        for name, idxs in by_name.items():
            def hook(act, h, _idxs=idxs):
                act = act.clone()
                for i in _idxs:
                    _write(act, src[h.name], rows_of[i], chunk[i], p0, fn, h)
                return act
            hooks.append((name, hook))
        past = _prefix_cache(model, base, p0, J * N) if p0 > 0 else None
        pos_ids = torch.arange(p0, P, device=model.device).expand(J * N, P - p0)
        with model.hooks(hooks):
            if start < 0:  # embedding hooks: a full forward pass from the tokens
                logits = model(base_t.repeat(J, 1))
            else:
                logits = model.run_from(start, x, position_ids=pos_ids, past_key_values=past,
                                        logits_to_keep=1 if keep_last else 0)
        token_layers += J * N * (P - p0) * (n_resid - max(start, 0))
        if not keep_last and p0 > 0:
            logits = torch.cat([base_logits[:, :p0].repeat(J, 1, 1), logits], dim=1)
        for i, job in enumerate(chunk):
            values[job.key] = _check_metric_value(metric(logits[i * N:(i + 1) * N]), N)
    floor = sum(N * (P - j.p0) * (n_resid - max(j.start, 0)) for j in live)
    shape = tuple(len(labels[a]) for a in axes)
    per_prompt = None
    first = next(iter(values.values()))
    if first.dim() == 1 and first.shape[0] == N and N > 1:
        per_prompt = torch.zeros(*shape, N)
        for k, v in values.items():
            per_prompt[k] = v
        grid = per_prompt.mean(-1)
    else:
        grid = torch.zeros(shape)
        for k, v in values.items():
            grid[k] = v.mean()
    site_label = site if isinstance(site, str) else "hooks"
    naive = len(jobs) * N * P * n_resid
    return PatchResult(site_label, direction, grid, axes, labels, float(clean_value.mean()), float(corr_value.mean()),
                       per_prompt, stats={"forward_passes": len(chunks), "patches": len(jobs),
                                          "skipped_identical": len(jobs) - len(live),
                                          "token_layers": token_layers, "floor_token_layers": floor,
                                          "naive_token_layers": naive, "last_position_only": keep_last})


@torch.no_grad()
def patch_naive(model, clean, corrupted, metric: Metric, site="resid_pre", direction="denoise", layers=None,
                positions=None, heads=None, per_position=False, fn=None) -> PatchResult:
    """The reference: one full forward pass per patch, through ``run_with_hooks``. Same result as :func:`patch`."""
    clean_t, corr_t = prompt_pair(model, clean, corrupted)
    N, P = clean_t.shape
    base_t, src_t = (corr_t, clean_t) if direction == "denoise" else (clean_t, corr_t)
    jobs, axes, labels = _jobs(model, site, layers, positions, heads, per_position, P)
    wants_result = any(j.name and j.name.endswith("hook_result") for j in jobs)
    _, src = model.run_with_cache(src_t, names_filter=(lambda n: True) if wants_result else None)
    clean_value = metric(model(clean_t))
    corr_value = metric(model(corr_t))
    grid = torch.zeros(tuple(len(labels[a]) for a in axes))
    rows = torch.arange(N)
    for job in jobs:
        name = job.name
        if name is None:  # resid_pre / resid_post: patch at the named hook directly
            name = f"blocks.{job.layer}.hook_{'resid_pre' if job.start == job.layer else 'resid_post'}"

        def hook(act, h, _job=job):
            act = act.clone()
            _write(act, src[h.name], rows, _job, 0, fn, h)
            return act

        logits = model.run_with_hooks(base_t, fwd_hooks=[(name, hook)])
        grid[job.key] = torch.as_tensor(metric(logits)).float().mean()
    return PatchResult(site if isinstance(site, str) else "hooks", direction, grid, axes, labels,
                       float(torch.as_tensor(clean_value).float().mean()),
                       float(torch.as_tensor(corr_value).float().mean()))
