"""ModelConfig: the facts a technique needs about a model, read from the HF config and modules."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .families import dims_from_config
from .parts import ModelParts
from .placement import device_map, execution_device
from .types import HFTokenizer


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


def build_config(parts: ModelParts, name: str, tokenizer: HFTokenizer) -> ModelConfig:
    """A :class:`ModelConfig` from the HF config, with the sizes the loaded modules actually have."""
    hf, fam = parts.hf, parts.family
    c = hf.config
    dims = dims_from_config(c)
    scale = getattr(parts.embed, "scalar_embed_scale", None)
    p = next(hf.parameters())
    act = next((getattr(c, a) for a in ("hidden_activation", "hidden_act", "activation_function")
                if getattr(c, a, None) is not None), None)
    return ModelConfig(
        model_name=name, model_type=c.model_type, family=fam.name, n_layers=len(parts.layers),
        d_model=dims["d_model"], n_heads=dims["n_heads"], n_kv_heads=dims["n_kv_heads"], d_head=dims["d_head"],
        d_mlp=dims["d_mlp"], d_vocab=parts.unembed.weight.shape[0], n_ctx=dims["n_ctx"], act_fn=str(act),
        normalization=fam.norm, positional="rotary" if fam.rotary else "learned",
        parallel_residual=bool(getattr(c, "use_parallel_residual", fam.parallel_residual)),
        gated_mlp=dims["gated_mlp"], qk_norm=fam.qk_norm, post_norms=dims["post_norms"],
        attn_softcap=getattr(c, "attn_logit_softcapping", None),
        final_softcap=getattr(c, "final_logit_softcapping", None),
        sliding_window=getattr(c, "sliding_window", None),
        layer_types=list(getattr(c, "layer_types", None) or []) or None,
        embed_scale=float(scale) if scale is not None else 1.0,
        tied_embeddings=parts.unembed.weight is parts.embed.weight,
        default_prepend_bos=tokenizer_prepends_bos(tokenizer),
        dtype=str(p.dtype).replace("torch.", ""), device=str(execution_device(parts.embed)),
        device_map={k: str(v) for k, v in device_map(hf).items()} if device_map(hf) else None,
    )


