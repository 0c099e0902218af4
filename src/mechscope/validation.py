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


@dataclass
class SeedAggregate:
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

    __str__ = __repr__ = summary


def _numeric(result) -> torch.Tensor:
    for attr in ("values", "effect", "value"):
        if hasattr(result, attr) and not callable(getattr(result, attr)):
            result = getattr(result, attr)
            if isinstance(result, Estimate):
                result = result.value
            break
    return torch.as_tensor(result, dtype=torch.float64).detach().cpu()


def across_seeds(fn, seeds=(0, 1, 2), name: str = "result") -> SeedAggregate:
    """Run ``fn(seed)`` for each seed and aggregate: numbers, tensors, or results with ``.values``/``.effect``."""
    seeds = list(seeds)
    if not seeds:
        raise ValueError("give at least one seed")
    vals = [_numeric(fn(s)) for s in seeds]
    shapes = {tuple(v.shape) for v in vals}
    if len(shapes) != 1:
        raise ValueError(f"results differ in shape across seeds: {shapes}")
    return SeedAggregate(seeds, torch.stack(vals), name)


def shuffled_labels(labels: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A shuffled-label control: the valid labels (``>= 0``) permuted at random, ignored ones left in place."""
    out = labels.clone()
    valid = labels >= 0
    g = torch.Generator().manual_seed(seed)
    vals = labels[valid]
    out[valid] = vals[torch.randperm(vals.numel(), generator=g)]
    return out


def random_components(model, k: int, kind: str = "head", exclude=(), seed: int = 0) -> list[str]:
    """``k`` random components of one kind (``head``, ``neuron``, ``attn``, ``mlp``), none of ``exclude``."""
    import random

    c = model.cfg
    pool = {"head": [f"L{l}H{h}" for l in range(c.n_layers) for h in range(c.n_heads)],
            "attn": [f"L{l}.attn" for l in range(c.n_layers)], "mlp": [f"L{l}.mlp" for l in range(c.n_layers)]}
    if kind == "neuron":
        rng = random.Random(seed)
        out, ex = [], set(exclude)
        while len(out) < k:
            name = f"L{rng.randrange(c.n_layers)}N{rng.randrange(c.d_mlp)}"
            if name not in ex and name not in out:
                out.append(name)
        return out
    if kind not in pool:
        raise ValueError(f"kind must be 'head', 'neuron', 'attn' or 'mlp', got {kind!r}")
    cand = [x for x in pool[kind] if x not in set(exclude)]
    if k > len(cand):
        raise ValueError(f"asked for {k} random {kind}s but only {len(cand)} are available")
    return random.Random(seed).sample(cand, k)


@dataclass
class BaselineComparison:
    """The ablation effect of a set of components against random sets of the same size and kind."""

    components: list[str]
    effect: Estimate
    random_effects: list[Estimate]
    difference: Estimate  # per-prompt (target effect - mean random effect), paired

    def summary(self) -> str:
        rnd = ", ".join(f"{e.value:+.3f}" for e in self.random_effects)
        verdict = ("larger than for random components" if self.difference.excludes(0.0)
                   else "NOT distinguishable from random components")
        return (f"ablating {len(self.components)} components: effect {self.effect}\n"
                f"  {len(self.random_effects)} random sets of the same size: {rnd}\n"
                f"  difference {self.difference}: the effect is {verdict}")

    __str__ = __repr__ = summary


def compare_to_random(model, tokens, metric, components, method: str = "mean", n_random: int = 5,
                      reference=None, seed: int = 0) -> BaselineComparison:
    """Ablate ``components`` and ``n_random`` random sets of the same size and kind; compare per prompt."""
    from .ablation import ablate, parse_components

    comps = parse_components(model, components)
    kinds = {c.kind for c in comps}
    if len(kinds) != 1 or kinds == {"attn", "mlp"}:
        raise ValueError("compare_to_random needs components of one kind (all heads, all neurons, ...)")
    kind = kinds.pop()
    target = ablate(model, tokens, metric, comps, method, reference, seed)
    rand_res = [ablate(model, tokens, metric, random_components(model, len(comps), kind, [str(c) for c in comps],
                                                               seed + 1 + i), method, reference, seed)
                for i in range(n_random)]
    t_eff = target.ablated - target.baseline
    r_eff = torch.stack([r.ablated - r.baseline for r in rand_res]).mean(0)
    return BaselineComparison([str(c) for c in comps], target.effect, [r.effect for r in rand_res],
                              paired_bootstrap(t_eff, r_eff, seed=seed))
