"""Sizes of well-known models, offline, and exact parameter counts from a config.

``data/model_sizes.json`` holds, for about fifty models researchers study (GPT-2, Pythia,
Llama 2/3, Mistral, Gemma 1/2/3, Qwen 2.5/3, Phi-3, SmolLM2, TinyLlama), the shape fields of
each model's ``config.json`` and its published parameter count, each row citing its sources.
:func:`known_config` turns a row into an HF config, so that :func:`mechscope.estimate_memory`
and ``mechscope estimate --model <hub id>`` answer before anything is downloaded, with the hub
offline.

:func:`param_count` counts a config's parameters exactly, by building the model on PyTorch's
``meta`` device (no memory is allocated) and summing the distinct parameters: HF's own modules
do the arithmetic, biases, norms and tied embeddings included, for any architecture.
"""

from __future__ import annotations

import functools
import json
from importlib.resources import files

from .core.parts import meta_model
from .core.types import HFConfig

# hub-id endings that name a fine-tune with the base model's shapes
_VARIANTS = ("-instruct", "-it", "-chat-hf", "-chat", "-hf", "-deduped", "-pt", "-base", "-v0.1")
# the row's fields under HF's config names (GPT-2 spells them its own way)
_HF_NAMES = {"n_layers": "num_hidden_layers", "d_model": "hidden_size", "n_heads": "num_attention_heads",
             "n_kv_heads": "num_key_value_heads", "d_head": "head_dim", "d_mlp": "intermediate_size",
             "d_vocab": "vocab_size", "n_ctx": "max_position_embeddings", "tied_embeddings": "tie_word_embeddings"}
_GPT2_NAMES = {"n_layers": "n_layer", "d_model": "n_embd", "n_heads": "n_head", "d_mlp": "n_inner",
               "d_vocab": "vocab_size", "n_ctx": "n_positions", "tied_embeddings": "tie_word_embeddings"}


@functools.cache
def _rows() -> dict[str, dict]:
    doc = json.loads(files("mechscope").joinpath("data/model_sizes.json").read_text())
    return {row["id"]: row for row in doc["models"]}


def known_models() -> list[str]:
    """Hub ids in the offline size table."""
    return sorted(_rows())


def _key(name: str) -> str:
    k = name.strip().lower()
    changed = True
    while changed:
        changed = False
        for v in _VARIANTS:
            if k.endswith(v):
                k, changed = k[: -len(v)], True
    return k


def lookup(name: str) -> dict | None:
    """The table row for a hub id (exact, case-insensitive, without the organisation, or a fine-tune's
    base such as ``...-Instruct``), or None."""
    rows = _rows()
    if name in rows:
        return rows[name]
    want = _key(name)
    for rid, row in rows.items():
        if _key(rid) == want or _key(rid.split("/", 1)[-1]) == want.split("/", 1)[-1]:
            return row
    return None


def config_from_row(row: dict) -> HFConfig:
    """An HF config with the row's shapes (and its extra ``config`` fields)."""
    from transformers import AutoConfig

    names = _GPT2_NAMES if row["model_type"] == "gpt2" else _HF_NAMES
    kwargs = {hf: row[ours] for ours, hf in names.items() if ours in row}
    kwargs.update(row.get("config", {}))
    cfg = AutoConfig.for_model(row["model_type"], **kwargs)
    cfg._name_or_path = row["id"]
    return cfg


def known_config(name: str) -> HFConfig | None:
    """The HF config of a model in the size table, or None."""
    row = lookup(name)
    return config_from_row(row) if row is not None else None


def param_count(config: HFConfig) -> int:
    """Exact parameter count of the causal LM a config describes (tied weights counted once)."""
    return sum(p.numel() for p in meta_model(config).parameters())


def active_param_count(config: HFConfig) -> int:
    """Parameters one token uses: every parameter outside the routed experts, plus ``top_k / n_experts`` of the
    experts' (a shared expert always counts). Equals :func:`param_count` for a dense model."""
    model = meta_model(config)
    total = experts = 0
    for name, p in model.named_parameters():
        total += p.numel()
        if ".experts." in name or name.endswith(".experts"):
            experts += p.numel()
    if not experts:
        return total
    n = next((getattr(config, k) for k in ("num_local_experts", "num_experts", "n_routed_experts")
              if getattr(config, k, None)), None)
    k = next((getattr(config, a) for a in ("num_experts_per_tok", "experts_per_token", "moe_topk")
              if getattr(config, a, None)), None)
    if not n or not k:
        return total
    return int(total - experts * (1 - k / n))


def closest(name: str, n: int = 4) -> list[str]:
    """The hub ids of the table most similar to ``name``, most similar first."""
    import difflib

    ids = known_models()
    low = {i.lower(): i for i in ids} | {i.split("/", 1)[-1].lower(): i for i in ids}
    near = difflib.get_close_matches(name.lower(), list(low), n=4 * n, cutoff=0.0)
    out: list[str] = []
    for k in near:
        if low[k] not in out:
            out.append(low[k])
    return out[:n]
