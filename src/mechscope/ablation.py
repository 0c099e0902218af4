"""Zero, mean and resample ablation of heads, neurons and layers, with confidence intervals.

For prompts ``x_i`` and a per-prompt metric ``m``, the effect of ablating a set ``S`` is

    effect_i = m(model with S replaced) (x_i) - m(model)(x_i)

reported as a mean with a percentile-bootstrap CI over prompts. Replacement values:
zero (``0``); mean (the mean activation over a reference set, per position when the reference
has the prompts' length, else over all positions; Wang et al. 2022 use this for IOI); resample
(the activation of another prompt, chosen at random without choosing the prompt itself;
Chan et al. 2022, "Causal scrubbing").

Components are written ``"L3H5"`` (head 5 of layer 3, at ``attn.hook_z``), ``"L3N100"`` (neuron
100 at ``mlp.hook_post``), ``"L3.attn"`` (``hook_attn_out``), ``"L3.mlp"`` (``hook_mlp_out``) or
``"L3"`` (both of layer 3's outputs).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from . import viz
from .patching import equal_length_tokens
from .validation import Estimate, bootstrap_ci

_SPEC = re.compile(r"^L(\d+)(?:H(\d+)|N(\d+)|\.(attn|mlp))?$")


@dataclass(frozen=True)
class Component:
    layer: int
    kind: str  # head | neuron | attn | mlp
    index: int | None = None

    @property
    def hook(self) -> str:
        suffix = {"head": "attn.hook_z", "neuron": "mlp.hook_post", "attn": "hook_attn_out",
                  "mlp": "hook_mlp_out"}[self.kind]
        return f"blocks.{self.layer}.{suffix}"

    def __str__(self) -> str:
        return {"head": f"L{self.layer}H{self.index}", "neuron": f"L{self.layer}N{self.index}",
                "attn": f"L{self.layer}.attn", "mlp": f"L{self.layer}.mlp"}[self.kind]


def parse_components(model, specs) -> list[Component]:
    """``"L3H5"``, ``"L3N100"``, ``"L3.attn"``, ``"L3.mlp"``, ``"L3"`` (or Component objects) -> components."""
    if isinstance(specs, (str, Component)):
        specs = [specs]
    out = []
    c = model.cfg
    for s in specs:
        if isinstance(s, Component):
            out.append(s)
            continue
        m = _SPEC.match(s.strip())
        if not m:
            raise ValueError(f"cannot read component {s!r}; write L3H5 (head), L3N100 (neuron), L3.attn, L3.mlp or L3")
        layer = int(m.group(1))
        if not 0 <= layer < c.n_layers:
            raise ValueError(f"{s!r}: layer {layer} out of range 0..{c.n_layers - 1}")
        if m.group(2) is not None:
            h = int(m.group(2))
            if not 0 <= h < c.n_heads:
                raise ValueError(f"{s!r}: head {h} out of range 0..{c.n_heads - 1}")
            out.append(Component(layer, "head", h))
        elif m.group(3) is not None:
            n = int(m.group(3))
            if not 0 <= n < c.d_mlp:
                raise ValueError(f"{s!r}: neuron {n} out of range 0..{c.d_mlp - 1}")
            out.append(Component(layer, "neuron", n))
        elif m.group(4) is not None:
            out.append(Component(layer, m.group(4)))
        else:
            out += [Component(layer, "attn"), Component(layer, "mlp")]
    return out


@dataclass
class AblationResult:
    """Per-prompt metric with and without the ablation, and the effect with its CI."""

    components: list[str]
    method: str
    baseline: torch.Tensor  # [prompt]
    ablated: torch.Tensor  # [prompt]
    effect: Estimate
    extra: dict = field(default_factory=dict)

    def summary(self) -> str:
        verdict = "distinguishable from zero" if self.effect.excludes(0.0) else "NOT distinguishable from zero"
        names = ", ".join(self.components[:8]) + (" ..." if len(self.components) > 8 else "")
        return (f"{self.method} ablation of {len(self.components)} component(s) [{names}]\n"
                f"  metric: {float(self.baseline.mean()):+.4f} -> {float(self.ablated.mean()):+.4f}\n"
                f"  effect: {self.effect}  ({verdict})")

    __str__ = __repr__ = summary

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

    def to_html(self) -> str:
        rows = torch.stack([self.baseline, self.ablated])
        return viz.heatmap_html(rows, ["clean", "ablated"], [str(i) for i in range(rows.shape[1])],
                                title="metric per prompt") + f"<pre>{viz.esc(self.summary())}</pre>"

    def _repr_html_(self) -> str:
        return self.to_html()


def _select(act: torch.Tensor, comp: Component):
    """Index of the component's slice in its hook activation ``[batch, pos, ...]``."""
    if comp.kind in ("head", "neuron"):
        return (slice(None), slice(None), comp.index)
    return (slice(None), slice(None))


def replacement_values(model, comps: list[Component], tokens: torch.Tensor, method: str,
                       reference=None, seed: int = 0) -> dict[Component, torch.Tensor]:
    """What each component is replaced with, shaped like its slice for ``tokens`` ``[batch, pos, ...]``."""
    N, P = tokens.shape
    names = sorted({c.hook for c in comps})
    if method == "zero":
        return {c: None for c in comps}
    ref = tokens if reference is None else equal_length_tokens(model, reference, "ablation")
    with torch.no_grad():
        _, cache = model.run_with_cache(ref, names_filter=names)
    out = {}
    g = torch.Generator().manual_seed(seed)
    if method == "resample":
        M = ref.shape[0]
        if ref.shape[1] != P:
            raise ValueError(f"resample ablation needs reference prompts of the same length ({P}), got {ref.shape[1]}")
        if M < 2 and reference is None:
            raise ValueError("resample ablation needs at least two prompts (or a reference set)")
        pick = torch.randint(0, M - 1 if reference is None else M, (N,), generator=g)
        if reference is None:  # never resample a prompt from itself
            pick = pick + (pick >= torch.arange(N)).long()
        for c in comps:
            out[c] = cache[c.hook][pick.to(ref.device)][_select(cache[c.hook], c)]
        return out
    if method == "mean":
        for c in comps:
            a = cache[c.hook][_select(cache[c.hook], c)]  # [M, P', ...]
            if a.shape[1] == P:
                out[c] = a.mean(0, keepdim=True).expand(N, *a.shape[1:])
            else:
                out[c] = a.mean((0, 1), keepdim=True).expand(N, P, *a.shape[2:])
        return out
    raise ValueError(f"method must be 'zero', 'mean' or 'resample', got {method!r}")


def ablation_hooks(model, comps: list[Component], values: dict) -> list:
    """Forward hooks that write the replacement values into each component's slice."""
    by_hook: dict[str, list[Component]] = {}
    for c in comps:
        by_hook.setdefault(c.hook, []).append(c)
    hooks = []
    for name, cs in by_hook.items():
        def fn(act, hook, _cs=cs):
            act = act.clone()
            for c in _cs:
                idx = _select(act, c)
                v = values[c]
                act[idx] = 0.0 if v is None else v.to(act.dtype)
            return act
        hooks.append((name, fn))
    return hooks


@torch.no_grad()
def ablate(model, tokens, metric, components, method: str = "zero", reference=None, seed: int = 0,
           n_boot: int = 2000) -> AblationResult:
    """Ablate ``components`` jointly and measure ``metric`` (one value per prompt) before and after."""
    toks = equal_length_tokens(model, tokens, "ablation")
    comps = parse_components(model, components)
    values = replacement_values(model, comps, toks, method, reference, seed)
    base = torch.as_tensor(metric(model(toks))).float().cpu()
    with model.hooks(ablation_hooks(model, comps, values)):
        abl = torch.as_tensor(metric(model(toks))).float().cpu()
    if base.dim() != 1 or base.shape[0] != toks.shape[0]:
        raise ValueError(f"the metric must return one value per prompt ([{toks.shape[0]}]) for a CI over prompts; "
                         f"got shape {tuple(base.shape)}")
    return AblationResult([str(c) for c in comps], method, base, abl, bootstrap_ci(abl - base, n_boot=n_boot, seed=seed))


@torch.no_grad()
def ablate_each(model, tokens, metric, components, method: str = "zero", reference=None, seed: int = 0,
                n_boot: int = 1000) -> list[AblationResult]:
    """Ablate each component on its own; results in the order given."""
    return [ablate(model, tokens, metric, [c], method, reference, seed, n_boot)
            for c in parse_components(model, components)]
