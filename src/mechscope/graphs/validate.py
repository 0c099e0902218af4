"""Checking a graph: each edge against a real perturbation, and its predictions against the real model.

- :func:`perturb_sources` removes source nodes in the frozen replacement model, one per copy of the
  prompt, and reads the targets: because that model is linear, removing source ``s`` changes target
  ``t`` by exactly ``-A[t, s]``. :func:`edge_certificate` does this for a sample of a graph's edges.
- :func:`intervene` scales features in the **real** model (through their decoder directions at
  ``hook_mlp_out``: attention, norms and every MLP recompute) and sets the measured change of each
  target logit beside what the graph predicts: the direct edges alone, and the graph's linear
  propagation through the downstream features.
- :func:`graph_curve` is the faithfulness curve of a graph's features over how many are kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..analysis.validation import Estimate
from ..circuits.faithfulness import FaithfulnessCurve, curve_over_sizes
from ..core import HookedModel, InputError, work
from ..core.hookpoints import act_name
from ..core.progress import quiet
from ..core.result import Result
from ..core.types import checked
from ..sae.model import SAE
from ..sae.replacement import Replacement, replacement_of
from ..sae.transcoders import TranscoderSet
from .graph import EMBEDDING, ERROR, FEATURE, LOGIT, AttributionGraph
from .replacement import EMBED, ReplacementModel


def _feature_writes(rep: Replacement, graph: AttributionGraph, node: int) -> list[tuple[int, int, torch.Tensor]]:
    """Feature node ``node``'s writes ``a_f W_dec[f]`` as ``(target layer, position, [d_model] on the CPU)``: one for
    a per-layer transcoder's feature, one per later layer for a cross-layer transcoder's."""
    layer, pos, f = int(graph.layer[node]), int(graph.pos[node]), int(graph.index[node])
    if layer not in rep.layers:
        raise InputError(f"no transcoder for layer {layer} among those given (they read layers {rep.layers})")
    dirs = rep.write_directions(layer, torch.tensor([f]))[0].detach().float().cpu()  # [targets, d]
    return [(t, pos, float(graph.value[node]) * dirs[j]) for j, t in enumerate(rep.targets(layer))]


def _real_last_logits(model: HookedModel, tokens: torch.Tensor, writes: list[tuple[int, int, torch.Tensor]],
                      tops: torch.Tensor) -> torch.Tensor:
    """The real model's demeaned last-position logits of ``tops``, with each ``(layer, pos, vector)`` of ``writes``
    added to that block's ``hook_mlp_out`` (everything downstream recomputes)."""
    adds: dict[str, torch.Tensor] = {}
    for layer, pos, vec in writes:
        adds.setdefault(act_name("mlp_out", layer), torch.zeros(tokens.shape[1], model.cfg.d_model))[pos] += vec
    hooks = [(name, lambda act, hook, v=v: act + v.to(act.device, act.dtype)) for name, v in adds.items()]
    last = model.run_with_hooks(tokens, fwd_hooks=hooks)[0, -1].float().cpu()
    return last[tops] - last.mean()


def _source_writes(rm: ReplacementModel, graph: AttributionGraph, node: int) -> list[tuple[str | int, int, torch.Tensor]]:
    """Where source ``node`` writes (``"embed"`` or a layer), at which position, and the vector it writes there."""
    kind, layer, pos = int(graph.kind[node]), int(graph.layer[node]), int(graph.pos[node])
    if kind == FEATURE:
        return _feature_writes(rm.transcoders, graph, node)
    if kind == ERROR:
        return [(layer, pos, rm.layers[layer].error[pos].float().cpu())]
    if kind == EMBEDDING:
        return [(EMBED, pos, rm.embed[pos].float().cpu())]
    raise InputError(f"node {node} ({graph.node_name(node)}) is a logit: it is no source")


def _read_targets(rm: ReplacementModel, graph: AttributionGraph, run, targets: list[int],
                  rows: torch.Tensor) -> torch.Tensor:
    """The value of target node ``targets[i]`` in copy ``rows[i]`` of a replacement-model run."""
    out = torch.zeros(len(targets))
    for i, t in enumerate(targets):
        kind, layer, pos, idx = (int(graph.kind[t]), int(graph.layer[t]), int(graph.pos[t]), int(graph.index[t]))
        r = rows[i:i + 1]
        if kind == LOGIT:
            out[i] = rm.logit_values(run, torch.tensor([idx]), r)[0]
        elif kind == FEATURE:
            out[i] = rm.feature_values(run, layer, torch.tensor([pos]), torch.tensor([idx]), r)[0]
        else:
            raise InputError(f"node {t} ({graph.node_name(t)}) receives no edges: it is no target")
    return out


@torch.no_grad()
def perturb_sources(rm: ReplacementModel, graph: AttributionGraph, edges: list[tuple[int, int]]) -> torch.Tensor:
    """For each ``(target, source)``: the change of the target when the source is removed from the frozen
    replacement model (one copy of the prompt per edge, one forward pass in all)."""
    B, d = len(edges), rm.model.cfg.d_model
    add: dict = {}
    for b, (_, s) in enumerate(edges):
        for site, pos, vec in _source_writes(rm, graph, s):
            add.setdefault(site, torch.zeros(B, rm.n_pos, d))[b, pos] -= vec
    work.add_floor(B * rm.n_pos * rm.model.cfg.n_layers)  # each perturbed copy (the base run repeats the graph's)
    base, _ = rm.run(1)
    run, _ = rm.run(B, {k: v.to(rm.model.dtype) for k, v in add.items()})
    targets = [t for t, _ in edges]
    return (_read_targets(rm, graph, run, targets, torch.arange(B))
            - _read_targets(rm, graph, base, targets, torch.zeros(B, dtype=torch.long)))


def edge_certificate(rm: ReplacementModel, graph: AttributionGraph, n: int = 32, seed: int = 0) -> dict:
    """Re-check ``n`` edges (half the largest, half drawn at random) by perturbation: ``{n, worst_abs,
    worst_rel, edges: [[target, source, weight, measured], ...]}``; ``measured`` should equal ``-weight``."""
    tgt, src, val = graph.entries()
    if val.numel() == 0:
        return {"n": 0, "worst_abs": 0.0, "worst_rel": 0.0, "edges": []}
    top = val.abs().argsort(descending=True)[:max(1, n // 2)]
    g = torch.Generator().manual_seed(seed)
    rand = torch.randperm(val.numel(), generator=g)[:n - len(top)]
    pick = torch.cat([top, rand]).unique()
    edges = [(int(tgt[i]), int(src[i])) for i in pick]
    measured = perturb_sources(rm, graph, edges)
    w = val[pick].float()
    err = (measured + w).abs()
    scale = float(val.abs().max())
    return {"n": len(edges), "worst_abs": float(err.max()), "worst_rel": float(err.max()) / max(scale, 1e-30),
            "edges": [[t, s, float(wi), float(m)] for (t, s), wi, m in zip(edges, w, measured)]}


@dataclass(repr=False)
class Intervention(Result):
    """Features scaled by ``scale`` in the real model: per target logit, the measured change beside the
    graph's predictions (direct edges only; linear propagation through the graph's features)."""

    features: list[str]
    scale: float
    targets: list[str]
    measured: list[float]
    predicted_direct: list[float]
    predicted_graph: list[float]

    def summary(self) -> str:
        lines = [f"scaling {', '.join(self.features)} by {self.scale:g} in the real model (demeaned logits):",
                 f"  {'target':16s} {'measured':>10s} {'graph':>10s} {'direct':>10s}"]
        for t, m, g, d in zip(self.targets, self.measured, self.predicted_graph, self.predicted_direct):
            lines.append(f"  {t!r:16s} {m:+10.4f} {g:+10.4f} {d:+10.4f}")
        return "\n".join(lines)


def _graph_prediction(graph: AttributionGraph, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Propagate activation changes ``delta [n_nodes]`` (features only) through the graph: per unit of a
    source's activation, ``A[t, s] / a_s``; an active downstream feature moves with its pre-activation.
    Returns the changes of the logit nodes (direct edges only, and through the graph)."""
    r, c, v = graph.entries()
    is_feat = graph.kind == FEATURE
    per_unit = torch.where(is_feat, graph.value.float(), torch.ones(graph.n_nodes))
    m = v.float() / per_unit.clamp_min(1e-30)[c] * is_feat[c]  # effect on t per unit of source s's activation

    def apply(x: torch.Tensor) -> torch.Tensor:  # (M x)[t] = sum_s M[t, s] x[s]
        return torch.zeros(graph.n_nodes).index_add_(0, r, m * x[c])

    logits = graph.nodes_of(LOGIT)
    direct = apply(delta)[logits]
    total, cur = delta.clone(), delta.clone()
    for _ in range(graph.n_layers + 1):
        cur = apply(cur) * is_feat
        total += cur
        if float(cur.abs().sum()) < 1e-12:
            break
    return direct, apply(total)[logits]


@checked
@torch.no_grad()
def intervene(model: HookedModel, graph: AttributionGraph, transcoders: "TranscoderSet | list[SAE] | Replacement",
              nodes: list[int],
              scale: float = 0.0) -> Intervention:
    """Scale feature nodes ``nodes`` by ``scale`` (0: ablate) in the real model, through their decoder
    directions at ``hook_mlp_out``, and compare each target logit's change with the graph's prediction."""
    rep = replacement_of(model, transcoders)
    bad = [n for n in nodes if not 0 <= n < graph.n_nodes or int(graph.kind[n]) != FEATURE]
    if bad or not nodes:
        raise InputError(f"intervene takes feature nodes of the graph; {bad or 'none'} are not")
    tokens = graph.prompt_tokens[None].to(model.device)
    writes, delta = [], torch.zeros(graph.n_nodes)
    for n in nodes:
        writes += [(layer, pos, (scale - 1.0) * vec) for layer, pos, vec in _feature_writes(rep, graph, n)]
        delta[n] = (scale - 1.0) * float(graph.value[n])
    toks = graph.index[graph.nodes_of(LOGIT)]
    measured = _real_last_logits(model, tokens, writes, toks) - _real_last_logits(model, tokens, [], toks)
    direct, through = _graph_prediction(graph, delta)
    return Intervention([graph.node_name(n) for n in nodes], scale, list(graph.token_labels), measured.tolist(),
                        direct.tolist(), through.tolist())


@checked
@torch.no_grad()
def graph_curve(model: HookedModel, graph: AttributionGraph, transcoders: "TranscoderSet | list[SAE] | Replacement",
                sizes: list[int] | None = None, n_random: int = 3, seed: int = 0) -> FaithfulnessCurve:
    """The faithfulness curve of a graph's features (MIB's CPR and CMD): keep the top ``k`` feature nodes, remove
    every other one from the real model (its decoder write subtracted at ``hook_mlp_out``; everything downstream
    recomputes), and read the top target's demeaned logit ``m``. Faithfulness is ``(m_k - m_0) / (m_all - m_0)``
    with ``m_0`` every graph feature removed. Rankings: the graph's influence and the activation size, against
    random sets of the same sizes. One prompt, so each point's interval is the point itself."""
    feats = graph.nodes_of(FEATURE).tolist()
    if not feats:
        raise InputError("the graph has no feature nodes to rank")
    rep = replacement_of(model, transcoders)
    removals = {i: [(layer, pos, -vec) for layer, pos, vec in _feature_writes(rep, graph, i)] for i in feats}
    tokens = graph.prompt_tokens[None].to(model.device)
    top = graph.index[graph.nodes_of(LOGIT)[:1]]

    def metric(removed: list[int]) -> float:
        return float(_real_last_logits(model, tokens, [w for i in removed for w in removals[i]], top)[0])

    m_all, m_0 = metric([]), metric(feats)
    span = m_all - m_0 if abs(m_all - m_0) > 1e-9 else 1e-9

    def faithful(kept: list[int]) -> Estimate:
        keep = set(kept)
        v = (metric([i for i in feats if i not in keep]) - m_0) / span
        return Estimate.exactly(v)

    rankings = {"influence": graph.top_features().tolist(),
                "activation": sorted(feats, key=lambda i: -abs(float(graph.value[i])))}
    with quiet():
        return curve_over_sizes(faithful, rankings, feats, sizes, n_random, seed, "the graph's feature nodes")
