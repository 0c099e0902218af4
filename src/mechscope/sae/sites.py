"""Where a published dictionary's sites live in a loaded model: TransformerLens / circuit-tracer hook names and
Hugging Face module points, mapped onto mechscope's hook points of that model (and checked against it).

- :func:`resolve_site`: a TransformerLens name (``mlp.hook_in``, ``hook_resid_mid``, ``ln2.hook_normalized``,
  ``hook_mlp_out``, ``mlp.hook_out``; the table is :data:`mechscope.core.hookpoints.FOREIGN_SITES`) at one block;
- :func:`resolve_hf_point` and :func:`hf_point_of`: Gemma Scope 2's ``hf_hook_point_in`` (an HF module's input or
  output), found by identity among the model's own modules, and back;
- :func:`fold_site`: TransformerLens fires ``ln2.hook_normalized`` on ``x / scale``, before the norm's gain, so a
  dictionary trained there reads mechscope's ``ln2.hook_normalized`` (the norm's output) with ``1 / gain`` folded
  into its encoder and skip.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..core.errors import InputError
from ..core.hookpoints import block_name, foreign_site, split_name
from ..core.model import HookedModel


@dataclass
class Site:
    """Where a published replacement's site lives in ``model``: a mechscope hook, and for TransformerLens's
    unweighted ``ln2.hook_normalized`` the norm's ``gain`` (and LayerNorm ``bias``) to fold into the encoder."""

    hook: str
    gain: torch.Tensor | None = None
    bias: torch.Tensor | None = None


def resolve_site(model: HookedModel, name: str, layer: int) -> Site:
    """The mechscope site of a TransformerLens / circuit-tracer hook name (``mlp.hook_in``, ``hook_resid_mid``,
    ``ln2.hook_normalized``, ``hook_mlp_out``, ``mlp.hook_out``) at block ``layer`` of ``model``."""
    site = foreign_site(name)
    hook = model.mlp_input(layer) if site.site == "mlp_input" else block_name(layer, site.site)
    if not model.has_hook(hook):
        raise InputError(f"the replacement reads or writes {name!r} at layer {layer}, which is {hook} in mechscope; "
                         f"{model.cfg.model_name or 'this model'} has no such hook point")
    if site.module_output and model.norm(layer, "mlp_post") is not None:
        raise InputError(f"{name!r} is the MLP module's output before the post-MLP norm, which "
                         f"{model.cfg.model_name or 'this model'} has (Gemma 2/3 do): that tensor is not a mechscope "
                         "hook point; a transcoder writing hook_mlp_out (after the norm) can be read")
    if not site.unweighted:
        return Site(hook)
    norm = model.ln2(layer)
    if norm is None or hook != block_name(layer, "ln2.hook_normalized"):
        raise InputError(f"{name!r} (the pre-MLP norm before its gain) needs a pre-MLP norm; block {layer} of "
                         f"{model.cfg.model_name or 'this model'} has none")
    gain = norm.gain.detach().float().cpu()
    if bool((gain == 0).any()):
        raise InputError(f"block {layer}'s pre-MLP norm has a zero gain: {name!r} cannot be recovered from its output")
    bias = norm.bias.detach().float().cpu() if norm.bias is not None else None
    return Site(hook, gain, bias)


_HF_POINT = re.compile(r"^(?:.*\.)?layers\.(\d+)(?:\.(.+?))?\.(input|output)$")


def resolve_hf_point(model: HookedModel, point: str) -> Site:
    """The mechscope site of an HF module point (Gemma Scope 2's ``hf_hook_point_in``:
    ``model.layers.5.pre_feedforward_layernorm.output``), found by identity among ``model``'s own modules: the
    pre-MLP norm (its output: the MLP input; its input: ``hook_resid_mid``), the post-MLP norm's or, without one,
    the MLP's output (``hook_mlp_out``), and the block's output (``hook_resid_post``)."""
    m = _HF_POINT.match(str(point))
    if not m:
        raise InputError(f"cannot read the HF hook point {point!r}; expected model.layers.<L>.<module>.output or .input")
    layer, sub, io = int(m.group(1)), m.group(2), m.group(3)
    if not 0 <= layer < model.cfg.n_layers:
        raise InputError(f"{point!r} names layer {layer}; {model.cfg.model_name or 'the model'} has "
                         f"{model.cfg.n_layers} layers")
    block = model.block(layer)
    try:
        module = block.get_submodule(sub) if sub else block
    except AttributeError:
        raise InputError(f"{point!r}: block {layer} of {model.cfg.model_name or 'the model'} has no module {sub!r}") \
            from None
    ln2, post = model.ln2(layer), model.norm(layer, "mlp_post")
    found = None
    if module is block:
        found = block_name(layer, "hook_resid_post" if io == "output" else "hook_resid_pre")
    elif ln2 is not None and module is ln2.module:
        found = model.mlp_input(layer) if io == "output" else block_name(layer, "hook_resid_mid")
    elif io == "output" and (post is not None and module is post.module or post is None and
                             module is model.mlp_module(layer)):
        found = block_name(layer, "hook_mlp_out")
    if found is None or not model.has_hook(found):
        raise InputError(f"{point!r} is not a point mechscope maps: it reads the pre-MLP norm's output or input, the "
                         "post-MLP norm's (or, without one, the MLP's) output, or the block's output")
    return Site(found)


def fold_site(site: "Site", W_enc: torch.Tensor, b_enc: torch.Tensor, W_skip: torch.Tensor | None,
              b_dec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``(W_enc, b_enc, W_skip, b_dec)`` reading mechscope's weighted norm output where the weights read
    TransformerLens's unweighted one: ``(y - b) / g · W = y · (W / g) - (b / g) · W`` (``W_enc [d, F]``, ``W_skip
    [d, d]`` applied ``x W_skip``). Unchanged for any other site."""
    if site.gain is None:
        return W_enc, b_enc, W_skip, b_dec
    g = site.gain.to(W_enc.dtype)
    if site.bias is not None:
        shift = (site.bias / site.gain).to(W_enc.dtype)
        b_enc = b_enc - shift @ W_enc
        if W_skip is not None:
            b_dec = b_dec - shift.to(W_skip.dtype) @ W_skip
    W_enc = W_enc / g[:, None]
    if W_skip is not None:
        W_skip = W_skip / g[:, None].to(W_skip.dtype)
    return W_enc, b_enc, W_skip, b_dec


def hf_point_of(model: HookedModel, hook: str) -> str:
    """The HF module point (Gemma Scope 2's ``hf_hook_point_in`` form) of a mechscope hook: the inverse of
    :func:`resolve_hf_point`."""
    layer, suffix = split_name(hook)
    names = {id(m): n for n, m in model.hf.named_modules()}
    ln2, post = model.ln2(layer), model.norm(layer, "mlp_post")
    if hook == model.mlp_input(layer) and ln2 is not None:
        module, io = ln2.module, "output"
    elif suffix == "hook_resid_mid" and ln2 is not None:
        module, io = ln2.module, "input"
    elif suffix == "hook_mlp_out":
        module, io = (post.module if post is not None else model.mlp_module(layer)), "output"
    elif suffix == "hook_resid_post":
        module, io = model.block(layer), "output"
    else:
        raise InputError(f"{hook} has no HF module point Gemma Scope 2's config.json can name")
    return f"{names[id(module)]}.{io}"
