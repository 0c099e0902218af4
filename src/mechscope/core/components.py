"""Typed model components, with one parser and one printer.

===============  ==========================================  =======================
written          meaning                                     hook it acts on
===============  ==========================================  =======================
``embed``        the embedding (token + learned positions)   ``hook_embed``
``L5H3``         head 3 of layer 5                           ``attn.hook_z``
``L5G1``         KV head (group) 1 of layer 5 (GQA)           ``attn.hook_k/v``
``L5N100``       neuron 100 of layer 5's MLP                 ``mlp.hook_post``
``L5E3``         expert 3 of layer 5's mixture of experts    ``mlp.hook_expert_out``
``L5.attn``      layer 5's attention output                  ``hook_attn_out``
``L5.mlp``       layer 5's MLP output                        ``hook_mlp_out``
``L5``           both outputs of layer 5 (see :meth:`Component.expand`)
``L5H3.q``       head 3's query input (an EAP reader); ``.k``/``.v`` on a head or group
``L5.attn_in``   the attention block's input (one reader per block); ``L5.mlp_in`` the MLP's
``logits``       the output
===============  ==========================================  =======================

``Component.parse(s)`` and ``str(c)`` round-trip exactly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import InputError

if TYPE_CHECKING:
    from .config import ModelConfig
    from .model import HookedModel
from .types import ComponentSpecs

_RE = re.compile(r"^L(\d+)(?:([HGNE])(\d+))?(?:\.(attn|mlp|q|k|v|attn_in|mlp_in))?$")
_INDEXED = {"H": "head", "G": "group", "N": "neuron", "E": "expert"}
_LETTER = {v: k for k, v in _INDEXED.items()}
_HOOK = {"head": "attn.hook_z", "neuron": "mlp.hook_post", "attn": "hook_attn_out", "mlp": "hook_mlp_out",
         "embed": "hook_embed", "expert": "mlp.hook_expert_out"}
FORMS = "embed, logits, L3H5 (head), L3G1 (KV group), L3N100 (neuron), L3E2 (expert), L3.attn, L3.mlp, L3 (both), " \
        "readers L3H5.q / L3H5.k / L3G1.v / L3.attn_in / L3.mlp_in"


@dataclass(frozen=True)
class Component:
    """A part of the model. ``kind``: embed, head, group, neuron, attn, mlp, layer or logits;
    ``port``: q/k/v for a head's or group's inputs, ``in`` for a block's input (a reader)."""

    layer: int
    kind: str
    index: int | None = None
    port: str | None = None

    @classmethod
    def parse(cls, spec: "str | Component") -> "Component":
        """``"L5H3"``, ``"L17.mlp"``, ``"L5G1.k"``, ... -> a Component; a clear error otherwise."""
        if isinstance(spec, Component):
            return spec
        if not isinstance(spec, str):
            raise InputError(f"a component is a string such as 'L5H3', got {type(spec).__name__} {spec!r}")
        s = spec.strip()
        if s in ("embed", "logits"):
            return cls(-1, s)
        m = _RE.match(s)
        if not m:
            raise InputError(f"cannot read component {spec!r}; write one of: {FORMS}")
        layer, letter, idx, tail = int(m.group(1)), m.group(2), m.group(3), m.group(4)
        if letter:
            kind = _INDEXED[letter]
            if tail in ("attn", "mlp", "attn_in", "mlp_in") or (tail and kind in ("neuron", "expert")) or \
                    (kind == "group" and tail == "q"):
                raise InputError(f"cannot read component {spec!r}; write one of: {FORMS}")
            return cls(layer, kind, int(idx), tail)
        if tail in ("attn", "mlp"):
            return cls(layer, tail)
        if tail in ("attn_in", "mlp_in"):
            return cls(layer, tail[:-3], None, "in")
        if tail:
            raise InputError(f"cannot read component {spec!r}: .{tail} needs a head (L5H3.{tail})")
        return cls(layer, "layer")

    def __str__(self) -> str:
        if self.kind in ("embed", "logits"):
            return self.kind
        if self.kind in _LETTER:
            base = f"L{self.layer}{_LETTER[self.kind]}{self.index}"
            return base + (f".{self.port}" if self.port else "")
        if self.kind == "layer":
            return f"L{self.layer}"
        return f"L{self.layer}.{self.kind}" + ("_in" if self.port == "in" else "")

    @property
    def is_reader(self) -> bool:
        """An input port (``L5H3.q``, ``L5.mlp_in``, ``logits``): where EAP edges end."""
        return self.port is not None or self.kind == "logits"

    @property
    def hook(self) -> str:
        """The hook point an ablation of this component writes (``L5H3`` -> ``blocks.5.attn.hook_z``)."""
        if self.kind not in _HOOK or self.port:
            raise InputError(f"{self} has no single hook to ablate; use a head, neuron, L5.attn or L5.mlp")
        return "hook_embed" if self.kind == "embed" else f"blocks.{self.layer}.{_HOOK[self.kind]}"

    def expand(self) -> list["Component"]:
        """``L5`` -> ``[L5.attn, L5.mlp]``; any other component -> ``[self]``."""
        if self.kind == "layer":
            return [Component(self.layer, "attn"), Component(self.layer, "mlp")]
        return [self]

    def validate(self, cfg: ModelConfig) -> "Component":
        """Check the layer and index against a :class:`~mechscope.core.config.ModelConfig`; return self."""
        if self.kind in ("embed", "logits"):
            return self
        if not 0 <= self.layer < cfg.n_layers:
            raise InputError(f"{str(self)!r}: layer {self.layer} out of range 0..{cfg.n_layers - 1}")
        if self.kind == "expert" and self.layer not in (cfg.moe_layers or []):
            raise InputError(f"{str(self)!r}: block {self.layer} has no mixture of experts"
                             + (f" (its MoE blocks are {cfg.moe_layers})" if cfg.moe_layers else ""))
        if self.kind == "neuron" and self.layer in (cfg.moe_layers or []):
            raise InputError(f"{str(self)!r}: block {self.layer} is a mixture of experts; name an expert (L{self.layer}E0)")
        limit = {"head": cfg.n_heads, "group": cfg.n_kv_heads, "neuron": cfg.d_mlp, "expert": cfg.n_experts}.get(self.kind)
        if limit is not None and not 0 <= self.index < limit:
            raise InputError(f"{str(self)!r}: {self.kind} {self.index} out of range 0..{limit - 1}")
        return self


def parse_components(model: HookedModel, specs: ComponentSpecs) -> list[Component]:
    """One spec or a list (strings or Components) -> validated components, ``L3`` expanded to its two outputs."""
    if isinstance(specs, (str, Component)):
        specs = [specs]
    out: list[Component] = []
    for s in specs:
        out += Component.parse(s).validate(model.cfg).expand()
    return out


def all_heads(cfg: ModelConfig) -> list[Component]:
    """Every head of the model, layer by layer."""
    return [Component(layer, "head", h) for layer in range(cfg.n_layers) for h in range(cfg.n_heads)]


def all_mlps(cfg: ModelConfig) -> list[Component]:
    return [Component(layer, "mlp") for layer in range(cfg.n_layers)]


def kv_component(cfg: ModelConfig, layer: int, kv: int) -> Component:
    """KV head ``kv`` of ``layer``: written as a head (``L5H1``) without GQA, as a group (``L5G1``) with it."""
    return Component(layer, "head" if cfg.n_kv_heads == cfg.n_heads else "group", kv)


def head_readers(cfg: ModelConfig, layer: int, head: int) -> list[Component]:
    """A query head's EAP readers: its query input and its KV head's key and value inputs."""
    kv = kv_component(cfg, layer, head // cfg.n_groups)
    return [Component(layer, "head", head, "q"), Component(layer, kv.kind, kv.index, "k"),
            Component(layer, kv.kind, kv.index, "v")]
