"""A validated set of per-layer transcoders: what attribution graphs, labels and interventions take.

A transcoder maps one block's MLP input to that block's ``hook_mlp_out`` (Dunefsky et al. 2024). A
:class:`TranscoderSet` is checked once against a model, and then carries for each layer its
transcoder and the two hook points it reads and writes (as circuit-tracer's ``TranscoderSet`` carries
its feature input and output hooks), so that every consumer reads ``tcs.input_hook(layer)`` instead
of re-parsing hook names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

import torch

from ..core.errors import InputError
from ..core.files import path_then_model
from ..core.hookpoints import act_name, split_name
from ..core.model import HookedModel
from .io import check_fits, load_sae
from .model import SAE


class TranscoderSet:
    """Transcoders for any subset of ``model``'s layers, each checked to fit ``model``, to read a hook of its own block
    and to write that block's ``hook_mlp_out``; one per layer. Iterating gives the transcoders in layer order;
    ``tcs[layer]``, ``layer in tcs``, ``tcs.get(layer)``, ``tcs.items()`` and ``tcs.layers`` look them up by layer."""

    def __init__(self, model: HookedModel, transcoders: Iterable[SAE]):
        by_layer: dict[int, SAE] = {}
        for tc in transcoders:
            if not isinstance(tc, SAE):
                raise InputError(f"a transcoder set takes SAE objects (mechscope.load_sae), got {type(tc).__name__}")
            if not tc.cfg.is_transcoder:
                raise InputError(f"{tc.cfg.hook_name} holds an SAE, not a transcoder (it has no hook_name_out); "
                                 "attribution graphs need transcoders (MLP input -> hook_mlp_out)")
            check_fits(tc, model)
            layer, suffix = split_name(tc.cfg.hook_name_out)
            if layer is None or suffix != "hook_mlp_out":
                raise InputError(f"a transcoder in a set must write blocks.L.hook_mlp_out, not {tc.cfg.hook_name_out}")
            if layer in by_layer:
                raise InputError(f"two transcoders replace block {layer}'s MLP; give one per layer")
            if split_name(tc.cfg.hook_name)[0] != layer:
                raise InputError(f"transcoder {tc.cfg.hook_name} -> {tc.cfg.hook_name_out} reads another block than "
                                 f"the one it writes; a set needs per-layer transcoders (block {layer} reads "
                                 f"{model.mlp_input(layer)})")
            by_layer[layer] = tc.eval()
        self.model_name = model.cfg.model_name
        self._by_layer = dict(sorted(by_layer.items()))

    @classmethod
    def of(cls, model: HookedModel, transcoders: "TranscoderSet | Iterable[SAE]") -> "TranscoderSet":
        """``transcoders`` as a set for ``model``: a set is returned as it is, a list is validated."""
        return transcoders if isinstance(transcoders, TranscoderSet) else cls(model, transcoders)

    def __getitem__(self, layer: int) -> SAE:
        return self._by_layer[layer]

    def __contains__(self, layer: object) -> bool:
        return layer in self._by_layer

    def __iter__(self) -> Iterator[SAE]:
        return iter(self._by_layer.values())

    def __len__(self) -> int:
        return len(self._by_layer)

    def get(self, layer: int, default: SAE | None = None) -> SAE | None:
        return self._by_layer.get(layer, default)

    def items(self) -> list[tuple[int, SAE]]:
        return list(self._by_layer.items())

    @property
    def layers(self) -> list[int]:
        return list(self._by_layer)

    def input_hook(self, layer: int) -> str:
        """The hook point layer ``layer``'s transcoder reads (its MLP input: ``model.mlp_input(layer)`` as trained)."""
        return self._by_layer[layer].cfg.hook_name

    def output_hook(self, layer: int) -> str:
        """The hook point it replaces: ``blocks.{layer}.hook_mlp_out``."""
        return act_name("mlp_out", layer)

    # ------------------------------------------------------------------ the replacement API (sae.replacement.Replacement)
    @property
    def output_layers(self) -> list[int]:
        """The layers whose MLP output a transcoder predicts: its own layers."""
        return self.layers

    def targets(self, layer: int) -> list[int]:
        """The layers a feature of ``layer`` writes to: its own."""
        return [layer]

    def n_features(self, layer: int) -> int:
        return self._by_layer[layer].cfg.d_sae

    def encode(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """``[..., d_in] -> [..., d_sae]``: layer ``layer``'s feature activations."""
        return self._by_layer[layer].encode(x)

    def pre_acts_at(self, layer: int, x: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        return self._by_layer[layer].pre_acts_at(x, feats)

    def read_directions(self, layer: int, feats: torch.Tensor) -> torch.Tensor:
        return self._by_layer[layer].read_directions(feats)

    def write_directions(self, layer: int, feats: torch.Tensor) -> torch.Tensor:
        """``[m, 1, d_out]``: each feature's write into its own layer's output."""
        return self._by_layer[layer].write_directions(feats)[:, None]

    def decoder_bias(self, layer: int) -> torch.Tensor:
        """``[d_out]``: what the transcoder writes with no feature active (raw space)."""
        tc = self._by_layer[layer]
        return tc.decode(torch.zeros(tc.cfg.d_sae, device=tc.b_dec.device))

    def has_skip(self, layer: int) -> bool:
        return self._by_layer[layer].cfg.skip

    def skip_term(self, layer: int, x: torch.Tensor) -> torch.Tensor | float:
        return self._by_layer[layer].skip_term(x)

    def explanations_of(self, layer: int) -> dict[int, str]:
        return getattr(self._by_layer[layer], "explanations", {})

    def describe(self) -> str:
        """What it is, in a few words (a graph's stats and the CLI say it)."""
        return f"per-layer transcoders ({len(self)} layers)"

    def layer_view(self, layer: int) -> SAE:
        """Layer ``layer``'s transcoder (what dashboards and labels read)."""
        return self._by_layer[layer]

    def to(self, device: "torch.device | str") -> "TranscoderSet":
        """The transcoders moved to ``device`` (in place); returns the set."""
        for layer, tc in self._by_layer.items():
            self._by_layer[layer] = tc.to(device)
        return self

    def __repr__(self) -> str:
        return f"TranscoderSet({self.model_name or 'model'}: layers {self.layers})"


def transcoder_cache(model_name: str) -> Path:
    """Where ``mechscope transcoders train`` keeps a model's transcoders by default (and ``mechscope graph``
    looks for them): ``$MECHSCOPE_CACHE/transcoders/<model>``."""
    from ..loading import cache_dir

    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_name.rstrip("/").split("/")[-1])
    return cache_dir() / "transcoders" / safe


def load_transcoders(folder: str | Path, model: HookedModel | None = None) -> "TranscoderSet | list[SAE]":
    """Every transcoder under ``folder`` (its ``layer_<L>`` subfolders, as ``transcoders train`` writes them, or
    ``folder`` itself when it holds one), in layer order; with ``model``, a
    :class:`~mechscope.sae.transcoders.TranscoderSet` checked against it (a list without)."""
    folder, model = path_then_model(folder, model, "load_transcoders")
    folder = Path(folder)
    if not folder.is_dir():
        n = f" ({model.cfg.n_layers} layers)" if model is not None else ""
        raise InputError(f"no transcoder folder at {folder}; train some with `mechscope transcoders train --out "
                         f"{folder}`. A full set{n} takes about 30 minutes for SmolLM2-135M's 30 layers on a 2-core "
                         "CPU with the defaults (1000 steps; scale by layers and width); any subset of layers works "
                         "(`--layers 10 11 12`), and the layers without one become error nodes in a graph")
    subs = [folder] if (folder / "cfg.json").exists() else sorted(p for p in folder.iterdir() if (p / "cfg.json").exists())
    if not subs:
        raise InputError(f"{folder} holds no SAE folders (each needs a cfg.json); train transcoders with "
                         f"`mechscope transcoders train --out {folder}`")
    out = [load_sae(p, model) for p in subs]
    bad = [str(p) for p, t in zip(subs, out) if not t.cfg.is_transcoder]
    if bad:
        raise InputError(f"these folders hold SAEs, not transcoders (no hook_name_out): {', '.join(bad)}")
    if model is not None:
        return TranscoderSet(model, out)
    layer = lambda t: split_name(t.cfg.hook_name_out)[0]  # noqa: E731
    return sorted(out, key=lambda t: -1 if layer(t) is None else layer(t))
