"""Architecture families, described as data rather than subclasses.

Each :class:`Family` says where HF's own modules live, so that the hooked model can attach
TransformerLens-named hook points without reimplementing the forward pass. Paths are dotted
attribute paths: ``layers``/``embed``/``final_norm``/``unembed`` are relative to the
``*ForCausalLM`` module; the rest are relative to one decoder layer.

Adding a family means adding one row to :data:`FAMILIES` and a tiny config to the test suite.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .errors import InputError
from .types import HFConfig

# How the query, key and value projections are stored.
#   "separate": three Linear modules (q, k, v);
#   "concat":   one fused module whose output is [q | k | v] (GPT-2 Conv1D, Phi-3);
#   "neox":     one fused Linear whose output is per head [q_h k_h v_h] (GPT-NeoX);
#   "falcon":   one fused Linear whose output is per KV head [q_1 .. q_g k v], g query heads per KV head
#               (Falcon with grouped queries; with g = 1 it is "neox").
QKV_LAYOUTS = ("separate", "concat", "neox", "falcon")


def split_qkv(x: torch.Tensor, layout: str, n_heads: int, n_kv_heads: int, d_head: int,
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fused projection's output features ``x [..., (n_heads + 2 n_kv_heads) d_head]`` (activations, a weight's
    output axis, or a bias) as views ``q [..., n_heads, d_head]``, ``k [..., n_kv_heads, d_head]``, ``v`` likewise;
    the one place the fused layouts above are decoded. :func:`merge_qkv` is its inverse."""
    lead = x.shape[:-1]
    if layout in ("neox", "falcon"):
        g = n_heads // n_kv_heads
        y = x.reshape(*lead, n_kv_heads, g + 2, d_head)
        return y[..., :g, :].flatten(-3, -2), y[..., g, :], y[..., g + 1, :]
    if layout != "concat":
        raise InputError(f"split_qkv: layout {layout!r} is not fused; fused layouts are 'concat', 'neox', 'falcon'")
    q, k, v = x.split([n_heads * d_head, n_kv_heads * d_head, n_kv_heads * d_head], dim=-1)
    return q.unflatten(-1, (n_heads, d_head)), k.unflatten(-1, (n_kv_heads, d_head)), v.unflatten(-1, (n_kv_heads, d_head))


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: str) -> torch.Tensor:
    """The inverse of :func:`split_qkv`: ``q [..., n_heads, d]``, ``k``, ``v [..., n_kv_heads, d]`` -> fused features."""
    if layout in ("neox", "falcon"):
        kv = k.shape[-2]
        grouped = q.unflatten(-2, (kv, q.shape[-2] // kv))
        return torch.cat([grouped, k[..., None, :], v[..., None, :]], dim=-2).flatten(-3)
    return torch.cat([q.flatten(-2), k.flatten(-2), v.flatten(-2)], dim=-1)


def fused_kv_heads(out_features: int, n_heads: int, d_head: int) -> int:
    """KV heads of a fused q/k/v projection with ``out_features`` outputs (every fused layout holds q, k and v)."""
    return (out_features // d_head - n_heads) // 2

# Normalisation kinds. All are linear once the per-position scale is frozen:
#   layernorm:    (x - mean(x)) / sqrt(var(x) + eps) * w + b
#   rms:          x / sqrt(mean(x^2) + eps) * w
#   rms_plus_one: x / sqrt(mean(x^2) + eps) * (1 + w)     (Gemma)
NORM_KINDS = ("layernorm", "rms", "rms_plus_one")


@dataclass(frozen=True)
class Family:
    """Where one architecture family keeps its parts, and the facts that differ (see the module docstring).

    A path may list alternatives, ``"ln_attn|input_layernorm"``: the first that exists in the model is
    used (Falcon's two layouts). ``ln1``/``ln2`` are None where the block has no such norm: OLMo-2
    normalises only the sublayers' outputs (``attn_post_norm``/``mlp_post_norm``), and a parallel
    block with one shared norm (GPT-J, Phi, Cohere) has no ``ln2``. ``mlp = ""`` means the MLP's
    projections sit on the decoder layer itself (OPT, BioGPT).
    """

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
    ln1: str | None = "input_layernorm"
    ln2: str | None = "post_attention_layernorm"
    attn_post_norm: str | None = None  # Gemma 2/3, OLMo-2: norm applied to the attention output
    mlp_post_norm: str | None = None  # Gemma 2/3, OLMo-2: norm applied to the MLP output
    # relative to the attention module
    qkv_layout: str = "separate"
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    qkv: str | None = None  # the fused module, when qkv_layout != "separate"
    mha_qkv_layout: str | None = None  # the fused layout when the config's multi_query is False (GPT-BigCode)
    o: str = "o_proj"
    # relative to the MLP module
    mlp_gate: str | None = "gate_proj"  # None for non-gated MLPs
    mlp_in: str = "up_proj"  # the up projection (non-gated: the only input projection)
    mlp_gate_up_fused: bool = False  # Phi-3, GLM: one module whose output is [gate | up]
    mlp_out: str = "down_proj"
    # facts
    conv1d: bool = False  # weights stored [in, out] (GPT-2's Conv1D)
    norm: str = "rms"
    norm_eps: float | None = None  # for norms that keep their epsilon in code, not as an attribute (OLMo)
    rotary: bool = True
    parallel_residual: bool = False  # attention and MLP read the same input and add to the same stream
    parallel_attr: str | None = "use_parallel_residual"  # a config attribute that overrides parallel_residual
    qk_norm: bool = False
    # scalars read from the config (attribute names), applied outside any module
    embed_multiplier: str | None = None  # embeddings x it (Granite: embedding_multiplier)
    residual_multiplier: str | None = None  # sublayer outputs x it before the residual add (Granite)
    logit_multiplier: str | None = None  # logits = lm_head(x) x it (Cohere: logit_scale)
    logit_divisor: str | None = None  # logits = lm_head(x) / it (Granite: logits_scaling)
    attn_sinks: bool = False  # a learned per-head logit in each softmax's denominator (gpt-oss)
    attn_fn: bool = True  # attention runs through transformers' attention interface (Falcon: its own code)
    flat_mlp: bool = False  # the MLP sees [batch * pos, d_model] rows (OPT)
    inplace_mlp_out: bool = False  # the block adds attention into the MLP's output tensor in place (Falcon)
    # mixture of experts (paths relative to the MLP module): a router returning (logits, weights, indices)
    # and an experts module called as experts(x [T, d], indices [T, k], weights [T, k])
    moe_router: str | None = None
    moe_experts: str = "experts"
    moe_shared: str | None = None  # an expert every token uses (Qwen2-MoE, Flint)
    moe_shared_gate: str | None = None  # a sigmoid gate on the shared expert's output (Qwen2-MoE)
    moe_routing: str = "softmax_topk"  # softmax_topk (renormalised when the router says so) | topk_softmax | sigmoid_topk


#: the Llama layout with LayerNorm instead of RMSNorm (StableLM, StarCoder2, Jais2, Persimmon ...)
_LN = dict(norm="layernorm")

FAMILIES: tuple[Family, ...] = (
    Family("gpt2", ("gpt2",), layers="transformer.h", embed="transformer.wte", pos_embed="transformer.wpe",
           final_norm="transformer.ln_f", attn="attn", ln1="ln_1", ln2="ln_2", qkv_layout="concat", qkv="c_attn",
           o="c_proj", mlp_gate=None, mlp_in="c_fc", mlp_out="c_proj", conv1d=True, norm="layernorm", rotary=False),
    Family("gpt_bigcode", ("gpt_bigcode",), layers="transformer.h", embed="transformer.wte",
           pos_embed="transformer.wpe", final_norm="transformer.ln_f", attn="attn", ln1="ln_1", ln2="ln_2",
           qkv_layout="concat", qkv="c_attn", o="c_proj", mlp_gate=None, mlp_in="c_fc", mlp_out="c_proj",
           norm="layernorm", rotary=False, mha_qkv_layout="neox"),  # multi-head: per head [q k v]
    Family("gpt_neox", ("gpt_neox",), layers="gpt_neox.layers", embed="gpt_neox.embed_in",
           final_norm="gpt_neox.final_layer_norm", attn="attention", qkv_layout="neox", qkv="query_key_value",
           o="dense", mlp_gate=None, mlp_in="dense_h_to_4h", mlp_out="dense_4h_to_h", norm="layernorm",
           parallel_residual=True),
    Family("gptj", ("gptj",), layers="transformer.h", embed="transformer.wte", final_norm="transformer.ln_f",
           attn="attn", ln1="ln_1", ln2=None, o="out_proj", mlp_gate=None, mlp_in="fc_in", mlp_out="fc_out",
           norm="layernorm", parallel_residual=True, parallel_attr=None),
    Family("falcon", ("falcon",), layers="transformer.h", embed="transformer.word_embeddings",
           final_norm="transformer.ln_f", attn="self_attention", ln1="ln_attn|input_layernorm",
           ln2="ln_mlp|post_attention_layernorm", qkv_layout="falcon", qkv="query_key_value", o="dense",
           mlp_gate=None, mlp_in="dense_h_to_4h", mlp_out="dense_4h_to_h", norm="layernorm",
           parallel_residual=True, parallel_attr="parallel_attn", attn_fn=False, inplace_mlp_out=True),
    Family("opt", ("opt",), layers="model.decoder.layers", embed="model.decoder.embed_tokens",
           pos_embed="model.decoder.embed_positions", final_norm="model.decoder.final_layer_norm",
           ln1="self_attn_layer_norm", ln2="final_layer_norm", o="out_proj", mlp="", mlp_gate=None, mlp_in="fc1",
           mlp_out="fc2", norm="layernorm", rotary=False, flat_mlp=True),
    Family("biogpt", ("biogpt",), layers="biogpt.layers", embed="biogpt.embed_tokens",
           pos_embed="biogpt.embed_positions", final_norm="biogpt.layer_norm", unembed="output_projection",
           ln1="self_attn_layer_norm", ln2="final_layer_norm", o="out_proj", mlp="", mlp_gate=None, mlp_in="fc1",
           mlp_out="fc2", norm="layernorm", rotary=False),
    Family("llama", ("llama", "mistral", "qwen2", "smollm3", "helium", "ernie4_5", "seed_oss", "cwm", "exaone",
                     "internlm3", "iquestcoder", "ministral", "ministral3")),
    Family("llama_qk_norm", ("qwen3",), qk_norm=True),
    Family("hunyuan_dense", ("hunyuan_v1_dense",), qk_norm=True),
    Family("granite", ("granite",), embed_multiplier="embedding_multiplier",
           residual_multiplier="residual_multiplier", logit_divisor="logits_scaling"),
    Family("llama_ungated", ("arcee",), mlp_gate=None),
    Family("nemotron", ("nemotron",), mlp_gate=None, norm="layernorm_plus_one"),
    Family("jais2", ("jais2",), mlp_gate=None, **_LN),
    Family("stablelm", ("stablelm",), **_LN),
    Family("starcoder2", ("starcoder2",), mlp_gate=None, mlp_in="c_fc", mlp_out="c_proj", **_LN),
    Family("persimmon", ("persimmon",), final_norm="model.final_layernorm", qkv_layout="neox",
           qkv="query_key_value", o="dense", mlp_gate=None, mlp_in="dense_h_to_4h", mlp_out="dense_4h_to_h",
           qk_norm=True, **_LN),
    Family("phi", ("phi",), final_norm="model.final_layernorm", ln2=None, o="dense", mlp_gate=None, mlp_in="fc1",
           mlp_out="fc2", norm="layernorm", parallel_residual=True, parallel_attr=None),
    Family("phi3", ("phi3",), qkv_layout="concat", qkv="qkv_proj", mlp_gate="gate_up_proj", mlp_in="gate_up_proj",
           mlp_gate_up_fused=True),
    Family("glm", ("glm",), mlp_gate="gate_up_proj", mlp_in="gate_up_proj", mlp_gate_up_fused=True),
    Family("glm4", ("glm4",), mlp_gate="gate_up_proj", mlp_in="gate_up_proj", mlp_gate_up_fused=True,
           attn_post_norm="post_self_attn_layernorm", mlp_post_norm="post_mlp_layernorm"),
    Family("cohere", ("cohere", "cohere2"), ln2=None, norm="layernorm", parallel_residual=True, parallel_attr=None,
           logit_multiplier="logit_scale"),
    Family("olmo", ("olmo",), norm="layernorm", norm_eps=1e-5),
    Family("olmo2", ("olmo2", "olmo3", "exaone4"), ln1=None, ln2=None, attn_post_norm="post_attention_layernorm",
           mlp_post_norm="post_feedforward_layernorm", qk_norm=True),
    Family("apertus", ("apertus",), ln1="attention_layernorm", ln2="feedforward_layernorm", mlp_gate=None,
           qk_norm=True),
    Family("hyperclovax", ("hyperclovax",), attn_post_norm="post_norm1", mlp_post_norm="post_norm2"),
    Family("mixtral", ("mixtral",), moe_router="gate", mlp_gate=None),
    Family("qwen_moe", ("qwen3_moe", "olmoe", "mellum"), moe_router="gate", mlp_gate=None, qk_norm=True),
    Family("qwen2_moe", ("qwen2_moe",), moe_router="gate", mlp_gate=None, moe_shared="shared_expert",
           moe_shared_gate="shared_expert_gate"),
    Family("flint", ("flint",), moe_router="gate", mlp_gate=None, moe_shared="shared_expert", moe_routing="sigmoid_topk",
           qk_norm=True, attn_sinks=True),
    Family("gpt_oss", ("gpt_oss",), moe_router="router", mlp_gate=None, moe_routing="topk_softmax", attn_sinks=True),
    Family("granitemoe", ("granitemoe",), mlp="block_sparse_moe", moe_router="router", mlp_gate=None,
           moe_routing="topk_softmax", embed_multiplier="embedding_multiplier",
           residual_multiplier="residual_multiplier", logit_divisor="logits_scaling"),
    Family("gemma", ("gemma",), norm="rms_plus_one"),
    Family("vaultgemma", ("vaultgemma",), ln2="pre_feedforward_layernorm", norm="rms_plus_one"),
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
    if fam.mha_qkv_layout and getattr(config, "multi_query", True) is False:
        fam = replace(fam, qkv_layout=fam.mha_qkv_layout)
    return fam


def find_path(root: object, path: str | None) -> object | None:
    """Follow a dotted attribute path (``"model.layers"``) from ``root``; ``"a|b"`` takes the first that exists.

    ``""`` is ``root`` itself; a missing path (or ``None``) gives None.
    """
    if path is None:
        return None
    for alt in path.split("|"):
        obj = root
        for part in alt.split(".") if alt else ():
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if obj is not None:
            return obj
    return None


def get_path(root: object, path: str) -> object:
    """:func:`find_path`, with a clear error naming the path when the model has no such module."""
    obj = find_path(root, path)
    if obj is None:
        raise UnsupportedArchitectureError(f"{type(root).__name__} has no module at {path!r}; its family row does not "
                                           f"match this model (see docs/hooks.md, 'adding a family')")
    return obj


def _first(*vals):
    for v in vals:
        if v is not None:
            return v
    return None


def dims_from_config(config: HFConfig, family: Family | None = None) -> dict:
    """The model's sizes from an HF config alone (no weights); ``family`` defaults to the table's row."""
    fam = family or family_for(config)
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
        d_mlp=_first(*(getattr(c, a, None) for a in ("intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size")),
                     4 * d_model),
        d_vocab=c.vocab_size,
        n_ctx=_first(getattr(c, "max_position_embeddings", None), getattr(c, "n_positions", None), 2048),
        tied_embeddings=bool(getattr(c, "tie_word_embeddings", True)),
        gated_mlp=fam.mlp_gate is not None,
        learned_pos=fam.pos_embed is not None,
        post_norms=fam.attn_post_norm is not None,
        rot=fam.rotary or fam.qk_norm,
    )
