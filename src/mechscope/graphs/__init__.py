"""Attribution graphs over transcoders (Ameisen et al. 2025, "Circuit Tracing").

Read in this order: :mod:`.replacement` (the frozen replacement model of one prompt),
:mod:`.attribute` (nodes and edges, computed with batched backward passes), :mod:`.graph`
(the result: pruning, replacement and completeness scores, files), :mod:`.validate` (edges
re-checked by perturbation; interventions in the real model) and :mod:`.html` (the picture).
"""

from .attribute import attribution_graph
from .graph import AttributionGraph, PrunedGraph
from .replacement import ReplacementModel

__all__ = ["AttributionGraph", "PrunedGraph", "ReplacementModel", "attribution_graph"]
