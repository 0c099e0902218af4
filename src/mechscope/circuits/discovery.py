"""Circuit discovery: patching, edge attribution, a thresholded circuit, and its validation.

:func:`find_circuit` follows the usual recipe on a task dataset (clean/corrupted pairs):

1. residual-stream patching by layer x position finds where the task information lives;
2. the layers that matter are the ones where it moves (reported as a window);
3. every head (at ``hook_z``) and every MLP is patched;
4. edge attribution patching (EAP; Syed et al. 2023) scores each edge from an upstream component
   (the embedding, a head, an MLP) to a downstream reader as ``(out_u(clean) - out_u(corrupted)) . g_v``,
   where ``g_v`` is the exact gradient of the metric that flows into the residual stream through
   reader ``v``. Readers are the query input of each head (``L5H3.q``), the key and value inputs
   of each KV head (``L5H3.k``, ``L5H3.v``; under grouped-query attention one KV head serves a
   group of query heads and is written ``L5G1.k``), each MLP (``L5.mlp_in``) and the logits.
   One backward pass gives them all: the gradient at ``attn.hook_q/k/v`` of a head, mapped back
   through that head's ``W_Q``/``W_K``/``W_V`` and the vector-Jacobian product of the pre-attention
   norm, is the part of ``dM/d resid_pre`` that flows through that head's input; the parts add up
   exactly to the attention block's share ``dM/d resid_pre - dM/d resid_mid`` (tested), and the
   MLP's share is ``dM/d resid_mid - dM/d resid_post``. With ``ig_steps > 0`` the gradients are
   averaged along the path from corrupted to clean embeddings (EAP-IG, Hanna et al. 2024);
5. the circuit keeps the components whose patching effect passes a threshold, and the edges
   among them that pass an edge threshold;
6. it is validated on held-out prompts: faithfulness (mean-ablate every head and MLP outside the
   circuit; ``metric(circuit) / metric(full model)``), knockout (ablate the circuit itself), and
   the faithfulness of random circuits of the same size, all with bootstrap CIs;
7. the result draws the circuit as a graph and prints its scores.

In parallel-residual blocks (GPT-NeoX/Pythia with ``use_parallel_residual``, Phi), attention and
MLP both read ``resid_pre``: the MLP's share of ``dM/d resid_pre`` is the vector-Jacobian product of
``ln2`` applied to the gradient at its output (``ln2.hook_normalized``), the attention's is the rest
(``dM/d resid_pre - dM/d resid_post - mlp share``), and a layer's heads do not feed its own MLP.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..analysis import viz
from ..analysis.metrics import describe_metric
from ..analysis.validation import Estimate, bootstrap_ci
from ..batching import map_batches
from ..compute import forward_bytes
from ..core.components import Component, all_heads, all_mlps, head_readers, kv_component, parse_components
from ..core.errors import InputError
from ..core.hookpoints import act_name
from ..core.model import HookedModel
from ..core.progress import bar, stage
from ..core.result import Result
from ..core.types import Metric, TextOrTokens
from ..datasets import TaskDataset
from ..techniques.ablation import ablation_hooks, replacement_values
from ..techniques.inputs import metric_on_rows
from ..techniques.patching import PatchResult, patch


def _ratio_ci(num: torch.Tensor, den: torch.Tensor, seed: int = 0) -> Estimate:
    """``mean(num) / mean(den)`` with a bootstrap CI over prompts."""
    pairs = torch.stack([num.double(), den.double()], 1)
    return bootstrap_ci(pairs, stat=lambda p: p[:, 0].mean() / p[:, 1].mean(), seed=seed)


def _area(x: list[float], y: list[float]) -> float:
    """The trapezoid area under ``y(x)`` for increasing ``x`` in [0, 1]."""
    return float(sum((x[i + 1] - x[i]) * (y[i + 1] + y[i]) / 2 for i in range(len(x) - 1)))


@dataclass(repr=False)
class FaithfulnessCurve(Result):
    """Faithfulness over circuit sizes (MIB, Mueller et al. 2025): one ranking of components, the top ``k``
    kept for each ``k``, every other ablatable component mean-ablated on held-out prompts.

    ``cpr`` is the area under the curve over the fraction of components kept (higher is better),
    ``cmd`` the area between the curve and 1 (lower is better); both are computed against random
    circuits of the same sizes too, and for every ranking given (e.g. exact patching against EAP).
    """

    sizes: list[int]
    fraction: list[float]
    curves: dict[str, list[Estimate]]  # ranking name -> faithfulness at each size
    random: list[float]  # mean faithfulness of random circuits at each size
    n_components: int

    def _areas(self, ys: list[float]) -> tuple[float, float]:
        x = [0.0] + self.fraction
        y = [0.0] + ys
        return _area(x, y), _area(x, [abs(1 - v) for v in y])

    @property
    def scores(self) -> dict[str, dict[str, float]]:
        out = {name: dict(zip(("cpr", "cmd"), self._areas([e.value for e in c]))) for name, c in self.curves.items()}
        out["random"] = dict(zip(("cpr", "cmd"), self._areas(self.random)))
        return out

    def summary(self) -> str:
        lines = [f"faithfulness over circuit sizes (of {self.n_components} components; CPR: area under the curve, "
                 f"higher is better; CMD: area between the curve and 1, lower is better)"]
        head = "  size " + "".join(f"{n:>22s}" for n in self.curves) + f"{'random':>10s}"
        lines.append(head)
        for i, k in enumerate(self.sizes):
            row = "".join(f"{c[i].value:+9.3f} [{c[i].low:+.2f},{c[i].high:+.2f}]" for c in self.curves.values())
            lines.append(f"  {k:4d} {row}{self.random[i]:+10.3f}")
        for name, sc in self.scores.items():
            lines.append(f"  {name:>10s}: CPR {sc['cpr']:.3f}, CMD {sc['cmd']:.3f}")
        return "\n".join(lines)

    def _dict_extra(self) -> dict:
        return {"scores": self.scores}

    def plot(self, path: str | Path | None = None) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for name, c in self.curves.items():
            ax.plot(self.fraction, [e.value for e in c], marker="o", label=f"{name} (CPR {self.scores[name]['cpr']:.2f})")
            ax.fill_between(self.fraction, [e.low for e in c], [e.high for e in c], alpha=0.2)
        ax.plot(self.fraction, self.random, marker="x", color="grey", label=f"random (CPR {self.scores['random']['cpr']:.2f})")
        ax.axhline(1.0, color="black", lw=0.5)
        ax.set_xscale("log")
        ax.set_xlabel("fraction of components kept")
        ax.set_ylabel("faithfulness (held out)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = Path(path or "faithfulness_curve.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def eap_node_ranking(eap: dict[tuple[str, str], float]) -> list[str]:
    """Components ranked by EAP: each upstream component's summed |score| over the edges it writes into."""
    total: dict[str, float] = {}
    for (u, _), v in eap.items():
        if u != "embed":
            total[u] = total.get(u, 0.0) + abs(v)
    return sorted(total, key=lambda k: -total[k])


def faithfulness_curve(model: HookedModel, test: TaskDataset, rankings: dict[str, list[str]],
                       metric: Metric | None = None, sizes: list[int] | None = None, n_random: int = 3,
                       ablate_mlps: bool = False, seed: int = 0) -> FaithfulnessCurve:
    """Faithfulness of the top-``k`` components of each ranking, for each ``k`` of ``sizes`` (default: powers of 2
    up to every ablatable component), on ``test`` (held-out prompts), against random circuits of each size."""
    metric = metric or test.metric
    heads = [str(x) for x in all_heads(model.cfg)]
    mlps = [str(x) for x in all_mlps(model.cfg)]
    ablatable = heads + mlps if ablate_mlps else heads
    if not rankings:
        raise InputError("faithfulness_curve needs at least one ranking of components")
    with torch.no_grad():
        full = torch.as_tensor(metric(model(test.clean))).float().cpu()
    ablated = mean_ablator(model, test, metric, ablatable, seed)

    def faithful(kept: list[str]) -> Estimate:
        outside = [x for x in ablatable if x not in set(kept)]
        if not outside:  # nothing ablated: the model itself
            return _ratio_ci(full, full, seed)
        return _ratio_ci(ablated(outside), full, seed)

    rankings = {name: [x for x in order if x in set(ablatable)]  # only ablatable components change the curve
                for name, order in rankings.items()}
    return curve_over_sizes(faithful, rankings, ablatable, sizes, n_random, seed, "the ablatable components")


def curve_over_sizes(faithful: Callable[[list], Estimate], rankings: dict[str, list], pool: list,
                     sizes: list[int] | None, n_random: int, seed: int, what: str) -> FaithfulnessCurve:
    """The :class:`FaithfulnessCurve` of ``faithful(kept)`` for the top ``k`` of each ranking, for each ``k`` of
    ``sizes`` (default: powers of 2 up to all of ``pool``), against random ``k``-subsets of ``pool``."""
    n = len(pool)
    sizes = sizes or sorted({min(2 ** i, n) for i in range(n.bit_length() + 1)})
    bad = [k for k in sizes if not 0 < k <= n]
    if bad:
        raise InputError(f"sizes {bad} out of range: 1..{n} ({what})")
    curves = {name: [faithful(order[:k]) for k in bar(sizes, desc=f"faithfulness curve ({name})")]
              for name, order in rankings.items()}
    rng = random.Random(seed)
    rand = [sum(faithful(rng.sample(pool, k)).value for _ in range(n_random)) / n_random
            for k in bar(sizes, desc="faithfulness curve (random)")]
    return FaithfulnessCurve(list(sizes), [k / n for k in sizes], curves, rand, n)


@dataclass(repr=False)
class CircuitResult(Result):
    """A circuit (components and edges) with the evidence behind it."""

    nodes: list[str]
    edges: list[tuple[str, str, float]]
    node_scores: dict[str, float]
    resid: PatchResult
    heads: PatchResult
    mlps: PatchResult
    layer_window: tuple[int, int]
    positions: list[int]
    faithfulness: Estimate
    knockout: Estimate
    random_faithfulness: list[Estimate]
    n_components: int
    extra: dict = field(default_factory=dict)

    _skip_in_dict = ("extra",)

    @property
    def p_value(self) -> float:
        """One-sided rank p-value against the random circuits: ``(1 + #{random >= circuit}) / (n_random + 1)``."""
        r = [e.value for e in self.random_faithfulness]
        return (1 + sum(v >= self.faithfulness.value for v in r)) / (len(r) + 1)

    def verdict(self) -> str:
        """The circuit against random circuits of its size, in words, with the p-value and its limits."""
        r = [e.value for e in self.random_faithfulness]
        if not r:
            return "no random circuits drawn (n_random=0): nothing to compare the faithfulness with"
        n, p = len(r), self.p_value
        beats = sum(self.faithfulness.value > v for v in r)
        text = (f"more faithful than {beats} of {n} random circuits of the same size (rank p = {p:.3f}; random: mean "
                f"{sum(r) / n:.2f}, range [{min(r):.2f}, {max(r):.2f}])")
        if n < 19:
            return text + f"; {n} draws cannot give p < 0.05: use n_random >= 19"
        return text + ("" if p < 0.05 else ": NOT clearly better than random")

    def summary(self) -> str:
        x = self.extra
        lines = [
            f"circuit of {len(self.nodes)} components (of {self.n_components}), {len(self.edges)} edges",
            f"  information moves in layers {self.layer_window[0]}..{self.layer_window[1]}, "
            f"at positions {self.positions}",
        ]
        if "metric_clean" in x:
            lines.append(f"  metric: {x['metric']}; on the {x.get('n_held_out', '?')} held-out prompts: clean run "
                         f"{x['metric_clean']:+.4f}, corrupted run {x['metric_corrupted']:+.4f}")
        lines += [
            f"  faithfulness on held-out prompts (metric with the circuit alone / metric of the whole model; "
            f"{x.get('ablated_outside', 'heads')} outside the circuit mean-ablated over the corrupted prompts): "
            f"{self.faithfulness}",
            f"  knockout (the circuit mean-ablated): metric change {self.knockout}",
            f"  against random circuits: {self.verdict()}",
            "  components (patching effect, normalised):",
        ]
        for n in self.nodes:
            lines.append(f"    {n:>8} {self.node_scores[n]:+.3f}")
        lines.append("  strongest edges (EAP score):")
        for u, v, s in sorted(self.edges, key=lambda e: -abs(e[2]))[:12]:
            lines.append(f"    {u:>8} -> {v:<10} {s:+.3f}")
        if "curve" in self.extra:
            lines.append(self.extra["curve"].summary())
        if "falsification" in self.extra:
            lines.append("  " + self.extra["falsification"])
        return "\n".join(lines)

    def plot(self, path: str | Path = "circuit.png") -> Path:
        """The circuit as a graph: components placed by layer, edges drawn by EAP score (red +, blue -)."""
        L = max([_layer(n) for n in self.nodes] + [0]) + 2
        pos: dict[str, tuple[float, float]] = {"embed": (0.0, -1.0), "logits": (0.0, float(L))}
        by_layer: dict[int, list[str]] = {}
        for n in self.nodes:
            by_layer.setdefault(_layer(n), []).append(n)
        for l, ns in by_layer.items():
            for i, n in enumerate(sorted(ns)):
                pos[n] = (i - (len(ns) - 1) / 2, float(l))
        fig, ax = viz.figure(figsize=(8, max(4, 0.45 * L + 2)))
        m = max([abs(s) for _, _, s in self.edges] + [1e-9])
        for u, v, s in self.edges:
            tgt = "logits" if v == "logits" else _reader_node(v, by_layer, self.extra.get("n_groups", 1))
            if u not in pos or tgt not in pos:
                continue
            (x0, y0), (x1, y1) = pos[u], pos[tgt]
            ax.plot([x0, x1], [y0, y1], color="#c33" if s > 0 else "#36c", lw=0.5 + 3 * abs(s) / m, alpha=0.6)
        for n, (x, y) in pos.items():
            ax.scatter([x], [y], s=350, color="#eee" if n in ("embed", "logits") else "#fc6", edgecolors="#333",
                       zorder=3)
            ax.text(x, y, n, ha="center", va="center", fontsize=6, zorder=4)
        ax.set_ylabel("layer")
        ax.set_xticks([])
        ax.set_title(f"circuit: faithfulness {self.faithfulness.value:.2f} "
                     f"[{self.faithfulness.low:.2f}, {self.faithfulness.high:.2f}]")
        return viz.save_figure(fig, path)

    def to_html(self) -> str:
        return f"<pre>{viz.esc(self.summary())}</pre>" + self.resid.to_html() + self.heads.to_html()

    def _dict_extra(self) -> dict:
        out = {"eap_edges_scored": len(self.extra.get("eap", {})), "p_value": self.p_value,
               **{k: self.extra[k] for k in ("metric", "metric_clean", "metric_corrupted", "falsification")
                  if k in self.extra}}
        if "curve" in self.extra:
            out["curve"] = self.extra["curve"].to_dict()
        return out


def _layer(name: str) -> int:
    """``embed`` -> -1; ``L5H3``, ``L5G1``, ``L5.mlp``, ``L5H3.q`` -> 5."""
    return Component.parse(name).layer


def _reader_node(reader: str, by_layer, n_groups: int = 1) -> str | None:
    """The circuit node an edge into ``reader`` is drawn at: the head itself for ``L5H3.q``, the first
    circuit head of the group for ``L5G1.k``, the first circuit head of the layer for ``L5.attn_in``,
    the MLP for ``L5.mlp_in``."""
    r = Component.parse(reader)
    if r.kind == "mlp":
        return f"L{r.layer}.mlp"
    heads = sorted((c for c in map(Component.parse, by_layer.get(r.layer, [])) if c.kind == "head"),
                   key=lambda c: c.index)
    if r.kind == "group":
        heads = [c for c in heads if c.index // n_groups == r.index]
    elif r.kind == "head":
        heads = [c for c in heads if c.index == r.index]
    return str(heads[0]) if heads else None


def edge_attribution(model: HookedModel, clean: TextOrTokens, corrupted: TextOrTokens, metric: Metric, ig_steps: int = 0,
                     per_head: bool = True, batch_size: int | None = None) -> dict[tuple[str, str], float]:
    """EAP scores ``{(upstream, reader): score}`` (see the module docstring), summed over positions, mean over prompts.

    ``clean``, ``corrupted``: ``[batch, pos]`` token ids of equal shape. ``metric(logits) -> [batch]``.
    Upstream: ``embed``, ``L{l}H{h}``, ``L{l}.mlp``. Readers: ``L{l}H{h}.q``, the KV heads'
    ``L{l}H{g}.k``/``.v`` (``L{l}G{g}`` under grouped-query attention), ``L{l}.mlp_in`` and
    ``logits``; with ``per_head=False`` one ``L{l}.attn_in`` per attention block instead of the
    q/k/v readers. Score: ``sum_{pos} (out_u(clean) - out_u(corrupted)) . g_v`` averaged over prompts.
    Prompts run in batches sized from free memory (``batch_size`` overrides; see :mod:`mechscope.batching`).
    """
    c = model.cfg
    if clean.shape != corrupted.shape:
        raise InputError(f"clean and corrupted tokens must have the same shape, got {tuple(clean.shape)} "
                         f"and {tuple(corrupted.shape)}")
    N, P = clean.shape
    elt = torch.finfo(model.dtype).bits // 8
    per_prompt = 4 * forward_bytes(c.to_dict(), 1, P, elt)  # two cached runs, a forward with its graph, gradients

    def run(s: int, e: int) -> dict:
        return _eap_batch(model, clean[s:e], corrupted[s:e], metric, ig_steps, per_head, torch.arange(s, e), N)

    sums: dict[tuple[str, str], float] = {}
    for part in map_batches(run, N, batch_size, per_prompt, model.device, "edge attribution",
                            tokens_per_item=4 * P):  # two cached runs and a forward-backward pass
        for k, v in part.items():
            sums[k] = sums.get(k, 0.0) + v
    return {k: v / N for k, v in sums.items()}


def _eap_batch(model, clean, corrupted, metric, ig_steps: int, per_head: bool, rows: torch.Tensor,
               n_prompts: int) -> dict[tuple[str, str], float]:
    """EAP score sums over the prompts ``rows`` (``clean``/``corrupted`` ``[b, pos]``) of a dataset of ``n_prompts``."""
    c = model.cfg
    n = c.n_layers
    out_names = ["hook_embed"] + (["hook_pos_embed"] if model.has_hook("hook_pos_embed") else [])
    out_names += [act_name("z", l) for l in range(n)] + [act_name("mlp_out", l) for l in range(n)]
    with torch.no_grad():
        _, cc = model.run_with_cache(clean, names_filter=out_names)
        _, cx = model.run_with_cache(corrupted, names_filter=out_names)
    grad_names = [act_name(s, l) for l in range(n) for s in ("resid_pre", "resid_mid", "resid_post")]
    shared = c.parallel_residual and not model.has_hook(act_name("normalized", 0, "ln2"))
    if c.parallel_residual:  # the MLP reads ln2(resid_pre) (or ln1's output, shared with attention)
        grad_names = [g for g in grad_names if "resid_mid" not in g]
        grad_names += [act_name("normalized", l, "ln1" if shared else "ln2") for l in range(n)]
    if per_head or shared:
        grad_names += [act_name(s, l) for l in range(n) for s in ("q", "k", "v")]
        W = (model.W_Q, model.W_K_kv, model.W_V_kv)  # hoisted: each access rebuilds the stack
    readers: dict[str, torch.Tensor] = {}
    steps = max(1, ig_steps)
    params = [p for p in model.hf.parameters() if p.requires_grad]
    emb_c = cc["embed"] + (cc["pos_embed"] if model.has_hook("hook_pos_embed") else 0)
    emb_x = cx["embed"] + (cx["pos_embed"] if model.has_hook("hook_pos_embed") else 0)
    try:
        for p in params:
            p.requires_grad_(False)
        for k in bar(range(steps), desc="EAP-IG steps"):
            alpha = (k + 0.5) / steps if ig_steps else 0.0
            store, resid = {}, {}

            def start(act, hook, _a=alpha):  # the graph starts at the residual stream entering block 0
                return (emb_x + _a * (emb_c - emb_x)).detach().requires_grad_(True)

            def record(act, hook, _resid=resid):
                _resid[hook.layer()] = act.detach()

            def keep(g, hook, _store=store):
                _store[hook.name] = g.detach()

            fwd = [("blocks.0.hook_resid_pre", start)]
            if per_head or c.parallel_residual:
                fwd += [(act_name("resid_pre", l), record) for l in range(n)]
            with torch.enable_grad(), model.hooks(fwd, [(g, keep) for g in grad_names]):
                value = metric_on_rows(metric, model(corrupted), rows, n_prompts)
                value.sum().backward()
            for r, g in _reader_grads(model, store, resid, W if (per_head or shared) else None, per_head).items():
                readers[r] = readers.get(r, 0.0) + g / steps
    finally:
        for p in params:
            p.requires_grad_(True)
    return _edge_scores(model, cc, cx, readers, emb_c, emb_x, clean.shape[0])  # sums over this batch


def _reader_grads(model, store: dict, resid: dict, W, per_head: bool = True) -> dict[str, torch.Tensor]:
    """``{reader: dM/d resid through that reader}`` ``[batch, pos, d_model]`` from one backward pass."""
    n = model.cfg.n_layers
    out = {}
    for l in range(n):
        g_pre, g_post = store[act_name("resid_pre", l)], store[act_name("resid_post", l)]
        heads = _head_input_grads(model, l, store, resid[l], W) if W is not None else None
        if model.cfg.parallel_residual:
            # resid_post = resid_pre + attn(ln1(resid_pre)) + mlp(ln2(resid_pre)): the MLP's share of dM/d resid_pre
            # is ln2's vector-Jacobian product of the gradient at its output; the attention's is the rest
            if act_name("normalized", l, "ln2") in store:
                mlp = _norm_vjp(model.ln2(l), resid[l], store[act_name("normalized", l, "ln2")])
            else:  # one norm feeds both: the MLP's part of the gradient at ln1's output is what q/k/v do not take
                at_norm = store[act_name("normalized", l, "ln1")] - _head_input_grads(
                    model, l, store, resid[l], W, at_norm=True)
                mlp = _norm_vjp(model.ln1(l), resid[l], at_norm)
            attn = g_pre - g_post - mlp
        else:
            g_mid = store[act_name("resid_mid", l)]
            mlp, attn = g_mid - g_post, g_pre - g_mid
        if per_head and heads is not None:
            out.update(heads)
        else:
            out[f"L{l}.attn_in"] = attn
        out[f"L{l}.mlp_in"] = mlp
    out["logits"] = store[act_name("resid_post", n - 1)]
    return out


def _norm_vjp(norm, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``J_norm(x)ᵀ g``: the gradient at the norm's input ``x [batch, pos, d_model]`` of ``g`` at its output."""
    if norm is None:
        return g
    x = x.clone().requires_grad_(True)
    with torch.enable_grad():
        (gx,) = torch.autograd.grad(norm(x), x, g.to(x.dtype))
    return gx


def _head_input_grads(model, l: int, store: dict, resid_pre: torch.Tensor, W,
                      at_norm: bool = False) -> dict[str, torch.Tensor] | torch.Tensor:
    """Per-head shares of ``dM/d resid_pre`` through the attention input: ``J_ln1ᵀ (g_q[h] W_Q[h]ᵀ)`` etc.
    With ``at_norm``: their sum at the norm's output instead (``Σ g W ᵀ``, before the norm's VJP)."""
    W_Q, W_K, W_V = (w[l].to(resid_pre.dtype) for w in W)  # [head | kv_head, d_model, d_head]
    g = {s: store[act_name(s, l)] for s in ("q", "k", "v")}  # [batch, pos, head | kv_head, d_head]
    v = torch.cat([torch.einsum("bphe,hde->bphd", g["q"], W_Q), torch.einsum("bphe,hde->bphd", g["k"], W_K),
                   torch.einsum("bphe,hde->bphd", g["v"], W_V)], dim=2)  # [batch, pos, readers, d_model]
    if at_norm:
        return v.sum(2)
    ln1 = model.ln1(l)
    if ln1 is None:  # attention reads the residual stream itself (OLMo-2): the map is the identity
        gx = v
    else:
        x = resid_pre[:, :, None, :].expand(-1, -1, v.shape[2], -1).clone().requires_grad_(True)
        with torch.enable_grad():
            (gx,) = torch.autograd.grad(ln1(x), x, v)  # the norm's vector-Jacobian product, one per reader
    kv = [kv_component(model.cfg, l, g) for g in range(model.cfg.n_kv_heads)]
    names = [f"L{l}H{h}.q" for h in range(model.cfg.n_heads)] + [f"{c}.k" for c in kv] + [f"{c}.v" for c in kv]
    return {name: gx[:, :, i] for i, name in enumerate(names)}


@torch.no_grad()
def _edge_scores(model, cc, cx, readers: dict, emb_c, emb_x, N) -> dict[tuple[str, str], float]:
    """Every allowed (upstream, reader) pair as matmuls: ``sum_b U_b [n_up, P·D] @ R_b [n_read, P·D]ᵀ`` (summed over prompts)."""
    c, n = model.cfg, model.cfg.n_layers
    up_names, up_layer, deltas = ["embed"], [-1], [(emb_c - emb_x).float()]
    for l in range(n):
        res_c = model.head_results(l, cc["z", l])
        res_x = model.head_results(l, cx["z", l])
        for h in range(c.n_heads):
            up_names.append(f"L{l}H{h}")
            up_layer.append(l)
            deltas.append((res_c[:, :, h] - res_x[:, :, h]).float())
        up_names.append(f"L{l}.mlp")
        up_layer.append(l)
        deltas.append((cc["mlp_out", l] - cx["mlp_out", l]).float())
    up_head = [Component.parse(u).kind == "head" for u in up_names]
    r_names = list(readers)
    r_layer = [n if r == "logits" else _layer(r) for r in r_names]
    S = torch.zeros(len(up_names), len(r_names))
    dev = model.device  # layers may sit on different devices: meet on the first one
    for b in range(N):  # one prompt at a time keeps memory at (n_up + n_read) x pos x d_model
        U = torch.stack([d[b].reshape(-1).to(dev) for d in deltas])  # [n_up, P·D]
        R = torch.stack([readers[r][b].float().reshape(-1).to(dev) for r in r_names])  # [n_read, P·D]
        S += (U @ R.T).cpu()
    S = S.tolist()
    scores = {}
    for i, (u, lu) in enumerate(zip(up_names, up_layer)):
        for j, (r, lr) in enumerate(zip(r_names, r_layer)):
            # a reader reads the blocks before its own; a layer's MLP also reads that layer's heads, unless the
            # block is parallel (attention and MLP both read resid_pre)
            if lu < lr or (r.endswith("mlp_in") and lu == lr and up_head[i] and not c.parallel_residual):
                scores[(u, r)] = S[i][j]
    return scores


@torch.no_grad()
def mean_ablator(model: HookedModel, test: TaskDataset, metric: Metric, pool: list[str], seed: int = 0) -> Callable:
    """``ablated(names) -> [prompt]``: ``metric`` on ``test.clean`` with the named components mean-ablated over
    ``test.corrupted``. The means of every component of ``pool`` come from one cached pass, so each further
    circuit costs one forward pass (what makes 20+ random circuits cheap)."""
    comps = parse_components(model, pool)
    values = replacement_values(model, comps, test.clean, "mean", test.corrupted, seed)
    by_name = {str(c): c for c in comps}

    @torch.no_grad()
    def ablated(names: list[str]) -> torch.Tensor:
        cs = [by_name[n] for n in names]
        with model.hooks(ablation_hooks(model, cs, {c: values[c] for c in cs})):
            return torch.as_tensor(metric(model(test.clean))).float().cpu()

    return ablated


def _screened_heads(model, search, metric, screen: int) -> PatchResult:
    """Head patching (``z``) run exactly for the ``screen`` heads that attribution patching ranks highest.

    Attribution patching estimates every head at once (about 3 forward-equivalents); the exact patch
    then runs only for the candidates, and every other head is given no effect (the base run's value).
    ``stats["screened"]`` records how many heads were patched and the smallest candidate estimate.
    """
    from ..techniques.attribution_patching import attribution_patch
    from ..techniques.patching import assemble, plan_patches, run_patches

    est = attribution_patch(model, search.clean, search.corrupted, metric, sites=("z",))["z"].normalized().abs()
    order = est.flatten().argsort(descending=True)[:screen]
    keep = {tuple(int(i) for i in torch.unravel_index(k, est.shape)) for k in order}
    plan = plan_patches(model, search.clean, search.corrupted, "z")
    skipped = [j for j in plan.jobs if tuple(j.key) not in keep]
    plan.jobs = [j for j in plan.jobs if tuple(j.key) in keep]
    values, runs, stats = run_patches(model, plan, metric)
    for j in skipped:  # estimated below the candidates: no effect, exactly the base run's value
        values[j.key] = runs.base_value.clone()
    stats["screened"] = {"patched": len(plan.jobs), "of": len(plan.jobs) + len(skipped),
                         "smallest_candidate_estimate": float(est.flatten()[order[-1]]) if len(order) else 0.0}
    return assemble(plan, values, float(runs.clean_value.mean()), float(runs.corr_value.mean()), stats)


def _locate(model, search, metric, screen_heads: int | None = None
            ) -> tuple[PatchResult, PatchResult, PatchResult, tuple[int, int], list[int]]:
    """Steps 1-3: residual-stream patching (where the information lives and moves), then heads and MLPs."""
    c = model.cfg
    resid = patch(model, search.clean, search.corrupted, metric, site="resid_pre")
    rn = resid.normalized().abs()
    positions = sorted({int(p) for p in torch.nonzero(rn.max(0).values > 0.1).flatten()})
    moving = torch.nonzero((rn[:, -1] < 0.5) | (rn[:, :-1].max(-1).values > 0.1)).flatten()
    window = (int(moving.min()) if len(moving) else 0, int(moving.max()) if len(moving) else c.n_layers - 1)
    if screen_heads is None or screen_heads >= c.n_layers * c.n_heads:
        heads = patch(model, search.clean, search.corrupted, metric, site="z")
    else:
        heads = _screened_heads(model, search, metric, screen_heads)
    mlps = patch(model, search.clean, search.corrupted, metric, site=[m.hook for m in all_mlps(c)])
    return resid, heads, mlps, window, positions


def _select_edges(model, eap: dict, nodes: list[str], edge_threshold: float) -> list[tuple[str, str, float]]:
    """Edges among the circuit's nodes (from the embedding, into the logits) with |score| >= threshold x the largest."""
    keep_readers = {"logits"}
    for comp in map(Component.parse, nodes):
        if comp.kind == "mlp":
            keep_readers.add(str(Component(comp.layer, "mlp", port="in")))
        else:
            keep_readers.update(str(r) for r in head_readers(model.cfg, comp.layer, comp.index))
    cand = {(u, r): s for (u, r), s in eap.items() if (u in nodes or u == "embed") and r in keep_readers}
    top = max([abs(s) for s in cand.values()] + [1e-12])
    return [(u, r, s) for (u, r), s in cand.items() if abs(s) >= edge_threshold * top]


def _validate_circuit(model, test, metric, nodes: list[str], ablate_mlps: bool, n_random: int,
                      seed: int) -> tuple[Estimate, Estimate, list[Estimate], dict]:
    """Step 6 on held-out prompts: faithfulness, knockout, random circuits of the same size, and the clean and
    corrupted metric they are read against."""
    heads = [str(x) for x in all_heads(model.cfg)]
    mlps = [str(x) for x in all_mlps(model.cfg)]
    with torch.no_grad():
        full = torch.as_tensor(metric(model(test.clean))).float().cpu()
        corrupted = torch.as_tensor(metric(model(test.corrupted))).float().cpu()
    ablatable = heads + mlps if ablate_mlps else heads
    ablated = mean_ablator(model, test, metric, sorted(set(ablatable) | set(nodes)), seed)

    def faithful(circuit_nodes):
        return _ratio_ci(ablated([x for x in ablatable if x not in set(circuit_nodes)]), full, seed)

    knocked = ablated(list(nodes))
    n_heads = sum(Component.parse(x).kind == "head" for x in nodes)
    rng = random.Random(seed)
    rand = [faithful(rng.sample(heads, n_heads) + rng.sample(mlps, len(nodes) - n_heads))
            for _ in bar(range(n_random), desc="random circuits")]
    base = {"clean": float(full.mean()), "corrupted": float(corrupted.mean()), "n": int(full.numel())}
    return faithful(nodes), bootstrap_ci(knocked - full, seed=seed), rand, base


def find_circuit(model: HookedModel, dataset: TaskDataset, metric: Metric | None = None, node_threshold: float = 0.05,
                 edge_threshold: float = 0.05, ig_steps: int = 0, held_out: float = 0.5, n_random: int = 20,
                 seed: int = 0, max_nodes: int = 30, ablate_mlps: bool = False,
                 screen_heads: int | None = None, curve: bool = False, curve_ig_steps: int = 5) -> CircuitResult:
    """Find and validate a circuit for ``dataset`` (a :class:`~mechscope.datasets.TaskDataset`).

    Components whose normalised patching effect reaches ``node_threshold`` (at most ``max_nodes``,
    largest first) form the circuit; edges among them (and from the embedding, into the logits)
    whose |EAP score| reaches ``edge_threshold`` times the largest are kept. Validation uses the
    held-out part of the dataset (``held_out`` fraction). Faithfulness mean-ablates the *heads* outside
    the circuit (as Wang et al. 2022 do for IOI); ``ablate_mlps=True`` ablates the MLPs outside it too,
    which in models whose MLPs carry token identity (Llama, Gemma) removes far more than a circuit story
    usually claims. Random circuits are judged the same way. ``screen_heads=K`` patches exactly only the
    K heads that attribution patching ranks highest (the rest count as no effect): on SmolLM2 IOI with
    K=64 of 270 the circuit is the same and head patching takes a fraction of the time. ``curve=True``
    adds ``extra["curve"]``: the :func:`faithfulness_curve` of the patching ranking, the EAP ranking and the
    EAP-IG ranking (``curve_ig_steps`` steps; 0 leaves it out) (:func:`eap_node_ranking`) over circuit sizes,
    with CPR and CMD, against random circuits.
    """
    search, test = dataset.split(held_out, seed=seed)
    m_search = metric or search.metric  # a dataset's own metric knows its answers, so each split uses its own
    m_test = metric or test.metric
    c = model.cfg
    stage(f"find_circuit 1/3: patching the residual stream, heads and MLPs on {len(search)} prompts")
    resid, heads, mlps, window, positions = _locate(model, search, m_search, screen_heads)
    hv, mv = heads.normalized(), mlps.normalized()
    node_scores = {str(h): float(hv[h.layer, h.index]) for h in all_heads(c)}
    node_scores.update({str(m): float(mv[m.layer]) for m in all_mlps(c)})
    ranked = sorted(node_scores, key=lambda k: -abs(node_scores[k]))
    nodes = [k for k in ranked if abs(node_scores[k]) >= node_threshold][:max_nodes]
    if not nodes:
        raise InputError(f"no component reaches |effect| >= {node_threshold}; lower node_threshold "
                         f"(largest: {ranked[0]} {node_scores[ranked[0]]:+.3f})")
    stage(f"find_circuit 2/3: edge attribution{f' (IG, {ig_steps} steps)' if ig_steps else ''} among {len(nodes)} nodes")
    eap = edge_attribution(model, search.clean, search.corrupted, m_search, ig_steps=ig_steps)
    edges = _select_edges(model, eap, nodes, edge_threshold)
    stage(f"find_circuit 3/3: faithfulness on {len(test)} held-out prompts, against {n_random} random circuits")
    faith, knockout, rand, base = _validate_circuit(model, test, m_test, nodes, ablate_mlps, n_random, seed)
    extra_curve = {}
    if curve:
        rankings = {"patching": ranked, ("eap-ig" if ig_steps else "eap"): eap_node_ranking(eap)}
        if not ig_steps and curve_ig_steps:
            stage(f"find_circuit: EAP-IG ({curve_ig_steps} steps) for the curve")
            rankings["eap-ig"] = eap_node_ranking(edge_attribution(model, search.clean, search.corrupted, m_search,
                                                                   ig_steps=curve_ig_steps))
        stage(f"find_circuit: the faithfulness curve over circuit sizes ({', '.join(rankings)} rankings, random)")
        extra_curve["curve"] = faithfulness_curve(model, test, rankings, m_test, n_random=min(n_random, 5),
                                                  ablate_mlps=ablate_mlps, seed=seed)  # a mean line per size
    return CircuitResult(nodes, edges, {k: node_scores[k] for k in nodes}, resid, heads, mlps, window, positions,
                         faith, knockout, rand, len(node_scores),
                         extra={"eap": eap, "n_groups": c.n_groups, "n_search": len(search), "n_held_out": len(test),
                                "ablated_outside": "heads and MLPs" if ablate_mlps else "heads",
                                "metric": describe_metric(m_test), "metric_clean": base["clean"],
                                "metric_corrupted": base["corrupted"], **extra_curve})
