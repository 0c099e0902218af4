"""HookedModel: TransformerLens-named hook points on a Hugging Face causal LM's own forward pass.

The HF model is wrapped, never copied or reimplemented: HF's forward pass is the ground truth,
and with no hooks active the logits are HF's to the bit. Hook points (shapes for a batch of
``batch`` sequences of ``pos`` tokens; see ``docs/hooks.md`` for the per-family meaning):

====================================  ==========================================  ==========================
name                                  meaning                                     shape
====================================  ==========================================  ==========================
hook_embed                            token embedding (Gemma: times sqrt(d_model)) [batch, pos, d_model]
hook_pos_embed                        learned position embedding (GPT-2 only)     [batch, pos, d_model]
blocks.L.hook_resid_pre               residual stream entering block L            [batch, pos, d_model]
blocks.L.ln1.hook_normalized          output of the pre-attention norm            [batch, pos, d_model]
blocks.L.attn.hook_q / hook_k / hook_v  projections ``ln1 @ W + b``, pre-rotary  [batch, pos, head|kv_head, d_head]
blocks.L.attn.hook_rot_q / hook_rot_k   what attention uses (q/k-norm, rotary)   [batch, pos, head|kv_head, d_head]
blocks.L.attn.hook_attn_scores        scaled (soft-capped) scores plus mask       [batch, head, q_pos, k_pos]
blocks.L.attn.hook_pattern            softmax of the scores                       [batch, head, q_pos, k_pos]
blocks.L.attn.hook_z                  pattern @ v, per query head                 [batch, pos, head, d_head]
blocks.L.attn.hook_result             per-head contribution to hook_attn_out      [batch, pos, head, d_model]
blocks.L.hook_attn_out                what attention adds to the residual stream  [batch, pos, d_model]
blocks.L.hook_resid_mid               resid_pre + attn_out                        [batch, pos, d_model]
blocks.L.ln2.hook_normalized          output of the pre-MLP norm                  [batch, pos, d_model]
blocks.L.mlp.hook_pre                 MLP pre-activation (gated: the gate)        [batch, pos, d_mlp]
blocks.L.mlp.hook_pre_linear          gated MLPs only: the up projection          [batch, pos, d_mlp]
blocks.L.mlp.hook_post                the neurons: input of the down projection   [batch, pos, d_mlp]
blocks.L.hook_mlp_out                 what the MLP adds to the residual stream    [batch, pos, d_model]
blocks.L.hook_resid_post              residual stream leaving block L             [batch, pos, d_model]
ln_final.hook_normalized              output of the final norm                    [batch, pos, d_model]
====================================  ==========================================  ==========================
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Sequence

import torch

from . import attention as _attn
from .families import Family, dims_from_config, family_for, get_path
from .hooks import HookManager, HookPoint, StopForward, split_name
from .norms import NormSpec

Tokens = torch.Tensor  # [batch, pos] int64


@dataclass
class ModelConfig:
    """The facts a technique needs about a model, read from the HF config and modules."""

    model_name: str
    model_type: str
    family: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int
    d_vocab: int
    n_ctx: int
    act_fn: str
    normalization: str
    positional: str  # "rotary" | "learned"
    parallel_residual: bool
    gated_mlp: bool
    qk_norm: bool
    post_norms: bool
    attn_softcap: float | None = None
    final_softcap: float | None = None
    sliding_window: int | None = None
    layer_types: list[str] | None = None
    embed_scale: float = 1.0
    tied_embeddings: bool = False
    default_prepend_bos: bool = False
    dtype: str = "float32"
    device: str = "cpu"
    extra: dict = field(default_factory=dict)

    @property
    def n_groups(self) -> int:
        """Query heads per KV head (grouped-query attention); query head h reads KV head h // n_groups."""
        return self.n_heads // self.n_kv_heads

    def to_dict(self) -> dict:
        return asdict(self)


def _build_config(hf, fam: Family, name: str, tokenizer) -> ModelConfig:
    c = hf.config
    dims = dims_from_config(c)
    embed = get_path(hf, fam.embed)
    scale = getattr(embed, "scalar_embed_scale", None)
    bos_default = False
    if tokenizer is not None and tokenizer.bos_token_id is not None:
        ids = tokenizer("a").input_ids
        bos_default = bool(ids) and ids[0] == tokenizer.bos_token_id
    p = next(hf.parameters())
    act = next((getattr(c, a) for a in ("hidden_activation", "hidden_act", "activation_function")
                if getattr(c, a, None) is not None), None)
    return ModelConfig(
        model_name=name,
        model_type=c.model_type,
        family=fam.name,
        n_layers=len(get_path(hf, fam.layers)),
        d_model=dims["d_model"],
        n_heads=dims["n_heads"],
        n_kv_heads=dims["n_kv_heads"],
        d_head=dims["d_head"],
        d_mlp=dims["d_mlp"],
        d_vocab=get_path(hf, fam.unembed).weight.shape[0],
        n_ctx=dims["n_ctx"],
        act_fn=str(act),
        normalization=fam.norm,
        positional="rotary" if fam.rotary else "learned",
        parallel_residual=bool(getattr(c, "use_parallel_residual", fam.parallel_residual)),
        gated_mlp=dims["gated_mlp"],
        qk_norm=fam.qk_norm,
        post_norms=dims["post_norms"],
        attn_softcap=getattr(c, "attn_logit_softcapping", None),
        final_softcap=getattr(c, "final_logit_softcapping", None),
        sliding_window=getattr(c, "sliding_window", None),
        layer_types=list(getattr(c, "layer_types", None) or []) or None,
        embed_scale=float(scale) if scale is not None else 1.0,
        tied_embeddings=get_path(hf, fam.unembed).weight is embed.weight,
        default_prepend_bos=bos_default,
        dtype=str(p.dtype).replace("torch.", ""),
        device=str(p.device),
    )


def _out0(output):
    return output[0] if isinstance(output, tuple) else output


def _with_out0(output, new):
    return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new


def _in_to_out(module: torch.nn.Module, conv1d: bool) -> torch.Tensor:
    """A projection's weight as ``[d_in, d_out]`` (so that ``y = x @ W + b``)."""
    return module.weight if conv1d else module.weight.T


class HookedModel(torch.nn.Module):
    """A Hugging Face causal LM with TransformerLens-named hook points. See the module docstring.

    Build one with :func:`mechscope.load` or ``HookedModel(hf_model, tokenizer)``.
    """

    def __init__(self, hf_model, tokenizer=None, name: str | None = None):
        super().__init__()
        self.hf = hf_model.eval()
        self.tokenizer = tokenizer
        self.family = family_for(hf_model.config)
        self.cfg = _build_config(hf_model, self.family, name or getattr(hf_model.config, "_name_or_path", "?"), tokenizer)
        fam = self.family
        self._layers = get_path(hf_model, fam.layers)
        self._embed = get_path(hf_model, fam.embed)
        self._pos_embed = get_path(hf_model, fam.pos_embed) if fam.pos_embed else None
        self._final_norm = get_path(hf_model, fam.final_norm)
        self._unembed = get_path(hf_model, fam.unembed)
        self.hook_names = self._list_hook_names()
        self.manager = HookManager(self.hook_names, self._groups_of, self._install)
        _attn.register()
        base = hf_model.config._attn_implementation
        if base not in _attn.IMPLEMENTATIONS and base not in _attn.IMPLEMENTATIONS.values():
            base = "sdpa"
        impl = _attn.IMPLEMENTATIONS.get(base, base)
        hf_model.set_attn_implementation(impl)
        if hf_model.config._attn_implementation != impl:  # pragma: no cover - depends on transformers
            hf_model.config._attn_implementation = impl
        self.attn_implementation = impl
        for layer, block in enumerate(self._layers):
            setattr(self._attn_module(layer), _attn.OWNER_ATTR, _attn.Owner(self.manager, layer))

    # ------------------------------------------------------------------ structure
    def _sub(self, layer: int, path: str | None):
        return get_path(self._layers[layer], path) if path else None

    def _attn_module(self, layer: int):
        return self._sub(layer, self.family.attn)

    def _mlp_module(self, layer: int):
        return self._sub(layer, self.family.mlp)

    def _list_hook_names(self) -> list[str]:
        fam, cfg = self.family, self.cfg
        names = ["hook_embed"] + (["hook_pos_embed"] if fam.pos_embed else [])
        per_layer = ["hook_resid_pre", "ln1.hook_normalized", "attn.hook_q", "attn.hook_k", "attn.hook_v"]
        if fam.rotary or fam.qk_norm:
            per_layer += ["attn.hook_rot_q", "attn.hook_rot_k"]
        per_layer += ["attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_z", "attn.hook_result",
                      "hook_attn_out", "hook_resid_mid", "ln2.hook_normalized", "mlp.hook_pre"]
        if fam.mlp_gate is not None:
            per_layer.append("mlp.hook_pre_linear")
        per_layer += ["mlp.hook_post", "hook_mlp_out", "hook_resid_post"]
        for layer in range(cfg.n_layers):
            names += [f"blocks.{layer}.{n}" for n in per_layer]
        names.append("ln_final.hook_normalized")
        return names

    # ------------------------------------------------------------------ hook sites
    def _groups_of(self, name: str) -> list:
        layer, rest = split_name(name)
        if layer is None:
            return [name]
        if rest in _attn.ATTN_INTERNAL:
            return []
        if rest == "hook_resid_mid":
            return [("pre", layer), ("attn_out", layer)]
        if rest == "attn.hook_result":
            return [("attn_out", layer)]
        return [(_GROUP_OF_REST[rest], layer)]

    def _install(self, group) -> list:
        fam, m = self.family, self.manager
        if isinstance(group, str):
            if group == "hook_embed":
                return [self._embed.register_forward_hook(_fire_output(m, "hook_embed"))]
            if group == "hook_pos_embed":
                return [self._pos_embed.register_forward_hook(_fire_output(m, "hook_pos_embed"))]
            if group == "ln_final.hook_normalized":
                return [self._final_norm.register_forward_hook(_fire_output(m, group))]
            raise KeyError(group)  # pragma: no cover
        kind, layer = group
        p = f"blocks.{layer}."
        if kind == "stop":
            target = self._layers[layer] if layer < self.cfg.n_layers else self._final_norm
            return [target.register_forward_pre_hook(_raise_stop, with_kwargs=True)]
        block = self._layers[layer]
        if kind == "pre":
            return [block.register_forward_pre_hook(self._resid_pre_hook(layer), with_kwargs=True)]
        if kind == "post":
            return [block.register_forward_hook(_fire_output(m, p + "hook_resid_post"))]
        if kind == "ln1":
            return [self._sub(layer, fam.ln1).register_forward_hook(_fire_output(m, p + "ln1.hook_normalized"))]
        if kind == "ln2":
            return [self._sub(layer, fam.ln2).register_forward_hook(_fire_output(m, p + "ln2.hook_normalized"))]
        if kind == "attn_out":
            site = self._sub(layer, fam.attn_post_norm) if fam.attn_post_norm else self._attn_module(layer)
            return [site.register_forward_hook(self._attn_out_hook(layer))]
        if kind == "mlp_out":
            site = self._sub(layer, fam.mlp_post_norm) if fam.mlp_post_norm else self._mlp_module(layer)
            return [site.register_forward_hook(_fire_output(m, p + "hook_mlp_out"))]
        if kind == "qkv":
            return self._install_qkv(layer)
        if kind == "mlp_in":
            return self._install_mlp_in(layer)
        if kind == "mlp_post":
            down = get_path(self._mlp_module(layer), fam.mlp_out)
            return [down.register_forward_pre_hook(_fire_input(m, p + "mlp.hook_post"))]
        raise KeyError(group)  # pragma: no cover

    def _resid_pre_hook(self, layer: int):
        m, name = self.manager, f"blocks.{layer}.hook_resid_pre"

        def hook(module, args, kwargs):
            if args:
                x = args[0]
            else:
                x = kwargs["hidden_states"]
            new = m.fire(name, x) if m.is_active(name) else x
            m.stash[("pre", layer)] = new
            if new is x:
                return None
            if args:
                return (new,) + tuple(args[1:]), kwargs
            return args, {**kwargs, "hidden_states": new}

        return hook

    def _attn_out_hook(self, layer: int):
        m, fam = self.manager, self.family
        p = f"blocks.{layer}."
        n_result, n_out, n_mid = p + "attn.hook_result", p + "hook_attn_out", p + "hook_resid_mid"

        def hook(module, args, output):
            out = _out0(output)
            orig = out
            if m.is_active(n_result):
                z = m.stash.pop(("z", layer))
                pre_norm = args[0] if fam.attn_post_norm else None
                res = self.head_results(layer, z, pre_norm_out=pre_norm)
                new_res = m.fire(n_result, res)
                if new_res is not res and not torch.equal(new_res, res):
                    out = (new_res.sum(-2) + self._result_bias(layer, pre_norm, res)).to(out.dtype)
                elif m.has_backward(n_result) and new_res.requires_grad:
                    # same value, but the gradient flows through the per-head results (straight-through);
                    # with a post-attention norm (Gemma 2/3) its scale is treated as a constant
                    s = new_res.sum(-2).to(out.dtype)
                    out = out.detach() + (s - s.detach())
            if m.is_active(n_out):
                out = m.fire(n_out, out)
            if m.is_active(n_mid):
                pre = m.stash[("pre", layer)]
                mid = pre + out
                new_mid = m.fire(n_mid, mid)
                rerouted = n_mid in m._bwd and new_mid.requires_grad
                if rerouted or (new_mid is not mid and not torch.equal(new_mid, mid)):
                    out = new_mid - pre
            return None if out is orig else _with_out0(output, out)

        return hook

    def _split_qkv(self, layer: int, out: torch.Tensor):
        """Fused projection output -> (q [.., head, d], k [.., kv, d], v [.., kv, d]) views, and a merger."""
        c = self.cfg
        lead = out.shape[:-1]
        if self.family.qkv_layout == "neox":
            x = out.view(*lead, c.n_heads, 3, c.d_head)
            return (x[..., 0, :], x[..., 1, :], x[..., 2, :]), (
                lambda q, k, v: torch.stack([q, k, v], dim=-2).reshape(*lead, -1)
            )
        sizes = [c.n_heads * c.d_head, c.n_kv_heads * c.d_head, c.n_kv_heads * c.d_head]
        q, k, v = out.split(sizes, dim=-1)
        return (q.view(*lead, c.n_heads, c.d_head), k.view(*lead, c.n_kv_heads, c.d_head),
                v.view(*lead, c.n_kv_heads, c.d_head)), (
            lambda q, k, v: torch.cat([q.flatten(-2), k.flatten(-2), v.flatten(-2)], dim=-1)
        )

    def _install_qkv(self, layer: int) -> list:
        fam, m, c = self.family, self.manager, self.cfg
        attn = self._attn_module(layer)
        p = f"blocks.{layer}.attn."
        if fam.qkv_layout == "separate":
            handles = []
            for short, path, heads in (("q", fam.q, c.n_heads), ("k", fam.k, c.n_kv_heads), ("v", fam.v, c.n_kv_heads)):
                handles.append(get_path(attn, path).register_forward_hook(
                    _fire_output(m, f"{p}hook_{short}", view=(heads, c.d_head))))
            return handles

        def hook(module, args, output):
            parts, merge = self._split_qkv(layer, output)
            new = [m.fire(f"{p}hook_{s}", t) if m.is_active(f"{p}hook_{s}") else t for s, t in zip("qkv", parts)]
            if all(a is b for a, b in zip(new, parts)) and not any(m.has_backward(f"{p}hook_{s}") for s in "qkv"):
                return None
            return merge(*new)

        return [get_path(attn, fam.qkv).register_forward_hook(hook)]

    def _install_mlp_in(self, layer: int) -> list:
        fam, m = self.family, self.manager
        mlp = self._mlp_module(layer)
        p = f"blocks.{layer}.mlp."
        if fam.mlp_gate_up_fused:
            def hook(module, args, output):
                gate, up = output.chunk(2, dim=-1)
                g2 = m.fire(p + "hook_pre", gate) if m.is_active(p + "hook_pre") else gate
                u2 = m.fire(p + "hook_pre_linear", up) if m.is_active(p + "hook_pre_linear") else up
                if g2 is gate and u2 is up and not (m.has_backward(p + "hook_pre") or m.has_backward(p + "hook_pre_linear")):
                    return None
                return torch.cat([g2, u2], dim=-1)

            return [get_path(mlp, fam.mlp_gate).register_forward_hook(hook)]
        if fam.mlp_gate is None:
            return [get_path(mlp, fam.mlp_in).register_forward_hook(_fire_output(m, p + "hook_pre"))]
        return [
            get_path(mlp, fam.mlp_gate).register_forward_hook(_fire_output(m, p + "hook_pre")),
            get_path(mlp, fam.mlp_in).register_forward_hook(_fire_output(m, p + "hook_pre_linear")),
        ]

    # ------------------------------------------------------------------ per-head results
    def head_results(self, layer: int, z: torch.Tensor, pre_norm_out: torch.Tensor | None = None) -> torch.Tensor:
        """Per-head contribution to ``hook_attn_out``: ``result[h] = z[h] @ W_O[h]`` ``[batch, pos, head, d_model]``.

        For families with a post-attention norm (Gemma 2/3), ``attn_out = norm(sum_h z_h W_O_h + b_O)``;
        the norm's scale is frozen from the actual forward pass so ``sum_h result_h + bias == attn_out``.
        ``pre_norm_out`` is the norm's input when known; otherwise it is recomputed from ``z``.
        """
        W_O = self.W_O_layer(layer)  # [head, d_head, d_model]
        raw = torch.einsum("bphd,hdm->bphm", z.float(), W_O.float())
        if not self.family.attn_post_norm:
            return raw.to(z.dtype)
        norm = self._norm_spec(self._sub(layer, self.family.attn_post_norm))
        o = pre_norm_out if pre_norm_out is not None else raw.sum(-2) + self._b_O(layer).float()
        s = norm.scale(o)  # [batch, pos, 1]
        return (raw * s[..., None, :] * norm.gain.float()).to(z.dtype)

    def _result_bias(self, layer: int, pre_norm_out, like: torch.Tensor) -> torch.Tensor:
        b = self._b_O(layer).float()
        if self.family.attn_post_norm:
            norm = self._norm_spec(self._sub(layer, self.family.attn_post_norm))
            b = b * norm.scale(pre_norm_out) * norm.gain.float()
        return b.to(like.dtype)

    # ------------------------------------------------------------------ running
    def hooks(self, fwd_hooks=(), bwd_hooks=()):
        """Context manager: ``with model.hooks([(name_or_filter, fn)]): ...``. Removed on exit, even on error."""
        return self.manager.hooks(fwd_hooks, bwd_hooks)

    def add_hook(self, name, fn: Callable, direction: str = "fwd"):
        """Attach a hook until ``.remove()`` is called on the returned handle or :meth:`reset_hooks`."""
        entries = self.manager.add(self.manager.make_entries([(name, fn)], direction))
        return _Handle(self.manager, entries)

    def reset_hooks(self) -> None:
        """Remove every mechscope hook on this model (the user's own included)."""
        self.manager.remove_all()

    def forward(
        self,
        input,
        attention_mask: torch.Tensor | None = None,
        return_type: str | None = "logits",
        stop_at_layer: int | None = None,
        prepend_bos: bool | None = None,
        padding_side: str | None = None,
        logits_to_keep: int = 0,
    ):
        """Run HF's forward pass. ``input`` is text, a list of texts, or tokens ``[batch, pos]``.

        Returns logits ``[batch, pos, d_vocab]`` (``return_type="logits"``), the mean next-token loss
        (``"loss"``), both, or nothing. With ``stop_at_layer=L`` the layers from L on are not run and the
        residual stream entering block L (``[batch, pos, d_model]``) is returned. ``logits_to_keep=k``
        computes the logits of the last ``k`` positions only. Padded batches: pass ``attention_mask``; text lists are padded and masked automatically.
        """
        tokens, attention_mask = self._prepare(input, attention_mask, prepend_bos, padding_side)
        kwargs = {"input_ids": tokens}
        if logits_to_keep:
            kwargs["logits_to_keep"] = logits_to_keep
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
            kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        elif self._pos_embed is not None:  # learned positions: batched, so hook_pos_embed is [batch, pos, d]
            kwargs["position_ids"] = torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape)
        if stop_at_layer is not None:
            if not 0 <= stop_at_layer <= self.cfg.n_layers:
                raise ValueError(f"stop_at_layer must be in 0..{self.cfg.n_layers}, got {stop_at_layer}")
            handles = self._install(("stop", stop_at_layer))
            try:
                self.hf(**kwargs)
            except StopForward as stop:
                return stop.value
            finally:
                for h in handles:
                    h.remove()
            raise RuntimeError("stop_at_layer did not stop the forward pass")  # pragma: no cover
        out = self.hf(**kwargs)
        if return_type is None:
            return None
        logits = out.logits
        if return_type == "logits":
            return logits
        loss = lm_loss(logits, tokens, attention_mask)
        if return_type == "loss":
            return loss
        if return_type == "both":
            return logits, loss
        raise ValueError(f"return_type must be 'logits', 'loss', 'both' or None, got {return_type!r}")

    @contextmanager
    def _from_layer(self, layer: int):
        """Temporarily make HF's decoder loop start at block ``layer`` (fed through ``inputs_embeds``)."""
        parent_path, _, attr = self.family.layers.rpartition(".")
        parent = get_path(self.hf, parent_path) if parent_path else self.hf
        cfgs = {id(c): c for c in (self.hf.config, getattr(parent, "config", None)) if c is not None}
        saved_types = {k: getattr(c, "layer_types", None) for k, c in cfgs.items()}
        handles = []
        if self._pos_embed is not None:  # positions are already in the residual stream
            handles.append(self._pos_embed.register_forward_hook(lambda m, a, out: torch.zeros_like(out)))
        setattr(parent, attr, torch.nn.ModuleList(list(self._layers)[layer:]))
        try:
            for k, c in cfgs.items():
                if saved_types[k] is not None:
                    c.layer_types = list(saved_types[k])[layer:]
            yield
        finally:
            setattr(parent, attr, self._layers)
            for k, c in cfgs.items():
                if saved_types[k] is not None:
                    c.layer_types = saved_types[k]
            for h in handles:
                h.remove()

    def run_from(
        self,
        layer: int,
        resid: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        past_key_values=None,
        attention_mask: torch.Tensor | None = None,
        logits_to_keep: int = 0,
    ) -> torch.Tensor:
        """Run blocks ``layer..n_layers-1`` (HF's own loop, masks and rotary) from a residual stream.

        ``resid`` ``[batch, pos, d_model]`` is the stream entering block ``layer`` (``hook_resid_pre``).
        With ``past_key_values`` (an HF cache holding earlier positions) only the new positions are run;
        pass their ``position_ids``. Returns logits ``[batch, pos, d_vocab]`` (the last ``logits_to_keep``
        positions only, when it is positive). Hooks on the blocks run fire
        as usual; hooks on earlier blocks and on the embedding do not.
        """
        if not 0 <= layer <= self.cfg.n_layers:
            raise ValueError(f"layer must be in 0..{self.cfg.n_layers}, got {layer}")
        b, t = resid.shape[:2]
        if resid.shape[-1] != self.cfg.d_model:
            raise ValueError(f"resid must be [batch, pos, {self.cfg.d_model}], got {tuple(resid.shape)}")
        if position_ids is None:
            start = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = torch.arange(start, start + t, device=resid.device).expand(b, t)
        kwargs = dict(inputs_embeds=resid, position_ids=position_ids, use_cache=past_key_values is not None)
        if logits_to_keep:
            kwargs["logits_to_keep"] = logits_to_keep
        if past_key_values is not None:
            kwargs["past_key_values"] = past_key_values
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        with self._from_layer(layer):
            return self.hf(**kwargs).logits

    def run_with_hooks(self, input, fwd_hooks=(), bwd_hooks=(), **kwargs):
        """``forward`` with hooks attached for this call only (removed even if it raises)."""
        with self.hooks(fwd_hooks, bwd_hooks):
            return self(input, **kwargs)

    def run_with_cache(
        self,
        input,
        names_filter=None,
        pos_slice=None,
        device=None,
        remove_batch_dim: bool = False,
        **kwargs,
    ):
        """Run and record activations. Returns ``(output, ActivationCache)``.

        ``names_filter``: a name, a list of names, or a predicate over names. ``None`` records every
        hook point except ``attn.hook_result`` (computed only when named). ``pos_slice`` keeps only
        those positions (an int, a slice or a list; patterns are sliced on the query axis), and
        ``device`` moves each activation as it is recorded, so a narrow cache stays cheap.
        """
        from .cache import ActivationCache

        if names_filter is None:
            names = [n for n in self.hook_names if not n.endswith("attn.hook_result")]
        else:
            names = self.manager.resolve(names_filter)
        store: dict[str, torch.Tensor] = {}
        index = _pos_index(pos_slice)

        def save(act, hook):
            a = act.detach()
            if index is not None:
                a = a[:, :, index] if hook.name.endswith(("hook_pattern", "hook_attn_scores")) else a[:, index]
            if device is not None:
                a = a.to(device)
            store[hook.name] = a

        with self.hooks([(n, save) for n in names]):
            out = self(input, **kwargs)
        cache = ActivationCache(store, self)
        if remove_batch_dim:
            cache = cache.remove_batch_dim()
        return out, cache

    # ------------------------------------------------------------------ tokens
    def _prepare(self, input, attention_mask, prepend_bos, padding_side):
        if isinstance(input, (str, list, tuple)) and not isinstance(input, torch.Tensor):
            if isinstance(input, (list, tuple)) and input and not isinstance(input[0], str):
                raise TypeError("pass tokens as a tensor [batch, pos], or text as a string or list of strings")
            tokens, mask = self.tokenize(input, prepend_bos=prepend_bos, padding_side=padding_side)
            if attention_mask is None and bool((mask == 0).any()):
                attention_mask = mask
            return tokens, attention_mask
        tokens = input
        if tokens.dim() == 1:
            tokens = tokens[None]
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [batch, pos], got shape {tuple(tokens.shape)}")
        dev = self.device
        tokens = tokens.to(dev)
        if attention_mask is not None:
            attention_mask = attention_mask.to(dev)
            if attention_mask.shape != tokens.shape:
                raise ValueError(
                    f"attention_mask shape {tuple(attention_mask.shape)} does not match tokens {tuple(tokens.shape)}"
                )
        return tokens, attention_mask

    @property
    def device(self) -> torch.device:
        return self._embed.weight.device

    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer; pass token ids instead of text")
        return self.tokenizer

    def _encode(self, text: str, prepend_bos: bool | None) -> list[int]:
        tok = self._need_tokenizer()
        ids = tok(text, add_special_tokens=False).input_ids
        if prepend_bos is None:
            prepend_bos = self.cfg.default_prepend_bos
        bos = tok.bos_token_id
        if prepend_bos and bos is not None and (not ids or ids[0] != bos):
            ids = [bos] + ids
        return ids

    def tokenize(self, text, prepend_bos: bool | None = None, padding_side: str | None = None):
        """Text (or a list) -> ``(tokens [batch, pos], attention_mask [batch, pos])``, padded.

        ``prepend_bos=None`` follows the tokenizer's own default (``cfg.default_prepend_bos``:
        False for SmolLM2, True for Gemma); a BOS already at the start is never doubled.
        ``padding_side`` defaults to ``"right"``.
        """
        texts = [text] if isinstance(text, str) else list(text)
        if not texts:
            raise ValueError("no text given")
        seqs = [self._encode(t, prepend_bos) for t in texts]
        n = max(len(s) for s in seqs)
        if n == 0:
            raise ValueError("the text tokenizes to zero tokens")
        pad = self.pad_token_id
        side = padding_side or "right"
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        tokens = torch.full((len(seqs), n), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), n), dtype=torch.long)
        for i, s in enumerate(seqs):
            sl = slice(0, len(s)) if side == "right" else slice(n - len(s), n)
            tokens[i, sl] = torch.tensor(s, dtype=torch.long)
            mask[i, sl] = 1
        return tokens.to(self.device), mask.to(self.device)

    @property
    def pad_token_id(self) -> int:
        tok = self._need_tokenizer()
        for cand in (tok.pad_token_id, tok.eos_token_id, 0):
            if cand is not None:
                return cand
        return 0  # pragma: no cover

    def to_tokens(self, text, prepend_bos: bool | None = None, padding_side: str | None = None) -> Tokens:
        """Text or list of texts -> tokens ``[batch, pos]`` (padded with the pad token; see :meth:`tokenize`)."""
        return self.tokenize(text, prepend_bos=prepend_bos, padding_side=padding_side)[0]

    def to_str_tokens(self, input, prepend_bos: bool | None = None) -> list[str] | list[list[str]]:
        """Each token as its string. Text or 1-D tokens give a list; a batch gives a list of lists."""
        tok = self._need_tokenizer()
        if isinstance(input, str):
            ids = self._encode(input, prepend_bos)
            return [tok.decode([i]) for i in ids]
        if isinstance(input, torch.Tensor):
            if input.dim() == 2:
                return [self.to_str_tokens(row) for row in input]
            return [tok.decode([int(i)]) for i in input.tolist()]
        return [tok.decode([int(i)]) for i in input]

    def to_string(self, tokens) -> str | list[str]:
        """Tokens ``[pos]`` -> text, or ``[batch, pos]`` -> list of texts."""
        tok = self._need_tokenizer()
        if isinstance(tokens, torch.Tensor) and tokens.dim() == 2:
            return [tok.decode(row.tolist()) for row in tokens]
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.tolist()
        return tok.decode(list(tokens))

    def to_single_token(self, text: str) -> int:
        """The id of ``text`` if it is exactly one token; a ValueError showing its tokenization otherwise."""
        tok = self._need_tokenizer()
        ids = tok(text, add_special_tokens=False).input_ids
        if len(ids) != 1:
            pieces = [tok.decode([i]) for i in ids]
            raise ValueError(
                f"{text!r} is {len(ids)} tokens, not one: {pieces}. Answers and targets must be single "
                f"tokens; mind the leading space (e.g. ' Paris' vs 'Paris')."
            )
        return ids[0]

    @torch.no_grad()
    def generate(
        self,
        input,
        max_new_tokens: int = 20,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        fwd_hooks=(),
        prepend_bos: bool | None = None,
        return_type: str = "str",
    ):
        """Continue text with HF's ``generate`` (greedy by default), with hooks active throughout.

        Batched prompts are left-padded with an attention mask. With the KV cache, hooks see only
        the new positions at each step (attention-internal hooks see keys over all positions).
        ``return_type``: ``"str"`` (continuations including the prompt) or ``"tokens"``.
        """
        tokens, mask = self.tokenize(input, prepend_bos=prepend_bos, padding_side="left") if not isinstance(
            input, torch.Tensor) else (self._prepare(input, None, None, None)[0], None)
        if mask is None:
            mask = torch.ones_like(tokens)
        if seed is not None:
            torch.manual_seed(seed)
        gen_kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=self.pad_token_id)
        if do_sample:
            gen_kwargs.update(temperature=temperature, top_k=top_k, top_p=top_p)
        else:
            gen_kwargs.update(temperature=None, top_k=None, top_p=None)
        with self.hooks(fwd_hooks):
            out = self.hf.generate(input_ids=tokens, attention_mask=mask, **gen_kwargs)
        if return_type == "tokens":
            return out
        texts = [self.tokenizer.decode(row, skip_special_tokens=True) for row in out]
        return texts[0] if isinstance(input, str) else texts

    # ------------------------------------------------------------------ weights
    def _norm_spec(self, module) -> NormSpec:
        return NormSpec(self.family.norm, module)

    @property
    def ln_final(self) -> NormSpec:
        """The final norm: callable, plus ``scale``/``gain``/``bias``/``apply_frozen`` (see :mod:`mechscope.norms`)."""
        return self._norm_spec(self._final_norm)

    def ln1(self, layer: int) -> NormSpec:
        return self._norm_spec(self._sub(layer, self.family.ln1))

    def ln2(self, layer: int) -> NormSpec:
        return self._norm_spec(self._sub(layer, self.family.ln2))

    def _qkv_layer(self, layer: int):
        """(W_Q [head, d_model, d_head], W_K [kv, ..], W_V [kv, ..], b_Q [head, d_head], b_K, b_V)."""
        fam, c = self.family, self.cfg
        attn = self._attn_module(layer)
        m, h, kv, d = c.d_model, c.n_heads, c.n_kv_heads, c.d_head

        def heads(W, n):  # [d_model, n*d] -> [n, d_model, d]
            return W.reshape(m, n, d).permute(1, 0, 2)

        def bias_heads(b, n):
            return b.reshape(n, d) if b is not None else torch.zeros(n, d, dtype=self.dtype, device=self.device)

        if fam.qkv_layout == "separate":
            mods = [get_path(attn, p) for p in (fam.q, fam.k, fam.v)]
            Ws = [heads(_in_to_out(mod, fam.conv1d), n) for mod, n in zip(mods, (h, kv, kv))]
            bs = [bias_heads(mod.bias, n) for mod, n in zip(mods, (h, kv, kv))]
            return (*Ws, *bs)
        mod = get_path(attn, fam.qkv)
        W = _in_to_out(mod, fam.conv1d)
        b = mod.bias
        if fam.qkv_layout == "neox":
            W4 = W.reshape(m, h, 3, d)
            b3 = b.reshape(h, 3, d) if b is not None else None
            Ws = [W4[:, :, i].permute(1, 0, 2) for i in range(3)]
            bs = [b3[:, i] if b3 is not None else bias_heads(None, h) for i in range(3)]
            return (*Ws, *bs)
        sizes = [h * d, kv * d, kv * d]
        Ws = [heads(w, n) for w, n in zip(W.split(sizes, dim=1), (h, kv, kv))]
        bs = [bias_heads(x, n) for x, n in zip(b.split(sizes) if b is not None else (None,) * 3, (h, kv, kv))]
        return (*Ws, *bs)

    def W_O_layer(self, layer: int) -> torch.Tensor:
        """``[head, d_head, d_model]`` for one layer."""
        c = self.cfg
        o = get_path(self._attn_module(layer), self.family.o)
        return _in_to_out(o, self.family.conv1d).reshape(c.n_heads, c.d_head, c.d_model)

    def _b_O(self, layer: int) -> torch.Tensor:
        o = get_path(self._attn_module(layer), self.family.o)
        return o.bias if o.bias is not None else torch.zeros(self.cfg.d_model, dtype=self.dtype, device=self.device)

    def _stack(self, fn) -> torch.Tensor:
        return torch.stack([fn(layer) for layer in range(self.cfg.n_layers)])

    def _expand_kv(self, x: torch.Tensor) -> torch.Tensor:
        return x.repeat_interleave(self.cfg.n_groups, dim=1)

    @property
    def dtype(self) -> torch.dtype:
        return self._embed.weight.dtype

    @property
    def W_Q(self) -> torch.Tensor:
        """``[layer, head, d_model, d_head]``: ``q = ln1_out @ W_Q + b_Q`` (before q-norm and rotary)."""
        return self._stack(lambda l: self._qkv_layer(l)[0])

    @property
    def W_K(self) -> torch.Tensor:
        """``[layer, head, d_model, d_head]``, KV heads expanded to the query heads that read them."""
        return self._expand_kv(self.W_K_kv)

    @property
    def W_V(self) -> torch.Tensor:
        """``[layer, head, d_model, d_head]``, KV heads expanded to the query heads that read them."""
        return self._expand_kv(self.W_V_kv)

    @property
    def W_K_kv(self) -> torch.Tensor:
        """``[layer, kv_head, d_model, d_head]``: the stored key weights, one per KV head."""
        return self._stack(lambda l: self._qkv_layer(l)[1])

    @property
    def W_V_kv(self) -> torch.Tensor:
        """``[layer, kv_head, d_model, d_head]``: the stored value weights, one per KV head."""
        return self._stack(lambda l: self._qkv_layer(l)[2])

    @property
    def b_Q(self) -> torch.Tensor:
        """``[layer, head, d_head]`` (zeros where the model has no bias)."""
        return self._stack(lambda l: self._qkv_layer(l)[3])

    @property
    def b_K(self) -> torch.Tensor:
        return self._expand_kv(self._stack(lambda l: self._qkv_layer(l)[4]))

    @property
    def b_V(self) -> torch.Tensor:
        return self._expand_kv(self._stack(lambda l: self._qkv_layer(l)[5]))

    @property
    def W_O(self) -> torch.Tensor:
        """``[layer, head, d_head, d_model]``: ``result_h = z_h @ W_O[h]`` (before any post-norm)."""
        return self._stack(self.W_O_layer)

    @property
    def b_O(self) -> torch.Tensor:
        """``[layer, d_model]``."""
        return self._stack(self._b_O)

    def _mlp_weights(self, layer: int):
        """(W_gate [d_model, d_mlp] | None, W_in [d_model, d_mlp], W_out [d_mlp, d_model], b_in, b_out)."""
        fam = self.family
        mlp = self._mlp_module(layer)
        out_mod = get_path(mlp, fam.mlp_out)
        W_out = _in_to_out(out_mod, fam.conv1d)
        in_mod = get_path(mlp, fam.mlp_in)
        W = _in_to_out(in_mod, fam.conv1d)
        b = in_mod.bias
        if fam.mlp_gate_up_fused:
            gate, up = W.chunk(2, dim=1)
            b_in = b.chunk(2)[1] if b is not None else None
            return gate, up, W_out, b_in, out_mod.bias
        gate = _in_to_out(get_path(mlp, fam.mlp_gate), fam.conv1d) if fam.mlp_gate else None
        return gate, W, W_out, b, out_mod.bias

    def _zeros_or(self, b, n):
        return b if b is not None else torch.zeros(n, dtype=self.dtype, device=self.device)

    @property
    def W_in(self) -> torch.Tensor:
        """``[layer, d_model, d_mlp]``: the input (gated MLPs: the up) projection."""
        return self._stack(lambda l: self._mlp_weights(l)[1])

    @property
    def W_gate(self) -> torch.Tensor | None:
        """``[layer, d_model, d_mlp]`` for gated MLPs (``post = act(x W_gate) * (x W_in)``), else None."""
        if not self.cfg.gated_mlp:
            return None
        return self._stack(lambda l: self._mlp_weights(l)[0])

    @property
    def W_out(self) -> torch.Tensor:
        """``[layer, d_mlp, d_model]``: ``mlp_out = post @ W_out + b_out`` (before any post-norm)."""
        return self._stack(lambda l: self._mlp_weights(l)[2])

    @property
    def b_in(self) -> torch.Tensor:
        return self._stack(lambda l: self._zeros_or(self._mlp_weights(l)[3], self.cfg.d_mlp))

    @property
    def b_out(self) -> torch.Tensor:
        return self._stack(lambda l: self._zeros_or(self._mlp_weights(l)[4], self.cfg.d_model))

    @property
    def W_E(self) -> torch.Tensor:
        """``[d_vocab, d_model]``, including Gemma's sqrt(d_model) scale, so ``hook_embed = W_E[tokens]``."""
        w = self._embed.weight
        return w * self.cfg.embed_scale if self.cfg.embed_scale != 1.0 else w

    @property
    def W_pos(self) -> torch.Tensor:
        """``[n_ctx, d_model]`` learned position embeddings (GPT-2 only)."""
        if self._pos_embed is None:
            raise AttributeError(f"{self.cfg.model_type} has no learned position embedding (it uses rotary)")
        return self._pos_embed.weight

    @property
    def W_U(self) -> torch.Tensor:
        """``[d_model, d_vocab]``: ``logits = ln_final(resid) @ W_U + b_U`` (then soft-capping, Gemma 2)."""
        return self._unembed.weight.T

    @property
    def b_U(self) -> torch.Tensor:
        b = getattr(self._unembed, "bias", None)
        return self._zeros_or(b, self.cfg.d_vocab)

    def unembed(self, normalized: torch.Tensor) -> torch.Tensor:
        """``[..., d_model] -> [..., d_vocab]``: the unembedding plus soft-capping where the model has it."""
        logits = self._unembed(normalized)
        cap = self.cfg.final_softcap
        return torch.tanh(logits / cap) * cap if cap else logits

    def __repr__(self) -> str:
        c = self.cfg
        return (f"HookedModel({c.model_name!r}, family={c.family}, layers={c.n_layers}, d_model={c.d_model}, "
                f"heads={c.n_heads} (kv {c.n_kv_heads}), d_mlp={c.d_mlp}, vocab={c.d_vocab}, {c.dtype} on {c.device})")


_GROUP_OF_REST = {
    "hook_resid_pre": "pre",
    "hook_resid_post": "post",
    "ln1.hook_normalized": "ln1",
    "ln2.hook_normalized": "ln2",
    "attn.hook_q": "qkv",
    "attn.hook_k": "qkv",
    "attn.hook_v": "qkv",
    "hook_attn_out": "attn_out",
    "hook_mlp_out": "mlp_out",
    "mlp.hook_pre": "mlp_in",
    "mlp.hook_pre_linear": "mlp_in",
    "mlp.hook_post": "mlp_post",
}


def _fire_output(manager: HookManager, name: str, view: tuple[int, int] | None = None):
    """A forward hook that fires ``name`` on the module output (optionally viewed as ``[.., head, d]``)."""

    def hook(module, args, output):
        if not manager.is_active(name):
            return None
        out = _out0(output)
        act = out.view(*out.shape[:-1], *view) if view else out
        new = manager.fire(name, act)
        if new is act and not (view and manager.has_backward(name)):
            return None  # (a view carrying backward hooks must replace the output, or its hooks never run)
        return _with_out0(output, new.flatten(-2) if view else new)

    return hook


def _fire_input(manager: HookManager, name: str):
    def hook(module, args):
        if not manager.is_active(name):
            return None
        new = manager.fire(name, args[0])
        return None if new is args[0] else (new,) + tuple(args[1:])

    return hook


def _raise_stop(module, args, kwargs):
    raise StopForward(args[0] if args else kwargs["hidden_states"])


def _pos_index(pos_slice):
    if pos_slice is None:
        return None
    if isinstance(pos_slice, int):
        return slice(pos_slice, pos_slice + 1) if pos_slice != -1 else slice(-1, None)
    if isinstance(pos_slice, slice):
        return pos_slice
    return torch.as_tensor(list(pos_slice), dtype=torch.long)


def lm_loss(logits: torch.Tensor, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None,
            per_token: bool = False) -> torch.Tensor:
    """Next-token cross-entropy: ``-log p(tokens[:, t+1] | ..t)``; mean over unmasked targets, or ``[batch, pos-1]``."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, tokens[:, 1:, None])[..., 0]
    if per_token:
        return nll
    if attention_mask is None:
        return nll.mean()
    m = attention_mask[:, 1:].to(nll.dtype) * attention_mask[:, :-1].to(nll.dtype)
    return (nll * m).sum() / m.sum()


class _Handle:
    def __init__(self, manager, entries):
        self._manager, self._entries = manager, entries

    def remove(self):
        if self._entries:
            self._manager.remove(self._entries)
            self._entries = []
