"""Model diffing: what fine-tuning changed, read from a base model and its fine-tune side by side.

- :mod:`.pair`: :func:`load_pair` (two models, or a base model plus a LoRA adapter on one copy of the weights), the
  checks a pair must pass, and :meth:`ModelPair.side`;
- :mod:`.lora`: LoRA adapters in PEFT's layout, switched on and off by hooks;
- :mod:`.kl`: per-token KL and loss differences, the contexts and tokens that moved;
- :mod:`.adl`: the activation-difference lens (logit lens, Patchscope, steering), per-layer difference norms, and
  where the fine-tune's difference becomes readable by the base model (:func:`state_transfer`);
- :mod:`.weights`: ``||ΔW||`` and effective rank per matrix;
- :mod:`.crosscoding`: crosscoders on paired activations, latent classes, Latent Scaling;
- :mod:`.organisms`: model organisms with a known answer (narrow fine-tunes on a domain) and recovery scores.
"""

from .adl import (
           ActivationDifference,
           LayerNorms,
           StateTransfer,
           activation_difference,
           layer_norms,
           logit_lens_readout,
           patchscope_readout,
           state_transfer,
           steering_readout,
           token_effect_readout,
)
from .crosscoding import (
           CrosscoderEval,
           LatentClasses,
           LatentScaling,
           crosscoder_config,
           evaluate_crosscoder,
           harvest_pair,
           latent_classes,
           latent_scaling,
           train_crosscoder,
)
from .kl import KLDiff, kl_diff
from .lora import LoraAdapter
from .pair import ModelPair, load_pair
from .weights import WeightDiff, weight_diff

__all__ = ["ActivationDifference", "CrosscoderEval", "KLDiff", "LatentClasses", "LatentScaling", "LayerNorms",
           "LoraAdapter", "ModelPair", "StateTransfer", "WeightDiff", "activation_difference", "crosscoder_config",
           "evaluate_crosscoder", "harvest_pair", "kl_diff", "latent_classes", "latent_scaling", "layer_norms",
           "load_pair", "logit_lens_readout", "patchscope_readout", "state_transfer", "steering_readout", "token_effect_readout",
           "train_crosscoder", "weight_diff"]
