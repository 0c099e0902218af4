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

import functools
import os
import platform
import time
from dataclasses import dataclass, field

import torch

from .core.config import describe, hook_names_from_config
from .core.errors import InputError
from .core.hookpoints import numel
from .core.model import HookedModel
from .core.result import Result
from .core.types import NameFilter
from .sizes import active_param_count, closest, known_config, known_models, param_count

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
    bf16_speed: float = float("nan")  # matmul throughput relative to float32, measured on this device
    fp16_speed: float = float("nan")
    cpu_capability: str = ""
    extra: dict = field(default_factory=dict)

    def _dtype_line(self, name: str, supported: bool, speed: float) -> str:
        if not supported:
            return f"{name} no"
        verdict = "fast" if speed >= 1.2 else "about as fast" if speed >= 0.8 else "SLOWER"
        return f"{name} yes, {speed:.2g}x float32 speed ({verdict}; a linear layer, measured)"

    def summary(self) -> str:
        lines = [
            f"device        {self.device} ({self.device_name})",
            f"memory        {self.free_memory / GiB:.1f} GiB free of {self.total_memory / GiB:.1f} GiB",
            f"cpu cores     {self.cpu_count}" + (f", {self.cpu_capability} kernels" if self.cpu_capability else ""),
            f"dtypes        float32 yes; {self._dtype_line('bfloat16', self.bf16_supported, self.bf16_speed)}; "
            f"{self._dtype_line('float16', self.fp16_supported, self.fp16_speed)}",
        ]
        if self.bf16_supported and self.bf16_speed < 0.8:
            lines.append("              bfloat16 halves the weights' memory here but computes slower than float32: "
                         "use it to fit a model, not for speed")
        lines.append(f"versions      torch {self.torch_version}, transformers {self.transformers_version}, "
                     f"python {self.python}")
        return "\n".join(lines)


@functools.cache
def dtype_speed(device: str, dtype: torch.dtype, tokens: int = 256, d: int = 1024) -> float:
    """Throughput of a linear layer in ``dtype`` relative to float32 on ``device``, measured here.

    ``tokens x d`` inputs through a ``d x d`` weight (``F.linear``, the op a transformer's layers run),
    best of 3. On CPUs without bf16 instructions (AVX2 only) torch falls back to slow kernels.
    """
    def best(dt):
        a = torch.randn(tokens, d, device=device).to(dt)
        b = torch.randn(d, d, device=device).to(dt)
        times = []
        for _ in range(4):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t = time.perf_counter()
            torch.nn.functional.linear(a, b)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        return min(times[1:])

    return best(torch.float32) / max(best(dtype), 1e-9)


def peak_rss() -> int:
    """This process's peak resident memory in bytes since it started.

    On Linux, ``VmHWM`` from ``/proc/self/status``: the high-water mark of this process's own address space.
    ``getrusage(...).ru_maxrss`` is not that: Linux carries it across ``fork``/``vfork`` + ``exec``, so a
    subprocess started by a process that once held 5 GB reports a 5 GB peak before doing anything
    (measured here: a child of a 3 GB parent reads 3.03 GB from ``ru_maxrss``, 8.8 MB from ``VmHWM``).
    Elsewhere, ``ru_maxrss`` (bytes on macOS, KiB otherwise).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    import sys

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


def free_memory(device: torch.device | str | None = None) -> int:
    """Bytes free on ``device``: ``torch.cuda.mem_get_info`` on CUDA, available system memory (psutil) elsewhere."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        return int(torch.cuda.mem_get_info(dev)[0])
    import psutil

    return int(psutil.virtual_memory().available)


def env() -> EnvReport:
    """Detect the device (CUDA, then MPS, then CPU) and its total and free memory."""
    import transformers

    capability = ""
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
        else:  # torch computes both on any CPU; how fast depends on AVX512-BF16/AMX (measured below)
            dev, name, bf16, fp16 = "cpu", platform.processor() or platform.machine(), True, True
            capability = torch.backends.cpu.get_cpu_capability()
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
        bf16_speed=dtype_speed(dev, torch.bfloat16) if bf16 else float("nan"),
        fp16_speed=dtype_speed(dev, torch.float16) if fp16 else float("nan"),
        cpu_capability=capability,
    )


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
    n_active: int = 0  # parameters one token uses (a mixture of experts); 0 when dense
    sae_width: int = 0
    sae_batch: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.activations + self.cache + self.sae_training

    @property
    def fits(self) -> bool:
        return self.total <= 0.9 * self.available

    def summary(self) -> str:
        def g(x):
            return f"{x / GiB:8.3f} GiB"

        moe = (f" (a mixture of experts: {self.n_active / 1e6:.1f} M active per token; the weights hold all of "
               "them)") if self.n_active and self.n_active != self.n_params else ""
        lines = [
            f"parameters    {self.n_params / 1e6:.1f} M in {self.dtype}{moe}",
            f"weights       {g(self.weights)}",
            f"activations   {g(self.activations)}   (batch {self.batch} x {self.seq_len} tokens, no grad)",
            f"cache         {g(self.cache)}",
        ]
        if self.sae_training:
            lines.append(f"SAE training  {g(self.sae_training)}   (the SAE alone: width {self.sae_width} in fp32, its "
                         f"gradients, two Adam moments, and a batch of {self.sae_batch} activations)")
        lines += [
            f"total         {g(self.total)}   (= {self.total / 1e9:.1f} GB, the GPU table's unit) of "
            f"{g(self.available)} available on {self.device}: {'fits' if self.fits else 'DOES NOT FIT'}"
            + ("  (weights + activations + cache + the SAE: the GPU table's SAE row is this total, per dtype)"
               if self.sae_training else ""),
            f"largest batch {self.max_batch} at this sequence length",
        ]
        lines += [f"advice        {a}" for a in self.advice]
        return "\n".join(lines)

    def _dict_extra(self) -> dict:
        return {"total": self.total, "fits": self.fits}


def _dims_of(model_or_config) -> tuple[dict, list[str], int]:
    """``(sizes, hook names, exact parameter count)`` of a HookedModel, an HF config or a model name."""
    if isinstance(model_or_config, HookedModel):
        n_params = sum(p.numel() for p in model_or_config.hf.parameters())  # (meta tensors know their size)
        return model_or_config.cfg.to_dict(), model_or_config.hook_names, n_params
    config = config_for(model_or_config) if isinstance(model_or_config, str) else model_or_config
    return describe(config).to_dict(), hook_names_from_config(config), param_count(config)


def config_for(name: str) -> "PretrainedConfig":  # noqa: F821
    """An HF config for a model name or path, without loading weights.

    GGUF files are read from their metadata. A hub id is read from the local HF cache when it is
    there; else from the offline size table (:mod:`mechscope.sizes`), which answers at once with no
    network; else from the hub.
    """
    from pathlib import Path

    from transformers import AutoConfig

    from .loading import ModelNotFoundError, converted_gguf_dir, resolve

    kind, where = resolve(name)
    if kind == "gguf":
        done = converted_gguf_dir(Path(where))
        if (done / "config.json").exists():
            return AutoConfig.from_pretrained(str(done))
        return AutoConfig.from_pretrained(str(Path(where).parent), gguf_file=Path(where).name)
    if kind == "dir":
        return AutoConfig.from_pretrained(str(where))
    try:
        return AutoConfig.from_pretrained(str(where), local_files_only=True)
    except OSError:
        pass
    known = known_config(name)
    if known is not None:
        return known
    try:
        return AutoConfig.from_pretrained(str(where))
    except OSError as e:
        raise ModelNotFoundError(
            f"{name!r} is not in the Hugging Face cache, the hub cannot be reached, and it is not one of the "
            f"{len(known_models())} models in mechscope's offline size table (closest: {', '.join(closest(name))}; "
            f"mechscope.sizes.known_models() lists them all)") from e


def forward_bytes(dims: dict, rows: int, seq: int, elt: int, logit_positions: int | None = None) -> int:
    """Peak activation bytes of one no-grad forward pass over ``rows`` sequences of ``seq`` tokens.

    ``rows x logit_positions x d_vocab`` logits in fp32 (``logit_positions`` defaults to ``seq``), one
    layer's transients (residual copies, norms, q/k/v/o and the MLP hidden: ``6 d_model + 3 d_mlp``
    per token) and one layer's attention scores (``heads x seq^2``), each in the model's dtype.
    """
    m, f, h, V = dims["d_model"], dims["d_mlp"], dims["n_heads"], dims["d_vocab"]
    logits = rows * (seq if logit_positions is None else logit_positions) * V * 4
    return logits + rows * seq * (6 * m + 3 * f) * elt + rows * h * seq * seq * elt


def patching_bytes(dims: dict, rows: int, seq: int, elt: int, all_logits: bool = False) -> int:
    """Peak bytes of one batched pass of the patching engine (:mod:`mechscope.techniques.patching`) over
    ``rows`` patched sequences of ``seq`` tokens: the forward pass (last-position logits unless
    ``all_logits``) plus the reused key/value prefix, ``layers x seq x 2 n_kv_heads d_head`` per row."""
    kv = dims["n_layers"] * seq * 2 * dims["n_kv_heads"] * dims["d_head"] * elt
    return forward_bytes(dims, rows, seq, elt, None if all_logits else 1) + rows * kv


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
    patch_rows: int | None = None,
    available: int | None = None,
    device: str | None = None,
) -> MemoryEstimate:
    """Estimate the memory of a run before it happens, and advise.

    ``model_or_config``: a HookedModel, an HF config, or a model name/path (read without weights;
    hub ids are answered offline from :mod:`mechscope.sizes` when they are not in the HF cache).
    ``batch=0`` estimates the weights alone (a load). ``cache_names``: ``None`` (no cache),
    ``"all"`` (what ``run_with_cache`` records by default), a list of hook names, or a predicate.
    ``patch_rows``: a patching sweep passing that many patched prompts per forward pass (instead
    of ``batch`` plain sequences). ``available`` defaults to the free memory reported by :func:`env`.
    """
    dims, names, n_params = _dims_of(model_or_config)
    dtype, cache_dtype = (_dtype_name(x) for x in (dtype, cache_dtype or dtype))
    nbytes, cbytes = _DTYPE_BYTES[dtype], _DTYPE_BYTES[cache_dtype]
    weights = n_params * nbytes
    sel = _select(names, cache_names)

    def acts_for(b: int) -> int:
        if patch_rows:
            return patching_bytes(dims, patch_rows, seq_len, nbytes) + forward_bytes(dims, b, seq_len, nbytes)
        return forward_bytes(dims, b, seq_len, nbytes)

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
    n_active = 0
    if dims.get("n_experts"):
        hf_config = model_or_config.hf.config if isinstance(model_or_config, HookedModel) else (
            config_for(model_or_config) if isinstance(model_or_config, str) else model_or_config)
        n_active = active_param_count(hf_config)
    est = MemoryEstimate(
        n_params=n_params, dtype=dtype, batch=batch, seq_len=seq_len, weights=weights, activations=acts_for(batch),
        cache=cache_for(batch), sae_training=sae, available=int(available), device=device, advice=[],
        max_batch=max_batch, n_active=n_active, sae_width=int(sae_width or 0), sae_batch=sae_batch if sae_width else 0,
    )
    est.advice = _advise(est, n_params)
    return est


def _advise(est: MemoryEstimate, n_params: int) -> list[str]:
    advice = []
    if est.fits:
        advice.append(f"fits: batch up to {est.max_batch} at {est.seq_len} tokens")
    elif est.max_batch >= 1:
        advice.append(f"reduce the batch to {est.max_batch} or less, or cache fewer hook points "
                      f"(names_filter, pos_slice, device='cpu')")
    elif est.weights <= 0.9 * est.available:
        advice.append("even one sequence does not fit beside the weights" +
                      (" and the SAE (train a narrower SAE, or harvest to disk first)" if est.sae_training else "") +
                      ": shorten the sequences or use a larger device (see the GPU table: mechscope estimate)")
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


#: GPU memory classes a researcher rents (GB as sold): T4/V100-16, A10/L4/4090, A100-40, A6000/L40S, A100/H100, H200
GPU_CLASSES_GB = (16, 24, 40, 48, 80, 141)


@dataclass(repr=False)
class GPUFit(Result):
    """How many GPUs of each memory class a workload needs, per dtype (``rows``: one per workload x dtype).

    Each row holds the workload, its dtype, the bytes it needs (:func:`estimate_memory`) and, per
    class, the number of GPUs: ``ceil(bytes / (usable x class))`` with the layers split by
    ``device_map="auto"``; ``usable`` (0.9) leaves room for the CUDA context and allocator slack.
    """

    model: str
    n_params: int
    seq_len: int
    rows: list[dict]
    classes_gb: tuple[int, ...] = GPU_CLASSES_GB
    usable: float = 0.9

    def summary(self) -> str:
        head = f"{'workload':34} {'dtype':9} {'needs':>11}" + "".join(f" {c:>5}GB" for c in self.classes_gb)
        lines = [f"GPUs needed for {self.model} ({self.n_params / 1e9:.2f} B parameters, {self.seq_len} tokens; "
                 f"{self.usable:.0%} of each card usable; n = cards of that class, split with device_map='auto'):",
                 head]
        for r in self.rows:
            cells = "".join(f" {n:>7}" for n in r["gpus"].values())
            lines.append(f"{r['workload']:34} {r['dtype']:9} {r['bytes'] / 1e9:8.1f} GB{cells}")
        lines.append("(needs = everything the workload holds: weights, activations, cache, and for SAE training the "
                     "SAE's own state; more than 8 cards of a class means more than one node: see docs/scale.md)")
        return "\n".join(lines)


def gpu_fit(model_or_config: object, seq_len: int = 2048, batch: int = 8, sae_width: int | None = None,
            patch_rows: int = 64, dtypes: tuple[str, ...] = ("bfloat16", "float32")) -> GPUFit:
    """Which GPUs a model fits, and how many, for inference, a full cache, a patching sweep and SAE training.

    Workloads: inference (``batch`` sequences of ``seq_len``, no grad), a full activation cache of
    one sequence, a patching sweep (``patch_rows`` patched prompts per pass) and, with
    ``sae_width``, training an SAE of that width on one hook. Answers offline for the models of
    :mod:`mechscope.sizes`.
    """
    if isinstance(model_or_config, str):
        model_or_config = config_for(model_or_config)
    name = getattr(getattr(model_or_config, "cfg", None), "model_name", None) or \
        getattr(model_or_config, "_name_or_path", "") or "model"
    work = [(f"inference (batch {batch})", dict(batch=batch)),
            ("full activation cache (1 sequence)", dict(batch=1, cache_names="all")),
            (f"patching sweep ({patch_rows} rows/pass)", dict(batch=0, patch_rows=patch_rows))]
    if sae_width:  # the same run as estimate_memory(batch=batch, sae_width=...): its total, per dtype
        work.append((f"SAE training (width {sae_width})", dict(batch=batch, sae_width=sae_width)))
    rows, n_params = [], 0
    for dtype in dtypes:
        for label, kw in work:
            est = estimate_memory(model_or_config, dtype=dtype, seq_len=seq_len, available=1, device="gpu", **kw)
            n_params = est.n_params
            gpus = {f"{c}GB": -(-est.total // int(0.9 * c * 1e9)) for c in GPU_CLASSES_GB}
            rows.append({"workload": label, "dtype": dtype, "bytes": est.total, "gpus": gpus})
    return GPUFit(str(name), n_params, seq_len, rows)


def estimate_clt_training(n_layers: int, d_model: int, d_sae: int, tokens: int, decoder_blocks: int,
                          batch: int = 1024, k: int = 32) -> dict:
    """Bytes a cross-layer transcoder's training holds (float32): its parameters (``L`` encoders ``d x F``,
    ``decoder_blocks`` decoders ``F x d``, biases) four times over (weights, gradients, two Adam moments), the
    harvested rows of ``tokens`` tokens (every covered layer's input and output: ``2 L d`` floats a token), and one
    batch's dense pre-activations and sparse decode (``k`` active per token and layer)."""
    params = n_layers * d_model * d_sae + decoder_blocks * d_sae * d_model + n_layers * (d_sae + d_model)
    working = batch * n_layers * d_sae * 4 * 2 + batch * k * n_layers * 16 + batch * 2 * n_layers * d_model * 4 * 3
    return {"params": params, "parameter_bytes": params * 4 * 4, "activations_bytes": tokens * 2 * n_layers * d_model * 4,
            "working_bytes": working}


@dataclass(repr=False)
class ReplacementEstimate(Result):
    """What an attribution graph on a replacement model holds, besides the model: the encoders (in memory), the
    decoders (on disk, read lazily: only the rows of the features a prompt activates), and the graph's working set.

    ``features_per_layer`` None: the size is not known without the files (the estimate says so)."""

    name: str
    kind: str  # "cross_layer_transcoder" or "transcoder_set"
    n_layers: int
    d_model: int
    features_per_layer: int | None
    seq_len: int
    l0_per_layer: int
    max_feature_nodes: int
    batch: int
    disk_bytes_per_value: int = 4
    model_bytes: int = 0

    @property
    def decoder_blocks(self) -> int:
        L = self.n_layers
        return L * (L + 1) // 2 if self.kind == "cross_layer_transcoder" else L

    @property
    def mean_targets(self) -> float:
        return self.decoder_blocks / self.n_layers

    def parts(self) -> dict[str, int] | None:
        F, L, d, P = self.features_per_layer, self.n_layers, self.d_model, self.seq_len
        if F is None:
            return None
        active = min(P * L * self.l0_per_layer, L * F)
        rows = min(active, self.max_feature_nodes) + 10
        sources = active + (L + 1) * P
        return {"encoders": L * d * F * 4 + L * (F + d) * 4,
                "decoders on disk": self.decoder_blocks * F * d * self.disk_bytes_per_value,
                "decoder rows read": int(active * self.mean_targets * d * 4),
                "batch of rows": self.batch * sources * 4 + self.batch * P * d * (L + 1) * 4 * 3,
                "edges (at most)": rows * sources * 12}

    def summary(self) -> str:
        p = self.parts()
        head = (f"{self.name}: {'a cross-layer transcoder' if self.kind == 'cross_layer_transcoder' else 'per-layer transcoders'}"
                f" over {self.n_layers} layers, d_model {self.d_model}")
        if p is None:
            return (f"{head}; its features per layer are not in mechscope's table: load it "
                    "(mechscope graph --transcoders ...) once the files are in the cache to size it")
        lines = [f"{head}, {self.features_per_layer} features per layer ({self.decoder_blocks} decoder blocks)",
                 f"  encoders in memory      {p['encoders'] / GiB:8.2f} GiB (float32)",
                 f"  decoders on disk        {p['decoders on disk'] / GiB:8.2f} GiB (read lazily: never all in memory)",
                 f"  a graph of {self.seq_len} tokens with about {self.l0_per_layer} active features per layer and token "
                 f"({min(self.seq_len * self.n_layers * self.l0_per_layer, self.n_layers * self.features_per_layer)} "
                 "active):",
                 f"    decoder rows read     {p['decoder rows read'] / GiB:8.2f} GiB",
                 f"    one batch of {self.batch} rows  {p['batch of rows'] / GiB:8.2f} GiB (dense rows, gradients at every "
                 "write site)",
                 f"    edges, at most        {p['edges (at most)'] / GiB:8.2f} GiB ({self.max_feature_nodes} feature rows, "
                 "12 bytes an edge; most graphs hold far fewer)",
                 f"  total beside the model  {self.total() / GiB:8.2f} GiB; with the model's weights "
                 f"{(self.total() + self.model_bytes) / GiB:.2f} GiB"]
        return "\n".join(lines)

    def total(self) -> int:
        p = self.parts() or {}
        return sum(v for k, v in p.items() if k != "decoders on disk")

    def _dict_extra(self) -> dict:
        return {"parts_bytes": self.parts(), "total_bytes": self.total() if self.parts() else None}


def estimate_replacement(name: str, kind: str, n_layers: int, d_model: int, features_per_layer: int | None,
                         seq_len: int = 64, l0_per_layer: int = 32, max_feature_nodes: int = 7500, batch: int = 128,
                         disk_bytes_per_value: int = 4, model_bytes: int = 0) -> ReplacementEstimate:
    """:class:`ReplacementEstimate` of an attribution graph on a replacement of these sizes (a published one's come
    from mechscope's table: ``mechscope estimate --model ... --transcoders NAME``)."""
    return ReplacementEstimate(name, kind, n_layers, d_model, features_per_layer, seq_len, l0_per_layer,
                               max_feature_nodes, batch, disk_bytes_per_value, model_bytes)


@dataclass(repr=False)
class PairEstimate(Result):
    """What diffing a model pair holds: the weights (two models, or one model and an adapter's factors, which are
    switched on and off on the same weights), one forward pass of each model for the activation methods, and, with a
    crosscoder, its training (parameters four times over: weights, gradients, two Adam moments) and its paired rows."""

    base: MemoryEstimate
    two_models: bool
    adapter_bytes: int
    crosscoder_width: int = 0
    crosscoder_hooks: int = 1
    crosscoder_tokens: int = 0
    crosscoder_d_model: int = 0

    def parts(self) -> dict[str, int]:
        b, d = self.base, self.crosscoder_d_model
        p = {"weights": b.weights * (2 if self.two_models else 1) + self.adapter_bytes,
             "one forward pass (either model)": b.activations}
        if self.crosscoder_width:
            S, F = 2 * self.crosscoder_hooks, self.crosscoder_width
            params = 2 * S * d * F + F + S * d
            p["crosscoder training (float32, Adam)"] = params * 4 * 4
            p["paired rows"] = self.crosscoder_tokens * S * d * 4
        return p

    @property
    def total(self) -> int:
        return sum(self.parts().values())

    def summary(self) -> str:
        how = "two models" if self.two_models else f"one model plus an adapter ({self.adapter_bytes / 2**20:.1f} MiB)"
        lines = [f"model pair ({how}), {self.base.dtype}, batch {self.base.batch} x {self.base.seq_len} tokens:"]
        lines += [f"  {k:<38} {v / GiB:8.3f} GiB" for k, v in self.parts().items()]
        lines.append(f"  {'total':<38} {self.total / GiB:8.3f} GiB of {self.base.available / GiB:.1f} GiB free on "
                     f"{self.base.device}: {'fits' if self.total <= 0.9 * self.base.available else 'does NOT fit'}")
        if not self.two_models:
            lines.append("  (an adapter pair holds one copy of the weights: the fine-tune is the base plus the adapter)")
        return "\n".join(lines)

    def _dict_extra(self) -> dict:
        return {"parts_bytes": self.parts(), "total_bytes": self.total}


def estimate_pair(model_or_config: object, adapter_bytes: int = 0, two_models: bool = True,
                  dtype: str | torch.dtype = "float32", batch: int = 8, seq_len: int = 64, crosscoder_width: int = 0,
                  crosscoder_hooks: int = 1, crosscoder_tokens: int = 0) -> PairEstimate:
    """:class:`PairEstimate` for diffing the base model ``model_or_config`` against a fine-tune held as its own model
    (``two_models``) or as an adapter of ``adapter_bytes``."""
    base = estimate_memory(model_or_config, dtype=dtype, batch=batch, seq_len=seq_len)
    dims, _, _ = _dims_of(model_or_config)
    return PairEstimate(base, two_models, int(adapter_bytes), int(crosscoder_width), int(crosscoder_hooks),
                        int(crosscoder_tokens), int(dims["d_model"]))
