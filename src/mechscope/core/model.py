"""HookedModel: TransformerLens-named hook points on a Hugging Face causal LM's own forward pass.

The HF model is wrapped, never copied or reimplemented: HF's forward pass is the ground truth,
and with no hooks active the logits are HF's to the bit. The facade composes four small parts:

- :class:`~mechscope.core.parts.ModelParts`: where the family keeps its modules;
- :class:`~mechscope.core.sites.HookSites`: the PyTorch hooks behind the hook points
  (the names and their meaning are in :mod:`mechscope.core.hookpoints`);
- :class:`~mechscope.core.weights.Weights`: ``W_Q``, ``W_O``, ... and per-head results;
- :class:`~mechscope.core.tokens.TokenOps`: text <-> tokens with an explicit BOS.
"""

from __future__ import annotations

from typing import Callable, ContextManager

import torch

from .cache import ActivationCache, pos_index
from .config import ModelConfig, build_config
from .errors import InputError
from .families import Family
from .hookpoints import act_name, hook_names
from .hooks import HookHandle, StopForward
from .infer import resolve_family
from .parts import ModelParts
from .sites import HookSites
from .tokens import TokenOps, Tokens
from .types import Device, HFTokenizer, HookList, NameFilter, PosSlice, TextOrTokens
from .weights import Weights

#: weight views served by :class:`~mechscope.core.weights.Weights` (each ``[layer, ...]`` unless noted there)
WEIGHT_VIEWS = ("device", "dtype", "W_E", "W_pos", "W_U", "b_U", "W_Q", "W_K", "W_V", "W_K_kv", "W_V_kv", "W_O", "b_Q", "b_K",
                "b_V", "b_O", "W_in", "W_gate", "W_out", "b_in", "b_out", "ln_final")
WEIGHT_METHODS = ("W_O_layer", "b_O_layer", "W_in_layer", "W_gate_layer", "b_in_layer", "W_out_layer", "b_out_layer",
                  "head_results", "result_bias", "ln1", "ln2", "attn_scale",
                  "norm", "unembed")
TOKEN_METHODS = ("tokenize", "to_tokens", "to_str_tokens", "to_string", "to_single_token")


class HookedModel(torch.nn.Module):
    """A Hugging Face causal LM with TransformerLens-named hook points (see ``model.hook_names``).

    Build one with :func:`mechscope.load` or ``HookedModel(hf_model, tokenizer)``. Weight views
    (``W_Q`` ...), norms and tokenization are delegated to the parts listed in the module docstring.
    """

    def __init__(self, hf_model, tokenizer=None, name: str | None = None, family: Family | None = None):
        super().__init__()
        self.hf = hf_model.eval()
        if family is None:  # the table's row, or one inferred from the module tree (then check the model)
            family, self.inferred = resolve_family(hf_model)
        else:
            self.inferred = family.name.startswith("inferred:")
        self.family = family
        self.parts = ModelParts(hf_model, self.family)
        self.cfg: ModelConfig = build_config(self.parts, name or getattr(hf_model.config, "_name_or_path", "?"),
                                             tokenizer)
        self.weights = Weights(self.parts, self.cfg)
        self.hook_names: list[str] = hook_names(self.cfg.n_layers, self.parts.facts())
        self.sites = HookSites(self.parts, self.cfg, self.weights, self.hook_names)
        self.manager = self.sites.manager
        self.attn_implementation = self.sites.attach_attention()
        self.tokens = TokenOps(tokenizer, self.cfg, lambda: self.device)

    @property
    def tokenizer(self) -> "PreTrainedTokenizerBase | None":  # noqa: F821
        """The HF tokenizer (or None: then pass token ids, not text)."""
        return self.tokens.tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer: HFTokenizer) -> None:
        self.tokens.tokenizer = tokenizer

    @property
    def _cache_kwarg(self) -> str:
        """The name HF's forward takes a KV cache under: ``cache`` (transformers >= 5.24) or ``past_key_values``."""
        import inspect

        params = inspect.signature(type(self.hf).forward).parameters
        return "cache" if "cache" in params else "past_key_values"

    @property
    def pad_token_id(self) -> int:
        return self.tokens.pad_token_id

    def block(self, layer: int) -> torch.nn.Module:
        """HF's decoder layer ``layer``."""
        return self.parts.layers[layer]

    def attn_module(self, layer: int) -> torch.nn.Module:
        """HF's attention module of block ``layer``."""
        return self.parts.attn(layer)

    def mlp_module(self, layer: int) -> torch.nn.Module:
        """HF's MLP module of block ``layer``."""
        return self.parts.mlp(layer)

    def has_hook(self, name: str) -> bool:
        """Whether ``name`` is one of this model's hook points (full name, e.g. ``blocks.3.ln2.hook_normalized``)."""
        return name in self.manager.known

    @property
    def embed_hooks(self) -> list[str]:
        """The hooks whose outputs add up to the residual stream entering block 0: ``hook_embed``, and
        ``hook_pos_embed`` where the model has learned positions."""
        return [n for n in (act_name("embed"), act_name("pos_embed")) if self.has_hook(n)]

    def attn_input(self, layer: int) -> str:
        """The hook point holding what block ``layer``'s attention projections read: its ``ln1`` output, or the
        residual stream itself where the block normalises only outputs (OLMo-2)."""
        name = act_name("normalized", layer, "ln1")
        return name if self.has_hook(name) else act_name("resid_pre", layer)

    def mlp_input(self, layer: int) -> str:
        """The hook point holding what block ``layer``'s MLP reads: its ``ln2`` output; in a parallel block
        with one shared norm, the attention's input; where the block has no pre-MLP norm, ``hook_resid_mid``."""
        name = act_name("normalized", layer, "ln2")
        if self.has_hook(name):
            return name
        return self.attn_input(layer) if self.cfg.parallel_residual else act_name("resid_mid", layer)

    # ---- hooks -------------------------------------------------------------------------------
    def hooks(self, fwd_hooks: HookList = (), bwd_hooks: HookList = ()) -> ContextManager[None]:
        """Context manager: ``with model.hooks([(name_or_filter, fn)]): ...``. Removed on exit, even on error."""
        return self.manager.hooks(fwd_hooks, bwd_hooks)

    def add_hook(self, name: NameFilter, fn: Callable, direction: str = "fwd") -> "HookHandle":
        """Attach a hook until ``.remove()`` is called on the returned handle or :meth:`reset_hooks`."""
        return HookHandle(self.manager, self.manager.add(self.manager.make_entries([(name, fn)], direction)))

    def reset_hooks(self) -> None:
        """Remove every mechscope hook on this model (the user's own included)."""
        self.manager.remove_all()

    # ---- running -----------------------------------------------------------------------------
    def forward(self, input: TextOrTokens, attention_mask: torch.Tensor | None = None, return_type: str | None = "logits",
                stop_at_layer: int | None = None, prepend_bos: bool | None = None, padding_side: str | None = None,
                logits_to_keep: int = 0) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None:
        """Run HF's forward pass. ``input`` is text, a list of texts, or tokens ``[batch, pos]``.

        Returns logits ``[batch, pos, d_vocab]`` (``return_type="logits"``), the mean next-token loss
        (``"loss"``), both, or nothing. With ``stop_at_layer=L`` the layers from L on are not run and the
        residual stream entering block L (``[batch, pos, d_model]``) is returned. ``logits_to_keep=k``
        computes the logits of the last ``k`` positions only. Text lists are padded and masked.
        """
        if return_type not in ("logits", "loss", "both", None):
            raise InputError(f"return_type must be 'logits', 'loss', 'both' or None, got {return_type!r}")
        tokens, attention_mask = self.tokens.prepare(input, attention_mask, prepend_bos, padding_side)
        kwargs = {"input_ids": tokens}
        if logits_to_keep:
            kwargs["logits_to_keep"] = logits_to_keep
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
            kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        elif self.parts.pos_embed is not None:  # learned positions: batched, so hook_pos_embed is [batch, pos, d]
            kwargs["position_ids"] = torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape)
        if stop_at_layer is not None:
            return self._run_until(stop_at_layer, kwargs)
        logits = self.hf(**kwargs).logits
        if attention_mask is not None and not bool(attention_mask.all()):
            # padded rows: the metrics read each row's last real token from this, never a padding position
            logits.attention_mask = attention_mask
        if return_type is None:
            return None
        if return_type == "logits":
            return logits
        loss = lm_loss(logits, tokens, attention_mask)
        return loss if return_type == "loss" else (logits, loss)

    def _run_until(self, layer: int, kwargs: dict) -> torch.Tensor:
        if not 0 <= layer <= self.cfg.n_layers:
            raise InputError(f"stop_at_layer must be in 0..{self.cfg.n_layers}, got {layer}")
        handles = self.sites.install(("stop", layer))
        try:
            self.hf(**kwargs)
        except StopForward as stop:
            return stop.value
        finally:
            for h in handles:
                h.remove()
        raise RuntimeError("stop_at_layer did not stop the forward pass")  # pragma: no cover

    def run_from(self, layer: int, resid: torch.Tensor, position_ids: torch.Tensor | None = None,
                 past_key_values: object | None = None, attention_mask: torch.Tensor | None = None,
                 logits_to_keep: int = 0, stop_at_layer: int | None = None) -> torch.Tensor:
        """Run blocks ``layer..n_layers-1`` (HF's own loop, masks and rotary) from a residual stream.

        ``resid`` ``[batch, pos, d_model]`` is the stream entering block ``layer`` (``hook_resid_pre``).
        With ``past_key_values`` (an HF cache holding earlier positions) only the new positions are run;
        pass their ``position_ids``. Returns logits ``[batch, pos, d_vocab]`` (the last ``logits_to_keep``
        positions only, when positive). Hooks on the blocks run fire as usual; earlier ones do not.
        ``stop_at_layer=L`` (``L > layer``) stops before block L and returns the stream entering it, as in
        :meth:`forward`.
        """
        if not 0 <= layer <= self.cfg.n_layers:
            raise InputError(f"layer must be in 0..{self.cfg.n_layers}, got {layer}")
        if resid.shape[-1] != self.cfg.d_model:
            raise InputError(f"resid must be [batch, pos, {self.cfg.d_model}], got {tuple(resid.shape)}")
        b, t = resid.shape[:2]
        if position_ids is None:
            start = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = torch.arange(start, start + t, device=resid.device).expand(b, t)
        if self.cfg.embed_multiplier != 1.0:  # the model multiplies inputs_embeds itself (Granite): undo it
            resid = resid / self.cfg.embed_multiplier
        kwargs = dict(inputs_embeds=resid, position_ids=position_ids, use_cache=past_key_values is not None)
        if logits_to_keep:
            kwargs["logits_to_keep"] = logits_to_keep
        if past_key_values is not None:
            kwargs[self._cache_kwarg] = past_key_values
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        with self.parts.starting_at(layer):
            if stop_at_layer is not None:
                if stop_at_layer <= layer:
                    raise InputError(f"stop_at_layer ({stop_at_layer}) must be after the starting layer ({layer})")
                return self._run_until(stop_at_layer, kwargs)
            return self.hf(**kwargs).logits

    def run_with_hooks(self, input: TextOrTokens, fwd_hooks: HookList = (), bwd_hooks: HookList = (), **kwargs) -> torch.Tensor:
        """``forward`` with hooks attached for this call only (removed even if it raises)."""
        with self.hooks(fwd_hooks, bwd_hooks):
            return self(input, **kwargs)

    def run_with_cache(self, input: TextOrTokens, names_filter: NameFilter | None = None, pos_slice: PosSlice = None,
                       device: Device | None = None, remove_batch_dim: bool = False,
                       **kwargs) -> tuple[torch.Tensor, ActivationCache]:
        """Run and record activations. Returns ``(output, ActivationCache)``.

        ``names_filter``: a name, a list of names, or a predicate over names. ``None`` records every
        hook point except ``attn.hook_result`` (computed only when named). ``pos_slice`` keeps only
        those positions (an int, a slice or a list; patterns are sliced on the query axis), and
        ``device`` moves each activation as it is recorded, so a narrow cache stays cheap.
        """
        if names_filter is None:
            names = [n for n in self.hook_names if not n.endswith("attn.hook_result")]
        else:
            names = self.manager.resolve(names_filter)
            if not names:
                raise InputError("names_filter matches no hook point, so the cache would be empty; model.hook_names "
                                 f"lists all {len(self.hook_names)} (e.g. {self.hook_names[2]!r})")
        store: dict[str, torch.Tensor] = {}
        index = pos_index(pos_slice)

        checked = []

        def save(act, hook):
            a = act.detach()
            if index is not None:
                on_query = hook.name.endswith(("hook_pattern", "hook_attn_scores"))
                if not checked:  # before the first index: an IndexError deep in a hook names nothing
                    _check_positions(pos_slice, a.shape[2 if on_query else 1])
                    checked.append(True)
                a = a[:, :, index] if on_query else a[:, index]
            store[hook.name] = a.to(device) if device is not None else a

        with self.hooks([(n, save) for n in names]):
            out = self(input, **kwargs)
        if pos_slice is not None:
            _check_positions(pos_slice, out.shape[1] if isinstance(out, torch.Tensor) and out.dim() == 3 else None)
        cache = ActivationCache(store, self)
        return out, cache.remove_batch_dim() if remove_batch_dim else cache

    @torch.no_grad()
    def generate(self, input: TextOrTokens, max_new_tokens: int = 20, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None, fwd_hooks: HookList = (),
                 prepend_bos: bool | None = None, return_type: str = "str") -> str | list[str] | torch.Tensor:
        """Continue text with HF's ``generate`` (greedy by default), with hooks active throughout.

        Batched prompts are left-padded with an attention mask. With the KV cache, hooks see only
        the new positions at each step (attention-internal hooks see keys over all positions).
        ``return_type``: ``"str"`` (continuations including the prompt) or ``"tokens"``.
        """
        if isinstance(input, torch.Tensor):
            tokens, mask = self.tokens.prepare(input, None, None, None)[0], None
        else:
            tokens, mask = self.tokens.tokenize(input, prepend_bos=prepend_bos, padding_side="left")
        mask = torch.ones_like(tokens) if mask is None else mask
        if seed is not None:
            torch.manual_seed(seed)
        sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p) if do_sample else \
            dict(temperature=None, top_k=None, top_p=None)
        with self.hooks(fwd_hooks):
            out = self.hf.generate(input_ids=tokens, attention_mask=mask, max_new_tokens=max_new_tokens,
                                   do_sample=do_sample, pad_token_id=self.pad_token_id, **sampling)
        if return_type == "tokens":
            return out
        texts = [self.tokenizer.decode(row, skip_special_tokens=True) for row in out]
        return texts[0] if isinstance(input, str) else texts

    def __repr__(self) -> str:
        c = self.cfg
        return (f"HookedModel({c.model_name!r}, family={c.family}, layers={c.n_layers}, d_model={c.d_model}, "
                f"heads={c.n_heads} (kv {c.n_kv_heads}), d_mlp={c.d_mlp}, vocab={c.d_vocab}, {c.dtype} on {c.device})")


def _delegate(names: tuple[str, ...], part: str, as_property: bool) -> None:
    """Expose ``self.<part>.<name>`` as ``HookedModel.<name>``, with the part's docstring."""
    owner = {"weights": Weights, "tokens": TokenOps}[part]
    for name in names:
        doc = getattr(owner, name).__doc__
        if as_property:
            setattr(HookedModel, name, property(lambda self, n=name: getattr(getattr(self, part), n), doc=doc))
        else:
            def method(self, *args, _n=name, **kwargs):
                return getattr(getattr(self, part), _n)(*args, **kwargs)

            method.__name__, method.__doc__ = name, doc
            setattr(HookedModel, name, method)


_delegate(WEIGHT_VIEWS, "weights", as_property=True)
_delegate(WEIGHT_METHODS, "weights", as_property=False)
_delegate(TOKEN_METHODS, "tokens", as_property=False)


def _check_positions(pos_slice: PosSlice, n_pos: int | None) -> None:
    """A clear error for positions outside the prompt (an int or list; slices clip like Python's)."""
    if n_pos is None or isinstance(pos_slice, slice):
        return
    positions = [pos_slice] if isinstance(pos_slice, int) else list(pos_slice)
    bad = [p for p in positions if not -n_pos <= int(p) < n_pos]
    if bad:
        raise InputError(f"pos_slice {bad} is outside the prompt: it has {n_pos} positions (0..{n_pos - 1}, or "
                         f"-{n_pos}..-1)")


def lm_loss(logits: torch.Tensor, tokens: Tokens, attention_mask: torch.Tensor | None = None,
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
