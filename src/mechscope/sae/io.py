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
from safetensors.torch import save_file

from ..core.errors import InputError
from ..core.files import atomic_dir, path_then_model
from ..core.hookpoints import spec
from ..core.model import HookedModel
from .model import BATCH_TOPK, SAE

SAVED_ARCH = {"relu": "standard", "topk": "topk", "batchtopk": "jumprelu", "jumprelu": "jumprelu", "matryoshka": "jumprelu"}


def saved_architecture(sae: SAE) -> str:
    """The ``architecture`` written to ``cfg.json``: SAELens's name for the SAE, or for a transcoder its class
    (``transcoder``, ``jumprelu_transcoder``, with ``skip_`` before ``transcoder`` for a skip one). A TopK
    transcoder has no SAELens class: it is written as ``topk`` with transcoder fields, which only mechscope reads."""
    c = sae.cfg
    base = SAVED_ARCH[c.architecture]
    if not c.is_transcoder or base == "topk":
        return base
    return ("" if base == "standard" else f"{base}_") + ("skip_" if c.skip else "") + "transcoder"


@torch.no_grad()
def saelens_tensors(sae: SAE) -> dict[str, torch.Tensor]:
    """The weights as SAELens stores them, with the input scale ``s`` folded in:
    ``W_enc' = s W_enc``, ``W_dec' = W_dec / s``, ``b_dec' = b_dec / s``. A transcoder's output scale
    ``t`` is folded the same way: ``W_dec' = W_dec / t``, ``b_dec' = b_dec / t``, ``W_skip' = s W_skip / t``."""
    s = float(sae.input_scale)
    t = float(sae.output_scale) if sae.cfg.is_transcoder else s
    out = {"W_enc": (sae.W_enc * s), "W_dec": (sae.W_dec / t), "b_enc": sae.b_enc.clone(), "b_dec": (sae.b_dec / t)}
    if sae.cfg.skip:
        W_skip = sae.W_skip * s / t
        # SAELens's skip transcoders hold [d_out, d_in]; mechscope's TopK transcoders keep [d_in, d_out]
        out["W_skip"] = W_skip.T if saved_architecture(sae).endswith("skip_transcoder") else W_skip
    arch = sae.cfg.architecture
    if arch == "jumprelu":
        out["threshold"] = sae.log_threshold.float().exp()
    elif arch in BATCH_TOPK:
        if float(sae.threshold) < 0:
            raise InputError("this BatchTopK SAE has no inference threshold yet: train it before saving")
        out["threshold"] = torch.full((sae.cfg.d_sae,), float(sae.threshold))
    return {k: v.detach().float().cpu().contiguous() for k, v in out.items()}


def save_sae(sae: SAE, path: str | Path, log10_density: torch.Tensor | None = None) -> Path:
    """Write ``sae`` to folder ``path`` in SAELens's format (atomically; an existing folder is replaced)."""
    c = sae.cfg
    cfg = {
        "architecture": saved_architecture(sae), "d_in": c.d_in, "d_sae": c.d_sae, "dtype": c.dtype,
        "device": "cpu", "apply_b_dec_to_input": c.apply_b_dec_to_input, "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {"hook_name": c.hook_name, "model_name": c.model_name, "saved_by": "mechscope",
                     "mechscope_config": c.to_dict(), "input_scale_folded": float(sae.input_scale)},
    }
    if c.architecture == "topk":
        cfg["k"] = c.k
    if c.matryoshka_widths:  # the prefix sizes, where SAELens's matryoshka_batchtopk inference files keep them too
        cfg["matryoshka_widths"] = list(c.matryoshka_widths)
        cfg["metadata"].update(training_architecture="matryoshka_batchtopk",
                               training_architecture_details={"k": c.k, "matryoshka_widths": list(c.matryoshka_widths)})
    if c.is_transcoder:  # SAELens's transcoder fields: the target hook and width
        cfg.update(hook_name_out=c.hook_name_out, d_out=c.width_out, skip=c.skip)
        cfg["metadata"]["hook_name_out"] = c.hook_name_out
    path = Path(path)
    with atomic_dir(path) as tmp:
        (tmp / "cfg.json").write_text(json.dumps(cfg, indent=2))
        save_file(saelens_tensors(sae), str(tmp / "sae_weights.safetensors"))
        if log10_density is not None:
            save_file({"sparsity": log10_density.detach().float().cpu().contiguous()}, str(tmp / "sparsity.safetensors"))
    return path


def load_sae(path: str | Path | None = None, model: HookedModel | None = None, release: str | None = None,
             sae_id: str | None = None, revision: str | None = None, format: str | None = None,
             hook: str | None = None) -> SAE:
    """Load a pretrained SAE: a local folder, a hub folder, or a known release.

    ``path``: a local folder, or ``"hf://<org>/<repo>[@<revision>]/<folder>"`` (through the Hugging Face
    cache: ``HF_HUB_OFFLINE`` and revision pins work). ``release``/``sae_id``: a release of
    :func:`mechscope.sae.hub.releases` (e.g. ``load_sae(release="gpt2-small-res-jb",
    sae_id="blocks.8.hook_resid_pre")``). The folder may hold any format of :mod:`mechscope.sae.formats`
    (SAELens, Gemma Scope, Llama Scope, sparsify, dictionary_learning; ``format`` forces one). Each
    format's hook naming is mapped to mechscope's hook names; a Gemma Scope folder's site comes from its release's
    name (``-res``, ``-mlp``, ``-att``, ``-transcoders``) and its ``layer_L`` folder, and a folder whose site cannot be
    known is refused unless ``hook`` names it. A Gemma Scope transcoder reads the pre-MLP norm before its gain
    (TransformerLens's ``ln2.hook_normalized``, as circuit-tracer reads it), so it needs ``model`` to fold the gain.
    With ``model``, checks that the hook exists (suggesting the nearest names) and that ``d_in`` equals that hook's
    width.
    """
    from . import formats, hub

    path, model = path_then_model(path, model, "load_sae")
    model_name = ""
    where = None
    if release is not None:
        if sae_id is None:
            raise InputError(f"load_sae(release={release!r}) needs sae_id=...")
        entry = hub.resolve_release(release, sae_id)
        folder = hub.download(entry["repo_id"], entry["path"], revision)
        format, hook, model_name = format or entry["format"], hook or entry["hook"], entry["model"]
    elif path is not None and str(path).startswith("hf://"):
        repo, rev, sub = hub.parse_spec(str(path))
        folder = hub.download(repo, sub, rev or revision)
        where = f"{repo}/{sub}"
    elif path is not None:
        folder = Path(path)
    else:
        raise InputError("load_sae needs a folder, an hf://<org>/<repo>/<folder> path, or release= and sae_id=")
    sae = formats.read_folder(folder, format, hook, model_name, where=where, model=model)
    sae.explanations = read_explanations(folder)
    if model is not None:
        check_fits(sae, model)
    return sae


#: where `sae explain` keeps a folder's feature explanations (with their scores)
EXPLANATIONS = "explanations.json"


def read_explanations(folder: str | Path) -> dict[int, str]:
    """``{feature: explanation}`` from ``folder/explanations.json`` (written by ``sae explain``); empty when absent."""
    from ..core.files import read_json

    p = Path(folder) / EXPLANATIONS
    if not p.exists():
        return {}
    data = read_json(p, "feature explanations")
    try:
        return {int(k): str(v["explanation"]) for k, v in data.get("features", {}).items()}
    except (KeyError, TypeError, ValueError, AttributeError):
        raise InputError(f"{p} is not an explanations file (it needs features: {{id: {{explanation: ...}}}}); "
                         "write it again with `mechscope sae explain`") from None


def check_fits(sae: SAE, model: HookedModel) -> None:
    """Raise a clear error when the SAE's hook is unknown to ``model`` or its ``d_in`` does not match."""
    hook = sae.cfg.hook_name
    if not hook:
        raise InputError("the SAE does not say which hook it reads (cfg hook_name is empty)")
    model.manager.check(hook)
    width = spec(hook).width(model.cfg.to_dict())
    if width != sae.cfg.d_in:
        raise InputError(f"the SAE has d_in={sae.cfg.d_in} but {hook} of {model.cfg.model_name or 'this model'} has "
                         f"width {width}; load an SAE trained on this model and hook")
    if sae.cfg.is_transcoder:
        out = sae.cfg.hook_name_out
        model.manager.check(out)
        w_out = spec(out).width(model.cfg.to_dict())
        if w_out != sae.cfg.width_out:
            raise InputError(f"the transcoder writes d_out={sae.cfg.width_out} but {out} has width {w_out}")
