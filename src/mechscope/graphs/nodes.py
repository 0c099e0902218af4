"""The four kinds of node in an attribution graph (the codes stored in ``AttributionGraph.kind``)."""

KIND_NAMES = ("feature", "error", "embedding", "logit")
FEATURE, ERROR, EMBEDDING, LOGIT = range(4)
