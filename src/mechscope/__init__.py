"""mechscope: mechanistic interpretability on any Hugging Face causal LM.

The package reads like the research workflow (see ``docs/architecture.md``):

- ``core``: the hook-point registry, the hooked model and its parts, typed components, results;
- ``loading``, ``compute``, ``corpus``: getting a model and text, and sizing a run;
- ``analysis``: metrics, statistics (CIs, baselines) and pictures;
- ``datasets``, ``techniques``: task datasets; lens, DLA, patching, ablation, probing, steering;
- ``circuits``, ``sae``: weight circuits, head detectors, circuit discovery; sparse autoencoders;
- ``project``, ``workflows``, ``cli``: experiment records, end-to-end investigations, the command line.

Every name below is importable from ``mechscope`` directly; ``tests/test_architecture.py`` checks it.
"""

from . import datasets
from .analysis.metrics import induction_loss, kl_div, logit_diff, normalized_metric, token_prob, token_rank
from .analysis.validation import Estimate, across_seeds, bootstrap_ci, cohens_d, paired_bootstrap, shuffled_labels
from .circuits.discovery import CircuitResult, edge_attribution, find_circuit
from .circuits.edge_circuits import edge_circuit
from .circuits.experts import expert_report
from .circuits.heads import detect_heads, head_report, induction_scores
from .circuits.toy import train_attn_only
from .circuits.weights import OV, QK, FactoredMatrix, composition_scores, copying_scores
from .compute import env, estimate_memory
from .core.cache import ActivationCache
from .core.check import check
from .core.components import Component, parse_components
from .core.config import ModelConfig
from .core.errors import InputError, MechscopeError, NotFoundError, UnknownNameError
from .core.families import UnsupportedArchitectureError, supported_model_types
from .core.hookpoints import HOOK_SPECS, act_name
from .core.hooks import HookPoint
from .core.model import HookedModel, lm_loss
from .core.result import Result
from .loading import ALIASES, DEFAULT_MODEL, ModelNotFoundError, load
from .project import Run, init_project
from .sae import SAE, SAEConfig, TrainConfig, evaluate_sae, fit_sae, harvest, load_sae, save_sae, train_sae
from .techniques.ablation import ablate, compare_to_random
from .techniques.attribution import direct_logit_attribution
from .techniques.attribution_patching import attribution_patch
from .techniques.lens import logit_lens, train_tuned_lens
from .techniques.patching import patch
from .techniques.probing import probe_sweep, train_probe
from .techniques.steering import expert_routing_hook, projection_ablation_hook, steering_hook
from .workflows import demo_investigation, investigate

__version__ = "0.2.0"

from .core.versions import warn_if_untested  # noqa: E402  (after the imports that load torch and transformers)

warn_if_untested()

__all__ = [
    # core
    "ActivationCache", "Component", "HOOK_SPECS", "HookPoint", "HookedModel", "ModelConfig", "Result",
    "act_name", "check", "lm_loss", "parse_components", "supported_model_types",
    # errors
    "InputError", "MechscopeError", "ModelNotFoundError", "NotFoundError", "UnknownNameError",
    "UnsupportedArchitectureError",
    # loading and compute
    "ALIASES", "DEFAULT_MODEL", "env", "estimate_memory", "load",
    # analysis
    "Estimate", "across_seeds", "bootstrap_ci", "cohens_d", "induction_loss", "kl_div", "logit_diff",
    "normalized_metric", "paired_bootstrap", "shuffled_labels", "token_prob", "token_rank",
    # techniques
    "ablate", "attribution_patch", "compare_to_random", "datasets", "direct_logit_attribution", "expert_routing_hook",
    "logit_lens",
    "patch", "probe_sweep", "projection_ablation_hook", "steering_hook", "train_probe", "train_tuned_lens",
    # circuits
    "CircuitResult", "FactoredMatrix", "OV", "QK", "composition_scores", "copying_scores", "detect_heads",
    "edge_attribution", "edge_circuit", "expert_report", "find_circuit", "head_report", "induction_scores", "train_attn_only",
    # SAEs
    "SAE", "SAEConfig", "TrainConfig", "evaluate_sae", "fit_sae", "harvest", "load_sae", "save_sae", "train_sae",
    # workflows
    "Run", "demo_investigation", "init_project", "investigate",
]
