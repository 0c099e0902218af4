"""Replacement models: what an attribution graph reads in place of the MLPs, and the files the field publishes them in.

A replacement is a :class:`~mechscope.sae.transcoders.TranscoderSet` (mechscope's per-layer transcoders) or a
:class:`~mechscope.sae.clt.CrossLayerTranscoder` (a CLT, or with ``reach`` 1 a set of per-layer transcoders read
from published files). Both answer the questions of :class:`Replacement`, in model layers, and nothing in
:mod:`mechscope.graphs` asks anything else.

:func:`load_replacement` reads every layout circuit-tracer 0.5.0 reads (``utils/hf_utils.py``,
``transcoder/cross_layer_transcoder.py``, ``transcoder/single_layer_transcoder.py``), from a local folder, from
``hf://<org>/<repo>[@<revision>][/<folder>]`` through the Hugging Face cache, or by a name of the published
table (:func:`releases`):

- a ``config.yaml`` (``model_kind: transcoder_set | cross_layer_transcoder``, ``feature_input_hook``,
  ``feature_output_hook``, ``model_name``, and ``transcoders:`` as a list of per-layer URIs, or else the
  folder's ``layer_{i}.safetensors``); hooks are TransformerLens names, mapped through
  :data:`mechscope.core.hookpoints.FOREIGN_SITES`;
- circuit-tracer's CLT: ``W_enc_{i}.safetensors`` (``W_enc_{i} [F, d]``, ``b_enc_{i}``, ``b_dec_{i}``,
  ``threshold_{i}``: JumpReLU when present, ReLU when not) and ``W_dec_{i}.safetensors`` (``W_dec_{i}
  [F, L - i, d]``);
- circuit-tracer's per-layer transcoders: ``W_enc [F, d]``, ``W_dec [F, d]``, ``b_enc``, ``b_dec``, an optional
  ``activation_function.threshold`` and ``W_skip [d, d]`` (applied as ``x W_skip^T``);
- Gemma Scope 1 transcoders: ``params.npz`` (``W_enc [d, F]``, ``W_dec [F, d]``, ``b_enc``, ``b_dec``,
  ``threshold``), read with ``allow_pickle=False``;
- Gemma Scope 2: ``params.safetensors`` (``w_enc [d, F]``, ``w_dec [F, d]``, ``b_enc``, ``b_dec``, ``threshold``,
  ``affine_skip_connection [d, d]`` applied as ``x A``, as circuit-tracer reads it), its per-layer CLT files
  (the same with ``w_dec [F, L, d]``, layer ``i`` writing targets ``i..L-1``), and the ``config.json`` beside
  them, whose ``hf_hook_point_in`` / ``_out`` name HF modules (mapped onto the loaded model's own modules);
- mechscope's own folders: the above with a ``mechscope.json`` sidecar (:func:`save_replacement`), and
  ``layer_<L>/`` folders of SAELens-format transcoders (``mechscope transcoders train``).

TransformerLens fires ``ln2.hook_normalized`` before the norm's gain (circuit-tracer loads models with
``fold_ln=False``); a replacement reading it reads mechscope's ``ln2.hook_normalized`` with ``1 / gain`` folded
into its encoder (and skip). Everything is checked before any compute: every layer file present, ``d_model`` and
the layer count against the model, the hooks against the model, decoder shapes against the layers, a dtype the
device runs, and no pickle where safetensors belong. Decoders stay on disk (``lazy_decoder=True``): a graph reads
the rows of the features a prompt activates only.
"""

from __future__ import annotations

import functools
import json
import re
import weakref
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Protocol

import torch

from ..core.errors import InputError, InputTypeError, NotFoundError, UnknownNameError
from ..core.files import (
    atomic_dir,
    read_json,
    read_npz,
    read_safetensors,
    read_text,
    refuse_pickle,
    safetensors_shapes,
)
from ..core.hookpoints import split_name
from ..core.model import HookedModel
from .clt import CLTConfig, CrossLayerTranscoder, DecoderFiles
from .model import SAE
from .sites import Site, fold_site, hf_point_of, resolve_hf_point, resolve_site
from .transcoders import TranscoderSet

SIDECAR = "mechscope.json"


class Replacement(Protocol):
    """What attribution graphs ask of a replacement model (layers are model layers)."""

    layers: list[int]  # the layers with an encoder (features read there)
    output_layers: list[int]  # the layers whose MLP output it predicts

    def input_hook(self, layer: int) -> str: ...
    def output_hook(self, layer: int) -> str: ...
    def targets(self, layer: int) -> list[int]: ...  # the layers a feature of ``layer`` writes to
    def n_features(self, layer: int) -> int: ...
    def encode(self, layer: int, x: torch.Tensor) -> torch.Tensor: ...  # [.., d] -> [.., F]
    def pre_acts_at(self, layer: int, x: torch.Tensor, feats: torch.Tensor) -> torch.Tensor: ...
    def read_directions(self, layer: int, feats: torch.Tensor) -> torch.Tensor: ...  # [m, d]
    def write_directions(self, layer: int, feats: torch.Tensor) -> torch.Tensor: ...  # [m, len(targets), d]
    def decoder_bias(self, layer: int) -> torch.Tensor: ...  # [d]
    def has_skip(self, layer: int) -> bool: ...
    def skip_term(self, layer: int, x: torch.Tensor) -> torch.Tensor | float: ...
    def explanations_of(self, layer: int) -> dict[int, str]: ...
    def layer_view(self, layer: int) -> object: ...  # an SAE, or a CLT layer seen as one
    def describe(self) -> str: ...


def replacement_of(model: HookedModel, transcoders: object) -> "TranscoderSet | CrossLayerTranscoder":
    """``transcoders`` as a replacement checked against ``model``: a :class:`TranscoderSet` or list of transcoder
    SAEs (validated as a set), or a :class:`CrossLayerTranscoder` (its hooks and widths checked once)."""
    if isinstance(transcoders, CrossLayerTranscoder):
        checked = transcoders.__dict__.get("_checked_for")  # a weak reference: never a submodule of the CLT
        if checked is None or checked() is not model:
            transcoders.check_fits(model)
            transcoders.__dict__["_checked_for"] = weakref.ref(model)
        return transcoders
    if isinstance(transcoders, TranscoderSet):
        return transcoders
    if isinstance(transcoders, (list, tuple)) and all(isinstance(t, SAE) for t in transcoders):
        return TranscoderSet(model, transcoders)
    raise InputTypeError(f"transcoders must be a TranscoderSet, a list of transcoder SAEs or a CrossLayerTranscoder "
                         f"(mechscope.sae.load_replacement), got {type(transcoders).__name__}")


# ---------------------------------------------------------------------------------------------------- the table
@functools.cache
def releases() -> dict[str, dict]:
    """The published replacement models mechscope knows by name: ``{name: {uri, model, kind, n_layers, d_model,
    features_per_layer, dtype, source}}`` (``data/replacement_releases.json``)."""
    return json.loads(files("mechscope").joinpath("data/replacement_releases.json").read_text())["releases"]


def release_sizes(name: str) -> dict:
    """A replacement's sizes for :func:`mechscope.compute.estimate_replacement`, before anything is loaded: a published
    name's from the table; a local folder's (or a cached ``hf://`` one's) from its files' headers alone (no tensor is
    read): ``{model, kind, n_layers, d_model, features_per_layer, dtype}``."""
    table = releases()
    if name in table:
        return table[name]
    if str(name).startswith("hf://"):
        from . import hub

        repo, rev, sub = hub.parse_spec(str(name))
        folder = hub.download(repo, sub, rev)
    else:
        folder = Path(name)
    if not folder.is_dir():
        raise UnknownNameError(f"{name!r} is neither a published replacement ({', '.join(sorted(table))}) nor a folder")
    config = read_config_yaml(folder / "config.yaml") if (folder / "config.yaml").exists() else {}
    enc = sorted(folder.glob("W_enc_*.safetensors"))
    if enc:
        F, d = safetensors_shapes(enc[0])["W_enc_0"][0] if "W_enc_0" in safetensors_shapes(enc[0]) else (0, 0)
        dtype = safetensors_shapes(enc[0])["W_enc_0"][1]
        kind, n = "cross_layer_transcoder", len(enc)
    else:
        files_ = _layer_files(folder)
        if not files_:
            raise NotFoundError(f"{folder} holds no replacement files whose sizes mechscope reads")
        first = files_[0]
        shapes = _npz_shapes(first) if first.suffix == ".npz" else safetensors_shapes(first)
        w = shapes.get("W_enc", shapes.get("w_enc"))
        if w is None:
            raise InputError(f"{first} has no encoder (W_enc or w_enc); it has {sorted(shapes)}")
        F, d = (w[0][1], w[0][0]) if "w_enc" in shapes or first.suffix == ".npz" else w[0]
        dec = shapes.get("w_dec")
        kind = "cross_layer_transcoder" if dec is not None and len(dec[0]) == 3 else "transcoder_set"
        dtype, n = w[1], len(files_)
    bytes_per = {"F32": 4, "F64": 8, "F16": 2, "BF16": 2, "float32": 4, "float64": 8, "float16": 2}.get(dtype, 4)
    return {"model": str(config.get("model_name", "")), "kind": kind, "n_layers": n, "d_model": int(d),
            "features_per_layer": int(F), "dtype": {2: "bfloat16", 4: "float32", 8: "float64"}[bytes_per]}


def _npz_shapes(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{name: (shape, dtype)}`` of an ``.npz`` file from its members' headers alone (no array is read)."""
    import zipfile

    import numpy as np

    out = {}
    try:
        with zipfile.ZipFile(path) as z:
            for name in z.namelist():
                with z.open(name) as f:
                    version = np.lib.format.read_magic(f)
                    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                        np.lib.format.read_array_header_2_0
                    shape, _, dtype = read(f)
                out[name.removesuffix(".npy")] = (tuple(shape), str(dtype))
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise NotFoundError(f"{path} is damaged or not an .npz file ({e})") from e
    return out


# ---------------------------------------------------------------------------------------------------- reading
@dataclass
class _Layer:
    """One layer's tensors in mechscope's orientation: ``W_enc [d, F]``, ``W_skip [d, d]`` (applied ``x W_skip``),
    and its decoder: a tensor ``[F, T, d]`` or a file reference ``(path, key, first target)``."""

    W_enc: torch.Tensor
    b_enc: torch.Tensor
    b_dec: torch.Tensor
    threshold: torch.Tensor | None
    W_skip: torch.Tensor | None
    dec: "torch.Tensor | tuple[Path, str, int]"
    dec_shape: tuple[int, ...]
    where: str


def _need(t: dict, keys: tuple[str, ...], path: Path) -> None:
    missing = [k for k in keys if k not in t]
    if missing:
        raise InputError(f"{path} has no {', '.join(map(repr, missing))} (it has {sorted(t)})")


def _floats(t: dict, path: Path) -> None:
    bad = [f"{k} ({v.dtype})" for k, v in t.items() if isinstance(v, torch.Tensor) and not v.is_floating_point()]
    if bad:
        raise InputError(f"{path} holds non-floating tensors where weights belong: {', '.join(bad)}")


def _st_weights(path: Path, skip: tuple[str, ...]) -> tuple[dict, dict]:
    """A safetensors file's tensors except ``skip`` (left on disk, never mapped), and every tensor's ``(shape, dtype)``."""
    from ..core.files import read_rows

    shapes = safetensors_shapes(path, "replacement weights")
    t = {k: read_rows(path, k, list(range(shape[0])), "replacement weights")
         for k, (shape, dt) in shapes.items() if k not in skip and shape and dt in ("F32", "F64", "F16", "BF16")}
    t.update({k: read_safetensors(path, "replacement weights")[k] for k, (shape, _) in shapes.items() if not shape})
    bad = [f"{k} ({dt})" for k, (_, dt) in shapes.items() if dt in ("BOOL", "U8", "I8", "I16", "I32", "I64", "U16",
                                                                      "U32", "U64")]
    if bad:
        raise InputError(f"{path} holds non-floating tensors where weights belong: {', '.join(bad)}")
    return t, shapes


def _read_ct_plt(path: Path, lazy: bool) -> _Layer:
    """circuit-tracer's ``SingleLayerTranscoder`` file (``load_relu_transcoder``)."""
    t, shapes = _st_weights(path, ("W_dec",) if lazy else ())
    _need({**t, **{k: None for k in shapes}}, ("W_enc", "W_dec", "b_enc", "b_dec"), path)
    skip = t.get("W_skip")
    dec = (path, "W_dec", 0) if lazy else t["W_dec"][:, None]
    return _Layer(t["W_enc"].T, t["b_enc"], t["b_dec"], t.get("activation_function.threshold"),
                  None if skip is None else skip.T, dec, shapes["W_dec"][0], str(path))


def _read_gs2(path: Path, lazy: bool, layer_index: int | None = None) -> _Layer:
    """A Gemma Scope 2 ``params.safetensors``: a per-layer transcoder (``w_dec [F, d]``) or a CLT layer
    (``w_dec [F, L, d]``: this layer writes targets ``layer_index..L-1``)."""
    t, shapes = _st_weights(path, ("w_dec",) if lazy else ())
    _need({**t, **{k: None for k in shapes}}, ("w_enc", "w_dec", "b_enc", "b_dec", "threshold"), path)
    shape = shapes["w_dec"][0]
    first = 0 if len(shape) == 2 else (layer_index or 0)
    if lazy:
        dec = (path, "w_dec", first)
    else:
        w = t["w_dec"]
        dec = w[:, None] if w.dim() == 2 else w[:, first:]
    return _Layer(t["w_enc"], t["b_enc"], t["b_dec"], t["threshold"], t.get("affine_skip_connection"), dec, shape,
                  str(path))


def _read_gs1(path: Path) -> _Layer:
    """A Gemma Scope 1 ``params.npz`` transcoder (``load_gemma_scope_transcoder``): decoders in memory."""
    t = read_npz(path)
    _need(t, ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"), path)
    _floats(t, path)
    return _Layer(t["W_enc"], t["b_enc"], t["b_dec"], t["threshold"], None, t["W_dec"][:, None],
                  tuple(t["W_dec"].shape), str(path))


def _read_layer_file(path: Path, lazy: bool, layer_index: int | None = None) -> _Layer:
    """One per-layer file in whichever layout it holds."""
    if path.suffix == ".npz":
        return _read_gs1(path)
    if path.suffix in (".pt", ".pth", ".bin", ".ckpt", ".pkl"):
        refuse_pickle(path, "replacement weights")
        raise InputError(f"{path} is not safetensors or .npz; mechscope reads replacement weights from those only")
    keys = safetensors_shapes(path, "replacement weights")
    return _read_gs2(path, lazy, layer_index) if "w_enc" in keys else _read_ct_plt(path, lazy)


def _read_ct_clt(folder: Path, lazy: bool) -> list[_Layer]:
    """circuit-tracer's CLT layout (``load_clt``): ``W_enc_{i}`` and ``W_dec_{i}`` files for i = 0..L-1."""
    def numbered(kind: str) -> dict[int, Path]:
        return {int(m.group(1)): p for p in folder.glob(f"W_{kind}_*.safetensors")
                if (m := re.fullmatch(rf"W_{kind}_(\d+)\.safetensors", p.name))}

    enc, dec = numbered("enc"), numbered("dec")
    for name in ("pt", "pth", "bin"):
        for p in folder.glob(f"W_*_*.{name}"):
            refuse_pickle(p, "CLT weights")
    n = max(list(enc) + list(dec)) + 1 if enc or dec else 0
    missing = [f"W_enc_{i}.safetensors" for i in range(n) if i not in enc] + \
              [f"W_dec_{i}.safetensors" for i in range(n) if i not in dec]
    if missing:
        raise NotFoundError(f"{folder} is a circuit-tracer CLT of {n} layers but lacks {', '.join(missing[:4])}"
                            + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
                            + "; every layer needs its W_enc_i and W_dec_i file")
    out = []
    for i in range(n):
        t, _ = _st_weights(enc[i], ())
        _need(t, (f"W_enc_{i}", f"b_enc_{i}", f"b_dec_{i}"), enc[i])
        shapes = safetensors_shapes(dec[i], "CLT decoder")
        if f"W_dec_{i}" not in shapes:
            raise InputError(f"{dec[i]} has no 'W_dec_{i}' (it has {sorted(shapes)})")
        shape, dtype = shapes[f"W_dec_{i}"]
        F, d = t[f"W_enc_{i}"].shape
        if shape != (F, n - i, d):
            raise InputError(f"{dec[i]}: W_dec_{i} has shape {shape}; a CLT of {n} layers with {F} features of width "
                             f"{d} needs [{F}, {n - i}, {d}] (layer {i} writes to layers {i}..{n - 1})")
        if dtype in ("BOOL", "I8", "I16", "I32", "I64", "U8"):
            raise InputError(f"{dec[i]}: W_dec_{i} is {dtype}, not a floating type")
        if lazy:
            d_ = (dec[i], f"W_dec_{i}", 0)
        else:
            d_ = read_safetensors(dec[i], "CLT decoder")[f"W_dec_{i}"]
        out.append(_Layer(t[f"W_enc_{i}"].T, t[f"b_enc_{i}"], t[f"b_dec_{i}"], t.get(f"threshold_{i}"),
                          t.get(f"W_skip_{i}"), d_, shape, str(enc[i])))
    return out


def _numbered(paths: list[Path], what: str) -> dict[int, Path]:
    """``{layer: path}`` of files named with ``layer_<L>`` (a missing number is an error naming it)."""
    out = {}
    for p in paths:
        found = re.findall(r"layer_(\d+)", str(p))  # the file's own name or folder: the last one in its path
        if found:
            out[int(found[-1])] = p
    if out:
        gaps = [i for i in range(max(out) + 1) if i not in out]
        if gaps:
            raise NotFoundError(f"{what}: no file for layer(s) {gaps} (files for {sorted(out)}); every layer from 0 "
                                "needs one")
    return out


def _fold_site(layer: _Layer, site: Site) -> None:
    """Fold a TransformerLens site's gain into one layer's tensors (:func:`mechscope.sae.sites.fold_site`), in float32
    whatever the files hold."""
    if site.gain is None:
        return
    skip = layer.W_skip.float() if layer.W_skip is not None else None
    layer.W_enc, layer.b_enc, layer.W_skip, layer.b_dec = fold_site(site, layer.W_enc.float(), layer.b_enc.float(), skip,
                                                                    layer.b_dec.float())


def _check_dtype(dtype: torch.dtype, device: torch.device) -> None:
    """An error when ``device`` cannot multiply matrices of ``dtype``."""
    if not dtype.is_floating_point:
        raise InputError(f"dtype {dtype} is not a floating type; replacement weights are float32, bfloat16 or float16")
    try:
        a = torch.ones(2, 2, dtype=dtype, device=device)
        (a @ a).sum().item()
    except (RuntimeError, TypeError) as e:
        raise InputError(f"{device} cannot run {dtype} matrix products ({e}); load with dtype=torch.float32") from e


def _build(layers: list[_Layer], sites_in: list[Site], sites_out: list[Site], model: HookedModel, reach: int,
           model_name: str, dtype: torch.dtype, what: str, tied: bool = False, k: int | None = None,
           architecture: str | None = None) -> CrossLayerTranscoder:
    """A :class:`CrossLayerTranscoder` from per-layer tensors, every shape checked against ``model``."""
    d = model.cfg.d_model
    n = len(layers)
    for lay, si in zip(layers, sites_in):
        if lay.W_enc.dim() != 2 or lay.W_enc.shape[0] != d:
            raise InputError(f"{lay.where}: the encoder reads width {tuple(lay.W_enc.shape)[0]}, but "
                             f"{model.cfg.model_name or 'the model'} has d_model {d}; load a replacement trained on "
                             "this model")
        if lay.b_dec.shape[-1] != d or lay.dec_shape[-1] != d:
            raise InputError(f"{lay.where}: the decoder writes width {lay.dec_shape[-1]}, the model's d_model is {d}")
        _fold_site(lay, si)
    F = layers[0].W_enc.shape[1]
    if any(lay.W_enc.shape[1] != F for lay in layers):
        raise InputError(f"{what}: the layers have different feature counts ({[lay.W_enc.shape[1] for lay in layers]}); "
                         "mechscope reads replacements with one width per layer")
    has_thr = [lay.threshold is not None for lay in layers]
    if any(has_thr) and not all(has_thr):
        raise InputError(f"{what}: some layers are JumpReLU (a threshold) and some ReLU (none); they must agree")
    arch = architecture or ("jumprelu" if all(has_thr) else "relu")
    if arch == "jumprelu":
        neg = [lay.where for lay in layers if bool((lay.threshold.float() < 0).any())]
        if neg:
            raise InputError(f"{neg[0]} holds negative JumpReLU thresholds; mechscope keeps thresholds >= 0")
    skip = any(lay.W_skip is not None for lay in layers)
    cfg = CLTConfig(d_model=d, d_sae=F, layers=tuple(range(n)), input_hooks=tuple(s.hook for s in sites_in),
                    output_hooks=tuple(s.hook for s in sites_out), architecture=arch, reach=reach, skip=skip,
                    model_name=model_name, tied=tied, k=k or min(32, F))
    lazy = all(isinstance(lay.dec, tuple) for lay in layers)
    files_ = DecoderFiles([lay.dec for lay in layers], [cfg.n_targets(s) for s in range(n)]) if lazy else None
    clt = CrossLayerTranscoder(cfg, decoders=files_, init=False)
    with torch.no_grad():
        for s, lay in enumerate(layers):
            clt.W_enc[s].data = lay.W_enc.to(dtype).contiguous()
            clt.b_enc[s] = lay.b_enc.to(dtype)
            clt.b_dec[s] = lay.b_dec.to(dtype)
            if skip:
                clt.W_skip[s].data = (lay.W_skip if lay.W_skip is not None else torch.zeros(d, d)).to(dtype).contiguous()
            if arch == "jumprelu":
                clt.log_threshold[s] = lay.threshold.float().clamp_min(0).log()
            if not lazy:
                w = lay.dec[:, :1] if tied else lay.dec[:, :cfg.n_targets(s)]
                clt.W_dec.append(torch.nn.Parameter(w.to(dtype).contiguous(), requires_grad=False))
    for p in clt.parameters():
        p.requires_grad_(False)
    clt.source = what
    return clt


def _hooks(model: HookedModel, names: tuple[str | None, str | None], n: int, what: str) -> tuple[list[Site], list[Site]]:
    i, o = names
    if not i or not o:
        raise InputError(f"{what} does not say which hooks it reads and writes (no config.yaml with feature_input_hook "
                         "and feature_output_hook); give them: load_replacement(..., input_hook='mlp.hook_in' | "
                         "'hook_resid_mid' | 'ln2.hook_normalized', output_hook='hook_mlp_out')")
    return [resolve_site(model, i, layer) for layer in range(n)], [resolve_site(model, o, layer) for layer in range(n)]


def _check_layers(model: HookedModel, n: int, what: str) -> None:
    if n != model.cfg.n_layers:
        raise InputError(f"{what} has {n} layers, but {model.cfg.model_name or 'the model'} has {model.cfg.n_layers}; "
                         "load a replacement trained on this model")


def _model_name_note(config: dict, model: HookedModel) -> str:
    """A note when the files name another model than the loaded one (their shapes are checked separately)."""
    want = str(config.get("model_name") or "")
    have = model.cfg.model_name or ""
    norm = lambda s: s.rstrip("/").split("/")[-1].lower()  # noqa: E731
    if want and have and norm(want) not in norm(have) and norm(have) not in norm(want):
        return f"its files name the model {want!r}; the loaded model is {have!r} (shapes and hooks match)"
    return ""


def _resolve_uri(uri: str, base: Path) -> Path:
    """A ``transcoders:`` entry: an ``hf://`` URI (through the hub cache), or a path (relative to the config's folder)."""
    from . import hub

    if str(uri).startswith("hf://"):
        repo, rev, path = hub.parse_spec(str(uri))
        if not path:
            raise InputError(f"{uri!r} names a repository, not a file")
        return hub.download_file(repo, path, rev)
    p = Path(uri)
    return p if p.is_absolute() else base / p


def read_config_yaml(path: Path) -> dict:
    """A circuit-tracer ``config.yaml`` as a dict (a clear error naming the file when it is not one)."""
    import yaml

    try:
        data = yaml.safe_load(read_text(path))
    except (OSError, yaml.YAMLError) as e:
        raise InputError(f"{path} is not readable YAML ({e})") from e
    if not isinstance(data, dict) or "model_kind" not in data:
        raise InputError(f"{path} is not a circuit-tracer config.yaml: it needs model_kind (transcoder_set or "
                         "cross_layer_transcoder), feature_input_hook and feature_output_hook")
    if data["model_kind"] not in ("transcoder_set", "cross_layer_transcoder"):
        raise InputError(f"{path}: model_kind {data['model_kind']!r} is not transcoder_set or cross_layer_transcoder")
    return data


def read_folder(folder: Path, model: HookedModel, config: dict | None = None, lazy_decoder: bool = True,
                dtype: torch.dtype = torch.float32, input_hook: str | None = None,
                output_hook: str | None = None, what: str | None = None,
                variant: str | None = None) -> "CrossLayerTranscoder | TranscoderSet":
    """A replacement from a local folder in any layout of the module docstring (``config``: an already read
    ``config.yaml``, e.g. from a hub repository; else the folder's own)."""
    folder = Path(folder)
    what = what or str(folder)
    if not folder.is_dir():
        raise NotFoundError(f"no transcoder folder at {folder}: train some (`mechscope transcoders train --out {folder}`, "
                            f"or --kind clt), or name hf://<org>/<repo> or a published set "
                            f"({', '.join(sorted(releases()))})")
    if config is None and (folder / "config.yaml").exists():
        config = read_config_yaml(folder / "config.yaml")
    if (folder / SIDECAR).exists():
        return _read_mechscope(folder, model, lazy_decoder, dtype)
    config = config or {}
    names = (input_hook or config.get("feature_input_hook"), output_hook or config.get("feature_output_hook"))
    kind = config.get("model_kind")
    note = _model_name_note(config, model)
    if "transcoders" in config:
        uris = config["transcoders"]
        if not isinstance(uris, list) or not uris:
            raise InputError(f"{what}: config.yaml's transcoders must be a list of per-layer files")
        paths = [_resolve_uri(u, folder) for u in uris]
        for p in paths:
            if not p.exists():
                raise NotFoundError(f"{what}: the layer file {p} named in config.yaml is missing")
        _check_layers(model, len(paths), what)
        sites_in, sites_out = _hooks(model, names, len(paths), what)
        clt_layout = kind == "cross_layer_transcoder"
        layers = [_read_layer_file(p, lazy_decoder, i if clt_layout else None) for i, p in enumerate(paths)]
        if clt_layout:
            _check_gs2_clt(layers, len(paths), what)
        clt = _build(layers, sites_in, sites_out, model, 0 if clt_layout else 1, str(config.get("model_name", "")),
                     dtype, what)
    elif list(folder.glob("W_enc_*.safetensors")) or list(folder.glob("W_dec_*.safetensors")):
        layers = _read_ct_clt(folder, lazy_decoder)
        _check_layers(model, len(layers), what)
        sites_in, sites_out = _hooks(model, names, len(layers), what)
        clt = _build(layers, sites_in, sites_out, model, 0, str(config.get("model_name", "")), dtype, what)
    elif (files_ := _layer_files(folder, variant)):
        paths = _numbered(files_, what)
        _check_layers(model, len(paths), what)
        layers = [_read_layer_file(paths[i], lazy_decoder, i) for i in range(len(paths))]
        three_d = [len(lay.dec_shape) == 3 for lay in layers]
        if any(three_d):
            _check_gs2_clt(layers, len(paths), what)
        sites = _gs2_hooks(paths, model) if not all(names) else None
        sites_in, sites_out = sites or _hooks(model, names, len(paths), what)
        clt = _build(layers, sites_in, sites_out, model, 0 if any(three_d) else 1,
                     str(config.get("model_name", "")), dtype, what)
    elif any((p / "cfg.json").exists() for p in folder.iterdir() if p.is_dir()) or (folder / "cfg.json").exists():
        from .transcoders import load_transcoders

        return load_transcoders(folder, model)
    else:
        raise NotFoundError(
            f"{folder} holds no replacement model mechscope reads; it has {sorted(p.name for p in folder.iterdir())[:8]}. "
            "Layouts: circuit-tracer's CLT (W_enc_<i>.safetensors + W_dec_<i>.safetensors), per-layer transcoders "
            "(layer_<i>.safetensors, or layer_<i>/params.safetensors or params.npz), a config.yaml listing "
            "transcoders, or mechscope's layer_<L>/cfg.json folders (mechscope transcoders train)")
    if note:
        clt.notes = [note]
    return clt


def _layer_files(folder: Path, variant: str | None = None) -> list[Path]:
    """Per-layer weight files: ``layer_<i>.safetensors`` or ``layer_<i>*/params.safetensors|npz`` (one level down;
    with ``variant``, only ``layer_<i>_<variant>/``), and any pickle beside them refused. Several files for one
    layer (Gemma Scope 2's ``transcoder_all`` holds eight variants) are an error listing the variants."""
    out = [p for p in folder.glob("*layer_*.safetensors")]
    out += [p for p in folder.glob("*layer_*/params.safetensors")] + [p for p in folder.glob("*layer_*/params.npz")]
    for p in list(folder.glob("*layer_*.pt")) + list(folder.glob("*layer_*.bin")) + list(folder.glob("*layer_*.pth")):
        refuse_pickle(p, "replacement weights")
        raise InputError(f"{p}: mechscope reads replacement weights from safetensors or .npz only")
    if variant:
        out = [p for p in out if (p.parent.name if p.name.startswith("params.") else p.stem).endswith(f"_{variant}")]
    layers = [re.search(r"layer_(\d+)", str(p.relative_to(folder))) for p in out]
    per = {}
    for p, m in zip(out, layers):
        if m:
            per.setdefault(int(m.group(1)), []).append(p)
    many = {k: v for k, v in per.items() if len(v) > 1}
    if many:
        names = sorted({re.sub(r"^.*?layer_\d+_?", "", (p.parent.name if p.name.startswith("params.") else p.stem))
                        for v in many.values() for p in v})
        raise InputError(f"{folder} holds {len(next(iter(many.values())))} files for layer {min(many)}: give the "
                         f"variant, one of {names} (load_replacement(..., variant=...), --variant)")
    return out


def _check_gs2_clt(layers: list[_Layer], n: int, what: str) -> None:
    """Gemma Scope 2 CLT files: every layer's ``w_dec`` is ``[F, L, d]`` with ``L`` the number of files."""
    for i, lay in enumerate(layers):
        if len(lay.dec_shape) != 3 or lay.dec_shape[1] != n:
            raise InputError(f"{lay.where}: a Gemma Scope 2 CLT of {n} layers needs w_dec [F, {n}, d]; it has "
                             f"{list(lay.dec_shape)} (layer {i})")


def _gs2_config(path: Path) -> Path:
    """Where Gemma Scope 2 keeps a layer file's config: ``config.json`` beside ``params.safetensors``, else the
    file's own name with ``.json``."""
    return path.parent / "config.json" if path.name == "params.safetensors" else path.with_suffix(".json")


def _gs2_hooks(paths: dict[int, Path], model: HookedModel) -> tuple[list[Site], list[Site]] | None:
    """Hooks from the Gemma Scope 2 ``config.json`` beside each layer's params (``hf_hook_point_in`` / ``_out``)."""
    cfgs = [_gs2_config(paths[i]) for i in range(len(paths))]
    if not all(c.exists() for c in cfgs):
        return None
    raw = [read_json(c, "Gemma Scope 2 config") for c in cfgs]
    if not all("hf_hook_point_in" in r for r in raw):
        return None
    return ([resolve_hf_point(model, r["hf_hook_point_in"]) for r in raw],
            [resolve_hf_point(model, r.get("hf_hook_point_out") or r["hf_hook_point_in"]) for r in raw])


def _read_mechscope(folder: Path, model: HookedModel, lazy: bool, dtype: torch.dtype) -> CrossLayerTranscoder:
    """A folder :func:`save_replacement` wrote: circuit-tracer's files, read with the sidecar's exact config."""
    side = read_json(folder / SIDECAR, "the replacement's mechscope.json")
    try:
        cfg = CLTConfig(**side["config"])
    except (KeyError, TypeError) as e:
        raise InputError(f"{folder / SIDECAR} is not a mechscope replacement sidecar ({e})") from e
    if side.get("layout") == "gemma_scope_2":
        paths = _numbered(_layer_files(folder), str(folder))
        if len(paths) != cfg.n_layers:
            raise NotFoundError(f"{folder}: {len(paths)} layer files, its mechscope.json says {cfg.n_layers} layers")
        layers = [_read_layer_file(paths[i], lazy, i) for i in range(cfg.n_layers)]
    elif cfg.reach == 1:
        paths = {i: folder / f"layer_{i}.safetensors" for i in range(cfg.n_layers)}
        for p in paths.values():
            if not p.exists():
                raise NotFoundError(f"{folder}: {p.name} is missing ({cfg.n_layers} layers)")
        layers = [_read_ct_plt(paths[i], lazy) for i in range(cfg.n_layers)]
    else:
        layers = _read_ct_clt(folder, lazy)
        if len(layers) != cfg.n_layers:
            raise InputError(f"{folder}: {len(layers)} layers of files, its mechscope.json says {cfg.n_layers}")
    sites = [Site(h) for h in cfg.input_hooks], [Site(h) for h in cfg.output_hooks]
    clt = _build(layers, *sites, model=model, reach=cfg.reach, model_name=cfg.model_name, dtype=dtype,
                 what=str(folder), tied=cfg.tied, k=cfg.k,
                 architecture="topk" if cfg.architecture == "topk" else None)
    clt.cfg = CLTConfig(**{**cfg.to_dict(), "architecture": clt.cfg.architecture, "skip": clt.cfg.skip,
                           "normalize_activations": "none"})
    clt._index = {layer: i for i, layer in enumerate(clt.cfg.layers)}
    clt.check_fits(model)
    return clt


def load_replacement(spec: "str | Path | None" = None, model: HookedModel | None = None, *,
                     revision: str | None = None, dtype: torch.dtype = torch.float32, lazy_decoder: bool = True,
                     input_hook: str | None = None, output_hook: str | None = None, variant: str | None = None,
                     device: "torch.device | str | None" = None) -> "CrossLayerTranscoder | TranscoderSet":
    """The replacement model ``spec`` names, checked against ``model`` before any compute.

    ``spec``: a local folder, ``hf://<org>/<repo>[@<revision>][/<folder>]`` (offline from the Hugging Face cache when
    ``HF_HUB_OFFLINE=1``), a name of :func:`releases` (``"clt-gemma-2-2b-426k"``), or None for mechscope's own
    transcoders of ``model`` (``$MECHSCOPE_CACHE/transcoders/<model>``). ``lazy_decoder``: decoders stay on disk and
    only active features' rows are read (circuit-tracer's default). ``input_hook`` / ``output_hook``: the
    TransformerLens names of the sites, for files that do not say (no ``config.yaml``). ``variant``: which of
    several per-layer files to read (Gemma Scope 2's ``width_16k_l0_small_affine``). Weights are cast to
    ``dtype`` (float32 by default; graphs should be built in float32) and placed on ``device`` (the model's)."""
    if model is None or not hasattr(model, "run_with_cache"):
        raise InputTypeError("load_replacement(spec, model) needs the model the replacement is for (a mechscope "
                             "HookedModel): circuit-tracer's hook names are mapped onto its hook points and checked")
    device = torch.device(device) if device is not None else model.device
    _check_dtype(dtype, device)
    if spec is None:
        from .transcoders import transcoder_cache

        spec = transcoder_cache(model.cfg.model_name)
        if not Path(spec).is_dir():
            raise NotFoundError(f"no transcoders for {model.cfg.model_name or 'this model'} in {spec}: train some "
                                "(`mechscope transcoders train`, or `--kind clt`) or name published ones ("
                                f"{', '.join(sorted(releases()))})")
    text = str(spec)
    if text in releases():
        variant = variant or releases()[text].get("variant")
        text = releases()[text]["uri"]
    if text.startswith("hf://"):
        clt = _read_hub(text, model, revision, dtype, lazy_decoder, input_hook, output_hook, variant)
    else:
        if not Path(text).exists() and not text.startswith(("/", ".")) and "/" not in text:
            raise UnknownNameError(f"{text!r} is neither a folder nor a published replacement; published: "
                                   f"{', '.join(sorted(releases()))} (or hf://<org>/<repo>, or a local folder)")
        clt = read_folder(Path(text), model, None, lazy_decoder, dtype, input_hook, output_hook, variant=variant)
    return clt.to(device) if isinstance(clt, CrossLayerTranscoder) else clt.to(device)


def _read_hub(spec: str, model: HookedModel, revision: str | None, dtype: torch.dtype, lazy: bool,
              input_hook: str | None, output_hook: str | None,
              variant: str | None = None) -> "CrossLayerTranscoder | TranscoderSet":
    """A hub replacement: its ``config.yaml`` first (as circuit-tracer's ``load_transcoder_from_hub``), then the
    files the config names or the folder's own."""
    from huggingface_hub.errors import EntryNotFoundError

    from . import hub

    repo, rev, sub = hub.parse_spec(spec)
    rev = rev or revision
    config = None
    try:
        cfg_path = hub.download_file(repo, f"{sub}/config.yaml" if sub else "config.yaml", rev)
        config = read_config_yaml(cfg_path)
    except (NotFoundError, EntryNotFoundError):
        config = None
    if config is not None and "transcoders" in config:
        return read_folder(cfg_path.parent, model, config, lazy, dtype, input_hook, output_hook, what=spec)
    folder = hub.download(repo, sub, rev, only=f"*_{variant}/*" if variant else None)
    return read_folder(folder, model, config, lazy, dtype, input_hook, output_hook, what=spec, variant=variant)


# ---------------------------------------------------------------------------------------------------- writing
#: the TransformerLens name circuit-tracer uses for a mechscope hook suffix, where there is one
_TL_NAME = {"ln2.hook_normalized": "mlp.hook_in", "hook_resid_mid": "hook_resid_mid", "hook_mlp_out": "hook_mlp_out"}


def _foreign_name_of(hooks: tuple[str, ...]) -> str | None:
    """The one TransformerLens name of every layer's hook (None when they differ or have none)."""
    names = {_TL_NAME.get(split_name(h)[1]) for h in hooks}
    return names.pop() if len(names) == 1 else None


@torch.no_grad()
def save_replacement(clt: CrossLayerTranscoder, folder: "str | Path", layout: str = "circuit_tracer",
                     model: HookedModel | None = None) -> Path:
    """Write ``clt`` (its scales folded into the weights) to ``folder``, atomically.

    ``layout="circuit_tracer"``: a CLT as ``W_enc_{i}`` / ``W_dec_{i}`` files, per-layer transcoders (``reach`` 1)
    as ``layer_{i}.safetensors``, and a ``config.yaml`` circuit-tracer's ``load_transcoders`` reads, where it can
    read the replacement exactly (every layer from 0, JumpReLU or ReLU features, and for a CLT no skip: circuit-tracer
    0.5 does not read CLT skips). ``layout="gemma_scope_2"``: Gemma Scope 2's per-layer ``params.safetensors`` with
    a ``config.json`` naming the HF module points (which needs ``model``). Either way a ``mechscope.json`` sidecar
    keeps the exact config (mechscope hooks, ``reach``, ``tied``, TopK's ``k``), which :func:`load_replacement` reads
    first."""
    if not isinstance(clt, CrossLayerTranscoder):
        raise InputTypeError(f"save_replacement takes a CrossLayerTranscoder, got {type(clt).__name__}")
    if layout not in ("circuit_tracer", "gemma_scope_2"):
        raise InputError(f"layout must be 'circuit_tracer' or 'gemma_scope_2', got {layout!r}")
    if layout == "gemma_scope_2" and model is None:
        raise InputError("save_replacement(..., layout='gemma_scope_2', model=model): Gemma Scope 2's config.json "
                         "names HF modules, which only the model knows")
    cfg = clt.cfg
    n, d = cfg.n_layers, cfg.d_model
    thr = clt.inference_thresholds() if cfg.architecture in ("jumprelu", "batchtopk") else None
    F = torch.arange(cfg.d_sae)
    why = []
    if list(cfg.layers) != list(range(n)):
        why.append(f"it covers layers {list(cfg.layers)}, and circuit-tracer attaches layer i's file to block i")
    if cfg.architecture == "topk":
        why.append("circuit-tracer's loaders read JumpReLU or ReLU features, not TopK")
    if cfg.skip and cfg.reach != 1:
        why.append("circuit-tracer 0.5 does not read a CLT's skip connections")
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        from safetensors.torch import save_file

        for s in range(n):
            layer = cfg.layers[s]
            enc = clt.read_directions(layer, F).detach().float().cpu()  # [F, d]
            b_enc = clt.b_enc[s].detach().float().cpu()
            b_dec = clt.decoder_bias(layer).detach().float().cpu()
            dec = clt.write_directions(layer, F).detach().float().cpu()  # [F, T, d]
            skip = clt.skip_term(layer, torch.eye(d, device=clt.b_enc.device)).detach().float().cpu() if cfg.skip \
                else None  # x @ skip
            th = thr[s].detach().float().cpu() if thr is not None else None
            if layout == "gemma_scope_2":
                full = torch.zeros(cfg.d_sae, n, d) if cfg.reach != 1 else None
                if full is not None:
                    full[:, s:s + dec.shape[1]] = dec
                t = {"w_enc": enc.T, "w_dec": dec[:, 0] if full is None else full, "b_enc": b_enc, "b_dec": b_dec,
                     "threshold": th if th is not None else torch.zeros(cfg.d_sae)}
                if skip is not None:
                    t["affine_skip_connection"] = skip
                sub = tmp / (f"layer_{s}" if cfg.reach == 1 else "")
                name = "params.safetensors" if cfg.reach == 1 else f"params_layer_{s}.safetensors"
                sub.mkdir(parents=True, exist_ok=True)
                save_file({k: v.contiguous() for k, v in t.items()}, str(sub / name))
                conf = {"hf_hook_point_in": hf_point_of(model, cfg.input_hooks[s]),
                        "hf_hook_point_out": hf_point_of(model, cfg.output_hooks[s]), "width": cfg.d_sae,
                        "model_name": cfg.model_name, "architecture": "jump_relu", "affine_connection": skip is not None,
                        "type": "transcoder" if cfg.reach == 1 else "clt"}
                (sub / ("config.json" if cfg.reach == 1 else f"params_layer_{s}.json")).write_text(json.dumps(conf, indent=2))
            elif cfg.reach == 1:
                t = {"W_enc": enc, "W_dec": dec[:, 0], "b_enc": b_enc, "b_dec": b_dec}
                if th is not None:
                    t["activation_function.threshold"] = th
                if skip is not None:
                    t["W_skip"] = skip.T  # circuit-tracer applies x @ W_skip.T
                save_file({k: v.contiguous() for k, v in t.items()}, str(tmp / f"layer_{s}.safetensors"))
            else:
                full = torch.zeros(cfg.d_sae, n - s, d)
                full[:, :dec.shape[1]] = dec  # zero beyond the reach: exact, as a CLT of full reach
                t = {f"W_enc_{s}": enc, f"b_enc_{s}": b_enc, f"b_dec_{s}": b_dec}
                if th is not None:
                    t[f"threshold_{s}"] = th
                if skip is not None:
                    t[f"W_skip_{s}"] = skip  # mechscope's addition (x @ W_skip); circuit-tracer 0.5 ignores it
                save_file({k: v.contiguous() for k, v in t.items()}, str(tmp / f"W_enc_{s}.safetensors"))
                save_file({f"W_dec_{s}": full.contiguous()}, str(tmp / f"W_dec_{s}.safetensors"))
        in_name, out_name = _foreign_name_of(cfg.input_hooks), _foreign_name_of(cfg.output_hooks)
        if layout == "circuit_tracer" and not why and in_name and out_name:
            import yaml

            (tmp / "config.yaml").write_text(yaml.safe_dump({
                "model_name": cfg.model_name, "model_kind": "transcoder_set" if cfg.reach == 1 else
                "cross_layer_transcoder", "feature_input_hook": in_name, "feature_output_hook": out_name}, sort_keys=False))
        elif layout == "circuit_tracer" and not (in_name and out_name):
            why.append("its hooks have no TransformerLens name circuit-tracer reads")
        side = {"mechscope": "replacement", "config": cfg.to_dict(), "layout": layout, "scales_folded": True,
                "circuit_tracer_reads_it": layout == "circuit_tracer" and not why, "why_not": why}
        side["config"]["normalize_activations"] = "none"
        if cfg.architecture == "batchtopk":
            side["config"]["architecture"] = "jumprelu"  # BatchTopK is a JumpReLU with its learned thresholds
        (tmp / SIDECAR).write_text(json.dumps(side, indent=2))
    return folder
