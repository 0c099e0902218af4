"""mechscope: mechanistic interpretability on any Hugging Face causal LM."""

from .cache import ActivationCache, act_name
from .compute import env, estimate_memory
from .families import UnsupportedArchitectureError, supported_model_types
from .hooks import HookPoint
from .loading import ALIASES, DEFAULT_MODEL, ModelNotFoundError, load
from .lens import logit_lens
from .model import HookedModel, ModelConfig, lm_loss

__version__ = "0.1.0"

__all__ = [
    "ALIASES",
    "ActivationCache",
    "DEFAULT_MODEL",
    "HookPoint",
    "HookedModel",
    "ModelConfig",
    "ModelNotFoundError",
    "UnsupportedArchitectureError",
    "act_name",
    "env",
    "estimate_memory",
    "logit_lens",
    "lm_loss",
    "load",
    "supported_model_types",
]
