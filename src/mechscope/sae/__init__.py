"""Sparse autoencoders: architectures, training with monitoring, SAELens format, evaluation."""

from .io import check_fits, load_sae, save_sae
from .model import ARCHITECTURES, SAE, SAEConfig
from .data import harvest_to_disk, load_shards, shuffled_batches
from .train import (SAEEval, SAETrainingError, TrainConfig, evaluate_sae, harvest, resample_dead, splice_hook,
                    train_sae, train_sae_sweep)

__all__ = ["ARCHITECTURES", "SAE", "SAEConfig", "SAEEval", "SAETrainingError", "TrainConfig", "check_fits",
           "evaluate_sae", "harvest", "harvest_to_disk", "load_sae", "load_shards", "resample_dead", "shuffled_batches",
           "train_sae_sweep", "save_sae", "splice_hook", "train_sae"]
