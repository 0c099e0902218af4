"""Weight views in TransformerLens's conventions, read from HF's own modules (never copied).

Row-vector convention: ``y = x @ W + b``. Attention weights are per head, with grouped-query
attention made explicit: ``W_K``/``W_V`` expand each KV head to the query heads that read it,
``W_K_kv``/``W_V_kv`` keep one per KV head. A head's contribution to the residual stream is
``result_h = z_h @ W_O[h]`` (Elhage et al. 2021); for families with a post-attention norm
(Gemma 2/3) its scale is frozen from the actual forward pass, so that
``sum_h result_h + result_bias == hook_attn_out`` exactly.
"""

from __future__ import annotations

import torch

from .config import ModelConfig
from .families import split_qkv
from .norms import NormSpec
from .parts import ModelParts
from .placement import execution_device, param


def in_to_out(module: torch.nn.Module, conv1d: bool) -> torch.Tensor:
    """A projection's weight as ``[d_in, d_out]`` (so that ``y = x @ W + b``), loaded if it is offloaded."""
    w = param(module)
    return w if conv1d else w.T


def _qkv_view(index: int, expand: bool, doc: str) -> property:
    """A stacked view of one part of :meth:`Weights.qkv` (``W_Q``, ``W_K``, ... ``b_V``)."""
    return property(lambda self: self.qkv_stack(index, expand), doc=doc)


class Weights:
    """Per-layer and stacked weight views of one model. Stacked views are ``[layer, ...]``."""

    def __init__(self, parts: ModelParts, cfg: ModelConfig):
        self.parts, self.cfg, self.family = parts, cfg, parts.family

    # ---- helpers -----------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.parts.embed.weight.dtype  # (a meta tensor keeps its dtype)

    @property
    def device(self) -> torch.device:
        """Where inputs go: the embedding's execution device (with a device_map, the first device)."""
        return execution_device(self.parts.embed)

    def _zeros(self, *shape: int) -> torch.Tensor:
        return torch.zeros(*shape, dtype=self.dtype, device=self.device)

    def _stack(self, fn) -> torch.Tensor:
        """``fn(layer)`` for every layer, stacked on the first device (layers may live on several)."""
        return torch.stack([fn(layer).to(self.device) for layer in range(self.cfg.n_layers)])

    def _expand_kv(self, x: torch.Tensor) -> torch.Tensor:
        return x.repeat_interleave(self.cfg.n_groups, dim=1)

    # ---- attention -----------------------------------------------------------------------
    def qkv(self, layer: int) -> tuple[torch.Tensor, ...]:
        """``(W_Q [head, d_model, d_head], W_K [kv, ..], W_V [kv, ..], b_Q [head, d_head], b_K, b_V)``."""
        fam, c = self.family, self.cfg
        m, h, kv, d = c.d_model, c.n_heads, c.n_kv_heads, c.d_head

        def heads(W, n):  # [d_model, n*d] -> [n, d_model, d]
            return W.reshape(m, n, d).permute(1, 0, 2)

        def bias_heads(b, n):
            return b.reshape(n, d) if b is not None else self._zeros(n, d)

        if fam.qkv_layout == "separate":
            mods = [self.parts.attn_proj(layer, p) for p in (fam.q, fam.k, fam.v)]
            Ws = [heads(in_to_out(mod, fam.conv1d), n) for mod, n in zip(mods, (h, kv, kv))]
            return (*Ws, *[bias_heads(param(mod, "bias"), n) for mod, n in zip(mods, (h, kv, kv))])
        mod = self.parts.attn_proj(layer, fam.qkv)
        W, b = in_to_out(mod, fam.conv1d), param(mod, "bias")  # W [d_model, (h + 2 kv) d]
        Ws = [w.permute(1, 0, 2) for w in split_qkv(W, fam.qkv_layout, h, kv, d)]
        bs = split_qkv(b, fam.qkv_layout, h, kv, d) if b is not None else (None,) * 3
        return (*Ws, *[x if x is not None else self._zeros(n, d) for x, n in zip(bs, (h, kv, kv))])

    def _scaled(self, w: torch.Tensor) -> torch.Tensor:
        """``w`` times the residual multiplier (Granite), so that the views map into the residual stream."""
        r = self.cfg.residual_scale
        return w * r if r != 1.0 else w

    def attn_scale(self, layer: int) -> float:
        """The factor between ``q·k`` and block ``layer``'s attention score (the module's ``scaling``, else
        ``1/sqrt(d_head)``)."""
        s = getattr(self.parts.attn(layer), "scaling", None)
        return float(s) if s is not None else self.cfg.d_head ** -0.5

    def W_O_layer(self, layer: int) -> torch.Tensor:
        """``[head, d_head, d_model]`` for one layer (times the residual multiplier, where the model has one)."""
        c = self.cfg
        o = self.parts.attn_proj(layer, self.family.o)
        return self._scaled(in_to_out(o, self.family.conv1d).reshape(c.n_heads, c.d_head, c.d_model))

    def b_O_layer(self, layer: int) -> torch.Tensor:
        """``[d_model]``: the output projection's bias (zeros where the model has none)."""
        b = param(self.parts.attn_proj(layer, self.family.o), "bias")
        return self._scaled(b) if b is not None else self._zeros(self.cfg.d_model)

    def head_results(self, layer: int, z: torch.Tensor, pre_norm_out: torch.Tensor | None = None) -> torch.Tensor:
        """Per-head contribution to ``hook_attn_out``: ``result[h] = z[h] @ W_O[h]`` ``[batch, pos, head, d_model]``.

        ``z`` is ``[batch, pos, head, d_head]``. With a post-attention norm (Gemma 2/3),
        ``attn_out = norm(sum_h z_h W_O_h + b_O)``: the norm's scale is frozen so the results and
        :meth:`result_bias` sum to ``attn_out``. ``pre_norm_out`` is the norm's input when known;
        otherwise it is recomputed from ``z``.
        """
        raw = torch.einsum("bphd,hdm->bphm", z.float(), self.W_O_layer(layer).float())
        norm = self.parts.norm(layer, "attn_post")
        if norm is None:
            return raw.to(z.dtype)
        o = pre_norm_out if pre_norm_out is not None else raw.sum(-2) + self.b_O_layer(layer).float()
        return (raw * norm.scale(o)[..., None, :] * norm.gain.float()).to(z.dtype)

    def result_bias(self, layer: int, pre_norm_out: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        """The part of ``hook_attn_out`` no head owns: ``b_O`` (through the frozen post-norm, where there is one).

        ``pre_norm_out`` ``[batch, pos, d_model]`` is the post-norm's input (ignored without a post-norm);
        the result has ``like``'s dtype and broadcasts against ``[batch, pos, d_model]``.
        """
        b = self.b_O_layer(layer).float()
        norm = self.parts.norm(layer, "attn_post")
        if norm is not None:
            b = b * norm.scale(pre_norm_out) * norm.gain.float()
        return b.to(like.dtype)

    def qkv_stack(self, index: int, expand: bool = False) -> torch.Tensor:
        """Part ``index`` of :meth:`qkv` stacked over layers; ``expand`` repeats KV heads for their query heads."""
        stacked = self._stack(lambda layer: self.qkv(layer)[index])
        return self._expand_kv(stacked) if expand else stacked

    W_Q = _qkv_view(0, False, "``[layer, head, d_model, d_head]``: ``q = ln1_out @ W_Q + b_Q`` (before q-norm and rotary).")
    W_K = _qkv_view(1, True, "``[layer, head, d_model, d_head]``, KV heads expanded to the query heads that read them.")
    W_V = _qkv_view(2, True, "``[layer, head, d_model, d_head]``, KV heads expanded to the query heads that read them.")
    W_K_kv = _qkv_view(1, False, "``[layer, kv_head, d_model, d_head]``: the stored key weights, one per KV head.")
    W_V_kv = _qkv_view(2, False, "``[layer, kv_head, d_model, d_head]``: the stored value weights, one per KV head.")
    b_Q = _qkv_view(3, False, "``[layer, head, d_head]`` (zeros where the model has no bias).")
    b_K = _qkv_view(4, True, "``[layer, head, d_head]``, KV heads expanded (zeros where the model has no bias).")
    b_V = _qkv_view(5, True, "``[layer, head, d_head]``, KV heads expanded (zeros where the model has no bias).")

    @property
    def W_O(self) -> torch.Tensor:
        """``[layer, head, d_head, d_model]``: ``result_h = z_h @ W_O[h]`` (before any post-norm)."""
        return self._stack(self.W_O_layer)

    @property
    def b_O(self) -> torch.Tensor:
        """``[layer, d_model]``."""
        return self._stack(self.b_O_layer)

    # ---- MLP ------------------------------------------------------------------------------
    def mlp(self, layer: int) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor | None,
                                       torch.Tensor | None]:
        """``(W_gate [d_model, d_mlp] | None, W_in [d_model, d_mlp], W_out [d_mlp, d_model], b_in, b_out)``."""
        fam = self.family
        if layer in (self.cfg.moe_layers or []):
            from .errors import InputError

            raise InputError(f"block {layer} is a mixture of experts: it has no single MLP weight matrix; read an "
                             f"expert's weights from model.parts.moe_part({layer}, 'experts')")
        out_mod = self.parts.mlp_proj(layer, fam.mlp_out)
        in_mod = self.parts.mlp_proj(layer, fam.mlp_in)
        W_out, W, b = in_to_out(out_mod, fam.conv1d), in_to_out(in_mod, fam.conv1d), param(in_mod, "bias")
        b_out = param(out_mod, "bias")
        if fam.mlp_gate_up_fused:  # Phi-3: one module whose output is [gate | up]
            gate, up = W.chunk(2, dim=1)
            return gate, up, W_out, b.chunk(2)[1] if b is not None else None, b_out
        gate = in_to_out(self.parts.mlp_proj(layer, fam.mlp_gate), fam.conv1d) if fam.mlp_gate else None
        return gate, W, W_out, b, b_out

    def W_in_layer(self, layer: int) -> torch.Tensor:
        """``[d_model, d_mlp]`` for one layer: the input (gated MLPs: the up) projection."""
        return self.mlp(layer)[1]

    def W_gate_layer(self, layer: int) -> torch.Tensor | None:
        """``[d_model, d_mlp]`` for one layer of a gated MLP, else None."""
        return self.mlp(layer)[0]

    def b_in_layer(self, layer: int) -> torch.Tensor:
        """``[d_mlp]`` for one layer (zeros where the model has no bias)."""
        return self._or_zeros(self.mlp(layer)[3], self.cfg.d_mlp)

    def W_out_layer(self, layer: int) -> torch.Tensor:
        """``[d_mlp, d_model]`` for one layer (times the residual multiplier, where the model has one)."""
        return self._scaled(self.mlp(layer)[2])

    def b_out_layer(self, layer: int) -> torch.Tensor:
        """``[d_model]`` for one layer (zeros where the model has no bias)."""
        b = self.mlp(layer)[4]
        return self._scaled(b) if b is not None else self._zeros(self.cfg.d_model)

    @property
    def W_in(self) -> torch.Tensor:
        """``[layer, d_model, d_mlp]``: the input (gated MLPs: the up) projection."""
        return self._stack(self.W_in_layer)

    @property
    def W_gate(self) -> torch.Tensor | None:
        """``[layer, d_model, d_mlp]`` for gated MLPs (``post = act(x W_gate) * (x W_in)``), else None."""
        return self._stack(self.W_gate_layer) if self.cfg.gated_mlp else None

    @property
    def W_out(self) -> torch.Tensor:
        """``[layer, d_mlp, d_model]``: ``mlp_out = post @ W_out + b_out`` (before any post-norm)."""
        return self._stack(self.W_out_layer)

    @property
    def b_in(self) -> torch.Tensor:
        """``[layer, d_mlp]`` (zeros where the model has no bias)."""
        return self._stack(self.b_in_layer)

    @property
    def b_out(self) -> torch.Tensor:
        """``[layer, d_model]`` (zeros where the model has no bias)."""
        return self._stack(self.b_out_layer)

    def _or_zeros(self, b: torch.Tensor | None, n: int) -> torch.Tensor:
        return b if b is not None else self._zeros(n)

    # ---- embedding and unembedding -------------------------------------------------------------
    @property
    def W_E(self) -> torch.Tensor:
        """``[d_vocab, d_model]``, including Gemma's sqrt(d_model) scale, so ``hook_embed = W_E[tokens]``."""
        w = param(self.parts.embed)
        return w * self.cfg.embed_scale if self.cfg.embed_scale != 1.0 else w

    @property
    def W_pos(self) -> torch.Tensor:
        """``[n_ctx, d_model]`` learned position embeddings (GPT-2 only)."""
        if self.parts.pos_embed is None:
            raise AttributeError(f"{self.cfg.model_type} has no learned position embedding (it uses rotary)")
        return param(self.parts.pos_embed)

    def _logit_scaled(self, w: torch.Tensor) -> torch.Tensor:
        s = self.cfg.logit_scale
        return w * s if s != 1.0 else w

    @property
    def W_U(self) -> torch.Tensor:
        """``[d_model, d_vocab]``: ``logits = ln_final(resid) @ W_U + b_U`` (then soft-capping, Gemma 2); the logit
        multiplier of Cohere and Granite is folded in."""
        return self._logit_scaled(param(self.parts.unembed).T)

    @property
    def b_U(self) -> torch.Tensor:
        """``[d_vocab]`` (zeros where the model has no bias)."""
        return self._logit_scaled(self._or_zeros(param(self.parts.unembed, "bias"), self.cfg.d_vocab))

    def unembed(self, normalized: torch.Tensor) -> torch.Tensor:
        """``[..., d_model] -> [..., d_vocab]``: the unembedding, logit multiplier and soft-capping, as the model has them."""
        logits = self._logit_scaled(self.parts.unembed(normalized))
        cap = self.cfg.final_softcap
        return torch.tanh(logits / cap) * cap if cap else logits

    # ---- norms ------------------------------------------------------------------------------
    @property
    def ln_final(self) -> NormSpec:
        """The final norm: callable, plus ``scale``/``gain``/``bias``/``apply_frozen`` (see :mod:`mechscope.core.norms`)."""
        return self.parts.norm(None)

    def ln1(self, layer: int) -> NormSpec:
        """Block ``layer``'s pre-attention norm."""
        return self.parts.norm(layer, "ln1")

    def ln2(self, layer: int) -> NormSpec:
        """Block ``layer``'s pre-MLP norm."""
        return self.parts.norm(layer, "ln2")

    def norm(self, layer: int, which: str) -> NormSpec | None:
        """Block ``layer``'s ``ln1``, ``ln2``, ``attn_post`` or ``mlp_post`` norm (None where the family has none)."""
        return self.parts.norm(layer, which)
