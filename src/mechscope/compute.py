"""Compute awareness: what this machine has, and what a model run will need, before loading it.

``estimate_memory`` is arithmetic on the config (bytes = element count x element size):

- weights: embedding (+ untied unembedding, + learned positions) + per layer
  ``attention (2 d_model n_heads d_head + 2 d_model n_kv_heads d_head) + MLP ((3 if gated else 2) d_model d_mlp)``;
- forward activations (no grad): the logits ``batch x pos x d_vocab`` in fp32, plus one layer's
  transients (residual copies, MLP hidden, and the attention pattern if eager);
- the activation cache: the sum of the recorded hook shapes (:func:`mechscope.core.hookpoints.numel`);
- SAE training (optional): parameters, gradients and two Adam moments in fp32, plus one batch's
  latents.

The bench ``bench/bench_memory.py`` compares the estimate with the measured peak.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field

import torch

from .core.errors import InputError
from .core.families import dims_from_config, hook_names_from_config
from .core.hookpoints import numel
from .core.model import HookedModel
from .core.result import Result
from .core.types import NameFilter

GiB = 1024**3
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


@dataclass(repr=False)
class EnvReport(Result):
    """The device mechscope will use, its memory, and what dtypes it handles well."""

    device: str
    device_name: str
    total_memory: int
    free_memory: int
    cpu_count: int
    bf16_supported: bool
    fp16_supported: bool
    torch_version: str
    transformers_version: str
    python: str
    extra: dict = field(default_factory=dict)

    def summary(self) -> str:
        lines = [
            f"device        {self.device} ({self.device_name})",
            f"memory        {self.free_memory / GiB:.1f} GiB free of {self.total_memory / GiB:.1f} GiB",
            f"cpu cores     {self.cpu_count}",
            f"dtypes        float32 yes, bfloat16 {'yes' if self.bf16_supported else 'slow/no'}, "
            f"float16 {'yes' if self.fp16_supported else 'slow/no'}",
            f"versions      torch {self.torch_version}, transformers {self.transformers_version}, python {self.python}",
        ]
        return "\n".join(lines)


def env() -> EnvReport:
    """Detect the device (CUDA, then MPS, then CPU) and its total and free memory."""
    import transformers

    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        dev, name = "cuda", torch.cuda.get_device_name()
        bf16, fp16 = torch.cuda.is_bf16_supported(), True
    else:
        import psutil

        vm = psutil.virtual_memory()
        free, total = vm.available, vm.total
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            dev, name, bf16, fp16 = "mps", "Apple GPU (unified memory)", True, True
        else:
            dev, name, bf16, fp16 = "cpu", platform.processor() or platform.machine(), False, False
    return EnvReport(
        device=dev,
        device_name=name,
        total_memory=int(total),
        free_memory=int(free),
        cpu_count=os.cpu_count() or 1,
        bf16_supported=bf16,
        fp16_supported=fp16,
        torch_version=torch.__version__,
        transformers_version=transformers.__version__,
        python=platform.python_version(),
    )


def count_params(dims: dict) -> int:
    """Parameter count from :func:`mechscope.core.families.dims_from_config` (biases and norms included roughly)."""
    m, h, kv, d, f, V = (dims[k] for k in ("d_model", "n_heads", "n_kv_heads", "d_head", "d_mlp", "d_vocab"))
    attn = m * h * d * 2 + m * kv * d * 2
    mlp = m * f * (3 if dims["gated_mlp"] else 2)
    norms = m * (4 if dims["post_norms"] else 2)
    per_layer = attn + mlp + norms
    total = dims["n_layers"] * per_layer + V * m + m
    if not dims["tied_embeddings"]:
        total += V * m
    if dims["learned_pos"]:
        total += dims["n_ctx"] * m
    return total


@dataclass(repr=False)
class MemoryEstimate(Result):
    """Bytes needed for a run, and advice on dtype, batch size and device placement."""

    n_params: int
    dtype: str
    batch: int
    seq_len: int
    weights: int
    activations: int
    cache: int
    sae_training: int
    available: int
    device: str
    advice: list[str]
    max_batch: int

    @property
    def total(self) -> int:
        return self.weights + self.activations + self.cache + self.sae_training

    @property
    def fits(self) -> bool:
        return self.total <= 0.9 * self.available

    def summary(self) -> str:
        def g(x):
            return f"{x / GiB:8.3f} GiB"

        lines = [
            f"parameters    {self.n_params / 1e6:.1f} M in {self.dtype}",
            f"weights       {g(self.weights)}",
            f"activations   {g(self.activations)}   (batch {self.batch} x {self.seq_len} tokens, no grad)",
            f"cache         {g(self.cache)}",
        ]
        if self.sae_training:
            lines.append(f"SAE training  {g(self.sae_training)}")
        lines += [
            f"total         {g(self.total)}   of {g(self.available)} available on {self.device}: "
            f"{'fits' if self.fits else 'DOES NOT FIT'}",
            f"largest batch {self.max_batch} at this sequence length",
        ]
        lines += [f"advice        {a}" for a in self.advice]
        return "\n".join(lines)

    def _dict_extra(self) -> dict:
        return {"total": self.total, "fits": self.fits}


def _dims_of(model_or_config) -> tuple[dict, list[str]]:
    if isinstance(model_or_config, HookedModel):
        c = model_or_config.cfg
        dims = dims_from_config(model_or_config.hf.config)
        dims.update(n_layers=c.n_layers, d_vocab=c.d_vocab, tied_embeddings=c.tied_embeddings)
        return dims, model_or_config.hook_names
    config = config_for(model_or_config) if isinstance(model_or_config, str) else model_or_config
    return dims_from_config(config), hook_names_from_config(config)


def config_for(name: str) -> "PretrainedConfig":  # noqa: F821
    """An HF config for a model name or path, without loading weights (GGUF: read from its metadata)."""
    from pathlib import Path

    from transformers import AutoConfig

    from .loading import converted_gguf_dir, resolve

    kind, where = resolve(name)
    if kind == "gguf":
        done = converted_gguf_dir(Path(where))
        if (done / "config.json").exists():
            return AutoConfig.from_pretrained(str(done))
        return AutoConfig.from_pretrained(str(Path(where).parent), gguf_file=Path(where).name)
    return AutoConfig.from_pretrained(str(where))


def _dtype_name(dtype) -> str:
    name = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(str(dtype), str(dtype).replace("torch.", ""))
    if name not in _DTYPE_BYTES:
        raise InputError(f"unsupported dtype {dtype!r}; use one of {', '.join(_DTYPE_BYTES)}")
    return name


def _select(names: list[str], cache_names) -> list[str]:
    if cache_names is None:
        return []
    if cache_names == "all":
        return [n for n in names if not n.endswith("hook_result")]
    if callable(cache_names):
        return [n for n in names if cache_names(n)]
    if isinstance(cache_names, str):
        cache_names = [cache_names]
    return [n for n in names if n in set(cache_names)]


def estimate_memory(
    model_or_config: object,
    dtype: str | torch.dtype = "float32",
    batch: int = 1,
    seq_len: int = 128,
    cache_names: NameFilter | None = None,
    cache_dtype: str | torch.dtype | None = None,
    sae_width: int | None = None,
    sae_batch: int = 4096,
    available: int | None = None,
    device: str | None = None,
) -> MemoryEstimate:
    """Estimate the memory of a run before it happens, and advise.

    ``model_or_config``: a HookedModel, an HF config, or a model name/path (read without weights).
    ``cache_names``: ``None`` (no cache), ``"all"`` (what ``run_with_cache`` records by default), a
    list of hook names, or a predicate. ``available`` defaults to the free memory reported by
    :func:`env`.
    """
    dims, names = _dims_of(model_or_config)
    dtype, cache_dtype = (_dtype_name(x) for x in (dtype, cache_dtype or dtype))
    nbytes, cbytes = _DTYPE_BYTES[dtype], _DTYPE_BYTES[cache_dtype]
    n_params = count_params(dims)
    weights = n_params * nbytes
    sel = _select(names, cache_names)

    def acts_for(b: int) -> int:
        m, f, h, V = dims["d_model"], dims["d_mlp"], dims["n_heads"], dims["d_vocab"]
        logits = b * seq_len * V * 4  # logits are upcast to fp32 by most consumers
        layer = b * seq_len * (6 * m + 3 * f) * nbytes + b * h * seq_len * seq_len * nbytes
        return logits + layer

    def cache_for(b: int) -> int:
        return sum(numel(n, dims, b, seq_len) for n in sel) * cbytes

    sae = 0
    if sae_width:
        m = dims["d_model"]
        sae_params = 2 * m * sae_width + sae_width + m
        sae = sae_params * 4 * 4 + sae_batch * (sae_width * 3 + m * 4) * 4
    if available is None or device is None:
        e = env()
        available = e.free_memory if available is None else available
        device = e.device if device is None else device
    per_batch = acts_for(1) + cache_for(1)
    budget = 0.9 * available - weights - sae
    max_batch = max(0, int(budget // per_batch)) if per_batch else 0
    est = MemoryEstimate(
        n_params=n_params, dtype=dtype, batch=batch, seq_len=seq_len, weights=weights, activations=acts_for(batch),
        cache=cache_for(batch), sae_training=sae, available=int(available), device=device, advice=[],
        max_batch=max_batch,
    )
    est.advice = _advise(est, n_params)
    return est


def _advise(est: MemoryEstimate, n_params: int) -> list[str]:
    advice = []
    if est.fits:
        advice.append(f"fits: batch up to {est.max_batch} at {est.seq_len} tokens")
    elif est.weights <= 0.9 * est.available:
        advice.append(f"reduce the batch to {est.max_batch} or less, or cache fewer hook points "
                      f"(names_filter, pos_slice, device='cpu')")
    if est.dtype == "float32":
        half = n_params * 2
        if not est.fits and half <= 0.9 * est.available:
            advice.append("bfloat16 halves the weights (load(..., dtype='bfloat16')); expect ~1e-2 logit drift")
        else:
            advice.append("float32 keeps HF's numbers exact; use it while it fits")
    if est.weights > 0.9 * est.available:
        advice.append("the weights alone do not fit one device: load(..., device_map='auto') shards across "
                      "devices and offloads the rest to CPU/disk (slower)")
    return advice
