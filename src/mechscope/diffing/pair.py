"""Two models side by side: a base model and its fine-tune, as two models or as one model and a LoRA adapter.

:func:`load_pair` loads and checks them once: the architectures match (same family and sizes), the hook names are
shared, and the tokenizers are compared (a difference is recorded; the methods that read one vocabulary refuse a pair
whose vocabularies differ). With an adapter (a PEFT folder) the fine-tune is the base model's weights plus the
adapter's factors, switched on and off on one copy of the weights (:mod:`.lora`). Every diffing method reads a side
through :meth:`ModelPair.side`, so it never needs to know which kind of pair it has.
"""

from __future__ import annotations

import hashlib
import json
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from ..core.config import ModelConfig
from ..core.errors import InputError, InputTypeError
from ..core.model import HookedModel
from ..core.result import Result
from .lora import LoraAdapter, is_adapter_folder

SIDES = ("base", "ft")
#: the architecture facts two models must share to be diffed hook by hook
SHARED_FACTS = ("family", "n_layers", "d_model", "n_heads", "n_kv_heads", "d_head", "d_mlp", "n_experts")


@dataclass(repr=False)
class ModelPair(Result):
    """A base model and its fine-tune. ``ft`` is the fine-tune's own model, or None when it is ``base`` plus
    ``adapter``. ``same_vocab``: the two tokenizers map every token to the same id (methods that compare next-token
    distributions need it). ``notes``: what loading noticed (vocabulary differences, a renamed base)."""

    base: HookedModel
    ft: HookedModel | None
    adapter: LoraAdapter | None
    base_name: str
    ft_name: str
    same_vocab: bool = True
    notes: list[str] = field(default_factory=list)

    _skip_in_dict = ("base", "ft", "adapter")

    @property
    def shares_weights(self) -> bool:
        """True for a base model plus an adapter (one copy of the weights)."""
        return self.adapter is not None

    @property
    def cfg(self) -> "ModelConfig":
        """The base model's config (the pair shares its sizes)."""
        return self.base.cfg

    @property
    def tokenizer(self) -> "PreTrainedTokenizerBase | None":  # noqa: F821
        return self.base.tokenizer

    @contextmanager
    def side(self, which: str) -> Iterator[HookedModel]:
        """The model of one side (``"base"`` or ``"ft"``) for the duration of a ``with`` block (with an adapter: the one
        model, the adapter switched off or on)."""
        if which not in SIDES:
            raise InputError(f"side must be one of {SIDES}, got {which!r}")
        if self.adapter is None:
            yield self.base if which == "base" else self.ft
            return
        with self.adapter.switched(which == "ft"):
            yield self.base

    def name(self, which: str) -> str:
        return self.base_name if which == "base" else self.ft_name

    def close(self) -> None:
        """Take the adapter's hooks out of the base model (it is the plain base model again); nothing for two models."""
        if self.adapter is not None:
            self.adapter.detach()

    def __enter__(self) -> "ModelPair":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def require_same_vocab(self, method: str) -> None:
        """A clear error when ``method`` compares next-token distributions and the vocabularies differ."""
        if not self.same_vocab:
            raise InputError(f"{method} compares the two models token by token, but their vocabularies differ "
                             f"({'; '.join(self.notes) or 'see load_pair'}); it needs one tokenizer. The methods that "
                             "read activations only (weights, norms, crosscoder) still apply")

    def summary(self) -> str:
        how = "one model and a LoRA adapter (one copy of the weights)" if self.adapter is not None else "two models"
        c = self.base.cfg
        lines = [f"model pair: base {self.base_name} vs fine-tune {self.ft_name}, {how}; {c.family}, {c.n_layers} "
                 f"layers, d_model {c.d_model}; vocabularies {'the same' if self.same_vocab else 'DIFFER'}"]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def _dict_extra(self) -> dict:
        return {"shares_weights": self.shares_weights, "adapter": self.adapter.source if self.adapter else None}


def _norm_name(name: str) -> str:
    """A model name compared across spellings: the last path part, lower case, letters and digits only."""
    return re.sub(r"[^a-z0-9]", "", str(name).rstrip("/").rsplit("/", 1)[-1].lower())


def _load(spec: "str | Path | HookedModel", **kw) -> HookedModel:
    if isinstance(spec, HookedModel):
        return spec
    if not isinstance(spec, (str, Path)):
        raise InputTypeError(f"a model must be a name, a folder or a HookedModel, got {type(spec).__name__}")
    from ..loading import load

    return load(str(spec), **kw)


def compare_vocab(a: HookedModel, b: HookedModel) -> list[str]:
    """Where the two tokenizers differ, in words (empty when every token has the same id in both)."""
    out = []
    if a.cfg.d_vocab != b.cfg.d_vocab:
        out.append(f"the embeddings have {a.cfg.d_vocab} and {b.cfg.d_vocab} rows")
    ta, tb = a.tokenizer, b.tokenizer
    if ta is None or tb is None:
        return out
    va, vb = ta.get_vocab(), tb.get_vocab()
    only_a, only_b = sorted(set(va) - set(vb)), sorted(set(vb) - set(va))
    moved = sorted(t for t in set(va) & set(vb) if va[t] != vb[t])
    if only_a:
        out.append(f"{len(only_a)} token(s) only in the base tokenizer (e.g. {only_a[:3]})")
    if only_b:
        out.append(f"{len(only_b)} token(s) only in the fine-tune's (e.g. {only_b[:3]})")
    if moved:
        out.append(f"{len(moved)} token(s) with different ids (e.g. {moved[0]!r}: {va[moved[0]]} vs {vb[moved[0]]})")
    return out


def check_architectures(a: HookedModel, b: HookedModel, names: tuple[str, str]) -> None:
    """A clear error unless ``a`` and ``b`` share the facts hook-by-hook diffing needs (:data:`SHARED_FACTS`) and
    their hook names."""
    ca, cb = a.cfg, b.cfg
    if ca.d_model != cb.d_model:
        raise InputError(f"{names[0]} has d_model {ca.d_model} and {names[1]} has {cb.d_model}: a base model and its "
                         "fine-tune share their widths; these are different models")
    diffs = [f"{k}: {getattr(ca, k)} vs {getattr(cb, k)}" for k in SHARED_FACTS if getattr(ca, k) != getattr(cb, k)]
    if diffs:
        raise InputError(f"{names[0]} and {names[1]} have different architectures ({'; '.join(diffs)}); diffing "
                         "compares the same hook in both, so they must share one")
    ha, hb = set(a.hook_names), set(b.hook_names)
    if ha != hb:
        raise InputError(f"{names[0]} and {names[1]} do not share their hook names (only in the first: "
                         f"{sorted(ha - hb)[:3]}; only in the second: {sorted(hb - ha)[:3]})")


def load_pair(base: "str | Path | HookedModel", finetuned: "str | Path | HookedModel | None" = None, *,
              adapter: "str | Path | LoraAdapter | None" = None, device: "str | None" = None,
              dtype: "str | None" = None, device_map: "str | dict | None" = None,
              ft_device_map: "str | dict | None" = None, check_base: bool = True) -> ModelPair:
    """Load a base model and its fine-tune as a :class:`ModelPair`.

    ``base``: a model name, folder or :class:`~mechscope.core.model.HookedModel`. ``finetuned``: the same for the
    fine-tune, or a PEFT LoRA adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``), which may also
    be given as ``adapter``. ``device_map`` / ``ft_device_map``: each model's own placement (two models only).
    Refused with a clear message: a d_model or architecture mismatch, hook names that are not shared, an adapter whose
    modules or shapes do not fit the base, or an adapter recorded as trained on another base model (``check_base=False``
    accepts one whose base is the same model under another name)."""
    if finetuned is not None and adapter is not None:
        raise InputError("give the fine-tune as a model (finetuned=) or as an adapter (adapter=), not both")
    if finetuned is None and adapter is None:
        raise InputError("load_pair needs the fine-tune: a model name or folder, or a PEFT adapter folder")
    if isinstance(finetuned, (str, Path)) and is_adapter_folder(finetuned):
        finetuned, adapter = None, finetuned
    base_m = _load(base, device=device, dtype=dtype, device_map=device_map)
    base_name = (base_m.cfg.model_name if isinstance(base, HookedModel) else str(base)) or "the base model"
    if adapter is not None:
        if ft_device_map is not None:
            raise InputError("ft_device_map is for a fine-tune held as its own model; an adapter runs on the base "
                             "model's placement")
        lora = adapter if isinstance(adapter, LoraAdapter) else LoraAdapter.read(adapter)
        trained_on = str(lora.config.get("base_model_name_or_path") or "")
        notes = []
        known = [_norm_name(x) for x in (base_name, base_m.cfg.model_name) if x and x not in ("?", "the base model")]
        if trained_on and known and _norm_name(trained_on) not in known:
            if check_base:
                raise InputError(f"the adapter {lora.source or ''} was trained on {trained_on!r}, and the base model is "
                                 f"{base_name!r}; load it on its own base model, or pass check_base=False "
                                 "(--no-check-base) if this is the same model under another name")
            notes.append(f"the adapter records its base as {trained_on!r}; the base loaded is {base_name!r} "
                         "(check_base=False)")
        lora.attach(base_m.hf, base_name)
        ft_name = f"{base_name} + adapter {Path(lora.source).name if lora.source else '(in memory)'}"
        return ModelPair(base_m, None, lora, base_name, ft_name, True, notes)
    ft_m = _load(finetuned, device=device, dtype=dtype, device_map=ft_device_map)
    ft_name = (ft_m.cfg.model_name if isinstance(finetuned, HookedModel) else str(finetuned)) or "the fine-tune"
    check_architectures(base_m, ft_m, (base_name, ft_name))
    notes = compare_vocab(base_m, ft_m)
    return ModelPair(base_m, ft_m, None, base_name, ft_name, not notes, notes)


@torch.no_grad()
def fingerprint(pair: ModelPair) -> str:
    """A content key of the pair: both names and configs, a sum of every weight of each model (a fine-tune may change
    only some layers), and the adapter's factors."""
    h = hashlib.sha256(json.dumps([pair.base.cfg.to_dict(), pair.base_name, pair.ft_name], sort_keys=True,
                                  default=str).encode())
    models = [pair.base] + ([pair.ft] if pair.ft is not None else [])
    for m in models:
        for p in m.hf.parameters():
            if p.device.type != "meta":
                h.update(f"{float(p.float().sum()):.8e}".encode())
    if pair.adapter is not None:
        for n in pair.adapter.names:
            layer = pair.adapter.layer(n)
            h.update(f"{n}:{float(layer.A.sum()):.8e}:{float(layer.B.sum()):.8e}:{layer.scale}".encode())
    return h.hexdigest()[:16]
