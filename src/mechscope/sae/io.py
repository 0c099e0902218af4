"""Save and load SAEs in SAELens's on-disk format (v6).

A folder with ``cfg.json`` (``architecture``, ``d_in``, ``d_sae``, ``dtype``, ``device``,
``apply_b_dec_to_input``, ``normalize_activations``, ``reshape_activations``, ``metadata`` with
``hook_name`` and ``model_name``, and ``k`` for TopK), ``sae_weights.safetensors`` (``W_enc``
``[d_in, d_sae]``, ``W_dec`` ``[d_sae, d_in]``, ``b_enc``, ``b_dec``, and ``threshold`` for
JumpReLU) and optionally ``sparsity.safetensors`` (``sparsity``: log10 feature density).

At save time the input normalisation is folded into the weights (so the file says
``normalize_activations: "none"`` and reconstructs raw activations exactly as the in-memory SAE
does), ReLU+L1 is written as ``standard``, and BatchTopK as ``jumprelu`` with its learned global
threshold, as SAELens does. The folder is written under a temporary name and renamed.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..core.errors import InputError, NotFoundError
from ..core.files import atomic_dir
from ..core.hookpoints import spec
from ..core.model import HookedModel
from .model import SAE, SAEConfig

SAVED_ARCH = {"relu": "standard", "topk": "topk", "batchtopk": "jumprelu", "jumprelu": "jumprelu"}
LOADED_ARCH = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu"}


@torch.no_grad()
def saelens_tensors(sae: SAE) -> dict[str, torch.Tensor]:
    """The weights as SAELens stores them, with the input scale ``s`` folded in:
    ``W_enc' = s W_enc``, ``W_dec' = W_dec / s``, ``b_dec' = b_dec / s``."""
    s = float(sae.input_scale)
    out = {"W_enc": (sae.W_enc * s), "W_dec": (sae.W_dec / s), "b_enc": sae.b_enc.clone(), "b_dec": (sae.b_dec / s)}
    arch = sae.cfg.architecture
    if arch == "jumprelu":
        out["threshold"] = sae.log_threshold.float().exp()
    elif arch == "batchtopk":
        if float(sae.threshold) < 0:
            raise InputError("this BatchTopK SAE has no inference threshold yet: train it before saving")
        out["threshold"] = torch.full((sae.cfg.d_sae,), float(sae.threshold))
    return {k: v.detach().float().cpu().contiguous() for k, v in out.items()}


def save_sae(sae: SAE, path: str | Path, log10_density: torch.Tensor | None = None) -> Path:
    """Write ``sae`` to folder ``path`` in SAELens's format (atomically; an existing folder is replaced)."""
    c = sae.cfg
    cfg = {
        "architecture": SAVED_ARCH[c.architecture], "d_in": c.d_in, "d_sae": c.d_sae, "dtype": c.dtype,
        "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {"hook_name": c.hook_name, "model_name": c.model_name, "saved_by": "mechscope",
                     "mechscope_config": c.to_dict(), "input_scale_folded": float(sae.input_scale)},
    }
    if c.architecture == "topk":
        cfg["k"] = c.k
    path = Path(path)
    with atomic_dir(path) as tmp:
        (tmp / "cfg.json").write_text(json.dumps(cfg, indent=2))
        save_file(saelens_tensors(sae), str(tmp / "sae_weights.safetensors"))
        if log10_density is not None:
            save_file({"sparsity": log10_density.detach().float().cpu().contiguous()}, str(tmp / "sparsity.safetensors"))
    return path


def load_sae(path: str | Path, model: HookedModel | None = None) -> SAE:
    """Load an SAE folder in SAELens's format (v6, or older with a top-level ``hook_name``).

    With ``model``, checks that the hook exists (suggesting the nearest names) and that ``d_in``
    equals that hook's width. Weights are read with safetensors only.
    """
    path = Path(path)
    if not (path / "cfg.json").exists() or not (path / "sae_weights.safetensors").exists():
        raise NotFoundError(f"{path} is not an SAE folder: it needs cfg.json and sae_weights.safetensors")
    raw = json.loads((path / "cfg.json").read_text())
    arch = raw.get("architecture", "standard")
    if arch not in LOADED_ARCH:
        raise InputError(f"unsupported SAE architecture {arch!r} in {path}; supported: {sorted(LOADED_ARCH)}")
    if raw.get("normalize_activations", "none") not in ("none", None):
        raise InputError(f"{path} asks for normalize_activations={raw['normalize_activations']!r} at run time; "
                         "mechscope loads SAEs whose normalisation is folded into the weights ('none')")
    meta = raw.get("metadata") or {}
    hook = meta.get("hook_name") or raw.get("hook_name") or raw.get("hook_point") or ""
    cfg = SAEConfig(d_in=int(raw["d_in"]), d_sae=int(raw["d_sae"]), architecture=LOADED_ARCH[arch],
                    hook_name=hook, model_name=meta.get("model_name") or raw.get("model_name") or "",
                    k=int(raw.get("k", 32)) if arch == "topk" else 32)
    w = load_file(str(path / "sae_weights.safetensors"))
    expected = {"W_enc": (cfg.d_in, cfg.d_sae), "W_dec": (cfg.d_sae, cfg.d_in), "b_enc": (cfg.d_sae,),
                "b_dec": (cfg.d_in,)}
    for name, shape in expected.items():
        if name not in w:
            raise InputError(f"{path}/sae_weights.safetensors has no {name!r} (has {sorted(w)})")
        if tuple(w[name].shape) != shape:
            raise InputError(f"{name} has shape {tuple(w[name].shape)}, expected {shape} from cfg.json")
    sae = SAE(cfg)
    with torch.no_grad():
        for name in expected:
            getattr(sae, name).copy_(w[name])
        if arch == "jumprelu":
            if "threshold" not in w:
                raise InputError(f"{path}: a jumprelu SAE needs a 'threshold' tensor")
            sae.log_threshold.copy_(w["threshold"].float().clamp(min=1e-12).log())
    if model is not None:
        check_fits(sae, model)
    return sae


def check_fits(sae: SAE, model: HookedModel) -> None:
    """Raise a clear error when the SAE's hook is unknown to ``model`` or its ``d_in`` does not match."""
    hook = sae.cfg.hook_name
    if not hook:
        raise InputError("the SAE does not say which hook it reads (cfg hook_name is empty)")
    model.manager.check(hook)
    width = spec(hook).width(model.cfg.to_dict())
    if width != sae.cfg.d_in:
        raise InputError(f"the SAE has d_in={sae.cfg.d_in} but {hook} of {model.cfg.model_name} has width {width}")
