"""Circuit discovery: patching, edge attribution, a circuit chosen from the faithfulness curve, and its validation.

:func:`find_circuit` follows the usual recipe on a task dataset (clean/corrupted pairs):

1. residual-stream patching by layer x position finds where the task information lives;
2. the layers that matter are the ones where it moves (reported as a window);
3. every head (at ``hook_z``) and every MLP is patched (denoising: clean into corrupted), with
   attribution-patching screening of the heads;
4. edge attribution patching scores every edge (:mod:`mechscope.circuits.edges`);
5. the circuit is the smallest top-``k`` of the signed patching ranking whose faithfulness on the
   search prompts reaches ``target`` (:mod:`mechscope.circuits.faithfulness`: MIB's normalised
   faithfulness, every head and MLP outside the circuit ablated, counterfactually or by the mean);
   components whose patching effect opposes the behaviour are listed apart, never as members;
6. it is validated on held-out prompts: faithfulness, knockout (ablating the circuit itself), the
   faithfulness of random circuits of the same size, and the faithfulness curve over sizes, all
   with bootstrap CIs;
7. the result draws the circuit as a graph and prints its scores.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TypeVar

import torch

from ..analysis import viz
from ..analysis.metrics import describe_metric
from ..analysis.validation import Estimate, bootstrap_ci
from ..core import work
from ..core.components import Component, all_heads, all_mlps, head_readers
from ..core.errors import InputError
from ..core.hookpoints import act_name
from ..core.model import HookedModel
from ..core.progress import stage
from ..core.result import Result
from ..core.types import Metric, checked
from ..datasets import TaskDataset
from ..techniques.inputs import PreparedPair, batched_metric, prepare_task
from ..techniques.patching import PatchResult, patch
from .edges import _layer, edge_attribution  # noqa: F401  (edge_attribution: re-exported)
from .faithfulness import (
    ABLATION_MODES,
    Ablator,
    FaithfulnessCurve,
    Lazy,
    ablatable,
    check_mode,
    choose_from_curve,
    curve_over_sizes,
    curve_sizes,
    eap_node_ranking,
    faithfulness_curve,
    random_verdict,
    rank_p,
)

T = TypeVar("T")
OPPOSING = 0.05  # a component whose normalised patching effect is at most -OPPOSING works against the behaviour


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
    mode: str = "mean"  # how components outside the circuit were ablated (see ABLATION_MODES)
    opposing: dict[str, float] = field(default_factory=dict)  # components whose effect works against the behaviour
    rule: str = ""  # how the circuit was chosen, in words

    _skip_in_dict = ("extra",)

    @property
    def p_value(self) -> float:
        """One-sided rank p-value against the random circuits (:func:`~.faithfulness.rank_p`)."""
        return rank_p(self.faithfulness.value, [e.value for e in self.random_faithfulness])

    def verdict(self) -> str:
        """The circuit against random circuits of its size, in words, with the p-value and its limits."""
        heads = sum(Component.parse(x).kind == "head" for x in self.nodes)
        pool_heads = self.heads.values.numel()  # random circuits match the numbers of heads and of MLPs
        n_distinct = math.comb(pool_heads, heads) * math.comb(self.n_components - pool_heads, len(self.nodes) - heads)
        return random_verdict(self.faithfulness.value, [e.value for e in self.random_faithfulness], n_distinct)

    def summary(self) -> str:
        x = self.extra
        kept = x.get("kept", "")
        lines = [
            f"circuit of {len(self.nodes)} components (of {self.n_components}), {len(self.edges)} edges",
            f"  chosen: {self.rule}" if self.rule else "",
            f"  information moves in layers {self.layer_window[0]}..{self.layer_window[1]}, "
            f"at positions {self.positions}",
        ]
        if "metric_clean" in x:
            lines.append(f"  metric: {x['metric']}; on the {x.get('n_held_out', '?')} held-out prompts: clean run "
                         f"{x['metric_clean']:+.4f}, corrupted run {x['metric_corrupted']:+.4f}"
                         + (f", every component ablated {x['metric_empty']:+.4f}" if "metric_empty" in x else ""))
        lines += [
            f"  ablation: {ABLATION_MODES.get(self.mode, self.mode)}" + (f"; {kept}" if kept else ""),
            f"  faithfulness on held-out prompts ((circuit - every component ablated) / (whole model - every "
            f"component ablated); 1 = the whole model, 0 = nothing): {self.faithfulness}",
            f"  knockout (the circuit itself ablated): metric change {self.knockout}",
            f"  against random circuits: {self.verdict()}",
            "  members (denoising patching effect, normalised; + supports the behaviour):",
        ]
        for n in self.nodes:
            lines.append(f"    {n:>8} {self.node_scores[n]:+.3f}")
        if self.opposing:
            lines.append(f"  opposing the behaviour (patching effect <= -{OPPOSING}; not members, ablated with the rest):")
            lines += [f"    {n:>8} {v:+.3f}" for n, v in self.opposing.items()]
        lines.append("  strongest edges (EAP score):")
        for u, v, s in sorted(self.edges, key=lambda e: -abs(e[2]))[:12]:
            lines.append(f"    {u:>8} -> {v:<10} {s:+.3f}")
        if "held_out_curve" in x:
            lines.append(x["held_out_curve"].summary())
        if "curve" in self.extra:
            lines.append(self.extra["curve"].summary())
        if "falsification" in self.extra:
            lines.append("  " + self.extra["falsification"])
        if "work" in self.extra:
            lines.append(self.extra["work"].summary())
        return "\n".join(line for line in lines if line)

    def plot(self, path: str | Path = "circuit.png") -> Path:
        """The circuit as a graph: each head at its layer and head index, the MLPs in a column on the right (so that
        edges between components of one column stay visible), edges drawn by EAP score (red +, blue -)."""
        L = max([_layer(n) for n in self.nodes] + [0]) + 2
        H = self.heads.values.shape[-1]  # [layer, head]
        pos: dict[str, tuple[float, float]] = {"embed": (-1.0, -1.0), "logits": (-1.0, float(L))}
        by_layer: dict[int, list[str]] = {}
        for n in self.nodes:
            by_layer.setdefault(_layer(n), []).append(n)
            c = Component.parse(n)
            pos[n] = ((c.index - (H - 1) / 2) if c.kind == "head" else H / 2 + 1.0, float(c.layer))
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
               **{k: self.extra[k] for k in ("metric", "metric_clean", "metric_corrupted", "metric_empty",
                                             "falsification", "kept", "target", "search_curve") if k in self.extra}}
        for k in ("curve", "held_out_curve", "work"):
            if k in self.extra:
                out[k] = self.extra[k].to_dict()
        return out

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


def _screen(model, pair: PreparedPair, screen: int) -> tuple[list[tuple[int, int]], float]:
    """The ``screen`` heads ``(layer, head)`` attribution patching ranks highest on ``pair`` (|normalised estimate|),
    and the smallest of their estimates."""
    from ..techniques.attribution_patching import attribution_patch

    est = attribution_patch(model, pair, sites=("z",))["z"].normalized().abs()
    order = est.flatten().argsort(descending=True)[:screen]
    keep = sorted(tuple(int(i) for i in torch.unravel_index(k, est.shape)) for k in order)
    return keep, float(est.flatten()[order[-1]]) if len(order) else 0.0


def _screened_heads(model, pair: PreparedPair, screen: int) -> PatchResult:
    """Head patching (``z``) run exactly for the ``screen`` heads that attribution patching ranks highest.

    Attribution patching estimates every head at once (about 3 forward-equivalents); the exact patch
    then runs only for the candidates, and every other head is given no effect (the base run's value).
    ``stats["screened"]`` records how many heads were patched and the smallest candidate estimate.
    """
    from ..techniques.patch_engine import plan_patches, run_patches
    from ..techniques.patching import assemble, label_result

    keep, smallest = _screen(model, pair, screen)
    keep = set(keep)
    plan = plan_patches(model, pair, None, "z")
    skipped = [j for j in plan.jobs if tuple(j.key) not in keep]
    plan.jobs = [j for j in plan.jobs if tuple(j.key) in keep]
    values, runs, stats = run_patches(model, plan, pair.metric)
    for j in skipped:  # estimated below the candidates: no effect, exactly the base run's value
        values[j.key] = runs.base_value.clone()
    stats["screened"] = {"patched": len(plan.jobs), "of": len(plan.jobs) + len(skipped),
                         "smallest_candidate_estimate": smallest}
    res = assemble(plan, values, runs.clean_value, runs.corr_value, stats)
    return label_result(res, model, pair.clean, pair.corrupted, pair.metric)


class PairEffects:
    """Every head's and MLP's denoising patch (clean into corrupted) on one dataset, kept as the metric per prompt
    pair and filled as the splits of the dataset ask for them: a split patches only the (component, pair) cells
    that no earlier split did.

    A split's value is the mean over its pairs, v_S(c) = mean_{p in S} m_p(c), and its normalised effect
    (v_S - x_S) / (c_S - x_S) with the clean and corrupted runs' means over the same pairs: what patching the split
    alone gives (to float rounding; tests/test_circuit.py checks 1e-5). Needs a metric with one value per prompt,
    as every task dataset's has. Pass one to :func:`find_circuit` and :func:`replicate_split` of the same dataset
    (``investigate`` does).
    """

    def __init__(self, model: HookedModel, dataset: TaskDataset):
        L, H, n = model.cfg.n_layers, model.cfg.n_heads, dataset.n_pairs
        self.model, self.dataset = model, dataset
        self.heads = torch.full((L, H, n), math.nan)  # [layer, head, pair]: the metric with that head patched
        self.mlps = torch.full((L, n), math.nan)  # [layer, pair]
        self.clean = torch.full((n,), math.nan)  # [pair]: the unpatched runs' metric
        self.corrupted = torch.full((n,), math.nan)
        self.cells = {"patched": 0, "reused": 0}  # (component, pair) cells patched, and those read from earlier

    def components(self, idx: torch.Tensor, pair: PreparedPair, screen: int | None,
                   memo: Callable | None = None) -> tuple[PatchResult, PatchResult]:
        """:func:`patch_components` on the pairs ``idx`` of the dataset (``pair``: those pairs prepared, for the
        screening), from the cells already patched plus the missing ones. ``memo`` stores each patched block."""
        memo = memo or no_memo
        L, H = self.model.cfg.n_layers, self.model.cfg.n_heads
        idx = [int(i) for i in idx]
        screened = None
        if screen is None or screen >= L * H:
            keep = [(l, h) for l in range(L) for h in range(H)]
        else:
            keep, smallest = memo("screen", {"pairs": idx, "screen": screen}, lambda: _screen(self.model, pair, screen))
            keep = [tuple(k) for k in keep]
            screened = {"patched": len(keep), "of": L * H, "smallest_candidate_estimate": smallest}
        self._fill(idx, keep, memo, pair)
        return self._result(idx, keep, screened)

    def _fill(self, idx: list[int], keep: list[tuple[int, int]], memo: Callable, pair: PreparedPair) -> None:
        """Patch the cells of ``keep`` and every MLP on the pairs ``idx`` not patched yet, one block per distinct set
        of missing pairs (``pair``, the pairs ``idx`` prepared, serves a block of exactly those)."""
        groups: dict[tuple[int, ...], tuple[list, list]] = {}
        for kind, comps, table in (("heads", keep, lambda c: self.heads[c[0], c[1]]),
                                   ("mlps", range(self.model.cfg.n_layers), lambda c: self.mlps[c])):
            for c in comps:
                miss = tuple(p for p, gap in zip(idx, table(c)[idx].isnan().tolist()) if gap)
                if miss:
                    groups.setdefault(miss, ([], []))[kind == "mlps"].append(c)
        needed = len(idx) * (len(keep) + self.model.cfg.n_layers)
        for miss, (hs, ms) in groups.items():
            block = memo("component_pairs", {"pairs": list(miss), "heads": hs, "mlps": list(ms)},
                         lambda _m=miss, _h=hs, _l=ms: self._patch(list(_m), _h, list(_l),
                                                                    pair if list(_m) == idx else None))
            m = torch.tensor(miss)
            for i, (l, h) in enumerate(hs):
                self.heads[l, h, m] = block["heads"][i]
            for i, l in enumerate(ms):
                self.mlps[l, m] = block["mlps"][i]
            self.clean[m], self.corrupted[m] = block["clean"], block["corrupted"]
            self.cells["patched"] += len(miss) * (len(hs) + len(ms))
            needed -= len(miss) * (len(hs) + len(ms))
        self.cells["reused"] += needed

    def _patch(self, pairs: list[int], heads: list[tuple[int, int]], mlps: list[int],
               pair: PreparedPair | None) -> dict[str, torch.Tensor]:
        """The metric per pair ``[component, pair]`` with each of ``heads`` (at ``z``) and ``mlps`` patched on the
        dataset's pairs ``pairs`` (``pair``: those pairs prepared, or None), and the unpatched runs' ``[pair]``."""
        from ..techniques.patch_engine import plan_patches, run_patches

        sub = self.dataset.subset(pairs)
        pair = pair or prepare_task(self.model, sub, circuit_hooks(self.model))
        out = {"heads": torch.zeros(0, len(pairs)), "mlps": torch.zeros(0, len(pairs))}
        for kind, site, keys in (("heads", "z", [tuple(h) for h in heads]),
                                 ("mlps", [m.hook for m in all_mlps(self.model.cfg)], [(l,) for l in mlps])):
            if not keys:  # (a block has heads, MLPs or both)
                continue
            plan, want = plan_patches(self.model, pair, None, site), set(keys)
            plan.jobs = [j for j in plan.jobs if tuple(j.key) in want]
            values, runs, _ = run_patches(self.model, plan, pair.metric)
            rows = [values[k] for k in keys]
            if any(v.dim() != 1 or v.shape[0] != sub.clean.shape[0] for v in rows):
                raise InputError("per-pair patching effects need a metric with one value per prompt")
            out[kind] = sub.per_pair(torch.stack(rows, 1)).T.float().cpu()
            out["clean"], out["corrupted"] = (sub.per_pair(v.float().flatten().cpu()) for v in (runs.clean_value,
                                                                                                  runs.corr_value))
        return out

    def _result(self, idx: list[int], keep: list[tuple[int, int]], screened: dict | None
                ) -> tuple[PatchResult, PatchResult]:
        """The split's head and MLP results, as :func:`patch_components` gives them (unscreened heads: no effect):
        the store read as results over every pair, restricted to the split's (:meth:`PatchResult.restrict`)."""
        from ..techniques.patching import label_result

        c = self.model.cfg
        hv = self.corrupted.expand(c.n_layers, c.n_heads, -1).clone()  # no effect: the base run's value
        for l, h in keep:
            hv[l, h] = self.heads[l, h]
        stats = {"per_pair_cells": dict(self.cells), **({"screened": screened} if screened else {})}
        grids = [("z", ("layer", "head"), {"layer": [str(l) for l in range(c.n_layers)],
                                           "head": [str(h) for h in range(c.n_heads)]}, hv),
                 ("hooks", ("hook",), {"hook": [m.hook for m in all_mlps(c)]}, self.mlps)]
        sub = self.dataset.subset(idx[:1])
        return tuple(label_result(PatchResult(site, "denoise", v.mean(-1), axes, labels, 0.0, 0.0, v, stats=dict(stats),
                                              clean_per_prompt=self.clean, corrupted_per_prompt=self.corrupted
                                              ).restrict(torch.tensor(idx)),
                                  self.model, sub.clean, sub.corrupted, sub.metric) for site, axes, labels, v in grids)


def _window(resid: PatchResult) -> tuple[tuple[int, int], list[int]]:
    """Steps 1-2 read off residual patching: the layers where the information moves, and the positions it uses."""
    rn = resid.normalized().abs()
    positions = sorted({int(p) for p in torch.nonzero(rn.max(0).values > 0.1).flatten()})
    moving = torch.nonzero((rn[:, -1] < 0.5) | (rn[:, :-1].max(-1).values > 0.1)).flatten()
    return (int(moving.min()) if len(moving) else 0, int(moving.max()) if len(moving) else rn.shape[0] - 1), positions


@checked
def patch_components(model: HookedModel, pair: PreparedPair,
                     screen_heads: int | None = None) -> tuple[PatchResult, PatchResult]:
    """Step 3: every head (``z``; with ``screen_heads=K`` only attribution patching's top K exactly) and every MLP
    patched clean into corrupted on the prepared search prompts. Returns ``(heads [layer, head], mlps [layer])``."""
    c = model.cfg
    if screen_heads is None or screen_heads >= c.n_layers * c.n_heads:
        heads = patch(model, pair, site="z")
    else:
        heads = _screened_heads(model, pair, screen_heads)
    return heads, patch(model, pair, site=[m.hook for m in all_mlps(c)])


@checked
def circuit_hooks(model: HookedModel) -> list[str]:
    """What the circuit stages read from the unpatched clean and corrupted runs (the patching engine's inputs, keys
    and values, heads' and MLPs' outputs, the embeddings): cached together, one pass of each serves them all."""
    n = model.cfg.n_layers
    k = "rot_k" if model.has_hook(act_name("rot_k", 0)) else "k"
    names = model.embed_hooks + [act_name("resid_post", n - 1)]
    return names + [act_name(s, l) for l in range(n) for s in ("resid_pre", "z", "mlp_out", k, "v")]


@checked
def component_scores(model: HookedModel, heads: PatchResult, mlps: PatchResult) -> dict[str, float]:
    """``{component: normalised denoising patching effect}`` for every head and MLP (+ supports the behaviour)."""
    hv, mv = heads.normalized(), mlps.normalized()
    scores = {str(h): float(hv[h.layer, h.index]) for h in all_heads(model.cfg)}
    scores.update({str(m): float(mv[m.layer]) for m in all_mlps(model.cfg)})
    return scores


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



def _random_like(pool: list[str], nodes: list[str], n_random: int, seed: int) -> list[list[str]]:
    """``n_random`` random circuits from ``pool`` with as many heads and as many MLPs as ``nodes``."""
    heads = [x for x in pool if Component.parse(x).kind == "head"]
    mlps = [x for x in pool if Component.parse(x).kind != "head"]
    n_heads = sum(Component.parse(x).kind == "head" for x in nodes)
    rng = random.Random(seed)
    return [rng.sample(heads, n_heads) + rng.sample(mlps, len(nodes) - n_heads) for _ in range(n_random)]


def _choose_nodes(model, search, metric, scores, ranking, opposing, target, ablation, node_threshold, max_nodes,
                  seed) -> tuple[list[str], str, dict]:
    """Step 5: the threshold rule when ``node_threshold`` is given, else the smallest top-k reaching ``target``.
    Returns the nodes, the rule in words, and what goes into ``extra``."""
    if node_threshold is not None:
        nodes = [k for k in ranking if scores[k] >= node_threshold and k not in opposing][:max_nodes]
        if not nodes:
            raise InputError(f"no component reaches an effect >= {node_threshold}; lower node_threshold "
                             f"(largest: {ranking[0]} {scores[ranking[0]]:+.3f})")
        return nodes, (f"every component with patching effect >= {node_threshold}"
                       + (f" (at most {max_nodes})" if max_nodes else "")), {}
    stage(f"find_circuit 2/4: choosing the smallest circuit that reaches faithfulness {target} on the search "
          f"prompts ({ablation} ablation)")
    candidates = [k for k in ranking if k not in opposing]  # an opposing component is never a member
    nodes, points, rule = choose_from_curve(Ablator(model, search, metric, ranking, ablation, seed), candidates, target)
    return nodes, rule, {"target": target, "search_curve": points}


def _validate(abl: Ablator, ranking: list[str], nodes: list[str], n_random: int, seed: int) -> dict:
    """Step 6 on the held-out prompts of ``abl``: faithfulness, knockout, random circuits of the same size, the
    held-out curve of ``ranking``, and the clean, corrupted and empty-circuit metric."""
    pool = abl.pool
    faith = abl.faithfulness(nodes)
    knockout = bootstrap_ci(abl.ablated(nodes) - abl.full, seed=seed)
    rand = abl.faithfulness_many(_random_like(pool, nodes, n_random, seed))  # stacked passes
    sizes = sorted(set(curve_sizes(len(pool))) | {len(nodes)})
    curve = curve_over_sizes(abl.faithfulness, {"patching (signed)": ranking}, pool, sizes, 0, seed,
                             "the ablatable components", abl.mode, many=abl.faithfulness_many)
    corrupted = abl.data.per_pair(batched_metric(abl.model, abl.data.corrupted, abl.metric))
    return {"faithfulness": faith, "knockout": knockout, "random": rand, "held_out_curve": curve,
            "metric_clean": float(abl.full.mean()), "metric_corrupted": float(corrupted.mean()),
            "metric_empty": float(abl.empty.mean())}


def _rankings_curve(model, pair, eap, ranking, ig_steps, curve_ig_steps, abl, n_random, seed) -> FaithfulnessCurve:
    """The held-out curve of the patching, EAP and EAP-IG rankings against random circuits (``curve=True``)."""
    rankings = {"patching": ranking, ("eap-ig" if ig_steps else "eap"): eap_node_ranking(eap)}
    if not ig_steps and curve_ig_steps:
        stage(f"find_circuit: EAP-IG ({curve_ig_steps} steps) for the curve")
        rankings["eap-ig"] = eap_node_ranking(edge_attribution(model, pair, ig_steps=curve_ig_steps))
    stage(f"find_circuit: the faithfulness curve over circuit sizes ({', '.join(rankings)} rankings, random)")
    return faithfulness_curve(model, abl.data, rankings, n_random=min(n_random, 5), seed=seed,
                              ablator=abl)  # a mean line per size


def _check_args(dataset: TaskDataset, metric: Metric | None, memo: Callable, effects: PairEffects | None,
                ablation: str, target: float) -> None:
    """find_circuit's and replicate_split's arguments, checked once."""
    check_mode(ablation)
    if not 0 < target <= 1.5:
        raise InputError(f"target faithfulness must be in (0, 1.5], got {target}")
    if metric is not None and memo is not no_memo:
        raise InputError("a stage store (memo) keys its stages by the dataset, so it needs the dataset's own metric")
    if effects is None:
        return
    if effects.dataset is not dataset:
        raise InputError("effects (PairEffects) hold another dataset's patching: build them on this dataset")
    if metric is not None:
        raise InputError("effects (PairEffects) are the dataset's own metric per pair: pass no other metric")


def no_memo(name: str, params: dict, compute: Callable[[], T]) -> T:
    """The default stage store of :func:`find_circuit`: compute every stage (see ``memo`` there)."""
    return compute()


#: the heads patched exactly by default: attribution patching's top 64 (``screen_heads``; the CLI's ``--screen``).
#: On SmolLM2 IOI this gives the circuit and faithfulness of patching all 270 heads (docs/circuits.md, step 3).
SCREEN_HEADS = 64

#: what each stage of :func:`find_circuit` is called in a work log (:mod:`mechscope.core.work`)
STAGE_WORK_NAMES = {"resid": "patching: residual stream", "components": "patching: heads and MLPs",
                    "choice": "choice: search curve", "eap": "edge attribution", "validation": "validation: held-out",
                    "curve": "curve: rankings", "split_faithfulness": "validation: held-out",
                    "screen": "patching: heads and MLPs", "component_pairs": "patching: heads and MLPs"}


def _metered(memo: Callable, seed: int) -> Callable:
    """``memo`` with each stage marked in the open work meter, if any (named by :data:`STAGE_WORK_NAMES` and the
    split)."""
    def run(name: str, params: dict, compute: Callable[[], T]) -> T:
        with work.stage(f"{STAGE_WORK_NAMES.get(name, name)} [split {seed}]"):
            return memo(name, params, compute)
    return run


@checked
def find_circuit(model: HookedModel, dataset: TaskDataset, metric: Metric | None = None, target: float = 0.8,
                 ablation: str = "cf", ablate_mlps: bool = True, node_threshold: float | None = None,
                 edge_threshold: float = 0.05, ig_steps: int = 0, held_out: float = 0.5, n_random: int = 20,
                 seed: int = 0, max_nodes: int | None = None, screen_heads: int | None = SCREEN_HEADS,
                 curve: bool = False, curve_ig_steps: int = 5, memo: Callable = no_memo, effects: PairEffects | None = None
                 ) -> CircuitResult:
    """Find and validate a circuit for ``dataset`` (a :class:`~mechscope.datasets.TaskDataset`).

    Components (every head and, with ``ablate_mlps``, every MLP) are ranked by their signed denoising patching
    effect on the search split. The circuit is the smallest top-``k`` whose normalised faithfulness (MIB;
    :mod:`mechscope.circuits.faithfulness`) on the search prompts reaches ``target``, with every other component
    ablated in mode ``ablation`` (``"cf"``: from the corrupted run of the same prompt; ``"mean"``: the mean over
    the corrupted prompts), chosen on the search prompts, reported on the others. ``node_threshold`` instead keeps
    every component whose effect reaches it (the older rule; at most ``max_nodes``). Components whose effect is at
    most ``-OPPOSING`` are listed as opposing the behaviour, never as members. ``ablate_mlps=False`` judges heads
    only and keeps every MLP (the summary says so).

    Edges among the circuit's nodes (from the embedding, into the logits) whose |EAP score| reaches
    ``edge_threshold`` times the largest are kept. Validation on the held-out part (``held_out`` fraction):
    faithfulness, knockout, ``n_random`` random circuits with as many heads and MLPs, and the faithfulness
    curve of the ranking over sizes. ``screen_heads=K`` (default :data:`SCREEN_HEADS`) patches exactly only the
    K heads attribution patching ranks highest (the rest count as no effect); ``None`` patches every head.
    ``curve=True`` adds ``extra["curve"]``: the patching, EAP and EAP-IG (``curve_ig_steps``; 0 leaves it out)
    rankings over sizes against random circuits.

    ``memo(name, params, compute)`` stores the stages ("resid", "components", "choice", ...): a
    :class:`mechscope.workflows.StageCache` keeps them on disk, so that a killed run resumes and a rerun with another
    ``target`` reuses the patching (only with the dataset's own metric). ``effects`` (a :class:`PairEffects` of
    ``dataset``): the heads' and MLPs' patching per pair, shared with :func:`replicate_split`'s other splits."""
    _check_args(dataset, metric, memo, effects, ablation, target)
    search, test = dataset.split(held_out, seed=seed)
    memo = _metered(memo, seed)
    m_search, m_test = metric or search.metric, metric or test.metric  # a dataset's metric knows its own answers
    key = {"held_out": held_out, "seed": seed}
    stage(f"find_circuit 1/4: patching the residual stream, heads and MLPs on {search.n_pairs} prompts")
    pair = prepare_task(model, search, circuit_hooks(model), m_search)  # one clean, one corrupted run
    resid = memo("resid", key, lambda: patch(model, pair, site="resid_pre"))
    how = {**key, "screen_heads": screen_heads, "ablation": ablation, "ablate_mlps": ablate_mlps}
    heads, mlps, scores, (pool, ranking, opposing), (nodes, rule, extra) = _search(
        model, search, pair, how, target, node_threshold, max_nodes, memo, effects, dataset)
    stage(f"find_circuit 3/4: edge attribution{f' (IG, {ig_steps} steps)' if ig_steps else ''} among {len(nodes)} nodes")
    eap = memo("eap", {**key, "ig_steps": ig_steps},
               lambda: edge_attribution(model, pair, ig_steps=ig_steps))
    stage(f"find_circuit 4/4: faithfulness on {test.n_pairs} held-out prompts, against {n_random} random circuits")
    abl = Lazy(lambda: Ablator(model, test, m_test, pool, ablation, seed))
    val = memo("validation", {**how, "nodes": nodes, "n_random": n_random},
               lambda: _validate(abl(), ranking, nodes, n_random, seed))
    if curve:
        extra["curve"] = memo("curve", {**how, "ig_steps": ig_steps, "curve_ig_steps": curve_ig_steps, "n_random":
                                        n_random}, lambda: _rankings_curve(model, pair, eap, ranking, ig_steps,
                                                                           curve_ig_steps, abl(), n_random, seed))
    kept = ("every head and MLP outside the circuit ablated; embeddings kept" if ablate_mlps else
            "heads outside the circuit ablated; EVERY MLP KEPT (ablate_mlps=False), so the circuit assumes all of them")
    extra.update({k: val[k] for k in ("held_out_curve", "metric_clean", "metric_corrupted", "metric_empty")},
                 eap=eap, n_groups=model.cfg.n_groups, n_search=search.n_pairs, n_held_out=test.n_pairs, kept=kept,
                 metric=describe_metric(m_test))
    return CircuitResult(nodes, _select_edges(model, eap, nodes, edge_threshold), {k: scores[k] for k in nodes},
                         resid, heads, mlps, *_window(resid), val["faithfulness"], val["knockout"], val["random"],
                         len(pool), mode=ablation, opposing=opposing, rule=rule, extra=extra)


def _search(model, search: TaskDataset, pair: PreparedPair, how: dict, target: float, node_threshold, max_nodes,
            memo, effects: PairEffects | None, dataset: TaskDataset):
    """Steps 3 and 5 on the search prompts: patch the components, rank them, choose the circuit (stages
    "components", or ``effects``' blocks, and "choice" of ``memo``)."""
    if effects is None:
        heads, mlps = memo("components", {k: how[k] for k in ("held_out", "seed", "screen_heads")},
                           lambda: patch_components(model, pair, how["screen_heads"]))
    else:
        idx = dataset.split_pairs(how["held_out"], how["seed"])[0]
        heads, mlps = effects.components(idx, pair, how["screen_heads"], memo)
    scores = component_scores(model, heads, mlps)
    pool, ranking, opposing = ranked = _rank(model, scores, how["ablate_mlps"])
    chosen = memo("choice", {**how, "target": target, "node_threshold": node_threshold, "max_nodes": max_nodes},
                  lambda: _choose_nodes(model, search, pair.metric, scores, ranking, opposing, target, how["ablation"],
                                        node_threshold, max_nodes, how["seed"]))
    return heads, mlps, scores, ranked, chosen


@checked
def replicate_split(model: HookedModel, dataset: TaskDataset, seed: int, target: float = 0.8, ablation: str = "cf",
                    ablate_mlps: bool = True, held_out: float = 0.5, screen_heads: int | None = SCREEN_HEADS,
                    memo: Callable = no_memo, effects: PairEffects | None = None) -> tuple[list[str], Estimate]:
    """The circuit :func:`find_circuit` would choose on the split ``seed``, and its faithfulness on that split's
    held-out prompts: whether the circuit depends on which prompts happened to be held out. Shares the
    "components" and "choice" stages of ``memo``, and ``effects``' patched pairs, with :func:`find_circuit`."""
    _check_args(dataset, None, memo, effects, ablation, target)
    search, test = dataset.split(held_out, seed=seed)
    memo = _metered(memo, seed)
    how = {"held_out": held_out, "seed": seed, "screen_heads": screen_heads, "ablation": ablation,
           "ablate_mlps": ablate_mlps}
    pair = prepare_task(model, search, circuit_hooks(model))
    *_, (pool, _, _), (nodes, _, _) = _search(model, search, pair, how, target, None, None, memo, effects, dataset)
    faith = memo("split_faithfulness", {**how, "nodes": nodes},
                 lambda: Ablator(model, test, test.metric, pool, ablation, seed).faithfulness(nodes))
    return nodes, faith


def _rank(model, scores: dict[str, float], ablate_mlps: bool) -> tuple[list[str], list[str], dict[str, float]]:
    """The ablatable pool, its signed ranking (supporting first, opposing last) and the opposing components."""
    pool = ablatable(model, ablate_mlps)
    ranking = sorted(pool, key=lambda k: -scores[k])
    return pool, ranking, {k: scores[k] for k in reversed(ranking) if scores[k] <= -OPPOSING}
