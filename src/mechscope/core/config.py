"""ModelConfig: the facts a technique needs about a model, read from the HF config and modules."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from .families import dims_from_config, fused_kv_heads
from .hookpoints import hook_names
from .infer import resolve_family
from .parts import ModelParts, meta_model
from .placement import device_map, execution_device
from .types import HFConfig, HFTokenizer


@dataclass
class ModelConfig:
    """Sizes and architecture facts. ``n_groups`` query heads share one KV head (GQA)."""

    model_name: str
    model_type: str
    family: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int
    d_vocab: int
    n_ctx: int
    act_fn: str
    normalization: str
    positional: str  # "rotary" | "learned"
    parallel_residual: bool
    gated_mlp: bool
    qk_norm: bool
    post_norms: bool
    attn_softcap: float | None = None
    final_softcap: float | None = None
    sliding_window: int | None = None
    layer_types: list[str] | None = None
    embed_scale: float = 1.0
    tied_embeddings: bool = False
    n_experts: int = 0  # mixture of experts: routed experts per MoE block (0: a dense MLP)
    top_k: int = 0  # experts each token is routed to
    d_expert: int = 0  # one expert's hidden width (d_mlp is the dense MLPs' width, where there are any)
    moe_routing: str | None = None
    moe_layers: list[int] | None = None  # the MoE blocks (all of them, or after some dense ones)
    embed_multiplier: float = 1.0  # applied to the embedding module's output outside it (Granite)
    residual_scale: float = 1.0  # attention and MLP outputs are scaled by it before the residual add (Granite)
    logit_scale: float = 1.0  # logits = lm_head(x) * logit_scale (Cohere; Granite: 1 / logits_scaling)
    default_prepend_bos: bool = False
    dtype: str = "float32"
    device: str = "cpu"
    device_map: dict | None = None  # module path -> device ("cpu", "disk", "cuda:1"), when split
    extra: dict = field(default_factory=dict)

    @property
    def n_groups(self) -> int:
        """Query heads per KV head (grouped-query attention); query head h reads KV head h // n_groups."""
        return self.n_heads // self.n_kv_heads

    def to_dict(self) -> dict:
        return asdict(self)


def tokenizer_prepends_bos(tokenizer: HFTokenizer) -> bool:
    """Whether the tokenizer puts BOS first by default (what ``prepend_bos=None`` follows)."""
    if tokenizer is None or tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("a").input_ids
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def _out_features(module: torch.nn.Module, conv1d: bool) -> int:
    w = module.weight
    return int(w.shape[1] if conv1d else w.shape[0])


def _module_sizes(parts: ModelParts, dims: dict) -> dict:
    """KV heads and the MLP width as the modules have them (Falcon's config misstates the KV heads)."""
    fam, d, h = parts.family, dims["d_head"], dims["n_heads"]
    if fam.qkv_layout == "separate":
        kv = _out_features(parts.attn_proj(0, fam.k), fam.conv1d) // d
    else:
        kv = fused_kv_heads(_out_features(parts.attn_proj(0, fam.qkv), fam.conv1d), h, d)
    out = {"n_kv_heads": kv}
    moe = parts.moe_layers()
    dense = [layer for layer in range(len(parts.layers)) if layer not in moe]
    if moe:  # one expert's width, read from the experts' down projection [E, ., .]
        router, down = parts.moe_part(moe[0], "router"), parts.moe_part(moe[0], "experts").down_proj
        out.update(d_expert=int(down.shape[2] if down.shape[1] == dims["d_model"] else down.shape[1]),
                   n_experts=int(router.weight.shape[0]), moe_layers=moe,
                   top_k=int(getattr(router, "top_k", 0) or parts.hf.config.num_experts_per_tok))
        out["d_mlp"] = out["d_expert"]
    if dense:
        mlp_in = _out_features(parts.mlp_proj(dense[0], fam.mlp_in), fam.conv1d)
        out["d_mlp"] = mlp_in // 2 if fam.mlp_gate_up_fused else mlp_in
    return out


def _multiplier(config: HFConfig, attr: str | None) -> float:
    v = getattr(config, attr, None) if attr else None
    return float(v) if v is not None else 1.0


def build_config(parts: ModelParts, name: str, tokenizer: HFTokenizer) -> ModelConfig:
    """A :class:`ModelConfig` from the HF config, with the sizes the loaded modules actually have."""
    hf, fam = parts.hf, parts.family
    c = hf.config
    dims = dims_from_config(c, fam)
    dims.update(_module_sizes(parts, dims))
    scale = getattr(parts.embed, "scalar_embed_scale", None)  # a scaled embedding module (Gemma, BioGPT)
    if scale is None and isinstance(getattr(parts.embed, "embed_scale", None), (int, float)):
        scale = parts.embed.embed_scale
    embed_mult = _multiplier(c, fam.embed_multiplier)
    p = next(hf.parameters())
    act = next((getattr(c, a) for a in ("hidden_activation", "hidden_act", "activation_function")
                if getattr(c, a, None) is not None), None)
    return ModelConfig(
        model_name=name, model_type=c.model_type, family=fam.name, n_layers=len(parts.layers),
        d_model=dims["d_model"], n_heads=dims["n_heads"], n_kv_heads=dims["n_kv_heads"], d_head=dims["d_head"],
        d_mlp=dims["d_mlp"], n_experts=dims.get("n_experts", 0), top_k=dims.get("top_k", 0),
        d_expert=dims.get("d_expert", 0), moe_layers=dims.get("moe_layers"),
        moe_routing=fam.moe_routing if dims.get("n_experts") else None, d_vocab=parts.unembed.weight.shape[0],
        n_ctx=dims["n_ctx"], act_fn=str(act),
        normalization=fam.norm, positional="rotary" if fam.rotary else "learned",
        parallel_residual=bool(getattr(c, fam.parallel_attr, fam.parallel_residual) if fam.parallel_attr
                               else fam.parallel_residual),
        gated_mlp=dims["gated_mlp"], qk_norm=fam.qk_norm, post_norms=dims["post_norms"],
        attn_softcap=getattr(c, "attn_logit_softcapping", None),
        final_softcap=getattr(c, "final_logit_softcapping", None),
        sliding_window=getattr(c, "sliding_window", None),
        layer_types=list(getattr(c, "layer_types", None) or []) or None,
        embed_scale=(float(scale) if scale is not None else 1.0) * embed_mult, embed_multiplier=embed_mult,
        residual_scale=_multiplier(c, fam.residual_multiplier),
        logit_scale=_multiplier(c, fam.logit_multiplier) / _multiplier(c, fam.logit_divisor),
        tied_embeddings=parts.unembed.weight is parts.embed.weight,
        default_prepend_bos=tokenizer_prepends_bos(tokenizer),
        dtype=str(p.dtype).replace("torch.", ""), device=str(execution_device(parts.embed)),
        device_map={k: str(v) for k, v in device_map(hf).items()} if device_map(hf) else None,
    )




def _meta_parts(config: HFConfig) -> ModelParts:
    hf = meta_model(config)
    return ModelParts(hf, resolve_family(hf)[0])


def describe(config: HFConfig) -> ModelConfig:
    """The :class:`ModelConfig` of a model from its HF config alone (its module tree built on ``meta``)."""
    return build_config(_meta_parts(config), getattr(config, "_name_or_path", "") or "?", None)


def facts_from_config(config: HFConfig) -> dict:
    """The facts the hook-point registry keys on (learned positions, rotary, gated MLP, which norms), from a config."""
    return _meta_parts(config).facts()


def hook_names_from_config(config: HFConfig) -> list[str]:
    """The hook names a model of this config will have, before any weights are loaded."""
    return hook_names(describe(config).n_layers, facts_from_config(config))
