"""LoRA adapters in PEFT's on-disk layout, switched on and off on one copy of a model's weights.

A LoRA-adapted linear layer computes (Hu et al. 2021, "LoRA", eq. 3)::

    y = x W^T + b + s · (x A^T) B^T        A [r, in], B [out, r], s = alpha / r   (rsLoRA: alpha / sqrt(r))

:class:`LoraAdapter` adds the last term with a forward hook on each adapted module (run before any other hook of that
module), so the base weights are never touched: switching the adapter off gives the base model's logits to the bit,
and a base model plus its fine-tune cost one copy of the weights. ``ΔW = s B A`` (:meth:`LoraAdapter.delta`) is the
weight difference the fine-tune made.

PEFT's folder: ``adapter_config.json`` (``peft_type`` "LORA", ``r``, ``lora_alpha``, ``target_modules``,
``use_rslora``, ``rank_pattern``, ``alpha_pattern``, ``base_model_name_or_path``, ...) and
``adapter_model.safetensors`` with ``base_model.model.<module>.lora_A.weight`` ``[r, in]`` and ``...lora_B.weight``
``[out, r]``, ``<module>`` the path inside the ``*ForCausalLM``. Variants that change more than ``A`` and ``B``
(DoRA, trained biases, ``modules_to_save``, embedding LoRA, layer replication) are refused by name.
"""

from __future__ import annotations

import json
import math
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from ..core.errors import InputError
from ..core.files import atomic_dir, read_json, read_safetensors

PREFIX = "base_model.model."
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
#: the projections a LoRA adapts by default (Llama-style names; every linear layer of attention and MLP)
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def is_adapter_folder(path: "str | Path") -> bool:
    """Whether ``path`` is a PEFT adapter folder (it holds ``adapter_config.json``)."""
    return (Path(path) / CONFIG).is_file()


def _pattern_value(patterns: dict, name: str, default: float) -> float:
    """PEFT's ``rank_pattern`` / ``alpha_pattern``: the value of the first key matching the end of ``name``."""
    for key, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?{key}", name):
            return value
    return default


class _Layer(nn.Module):
    def __init__(self, A: torch.Tensor, B: torch.Tensor, scale: float):
        super().__init__()
        self.A, self.B, self.scale = nn.Parameter(A), nn.Parameter(B), float(scale)


class LoraAdapter(nn.Module):
    """LoRA factors for named linear modules of a ``*ForCausalLM``; :meth:`attach` hooks them in, :attr:`enabled`
    switches them. :meth:`read` reads PEFT's folder, :meth:`save` writes it, :meth:`new` starts a trainable one."""

    def __init__(self, layers: dict[str, tuple[torch.Tensor, torch.Tensor, float]], config: dict, source: str = ""):
        super().__init__()
        self.names = list(layers)
        self.layers = nn.ModuleDict({n.replace(".", "__"): _Layer(A, B, s) for n, (A, B, s) in layers.items()})
        self.config = config
        self.source = source
        self.enabled = True
        self._handles: list = []

    def layer(self, name: str) -> _Layer:
        return self.layers[name.replace(".", "__")]

    # ------------------------------------------------------------------ reading and writing PEFT's layout
    @classmethod
    def read(cls, folder: "str | Path") -> "LoraAdapter":
        """The adapter in PEFT's ``folder``; a clear error for what is not a plain LoRA."""
        folder = Path(folder)
        cfg = read_json(folder / CONFIG, "a PEFT adapter config")
        if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
            raise InputError(f"{folder / CONFIG}: peft_type {cfg.get('peft_type')!r}; mechscope reads LoRA adapters only")
        refused = [(k, cfg.get(k)) for k in ("use_dora", "modules_to_save", "layer_replication", "lora_bias",
                                             "target_parameters", "trainable_token_indices") if cfg.get(k)]
        if str(cfg.get("bias", "none")) != "none":
            refused.append(("bias", cfg["bias"]))
        if refused:
            raise InputError(f"{folder / CONFIG}: {', '.join(f'{k}={v!r}' for k, v in refused)}; mechscope switches plain "
                             "LoRA factors (A, B) on and off, and refuses variants that change more. Merge the adapter "
                             "into the weights (peft's merge_and_unload) and load the result as a model instead")
        path = folder / WEIGHTS
        if not path.is_file():
            raise InputError(f"{folder} has {CONFIG} but no {WEIGHTS}; mechscope reads adapters saved as safetensors "
                             "(peft's default) and never unpickles adapter_model.bin")
        t = read_safetensors(path, "a PEFT adapter's weights")
        odd = [k for k in t if not re.search(r"\.lora_[AB]\.weight$", k)]
        if odd:
            raise InputError(f"{path} holds {odd[:3]} besides LoRA factors (lora_A/lora_B weights); embedding LoRA and "
                             "saved modules are not supported")
        layers = {}
        for key in sorted(k for k in t if k.endswith(".lora_A.weight")):
            name = key[:-len(".lora_A.weight")]
            name = name[len(PREFIX):] if name.startswith(PREFIX) else name
            bkey = key[:-len("lora_A.weight")] + "lora_B.weight"
            if bkey not in t:
                raise InputError(f"{path}: {key} has no matching {bkey}")
            A, B = t[key].float(), t[bkey].float()
            if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
                raise InputError(f"{path}: {name} has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}; LoRA needs "
                                 "A [r, in] and B [out, r]")
            r = A.shape[0]
            alpha = _pattern_value(cfg.get("alpha_pattern"), name, cfg.get("lora_alpha", 8))
            scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
            layers[name] = (A, B, scale)
        if not layers:
            raise InputError(f"{path} holds no LoRA factors")
        return cls(layers, cfg, source=str(folder))

    def save(self, folder: "str | Path", base_model: str = "") -> Path:
        """``folder/adapter_config.json`` + ``folder/adapter_model.safetensors`` in PEFT's layout, written to a
        temporary folder and renamed. Each module keeps its rank; its scale is written as ``alpha_pattern``."""
        from safetensors.torch import save

        ranks = {n: self.layer(n).A.shape[0] for n in self.names}
        r = max(set(ranks.values()), key=list(ranks.values()).count)
        alpha = self.layer(self.names[0]).scale * r
        cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha,
               "target_modules": sorted({n.rsplit(".", 1)[-1] for n in self.names}), "lora_dropout": 0.0,
               "bias": "none", "use_rslora": False, "use_dora": False, "fan_in_fan_out": False,
               "rank_pattern": {re.escape(n): k for n, k in ranks.items() if k != r},
               "alpha_pattern": {re.escape(n): self.layer(n).scale * ranks[n] for n in self.names
                                 if abs(self.layer(n).scale * ranks[n] - alpha) > 1e-12 * max(1.0, alpha)},
               "base_model_name_or_path": base_model or self.config.get("base_model_name_or_path", ""),
               "inference_mode": True, "modules_to_save": None}
        tensors = {}
        for n in self.names:
            tensors[f"{PREFIX}{n}.lora_A.weight"] = self.layer(n).A.detach().float().cpu().contiguous()
            tensors[f"{PREFIX}{n}.lora_B.weight"] = self.layer(n).B.detach().float().cpu().contiguous()
        folder = Path(folder)
        with atomic_dir(folder) as tmp:
            (tmp / CONFIG).write_text(json.dumps(cfg, indent=2))
            (tmp / WEIGHTS).write_bytes(save(tensors, metadata={"format": "pt"}))
        return folder

    @classmethod
    def new(cls, hf_model: nn.Module, targets: "tuple[str, ...] | list[str]" = DEFAULT_TARGETS, r: int = 8,
            alpha: float = 16.0, layers: "list[int] | None" = None, seed: int = 0) -> "LoraAdapter":
        """A fresh adapter for ``hf_model``'s linear modules whose names end in one of ``targets`` (in ``layers``,
        default all): ``A`` Kaiming-uniform, ``B`` zero (PEFT's initialisation), so it starts as the identity."""
        if r < 1:
            raise InputError(f"a LoRA rank must be >= 1, got {r}")
        g = torch.Generator().manual_seed(seed)
        found = {}
        for name, mod in hf_model.named_modules():
            if name.rsplit(".", 1)[-1] not in targets or not _is_linear(mod):
                continue
            if layers is not None:
                m = re.search(r"\.(\d+)\.", name)
                if m is None or int(m.group(1)) not in layers:
                    continue
            out_f, in_f = _shape(mod)
            bound = math.sqrt(6 / ((1 + 5) * in_f))  # kaiming_uniform_(a=sqrt(5)), PEFT's default for A
            A = (torch.rand(r, in_f, generator=g) * 2 - 1) * bound
            found[name] = (A, torch.zeros(out_f, r), alpha / r)
        if not found:
            raise InputError(f"no linear module of the model ends in {list(targets)}" +
                             (f" in layers {layers}" if layers is not None else ""))
        return cls(found, {"lora_alpha": alpha, "r": r})

    # ------------------------------------------------------------------ attaching
    def check_fits(self, hf_model: nn.Module, base_name: str = "") -> None:
        """A clear error unless every adapted module exists in ``hf_model`` as a linear layer of the right shape."""
        modules = dict(hf_model.named_modules())
        for n in self.names:
            mod = modules.get(n)
            if mod is None or not _is_linear(mod):
                near = [m for m in modules if m.endswith(n.rsplit(".", 1)[-1])][:2]
                how = "has not" if mod is None else "has, but not as a linear layer"
                raise InputError(f"the adapter{' ' + repr(self.source) if self.source else ''} adapts {n}, which "
                                 f"{base_name or 'the base model'} {how}"
                                 f"{' (it has ' + ', '.join(near) + ')' if near else ''}: the adapter was trained on "
                                 "another base model")
            out_f, in_f = _shape(mod)
            A, B = self.layer(n).A, self.layer(n).B
            if A.shape[1] != in_f or B.shape[0] != out_f:
                raise InputError(f"the adapter's {n} maps {A.shape[1]} -> {B.shape[0]} features, but "
                                 f"{base_name or 'the base model'}'s maps {in_f} -> {out_f}: the adapter was trained "
                                 "on another base model")

    def attach(self, hf_model: nn.Module, base_name: str = "") -> "LoraAdapter":
        """Hook the adapter into ``hf_model`` (checked first); :meth:`detach` removes it."""
        self.check_fits(hf_model, base_name)
        self.detach()
        modules = dict(hf_model.named_modules())
        for n in self.names:
            self._handles.append(modules[n].register_forward_hook(self._hook(self.layer(n)), prepend=True))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def _hook(self, layer: _Layer):
        def add(module, args, out):
            if not self.enabled:
                return None
            x = args[0]
            A, B = layer.A.to(x.device), layer.B.to(x.device)
            return out + ((x.to(A.dtype) @ A.T) @ B.T * layer.scale).to(out.dtype)
        return add

    @contextmanager
    def switched(self, on: bool) -> Iterator["LoraAdapter"]:
        """The adapter on (``True``) or off for the duration of a ``with`` block."""
        before, self.enabled = self.enabled, bool(on)
        try:
            yield self
        finally:
            self.enabled = before

    # ------------------------------------------------------------------ what it changed
    @torch.no_grad()
    def delta(self, name: str) -> torch.Tensor:
        """``[out, in]``: ``ΔW = s B A`` of module ``name`` (what merging the adapter would add to its weight)."""
        layer = self.layer(name)
        return (layer.B.float() @ layer.A.float()) * layer.scale

    def __repr__(self) -> str:
        ranks = sorted({self.layer(n).A.shape[0] for n in self.names})
        return (f"LoraAdapter({len(self.names)} modules, rank {ranks[0] if len(ranks) == 1 else ranks}"
                f"{', from ' + self.source if self.source else ''}, {'on' if self.enabled else 'off'})")


def _is_linear(mod: nn.Module) -> bool:
    return isinstance(mod, nn.Linear) or type(mod).__name__ == "Conv1D"  # GPT-2's Conv1D: weight [in, out]


def _shape(mod: nn.Module) -> tuple[int, int]:
    """``(out, in)`` features of a linear module."""
    if isinstance(mod, nn.Linear):
        return mod.out_features, mod.in_features
    return mod.weight.shape[1], mod.weight.shape[0]
