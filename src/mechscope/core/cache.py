"""ActivationCache: recorded activations, with TransformerLens's shorthand and residual-stream algebra."""

from __future__ import annotations

from typing import ItemsView, Iterator, KeysView, ValuesView

import torch

from .errors import InputError, UnknownNameError
from .hookpoints import act_name, unknown_hook_message
from .placement import stack_on
from .types import Device, PosSlice


class ActivationCache:
    """Activations by hook name. ``cache["resid_post", 3]`` and ``cache["blocks.3.hook_resid_post"]`` agree.

    Built by :meth:`HookedModel.run_with_cache`; it keeps a reference to the model for the
    residual-stream helpers (norm scales, ``W_O``).
    """

    def __init__(self, store: dict[str, torch.Tensor], model, has_batch_dim: bool = True):
        self.store = store
        self.model = model
        self.has_batch_dim = has_batch_dim

    # ---- dict-like ----------------------------------------------------------------
    def _key(self, key) -> str:
        n = self.model.cfg.n_layers
        if isinstance(key, tuple):
            return act_name(*key, n_layers=n)
        return act_name(key, n_layers=n)

    def __getitem__(self, key) -> torch.Tensor:
        name = self._key(key)
        if name not in self.store:
            if name in self.model.hook_names:
                raise UnknownNameError(
                    f"{name!r} was not recorded in this cache; add it to names_filter in run_with_cache "
                    f"(recorded: {len(self.store)} hook points)"
                )
            raise UnknownNameError(unknown_hook_message(name, self.model.hook_names))
        return self.store[name]

    def __contains__(self, key) -> bool:
        try:
            return self._key(key) in self.store
        except KeyError:
            return False

    def __iter__(self) -> Iterator[str]:
        return iter(self.store)

    def __len__(self) -> int:
        return len(self.store)

    def keys(self) -> KeysView[str]:
        return self.store.keys()

    def values(self) -> ValuesView[torch.Tensor]:
        return self.store.values()

    def items(self) -> ItemsView[str, torch.Tensor]:
        return self.store.items()

    def to(self, device: Device) -> "ActivationCache":
        return ActivationCache({k: v.to(device) for k, v in self.store.items()}, self.model, self.has_batch_dim)

    def remove_batch_dim(self) -> "ActivationCache":
        """For a batch of one: drop the batch axis from every activation."""
        if not self.has_batch_dim:
            return self
        for k, v in self.store.items():
            if v.shape[0] != 1:
                raise InputError(f"remove_batch_dim needs batch size 1; {k} has batch {v.shape[0]}")
        return ActivationCache({k: v[0] for k, v in self.store.items()}, self.model, has_batch_dim=False)

    def __repr__(self) -> str:
        more = ", ..." if len(self.store) > 4 else ""
        return f"ActivationCache({len(self.store)} hook points: {', '.join(list(self.store)[:4])}{more})"

    # ---- residual stream ------------------------------------------------------------
    def _n(self, layer: int | None) -> int:
        n = self.model.cfg.n_layers
        if layer is None:
            return n
        if layer < 0:
            layer += n
        if not 0 <= layer <= n:
            raise InputError(f"layer must be in 0..{n}, got {layer}")
        return layer

    def accumulated_resid(self, layer: int | None = None, incl_mid: bool = False, apply_ln: bool = False,
                          pos_slice: PosSlice = None,
                          return_labels: bool = False) -> torch.Tensor | tuple[torch.Tensor, list[str]]:
        """The residual stream entering each block below ``layer`` (``None``: all, plus the final one).

        Returns ``[component, batch, pos, d_model]`` (and labels like ``"3_pre"``, ``"3_mid"``,
        ``"final_post"``). ``apply_ln`` applies the final norm's frozen-scale linear map (see
        :meth:`apply_ln_to_stack`) to every component, as the logit lens does.
        """
        n = self._n(layer)
        comps, labels = [], []
        for i in range(n):
            comps.append(self["resid_pre", i])
            labels.append(f"{i}_pre")
            if incl_mid:
                comps.append(self["resid_mid", i])
                labels.append(f"{i}_mid")
        if layer is None or n == self.model.cfg.n_layers:
            comps.append(self["resid_post", self.model.cfg.n_layers - 1])
            labels.append("final_post")
        stack = _slice_pos(stack_on(comps), pos_slice, self.has_batch_dim)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer=None if layer is None else n, pos_slice=pos_slice,
                                           per_component=True)
        return (stack, labels) if return_labels else stack

    def decompose_resid(self, layer: int | None = None, mode: str = "all", apply_ln: bool = False,
                        incl_embeds: bool = True, pos_slice: PosSlice = None,
                        return_labels: bool = False) -> torch.Tensor | tuple[torch.Tensor, list[str]]:
        """Split the residual stream entering ``layer`` into what wrote it.

        ``resid_pre[layer] = embed (+ pos_embed) + sum_{l<layer} (attn_out[l] + mlp_out[l])``.
        Returns ``[component, batch, pos, d_model]``; ``mode`` is ``"all"``, ``"attn"`` or ``"mlp"``.
        """
        if mode not in ("all", "attn", "mlp"):
            raise InputError(f"mode must be 'all', 'attn' or 'mlp', got {mode!r}")
        n = self._n(layer)
        comps, labels = [], []
        if incl_embeds:
            comps.append(self["embed"])
            labels.append("embed")
            if "hook_pos_embed" in self.model.hook_names:
                comps.append(self["pos_embed"])
                labels.append("pos_embed")
        for i in range(n):
            if mode in ("all", "attn"):
                comps.append(self["attn_out", i])
                labels.append(f"{i}_attn_out")
            if mode in ("all", "mlp"):
                comps.append(self["mlp_out", i])
                labels.append(f"{i}_mlp_out")
        stack = _slice_pos(stack_on(comps), pos_slice, self.has_batch_dim)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer=None if layer is None else n, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def stack_head_results(self, layer: int | None = None, apply_ln: bool = False, pos_slice: PosSlice = None,
                           return_labels: bool = False) -> torch.Tensor | tuple[torch.Tensor, list[str]]:
        """Per-head outputs of every layer below ``layer``: ``[layer*head, batch, pos, d_model]``, labels ``"L3H5"``.

        Uses the recorded ``attn.hook_result`` where present, otherwise computes it from ``attn.hook_z``
        (``result_h = z_h @ W_O[h]``, with Gemma's post-norm scale frozen; see ``HookedModel.head_results``).
        """
        n = self._n(layer)
        comps, labels = [], []
        for i in range(n):
            if ("result", i) in self:
                r = self["result", i]
            elif ("z", i) in self:
                z = self["z", i]
                r = self.model.head_results(i, z if self.has_batch_dim else z[None])
                r = r if self.has_batch_dim else r[0]
            else:
                raise UnknownNameError(f"stack_head_results needs blocks.{i}.attn.hook_z or hook_result in the cache")
            comps.append(r.movedim(-2, 0))
            labels += [f"L{i}H{h}" for h in range(r.shape[-2])]
        stack = _slice_pos(stack_on(comps, cat=True), pos_slice, self.has_batch_dim)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer=None if layer is None else n, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def ln_scale(self, layer: int | None = None, mlp_input: bool = False, pos_slice: PosSlice = None) -> torch.Tensor:
        """The frozen norm scale ``[batch, pos, 1]`` of the final norm (``layer=None``) or block ``layer``'s ln1/ln2
        (``mlp_input``): ``1 / sqrt(var + eps)`` of the cached residual stream that enters that norm."""
        norm, resid = self._norm_input(layer, mlp_input, pos_slice)
        return norm.scale(resid)

    def _norm_input(self, layer: int | None, mlp_input: bool, pos_slice):
        """(the norm, the cached residual stream entering it) for the final norm or block ``layer``'s ln1/ln2."""
        model = self.model
        if layer is None or layer == model.cfg.n_layers:
            norm, resid = model.ln_final, self["resid_post", model.cfg.n_layers - 1]
        elif mlp_input:
            norm = model.ln2(layer)
            resid = self["resid_pre" if model.cfg.parallel_residual else "resid_mid", layer]
        else:
            norm, resid = model.ln1(layer), self["resid_pre", layer]
        return norm, _slice_pos(resid, pos_slice, self.has_batch_dim, stacked=False)

    def apply_ln_to_stack(self, residual_stack: torch.Tensor, layer: int | None = None, mlp_input: bool = False,
                          pos_slice: PosSlice = None, per_component: bool = False) -> torch.Tensor:
        """Pass each component of a residual decomposition through a norm with its scale frozen.

        ``out_i = center(x_i) * scale(resid) * gain`` where ``resid`` is the cached full residual at
        that norm (the final norm for ``layer=None``, else block ``layer``'s ln1, or ln2 with
        ``mlp_input``). Unlike TransformerLens (which folds the gain into the weights) the gain is
        applied; the norm bias is not (it is a constant, separate term). So the components sum to
        ``norm(resid) - bias`` exactly. ``per_component=True`` uses each component's own scale
        instead (the logit lens: each entry is a full residual stream).
        """
        norm, resid = self._norm_input(layer, mlp_input, pos_slice)
        if per_component:
            return norm.apply_frozen(residual_stack, norm.scale(residual_stack))
        return norm.apply_frozen(residual_stack, norm.scale(resid))


def pos_index(pos_slice: PosSlice) -> slice | torch.Tensor | None:
    """An int, slice or list of positions as an index (``-1`` keeps the last position as an axis)."""
    if pos_slice is None:
        return None
    if isinstance(pos_slice, int):
        return slice(pos_slice, pos_slice + 1) if pos_slice != -1 else slice(-1, None)
    if isinstance(pos_slice, slice):
        return pos_slice
    return torch.as_tensor(list(pos_slice), dtype=torch.long)


def _slice_pos(x: torch.Tensor, pos_slice: PosSlice, has_batch_dim: bool, stacked: bool = True) -> torch.Tensor:
    """``x`` at the positions ``pos_slice`` (axis 1 of a stack ``[component, batch, pos, ...]``)."""
    index = pos_index(pos_slice)
    if index is None:
        return x
    idx = [slice(None)] * x.dim()
    idx[(1 if stacked else 0) + (1 if has_batch_dim else 0)] = index
    return x[tuple(idx)]
