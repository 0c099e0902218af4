"""Labels for a graph's features: their autointerp explanation where ``sae explain`` wrote one, and their
top-activating tokens on a corpus, and their dashboards.

One streaming pass per layer with features in the graph (:func:`mechscope.sae.features.feature_stats`);
a feature's label is the tokens it fires on most, its dashboard the usual one (density,
histogram, logit effects, top and quantile examples), every token escaped.
"""

from __future__ import annotations

from collections import Counter

import torch

from ..core import HookedModel
from ..core.progress import bar
from ..core.types import checked
from ..sae.features import dashboard_html, feature_stats
from ..sae.model import SAE
from ..sae.replacement import Replacement, replacement_of
from ..sae.transcoders import TranscoderSet
from .graph import FEATURE, AttributionGraph


@checked
def label_features(model: HookedModel, graph: AttributionGraph, transcoders: "TranscoderSet | list[SAE] | Replacement",
                   tokens: torch.Tensor,
                   nodes: torch.Tensor | None = None, n_top: int = 10, progress: bool = True) -> dict[int, str]:
    """Set ``graph.labels[node]`` to the tokens each feature node fires on most in ``tokens [n, pos]``
    (default: every feature node); return ``{node: dashboard HTML}``."""
    rep = replacement_of(model, transcoders)
    nodes = graph.nodes_of(FEATURE) if nodes is None else nodes
    groups: dict[int, list[int]] = {}
    for n in nodes.tolist():
        if int(graph.kind[n]) == FEATURE:
            groups.setdefault(int(graph.layer[n]), []).append(n)
    dashboards = {}
    items = sorted(groups.items())
    for layer, ns in bar(items, desc="feature labels") if progress else items:
        tc = rep.layer_view(layer)
        feats = sorted({int(graph.index[n]) for n in ns})
        stats = feature_stats(model, tc, tokens, features=feats, n_top=n_top)
        for n in ns:
            f = int(graph.index[n])
            tops = Counter(ex.tokens[ex.center] for ex in stats.top.get(f, []))
            words = " ".join(repr(t) for t, _ in tops.most_common(3)) or "(silent on the corpus)"
            expl = getattr(tc, "explanations", {}).get(f)
            graph.labels[n] = f"{expl} [{words}]" if expl else words
            dashboards[n] = dashboard_html(model, tc, stats, f)
    return dashboards
