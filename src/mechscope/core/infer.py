"""Inferring a family row from a model's module tree, for a model type the table does not know.

The common decoder layout is recognisable from names and module types alone: a ``ModuleList``
of ``num_hidden_layers`` blocks; in each block an attention module (a class named ``*Attention``)
with query/key/value and output projections (separate or fused), an MLP (``*MLP``), and norms
(``*Norm``) before or after them; at the top the token embedding (``get_input_embeddings``), the
final norm and the unembedding (``get_output_embeddings``). :func:`infer_family` finds these and
returns a :class:`~mechscope.core.families.Family` row; :func:`mechscope.check` then decides whether
the row is right, by numbers. What cannot be matched is listed in the error.
"""

from __future__ import annotations

from dataclasses import fields

import torch

from .families import Family, UnsupportedArchitectureError, supported_model_types

_Q, _K, _V = ("q_proj", "query", "q", "wq", "q_lin"), ("k_proj", "key", "k", "wk", "k_lin"), \
    ("v_proj", "value", "v", "wv", "v_lin")
_O = ("o_proj", "out_proj", "dense", "c_proj", "wo", "o")
_QKV = ("qkv_proj", "query_key_value", "c_attn", "wqkv", "qkv")
_GATE, _UP = ("gate_proj", "w1", "fc_gate"), ("up_proj", "w3", "fc1", "fc_in", "c_fc", "dense_h_to_4h")
_DOWN, _GATE_UP = ("down_proj", "w2", "fc2", "fc_out", "c_proj", "dense_4h_to_h"), ("gate_up_proj",)
_LN1 = ("input_layernorm", "ln_1", "self_attn_layer_norm", "attention_layernorm", "ln_attn", "norm1", "attention_norm")
_LN2 = ("pre_feedforward_layernorm", "post_attention_layernorm", "ln_2", "final_layer_norm", "feedforward_layernorm",
        "ln_mlp", "norm2", "ffn_norm")


def _is_norm(m: torch.nn.Module) -> bool:
    return isinstance(m, torch.nn.LayerNorm) or "norm" in type(m).__name__.lower()


def _path_of(root: torch.nn.Module, target: torch.nn.Module) -> str | None:
    return next((n for n, m in root.named_modules() if m is target), None)


def _pick(module: torch.nn.Module, names: tuple[str, ...]) -> str | None:
    children = dict(module.named_children())
    return next((n for n in names if n in children), None)


def _layers(hf: torch.nn.Module, n: int | None) -> str | None:
    lists = [(name, m) for name, m in hf.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 0]
    lists = [x for x in lists if n is None or len(x[1]) == n]
    return max(lists, key=lambda x: len(x[1]))[0] if lists else None


def _block_parts(block: torch.nn.Module) -> tuple[dict, list[str]]:
    """The per-block fields of a family row, and what could not be matched."""
    row, missing = {}, []
    kids = dict(block.named_children())
    attn = next((n for n, m in kids.items() if "attention" in type(m).__name__.lower()), None)
    mlp = next((n for n, m in kids.items() if any(s in type(m).__name__.lower() for s in ("mlp", "feedforward"))), None)
    if attn is None:
        missing.append("an attention module (a child whose class is named *Attention)")
    else:
        a = kids[attn]
        row["attn"], fused = attn, _pick(a, _QKV)
        q, k, v, o = (_pick(a, names) for names in (_Q, _K, _V, _O))
        if fused and not (q and k and v):
            row.update(qkv_layout="concat", qkv=fused)
        elif q and k and v:
            row.update(q=q, k=k, v=v)
        else:
            missing.append(f"query/key/value projections in {attn} (children: {sorted(dict(a.named_children()))})")
        if o:
            row["o"] = o
        else:
            missing.append(f"an output projection in {attn}")
    if mlp is None:
        missing.append("an MLP (a child whose class is named *MLP)")
    else:
        m = kids[mlp]
        gate_up, gate, up, down = _pick(m, _GATE_UP), _pick(m, _GATE), _pick(m, _UP), _pick(m, _DOWN)
        row["mlp"] = mlp
        if gate_up:
            row.update(mlp_gate=gate_up, mlp_in=gate_up, mlp_gate_up_fused=True)
        else:
            row.update(mlp_gate=gate, mlp_in=up) if up else missing.append(f"an up projection in {mlp}")
        row["mlp_out"] = down if down else missing.append(f"a down projection in {mlp}")
    norms = [n for n, m in kids.items() if _is_norm(m)]
    row["ln1"] = next((n for n in _LN1 if n in norms), None)
    row["ln2"] = next((n for n in _LN2 if n in norms and n != row["ln1"]), None)
    if row["ln1"] is None and norms:
        missing.append(f"a pre-attention norm among {norms}")
    return row, missing


def infer_family(hf: torch.nn.Module, model_type: str) -> Family:
    """A family row for ``hf`` read from its module tree; a clear error listing what could not be matched."""
    cfg = hf.config
    n_layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    missing: list[str] = []
    layers = _layers(hf, n_layers)
    embed = _path_of(hf, hf.get_input_embeddings()) if hasattr(hf, "get_input_embeddings") else None
    unembed = _path_of(hf, hf.get_output_embeddings()) if hf.get_output_embeddings() is not None else None
    if layers is None:
        missing.append(f"a list of {n_layers} decoder blocks")
    for what, path in (("the token embedding", embed), ("the unembedding (lm_head)", unembed)):
        if path is None:
            missing.append(what)
    row: dict = {}
    if layers is not None:
        base_path = layers.rpartition(".")[0]
        base = hf.get_submodule(base_path) if base_path else hf
        top_norms = [n for n, m in base.named_children() if _is_norm(m)]
        if top_norms:
            row["final_norm"] = f"{base_path}.{top_norms[-1]}" if base_path else top_norms[-1]
        else:
            missing.append(f"a final norm in {base_path or 'the model'}")
        block_row, block_missing = _block_parts(hf.get_submodule(layers)[0])
        row.update(block_row)
        missing += block_missing
        norm_cls = type(hf.get_submodule(layers)[0].get_submodule(row["ln1"])).__name__ if row.get("ln1") else ""
        row["norm"] = "layernorm" if "layernorm" in norm_cls.lower().replace("_", "") and "rms" not in norm_cls.lower() \
            else "rms"
        row["qk_norm"] = any(n.endswith(("q_norm", "q_layernorm")) for n, _ in hf.named_modules())
    if missing:
        raise UnsupportedArchitectureError(
            f"model type {model_type!r} has no family row, and its layout could not be inferred: found no "
            + "; no ".join(m.removeprefix("an ").removeprefix("a ") for m in missing)
            + ". Add a row to mechscope/core/families.py (see docs/hooks.md, 'adding a family'). "
            f"Supported model types: {', '.join(supported_model_types())}.")
    known = {f.name for f in fields(Family)}
    names = [n for n, _ in hf.named_modules()]
    row["conv1d"] = any(type(m).__name__ == "Conv1D" for m in hf.modules())  # GPT-2's weights are [in, out]
    row["rotary"] = any(n.endswith(("rotary_emb", "rotary")) for n in names)
    row["pos_embed"] = _positions(hf, embed, layers)
    return Family(name=f"inferred:{model_type}", model_types=(model_type,), layers=layers, embed=embed,
                  unembed=unembed, **{k: v for k, v in row.items() if k in known})


def _positions(hf: torch.nn.Module, embed: str, layers: str) -> str | None:
    """A learned position embedding beside the token embedding (GPT-2's ``wpe``), or None."""
    base_path = layers.rpartition(".")[0]
    base = hf.get_submodule(base_path) if base_path else hf
    token = hf.get_submodule(embed)
    for name, m in base.named_children():
        if isinstance(m, torch.nn.Embedding) and m is not token:
            return f"{base_path}.{name}" if base_path else name
    return None


def family_source(fam: Family) -> str:
    """The row as Python source, to paste into ``FAMILIES`` and make it permanent."""
    default = Family(fam.name, fam.model_types)
    args = [repr(fam.name.removeprefix("inferred:")), repr(fam.model_types)]
    args += [f"{f.name}={getattr(fam, f.name)!r}" for f in fields(Family)
             if f.name not in ("name", "model_types") and getattr(fam, f.name) != getattr(default, f.name)]
    return f"Family({', '.join(args)})"


def resolve_family(hf: torch.nn.Module) -> tuple[Family, bool]:
    """``(family, inferred)``: the table's row for the model's type, else one inferred from its modules."""
    from .families import family_for

    try:
        return family_for(hf.config), False
    except UnsupportedArchitectureError:
        return infer_family(hf, getattr(hf.config, "model_type", "?")), True
