"""Sparse autoencoders: architectures, training with monitoring, SAELens format, evaluation."""

from .io import check_fits, load_sae, save_sae
from .model import ARCHITECTURES, SAE, SAEConfig
from .train import SAEEval, SAETrainingError, TrainConfig, evaluate_sae, harvest, splice_hook, train_sae

__all__ = ["ARCHITECTURES", "SAE", "SAEConfig", "SAEEval", "SAETrainingError", "TrainConfig", "check_fits",
           "evaluate_sae", "harvest", "load_sae", "save_sae", "splice_hook", "train_sae"]
