"""Statistics a reviewer asks for: bootstrap confidence intervals and effect sizes.

Percentile bootstrap (Efron & Tibshirani 1993): resample the per-prompt values with replacement,
recompute the statistic, and take the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch

from ..core.errors import InputError
from ..core.progress import bar
from ..core.result import Result

#: Below this many samples a percentile-bootstrap CI is not evidence: with n = 1 it is a point, with
#: n = 2 it spans the two values, and up to about 10 its coverage falls well short of the nominal level
#: (Efron & Tibshirani 1993, ch. 13). Such an estimate is printed as uninformative, never as distinguishable.
MIN_CI_N = 10


@dataclass(frozen=True, repr=False)
class Estimate(Result):
    """A statistic with its percentile-bootstrap confidence interval."""

    value: float
    low: float
    high: float
    level: float = 0.95
    n: int = 0
    exact: bool = False  # a deterministic value (no sampling): low == high == value

    @classmethod
    def exactly(cls, value: float) -> "Estimate":
        """A value computed exactly, with no sampling error."""
        return cls(value, value, value, 1.0, 0, True)

    @property
    def informative(self) -> bool:
        """Whether the interval is evidence: exact, or resting on ``n >= MIN_CI_N`` samples."""
        return self.exact or self.n >= MIN_CI_N

    def excludes(self, x: float = 0.0) -> bool:
        """True when ``x`` lies outside the interval (the effect is distinguishable from ``x``).

        Always False for an uninformative estimate (``n < MIN_CI_N``): too few samples to tell."""
        return self.informative and not (self.low <= x <= self.high)

    def verdict(self, against: str = "zero", x: float = 0.0) -> str:
        """``"distinguishable from <against>"``, ``"NOT distinguishable ..."``, or for too few samples a line that
        says so and how many would be enough."""
        if not self.informative:
            return f"uninformative: n={self.n} is too few to tell it from {against}; use {MIN_CI_N}+ samples"
        return (f"distinguishable from {against}" if self.excludes(x) else f"NOT distinguishable from {against}")

    def summary(self) -> str:
        if self.exact:
            return f"{self.value:+.4f} (exact)"
        if not self.informative:
            return f"{self.value:+.4f} (n={self.n}: too few for a CI, needs {MIN_CI_N}+)"
        return f"{self.value:+.4f} [{self.low:+.4f}, {self.high:+.4f}] ({int(self.level * 100)}% CI, n={self.n})"

    def _dict_extra(self) -> dict:
        return {"informative": self.informative, "min_n": MIN_CI_N}


def bootstrap_ci(values: torch.Tensor | Sequence[float], stat: Callable[[torch.Tensor], torch.Tensor]=torch.mean,
                 n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> Estimate:
    """``stat(values)`` with a percentile-bootstrap CI over the first axis of ``values`` ``[n, ...]``."""
    v = torch.as_tensor(values, dtype=torch.float64).detach().cpu()
    n = v.shape[0]
    if n == 0:
        raise InputError("bootstrap_ci needs at least one value")
    point = float(stat(v))
    if n == 1:
        return Estimate(point, point, point, level, 1)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (n_boot, n), generator=g)
    boots = resampled(stat, v, idx)
    lo, hi = torch.quantile(boots, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64))
    return Estimate(point, float(lo), float(hi), level, n)


def resampled(stat: Callable[[torch.Tensor], torch.Tensor], v: torch.Tensor, idx: torch.Tensor,
              max_elements: int = 1 << 24) -> torch.Tensor:
    """``[n_boot]``: ``stat(v[idx[b]])`` for each row of ``idx [n_boot, n]``. The resamples go through ``stat`` in
    batches (:func:`torch.func.vmap`, at most ``max_elements`` values a batch), where the statistic allows it (a
    Python loop of 2,000 calls took 13 of the demo's seconds); a statistic vmap cannot batch (one that reads a
    value out with ``float()``, say) is called once a resample."""
    per = max(1, max_elements // max(1, v.numel()))
    try:
        batched = torch.func.vmap(stat)
        out = torch.cat([torch.as_tensor(batched(v[idx[s:s + per]])).double() for s in range(0, len(idx), per)])
        if out.shape == (len(idx),):
            return out
    except (RuntimeError, ValueError, TypeError, NotImplementedError, IndexError):
        pass
    return torch.stack([torch.as_tensor(stat(v[i])) for i in idx]).double()


#: two-sided 97.5 % quantiles of Student's t for 1..10 degrees of freedom (beyond: the normal's 1.96 plus a tail term)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def seed_interval(values: Sequence[float]) -> Estimate:
    """The mean of per-reseed values with its 95 % t-interval (``mean +- t_{n-1} sd / sqrt(n)``); ``n`` is the number
    of reseeds, so three reseeds print as resting on three (a wide interval, and flagged as few)."""
    v = torch.as_tensor([float(x) for x in values], dtype=torch.float64)
    v = v[~torch.isnan(v)]
    if v.numel() == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0.95, 0)
    m = float(v.mean())
    if v.numel() == 1:
        return Estimate(m, m, m, 0.95, 1)
    df = v.numel() - 1
    t = _T975[df - 1] if df <= len(_T975) else 1.96 + 2.4 / df
    half = t * float(v.std(unbiased=True)) / v.numel() ** 0.5
    return Estimate(m, m - half, m + half, 0.95, int(v.numel()))


def paired_bootstrap(a: torch.Tensor | Sequence[float], b: torch.Tensor | Sequence[float] | None, n_boot: int = 2000,
                     level: float = 0.95, seed: int = 0) -> Estimate:
    """Mean of ``a - b`` over paired samples (same prompts), with a bootstrap CI."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    if a.shape != b.shape:
        raise InputError(f"paired samples need equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    return bootstrap_ci(a - b, n_boot=n_boot, level=level, seed=seed)


def cohens_d(a: torch.Tensor | Sequence[float], b: torch.Tensor | Sequence[float] | None = None) -> float:
    """Standardised effect size: ``mean(a - b) / std(a - b)`` for paired samples (``b`` given), else
    ``mean(a) / std(a)``; two independent samples use the pooled standard deviation via :func:`cohens_d_independent`."""
    a = torch.as_tensor(a, dtype=torch.float64)
    d = a - torch.as_tensor(b, dtype=torch.float64) if b is not None else a
    if d.numel() < 2:
        raise InputError("Cohen's d needs at least two samples")
    sd = float(d.std(unbiased=True))
    if sd == 0:
        raise InputError("Cohen's d is undefined when every difference is the same (zero spread)")
    return float(d.mean()) / sd


def cohens_d_independent(a: torch.Tensor | Sequence[float], b: torch.Tensor | Sequence[float] | None) -> float:
    """``(mean(a) - mean(b)) / pooled_sd`` for two independent samples."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    na, nb = a.numel(), b.numel()
    pooled = (((na - 1) * a.var(unbiased=True) + (nb - 1) * b.var(unbiased=True)) / (na + nb - 2)).sqrt()
    return float((a.mean() - b.mean()) / pooled)


@dataclass(repr=False)
class SeedAggregate(Result):
    """A result repeated over seeds: per-seed values ``[seed, ...]``, their mean and spread."""

    seeds: list[int]
    values: torch.Tensor
    name: str = "result"

    @property
    def mean(self) -> torch.Tensor:
        return self.values.mean(0)

    @property
    def std(self) -> torch.Tensor:
        return self.values.std(0, unbiased=True) if len(self.seeds) > 1 else torch.zeros_like(self.values[0])

    def summary(self) -> str:
        if self.values[0].numel() == 1:
            vals = ", ".join(f"{float(v):+.4f}" for v in self.values.flatten())
            return (f"{self.name} over {len(self.seeds)} seeds: mean {float(self.mean):+.4f}, sd {float(self.std):.4f}, "
                    f"range [{float(self.values.min()):+.4f}, {float(self.values.max()):+.4f}]  ({vals})")
        return (f"{self.name} over {len(self.seeds)} seeds: shape {tuple(self.values.shape[1:])}, "
                f"largest sd {float(self.std.max()):.4f}, mean of sds {float(self.std.mean()):.4f}")

    def _dict_extra(self) -> dict:
        return {"mean": self.mean, "std": self.std}


def _numeric(result) -> torch.Tensor:
    for attr in ("values", "effect", "value"):
        if hasattr(result, attr) and not callable(getattr(result, attr)):
            result = getattr(result, attr)
            if isinstance(result, Estimate):
                result = result.value
            break
    return torch.as_tensor(result, dtype=torch.float64).detach().cpu()


def across_seeds(fn: Callable, seeds: Iterable[int] = (0, 1, 2), name: str = "result") -> SeedAggregate:
    """Run ``fn(seed)`` for each seed and aggregate: numbers, tensors, or results with ``.values``/``.effect``."""
    seeds = list(seeds)
    if not seeds:
        raise InputError("give at least one seed")
    vals = [_numeric(fn(s)) for s in bar(list(seeds), desc="seeds")]
    shapes = {tuple(v.shape) for v in vals}
    if len(shapes) != 1:
        raise InputError(f"results differ in shape across seeds: {shapes}")
    return SeedAggregate(seeds, torch.stack(vals), name)


def shuffled_labels(labels: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A shuffled-label control: the valid labels (``>= 0``) permuted at random, ignored ones left in place."""
    out = labels.clone()
    valid = labels >= 0
    g = torch.Generator().manual_seed(seed)
    vals = labels[valid]
    out[valid] = vals[torch.randperm(vals.numel(), generator=g)]
    return out
