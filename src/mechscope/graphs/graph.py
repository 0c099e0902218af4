"""The attribution graph as data: nodes, a sparse adjacency, pruning and the graph's scores.

Node ``i`` has a ``kind`` (feature, error, embedding, logit), a ``layer`` (embeddings -1, logits
``n_layers``), a ``pos``, an ``index`` (feature id, or token id for embeddings and logits) and a
``value`` (feature activation; the norm of an error or embedding vector; a logit's probability).
``adjacency`` is a sparse ``[n_nodes, n_nodes]`` tensor, ``A[target, source]`` = direct effect.

Pruning and scores follow Ameisen et al. 2025 ("Circuit Tracing", §3.4 and appendix) as circuit-tracer 0.5
implements them: with ``Â`` the row-normalised ``|A|`` and ``w`` the logit probabilities, a node's influence
on the output is ``(w Σ_{k≥1} Â^k)_i`` (one sweep from the top layer down). Nodes are kept in order of
influence until they hold ``node_threshold`` of it; edges, scored by ``Â[t, s] · (influence_t + w_t)``,
until ``edge_threshold`` (see :meth:`AttributionGraph.prune`).

- replacement score: the share of the influence that reaches the leaves (embeddings and errors)
  landing on embeddings: 1 when no path ends in an error node;
- completeness score (circuit-tracer's ``compute_graph_scores``): over every node, weighted by its
  influence plus its logit weight, the share of its input that does not come from error nodes; a node
  without inputs (an embedding, an error) counts as complete;
- ``completeness_inputs`` (mechscope's earlier convention, kept under this name): the same average over
  the nodes that have inputs only (features and logits), which is lower.

The edges are stored once, as three flat tensors sorted by target then source: ``edge_target`` and
``edge_source`` (int32) and ``edge_weight`` (float32), 12 bytes an edge. :attr:`AttributionGraph.adjacency`
builds a torch sparse tensor from them on demand.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..analysis import viz
from ..core import InputError
from ..core.files import atomic_write, read_safetensors
from ..core.result import Result
from .nodes import EMBEDDING, ERROR, FEATURE, KIND_NAMES, LOGIT, node_label

__all__ = ["AttributionGraph", "EMBEDDING", "ERROR", "FEATURE", "KIND_NAMES", "LOGIT", "PrunedGraph"]


def row_normalised(rows: torch.Tensor, vals: torch.Tensor, n: int) -> torch.Tensor:
    """``|vals|`` of sparse entries ``(rows, ., vals)`` scaled so that each row sums to 1 (``Â``)."""
    a = vals.abs().float()
    total = torch.zeros(n).index_add_(0, rows, a)
    return a / total[rows].clamp_min(1e-30)


def _threshold(scores: torch.Tensor, share: float) -> float:
    """The score at which the running share of ``scores`` (largest first) reaches ``share`` (circuit-tracer's
    ``find_threshold``): keeping every score at least this large keeps at least ``share`` of the total."""
    if scores.numel() == 0:
        return 0.0
    vals = scores.sort(descending=True).values
    cum = vals.cumsum(0) / vals.sum().clamp_min(1e-30)
    return float(vals[min(int(torch.searchsorted(cum, torch.tensor(share, dtype=cum.dtype))), len(vals) - 1)])


def sweep_influence(groups: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], row_weight: torch.Tensor,
                    row_node: torch.Tensor, n: int) -> torch.Tensor:
    """``[n]``: each node's influence ``w Σ_k Â^k`` on the weighted targets, in one sweep.

    ``groups``: the entries ``(rows, cols, Â)`` of one target layer each, the top layer first. Every
    edge runs from a lower layer to a higher one (logits above every layer), so when a layer's rows are
    reached their own influence is final, and ``(w + influence) Â`` is added for them. ``row_weight[r]``:
    row ``r``'s own weight (a logit's probability); ``row_node[r]``: the node row ``r``'s target is as a
    source (-1: a logit, which is no source). One pass over the entries, no dense matrix.
    """
    total = torch.zeros(n)
    for r, c, a in groups:
        node = row_node[r]
        own = torch.where(node >= 0, total[node.clamp_min(0)], torch.zeros(()))
        total.index_add_(0, c, a * (row_weight[r] + own))  # c, r may be int32
    return total


def layer_slices(rows: torch.Tensor, node_layer: torch.Tensor) -> list[slice]:
    """The entries of each target layer as slices, the top layer first, for entries sorted by target whose
    targets' layers never decrease (an :class:`AttributionGraph`'s order); no copy of the entries is made."""
    nodes, counts = torch.unique_consecutive(rows, return_counts=True)
    layers = node_layer[nodes.long()]
    if layers.numel() > 1 and bool((layers[1:] < layers[:-1]).any()):
        raise ValueError("entries must be sorted by target layer")
    ends = counts.cumsum(0)
    out, start = [], 0
    for n in torch.unique_consecutive(layers, return_counts=True)[1]:
        stop = int(ends[start + int(n) - 1])
        out.append(slice(int(ends[start] - counts[start]), stop))
        start += int(n)
    return out[::-1]


def influence(rows: torch.Tensor, cols: torch.Tensor, a: torch.Tensor, w: torch.Tensor,
              node_layer: torch.Tensor) -> torch.Tensor:
    """``w Σ_k Â^k`` for the sparse ``Â[rows, cols] = a`` over nodes of layers ``node_layer``
    (:func:`sweep_influence`, its entries sorted by target as in :class:`AttributionGraph`)."""
    groups = ((rows[s], cols[s], a[s]) for s in layer_slices(rows, node_layer))
    return sweep_influence(groups, w, torch.arange(w.numel()), w.numel())


@dataclass(repr=False)
class AttributionGraph(Result):
    """The attribution graph of one prompt (see :func:`mechscope.graphs.attribution_graph`)."""

    prompt_tokens: torch.Tensor
    token_strs: list[str]
    kind: torch.Tensor
    layer: torch.Tensor
    pos: torch.Tensor
    index: torch.Tensor
    value: torch.Tensor
    edge_target: torch.Tensor
    edge_source: torch.Tensor
    edge_weight: torch.Tensor
    logit_probs: torch.Tensor
    stats: dict
    n_layers: int
    token_labels: list[str]
    kind_names: list[str] = field(default_factory=lambda: list(KIND_NAMES))
    labels: dict = field(default_factory=dict)  # feature node -> label (top-activating tokens), when known
    certificate: dict | None = None
    # per node, the total |weight| of its inputs in the full graph, where that differs from its edges here (a
    # pruned graph read from a JSON file): the part of a node's input not drawn counts as unexplained, like error
    row_total: torch.Tensor | None = None

    _skip_in_dict = ("prompt_tokens", "kind", "layer", "pos", "index", "value", "edge_target", "edge_source",
                     "edge_weight", "logit_probs", "row_total")

    def __post_init__(self):
        t, s = self.edge_target, self.edge_source
        if t.numel() > 1 and bool((t[1:] < t[:-1]).any()):  # keep the sorted order every sweep relies on
            order = torch.argsort(t.long() * self.kind.numel() + s.long())
            self.edge_target, self.edge_source, self.edge_weight = t[order], s[order], self.edge_weight[order]
        self.edge_target, self.edge_source = self.edge_target.int(), self.edge_source.int()
        self.edge_weight = self.edge_weight.float()

    # ------------------------------------------------------------------ structure
    @property
    def n_nodes(self) -> int:
        return self.kind.numel()

    @property
    def n_edges(self) -> int:
        return self.edge_weight.numel()

    @property
    def adjacency(self) -> torch.Tensor:
        """The edges as a sparse ``[n_nodes, n_nodes]`` tensor, ``A[target, source]`` (built on demand: 20 bytes an edge)."""
        idx = torch.stack([self.edge_target.long(), self.edge_source.long()])
        return torch.sparse_coo_tensor(idx, self.edge_weight, (self.n_nodes, self.n_nodes), is_coalesced=True,
                                       check_invariants=False)

    def nodes_of(self, kind: int) -> torch.Tensor:
        return (self.kind == kind).nonzero(as_tuple=True)[0]

    def logit_weights(self) -> torch.Tensor:
        """``[n_nodes]``: the logits' probabilities on the logit nodes, 0 elsewhere."""
        w = torch.zeros(self.n_nodes)
        w[self.nodes_of(LOGIT)] = self.logit_probs.float()
        return w

    def node_name(self, i: int) -> str:
        """``L5 F123 @3``, ``err L5 @3``, ``emb 'Paris' @3``, ``logit ' Paris'``."""
        k, layer, pos, idx = int(self.kind[i]), int(self.layer[i]), int(self.pos[i]), int(self.index[i])
        what = {FEATURE: idx, EMBEDDING: self.token_strs[pos], ERROR: ""}.get(k)
        if k == LOGIT:
            what = self.token_labels[int((self.nodes_of(LOGIT) == i).nonzero()[0])]
        return node_label(k, layer, pos, what)

    def entries(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The edges ``(targets, sources, weights)``, sorted by target then source (no copy)."""
        return self.edge_target, self.edge_source, self.edge_weight

    def totals(self) -> torch.Tensor:
        """``[n_nodes]``: the total ``|weight|`` of each node's inputs, the row normaliser of ``Â`` (for a graph read
        from a pruned JSON, the full graph's, as written)."""
        if self.row_total is not None:
            return self.row_total.float()
        r, _, v = self.entries()
        return torch.zeros(self.n_nodes).index_add_(0, r, v.abs().float())

    def normalised(self) -> torch.Tensor:
        """``Â`` over the entries: ``|A[t, s]| / totals()[t]``."""
        r, _, v = self.entries()
        return v.abs().float() / self.totals()[r].clamp_min(1e-30)

    def influence(self) -> torch.Tensor:
        """``[n_nodes]``: each node's influence on the logits (see the module docstring)."""
        r, c, _ = self.entries()
        return influence(r, c, self.normalised(), self.logit_weights(), self.layer)

    def mean_path_length(self, keep: torch.Tensor | None = None) -> float:
        """The influence-weighted mean number of edges on the paths from the token embeddings to the logits (Ameisen et
        al. 2025 compare cross-layer and per-layer transcoders by it: a feature that bridges layers shortens paths).

        Each path from an embedding is weighted by the product of its edges' ``Â`` (and the logit's probability), as
        influence is; ``L[t] = 0`` on the logits and ``L[s] = Σ_t Â[t, s] (w_t + I_t)(1 + L[t]) / Σ_t Â[t, s]
        (w_t + I_t)`` above them, in one sweep from the top layer down; the result is ``Σ_e I_e L[e] / Σ_e I_e`` over
        the embeddings. ``keep``: only the paths through kept nodes (a pruned graph)."""
        r, c, _ = self.entries()
        a, w = self.normalised(), self.logit_weights()
        if keep is not None:
            a = a * (keep[r] & keep[c])
        inf = influence(r, c, a, w, self.layer)
        num, den = torch.zeros(self.n_nodes), torch.zeros(self.n_nodes)
        for sl in layer_slices(r, self.layer):
            rr, cc, aa = r[sl].long(), c[sl].long(), a[sl]
            length = torch.where(den[rr] > 0, num[rr] / den[rr].clamp_min(1e-30), torch.zeros(()))  # final: sources above
            weight = aa * (w[rr] + inf[rr])
            num.index_add_(0, cc, weight * (1 + length))
            den.index_add_(0, cc, weight)
        emb = self.kind == EMBEDDING
        lengths = torch.where(den > 0, num / den.clamp_min(1e-30), torch.zeros(()))
        return float((inf[emb] * lengths[emb]).sum() / inf[emb].sum().clamp_min(1e-30))

    def top_features(self, k: int | None = None, among: torch.Tensor | None = None) -> torch.Tensor:
        """Feature nodes (of ``among``, default all) by influence on the logits, largest first; the first ``k``."""
        feats = self.nodes_of(FEATURE) if among is None else among
        return feats[self.influence()[feats].argsort(descending=True, stable=True)][:k]

    # ------------------------------------------------------------------ scores
    def scores(self, keep: torch.Tensor | None = None, edges: torch.Tensor | None = None) -> dict[str, float]:
        """Replacement and completeness scores (circuit-tracer's definitions), and ``completeness_inputs``
        (the average over nodes with inputs only); with ``keep`` (a node mask), of the pruned graph, whose
        dropped feature nodes count as error nodes; with ``edges`` (a mask over the entries) too, of the graph as
        drawn: the part of a node's input its dropped edges carried counts as unexplained, like error input.
        :meth:`PrunedGraph.scores` is this, and a pruned graph's JSON keeps what makes it the same when read back."""
        r, c, v = self.entries()
        total, w, n = self.totals(), self.logit_weights(), self.n_nodes
        if edges is not None:
            r, c, v = r[edges], c[edges], v[edges]
        a = v.abs().float() / total[r].clamp_min(1e-30)
        err = self.kind == ERROR
        live = total > 0  # nodes with inputs
        if keep is not None:  # a dropped feature becomes a leaf, like an error node
            dropped = (self.kind == FEATURE) & ~keep
            err = err | dropped
            a = a * ~dropped[r]
            live = live & ~dropped
        unexplained = (1 - torch.zeros(n).index_add_(0, r, a)).clamp_min(0) * live  # input not drawn
        inf = influence(r, c, a, w, self.layer)
        leaf_emb = float(inf[self.kind == EMBEDDING].sum())
        leaf_err = float(inf[err].sum()) + float((unexplained * (inf + w)).sum())
        has_input = live
        from_err = torch.zeros(n).index_add_(0, r, a * err[c]) + unexplained  # share of each node's input from errors
        weight = inf + w

        def share(wt: torch.Tensor) -> float:
            return float((wt * (1 - from_err)).sum() / wt.sum().clamp_min(1e-30))

        return {"replacement": leaf_emb / max(leaf_emb + leaf_err, 1e-30), "completeness": share(weight),
                "completeness_inputs": share(weight * has_input)}

    # ------------------------------------------------------------------ pruning
    def prune(self, node_threshold: float = 0.8, edge_threshold: float = 0.98,
              features_only: bool = False) -> "PrunedGraph":
        """circuit-tracer 0.5's pruning (``prune_graph``; defaults from Ameisen et al. 2025): keep the nodes, of every
        kind, whose influence is at least that of the node at which the running share reaches ``node_threshold``
        (embeddings and logits always stay); renormalise the rows over what is left and keep the edges whose
        influence-weighted score reaches ``edge_threshold`` the same way; then drop, until nothing changes, features
        and errors with no kept edge out and features with no kept edge in.

        ``features_only=True``: mechscope's earlier rule, which ranks features only (every error node stays),
        scores edges without renormalising and drops only features left with no kept edge at all."""
        for name, v in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
            if not 0 < v <= 1:
                raise InputError(f"{name} must be in (0, 1], got {v}")
        r, c, v = self.entries()
        a, w = self.normalised(), self.logit_weights()
        inf = influence(r, c, a, w, self.layer)
        is_feat = self.kind == FEATURE
        if features_only:
            keep = ~is_feat
            feats = self.nodes_of(FEATURE)
            if feats.numel():
                keep[feats[inf[feats] >= _threshold(inf[feats], node_threshold)]] = True
            a_k = a * (keep[r] & keep[c])
        else:
            keep = (inf >= _threshold(inf, node_threshold)) | (self.kind == EMBEDDING) | (self.kind == LOGIT)
            a_k = row_normalised(r, v * (keep[r] & keep[c]), self.n_nodes)
        score = a_k * (influence(r, c, a_k, w, self.layer) + w)[r]
        edge_keep = (score >= _threshold(score, edge_threshold)) & (score > 0)
        sends = is_feat | (self.kind == ERROR)
        for _ in range(self.n_nodes):  # features and errors need an edge out, features an edge in; until stable
            out_, in_ = torch.zeros(self.n_nodes, dtype=torch.bool), torch.zeros(self.n_nodes, dtype=torch.bool)
            out_[c[edge_keep]] = True
            in_[r[edge_keep]] = True
            if features_only:  # the earlier rule: drop features with no kept edge at all (errors all stay)
                new = keep & ~(is_feat & ~(out_ | in_))
            else:
                new = keep & (~sends | out_) & (~is_feat | in_)
            if torch.equal(new, keep):
                break
            keep = new
            edge_keep &= keep[r] & keep[c]
        return PrunedGraph(self, keep, edge_keep, node_threshold, edge_threshold)

    def error_warning(self, threshold: float = 0.5) -> str | None:
        """A plain warning when most of the influence on the logits goes through error nodes (the part of the MLPs the
        transcoders do not explain), with how many layers lack a transcoder and the fix; None otherwise."""
        share = 1.0 - self.scores()["replacement"]
        if share < threshold:
            return None
        have = self.stats.get("transcoder_layers")
        missing = [] if have is None else [l for l in range(self.n_layers) if l not in set(have)]
        why = (f"the MLPs of {len(missing)} of {self.n_layers} layers have no transcoder (layers "
               f"{viz.ranges(missing)}), so they are one error node each" if missing else
               "the transcoders reconstruct their MLPs poorly here")
        fix = ("train transcoders for every layer (`mechscope transcoders train`; any subset works, but each missing "
               "layer is an error node)" if missing else "train wider or longer transcoders, and check them with "
               "`mechscope sae eval`")
        return (f"{share:.0%} of this graph's influence on the logits goes through error nodes: {why}. Its features "
                f"explain little of the prediction; {fix}")

    # ------------------------------------------------------------------ protocol
    def summary(self) -> str:
        s = self.stats
        sc = self.scores()
        warn = self.error_warning()
        lines = ([f"WARNING: {warn}"] if warn else [])
        traced = ([f"  read from {s['loaded_from']} (a pruned graph: {s['feature_nodes']} features; its scores are the "
                   "pruned graph's)"] if "loaded_from" in s else
                  [f"  {s['feature_nodes']} of {s['active_features']} active features traced (max_feature_nodes "
                   f"{s['max_feature_nodes']}); the cap left out {s['dropped_features']}, holding "
                   f"{s['dropped_influence']:.1%} of the estimated influence"])
        lines += [f"attribution graph of {len(self.token_strs)} tokens: {self.n_nodes} nodes, {self.n_edges} edges "
                 f"({s.get('seconds', 0):.1f} s)", *traced,
                 f"  replacement score {sc['replacement']:.3f} (share of the logits' influence that reaches the "
                 f"embeddings, not error nodes; 1 is best), completeness {sc['completeness']:.3f} (influence-"
                 "weighted share of every node's input not from errors, circuit-tracer's definition; over the "
                 f"nodes with inputs only: {sc['completeness_inputs']:.3f})",
                 *([f"  {s['prepended_bos']!r} was put in front of the prompt: position 0 is the attention sink, "
                    "whose features and errors a graph leaves out"] if s.get("prepended_bos") else []),
                 *(["  error nodes kept at the sink position (sink_errors=True; circuit-tracer zeroes them)"]
                   if s.get("sink_errors") else []),
                 "  targets: " + ", ".join(f"{t!r} p={float(p):.3f}" for t, p in zip(self.token_labels, self.logit_probs))]
        if self.certificate:
            c = self.certificate
            lines.append(f"  edge certificate: {c['n']} edges re-checked by perturbing the frozen replacement model; "
                         f"worst error {c['worst_abs']:.2e} (relative {c['worst_rel']:.2e})")
        return "\n".join(lines)

    def _dict_extra(self) -> dict:
        return {"n_nodes": self.n_nodes, "n_edges": self.n_edges, "scores": self.scores(),
                "error_warning": self.error_warning(),
                "logit_probs": [float(p) for p in self.logit_probs]}

    def top_edges(self, n: int = 20, into: int | None = None) -> list[tuple[str, str, float]]:
        """The ``n`` largest edges by magnitude (into node ``into`` only, if given): (source, target, weight)."""
        r, c, val = self.entries()
        if into is not None:
            m = r == into
            r, c, val = r[m], c[m], val[m]
        top = val.abs().argsort(descending=True)[:n]
        return [(self.node_name(int(c[i])), self.node_name(int(r[i])), float(val[i])) for i in top]

    def _html_body(self) -> str:
        from .html import graph_html

        return graph_html(self.prune())

    # ------------------------------------------------------------------ files
    def to_json(self, path: str | Path, slug: str | None = None, scan: str | list[str] | None = None,
                node_threshold: float = 0.8, edge_threshold: float = 0.98) -> Path:
        """The pruned graph as the JSON Neuronpedia's graph viewer and circuit-tracer's server display
        (:mod:`mechscope.graphs.neuronpedia`); ``scan`` names the transcoders."""
        from .neuronpedia import write_graph_json

        return write_graph_json(self.prune(node_threshold, edge_threshold), path, slug, scan)

    @classmethod
    def from_json(cls, path: str | Path) -> "AttributionGraph":
        """A graph from a circuit-tracer / Neuronpedia graph JSON (its pruned nodes and links)."""
        from .neuronpedia import read_graph_json

        return read_graph_json(path, cls)

    def save(self, path: str | Path) -> Path:
        """One safetensors file: the node table, the adjacency's indices and values, the rest as metadata."""
        from safetensors.torch import save

        tensors = {"prompt_tokens": self.prompt_tokens, "kind": self.kind, "layer": self.layer, "pos": self.pos,
                   "index": self.index, "value": self.value.float(), "edge_target": self.edge_target,
                   "edge_source": self.edge_source, "edge_weight": self.edge_weight,
                   "logit_probs": self.logit_probs.float()}
        if self.row_total is not None:
            tensors["row_total"] = self.row_total.float()
        meta = {"mechscope": "attribution_graph", "n_layers": str(self.n_layers),
                "json": json.dumps({"token_strs": self.token_strs, "token_labels": self.token_labels,
                                    "stats": self.stats, "labels": {str(k): v for k, v in self.labels.items()},
                                    "certificate": self.certificate})}
        return atomic_write(path, save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta))

    @classmethod
    def load(cls, path: str | Path) -> "AttributionGraph":
        from safetensors import safe_open

        t = read_safetensors(path, "an attribution graph")
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("mechscope") != "attribution_graph":
            raise InputError(f"{path} is not a mechscope attribution graph (saved by AttributionGraph.save)")
        j = json.loads(meta["json"])
        n = t["kind"].numel()
        if "edge_index" in t:  # files written before the edges were stored flat
            t["edge_target"], t["edge_source"], t["edge_weight"] = t["edge_index"][0], t["edge_index"][1], t["edge_value"]
        for name in ("edge_target", "edge_source"):
            if t[name].numel() and not (0 <= int(t[name].min()) and int(t[name].max()) < n):
                raise InputError(f"{path}: {name} has node indices outside [0, {n}); the file is damaged")
        return cls(t["prompt_tokens"], j["token_strs"], t["kind"], t["layer"], t["pos"], t["index"], t["value"],
                   t["edge_target"], t["edge_source"], t["edge_weight"], t["logit_probs"], j["stats"],
                   int(meta["n_layers"]), j["token_labels"], labels={int(k): v for k, v in j["labels"].items()},
                   certificate=j["certificate"], row_total=t.get("row_total"))


@dataclass(repr=False)
class PrunedGraph(Result):
    """A pruned view of an :class:`AttributionGraph`: ``keep`` a node mask, ``edges`` a mask over the
    adjacency's entries (in :meth:`AttributionGraph.entries` order)."""

    graph: AttributionGraph
    keep: torch.Tensor
    edges: torch.Tensor
    node_threshold: float
    edge_threshold: float

    _skip_in_dict = ("graph", "keep", "edges")

    def kept_entries(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The kept edges as ``(targets, sources, weights)``."""
        r, c, v = self.graph.entries()
        return r[self.edges], c[self.edges], v[self.edges]

    def scores(self) -> dict[str, float]:
        """The scores of the graph as drawn (:meth:`AttributionGraph.scores` with this node and edge mask): dropped
        features count as errors, and the input a kept node loses with its dropped edges as unexplained. They are the
        same for this graph's JSON read back (:meth:`AttributionGraph.from_json`)."""
        return self.graph.scores(self.keep, self.edges)

    def summary(self) -> str:
        g, sc = self.graph, self.scores()
        n_feat = int((self.keep & (g.kind == FEATURE)).sum())
        return (f"pruned graph (nodes {self.node_threshold}, edges {self.edge_threshold}): {n_feat} features of "
                f"{len(g.nodes_of(FEATURE))}, {int(self.edges.sum())} edges of {g.n_edges}; as drawn (dropped features "
                f"and edges count as unexplained): replacement {sc['replacement']:.3f}, completeness "
                f"{sc['completeness']:.3f}")

    def _dict_extra(self) -> dict:
        g = self.graph
        return {"features_kept": int((self.keep & (g.kind == FEATURE)).sum()), "edges_kept": int(self.edges.sum()),
                "scores": self.scores()}

    def _html_body(self) -> str:
        from .html import graph_html

        return graph_html(self)
