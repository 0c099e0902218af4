"""The hook-point registry: every fact about every hook point, in one table.

Each :class:`HookSpec` says what one hook point means, its shape, its shorthand, how wide it is,
which PyTorch hook group serves it, which models have it, and whether patching and attribution
patching can use it as a site. Everything else derives from :data:`HOOK_SPECS`:

- the model's hook names (:func:`hook_names`), also from a config alone, before any weights load;
- the cache shorthand (:func:`act_name`: ``("resid_post", 3) -> "blocks.3.hook_resid_post"``);
- memory sizes (:func:`numel`) and SAE input widths (:meth:`HookSpec.width`);
- the patching and attribution sites (:data:`PATCH_SITES`, :data:`ATTRIB_SITES`);
- which hooks fire inside the attention function (:data:`ATTN_INTERNAL`).

Names follow TransformerLens: ``blocks.{L}.{suffix}`` for per-block points, plus three
top-level ones. ``tests/test_registry.py`` checks that every family's loaded model has exactly
the names predicted from its config.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Mapping

from .errors import UnknownNameError

_LAYER_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


def split_name(name: str) -> tuple[int | None, str]:
    """``"blocks.3.attn.hook_z"`` -> ``(3, "attn.hook_z")``; top-level names give ``(None, name)``."""
    m = _LAYER_RE.match(name)
    return (int(m.group(1)), m.group(2)) if m else (None, name)


def block_name(layer: int, suffix: str) -> str:
    """``block_name(3, "hook_resid_pre") == "blocks.3.hook_resid_pre"``."""
    return f"blocks.{layer}.{suffix}"


# Width rules: features per token, as an SAE reading the hook (flattened) sees them.
_WIDTHS = {
    "d_model": lambda d: d["d_model"],
    "d_mlp": lambda d: d["d_mlp"],
    "heads": lambda d: d["n_heads"] * d["d_head"],
    "kv_heads": lambda d: d["n_kv_heads"] * d["d_head"],
    "heads_model": lambda d: d["n_heads"] * d["d_model"],
    "experts": lambda d: d["n_experts"],
    "top_k": lambda d: d["top_k"],
    "top_k_model": lambda d: d["top_k"] * d["d_model"],
    "one": lambda d: 1,
}


@dataclass(frozen=True)
class HookSpec:
    """One hook point. ``groups``: the PyTorch hook groups that must be installed for it to fire
    (empty: it fires inside the attention function). ``needs``: the model facts it exists under
    (``learned_pos``, ``rot``: rotary or q/k norms, ``gated``, ``ln1``/``ln2``: the block has that
    norm, ``attn_fn``: attention runs through transformers' attention interface), all of them.
    ``groups_outside_attn``: the groups serving it when the family's attention is its own code
    (Falcon), where only ``hook_z`` (the output projection's input) and ``hook_result`` remain."""

    suffix: str
    short: str
    meaning: str
    shape: str
    width_rule: str = "d_model"
    groups: tuple[str, ...] = ()
    in_attention: bool = False
    needs: tuple[str, ...] = ()
    groups_outside_attn: tuple[str, ...] | None = None  # the groups for a family whose attention is its own code
    patch: bool = False
    attrib: bool = False
    head_axis: str | None = None  # "head" | "kv_head" when patching indexes heads
    layer_type: str | None = None  # ln1 / ln2 / ln_final for the "normalized" shorthand
    top_level: bool = False

    def width(self, dims: Mapping) -> int:
        """Features per token for a model with sizes ``dims`` (see :func:`mechscope.core.families.dims_from_config`)."""
        if self.width_rule == "pattern":
            from .errors import InputError

            raise InputError(f"{self.suffix} is [batch, head, q_pos, k_pos]: it has no fixed width per token")
        return _WIDTHS[self.width_rule](dims)

    def name(self, layer: int | None = None) -> str:
        return self.suffix if self.top_level else block_name(layer, self.suffix)


def _spec(*args, **kwargs) -> HookSpec:
    return HookSpec(*args, **kwargs)


HOOK_SPECS: tuple[HookSpec, ...] = (
    _spec("hook_embed", "embed", "token embedding (Gemma: times sqrt(d_model))", "[batch, pos, d_model]",
          groups=("embed",), top_level=True),
    _spec("hook_pos_embed", "pos_embed", "learned position embedding (GPT-2 only)", "[batch, pos, d_model]",
          groups=("pos_embed",), needs=("learned_pos",), top_level=True),
    _spec("hook_resid_pre", "resid_pre", "residual stream entering the block", "[batch, pos, d_model]",
          groups=("pre",), patch=True, attrib=True),
    _spec("ln1.hook_normalized", "normalized", "output of the pre-attention norm", "[batch, pos, d_model]",
          groups=("ln1",), needs=("ln1",), layer_type="ln1"),
    _spec("attn.hook_q", "q", "query projection ln1 @ W_Q + b_Q, before q-norm and rotary",
          "[batch, pos, head, d_head]", "heads", groups=("qkv",), patch=True, attrib=True, head_axis="head"),
    _spec("attn.hook_k", "k", "key projection, before k-norm and rotary (one per KV head)",
          "[batch, pos, kv_head, d_head]", "kv_heads", groups=("qkv",), patch=True, attrib=True,
          head_axis="kv_head"),
    _spec("attn.hook_v", "v", "value projection (one per KV head)", "[batch, pos, kv_head, d_head]", "kv_heads",
          groups=("qkv",), patch=True, attrib=True, head_axis="kv_head"),
    _spec("attn.hook_rot_q", "rot_q", "the query attention uses (after q-norm and rotary)",
          "[batch, pos, head, d_head]", "heads", in_attention=True, needs=("rot", "attn_fn")),
    _spec("attn.hook_rot_k", "rot_k", "the key attention uses (after k-norm and rotary)",
          "[batch, pos, kv_head, d_head]", "kv_heads", in_attention=True, needs=("rot", "attn_fn")),
    _spec("attn.hook_attn_scores", "attn_scores", "scaled (soft-capped) scores plus the additive mask",
          "[batch, head, q_pos, k_pos]", "pattern", in_attention=True, needs=("attn_fn",)),
    _spec("attn.hook_pattern", "pattern", "softmax of the scores", "[batch, head, q_pos, k_pos]", "pattern",
          in_attention=True, needs=("attn_fn",), patch=True, attrib=True, head_axis="head"),
    _spec("attn.hook_z", "z", "pattern @ v, per query head", "[batch, pos, head, d_head]", "heads",
          in_attention=True, patch=True, attrib=True, head_axis="head", groups_outside_attn=("z_in",)),
    _spec("attn.hook_result", "result", "per-head contribution to hook_attn_out (post-norm scale frozen)",
          "[batch, pos, head, d_model]", "heads_model", groups=("attn_out",), in_attention=True,
          groups_outside_attn=("attn_out", "z_in")),
    _spec("hook_attn_out", "attn_out", "what attention adds to the residual stream", "[batch, pos, d_model]",
          groups=("attn_out",), patch=True, attrib=True),
    _spec("hook_resid_mid", "resid_mid", "resid_pre + attn_out", "[batch, pos, d_model]",
          groups=("pre", "attn_out"), patch=True, attrib=True),
    _spec("ln2.hook_normalized", "normalized", "output of the pre-MLP norm", "[batch, pos, d_model]",
          groups=("ln2",), needs=("ln2",), layer_type="ln2"),
    _spec("mlp.hook_pre", "pre", "MLP pre-activation (gated MLPs: the gate projection)", "[batch, pos, d_mlp]",
          "d_mlp", groups=("mlp_in",), needs=("dense_mlp",)),
    _spec("mlp.hook_pre_linear", "pre_linear", "gated MLPs only: the up projection", "[batch, pos, d_mlp]",
          "d_mlp", groups=("mlp_in",), needs=("dense_mlp", "gated")),
    _spec("mlp.hook_post", "post", "the neurons: input of the down projection", "[batch, pos, d_mlp]", "d_mlp",
          groups=("mlp_post",), needs=("dense_mlp",), attrib=True),
    _spec("mlp.hook_router_logits", "router_logits", "MoE: the router's logits over the experts (editing them "
          "re-routes the token)", "[batch, pos, expert]", "experts", groups=("router",), needs=("moe",), patch=True,
          head_axis="expert"),
    _spec("mlp.hook_router_probs", "router_probs", "MoE: the router's distribution over experts (softmax, or sigmoid "
          "for sigmoid routers; editing it re-routes)", "[batch, pos, expert]", "experts", groups=("router",),
          needs=("moe",)),
    _spec("mlp.hook_expert_indices", "expert_indices", "MoE: the experts chosen for each token (long)",
          "[batch, pos, top_k]", "top_k", groups=("router",), needs=("moe",)),
    _spec("mlp.hook_expert_weights", "expert_weights", "MoE: the weight of each chosen expert", "[batch, pos, top_k]",
          "top_k", groups=("router",), needs=("moe",)),
    _spec("mlp.hook_expert_out", "expert_out", "MoE: each chosen expert's output before it is weighted; "
          "mlp_out = sum_k weight_k expert_out_k (+ the shared expert)", "[batch, pos, top_k, d_model]", "top_k_model",
          groups=("experts",), needs=("moe",)),
    _spec("mlp.hook_shared_expert_out", "shared_expert_out", "MoE: the shared expert's output (before its gate, "
          "where it has one)", "[batch, pos, d_model]", groups=("shared_expert",), needs=("moe", "shared_expert")),
    _spec("mlp.hook_shared_expert_gate", "shared_expert_gate", "MoE: the shared expert's gate logit (its output is "
          "scaled by sigmoid of it)", "[batch, pos, 1]", "one", groups=("shared_gate",), needs=("moe", "shared_gate")),
    _spec("hook_mlp_out", "mlp_out", "what the MLP adds to the residual stream", "[batch, pos, d_model]",
          groups=("mlp_out",), patch=True, attrib=True),
    _spec("hook_resid_post", "resid_post", "residual stream leaving the block", "[batch, pos, d_model]",
          groups=("post",), patch=True, attrib=True),
    _spec("ln_final.hook_normalized", "normalized", "output of the final norm", "[batch, pos, d_model]",
          groups=("ln_final",), layer_type="ln_final", top_level=True),
)

BY_SUFFIX: dict[str, HookSpec] = {s.suffix: s for s in HOOK_SPECS}
BLOCK_SPECS = tuple(s for s in HOOK_SPECS if not s.top_level)
#: hook points fired from inside the attention function (no module hook serves them)
ATTN_INTERNAL = tuple(s.suffix for s in BLOCK_SPECS if s.in_attention and not s.groups)
#: hook points that need the attention function to run mechscope's own code at their layer
NEEDS_ATTN_FN = frozenset(s.suffix for s in BLOCK_SPECS if s.in_attention)
#: patching sites: shorthand -> (suffix, what a head index refers to)
PATCH_SITES: dict[str, tuple[str, str | None]] = {s.short: (s.suffix, s.head_axis) for s in HOOK_SPECS if s.patch}
#: attribution-patching sites: shorthand -> suffix
ATTRIB_SITES: dict[str, str] = {s.short: s.suffix for s in HOOK_SPECS if s.attrib}
#: extra shorthand accepted by :func:`act_name`
ALIASES = {"attn": "pattern", "mlp_pre": "pre", "mlp_post": "post", "scores": "attn_scores"}
_BY_SHORT = {s.short: s for s in BLOCK_SPECS if s.short != "normalized"}


def spec(name: str) -> HookSpec:
    """The spec of a full hook name (``"blocks.3.attn.hook_z"``) or of a suffix."""
    _, rest = split_name(name)
    s = BY_SUFFIX.get(rest)
    if s is None:
        raise UnknownNameError(f"{name!r} is not a mechscope hook point; known suffixes: {sorted(BY_SUFFIX)}")
    return s


def hook_names(n_layers: int, facts: Mapping) -> list[str]:
    """Every hook name of a model, in forward order. ``facts``: bools such as ``learned_pos``, ``rot``,
    ``gated``, ``moe``; ``facts["layers"]`` (when blocks differ, e.g. dense before MoE) overrides them per block."""
    def has(s: HookSpec, f: Mapping) -> bool:
        return all(bool(f.get(x, True)) for x in s.needs)

    top = [s for s in HOOK_SPECS if s.top_level and has(s, facts)]
    names = [s.suffix for s in top if s.suffix != "ln_final.hook_normalized"]
    layers = facts.get("layers")
    for layer in range(n_layers):
        f = {**facts, **layers[layer]} if layers else facts
        names += [block_name(layer, s.suffix) for s in BLOCK_SPECS if has(s, f)]
    names.append("ln_final.hook_normalized")
    return names


def numel(name: str, dims: Mapping, batch: int, seq: int) -> int:
    """Elements of one hook point's activation for ``batch`` sequences of ``seq`` tokens."""
    s = spec(name)
    if s.width_rule == "pattern":
        return batch * dims["n_heads"] * seq * seq
    return batch * seq * s.width(dims)


def act_name(name: str, layer: int | None = None, layer_type: str | None = None, n_layers: int | None = None) -> str:
    """TransformerLens-style shorthand to a full hook name.

    ``act_name("resid_post", 3) == "blocks.3.hook_resid_post"``, ``act_name("pattern", 0) ==
    "blocks.0.attn.hook_pattern"``, ``act_name("normalized", 2, "ln1") == "blocks.2.ln1.hook_normalized"``,
    ``act_name("normalized", layer_type="ln_final")``. Negative layers count from the end.
    """
    if name.startswith(("blocks.", "hook_", "ln_final.")):
        return name
    name = ALIASES.get(name, name)
    if name in ("embed", "pos_embed"):
        return f"hook_{name}"
    if name in ("normalized", "ln_final") and (layer_type == "ln_final" or name == "ln_final"):
        return "ln_final.hook_normalized"
    if layer is None:
        raise UnknownNameError(f"{name!r} needs a layer index, e.g. cache[{name!r}, 0]")
    if layer < 0 and n_layers is not None:
        layer += n_layers
    if name in _BY_SHORT:
        return block_name(layer, _BY_SHORT[name].suffix)
    if name == "normalized":
        if layer_type not in ("ln1", "ln2"):
            raise UnknownNameError("'normalized' needs a layer type: cache['normalized', L, 'ln1'] or 'ln2'")
        return block_name(layer, f"{layer_type}.hook_normalized")
    raise UnknownNameError(
        f"unknown activation shorthand {name!r}; use one of "
        f"{sorted(set(_BY_SHORT) | {'embed', 'pos_embed', 'normalized'})} or a full hook name"
    )


def unknown_hook_message(name: str, valid: list[str], n: int = 5) -> str:
    """An error message for an unknown hook name, with the closest valid names."""
    close = difflib.get_close_matches(name, valid, n=n, cutoff=0.5)
    if not close:
        _, rest = split_name(name)
        close = [v for v in valid if v.endswith(rest.split(".")[-1])][:n]
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return f"unknown hook point {name!r}.{hint} See model.hook_names for all {len(valid)} hook points."


def table() -> str:
    """The registry as a plain-text table (suffix, shape, meaning), for docs and ``mechscope info --hooks``."""
    rows = [f"{s.name(0).replace('blocks.0.', 'blocks.L.'):34} {s.shape:32} {s.meaning}" for s in HOOK_SPECS]
    return "\n".join(rows)


@dataclass(frozen=True)
class ForeignSite:
    """A transcoder site as TransformerLens and circuit-tracer name it (``feature_input_hook`` and
    ``feature_output_hook`` of a circuit-tracer ``config.yaml``), and where it lives in mechscope.

    ``site``: ``"mlp_input"`` (what the block's MLP reads: :meth:`HookedModel.mlp_input`) or a mechscope hook
    suffix. ``unweighted``: TransformerLens fires ``ln2.hook_normalized`` on ``x / scale``, *before* the norm's
    gain (circuit-tracer loads models with ``fold_ln=False``), so that site is mechscope's ``ln2.hook_normalized``
    divided by the gain (and less the bias of a LayerNorm). ``module_output``: the MLP module's own output,
    which is ``hook_mlp_out`` only in a block without a post-MLP norm (Gemma 2/3 have one)."""

    name: str
    site: str
    meaning: str
    unweighted: bool = False
    module_output: bool = False


FOREIGN_SITES: dict[str, ForeignSite] = {s.name: s for s in (
    ForeignSite("hook_resid_mid", "hook_resid_mid", "the residual stream between attention and the MLP"),
    ForeignSite("mlp.hook_in", "mlp_input", "what the MLP reads: the pre-MLP norm's output"),
    ForeignSite("ln2.hook_normalized", "mlp_input", "the pre-MLP norm's output before its gain (TransformerLens)",
                unweighted=True),
    ForeignSite("hook_mlp_out", "hook_mlp_out", "what the MLP adds to the residual stream"),
    ForeignSite("mlp.hook_out", "hook_mlp_out", "the MLP module's output", module_output=True),
)}
_FOREIGN_RE = re.compile(r"^(?:blocks\.(?:\{+layer\}+|\d+)\.)?(?P<site>.+)$")


def foreign_site(name: str) -> ForeignSite:
    """The :class:`ForeignSite` of a TransformerLens / circuit-tracer hook name: ``"mlp.hook_in"``, or with a
    block prefix (``"blocks.{layer}.mlp.hook_in"``, ``"blocks.{{layer}}.mlp.hook_in"``, ``"blocks.3.mlp.hook_in"``)."""
    m = _FOREIGN_RE.match(str(name).strip())
    site = FOREIGN_SITES.get(m.group("site")) if m else None
    if site is None:
        raise UnknownNameError(f"unknown transcoder hook {name!r}; mechscope maps these TransformerLens / "
                               f"circuit-tracer names: {', '.join(FOREIGN_SITES)}")
    return site
