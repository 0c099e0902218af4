"""Training a cross-layer transcoder (or a per-layer set in the same form) on a model: the data side.

:func:`clt_config` describes one for a model (its hooks through the registry); :func:`clt_activations` harvests the
training rows of every covered layer from one forward pass per batch of sequences, into partitions (what
:class:`~mechscope.sae.data.PartitionedSource` samples, each rank its own under torchrun); :func:`train_clt` runs
mechscope's one dictionary trainer (:func:`mechscope.sae.train.fit_sae`: resumable, bit-identical after a kill,
data-parallel under torchrun) and returns its :class:`~mechscope.sae.train.TrainResult`. The trainer never sees the
model; :func:`mechscope.sae.evaluate.evaluate_clt` reads the result back into it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..compute import estimate_clt_training, free_memory
from ..core.errors import InputError
from ..core.hookpoints import act_name
from ..core.model import HookedModel
from ..core.progress import stage
from ..distributed import Dist, split
from .clt import CLTConfig
from .data import PartitionedSource, default_partitions, harvest_partitions
from .train import TrainConfig, TrainResult, fit_sae

#: what a CLT's encoders read: the residual stream between attention and the MLP (circuit-tracer's and Anthropic's
#: CLTs), or the MLP's own input (the pre-MLP norm's output, as mechscope's per-layer transcoders)
INPUTS = ("resid_mid", "mlp_in")


def clt_config(model: HookedModel, d_sae: int, layers: "list[int] | None" = None, input: str = "resid_mid",
               **kwargs: object) -> CLTConfig:
    """A :class:`CLTConfig` for ``model``: ``d_sae`` features per layer over ``layers`` (default all), encoders reading
    ``input`` (``"resid_mid"`` or ``"mlp_in"``), decoders writing ``hook_mlp_out``; ``kwargs`` set the rest
    (``architecture``, ``k``, ``reach``, ``tied``, ``skip``, ...)."""
    if input not in INPUTS:
        raise InputError(f"input must be one of {INPUTS}, got {input!r}")
    layers = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    bad = [layer for layer in layers if not 0 <= layer < model.cfg.n_layers]
    if bad or not layers:
        raise InputError(f"layers must be in 0..{model.cfg.n_layers - 1}; got {layers}")
    ins = tuple(model.mlp_input(layer) if input == "mlp_in" else act_name("resid_mid", layer) for layer in layers)
    missing = [h for h in ins if not model.has_hook(h)]
    if missing:
        raise InputError(f"{model.cfg.model_name or 'the model'} has no {missing[0]}; read input='mlp_in' instead")
    kwargs.setdefault("normalize_activations", "expected_average_only_in")
    return CLTConfig(d_model=model.cfg.d_model, d_sae=d_sae, layers=tuple(layers), input_hooks=ins,
                     output_hooks=tuple(act_name("mlp_out", layer) for layer in layers),
                     model_name=model.cfg.model_name, **kwargs)


def clt_activations(model: HookedModel, cfg: CLTConfig, tokens: torch.Tensor, partitions: int,
                    dist: Dist | None = None) -> dict[int, torch.Tensor]:
    """This rank's partitions of training rows ``[m, 2 L d]``: partition ``p`` holds the rows of the sequences
    ``split(n, partitions)[p]``, each sequence's rows from one forward pass (every layer at once). Refused up front
    when they would not fit in memory (the estimate says what they take)."""
    dist = dist or Dist.single()
    cost = estimate_clt_training(cfg.n_layers, cfg.d_model, cfg.d_sae, tokens.numel(), cfg.decoder_blocks())
    free = free_memory(model.device)
    if cost["activations_bytes"] > 0.8 * free:
        raise InputError(f"the training rows of {tokens.numel()} tokens take {cost['activations_bytes'] / 2**30:.1f} "
                         f"GiB ({cfg.row_width} floats a token: every covered layer's input and output), more than the "
                         f"{free / 2**30:.1f} GiB free; give fewer --seqs or layers")
    mine = split(partitions, dist.world)[dist.rank]
    stage(f"harvesting {cfg.n_layers} layers' inputs and outputs on {tokens.numel()} tokens "
          f"({cost['activations_bytes'] / 2**30:.2f} GiB of rows)" + (
              f" (rank {dist.rank} of {dist.world}: partitions {list(mine)} of {partitions})" if dist.active else ""))
    return harvest_partitions(model, tokens, partitions, mine, bundle=(cfg.input_hooks, cfg.output_hooks))


def train_clt(model: HookedModel, tokens: torch.Tensor, cfg: CLTConfig, train: TrainConfig | None = None,
              out: "str | Path | None" = None, resume: bool = False, progress: bool = True,
              stop_after: int | None = None, dist: Dist | None = None) -> TrainResult:
    """Train ``cfg``'s CLT on the activations of ``tokens [n, pos]`` (harvested once, every layer from one pass):
    :func:`~mechscope.sae.train.fit_sae` with checkpoints and monitoring in ``out`` (``resume`` continues; the same
    ``train.partitions`` gives the same CLT on any number of ranks). Per-layer input and output scales are fitted on
    a sample first (``cfg.normalize_activations``) and folded into the weights when it is saved
    (:func:`mechscope.sae.replacement.save_replacement`)."""
    train = train or TrainConfig()
    dist = dist or Dist.single()
    if tokens.dim() != 2 or tokens.shape[0] == 0:
        raise InputError(f"tokens must be [n, pos] with n >= 1, got {tuple(tokens.shape)}")
    parts = train.partitions or default_partitions(tokens.shape[0], train.batch_size)
    if parts < dist.world:
        raise InputError(f"{parts} partitions for {dist.world} ranks: each rank needs one; give more sequences or "
                         "fewer ranks")
    source = PartitionedSource(clt_activations(model, cfg, tokens, parts, dist), parts, train.batch_size, train.seed,
                               dist)
    return fit_sae(source, cfg, train, out=out, resume=resume, progress=progress, stop_after=stop_after, dist=dist)
