"""The core: hook points, the hooked model and its parts. Nothing here imports from outside ``core``.

Read in this order: :mod:`.hookpoints` (the registry), :mod:`.families` (where each architecture
keeps its modules), :mod:`.parts`, :mod:`.sites` and :mod:`.attention` (how hook points fire),
:mod:`.weights`, :mod:`.tokens`, :mod:`.model` (the facade) and :mod:`.cache`.
"""

from .cache import ActivationCache
from .components import Component, parse_components
from .config import ModelConfig
from .errors import InputError, InputTypeError, MechscopeError, NotFoundError, UnknownNameError
from .families import UnsupportedArchitectureError, supported_model_types
from .files import atomic_dir, atomic_write
from .hookpoints import HOOK_SPECS, HookSpec, act_name
from .hooks import HookPoint
from .model import HookedModel, lm_loss

__all__ = ["ActivationCache", "Component", "HOOK_SPECS", "HookPoint", "HookSpec", "HookedModel", "InputError",
           "InputTypeError", "MechscopeError", "ModelConfig", "NotFoundError", "UnknownNameError",
           "UnsupportedArchitectureError", "act_name", "atomic_dir", "atomic_write", "lm_loss", "parse_components",
           "supported_model_types"]
