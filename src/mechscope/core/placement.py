"""Where a model's tensors live: one device, several devices (a ``device_map``), or disk.

A model loaded with ``device_map`` (accelerate's big-model inference) may keep some modules'
parameters on ``meta`` between forward passes: accelerate's hook on each such module loads the
real weights (from CPU memory or from ``offload_folder`` on disk) for that module's forward pass
only, and puts them back afterwards. mechscope never reads a parameter attribute directly:

- :func:`param` returns a module's real weight, loading an offloaded one the way accelerate's
  own hook does (``align_module_device``), so weight views never see a ``meta`` tensor;
- :func:`execution_device` is the device a module computes on (for an offloaded module, the
  device its weights are loaded to), which is where its inputs must be.

The same code serves a model split over ``cuda:0``/``cuda:1``: each module's weights and
activations stay on its own device, and tensors that cross devices are moved explicitly.
"""

from __future__ import annotations

import torch


def _offload_hook(module: torch.nn.Module):
    hook = getattr(module, "_hf_hook", None)
    return hook if hook is not None and getattr(hook, "offload", False) else None


def param(module: torch.nn.Module, name: str = "weight") -> torch.Tensor | None:
    """``module.<name>`` as a real tensor (None where the module has no such parameter).

    An offloaded parameter (on ``meta`` outside the module's forward pass) is loaded onto the
    module's execution device; the module itself is left offloaded.
    """
    t = getattr(module, name, None)
    if t is None or t.device.type != "meta":
        return t
    if _offload_hook(module) is None:
        raise RuntimeError(f"{type(module).__name__}.{name} is a meta tensor with no offload hook to load it from; "
                           "the model was built on the meta device and never given weights")
    from accelerate.utils import align_module_device

    with align_module_device(module):
        return getattr(module, name).detach()


def execution_device(module: torch.nn.Module) -> torch.device:
    """The device ``module`` computes on: its offload hook's execution device, else its parameters' device."""
    hook = getattr(module, "_hf_hook", None)
    dev = getattr(hook, "execution_device", None)
    if dev is not None:
        return torch.device(dev if not isinstance(dev, int) else f"cuda:{dev}")
    for p in module.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def device_map(hf: torch.nn.Module) -> dict | None:
    """The model's ``hf_device_map`` (module path -> device, ``"cpu"`` or ``"disk"``), or None on one device."""
    return getattr(hf, "hf_device_map", None)


def offloaded(hf: torch.nn.Module) -> list[str]:
    """Module paths whose weights live off the compute device (CPU or disk offload)."""
    dm = device_map(hf) or {}
    compute = {str(d) for d in dm.values() if str(d) not in ("cpu", "disk")}
    return [k for k, d in dm.items() if str(d) == "disk" or (compute and str(d) == "cpu")]


def stack_on(tensors: list[torch.Tensor], dim: int = 0, cat: bool = False) -> torch.Tensor:
    """``torch.stack`` (or ``torch.cat``) of per-layer tensors that may live on different devices, on the first one's."""
    dev = tensors[0].device
    moved = [t.to(dev) for t in tensors]
    return torch.cat(moved, dim) if cat else torch.stack(moved, dim)
