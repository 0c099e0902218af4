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

:func:`patch` is three steps: :func:`~mechscope.techniques.patch_engine.plan_patches` (what to patch),
:func:`~mechscope.techniques.patch_engine.run_patches` (the batched passes), both in :mod:`.patch_engine`, and
:func:`assemble` (the result grid).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..analysis import viz
from ..analysis.validation import Estimate, bootstrap_ci
from ..core.errors import InputError
from ..core.hookpoints import block_name
from ..core.model import HookedModel
from ..core.result import Result
from ..core.types import Metric, TextOrTokens
from .inputs import PreparedPair, as_pair
from .patch_engine import SITES, PatchPlan, plan_patches, run_patches, write_patch  # noqa: F401 (SITES: its home)


@dataclass(repr=False)
class PatchResult(Result):
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
    stats: dict = field(default_factory=dict)  # the engine's counters: in --json and --debug, not in the summary
    tokens: list[str] | None = None  # the first clean prompt's tokens, for position labels
    corrupted_tokens: list[str] | None = None
    metric: str = "metric (unnamed)"
    clean_per_prompt: torch.Tensor | None = None  # [pair] the clean run's metric per prompt pair, where known
    corrupted_per_prompt: torch.Tensor | None = None

    def axis_labels(self, axis: str) -> list[str]:
        """Display labels of one axis: positions with their tokens (``11: ' big'``, and ``→`` the corrupted token
        where the first pair differs), other axes as they are."""
        if axis == "pos" and self.tokens is not None:
            return viz.position_labels(self.tokens, [int(p) for p in self.labels["pos"]], self.corrupted_tokens)
        return [str(x) for x in self.labels[axis]]

    def normalized(self) -> torch.Tensor:
        """``(value - corrupted) / (clean - corrupted)``: 0 = corrupted behaviour, 1 = clean behaviour."""
        gap = self.clean_value - self.corrupted_value
        if abs(gap) < 1e-8:
            raise InputError("clean and corrupted metrics are equal: the corruption does not change the metric")
        return (self.values - self.corrupted_value) / gap

    def restrict(self, pairs: torch.Tensor) -> "PatchResult":
        """The result on the prompt pairs ``pairs`` only: each patch's value is the mean of its per-prompt values over
        them, as patching those pairs alone gives (to float rounding), and so are the clean and corrupted values:
        patch once, then read any subset of the prompts (a split, a template) without patching again. A screened
        head patching (``find_circuit(screen_heads=K)``) is the exception: its candidates were chosen on all the
        pairs, and a subset's own screening may choose others."""
        from dataclasses import replace

        if self.per_prompt is None or self.clean_per_prompt is None or self.corrupted_per_prompt is None:
            raise InputError("restrict needs per-prompt values (a metric with one value per prompt, more than one pair)")
        pairs = torch.as_tensor(pairs, dtype=torch.long)
        pp = self.per_prompt[..., pairs]
        c, x = self.clean_per_prompt[pairs], self.corrupted_per_prompt[pairs]
        return replace(self, values=pp.mean(-1), per_prompt=pp, clean_value=float(c.mean()),
                       corrupted_value=float(x.mean()), clean_per_prompt=c, corrupted_per_prompt=x,
                       stats={**self.stats, "restricted_to_pairs": len(pairs)})

    def ci(self, key: tuple, level: float = 0.95) -> "Estimate | None":
        """Bootstrap CI over prompts of the normalised value at ``key`` (needs a per-prompt metric)."""
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
                 f"metric: {self.metric}",
                 f"  clean run {self.clean_value:+.4f}, corrupted run {self.corrupted_value:+.4f} (mean over prompts)"]
        if "pos" in self.axes and self.tokens is not None:
            lines.append("positions are labelled with the first prompt's tokens (→ its corrupted token where they "
                         "differ)")
        lines += self._top_lines(k)
        return "\n".join(lines)

    def _ci_text(self, key: tuple) -> str:
        est = self.ci(key)
        if est is None:
            return ""
        if not est.informative:
            return f"  ({est.n} prompts: too few for a CI)"
        return f"  95% CI [{est.low:+.3f}, {est.high:+.3f}] over {est.n} prompts" + (
            "" if est.excludes(0.0) else "  (not distinguishable from 0)")

    def _top_lines(self, k: int) -> list[str]:
        """The strongest patches, grouped so that the list carries information: a ``[layer, pos]`` grid by position
        (its strongest layer and the layers where it is at least half as strong), a ``[layer, pos, head]`` grid by
        head (its strongest position); other grids as a plain top-k."""
        v = self.normalized()
        head = "normalised effect: 0 = the corrupted run, 1 = the clean run"
        if self.axes[:2] == ("layer", "pos") and v.dim() in (2, 3):
            group_axis = 1 if v.dim() == 2 else None
            if group_axis == 1:  # one row per position
                best = v.abs().amax(0)
                order = best.argsort(descending=True)[:k]
                lines = [f"top {len(order)} positions by their strongest layer ({head}):"]
                pos_names = self.axis_labels("pos")
                for p in order.tolist():
                    col = v[:, p]
                    li = int(col.abs().argmax())
                    if float(best[p]) < 1e-6:
                        lines.append(f"  pos {pos_names[p]:28s} no effect at any layer")
                        continue
                    strong = (col.abs() >= 0.5 * col.abs().max()).nonzero().flatten().tolist()
                    span = viz.ranges([self.labels["layer"][i] for i in strong])
                    lines.append(f"  pos {pos_names[p]:28s} strongest at layer {self.labels['layer'][li]} "
                                 f"{float(col[li]):+.3f}{self._ci_text((li, p))}; at least half of it in layers {span}")
                return lines
            # [layer, pos, head]: one row per head, at its strongest position
            L, P, H = v.shape
            per_head = v.abs().amax(1)  # [layer, head]
            order = per_head.flatten().argsort(descending=True)[:k]
            lines = [f"top {len(order)} heads at their strongest position ({head}):"]
            pos_names = self.axis_labels("pos")
            hk = self.axes[2]
            for i in order.tolist():
                l, h = divmod(i, H)
                p = int(v[l, :, h].abs().argmax())
                lines.append(f"  L{self.labels['layer'][l]}H{self.labels[hk][h]} at pos {pos_names[p]:24s} "
                             f"{float(v[l, p, h]):+.3f}{self._ci_text((l, p, h))}")
            return lines
        lines = [f"top {k} by {head}:"]
        order = v.flatten().abs().argsort(descending=True)[:k]
        for i in order:
            key = tuple(int(x) for x in torch.unravel_index(i, v.shape))
            name = " ".join(f"{a}={self.axis_labels(a)[j]}" for a, j in zip(self.axes, key))
            lines.append(f"  {name:40s} {float(v[key]):+.3f}{self._ci_text(key)}")
        return lines

    def _dict_extra(self) -> dict:
        """Also under the short names the 0.1 CLI printed (``clean``, ``corrupted``)."""
        try:
            norm = self.normalized()
        except InputError:
            norm = None
        return {"normalized": norm, "clean": self.clean_value, "corrupted": self.corrupted_value}

    def grid(self) -> tuple[torch.Tensor, list[str], list[str]]:
        """The normalised values as a 2-D grid with its row and column labels (``[layer, pos, head]`` as
        rows ``layer.head`` x columns ``pos``), as the pictures draw it."""
        v = self.normalized()
        if v.dim() == 1:
            return v[None], ["metric"], self.axis_labels(self.axes[0])
        if v.dim() == 2:
            return v, self.axis_labels(self.axes[0]), self.axis_labels(self.axes[1])
        # [layer, pos, head] -> rows layer.head, columns pos
        L, P, H = v.shape
        rows = [f"{self.labels['layer'][l]}.{h}" for l in range(L) for h in range(H)]
        return v.permute(0, 2, 1).reshape(L * H, P), rows, self.axis_labels("pos")

    def plot(self, path: str | Path = "patching.png") -> Path:
        grid, rows, cols = self.grid()
        return viz.heatmap_png(grid, rows, cols, path, title=f"patching {self.site} ({self.direction}), normalised",
                               diverging=True, xlabel=self._xlabel(), ylabel=self.axes[0])

    def _xlabel(self) -> str:
        x = self.axes[-1] if len(self.axes) < 3 else "pos"
        return "position: token of the first prompt" if x == "pos" and self.tokens is not None else x

    def _html_body(self) -> str:
        grid, rows, cols = self.grid()
        return viz.heatmap_html(grid, rows, cols, title=f"patching {self.site} ({self.direction}), normalised",
                                diverging=True)



def label_result(res: PatchResult, model: HookedModel, clean: torch.Tensor, corrupted: torch.Tensor,
                 metric: Metric) -> PatchResult:
    """Give a patching result its token labels (the first pair's tokens) and its metric's name."""
    from ..analysis.metrics import describe_metric

    if model.tokenizer is not None:
        res.tokens, res.corrupted_tokens = model.to_str_tokens(clean[0]), model.to_str_tokens(corrupted[0])
    else:
        res.tokens, res.corrupted_tokens = [str(int(t)) for t in clean[0]], [str(int(t)) for t in corrupted[0]]
    res.metric = describe_metric(metric)
    return res



def assemble(plan: PatchPlan, values: dict[tuple, torch.Tensor], clean_value: "float | torch.Tensor",
             corrupted_value: "float | torch.Tensor", stats: dict | None = None) -> PatchResult:
    """The result grid from per-job metric values (with a per-prompt axis when the metric gives one).
    ``clean_value``/``corrupted_value``: the unpatched runs' metric, per prompt ``[N]`` or its mean."""
    N = plan.shape[0]
    r = plan.pair.rows_per_pair if plan.pair is not None else 1

    def by_pair(v: torch.Tensor) -> torch.Tensor:  # [..., N] -> [..., N // r]: a prompt pair's rows give one value
        return v.reshape(*v.shape[:-1], N // r, r).mean(-1) if r > 1 else v

    cv, xv = (torch.as_tensor(v, dtype=torch.float32).flatten().cpu() for v in (clean_value, corrupted_value))
    shape = tuple(len(plan.labels[a]) for a in plan.axes)
    first = next(iter(values.values()))
    per_prompt = None
    if first.dim() == 1 and first.shape[0] == N and N > 1:
        per_prompt = torch.zeros(*shape, N)
        for k, v in values.items():
            per_prompt[k] = v
        grid = per_prompt.mean(-1)
        per_prompt = by_pair(per_prompt)
    else:
        grid = torch.zeros(shape)
        for k, v in values.items():
            grid[k] = v.mean()
    site = plan.site if isinstance(plan.site, str) else "hooks"
    return PatchResult(site, plan.direction, grid, plan.axes, plan.labels, float(cv.mean()), float(xv.mean()),
                       per_prompt, stats=stats or {},
                       **({"clean_per_prompt": by_pair(cv), "corrupted_per_prompt": by_pair(xv)}
                          if per_prompt is not None and cv.numel() == N else {}))


@torch.no_grad()
def patch(
    model: HookedModel,
    clean: TextOrTokens | PreparedPair,
    corrupted: TextOrTokens | None = None,
    metric: Metric | None = None,
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
    ``metric(logits [batch, pos, d_vocab]) -> scalar or [batch]``. Or ``clean`` is a
    :class:`~mechscope.techniques.inputs.PreparedPair` alone: its two runs are shared with the other
    techniques given it.
    ``site``: ``resid_pre|resid_mid|resid_post|attn_out|mlp_out`` (grid ``[layer, pos]``);
    ``z|q|k|v|pattern`` (grid ``[layer, head]``, or ``[layer, pos, head]`` with ``per_position``;
    ``k``/``v`` index KV heads); or any hook name / list of names (patched whole, or through
    ``fn(base_act, source_act, hook) -> act``).
    ``direction``: ``"denoise"`` (clean into corrupted) or ``"noise"`` (corrupted into clean).
    ``batch_size``: patched prompts per forward pass (default: from free memory).
    ``skip_identical``: a patch whose source values equal the base values bit for bit (e.g. every
    position before the first token where the prompts differ) is not run; its value is the base run's.
    """
    if isinstance(clean, PreparedPair):
        metric = as_pair(model, clean, corrupted, metric).metric  # (checks that nothing else was given)
    elif corrupted is None or metric is None:
        raise InputError("patch needs the clean prompts, the corrupted prompts and a metric (or one PreparedPair)")
    plan = plan_patches(model, clean, corrupted, site, direction, layers, positions, heads, per_position)
    values, runs, stats = run_patches(model, plan, metric, fn, batch_size, reuse_prefix, last_position_only,
                                      overhead_tokens, skip_identical)
    res = assemble(plan, values, runs.clean_value, runs.corr_value, stats)
    clean_t, corr_t = (plan.source, plan.base) if direction == "denoise" else (plan.base, plan.source)
    return label_result(res, model, clean_t, corr_t, metric)


@torch.no_grad()
def patch_naive(model: HookedModel, clean: TextOrTokens, corrupted: TextOrTokens, metric: Metric,
                site: str | Sequence[str] = "resid_pre", direction: str = "denoise",
                layers: Sequence[int] | None = None, positions: Sequence[int] | None = None, heads: Sequence[int] | None = None,
                per_position: bool = False, fn: Callable | None = None) -> PatchResult:
    """The reference: one full forward pass per patch, through ``run_with_hooks``. Same result as :func:`patch`."""
    plan = plan_patches(model, clean, corrupted, site, direction, layers, positions, heads, per_position)
    wants_result = any(j.name and j.name.endswith("hook_result") for j in plan.jobs)
    _, src = model.run_with_cache(plan.source, names_filter=(lambda n: True) if wants_result else None)
    base_t, src_t = plan.base, plan.source
    clean_t, corr_t = (src_t, base_t) if direction == "denoise" else (base_t, src_t)
    rows = torch.arange(plan.shape[0])
    values = {}
    for job in plan.jobs:
        name = job.name or block_name(job.layer, "hook_resid_pre" if job.start == job.layer else "hook_resid_post")

        def hook(act, h, _job=job):
            act = act.clone()
            write_patch(act, src[h.name], rows, _job, 0, fn, h)
            return act

        values[job.key] = torch.as_tensor(metric(model.run_with_hooks(base_t, fwd_hooks=[(name, hook)]))).float().mean()
    res = assemble(plan, values, float(torch.as_tensor(metric(model(clean_t))).float().mean()),
                   float(torch.as_tensor(metric(model(corr_t))).float().mean()))
    return label_result(res, model, clean_t, corr_t, metric)


