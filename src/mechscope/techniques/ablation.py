"""Zero, mean and resample ablation of heads, neurons and layers, with confidence intervals.

For prompts ``x_i`` and a per-prompt metric ``m``, the effect of ablating a set ``S`` is

    effect_i = m(model with S replaced) (x_i) - m(model)(x_i)

reported as a mean with a percentile-bootstrap CI over prompts. Replacement values:
zero (``0``); mean (the mean activation over a reference set, per position when the reference
has the prompts' length, else over all positions; Wang et al. 2022 use this for IOI); resample
(the activation of another prompt, chosen at random without choosing the prompt itself;
Chan et al. 2022, "Causal scrubbing"); counterfactual (the activation of the same prompt's
counterpart in the reference set, e.g. its corrupted version: MIB's "CF" ablation).

Components are :class:`~mechscope.core.components.Component` or their strings: ``"L3H5"`` (head 5
of layer 3, at ``attn.hook_z``), ``"L3N100"`` (neuron 100 at ``mlp.hook_post``), ``"L3.attn"``
(``hook_attn_out``), ``"L3.mlp"`` (``hook_mlp_out``) or ``"L3"`` (both of layer 3's outputs).
:func:`compare_to_random` ablates random components of the same kind and number as a baseline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from ..analysis import viz
from ..analysis.metrics import describe_metric
from ..analysis.validation import Estimate, bootstrap_ci, paired_bootstrap
from ..batching import BatchState, map_batches
from ..compute import forward_bytes
from ..core.components import Component, parse_components
from ..core.errors import InputError
from ..core.hookpoints import act_name
from ..core.model import HookedModel
from ..core.progress import bar
from ..core.result import Result
from ..core.types import ComponentSpecs, Metric, TextOrTokens
from .inputs import PlainRun, batched_metric, equal_length_tokens, plain_run, stop_layer

__all__ = ["AblationResult", "BaselineComparison", "Component", "ablate", "ablate_each", "ablation_hooks",
           "compare_to_random", "describe_reference", "parse_components", "random_components", "replacement_values"]


@dataclass(repr=False)
class AblationResult(Result):
    """Per-prompt metric with and without the ablation, and the effect with its CI."""

    components: list[str]
    method: str
    baseline: torch.Tensor  # [prompt]
    ablated: torch.Tensor  # [prompt]
    effect: Estimate
    extra: dict = field(default_factory=dict)
    metric: str = "metric (unnamed)"  # what the metric is, its unit and which way is good
    reference: str = ""  # where mean/resample values come from

    def summary(self) -> str:
        names = ", ".join(self.components[:8]) + (" ..." if len(self.components) > 8 else "")
        ref = f" (values: {self.reference})" if self.reference else ""
        return (f"{self.method} ablation of {len(self.components)} component(s) [{names}]{ref}\n"
                f"  metric: {self.metric}\n"
                f"  mean over {len(self.baseline)} prompts: {float(self.baseline.mean()):+.4f} unablated -> "
                f"{float(self.ablated.mean()):+.4f} ablated\n"
                f"  effect (ablated - unablated): {self.effect}  ({self.effect.verdict()})")

    def _dict_extra(self) -> dict:
        return {"ci": [self.effect.low, self.effect.high]}

    def plot(self, path: str | Path = "ablation.png") -> Path:
        """Per-prompt metric before and after the ablation."""
        fig, ax = viz.figure(figsize=(6, 4))
        n = len(self.baseline)
        for i in range(n):
            ax.plot([0, 1], [float(self.baseline[i]), float(self.ablated[i])], color="#999", lw=0.8)
        ax.boxplot([self.baseline.numpy(), self.ablated.numpy()], positions=[0, 1], widths=0.3)
        ax.set_xticks([0, 1], ["clean", f"{self.method}-ablated"])
        ax.set_title(f"effect {self.effect.value:+.3f} [{self.effect.low:+.3f}, {self.effect.high:+.3f}]")
        return viz.save_figure(fig, path)

    def _html_body(self) -> str:
        rows = torch.stack([self.baseline, self.ablated])
        return viz.heatmap_html(rows, ["clean", "ablated"], [str(i) for i in range(rows.shape[1])],
                                title="metric per prompt")


def _select(act: torch.Tensor, comp: Component):
    """Index of the component's slice in its hook activation ``[batch, pos, ...]``."""
    if comp.kind in ("head", "neuron"):
        return (slice(None), slice(None), comp.index)
    return (slice(None), slice(None))


def _expert_hooks(experts: list[Component]) -> list:
    """Zero-ablation of experts: the slots routed to each expert contribute nothing (the others are untouched)."""
    hooks = []
    for layer in sorted({c.layer for c in experts}):
        ids = [c.index for c in experts if c.layer == layer]
        seen: dict = {}

        def keep(idx, hook, _seen=seen):
            _seen["idx"] = idx

        def zero(out, hook, _seen=seen, _ids=ids):
            routed = torch.isin(_seen["idx"], torch.tensor(_ids, device=out.device))  # [batch, pos, top_k]
            return out.masked_fill(routed[..., None], 0.0)

        hooks += [(act_name("expert_indices", layer), keep), (act_name("expert_out", layer), zero)]
    return hooks


def replacement_values(model: HookedModel, comps: list[Component], tokens: torch.Tensor, method: str,
                       reference: TextOrTokens | None = None, seed: int = 0,
                       state: BatchState | None = None) -> dict[Component, torch.Tensor]:
    """What each component is replaced with, shaped like its slice for ``tokens`` ``[batch, pos, ...]``."""
    N, P = tokens.shape
    if any(c.kind == "expert" for c in comps) and method != "zero":
        raise InputError("experts are ablated with method='zero' (their output is removed from the tokens routed to "
                         "them); an expert has no output on the other tokens to take a mean or resample from")
    names = sorted({c.hook for c in comps if c.kind != "expert"})
    if method == "zero":
        return {c: None for c in comps}
    ref = tokens if reference is None else equal_length_tokens(model, reference, "ablation")
    cache = _cached(model, ref, names, state=state)
    out = {}
    g = torch.Generator().manual_seed(seed)
    if method == "resample":
        M = ref.shape[0]
        if ref.shape[1] != P:
            raise InputError(f"resample ablation needs reference prompts of the same length ({P}), got {ref.shape[1]}")
        if M < 2 and reference is None:
            raise InputError("resample ablation needs at least two prompts (or a reference set)")
        pick = torch.randint(0, M - 1 if reference is None else M, (N,), generator=g)
        if reference is None:  # never resample a prompt from itself
            pick = pick + (pick >= torch.arange(N)).long()
        for c in comps:
            out[c] = cache[c.hook][pick.to(ref.device)][_select(cache[c.hook], c)]
        return out
    if method == "counterfactual":  # the same prompt's activation in the reference (corrupted) run
        if reference is None or ref.shape != tokens.shape:
            raise InputError(f"counterfactual ablation needs one reference (corrupted) prompt per prompt, of the same "
                             f"length: {tuple(tokens.shape)}; got "
                             f"{'none' if reference is None else tuple(ref.shape)}")
        return {c: cache[c.hook][_select(cache[c.hook], c)] for c in comps}
    if method == "mean":
        for c in comps:
            a = cache[c.hook][_select(cache[c.hook], c)]  # [M, P', ...]
            if a.shape[1] == P:
                out[c] = a.mean(0, keepdim=True).expand(N, *a.shape[1:])
            else:
                out[c] = a.mean((0, 1), keepdim=True).expand(N, P, *a.shape[2:])
        return out
    raise InputError(f"method must be 'zero', 'mean', 'resample' or 'counterfactual', got {method!r}")


def _cached(model: HookedModel, tokens: torch.Tensor, names: list[str], batch_size: int | None = None,
            state: BatchState | None = None) -> dict:
    """``{name: [n, ...]}`` activations of ``tokens`` at ``names``, recorded in memory-sized batches of prompts."""
    last = stop_layer(model, names)  # the blocks after the last recorded one never run

    def run(start, stop):
        with torch.no_grad():
            return model.run_with_cache(tokens[start:stop], names_filter=names, stop_at_layer=last)[1]

    elt = torch.finfo(model.dtype).bits // 8
    parts = map_batches(run, tokens.shape[0], batch_size, forward_bytes(model.cfg.to_dict(), 1, tokens.shape[1], elt),
                        model.device, "ablation", state, tokens_per_item=tokens.shape[1])
    return {n: torch.cat([p[n].to(parts[0][n].device) for p in parts]) for n in names}


def _rows(values: dict, start: int, stop: int) -> dict:
    """The replacement values of the prompts ``start:stop``."""
    return {c: None if v is None else v[start:stop] for c, v in values.items()}


def ablation_hooks(model: HookedModel, comps: list[Component], values: dict, which: dict | None = None) -> list:
    """Forward hooks that write the replacement values into each component's slice.

    ``which``: ``{component: [copies] bool}`` for a batch of ``copies`` stacked copies of the prompts
    (``[copies * n, pos, ...]``), each copy its own ablation: the component is written only into the copies where
    its mask is True (its value ``[n, pos, ...]`` the same in each). Experts are not batched this way."""
    by_hook: dict[str, list[Component]] = {}
    for c in comps:
        if c.kind != "expert":
            by_hook.setdefault(c.hook, []).append(c)
    experts = [c for c in comps if c.kind == "expert"]
    if which is not None and experts:
        raise InputError("experts cannot be ablated in stacked copies (their routing differs per token); ablate them "
                         "one set at a time")
    hooks = _expert_hooks(experts)
    for name, cs in by_hook.items():
        def fn(act, hook, _cs=cs):
            act = act.clone()
            copies = None if which is None else len(which[_cs[0]])
            view = act if copies is None else act.view(copies, act.shape[0] // copies, *act.shape[1:])
            for c in _cs:
                idx = _select(act, c)
                if copies is not None:
                    if not bool(which[c].any()):
                        continue
                    idx = (which[c].to(act.device), *idx)
                v = values[c]
                view[idx] = 0.0 if v is None else v.to(act.device, act.dtype)
            return act
        hooks.append((name, fn))
    return hooks


def describe_reference(method: str, n_prompts: int, reference: TextOrTokens | None) -> str:
    """Where the replacement values come from, in words (the same default in the CLI and in Python)."""
    if method == "zero":
        return ""
    what = {"mean": "mean", "counterfactual": "each prompt's own counterpart's activation"}.get(
        method, "another prompt's activation")
    if reference is None:
        return f"{what} over the ablated prompts themselves ({n_prompts})"
    n = len(reference) if not isinstance(reference, str) else 1
    return f"{what} over a reference set of {n} prompt(s)"


@torch.no_grad()
def ablate(model: HookedModel, tokens: TextOrTokens, metric: Metric, components: ComponentSpecs, method: str = "zero",
           reference: TextOrTokens | None = None, seed: int = 0,
           n_boot: int = 2000, batch_size: int | None = None, metric_name: str | None = None,
           _values: dict | None = None, _plain: PlainRun | None = None) -> AblationResult:
    """Ablate ``components`` jointly and measure ``metric`` (one value per prompt) before and after.

    ``reference``: the prompts mean and resample values come from (default: the ablated prompts
    themselves; the CLI's ``--reference clean``). ``metric_name`` names the metric in the summary (default:
    the description of a :func:`~mechscope.analysis.metrics.labelled` metric or a task's metric).
    Prompts run in batches sized from free memory (``batch_size`` overrides; an out-of-memory error
    halves the batch), which gives the same values as one batch.
    """
    toks = equal_length_tokens(model, tokens, "ablation")
    comps = parse_components(model, components)
    state = BatchState()  # one run: later passes start at a size that fit, and it warns once
    values = _values if _values is not None else replacement_values(model, comps, toks, method, reference, seed, state)
    start = min(c.layer for c in comps)
    # the unablated run keeps the stream entering the first ablated block: the ablated run resumes there
    plain = _plain or plain_run(model, toks, metric, [start], state, "ablation", batch_size)
    base = plain.value
    if base.dim() != 1 or base.shape[0] != toks.shape[0]:
        raise InputError(f"the metric must return one value per prompt ([{toks.shape[0]}]) for a CI over prompts; "
                         f"got shape {tuple(base.shape)}")
    abl = batched_metric(model, toks, metric, lambda s, e: ablation_hooks(model, comps, _rows(values, s, e)),
                         batch_size=batch_size, what="ablation", state=state, plain=plain, start=start)
    return AblationResult([str(c) for c in comps], method, base, abl, bootstrap_ci(abl - base, n_boot=n_boot, seed=seed),
                          metric=metric_name or describe_metric(metric),
                          reference=describe_reference(method, toks.shape[0], reference))


@torch.no_grad()
def ablate_each(model: HookedModel, tokens: TextOrTokens, metric: Metric, components: ComponentSpecs, method: str = "zero",
                reference: TextOrTokens | None = None, seed: int = 0,
                n_boot: int = 1000) -> list[AblationResult]:
    """Ablate each component on its own; results in the order given."""
    return [ablate(model, tokens, metric, [c], method, reference, seed, n_boot)
            for c in parse_components(model, components)]


def random_components(model: HookedModel, k: int, kind: str = "head", exclude: Sequence[str] = (), seed: int = 0) -> list[str]:
    """``k`` random components of one kind (``head``, ``neuron``, ``attn``, ``mlp``), none of ``exclude``."""
    import random

    c = model.cfg
    pool = {"head": [f"L{l}H{h}" for l in range(c.n_layers) for h in range(c.n_heads)],
            "attn": [f"L{l}.attn" for l in range(c.n_layers)], "mlp": [f"L{l}.mlp" for l in range(c.n_layers)],
            "expert": [f"L{l}E{e}" for l in (c.moe_layers or []) for e in range(c.n_experts)]}
    if kind == "neuron":
        rng = random.Random(seed)
        out, ex = [], set(exclude)
        while len(out) < k:
            name = f"L{rng.randrange(c.n_layers)}N{rng.randrange(c.d_mlp)}"
            if name not in ex and name not in out:
                out.append(name)
        return out
    if kind not in pool:
        raise InputError(f"kind must be 'head', 'neuron', 'expert', 'attn' or 'mlp', got {kind!r}")
    cand = [x for x in pool[kind] if x not in set(exclude)]
    if k > len(cand):
        raise InputError(f"asked for {k} random {kind}s but only {len(cand)} are available")
    return random.Random(seed).sample(cand, k)


@dataclass(repr=False)
class BaselineComparison(Result):
    """The ablation effect of a set of components against random sets of the same size and kind."""

    components: list[str]
    effect: Estimate
    random_effects: list[Estimate]
    difference: Estimate  # per-prompt (target effect - mean random effect), paired
    target: AblationResult | None = None
    what: str = "components"  # what was drawn at random, in words

    @property
    def p_value(self) -> float:
        """One-sided rank p-value: ``(1 + #{random sets with |effect| >= |target effect|}) / (n_random + 1)``.

        With ``n`` random draws the smallest possible p is ``1 / (n + 1)``: 20 draws can reach 0.048."""
        t = abs(self.effect.value)
        return (1 + sum(abs(e.value) >= t for e in self.random_effects)) / (len(self.random_effects) + 1)

    def summary(self) -> str:
        vals = [e.value for e in self.random_effects]
        head = self.target.summary() + "\n" if self.target is not None else \
            f"ablating {len(self.components)} {self.what}: effect {self.effect}\n"
        if not vals:
            return head + "  no random baseline (n_random=0): the effect has no control"
        n = len(vals)
        beaten = sum(abs(self.effect.value) > abs(v) for v in vals)
        short = "random " + self.what.split(" (")[0]
        verdict = self.difference.verdict(short)
        enough = "" if n >= 19 else f" ({n} draws cannot give p < 0.05; use at least 19)"
        paired = self.difference.excludes(0.0)
        ranked = self.p_value < 0.05
        if paired and ranked:
            overall = f"both tests put the effect above {short}"
        elif not self.difference.informative:
            overall = "too few prompts to decide; add prompts until the CIs are informative"
        elif paired != ranked:
            overall = (f"the tests disagree (paired CI {'excludes' if paired else 'includes'} 0, rank p = "
                       f"{self.p_value:.3f}): not established; use more prompts, or more random draws")
        else:
            overall = f"not distinguishable from {short}"
        return (head + f"  baseline: {n} random sets of {len(self.components)} {self.what}: effects mean "
                f"{sum(vals) / n:+.4f}, range [{min(vals):+.4f}, {max(vals):+.4f}]\n"
                f"  the effect is larger in magnitude than {beaten} of {n} random sets (rank p = {self.p_value:.3f})"
                f"{enough}\n"
                f"  effect minus the random mean, per prompt: {self.difference} ({verdict})\n"
                f"  verdict: {overall}")

    def _dict_extra(self) -> dict:
        return {"p_value": self.p_value}


def compare_to_random(model: HookedModel, tokens: TextOrTokens, metric: Metric, components: ComponentSpecs,
                      method: str = "mean", n_random: int = 20,
                      reference: TextOrTokens | None = None, seed: int = 0,
                      metric_name: str | None = None) -> BaselineComparison:
    """Ablate ``components`` and ``n_random`` random sets of the same size and kind; compare per prompt.

    ``reference`` defaults to the ablated prompts themselves, as the CLI's ``mechscope ablate`` does
    (``--reference clean``). The result has a rank p-value over the random sets and the paired difference."""
    comps = parse_components(model, components)
    kinds = {c.kind for c in comps}
    if len(kinds) != 1 or kinds == {"attn", "mlp"}:
        raise InputError("compare_to_random needs components of one kind (all heads, all neurons, ...)")
    kind = kinds.pop()
    sets = [parse_components(model, random_components(model, len(comps), kind, [str(c) for c in comps], seed + 1 + i))
            for i in range(n_random)]
    pool = list(dict.fromkeys(comps + [c for st in sets for c in st]))
    toks = equal_length_tokens(model, tokens, "ablation")
    values = replacement_values(model, pool, toks, method, reference, seed)  # one reference pass for every set
    # one unablated pass keeps the stream entering each set's first ablated block: each set runs from there on
    plain = plain_run(model, toks, metric, [min(c.layer for c in st) for st in [comps, *sets]], what="ablation")
    target = ablate(model, toks, metric, comps, method, reference, seed, metric_name=metric_name,
                    _values={c: values[c] for c in comps}, _plain=plain)
    rand_res = [ablate(model, toks, metric, st, method, reference, seed, _values={c: values[c] for c in st},
                       _plain=plain)
                for st in bar(sets, desc="ablating random components")]
    t_eff = target.ablated - target.baseline
    if not rand_res:
        return BaselineComparison([str(c) for c in comps], target.effect, [], target.effect, target, f"{kind}s")
    r_eff = torch.stack([r.ablated - r.baseline for r in rand_res]).mean(0)
    return BaselineComparison([str(c) for c in comps], target.effect, [r.effect for r in rand_res],
                              paired_bootstrap(t_eff, r_eff, seed=seed), target, f"{kind}s")
