"""The offline picture of a pruned attribution graph (placeholder until written)."""


def graph_html(pruned) -> str:
    return ""
