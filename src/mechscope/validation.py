"""Statistics a reviewer asks for: bootstrap confidence intervals and effect sizes.

Percentile bootstrap (Efron & Tibshirani 1993): resample the per-prompt values with replacement,
recompute the statistic, and take the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Estimate:
    """A statistic with its percentile-bootstrap confidence interval."""

    value: float
    low: float
    high: float
    level: float = 0.95
    n: int = 0

    def excludes(self, x: float = 0.0) -> bool:
        """True when ``x`` lies outside the interval (the effect is distinguishable from ``x``)."""
        return not (self.low <= x <= self.high)

    def __str__(self) -> str:
        return f"{self.value:+.4f} [{self.low:+.4f}, {self.high:+.4f}] ({int(self.level * 100)}% CI, n={self.n})"


def bootstrap_ci(values, stat=torch.mean, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> Estimate:
    """``stat(values)`` with a percentile-bootstrap CI over the first axis of ``values`` ``[n, ...]``."""
    v = torch.as_tensor(values, dtype=torch.float64).detach().cpu()
    n = v.shape[0]
    if n == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    point = float(stat(v))
    if n == 1:
        return Estimate(point, point, point, level, 1)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (n_boot, n), generator=g)
    boots = torch.stack([torch.as_tensor(stat(v[i])) for i in idx]).double()
    lo, hi = torch.quantile(boots, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64))
    return Estimate(point, float(lo), float(hi), level, n)


def paired_bootstrap(a, b, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> Estimate:
    """Mean of ``a - b`` over paired samples (same prompts), with a bootstrap CI."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired samples need equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    return bootstrap_ci(a - b, n_boot=n_boot, level=level, seed=seed)


def cohens_d(a, b=None) -> float:
    """Standardised effect size: ``mean(a - b) / std(a - b)`` for paired samples (``b`` given), else
    ``mean(a) / std(a)``; two independent samples use the pooled standard deviation via :func:`cohens_d_independent`."""
    a = torch.as_tensor(a, dtype=torch.float64)
    d = a - torch.as_tensor(b, dtype=torch.float64) if b is not None else a
    if d.numel() < 2:
        raise ValueError("Cohen's d needs at least two samples")
    sd = float(d.std(unbiased=True))
    if sd == 0:
        raise ValueError("Cohen's d is undefined when every difference is the same (zero spread)")
    return float(d.mean()) / sd


def cohens_d_independent(a, b) -> float:
    """``(mean(a) - mean(b)) / pooled_sd`` for two independent samples."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    na, nb = a.numel(), b.numel()
    pooled = (((na - 1) * a.var(unbiased=True) + (nb - 1) * b.var(unbiased=True)) / (na + nb - 2)).sqrt()
    return float((a.mean() - b.mean()) / pooled)
