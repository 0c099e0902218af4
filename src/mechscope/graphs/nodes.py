"""The four kinds of node in an attribution graph (the codes stored in ``AttributionGraph.kind``)."""

KIND_NAMES = ("feature", "error", "embedding", "logit")
FEATURE, ERROR, EMBEDDING, LOGIT = range(4)


def node_label(kind: int, layer: int, pos: int, what: int | str = "") -> str:
    """A node's name: ``L5 F123 @3`` (``what``: the feature), ``err L5 @3``, ``emb 'Paris' @3`` and
    ``logit ' Paris'`` (``what``: the token's text)."""
    if kind == FEATURE:
        return f"L{layer} F{what} @{pos}"
    if kind == ERROR:
        return f"err L{layer} @{pos}"
    if kind == EMBEDDING:
        return f"emb {what!r} @{pos}"
    return f"logit {what!r}"
