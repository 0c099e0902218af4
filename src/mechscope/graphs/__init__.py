"""Attribution graphs over transcoders (Ameisen et al. 2025, "Circuit Tracing").

Read in this order: :mod:`.replacement` (the frozen replacement model of one prompt),
:mod:`.attribute` (nodes and edges, computed with batched backward passes), :mod:`.graph`
(the result: pruning, replacement and completeness scores, files), :mod:`.validate` (edges
re-checked by perturbation; interventions in the real model), :mod:`.qk` (attribution through
attention scores), :mod:`.labels` (top-activating tokens, dashboards) and :mod:`.html` (the picture).
"""

from .attribute import attribution_graph
from .graph import AttributionGraph, PrunedGraph
from .labels import label_features
from .qk import QKAttribution, qk_attribution
from .replacement import ReplacementModel
from .validate import Intervention, edge_certificate, graph_curve, intervene

__all__ = ["AttributionGraph", "Intervention", "PrunedGraph", "QKAttribution", "ReplacementModel",
           "attribution_graph", "edge_certificate", "graph_curve", "intervene", "label_features", "qk_attribution"]
