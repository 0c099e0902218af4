"""The HF modules a family row points at, found once per model.

:class:`ModelParts` is the only place that follows a :class:`~mechscope.core.families.Family`'s
paths into the HF module tree. The hook sites, the weight views and the facade all read the
model's structure through it, so none of them knows where a family keeps its modules.
"""

from __future__ import annotations

import copy
import json
from contextlib import contextmanager
from typing import Iterator

import torch

from .families import Family, find_path, get_path
from .norms import NormSpec
from .types import HFConfig

#: the norms a block can have, by the name :meth:`ModelParts.norm` takes
NORMS = ("ln1", "ln2", "attn_post", "mlp_post")


class ModelParts:
    """``layers``, ``embed``, ``pos_embed`` (or None), ``final_norm`` and ``unembed`` of an HF causal LM,
    and the per-block modules (attention, MLP, norms, projections) by layer."""

    def __init__(self, hf: torch.nn.Module, family: Family):
        self.hf, self.family = hf, family
        self.layers = get_path(hf, family.layers)
        self.embed = get_path(hf, family.embed)
        self.pos_embed = get_path(hf, family.pos_embed) if family.pos_embed else None
        self.final_norm = get_path(hf, family.final_norm)
        self.unembed = get_path(hf, family.unembed)

    def sub(self, layer: int, path: str | None) -> torch.nn.Module | None:
        """A module of block ``layer`` by its family path: ``""`` is the block itself, and a path the model
        does not have (or ``None``) gives None."""
        return find_path(self.layers[layer], path)

    def attn(self, layer: int) -> torch.nn.Module:
        return get_path(self.layers[layer], self.family.attn)

    def mlp(self, layer: int) -> torch.nn.Module:
        """Block ``layer``'s MLP module (the block itself where its projections sit on it: OPT)."""
        return get_path(self.layers[layer], self.family.mlp)

    def mlp_out_site(self, layer: int) -> torch.nn.Module:
        """The module whose output is the MLP's contribution (before any post-norm): the MLP, or its down
        projection where the MLP is no module of its own."""
        return self.mlp(layer) if self.family.mlp else self.mlp_proj(layer, self.family.mlp_out)

    def attn_proj(self, layer: int, path: str) -> torch.nn.Module:
        """A projection inside the attention module (``q_proj``, the fused ``c_attn``, ``o_proj`` ...)."""
        return get_path(self.attn(layer), path)

    def mlp_proj(self, layer: int, path: str) -> torch.nn.Module:
        return get_path(self.mlp(layer), path)

    def norm_module(self, layer: int, which: str) -> torch.nn.Module | None:
        """Block ``layer``'s ``ln1``, ``ln2``, ``attn_post`` or ``mlp_post`` norm module (None if absent)."""
        fam = self.family
        paths = {"ln1": fam.ln1, "ln2": fam.ln2, "attn_post": fam.attn_post_norm, "mlp_post": fam.mlp_post_norm}
        if which not in paths:
            from .errors import InputError

            raise InputError(f"unknown norm {which!r}; a block has {', '.join(NORMS)}")
        return self.sub(layer, paths[which])

    def norm(self, layer: int | None, which: str = "ln1") -> NormSpec | None:
        """A block norm (or the final norm, ``layer=None``) as a frozen-scale linear map; None if absent."""
        module = self.final_norm if layer is None else self.norm_module(layer, which)
        return NormSpec(self.family.norm, module, self.family.norm_eps) if module is not None else None

    def facts(self) -> dict:
        """The registry's model facts read from the modules themselves (not the config):
        ``learned_pos``, ``rot`` (rotary embeddings or q/k norms), ``gated`` (a gate projection)."""
        names = [n for n, _ in self.hf.named_modules()]
        rot = self.family.rotary or any(n.endswith(("rotary_emb", "q_norm", "q_layernorm")) for n in names)
        mlp0 = self.mlp(0)
        gated = self.family.mlp_gate is not None and hasattr(mlp0, self.family.mlp_gate.split(".")[0])
        per_layer = [self.layer_facts(layer) for layer in range(len(self.layers))]
        facts = {"learned_pos": self.pos_embed is not None, "rot": rot, "gated": gated,
                 "attn_fn": self.family.attn_fn, **per_layer[0]}
        if any(f != per_layer[0] for f in per_layer):  # e.g. dense first layers before MoE ones (Flint)
            facts["layers"] = per_layer
        return facts

    def layer_facts(self, layer: int) -> dict:
        """The facts that may differ from block to block: which norms it has, and whether its MLP is an MoE."""
        moe = self.moe_part(layer, "router") is not None
        return {"ln1": self.norm_module(layer, "ln1") is not None, "ln2": self.norm_module(layer, "ln2") is not None,
                "moe": moe, "dense_mlp": not moe, "shared_expert": self.moe_part(layer, "shared") is not None,
                "shared_gate": self.moe_part(layer, "shared_gate") is not None}

    def moe_layers(self) -> list[int]:
        """The blocks whose MLP is a mixture of experts."""
        return [layer for layer in range(len(self.layers)) if self.moe_part(layer, "router") is not None]

    def moe_part(self, layer: int, which: str) -> torch.nn.Module | None:
        """Block ``layer``'s MoE ``router``, ``experts``, ``shared`` expert or ``shared_gate`` (None if absent)."""
        fam = self.family
        path = {"router": fam.moe_router, "experts": fam.moe_experts if fam.moe_router else None,
                "shared": fam.moe_shared, "shared_gate": fam.moe_shared_gate}[which]
        return find_path(self.mlp(layer), path) if path else None

    @contextmanager
    def starting_at(self, layer: int) -> Iterator[None]:
        """Temporarily make HF's decoder loop start at block ``layer`` (fed through ``inputs_embeds``);
        the layer list and ``config.layer_types`` are restored on exit, even on error."""
        parent_path, _, attr = self.family.layers.rpartition(".")
        parent = self.hf.get_submodule(parent_path) if parent_path else self.hf
        cfgs = {id(c): c for c in (self.hf.config, getattr(parent, "config", None)) if c is not None}
        saved_types = {k: getattr(c, "layer_types", None) for k, c in cfgs.items()}
        handles = []
        if self.pos_embed is not None:  # positions are already in the residual stream
            handles.append(self.pos_embed.register_forward_hook(lambda m, a, out: torch.zeros_like(out)))
        setattr(parent, attr, torch.nn.ModuleList(list(self.layers)[layer:]))
        try:
            for k, c in cfgs.items():
                if saved_types[k] is not None:
                    c.layer_types = list(saved_types[k])[layer:]
            yield
        finally:
            setattr(parent, attr, self.layers)
            for k, c in cfgs.items():
                if saved_types[k] is not None:
                    c.layer_types = saved_types[k]
            for h in handles:
                h.remove()


_META: dict[str, torch.nn.Module] = {}


def meta_model(config: HFConfig, trust_remote_code: bool = False) -> torch.nn.Module:
    """The causal LM a config describes, built on PyTorch's ``meta`` device (no memory; cached per config).

    Everything mechscope says about a model before loading it (hook names, sizes, parameter count)
    reads this module tree, the same way it reads a loaded model's. A config that names its own code
    (``auto_map``) is built from that code only with ``trust_remote_code=True``; it is never prompted for.
    """
    key = json.dumps(config.to_dict(), sort_keys=True, default=str)
    if key not in _META:
        from transformers import AutoModelForCausalLM

        config = copy.deepcopy(config)  # from_config sets the attention implementation on the config it is given
        with torch.device("meta"):  # (eager: some families refuse sdpa, and attention has no parameters anyway)
            try:
                _META[key] = AutoModelForCausalLM.from_config(config, attn_implementation="eager",
                                                                trust_remote_code=trust_remote_code)
            except ValueError as e:  # not a causal LM (T5, BERT ...), or a config transformers refuses
                from .families import UnsupportedArchitectureError

                raise UnsupportedArchitectureError(
                    f"{getattr(config, 'model_type', '?')!r} is not a causal language model that transformers can build "
                    f"({str(e).splitlines()[0]}); mechscope hooks decoder-only causal LMs") from e
    return _META[key]
