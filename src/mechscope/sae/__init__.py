"""Sparse autoencoders, as three separate parts plus reading them.

- :mod:`.data`: :func:`harvest` (the only code that runs the LM), activation sources and shards;
- :mod:`.model` and :mod:`.kernels`: the four architectures and their sparse training kernels;
- :mod:`.train`: the trainer, which never sees the LM; :func:`fit_sae` returns a :class:`TrainResult`;
- :mod:`.evaluate`: held-out quality with the SAE spliced in;
- :mod:`.io`: the SAELens on-disk format; :mod:`.features`: dashboards, search and steering;
- :mod:`.transcoders`: :class:`TranscoderSet`, per-layer transcoders validated once, with their hooks;
- :mod:`.clt` and :mod:`.clt_train`: :class:`CrossLayerTranscoder` (also a per-layer set read from published files),
  and training one on a model;
- :mod:`.replacement` and :mod:`.sites`: :func:`load_replacement` and :func:`save_replacement`, circuit-tracer's and
  Gemma Scope's layouts, and where their hook names live in a model.
"""

from .clt import CLTConfig, CrossLayerTranscoder
from .clt_train import clt_config, train_clt
from .data import (
                   ActivationSource,
                   PartitionedSource,
                   TensorSource,
                   harvest,
                   harvest_bundle,
                   harvest_many,
                   harvest_to_disk,
                   load_shards,
                   shuffled_batches,
)
from .evaluate import CLTEval, SAEEval, evaluate_clt, evaluate_sae, splice_hook
from .io import check_fits, load_sae, save_sae
from .many import save_many, train_many
from .model import ARCHITECTURES, SAE, LossTerms, SAEConfig
from .replacement import load_replacement, releases, save_replacement
from .train import (
                   SAETrainer,
                   SAETrainingError,
                   TrainConfig,
                   TrainerState,
                   TrainResult,
                   fit_sae,
                   resample_dead,
                   train_sae,
                   train_sae_sweep,
)
from .transcoders import TranscoderSet, load_transcoders, transcoder_cache

__all__ = ["ARCHITECTURES", "CLTConfig", "CLTEval", "CrossLayerTranscoder", "clt_config", "evaluate_clt",
           "harvest_bundle", "load_replacement", "releases", "save_replacement", "train_clt", "ActivationSource",
           "LossTerms", "PartitionedSource", "SAE", "SAEConfig", "SAEEval",
           "SAETrainer", "SAETrainingError", "TrainerState", "TensorSource", "TrainConfig", "TrainResult", "check_fits",
           "evaluate_sae", "fit_sae",
           "harvest", "harvest_many", "harvest_to_disk", "load_sae", "load_shards", "load_transcoders", "resample_dead",
           "save_many", "save_sae", "shuffled_batches", "splice_hook", "train_many", "train_sae", "train_sae_sweep",
           "TranscoderSet", "transcoder_cache"]
