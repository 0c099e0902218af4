"""Circuit faithfulness: ablating everything outside a circuit, curves over circuit sizes, CPR and CMD.

A circuit ``C`` is judged by what the model does when every component outside it is ablated
(MIB, Mueller et al. 2025):

    faithfulness(C) = (m(C) - m(∅)) / (m(M) - m(∅))

where ``m(M)`` is the metric of the whole model on the clean prompts, ``m(C)`` the metric with every
ablatable component outside ``C`` ablated, and ``m(∅)`` the metric with all of them ablated. 0 is the
empty circuit, 1 the whole model. Two ablation modes say what "ablated" means:

- ``"cf"`` (counterfactual, MIB's standard): a component outside the circuit takes its activation
  from the corrupted run of the same prompt, so ``m(∅)`` is the corrupted run's metric;
- ``"mean"``: its mean activation over the corrupted prompts, per position (Wang et al. 2022).

The curve over circuit sizes keeps the top ``k`` of a ranking for each ``k``. CPR is the area under
it over the fraction of components kept, CMD the area between it and 1 (both from ``(0, 0)``, which
the normalisation makes exact: the empty circuit scores 0 by definition).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Collection, Protocol, Sequence

import torch

from ..analysis import viz
from ..analysis.validation import Estimate, bootstrap_ci
from ..core.components import all_heads, all_mlps, parse_components
from ..core.errors import InputError
from ..core.model import HookedModel
from ..core.progress import bar
from ..core.result import Result
from ..core.types import Metric, checked
from ..core.work import add_floor
from ..datasets import TaskDataset
from ..techniques.ablation import ablation_hooks, replacement_values
from ..techniques.inputs import logits_to_keep

ABLATION_MODES = {
    "cf": "counterfactual: each ablated component takes its activation from the corrupted run of the same prompt",
    "mean": "mean: each ablated component takes its mean activation over the corrupted prompts, per position",
}


def check_mode(mode: str) -> str:
    """``mode`` if it is an ablation mode; a clear error naming the valid ones otherwise."""
    if mode not in ABLATION_MODES:
        raise InputError(f"ablation mode must be one of {', '.join(ABLATION_MODES)}, got {mode!r}")
    return mode


def _area(x: list[float], y: list[float]) -> float:
    """The trapezoid area under ``y(x)`` for increasing ``x`` in [0, 1]."""
    return float(sum((x[i + 1] - x[i]) * (y[i + 1] + y[i]) / 2 for i in range(len(x) - 1)))


def cpr_cmd(fraction: Sequence[float], faithfulness: Sequence[float]) -> tuple[float, float]:
    """MIB's CPR (area under the faithfulness curve over the fraction kept) and CMD (area under
    ``|1 - faithfulness|``), both from the point ``(0, 0)``. ``fraction`` increasing in (0, 1]."""
    x, y = [0.0, *fraction], [0.0, *faithfulness]
    return _area(x, y), _area(x, [abs(1 - v) for v in y])


def normalised_ci(circuit: torch.Tensor, full: torch.Tensor, empty: torch.Tensor, seed: int = 0) -> Estimate:
    """``(mean(circuit) - mean(empty)) / (mean(full) - mean(empty))`` over prompts ``[n]``, with a bootstrap CI."""
    rows = torch.stack([circuit.double(), full.double(), empty.double()], 1)
    return bootstrap_ci(rows, stat=lambda r: (r[:, 0].mean() - r[:, 2].mean()) / (r[:, 1].mean() - r[:, 2].mean()),
                        seed=seed)


#: tokens per forward pass when many ablations run as stacked copies of the prompts (:meth:`Ablator.kept_many`);
#: ``MECHSCOPE_STACK_TOKENS=0`` runs one pass per ablation (the path before stacking, for comparison)
STACK_TOKENS = int(os.environ.get("MECHSCOPE_STACK_TOKENS", "2048"))


class Ablator:
    """``metric`` on ``data.clean`` with any subset of ``pool`` ablated in ``mode``.

    The replacement values of every component of ``pool`` come from one cached pass over the corrupted
    prompts (what makes 20+ random circuits and a fine curve cheap). ``full`` and ``empty`` are the
    whole model's and the empty circuit's metric ``[prompt]``. One subset is one forward pass; many subsets
    (:meth:`kept_many`, :meth:`faithfulness_many`) run as stacked copies of the prompts, about
    :data:`STACK_TOKENS` tokens a pass, each copy with its own ablation: equal to one pass each, to float rounding.
    """

    def __init__(self, model: HookedModel, data: TaskDataset, metric: Metric, pool: list[str], mode: str = "cf",
                 seed: int = 0):
        self.model, self.data, self.metric, self.mode, self.seed = model, data, metric, check_mode(mode), seed
        self.pool = list(dict.fromkeys(pool))
        comps = parse_components(model, self.pool)
        method = "counterfactual" if mode == "cf" else "mean"
        self.values = replacement_values(model, comps, data.clean, method, data.corrupted, seed)
        add_floor(data.corrupted.numel() * model.cfg.n_layers)  # the one reference pass every ablation reads
        self.by_name = {str(c): c for c in comps}
        self.keep = logits_to_keep(model, data.clean, metric)  # the last position only, when that is all it reads
        self.memo: dict[frozenset, torch.Tensor] = {}  # ablated set -> metric [prompt]: each set runs once
        self.passes = 0  # forward passes run (a stacked pass counts once)
        self.full = self._run([])
        self.empty = self._run(self.pool)

    def _run(self, names: list[str]) -> torch.Tensor:
        key = frozenset(names)
        if key not in self.memo:
            self.memo[key] = self._forward([names])[0]
            self.passes += 1
        return self.memo[key]

    def ablated(self, names: list[str]) -> torch.Tensor:
        """The metric ``[prompt]`` with the components ``names`` ablated (and nothing else)."""
        unknown = [n for n in names if n not in self.by_name]
        if unknown:
            raise InputError(f"components {unknown[:5]} are not in the ablation pool")
        return self._run(list(names))

    def kept(self, circuit: Sequence[str]) -> torch.Tensor:
        """The metric ``[prompt]`` with every component of the pool outside ``circuit`` ablated."""
        return self._run(self._outside(circuit))

    def _outside(self, circuit: Sequence[str]) -> list[str]:
        """The pool's components outside ``circuit``: what keeping ``circuit`` ablates."""
        keep = set(circuit)
        return [x for x in self.pool if x not in keep]

    def faithfulness(self, circuit: Sequence[str]) -> Estimate:
        """MIB's normalised faithfulness of ``circuit`` with a bootstrap CI over prompts."""
        return normalised_ci(self.kept(circuit), self.full, self.empty, self.seed)

    def kept_many(self, circuits: Sequence[Sequence[str]]) -> list[torch.Tensor]:
        """:meth:`kept` for each circuit ``[prompt]``, the circuits not yet run going as stacked copies of the
        prompts (a set asked for twice runs once)."""
        keys = [frozenset(self._outside(c)) for c in circuits]
        todo = [k for k in dict.fromkeys(keys) if k not in self.memo]
        N, P = self.data.clean.shape
        per = max(1, STACK_TOKENS // (N * P))  # copies a forward pass
        for s in range(0, len(todo), per):
            chunk = todo[s:s + per]
            self.memo.update(zip(chunk, self._forward(chunk)))
            self.passes += 1
        return [self.memo[k] for k in keys]

    def faithfulness_many(self, circuits: Sequence[Sequence[str]]) -> list[Estimate]:
        """:meth:`faithfulness` of each circuit, the circuits run as stacked copies of the prompts."""
        return [normalised_ci(k, self.full, self.empty, self.seed) for k in self.kept_many(circuits)]

    @torch.no_grad()
    def _forward(self, sets: Sequence[Collection[str]]) -> list[torch.Tensor]:
        """The metric ``[prompt]`` for each set of ablated components: one forward pass over ``len(sets)`` stacked
        copies of the prompts (a single set: the prompts themselves)."""
        N, P = self.data.clean.shape
        L = self.model.cfg.n_layers
        # needed: each set from its first ablated block on (the blocks before it are the unablated run's)
        add_floor(sum(N * P * (L - max(0, min((self.by_name[n].layer for n in s), default=0))) for s in sets))
        names = list(dict.fromkeys(n for s in sets for n in s))
        cs = [self.by_name[n] for n in names]
        which = None if len(sets) == 1 else {c: torch.tensor([n in s for s in sets]) for n, c in zip(names, cs)}
        with self.model.hooks(ablation_hooks(self.model, cs, {c: self.values[c] for c in cs}, which)):
            logits = self.model(self.data.clean.repeat(len(sets), 1), logits_to_keep=self.keep)
        out = []
        for b in range(len(sets)):
            v = torch.as_tensor(self.metric(logits[b * N:(b + 1) * N])).float().cpu()
            out.append(self.data.per_pair(v) if v.dim() else v)  # a prompt pair's rows give one value
        return out


def eap_node_ranking(eap: dict[tuple[str, str], float], signed: bool = False) -> list[str]:
    """Components ranked by EAP: each upstream component's summed |score| over the edges it writes into
    (``signed=True``: the summed signed score, largest first, as MIB's signed ranking does)."""
    total: dict[str, float] = {}
    for (u, _), v in eap.items():
        if u != "embed":
            total[u] = total.get(u, 0.0) + (v if signed else abs(v))
    return sorted(total, key=lambda k: -total[k])


def curve_sizes(n: int, fine: bool = False) -> list[int]:
    """Circuit sizes for a curve over ``n`` components: powers of 2 up to ``n``; ``fine``: about 25% apart
    (1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 19, ...), for choosing a circuit from the curve."""
    if not fine:
        return sorted({min(2 ** i, n) for i in range(n.bit_length() + 1)})
    out, k = [], 1
    while k < n:
        out.append(k)
        k = max(k + 1, int(k * 1.25))
    return out + [n]


@dataclass(repr=False)
class FaithfulnessCurve(Result):
    """Faithfulness over circuit sizes (MIB, Mueller et al. 2025): one ranking of components, the top ``k``
    kept for each ``k``, every other ablatable component ablated on held-out prompts.

    ``cpr`` is the area under the curve over the fraction of components kept (higher is better),
    ``cmd`` the area between the curve and 1 (lower is better); both are computed against random
    circuits of the same sizes too, and for every ranking given (e.g. exact patching against EAP).
    """

    sizes: list[int]
    fraction: list[float]
    curves: dict[str, list[Estimate]]  # ranking name -> faithfulness at each size
    random: list[float]  # mean faithfulness of random circuits at each size
    n_components: int
    mode: str = ""  # how components outside the circuit were ablated
    unit: str = "components"  # what the curve keeps: components, or edges

    @property
    def scores(self) -> dict[str, dict[str, float]]:
        out = {name: dict(zip(("cpr", "cmd"), cpr_cmd(self.fraction, [e.value for e in c])))
               for name, c in self.curves.items()}
        if self.random:
            out["random"] = dict(zip(("cpr", "cmd"), cpr_cmd(self.fraction, self.random)))
        return out

    def summary(self) -> str:
        lines = [f"faithfulness over circuit sizes (of {self.n_components} {self.unit}"
                 f"{'; ' + self.mode if self.mode else ''}; CPR: area under the curve, higher is better; "
                 f"CMD: area between the curve and 1, lower is better)"]
        head = "  size " + "".join(f"{n:>22s}" for n in self.curves) + (f"{'random':>10s}" if self.random else "")
        lines.append(head)
        for i, k in enumerate(self.sizes):
            row = "".join(f"{c[i].value:+9.3f} [{c[i].low:+.2f},{c[i].high:+.2f}]" for c in self.curves.values())
            lines.append(f"  {k:4d} {row}" + (f"{self.random[i]:+10.3f}" if self.random else ""))
        for name, sc in self.scores.items():
            lines.append(f"  {name:>10s}: CPR {sc['cpr']:.3f}, CMD {sc['cmd']:.3f}")
        return "\n".join(lines)

    def _dict_extra(self) -> dict:
        return {"scores": self.scores}

    def plot(self, path: str | Path | None = None) -> Path:
        fig, ax = viz.figure(figsize=(6, 4))
        for name, c in self.curves.items():
            ax.plot(self.fraction, [e.value for e in c], marker="o", label=f"{name} (CPR {self.scores[name]['cpr']:.2f})")
            ax.fill_between(self.fraction, [e.low for e in c], [e.high for e in c], alpha=0.2)
        if self.random:
            ax.plot(self.fraction, self.random, marker="x", color="grey",
                    label=f"random (CPR {self.scores['random']['cpr']:.2f})")
        ax.axhline(1.0, color="black", lw=0.5)
        ax.set_xscale("log")
        ax.set_xlabel(f"fraction of {self.unit} kept")
        ax.set_ylabel("faithfulness (held out)")
        ax.legend(fontsize=8)
        return viz.save_figure(fig, path or "faithfulness_curve.png")


def curve_over_sizes(faithful: Callable[[list], Estimate], rankings: dict[str, list], pool: list,
                     sizes: list[int] | None, n_random: int, seed: int, what: str, mode: str = "",
                     unit: str = "components", many: Callable[[list], list[Estimate]] | None = None
                     ) -> FaithfulnessCurve:
    """The :class:`FaithfulnessCurve` of ``faithful(kept)`` for the top ``k`` of each ranking, for each ``k`` of
    ``sizes`` (default: powers of 2 up to all of ``pool``), against random ``k``-subsets of ``pool``.
    ``many``: the faithfulness of a list of circuits at once (:meth:`Ablator.faithfulness_many`), which then
    judges every point of the curve in one call; the circuits are the same either way."""
    n = len(pool)
    sizes = sizes or curve_sizes(n)
    bad = [k for k in sizes if not 0 < k <= n]
    if bad:
        raise InputError(f"sizes {bad} out of range: 1..{n} ({what})")
    rng = random.Random(seed)
    tops = [order[:k] for order in rankings.values() for k in sizes]
    draws = [rng.sample(pool, k) for k in sizes for _ in range(n_random)]
    if many is not None:
        got = many(tops + draws)
    else:
        got = [faithful(c) for c in bar(tops + draws, desc="faithfulness curve")]
    curves = {name: got[i * len(sizes):(i + 1) * len(sizes)] for i, name in enumerate(rankings)}
    rest = got[len(tops):]
    rand = [sum(e.value for e in rest[i * n_random:(i + 1) * n_random]) / n_random
            for i in range(len(sizes))] if n_random else []
    return FaithfulnessCurve(list(sizes), [k / n for k in sizes], curves, rand, n, mode, unit)


@checked
def ablatable(model: HookedModel, ablate_mlps: bool = True) -> list[str]:
    """The components a node circuit is built from and judged by: every head, and every MLP unless ``ablate_mlps``
    is False (then the MLPs are always kept, and the circuit silently includes all of them)."""
    heads = [str(x) for x in all_heads(model.cfg)]
    return heads + ([str(x) for x in all_mlps(model.cfg)] if ablate_mlps else [])


@checked
def faithfulness_curve(model: HookedModel, test: TaskDataset, rankings: dict[str, list[str]],
                       metric: Metric | None = None, sizes: list[int] | None = None, n_random: int = 3,
                       ablate_mlps: bool = True, seed: int = 0, mode: str = "cf",
                       ablator: Ablator | None = None) -> FaithfulnessCurve:
    """Faithfulness of the top-``k`` components of each ranking, for each ``k`` of ``sizes`` (default: powers of 2
    up to every ablatable component), on ``test`` (held-out prompts), against random circuits of each size.
    ``ablator``: one already built on ``test`` (its pool and mode then stand for ``ablate_mlps`` and ``mode``)."""
    if not rankings:
        raise InputError("faithfulness_curve needs at least one ranking of components")
    abl = ablator or Ablator(model, test, metric or test.metric, ablatable(model, ablate_mlps), mode, seed)
    pool = abl.pool
    rankings = {name: [x for x in order if x in set(pool)]  # only ablatable components change the curve
                for name, order in rankings.items()}
    return curve_over_sizes(abl.faithfulness, rankings, pool, sizes, n_random, seed, "the ablatable components",
                            ABLATION_MODES[abl.mode].split(":")[0] + " ablation", many=abl.faithfulness_many)



class Judge(Protocol):
    """What a circuit is judged by: the metric of the whole model per prompt, and a circuit's faithfulness
    (:class:`Ablator` for components, :class:`~.edge_circuits.EdgeAblator` for edges)."""

    full: torch.Tensor

    def faithfulness(self, kept: Sequence) -> Estimate: ...


def choose_from_curve(abl: Judge, ranking: list, target: float, sizes: list[int] | None = None, what: str = "components",
                      ranking_name: str = "signed patching") -> tuple[list, list[tuple[int, float]], str]:
    """The smallest top-``k`` of ``ranking`` whose faithfulness on ``abl``'s prompts reaches ``target``.

    ``abl``: an :class:`Ablator` (components) or an :class:`~.edge_circuits.EdgeAblator` (edges). ``sizes``
    (default: about 25% apart, :func:`curve_sizes`) are tried in order, then the gap below the first size that
    reaches the target is bisected. Returns the circuit, the ``(size, faithfulness)`` points tried, and the rule.
    """
    points: dict[int, float] = {}

    def f(k: int) -> float:
        if k not in points:
            points[k] = abl.faithfulness(ranking[:k]).value
        return points[k]

    sizes = sizes or curve_sizes(len(ranking), fine=True)
    chosen = None
    for i, k in enumerate(bar(sizes, desc="choosing the circuit from the curve")):
        if f(k) >= target:
            lo, hi = (sizes[i - 1] if i else 0), k  # f(lo) < target <= f(hi)
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if f(mid) >= target else (mid, hi)
            chosen = hi
            break
    curve = sorted(points.items())
    if chosen is None:
        best = max(curve, key=lambda p: p[1])
        return (ranking[:best[0]], curve,
                f"NO circuit of the {len(ranking)} candidate {what} reaches the target "
                f"faithfulness {target} on the search prompts; the most faithful top-k tried is kept ({best[0]} "
                f"{what}, {best[1]:.2f}). The behaviour may rest on components that also oppose it, or on "
                f"the embeddings; try the other ablation mode, or more prompts")
    return (ranking[:chosen], curve,
            f"the smallest top-k of the {ranking_name} ranking whose faithfulness on the {len(abl.full)} search "
            f"prompts reaches {target} ({chosen} {what}: {points[chosen]:.2f}; {chosen - 1 if chosen > 1 else 0}"
            f" {what}: {points.get(chosen - 1, 0.0):.2f})")


def rank_p(value: float, random: list[float]) -> float:
    """One-sided rank p-value of ``value`` against random draws: ``(1 + #{random >= value}) / (n_random + 1)``."""
    return (1 + sum(v >= value for v in random)) / (len(random) + 1)


def random_verdict(value: float, random: list[float], n_distinct: int | None = None) -> str:
    """A circuit's faithfulness against random circuits of its size, in words, with the p-value and its limits.
    ``n_distinct``: how many different circuits of that size exist (a small number limits the test)."""
    if not random:
        return "no random circuits drawn (n_random=0): nothing to compare the faithfulness with"
    n, p = len(random), rank_p(value, random)
    beats = sum(value > v for v in random)
    text = (f"more faithful than {beats} of {n} random circuits of the same size (rank p = {p:.3f}; random: mean "
            f"{sum(random) / n:.2f}, range [{min(random):.2f}, {max(random):.2f}])")
    if n_distinct is not None and n_distinct < 10 * n:
        text += (f"; only {n_distinct} different circuits of this size exist, so random draws repeat and can be the "
                 "circuit itself: the rank test cannot separate them at this model size")
    if n < 19:
        return text + f"; {n} draws cannot give p < 0.05: use n_random >= 19"
    return text + ("" if p < 0.05 else ": NOT clearly better than random")


class Lazy:
    """A value computed on its first call only (an ablator that a stored stage may make unnecessary)."""

    def __init__(self, make: Callable):
        self.make, self.value = make, None

    def __call__(self):
        if self.value is None:
            self.value = self.make()
        return self.value
