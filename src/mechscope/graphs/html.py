"""The offline, interactive picture of a pruned attribution graph: one SVG, a little inline script, no CDN.

Nodes sit on a grid of prompt position (x) by layer (y): embeddings at the bottom, the target
logits at the top, features as circles (the 25 most influential labelled ones with their
top-activating tokens beside them), error nodes as grey squares. An edge's width follows its
weight, blue for excitatory and red for inhibitory. Clicking a node highlights its edges and shows
its details (value, influence, strongest inputs and outputs, label) and, for a labelled feature,
its dashboard. Every token and label is escaped; the node data travels as JSON with ``<`` escaped.

(``PrunedGraph`` is :class:`mechscope.graphs.graph.PrunedGraph`, which imports this module.)
"""

from __future__ import annotations

import html

import torch

from ..analysis import viz
from .nodes import EMBEDDING, ERROR, FEATURE, LOGIT

_PAD = 40


def _grid(n_pos: int, n_layers: int) -> tuple[float, float]:
    """Column width and row height that fit about 1200 x 900 px (within readable bounds)."""
    return max(48.0, min(110.0, 1200 / max(n_pos, 1))), max(22.0, min(64.0, 900 / (n_layers + 2)))
_COLOURS = {FEATURE: "#f0a030", ERROR: "#999999", EMBEDDING: "#6a9fd8", LOGIT: "#5bb35b"}

_SCRIPT = """
(function(){
  const data = JSON.parse(document.getElementById('ms-graph-data').textContent);
  const panel = document.getElementById('ms-graph-panel');
  const edges = document.querySelectorAll('#ms-graph line');
  function show(i){
    const n = data.nodes[i];
    edges.forEach(e => { const on = e.dataset.s == i || e.dataset.t == i;
      e.style.opacity = on ? 1 : 0.08; });
    panel.textContent = '';
    const h = document.createElement('h3'); h.textContent = n.name; panel.appendChild(h);
    const p = document.createElement('p');
    p.textContent = n.kind + ' | value ' + n.value.toFixed(3) + ' | influence ' + n.influence.toFixed(4) +
      (n.label ? ' | ' + n.label : '');
    panel.appendChild(p);
    for (const [title, list] of [['strongest inputs', n.inputs], ['strongest outputs', n.outputs]]) {
      if (!list.length) continue;
      const t = document.createElement('b'); t.textContent = title; panel.appendChild(t);
      const ul = document.createElement('ul');
      for (const [name, w] of list) { const li = document.createElement('li');
        li.textContent = name + '  ' + (w >= 0 ? '+' : '') + w.toFixed(4); ul.appendChild(li); }
      panel.appendChild(ul);
    }
    if (n.dashboard) { const d = document.createElement('div'); d.innerHTML = n.dashboard; panel.appendChild(d); }
  }
  document.querySelectorAll('#ms-graph .ms-node').forEach(g =>
    g.addEventListener('click', () => show(+g.dataset.i)));
  document.getElementById('ms-graph').addEventListener('dblclick', () => edges.forEach(e => e.style.opacity = 1));
})();
"""


def _layout(pg: PrunedGraph, shown: torch.Tensor, inf: torch.Tensor) -> dict[int, tuple[float, float]]:  # noqa: F821
    """``{node: (x, y)}``: a column per position, a row per layer; nodes sharing a cell spread sideways."""
    g = pg.graph
    _W, _ROW = _grid(len(g.token_strs), g.n_layers)
    rows = g.n_layers + 2
    cells: dict[tuple[int, int], list[int]] = {}
    for i in shown.tolist():
        cells.setdefault((int(g.layer[i]), int(g.pos[i])), []).append(i)
    xy = {}
    for (layer, pos), nodes in cells.items():
        nodes.sort(key=lambda i: (int(g.kind[i]) != ERROR, -float(inf[i])))
        y = _PAD + (rows - 1 - (layer + 1)) * _ROW
        if layer == g.n_layers:  # the logits, most likely rightmost, side by side leftwards from the last column
            for j, i in enumerate(sorted(nodes, key=lambda i: -float(g.value[i]))):
                xy[i] = (_PAD + pos * _W + _W / 2 - j * (2 * min(40.0, _W / 2 - 3) + 6), y)
            continue
        for j, i in enumerate(nodes):
            off = (j - (len(nodes) - 1) / 2) * min(12.0, (_W - 16) / max(len(nodes), 1))
            xy[i] = (_PAD + pos * _W + _W / 2 + off, y)
    return xy


def _top_per_group(keys: torch.Tensor, strength: torch.Tensor, top: int) -> torch.Tensor:
    """Indices of the ``top`` strongest entries of each key, strongest first within each key."""
    order = strength.argsort(descending=True)
    grouped = order[keys[order].argsort(stable=True)]  # by key, strongest first within a key
    k = keys[grouped]
    start = torch.ones_like(k, dtype=torch.bool)
    start[1:] = k[1:] != k[:-1]
    first = torch.cummax(torch.where(start, torch.arange(len(k)), torch.zeros_like(k)), 0).values
    return grouped[(torch.arange(len(k)) - first) < top]


def _node_data(pg: PrunedGraph, shown: torch.Tensor, inf: torch.Tensor,  # noqa: F821
               dashboards: dict[int, str], top: int = 8) -> list[dict]:
    """Per shown node: its name, value, influence, label, dashboard and strongest kept inputs and outputs."""
    g = pg.graph
    r, c, v = pg.kept_entries()
    ins: dict[int, list] = {int(i): [] for i in shown}
    outs: dict[int, list] = {int(i): [] for i in shown}
    for j in _top_per_group(r, v.abs(), top).tolist():
        if int(r[j]) in ins:
            ins[int(r[j])].append([g.node_name(int(c[j])), float(v[j])])
    for j in _top_per_group(c, v.abs(), top).tolist():
        if int(c[j]) in outs:
            outs[int(c[j])].append([g.node_name(int(r[j])), float(v[j])])
    return [{"name": g.node_name(i), "kind": g.kind_names[int(g.kind[i])], "value": float(g.value[i]),
             "influence": float(inf[i]), "label": g.labels.get(i, ""), "dashboard": dashboards.get(i, ""),
             "inputs": ins[i], "outputs": outs[i]} for i in shown.tolist()]


def graph_html(pg: PrunedGraph, dashboards: dict[int, str] | None = None, max_edges: int = 800) -> str:  # noqa: F821
    """The pruned graph as an HTML fragment (SVG + script). ``dashboards``: node -> HTML fragment shown on click
    (built by mechscope's own escaping dashboard code). The ``max_edges`` strongest kept edges are drawn."""
    g = pg.graph
    inf = g.influence()
    r, c, v = pg.kept_entries()
    strongest = v.abs().argsort(descending=True)[:max_edges]
    r, c, v = r[strongest], c[strongest], v[strongest]
    touched = torch.zeros(g.n_nodes, dtype=torch.bool)
    touched[r] = True
    touched[c] = True
    shown = ((pg.keep & touched) | (g.kind == LOGIT) | (g.kind == EMBEDDING)).nonzero(as_tuple=True)[0]
    order = {int(i): j for j, i in enumerate(shown)}
    xy = _layout(pg, shown, inf)
    _W, _ROW = _grid(len(g.token_strs), g.n_layers)
    width = int(2 * _PAD + len(g.token_strs) * _W)
    height = int(2 * _PAD + (g.n_layers + 1) * _ROW + 30)
    wmax = float(v.abs().max()) if v.numel() else 1.0
    lines = []
    for t, s, w in zip(r.tolist(), c.tolist(), v.tolist()):
        (x1, y1), (x2, y2) = xy[s], xy[t]
        colour = "#3b6fd4" if w > 0 else "#d43b3b"
        lines.append(f"<line x1='{x1:.1f}' y1='{y1:.1f}' x2='{x2:.1f}' y2='{y2:.1f}' stroke='{colour}' "
                     f"stroke-width='{0.4 + 4 * abs(w) / wmax:.2f}' opacity='0.6' data-s='{order[s]}' "
                     f"data-t='{order[t]}'/>")
    marks = []
    feats = [i for i in shown.tolist() if int(g.kind[i]) == FEATURE and i in g.labels]
    labelled = set(sorted(feats, key=lambda i: -float(inf[i]))[:25])  # the most influential labelled features
    for j, i in enumerate(shown.tolist()):
        x, y = xy[i]
        k, name = int(g.kind[i]), html.escape(g.node_name(i), quote=True)
        label = html.escape(g.labels.get(i, ""), quote=True)
        tip = f"<title>{name}{(' | ' + label) if label else ''}</title>"
        if k == FEATURE:
            shape = f"<circle cx='{x:.1f}' cy='{y:.1f}' r='5' fill='{_COLOURS[k]}' stroke='#333' stroke-width='0.5'/>"
            if i in labelled:  # its top-activating tokens, beside it
                shape += (f"<text x='{x + 7:.1f}' y='{y - 6:.1f}' font-size='8' fill='#444'>"
                          f"{html.escape(g.labels[i][:24], quote=True)}</text>")
        elif k == ERROR:
            shape = f"<rect x='{x - 5:.1f}' y='{y - 5:.1f}' width='10' height='10' fill='{_COLOURS[k]}'/>"
        else:
            text = g.token_strs[int(g.pos[i])] if k == EMBEDDING else g.token_labels[int(
                (g.nodes_of(LOGIT) == i).nonzero()[0])]
            extra = "" if k == EMBEDDING else f" {float(g.value[i]):.2f}"
            half = min(40.0, _W / 2 - 3)
            shape = (f"<rect x='{x - half:.1f}' y='{y - 10:.1f}' width='{2 * half:.1f}' height='20' rx='4' "
                     f"fill='{_COLOURS[k]}'/>"
                     f"<text x='{x:.1f}' y='{y + 4:.1f}' font-size='11' text-anchor='middle'>"
                     f"{html.escape(repr(text)[:14] + extra, quote=True)}</text>")
        marks.append(f"<g class='ms-node' data-i='{j}' style='cursor:pointer'>{tip}{shape}</g>")
    axis = "".join(f"<text x='{_PAD + p * _W + _W / 2:.1f}' y='{height - 8}' font-size='10' text-anchor='middle' "
                   f"fill='#555'>{p}</text>" for p in range(len(g.token_strs)))
    layers = "".join(f"<text x='4' y='{_PAD + (g.n_layers - layer) * _ROW + 4:.1f}' font-size='10' fill='#555'>"
                     f"L{layer}</text>" for layer in range(g.n_layers))
    data = viz.json_for_script({"nodes": _node_data(pg, shown, inf, dashboards or {})})
    return (f"<div class='ms-graph-wrap' style='display:flex;gap:12px;align-items:flex-start'>"
            f"<div style='overflow:auto;max-width:72vw;max-height:92vh;flex:0 1 auto'>"
            f"<svg id='ms-graph' width='{width}' height='{height}' style='border:1px solid #ddd;background:#fff'>"
            f"{''.join(lines)}{''.join(marks)}{axis}{layers}</svg></div>"
            f"<div id='ms-graph-panel' style='position:sticky;top:0;min-width:280px;max-width:420px;font-size:13px;"
            f"max-height:92vh;overflow:auto'>"
            f"<p>Click a node for its inputs, outputs and dashboard; double-click the graph to show every edge."
            f"</p></div></div>"
            f"<script type='application/json' id='ms-graph-data'>{data}</script><script>{_SCRIPT}</script>")
