"""Attribution graphs on the planted zoo (:mod:`mechscope.circuits.zoo`), graded at the token level.

The zoo's models are attention-only, so their graphs have no feature nodes: every path from a
token embedding to the answer's logit runs through frozen attention. What a graph can still get
right is *which token* the answer comes from: the planted ``source_pos``. :func:`graph_auroc` is
the AUROC of ``|A[answer logit, embedding at p]|`` for telling the source position from the others,
averaged over prompts.
"""

from __future__ import annotations

import torch

from ..circuits.zoo import PlantedModel, edge_auroc
from ..core import InputError
from .attribute import attribution_graph
from .nodes import EMBEDDING, LOGIT


def graph_auroc(pm: PlantedModel, n_prompts: int = 4) -> float:
    """Mean over ``n_prompts`` clean prompts of the token-level AUROC of the graph's embedding edges into the
    answer's logit (the answer: the token at ``pm.source_pos``)."""
    if pm.source_pos is None:
        raise InputError(f"{pm.name} names no source position to grade a graph against")
    out = []
    for row in pm.clean[:n_prompts]:
        answer = int(row[pm.source_pos])
        g = attribution_graph(pm.model, [], row[None], target_logits=[answer], certify=0, progress=False,
                              prepend_bos=False)  # graded at the planted positions of its own prompts
        logit = int(g.nodes_of(LOGIT)[0])
        r, c, v = g.entries()
        emb = g.nodes_of(EMBEDDING)
        into = r == logit
        scores = torch.zeros(g.n_nodes).index_add_(0, c[into], v[into].abs())[emb]
        out.append(edge_auroc(dict(enumerate(scores.tolist())), {pm.source_pos}))
    return sum(out) / len(out)
