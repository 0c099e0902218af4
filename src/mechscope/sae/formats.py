"""The on-disk formats published SAEs come in, each read into mechscope's :class:`~mechscope.sae.model.SAE`.

- ``saelens``: ``cfg.json`` + ``sae_weights.safetensors``; ``W_enc [d_in, d_sae]``, architectures
  ``standard`` / ``topk`` / ``jumprelu``; the hook is named in ``cfg.json`` (TransformerLens names, as mechscope's);
- ``gemma_scope``: ``params.npz`` (read with ``allow_pickle=False``); JumpReLU with a per-latent
  ``threshold`` and no ``- b_dec`` before encoding; ``layer_L`` of a ``*-res`` repository reads
  ``blocks.L.hook_resid_post`` (``*-mlp``: ``hook_mlp_out``, ``*-att``: ``attn.hook_z``);
- ``llama_scope``: ``hyperparams.json`` + ``checkpoints/final.safetensors``; ``encoder.weight [d_sae, d_in]``,
  a scalar JumpReLU threshold, inputs scaled to norm ``sqrt(d_in)``; the hook is ``hook_point_in``;
- ``sparsify``: ``cfg.json`` + ``sae.safetensors``; TopK, ``encoder.weight [d_sae, d_in]``,
  ``W_dec [d_sae, d_in]``; folder ``layers.L`` is the output of block L (``blocks.L.hook_resid_post``);
- ``dictionary_learning``: ``ae.pt`` (``torch.load(weights_only=True)``) + ``config.json``;
  ``encoder.weight [d_sae, d_in]``, ``AutoEncoder`` (ReLU) or TopK / BatchTopK; the hook follows
  ``trainer.layer`` and ``submodule_name`` (``resid_post_layer_3``).

Weights are read only from safetensors, from ``.npz`` with ``allow_pickle=False``, or with
``torch.load(weights_only=True)``; a damaged file, a config that is not JSON, a checkpoint that
needs pickle, or non-finite weights get an error naming the file.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..core.errors import InputError, NotFoundError
from ..core.files import read_json as _read_json
from ..core.files import read_npz, read_safetensors, read_torch
from ..core.hookpoints import block_name
from .model import SAE, SAEConfig

if TYPE_CHECKING:
    from ..core.model import HookedModel

FORMATS = ("saelens", "gemma_scope", "llama_scope", "sparsify", "dictionary_learning")
SAELENS_ARCH = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu", "transcoder": "relu",
                "skip_transcoder": "relu", "jumprelu_transcoder": "jumprelu", "jumprelu_skip_transcoder": "jumprelu"}
SAELENS_TRANSCODERS = ("transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder")


def detect_format(folder: Path) -> str:
    """Which format ``folder`` holds, from the files in it; a clear error listing what each format needs."""
    has = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    if {"cfg.json", "sae_weights.safetensors"} <= has:
        return "saelens"
    if "params.npz" in has:
        return "gemma_scope"
    if "hyperparams.json" in has and (folder / "checkpoints" / "final.safetensors").exists():
        return "llama_scope"
    if {"cfg.json", "sae.safetensors"} <= has:
        return "sparsify"
    if "ae.pt" in has:
        return "dictionary_learning"
    raise NotFoundError(
        f"{folder} is not an SAE folder in a format mechscope reads; it has {sorted(has) or 'no files'}. Formats: "
        "SAELens (cfg.json + sae_weights.safetensors), Gemma Scope (params.npz), Llama Scope (hyperparams.json + "
        "checkpoints/final.safetensors), sparsify (cfg.json + sae.safetensors), dictionary_learning (ae.pt + config.json)")


def read_json(path: Path, what: str = "config") -> dict:
    """The SAE's JSON ``what`` at ``path`` (an object), with an error naming the file."""
    return _read_json(path, f"the SAE's {what}")


def _require(cfg: dict, keys: tuple[str, ...], path: Path) -> None:
    missing = [k for k in keys if k not in cfg]
    if missing:
        raise InputError(f"{path} has no {', '.join(map(repr, missing))} (it has {sorted(cfg)})")


def build(cfg: SAEConfig, W_enc: torch.Tensor, W_dec: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor,
          threshold: torch.Tensor | None = None, input_scale: float = 1.0,
          source: str = "", W_skip: torch.Tensor | None = None) -> SAE:
    """An SAE with the given weights (``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_out]``), each checked."""
    d_out = cfg.width_out
    expected = {"W_enc": (cfg.d_in, cfg.d_sae), "W_dec": (cfg.d_sae, d_out), "b_enc": (cfg.d_sae,),
                "b_dec": (d_out,)}
    got = {"W_enc": W_enc, "W_dec": W_dec, "b_enc": b_enc, "b_dec": b_dec}
    if cfg.skip:
        expected["W_skip"] = (cfg.d_in, d_out)
        got["W_skip"] = W_skip
    for name, shape in expected.items():
        if tuple(got[name].shape) != shape:
            raise InputError(f"{source}: {name} has shape {tuple(got[name].shape)}, expected {shape} from its config")
    for name, t in list(got.items()) + ([("threshold", threshold)] if threshold is not None else []):
        if not bool(torch.isfinite(t.float()).all()):
            raise InputError(f"{source}: {name} holds NaN or infinite values; the SAE's weights are damaged")
    sae = SAE(cfg)
    with torch.no_grad():
        for name, t in got.items():
            getattr(sae, name).copy_(t.float())
        if cfg.architecture == "jumprelu":
            if threshold is None:
                raise InputError(f"{source}: a JumpReLU SAE needs a threshold")
            sae.log_threshold.copy_(threshold.float().expand(cfg.d_sae).clamp(min=1e-12).log())
        sae.input_scale.fill_(float(input_scale))
    return sae


def read_saelens(folder: Path) -> SAE:
    """A SAELens v6 folder, read as SAELens's ``SAE.load_from_disk`` reads it (checked against SAELens 6.54's own
    files in tests/test_saelens_roundtrip.py). Fields that mean something particular there are followed:

    - ``transcoder`` / ``skip_transcoder`` / ``jumprelu_transcoder`` / ``jumprelu_skip_transcoder``: ``d_out`` and
      ``metadata.hook_name_out``; SAELens's ``W_skip`` is ``[d_out, d_in]`` (applied as ``x @ W_skip.T``);
    - ``rescale_acts_by_decoder_norm`` (TopK): SAELens multiplies pre-activations by ``‖W_dec[i]‖`` and divides
      before decoding; that is folded into ``W_enc``, ``b_enc`` and ``W_dec`` (the same outputs);
    - ``normalize_activations``: ``"expected_average_only_in"`` is a no-op at inference in SAELens (its factor is
      folded at save time), so it is read as ``"none"``; a run-time normalisation (``layer_norm``,
      ``constant_norm_rescale``, ``covariance_whitening``) is refused with an error;
    - decoder rows are never renormalised (``load_from_disk`` does not fold ``W_dec`` norms by default).
    """
    raw = read_json(folder / "cfg.json")
    _require(raw, ("d_in", "d_sae"), folder / "cfg.json")
    arch = raw.get("architecture", "standard")
    if arch not in SAELENS_ARCH:
        raise InputError(f"unsupported SAE architecture {arch!r} in {folder}; supported: {sorted(SAELENS_ARCH)}")
    if raw.get("normalize_activations", "none") not in ("none", None, "expected_average_only_in"):
        raise InputError(f"{folder} asks for normalize_activations={raw['normalize_activations']!r}: a per-input "
                         "normalisation at run time, which mechscope does not apply; valid: 'none' or "
                         "'expected_average_only_in' (folded into the weights when SAELens saves)")
    meta = raw.get("metadata") or {}
    out_hook = meta.get("hook_name_out") or raw.get("hook_name_out") or ""
    is_tc = arch in SAELENS_TRANSCODERS
    if is_tc and not out_hook:
        raise InputError(f"{folder}/cfg.json is a SAELens {arch} without metadata.hook_name_out: add the hook it "
                         "writes (e.g. 'blocks.1.hook_mlp_out') to its metadata")
    skip = "skip" in arch if is_tc else bool(raw.get("skip", False)) and bool(out_hook)
    cfg = SAEConfig(d_in=int(raw["d_in"]), d_sae=int(raw["d_sae"]), architecture=SAELENS_ARCH[arch],
                    hook_name=meta.get("hook_name") or raw.get("hook_name") or raw.get("hook_point") or "",
                    model_name=meta.get("model_name") or raw.get("model_name") or "",
                    k=int(raw.get("k", (raw.get("activation_fn_kwargs") or {}).get("k", 32))),
                    apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", True)),
                    hook_name_out=out_hook, d_out=int(raw.get("d_out") or 0) if out_hook else 0, skip=skip,
                    matryoshka_widths=tuple(raw.get("matryoshka_widths") or (meta.get("training_architecture_details")
                                                                             or {}).get("matryoshka_widths") or ()))
    w = read_safetensors(folder / "sae_weights.safetensors")
    missing = [k for k in ("W_enc", "W_dec", "b_enc", "b_dec") + (("W_skip",) if cfg.skip else ()) if k not in w]
    if missing:
        raise InputError(f"{folder}/sae_weights.safetensors has no {missing} (has {sorted(w)})")
    W_enc, W_dec, b_enc = w["W_enc"], w["W_dec"], w["b_enc"]
    if raw.get("rescale_acts_by_decoder_norm") and arch == "topk":
        n = W_dec.float().norm(dim=-1).clamp_min(1e-12)
        W_enc, b_enc, W_dec = W_enc.float() * n, b_enc.float() * n, W_dec.float() / n[:, None]
    W_skip = w.get("W_skip")
    if W_skip is not None and is_tc:
        W_skip = W_skip.T  # SAELens: [d_out, d_in]; mechscope: [d_in, d_out]
    return build(cfg, W_enc, W_dec, b_enc, w["b_dec"], w.get("threshold"), source=str(folder), W_skip=W_skip)


def read_gemma_scope(folder: Path, hook: str, model_name: str = "") -> SAE:
    w = read_npz(folder / "params.npz")
    missing = [k for k in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold") if k not in w]
    if missing:
        raise InputError(f"{folder}/params.npz has no {missing} (has {sorted(w)})")
    d_in, d_sae = w["W_enc"].shape
    cfg = SAEConfig(d_in=int(d_in), d_sae=int(d_sae), architecture="jumprelu", hook_name=hook, model_name=model_name,
                    apply_b_dec_to_input=False)
    return build(cfg, w["W_enc"], w["W_dec"], w["b_enc"], w["b_dec"], w["threshold"], source=str(folder))


def read_llama_scope(folder: Path, model_name: str = "") -> SAE:
    hp = read_json(folder / "hyperparams.json", "hyperparameters")
    _require(hp, ("d_model", "d_sae", "hook_point_in", "jump_relu_threshold"), folder / "hyperparams.json")
    w = read_safetensors(folder / "checkpoints" / "final.safetensors")
    norm = (hp.get("dataset_average_activation_norm") or {}).get("in")
    scale = hp["d_model"] ** 0.5 / norm if norm else 1.0  # inputs scaled to norm sqrt(d_in), outputs scaled back
    cfg = SAEConfig(d_in=int(hp["d_model"]), d_sae=int(hp["d_sae"]), architecture="jumprelu",
                    hook_name=hp["hook_point_in"], model_name=model_name,
                    apply_b_dec_to_input=bool(hp.get("apply_decoder_bias_to_pre_encoder", False)),
                    normalize_activations="expected_average_only_in" if norm else "none")
    return build(cfg, w["encoder.weight"].T, w["decoder.weight"].T, w["encoder.bias"], w["decoder.bias"],
                 torch.tensor(float(hp["jump_relu_threshold"])), input_scale=scale, source=str(folder))


def sparsify_hook(folder_name: str) -> str:
    """sparsify's hookpoint (a module path) as a hook name: ``layers.L`` is the output of block L."""
    if folder_name == "embed_tokens":
        return "hook_embed"
    m = re.fullmatch(r"(?:model\.)?layers[._](\d+)(?:\.(mlp|self_attn))?", folder_name)
    if not m:
        raise InputError(f"cannot tell which hook the sparsify folder {folder_name!r} reads; expected layers.L, "
                         f"layers.L.mlp or layers.L.self_attn")
    tail = {None: "hook_resid_post", "mlp": "hook_mlp_out", "self_attn": "hook_attn_out"}[m.group(2)]
    return block_name(int(m.group(1)), tail)


def read_sparsify(folder: Path, hook: str | None = None, model_name: str = "") -> SAE:
    raw = read_json(folder / "cfg.json")
    _require(raw, ("d_in", "k"), folder / "cfg.json")
    d_sae = int(raw.get("num_latents") or raw["d_in"] * raw.get("expansion_factor", 1))
    w = read_safetensors(folder / "sae.safetensors")
    cfg = SAEConfig(d_in=int(raw["d_in"]), d_sae=d_sae, architecture="topk", k=int(raw["k"]),
                    hook_name=hook or sparsify_hook(folder.name), model_name=model_name,
                    apply_b_dec_to_input=not raw.get("normalize_decoder", False))
    return build(cfg, w["encoder.weight"].T, w["W_dec"], w["encoder.bias"], w["b_dec"], source=str(folder))


def dictionary_learning_hook(trainer: dict) -> str:
    layer, sub = trainer.get("layer"), str(trainer.get("submodule_name", ""))
    if layer is None:
        raise InputError("the dictionary_learning config has no trainer.layer: cannot tell which hook it reads")
    kind = "mlp_out" if "mlp" in sub else "attn_out" if "attn" in sub else "resid_post"
    return block_name(int(layer), f"hook_{kind}")


def read_dictionary_learning(folder: Path, hook: str | None = None, model_name: str = "") -> SAE:
    conf = read_json(folder / "config.json")
    trainer = conf.get("trainer") or {}
    _require(trainer, ("dict_class", "activation_dim", "dict_size"), folder / "config.json")
    w = read_torch(folder / "ae.pt")
    b_dec = next((w[k] for k in ("b_dec", "bias", "decoder_bias") if k in w), None)
    cls = trainer["dict_class"]
    arch = {"AutoEncoder": "relu", "AutoEncoderTopK": "topk", "TopKSAE": "topk", "BatchTopKSAE": "batchtopk"}.get(cls)
    if arch is None or b_dec is None:
        raise InputError(f"{folder}: dictionary_learning {cls!r} is not supported (AutoEncoder, AutoEncoderTopK, "
                         f"TopKSAE and BatchTopKSAE are)" if arch is None else f"{folder}/ae.pt has no decoder bias")
    k = int(w["k"]) if "k" in w else int(trainer.get("k", 32))
    threshold = w.get("threshold")
    if arch == "batchtopk" and threshold is not None and float(threshold) > 0:
        arch = "jumprelu"  # at inference BatchTopK is a JumpReLU with its learned global threshold, as SAELens saves it
    cfg = SAEConfig(d_in=int(trainer["activation_dim"]), d_sae=int(trainer["dict_size"]),
                    architecture="topk" if arch == "batchtopk" else arch, k=k,
                    hook_name=hook or dictionary_learning_hook(trainer), model_name=model_name or trainer.get("lm_name", ""))
    return build(cfg, w["encoder.weight"].T, w["decoder.weight"].T, w["encoder.bias"], b_dec,
                 threshold.float().reshape(-1) if arch == "jumprelu" else None, source=str(folder))


def read_gemma_scope_transcoder(folder: Path, layer: int, model: "HookedModel | None", model_name: str = "") -> SAE:
    """A Gemma Scope transcoder (``params.npz``: MLP input -> ``hook_mlp_out``). It reads TransformerLens's
    ``ln2.hook_normalized`` (before the norm's gain, as circuit-tracer reads it), so the gain of ``model``'s pre-MLP
    norm is folded into its encoder (:func:`mechscope.sae.sites.fold_site`)."""
    from .sites import fold_site, resolve_site

    if model is None:
        raise InputError(f"{folder} is a Gemma Scope transcoder: it reads the pre-MLP norm before its gain "
                         "(TransformerLens's ln2.hook_normalized), which mechscope recovers from the model's norm; "
                         "pass the model: load_sae(path, model), or load the whole set with load_replacement")
    w = read_npz(folder / "params.npz")
    missing = [k for k in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold") if k not in w]
    if missing:
        raise InputError(f"{folder}/params.npz has no {missing} (has {sorted(w)})")
    site, out = resolve_site(model, "ln2.hook_normalized", layer), resolve_site(model, "hook_mlp_out", layer)
    W_enc, b_enc, _, b_dec = fold_site(site, w["W_enc"].float(), w["b_enc"].float(), None, w["b_dec"].float())
    d_in, d_sae = W_enc.shape
    cfg = SAEConfig(d_in=int(d_in), d_sae=int(d_sae), architecture="jumprelu", hook_name=site.hook,
                    hook_name_out=out.hook, model_name=model_name)
    return build(cfg, W_enc, w["W_dec"], b_enc, b_dec, w["threshold"], source=str(folder))


def read_folder(folder: Path, fmt: str | None = None, hook: str | None = None, model_name: str = "",
                where: str | None = None, model: "HookedModel | None" = None) -> SAE:
    """An SAE from a local folder in any supported format (detected from its files unless ``fmt`` is given).
    ``where``: the hub repository and path it came from (a Gemma Scope folder's site is read from it, else from the
    folder's own path)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NotFoundError(f"no SAE folder at {folder}")
    fmt = fmt or detect_format(folder)
    if fmt == "saelens":
        return read_saelens(folder)
    if fmt == "gemma_scope":
        if hook is None:
            from .hub import gemma_scope_hook, gemma_scope_site

            text = where or str(folder.resolve())
            site, layer = gemma_scope_site(text)
            if site is None or layer is None:
                raise InputError(
                    f"cannot tell which hook the Gemma Scope folder {folder} reads: its path names "
                    f"{'no release (-res, -mlp, -att or -transcoders)' if site is None else 'no layer_L'}. Load it by "
                    "its hub path (hf://google/gemma-scope-2b-pt-res/layer_3/width_16k/average_l0_59) or give the hook: "
                    "hook='blocks.3.hook_resid_post' (-res), 'blocks.3.hook_mlp_out' (-mlp), 'blocks.3.attn.hook_z' "
                    "(-att); a -transcoders folder reads the MLP input (load_replacement reads the set)")
            if site == "transcoders":
                return read_gemma_scope_transcoder(folder, layer, model, model_name)
            hook = gemma_scope_hook(site, layer)
        return read_gemma_scope(folder, hook, model_name)
    if fmt == "llama_scope":
        return read_llama_scope(folder, model_name)
    if fmt == "sparsify":
        return read_sparsify(folder, hook, model_name)
    if fmt == "dictionary_learning":
        return read_dictionary_learning(folder, hook, model_name)
    raise InputError(f"unknown SAE format {fmt!r}; known: {', '.join(FORMATS)}")
