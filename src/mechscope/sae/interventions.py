"""Causal tests of SAE features: ablate them, steer with them, each against a control that could show the same.

- :func:`ablate_features_hook` removes features' contributions and keeps the SAE's error term,
  ``x - sum_i f_i(x) W_dec[i] / scale`` (Marks et al. 2024, "Sparse Feature Circuits").
- :func:`compare_features_to_random`: the ablation effect of features against control features that
  are *active on the same prompts at a similar activation* (a feature that never fires has an effect
  of exactly 0, which makes any effect look real), with a rank p-value and a paired CI.
- :func:`feature_scale` and :func:`steer_hook`: steering strength in units of the feature's typical
  activation (its 99th percentile where it fires), not in raw activation units whose meaning
  changes with every model and layer (Templeton et al. 2024 clamp features at multiples of their max).
- :func:`steering_sweep`: a metric across strengths, beside a random direction of the same norm.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..analysis import viz
from ..analysis.metrics import describe_metric
from ..analysis.validation import MIN_CI_N, bootstrap_ci, paired_bootstrap
from ..core.errors import InputError
from ..core.model import HookedModel
from ..core.progress import bar, stage
from ..core.result import Result
from ..core.types import Metric, TextOrTokens
from ..techniques.ablation import AblationResult, BaselineComparison
from ..techniques.inputs import batched_metric, equal_length_tokens, hook_block, plain_run
from .data import harvest, token_keep_mask
from .model import SAE


def ablate_features_hook(sae: SAE, features: Sequence[int]) -> Callable:
    """A hook that removes ``features``' contributions and keeps the SAE's error term:
    ``x - sum_i f_i(x) W_dec[i] / scale``."""
    feats = torch.as_tensor(list(features), dtype=torch.long)

    @torch.no_grad()
    def hook(act, h):
        f = sae.encode(act.float())
        removed = f[..., feats] @ sae.W_dec[feats] / sae.input_scale
        return (act.float() - removed).to(act.dtype)

    return hook


def steer_hook(sae: SAE, feature: int, strength: float, scale: float = 1.0) -> Callable:
    """A hook adding ``strength * scale * W_dec[feature]`` (raw activation space) at every position.

    ``scale`` is the unit of ``strength``: pass :func:`feature_scale` (the feature's 99th-percentile activation)
    and ``strength=1`` adds as much of the feature as it has when it fires strongly; the default 1.0 means raw
    activation units. Use it in ``run_with_hooks`` or ``generate(fwd_hooks=...)``."""
    direction = (sae.W_dec[feature] / sae.input_scale).detach() * float(scale)

    def hook(act, h):
        return act + strength * direction.to(act.device, act.dtype)

    return hook


@torch.no_grad()
def _feature_acts(model: HookedModel, sae: SAE, tokens: torch.Tensor, rows: bool = False):
    """``[n, pos, d_sae]`` feature activations on ``tokens``; positions the SAE was not trained on are zero.
    ``rows=True`` adds ``[n, d_sae]`` bool: the prompts where each feature is nonzero at any position, those
    included (where :func:`ablate_features_hook`, which encodes every position, changes the stream)."""
    acts = harvest(model, sae.cfg.hook_name, tokens, skip_first=0, max_norm_ratio=None)
    keep = token_keep_mask(acts.reshape(*tokens.shape, -1), 1, 10.0)
    f = sae.encode(acts).reshape(*tokens.shape, -1)
    return (f * keep[..., None], (f > 0).any(1)) if rows else f * keep[..., None]


@torch.no_grad()
def feature_scale(model: HookedModel, sae: SAE, feature: int, tokens: torch.Tensor, q: float = 0.99) -> float:
    """The feature's typical strong activation: the ``q`` quantile of its nonzero activations on ``tokens``
    ``[n, pos]``. Raises when it never fires there (no scale to steer in)."""
    f = _feature_acts(model, sae, tokens)[..., feature]
    nz = f[f > 0].float()
    if nz.numel() == 0:
        raise InputError(f"feature {feature} never fires on these {tokens.numel()} tokens: no typical activation to "
                         "steer in units of; give text on which it fires, or pass scale= yourself")
    return float(torch.quantile(nz, q))


@dataclass(repr=False)
class SteeringSweep(Result):
    """A metric across steering strengths, beside a random direction of the same norm at each strength."""

    feature: int
    strengths: list[float]
    scale: float  # raw activation units per strength unit
    quantile: float
    values: torch.Tensor  # [strength, prompt]
    control: torch.Tensor  # [strength, prompt]: a random direction of the same norm
    metric: str = "metric (unnamed)"

    def summary(self) -> str:
        lines = [f"steering with feature {self.feature}: strength in units of its {self.quantile:.0%} activation "
                 f"quantile, scale {self.scale:.4g} raw units", f"metric: {self.metric}",
                 f"{'strength':>9s} {'feature':>24s} {'random direction':>24s}"]
        def cell(e) -> str:
            return f"{e.value:+10.4f} [{e.low:+.3f}, {e.high:+.3f}]" if e.informative else f"{e.value:+10.4f}{'':16s}"

        for i, s in enumerate(self.strengths):
            lines.append(f"{s:9.3g} {cell(bootstrap_ci(self.values[i]))} {cell(bootstrap_ci(self.control[i]))}")
        n = self.values.shape[1]
        lines.append(f"(mean over {n} prompts" + (", 95% CIs)" if n >= MIN_CI_N else
                                                   f": too few for CIs, which need {MIN_CI_N}+)"))
        base = float(self.values[0].mean()) if self.strengths and self.strengths[0] == 0 else None
        if base is not None:
            diff = (self.values - self.control).mean(1)
            best = int(diff.abs().argmax())
            lines.append(f"largest gap over the random direction: {float(diff[best]):+.4f} at strength "
                         f"{self.strengths[best]:g}; if the two columns move together, the effect is generic "
                         "(any push of this size), not the feature's")
        return "\n".join(lines)

    def plot(self, path: str | Path = "steering.png") -> Path:
        fig, ax = viz.figure(figsize=(6, 4))
        for vals, name in ((self.values, f"feature {self.feature}"), (self.control, "random direction")):
            ests = [bootstrap_ci(v) for v in vals]
            viz.line_with_band(ax, self.strengths, [e.value for e in ests], [e.low for e in ests],
                               [e.high for e in ests], name)
        ax.set_xlabel(f"strength (x {self.scale:.3g}, the feature's {self.quantile:.0%} activation)")
        ax.set_ylabel(self.metric.split(",")[0])
        ax.legend()
        return viz.save_figure(fig, path)


@torch.no_grad()
def steering_sweep(model: HookedModel, sae: SAE, feature: int, tokens: TextOrTokens, metric: Metric,
                   strengths: Sequence[float] = (0, 0.5, 1, 2, 4, 8), scale: float | None = None,
                   scale_tokens: torch.Tensor | None = None, q: float = 0.99, seed: int = 0) -> SteeringSweep:
    """``metric`` (one value per prompt) with ``strength * scale * W_dec[feature]`` added at the SAE's hook, for
    each strength, and the same with a random direction of the same norm (the control).

    ``scale`` defaults to :func:`feature_scale` on ``scale_tokens`` (default: the prompts themselves)."""
    toks = equal_length_tokens(model, tokens, "steering")
    if scale is None:
        scale = feature_scale(model, sae, feature, toks if scale_tokens is None else scale_tokens, q)
    stage(f"steering feature {feature}: 1 strength unit = {scale:.4g} raw units (its {q:.0%} activation)")
    g = torch.Generator().manual_seed(seed)
    d = (sae.W_dec[feature] / sae.input_scale).detach().float()
    rnd = torch.randn(d.shape, generator=g)
    rnd = rnd / rnd.norm() * d.norm()
    hook = sae.cfg.hook_name
    plain = plain_run(model, toks, metric, [hook_block(hook)], what="steering")  # strength 0, and where runs resume

    def run(direction: torch.Tensor, s: float) -> torch.Tensor:
        vec = (s * scale * direction)

        def add(act, h):
            return act + vec.to(act.device, act.dtype)

        if not s:  # nothing added: the unhooked run
            return plain.value.float().cpu()
        return batched_metric(model, toks, metric, lambda a, b: [(hook, add)], what="steering", plain=plain,
                              start=hook_block(hook)).float().cpu()

    vals, ctrl = [], []
    for s in bar(list(strengths), desc="steering strengths"):
        vals.append(run(d, s))
        ctrl.append(run(rnd, s))
    return SteeringSweep(feature, [float(s) for s in strengths], float(scale), q, torch.stack(vals), torch.stack(ctrl),
                         describe_metric(metric))


def matched_controls(fired: torch.Tensor, mass: torch.Tensor, targets: Sequence[int], n: int, seed: int = 0,
                     tolerance: float = 2.0) -> list[list[int]]:
    """``n`` control sets for ``targets``: control ``j`` of each set is a feature active on the same prompts
    (``fired``) whose activation mass there is within a factor ``tolerance`` of target ``j``'s (the nearest ones in
    log-ratio when too few are), never a target. ``fired [d_sae]`` bool, ``mass [d_sae]``."""
    g = torch.Generator().manual_seed(seed)
    pool = fired.clone()
    pool[list(targets)] = False
    cand = pool.nonzero().flatten()
    if cand.numel() < len(targets):
        raise InputError(f"only {int(cand.numel())} other features fire on these prompts; a matched control needs "
                         f"at least {len(targets)}: use more or longer prompts")
    sets = []
    near: list[torch.Tensor] = []
    for t in targets:
        ratio = (mass[cand].clamp(min=1e-12) / float(mass[t]) if float(mass[t]) > 0 else mass[cand]).log().abs()
        ok = cand[ratio <= torch.log(torch.tensor(tolerance))]
        near.append(ok if ok.numel() >= max(4, n // 2) else cand[ratio.argsort()[:max(4, n)]])
    for _ in range(n):
        chosen: list[int] = []
        for pool_j in near:
            free = [int(x) for x in pool_j[torch.randperm(pool_j.numel(), generator=g)] if int(x) not in chosen]
            if not free:
                raise InputError("too few active features to draw distinct matched controls; use more prompts")
            chosen.append(free[0])
        sets.append(chosen)
    return sets


@torch.no_grad()
def compare_features_to_random(model: HookedModel, sae: SAE, tokens: TextOrTokens, metric: Metric,
                               features: Sequence[int], n_random: int = 20, seed: int = 0,
                               tolerance: float = 2.0) -> BaselineComparison:
    """Ablate ``features`` (error term kept) and ``n_random`` control sets of the same size, each control matched
    to a target by being active on the same prompts at a similar activation mass (within ``tolerance``x); compare
    per prompt. The feature counterpart of :func:`~mechscope.techniques.ablation.compare_to_random`.
    Only the prompts where an ablated feature fires are run: on the others the hook changes nothing, and their
    effect is 0 (the same values as running every prompt, to float rounding)."""
    features = [int(f) for f in features]
    bad = [f for f in features if not 0 <= f < sae.cfg.d_sae]
    if bad or not features:
        raise InputError(f"features must be in 0..{sae.cfg.d_sae - 1}, got {features}")
    toks = equal_length_tokens(model, tokens, "feature ablation")
    f, fires = _feature_acts(model, sae, toks, rows=True)
    mass = f.float().sum((0, 1))
    silent = [i for i in features if float(mass[i]) == 0]
    if silent:
        raise InputError(f"feature(s) {silent} never fire on these prompts: ablating them changes nothing; test "
                         "features that are active here (sae.encode on the prompts' activations)")
    hook = sae.cfg.hook_name
    plain = plain_run(model, toks, metric, [hook_block(hook)], what="feature ablation")  # ablations resume there
    base = plain.value.float().cpu()

    def effect(feats: list[int]) -> torch.Tensor:
        h = ablate_features_hook(sae, feats)
        return batched_metric(model, toks, metric, lambda a, b: [(hook, h)], what="feature ablation", plain=plain,
                              start=hook_block(hook), changed=fires[:, feats].any(-1)).float().cpu() - base

    t_eff = effect(features)
    controls = matched_controls(mass > 0, mass, features, n_random, seed, tolerance)
    r_effs = [effect(c) for c in bar(controls, desc="ablating matched control features")]
    name = describe_metric(metric)
    target = AblationResult([f"F{i}" for i in features], "feature (error term kept)", base, base + t_eff,
                            bootstrap_ci(t_eff, seed=seed), {"controls": controls}, name)
    what = f"features (each active on the same prompts at a similar activation, within {tolerance:g}x)"
    if not r_effs:
        return BaselineComparison(target.components, target.effect, [], target.effect, target, what)
    return BaselineComparison(target.components, target.effect, [bootstrap_ci(r, seed=seed) for r in r_effs],
                              paired_bootstrap(t_eff, torch.stack(r_effs).mean(0), seed=seed), target, what)
