"""Attribution graphs as the JSON that Neuronpedia's graph viewer and circuit-tracer's local server display.

The schema is circuit-tracer 0.5's (``create_graph_files``): ``{"metadata", "qParams", "nodes", "links"}``.

- ``metadata``: ``slug``, ``scan`` (which transcoders), ``transcoder_list``, ``prompt_tokens`` (text),
  ``prompt``, ``node_threshold``, ``schema_version``; and ``mechscope`` (circuit-tracer's and Neuronpedia's readers
  ignore keys they do not know): each written node's total input ``|weight|`` in the full graph (``row_totals``),
  the pruned graph's scores and its edge threshold, so that a graph read back scores as the pruned graph did;
- a node: ``node_id``, ``feature``, ``layer`` (a string: ``"E"`` for embeddings, ``n_layers + 1`` for logits),
  ``ctx_idx`` (position), ``feature_type`` (``"cross layer transcoder"``, ``"mlp reconstruction error"``,
  ``"embedding"``, ``"logit"``), ``token_prob``, ``is_target_logit``, ``run_idx``, ``reverse_ctx_idx``,
  ``jsNodeId``, ``clerp`` (the label), ``influence`` (the cumulative share of influence of the nodes at least
  as influential: what the viewer's pruning slider reads) and ``activation`` (features only);
- a link: ``source``, ``target`` (node ids) and ``weight`` (the direct effect).

circuit-tracer names an error node ``0_{layer}_{pos}``, which is also the id of feature ``layer`` of layer 0 at
that position; when both are in a graph, mechscope writes the error's id as ``0_{layer}_{pos}_err`` so that every
link names one node (a circuit-tracer file with such a clash is refused on reading, since its links are ambiguous).

Only the pruned graph is written, as circuit-tracer does: the kept nodes that have a kept edge, and every
embedding and logit. Reading such a file back gives an :class:`~mechscope.graphs.graph.AttributionGraph` of
those nodes and edges, for mechscope's picture, scores and checks.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any  # AttributionGraph / PrunedGraph: .graph calls this module, so it is not imported

import torch

from ..core import InputError
from ..core.files import atomic_write, read_text
from .nodes import EMBEDDING, ERROR, FEATURE, LOGIT

# this module does not import .graph (whose methods call it): graphs arrive as arguments, and reading builds
# the class it is handed

FEATURE_TYPE = {FEATURE: "cross layer transcoder", ERROR: "mlp reconstruction error", EMBEDDING: "embedding",
                LOGIT: "logit"}
KIND_OF = {v: k for k, v in FEATURE_TYPE.items()}


def _cantor(x: int, y: int) -> int:
    """Cantor pairing, circuit-tracer's feature number for ``(layer, feature)``."""
    return (x + y) * (x + y + 1) // 2 + y


def cumulative_influence(graph: Any) -> torch.Tensor:
    """``[n_nodes]``: per node, the share of the total influence held by the nodes at least as influential."""
    inf = graph.influence()
    vals, order = inf.sort(descending=True)
    out = torch.empty_like(inf)
    out[order] = vals.cumsum(0) / vals.sum().clamp_min(1e-30)
    return out


def _node(g: Any, i: int, cum: float) -> dict:
    k, layer, pos, idx = int(g.kind[i]), int(g.layer[i]), int(g.pos[i]), int(g.index[i])
    node = {"token_prob": 0.0, "is_target_logit": False, "run_idx": 0, "reverse_ctx_idx": 0, "clerp": "",
            "influence": cum, "activation": None}
    if k == FEATURE:
        node.update(node_id=f"{layer}_{idx}_{pos}", feature=_cantor(layer, idx), layer=str(layer),
                    jsNodeId=f"{layer}_{idx}-0", activation=float(g.value[i]), clerp=g.labels.get(i, ""))
    elif k == ERROR:
        node.update(node_id=f"0_{layer}_{pos}", feature=-1, layer=str(layer), jsNodeId=f"{layer}_{pos}-0")
    elif k == EMBEDDING:
        node.update(node_id=f"E_{idx}_{pos}", feature=pos, layer="E", jsNodeId=f"E_{idx}-{pos}")
    else:
        j = int((g.nodes_of(LOGIT) == i).nonzero()[0])
        p = float(g.logit_probs[j])
        node.update(node_id=f"{g.n_layers + 1}_{idx}_{pos}", feature=idx, layer=str(g.n_layers + 1),
                    jsNodeId=f"L_{idx}-{j}", token_prob=p, is_target_logit=j == 0, influence=None,
                    clerp=f'Output "{g.token_labels[j]}" (p={p:.3f})')
    node.update(ctx_idx=pos, feature_type=FEATURE_TYPE[k])
    order = ("node_id", "feature", "layer", "ctx_idx", "feature_type", "token_prob", "is_target_logit", "run_idx",
             "reverse_ctx_idx", "jsNodeId", "clerp", "influence", "activation")
    return {key: node[key] for key in order}


def graph_json(pruned: Any, slug: str = "mechscope-graph", scan: str | list[str] | None = None) -> dict:
    """The pruned graph as circuit-tracer's JSON document (see the module docstring)."""
    g = pruned.graph
    cum = cumulative_influence(g)
    r, c, w = pruned.kept_entries()
    nodes = {}
    for i in pruned.keep.nonzero(as_tuple=True)[0].tolist():
        nodes[i] = _node(g, i, float(cum[i]))
    feature_ids = {n["node_id"] for n in nodes.values() if n["feature_type"] == FEATURE_TYPE[FEATURE]}
    for n in nodes.values():  # circuit-tracer's error id "0_{layer}_{pos}" can equal a layer-0 feature's
        if n["feature_type"] == FEATURE_TYPE[ERROR] and n["node_id"] in feature_ids:
            n["node_id"] += "_err"
    links = [{"source": nodes[s]["node_id"], "target": nodes[t]["node_id"], "weight": float(v)}
             for t, s, v in zip(r.tolist(), c.tolist(), w.tolist()) if s in nodes and t in nodes]
    linked = {x for link in links for x in (link["source"], link["target"])}
    used = [n for n in nodes.values() if n["node_id"] in linked or n["feature_type"] in ("embedding", "logit")]
    transcoders = list(scan) if isinstance(scan, list) else []
    scan_id = f"custom-{hashlib.sha1('-'.join(transcoders).encode()).hexdigest()[:12]}" if isinstance(scan, list) else (
        scan or f"mechscope-{g.stats.get('model', 'model')}")
    meta = {"slug": slug, "scan": scan_id, "transcoder_list": transcoders, "prompt_tokens": list(g.token_strs),
            "prompt": g.stats.get("prompt", "".join(g.token_strs)), "node_threshold": pruned.node_threshold,
            "schema_version": 1}
    total = g.totals()
    by_id = {n["node_id"]: i for i, n in nodes.items()}
    meta["mechscope"] = {  # what makes the scores of the graph read back equal the pruned graph's (ignored elsewhere)
        "row_totals": {nid: float(total[i]) for nid, i in by_id.items() if nid in linked and float(total[i]) > 0},
        "scores": pruned.scores(), "edge_threshold": pruned.edge_threshold}
    qparams = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    return {"metadata": meta, "qParams": qparams, "nodes": used, "links": links}


def write_graph_json(pruned: Any, path: str | Path, slug: str | None = None,
                     scan: str | list[str] | None = None) -> Path:
    """Write :func:`graph_json` to ``path`` (atomically); the slug defaults to the file's stem."""
    doc = graph_json(pruned, slug or Path(path).stem, scan)
    return atomic_write(path, json.dumps(doc, indent=2))


def _need(doc: dict, path: str) -> tuple[dict, list, list]:
    if not isinstance(doc, dict) or not {"metadata", "nodes", "links"} <= doc.keys():
        raise InputError(f"{path} is not a circuit-tracer / Neuronpedia graph JSON: it needs 'metadata', 'nodes' and "
                         f"'links' (got {sorted(doc) if isinstance(doc, dict) else type(doc).__name__})")
    meta, nodes, links = doc["metadata"], doc["nodes"], doc["links"]
    bad = [n.get("feature_type") for n in nodes if n.get("feature_type") not in KIND_OF]
    if bad:
        raise InputError(f"{path}: unknown feature_type {bad[0]!r}; valid: {sorted(KIND_OF)}")
    return meta, nodes, links


def _parse(node: dict) -> tuple[int, int, int, int]:
    """``(kind, layer, pos, index)`` of a JSON node (the layer of embeddings is -1, logits' is read later)."""
    k, pos = KIND_OF[node["feature_type"]], int(node["ctx_idx"])
    parts = str(node["node_id"]).split("_")
    if k == FEATURE:
        return k, int(parts[0]), pos, int(parts[1])
    if k == ERROR:
        return k, int(parts[1]), pos, -1
    if k == EMBEDDING:
        return k, -1, pos, int(parts[1])
    return k, int(node["layer"]) - 1, pos, int(node["feature"])


def read_graph_json(path: str | Path, cls: type) -> Any:
    """An ``cls`` (:class:`~mechscope.graphs.graph.AttributionGraph`) of the nodes and links in a circuit-tracer /
    Neuronpedia graph JSON.

    Node values: a feature's activation, a logit's probability, 0 for errors and embeddings (the file has no
    vector norms). The labels are the features' ``clerp``. Scores and influence are those of the pruned graph.
    """
    try:
        doc = json.loads(read_text(path))
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read a graph JSON from {path}: {e}") from e
    meta, nodes, links = _need(doc, str(path))
    ids = [n["node_id"] for n in nodes]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise InputError(f"{path}: node id {dup!r} names two nodes (circuit-tracer's ids for a layer-0 feature and an "
                         "error node can clash), so its links are ambiguous")
    try:
        parsed = [_parse(n) for n in nodes]
    except (KeyError, ValueError, IndexError) as e:
        raise InputError(f"{path}: a node's node_id, ctx_idx, layer or feature is not circuit-tracer's form "
                         f"({type(e).__name__}: {e}); node ids look like '3_120_5' (feature), '0_3_5' (error), "
                         "'E_791_0' (embedding)") from e
    n_layers = max([p[1] for p in parsed if p[0] == LOGIT], default=max([p[1] for p in parsed] + [-1]) + 1)
    order = sorted(range(len(nodes)), key=lambda i: (parsed[i][0], i) if parsed[i][0] == LOGIT else parsed[i])
    node_of = {ids[i]: j for j, i in enumerate(order)}
    kind, layer, pos, index = (torch.tensor([parsed[i][f] for i in order], dtype=torch.long) for f in range(4))
    value = torch.tensor([float(nodes[i].get("activation") or nodes[i].get("token_prob") or 0.0) for i in order])
    logits = [i for i in order if parsed[i][0] == LOGIT]
    _check_links(links, node_of, layer, path)
    tgt = torch.tensor([node_of[lk["target"]] for lk in links], dtype=torch.long)
    src = torch.tensor([node_of[lk["source"]] for lk in links], dtype=torch.long)
    w = torch.tensor([float(lk["weight"]) for lk in links])
    n_pos = len(meta.get("prompt_tokens", [])) or int(pos.max()) + 1
    toks = torch.full((n_pos,), -1, dtype=torch.long)
    emb = kind == EMBEDDING
    toks[pos[emb]] = index[emb]
    labels = {j: nodes[i]["clerp"] for j, i in enumerate(order) if parsed[i][0] == FEATURE and nodes[i].get("clerp")}
    token_labels = [_logit_text(nodes[i]) for i in logits]
    extra = meta.get("mechscope") if isinstance(meta.get("mechscope"), dict) else {}
    totals = extra.get("row_totals") if isinstance(extra.get("row_totals"), dict) else None
    row_total = None
    if totals is not None:
        try:
            row_total = torch.tensor([float(totals.get(ids[i], 0.0)) for i in order])
        except (TypeError, ValueError) as e:
            raise InputError(f"{path}: metadata.mechscope.row_totals must map node ids to numbers ({e})") from e
    stats = {"loaded_from": str(path), "slug": meta.get("slug"), "scan": meta.get("scan"),
             "node_threshold": meta.get("node_threshold"), "prompt": meta.get("prompt"),
             "scores_of": "the pruned graph as drawn (its input totals were written with it)" if row_total is not None
             else "the drawn edges alone: the file carries no input totals, so input the pruning dropped is not "
                  "counted as unexplained and the replacement score can be too high",
             "active_features": int((kind == FEATURE).sum()), "feature_nodes": int((kind == FEATURE).sum()),
             "max_feature_nodes": int((kind == FEATURE).sum()), "dropped_features": 0, "dropped_influence": 0.0}
    return cls(toks, list(meta.get("prompt_tokens", [])), kind, layer, pos, index, value, tgt, src, w,
               torch.tensor([float(nodes[i].get("token_prob", 0.0)) for i in logits]), stats, n_layers,
               token_labels, labels=labels, row_total=row_total)


def _check_links(links: list, node_of: dict, layer: torch.Tensor, path: str | Path) -> None:
    """Each link names two of the file's nodes, carries a finite numeric weight, and runs from a lower layer to a
    higher one (an attribution graph's edges all do: embeddings below every layer, logits above); a clear error
    naming the file and the link otherwise."""
    import math

    for i, lk in enumerate(links):
        if not isinstance(lk, dict) or not {"source", "target", "weight"} <= lk.keys():
            raise InputError(f"{path}: link {i} ({lk!r}) needs source, target and weight")
        if lk["source"] not in node_of or lk["target"] not in node_of:
            raise InputError(f"{path}: link {i} ({lk}) names a node the file does not have")
        w = lk["weight"]
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise InputError(f"{path}: link {i} ({lk}) has weight {w!r}; a link's weight is a finite number")
        s, t = node_of[lk["source"]], node_of[lk["target"]]
        if int(layer[s]) >= int(layer[t]):
            raise InputError(f"{path}: link {i} runs from {lk['source']} (layer {int(layer[s])}) to {lk['target']} "
                             f"(layer {int(layer[t])}); an attribution graph's links run from a lower layer to a "
                             "higher one (are source and target swapped?)")


def _logit_text(node: dict) -> str:
    m = re.match(r'Output "(.*)" \(p=', node.get("clerp", ""), re.S)
    return m.group(1) if m else str(node.get("feature"))
