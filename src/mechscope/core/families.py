"""Architecture families, described as data rather than subclasses.

Each :class:`Family` says where HF's own modules live, so that the hooked model can attach
TransformerLens-named hook points without reimplementing the forward pass. Paths are dotted
attribute paths: ``layers``/``embed``/``final_norm``/``unembed`` are relative to the
``*ForCausalLM`` module; the rest are relative to one decoder layer.

Adding a family means adding one row to :data:`FAMILIES` and a tiny config to the test suite.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import InputError
from .hookpoints import hook_names
from .types import HFConfig

# How the query, key and value projections are stored.
#   "separate": three Linear modules (q, k, v);
#   "concat":   one fused module whose output is [q | k | v] (GPT-2 Conv1D, Phi-3);
#   "neox":     one fused Linear whose output is per head [q_h k_h v_h] (GPT-NeoX).
QKV_LAYOUTS = ("separate", "concat", "neox")

# Normalisation kinds. All are linear once the per-position scale is frozen:
#   layernorm:    (x - mean(x)) / sqrt(var(x) + eps) * w + b
#   rms:          x / sqrt(mean(x^2) + eps) * w
#   rms_plus_one: x / sqrt(mean(x^2) + eps) * (1 + w)     (Gemma)
NORM_KINDS = ("layernorm", "rms", "rms_plus_one")


@dataclass(frozen=True)
class Family:
    """Where one architecture family keeps its parts (see module docstring for path roots)."""

    name: str
    model_types: tuple[str, ...]
    # relative to the *ForCausalLM module (defaults: the Llama layout most families share)
    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    unembed: str = "lm_head"
    pos_embed: str | None = None
    # relative to a decoder layer
    attn: str = "self_attn"
    mlp: str = "mlp"
    ln1: str = "input_layernorm"
    ln2: str = "post_attention_layernorm"
    attn_post_norm: str | None = None  # Gemma 2/3: norm applied to the attention output
    mlp_post_norm: str | None = None  # Gemma 2/3: norm applied to the MLP output
    # relative to the attention module
    qkv_layout: str = "separate"
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    qkv: str | None = None  # the fused module, when qkv_layout != "separate"
    o: str = "o_proj"
    # relative to the MLP module
    mlp_gate: str | None = "gate_proj"  # None for non-gated MLPs
    mlp_in: str = "up_proj"  # the up projection (non-gated: the only input projection)
    mlp_gate_up_fused: bool = False  # Phi-3: one module whose output is [gate | up]
    mlp_out: str = "down_proj"
    # facts
    conv1d: bool = False  # weights stored [in, out] (GPT-2's Conv1D)
    norm: str = "rms"
    rotary: bool = True
    parallel_residual: bool = False  # may be overridden by config.use_parallel_residual
    qk_norm: bool = False


FAMILIES: tuple[Family, ...] = (
    Family("gpt2", ("gpt2",), layers="transformer.h", embed="transformer.wte", pos_embed="transformer.wpe",
           final_norm="transformer.ln_f", attn="attn", ln1="ln_1", ln2="ln_2", qkv_layout="concat", qkv="c_attn",
           o="c_proj", mlp_gate=None, mlp_in="c_fc", mlp_out="c_proj", conv1d=True, norm="layernorm", rotary=False),
    Family("gpt_neox", ("gpt_neox",), layers="gpt_neox.layers", embed="gpt_neox.embed_in",
           final_norm="gpt_neox.final_layer_norm", attn="attention", qkv_layout="neox", qkv="query_key_value",
           o="dense", mlp_gate=None, mlp_in="dense_h_to_4h", mlp_out="dense_4h_to_h", norm="layernorm",
           parallel_residual=True),
    Family("llama", ("llama", "mistral", "qwen2")),
    Family("qwen3", ("qwen3",), qk_norm=True),
    Family("phi3", ("phi3",), qkv_layout="concat", qkv="qkv_proj", mlp_gate="gate_up_proj", mlp_in="gate_up_proj",
           mlp_gate_up_fused=True),
    Family("gemma", ("gemma",), norm="rms_plus_one"),
    Family("gemma2", ("gemma2", "gemma3_text", "gemma3"), ln2="pre_feedforward_layernorm",
           attn_post_norm="post_attention_layernorm", mlp_post_norm="post_feedforward_layernorm", norm="rms_plus_one"),
)

_BY_TYPE = {t: f for f in FAMILIES for t in f.model_types}


def supported_model_types() -> list[str]:
    """All HF ``config.model_type`` values mechscope can hook."""
    return sorted(_BY_TYPE)


class UnsupportedArchitectureError(InputError):
    """The model type has no family row; the message lists the supported types."""


def family_for(config: HFConfig) -> Family:
    """The :class:`Family` for an HF config; a clear error naming the supported types otherwise."""
    model_type = getattr(config, "model_type", None)
    fam = _BY_TYPE.get(model_type)
    if fam is None:
        raise UnsupportedArchitectureError(
            f"mechscope cannot hook architecture {model_type!r}. "
            f"Supported model types: {', '.join(supported_model_types())}."
        )
    return fam


def get_path(root: object, path: str) -> object:
    """Follow a dotted attribute path (``"model.layers"``) from ``root``."""
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _first(*vals):
    for v in vals:
        if v is not None:
            return v
    return None


def dims_from_config(config: HFConfig) -> dict:
    """The model's sizes from an HF config alone (no weights): used before loading and by the wrapper."""
    fam = family_for(config)
    c = config
    n_heads = _first(getattr(c, "num_attention_heads", None), getattr(c, "n_head", None))
    d_model = _first(getattr(c, "hidden_size", None), getattr(c, "n_embd", None))
    return dict(
        family=fam.name,
        n_layers=_first(getattr(c, "num_hidden_layers", None), getattr(c, "n_layer", None)),
        d_model=d_model,
        n_heads=n_heads,
        n_kv_heads=_first(getattr(c, "num_key_value_heads", None), n_heads),
        d_head=_first(getattr(c, "head_dim", None), d_model // n_heads),
        d_mlp=_first(getattr(c, "intermediate_size", None), getattr(c, "n_inner", None), 4 * d_model),
        d_vocab=c.vocab_size,
        n_ctx=_first(getattr(c, "max_position_embeddings", None), getattr(c, "n_positions", None), 2048),
        tied_embeddings=bool(getattr(c, "tie_word_embeddings", True)),
        gated_mlp=fam.mlp_gate is not None,
        learned_pos=fam.pos_embed is not None,
        post_norms=fam.attn_post_norm is not None,
        rot=fam.rotary or fam.qk_norm,
    )


def facts_from_config(config: HFConfig) -> dict:
    """The model facts the hook-point registry keys on (``learned_pos``, ``rot``, ``gated``), from a config."""
    d = dims_from_config(config)
    return {"learned_pos": d["learned_pos"], "rot": d["rot"], "gated": d["gated_mlp"]}


def hook_names_from_config(config: HFConfig) -> list[str]:
    """The hook names a model of this config will have, before any weights are loaded."""
    return hook_names(dims_from_config(config)["n_layers"], facts_from_config(config))
