"""Hook sites: the PyTorch hooks on HF's modules that make the registry's hook points fire.

A *group* is one PyTorch hook that serves one or more hook points (the registry's
``HookSpec.groups``): ``pre`` (a forward pre-hook on the block: ``hook_resid_pre``), ``post``
(``hook_resid_post``), ``ln1``/``ln2`` (the norms' outputs), ``qkv`` (the projections, split
into heads), ``attn_out`` (``hook_attn_out``, ``hook_result``, ``hook_resid_mid``), ``mlp_in``
(``hook_pre``/``hook_pre_linear``), ``mlp_post`` (the down projection's input), ``mlp_out``,
and the top-level ``embed``, ``pos_embed``, ``ln_final``. Hooks inside attention fire from
:mod:`mechscope.core.attention`. Groups are installed only while a hook point needs them.
"""

from __future__ import annotations

from typing import Callable

import torch

from . import attention as _attn
from . import moe as _moe
from .config import ModelConfig
from .families import merge_qkv, split_qkv
from .hookpoints import block_name, spec, split_name
from .hooks import HookManager, StopForward
from .parts import ModelParts
from .weights import Weights


def _out0(output):
    return output[0] if isinstance(output, tuple) else output


def _with_out0(output, new):
    return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new


def fire_output(manager: HookManager, name: str, view: tuple[int, int] | None = None, scale: float = 1.0,
                rows: Callable[[], tuple[int, int]] | None = None, copy: bool = False) -> Callable:
    """A forward hook firing ``name`` on a module's output (optionally viewed as ``[.., head, d]``).

    With ``scale`` (a multiplier the model applies outside the module: Granite's residual and
    embedding multipliers) the hook point sees ``output * scale`` and a change is written back
    divided by it, so the hook point holds what actually reaches the residual stream. ``rows()``
    gives ``(batch, pos)`` for a module that sees ``[batch * pos, d]`` rows (OPT's MLP). ``copy``
    passes a copy downstream, for a model that later edits the output in place (Falcon's MLP).
    """

    def hook(module, args, output):
        if not manager.is_active(name):
            return None
        out = _out0(output)
        act = out.view(*rows(), -1) if rows is not None and out.dim() == 2 else out
        act = act.view(*act.shape[:-1], *view) if view else act
        act = act * scale if scale != 1.0 else act
        new = manager.fire(name, act)
        derived = view or scale != 1.0 or act is not out
        if copy and new is act:
            return _with_out0(output, out.clone())
        if new is act and not (derived and manager.has_backward(name)):
            return None  # (a derived tensor carrying backward hooks must replace the output, or its hooks never run)
        new = new / scale if scale != 1.0 else new
        return _with_out0(output, new.reshape(out.shape))

    return hook


def fire_input(manager: HookManager, name: str, view: tuple[int, int] | None = None,
               rows: Callable[[], tuple[int, int]] | None = None, also: Callable | None = None) -> Callable:
    """A forward pre-hook firing ``name`` on a module's first input (optionally viewed as ``[.., head, d]``;
    ``rows`` as in :func:`fire_output`). ``also(act)`` sees the (possibly edited) input afterwards."""

    def hook(module, args):
        x = args[0]
        act = x.view(*rows(), -1) if rows is not None and x.dim() == 2 else x
        act = act.view(*act.shape[:-1], *view) if view else act
        new = manager.fire(name, act) if manager.is_active(name) else act
        if also is not None:
            also(new)
        if new is act and not ((view or act is not x) and manager.has_backward(name)):
            return None
        return (new.reshape(x.shape),) + tuple(args[1:])

    return hook


def _raise_stop(module, args, kwargs):
    raise StopForward(args[0] if args else kwargs["hidden_states"])


class HookSites:
    """Installs and removes the PyTorch hooks behind the hook points; owns the :class:`HookManager`."""

    def __init__(self, parts: ModelParts, cfg: ModelConfig, weights: Weights, hook_names: list[str]):
        self.parts, self.cfg, self.weights, self.family = parts, cfg, weights, parts.family
        self.manager = HookManager(hook_names, self.groups_of, self.install)

    def attach_attention(self) -> str:
        """Route the model's attention through mechscope's function; returns the implementation's name."""
        hf = self.parts.hf
        if not self.family.attn_fn:  # its attention is its own code: leave it as it is (hook_z fires at o_proj)
            return hf.config._attn_implementation
        _attn.register()
        base = hf.config._attn_implementation
        if base not in _attn.IMPLEMENTATIONS and base not in _attn.IMPLEMENTATIONS.values():
            base = "sdpa"
        impl = _attn.IMPLEMENTATIONS.get(base, base)
        hf.set_attn_implementation(impl)
        if hf.config._attn_implementation != impl:  # pragma: no cover - depends on transformers
            hf.config._attn_implementation = impl
        for layer in range(self.cfg.n_layers):
            setattr(self.parts.attn(layer), _attn.OWNER_ATTR, _attn.Owner(self.manager, layer))
        return impl

    # ---- which groups a hook point needs -------------------------------------------------------
    def groups_of(self, name: str) -> list:
        """The groups serving hook point ``name``: ``[(kind, layer)]``, or ``[kind]`` at the top level."""
        layer, _ = split_name(name)
        s = spec(name)
        kinds = s.groups_outside_attn if (not self.family.attn_fn and s.groups_outside_attn) else s.groups
        flat = {"router", "experts", "shared_expert", "shared_gate"} | (
            {"ln2", "mlp_in", "mlp_post", "mlp_out"} if self.family.flat_mlp else set())
        if set(kinds) & flat:
            kinds = ("pre",) + tuple(kinds)  # the block's input gives (batch, pos) to view the MLP's rows
        return list(kinds) if layer is None else [(k, layer) for k in kinds]

    def _rows(self, layer: int, always: bool = False) -> Callable[[], tuple[int, int]] | None:
        """``(batch, pos)`` of the pass through block ``layer``, for modules that see ``[batch * pos, .]`` rows."""
        if not (always or self.family.flat_mlp):
            return None
        return lambda: tuple(self.manager.state.resid_pre[layer].shape[:2])

    def install(self, group: str | tuple[str, int]) -> list:
        """Attach the PyTorch hooks of one group; return their handles."""
        m, parts = self.manager, self.parts
        if isinstance(group, str):
            module = {"embed": parts.embed, "pos_embed": parts.pos_embed, "ln_final": parts.final_norm}[group]
            name = {"embed": "hook_embed", "pos_embed": "hook_pos_embed", "ln_final": "ln_final.hook_normalized"}
            scale = self.cfg.embed_multiplier if group == "embed" else 1.0
            return [module.register_forward_hook(fire_output(m, name[group], scale=scale))]
        kind, layer = group
        if kind == "stop":
            target = parts.layers[layer] if layer < self.cfg.n_layers else parts.final_norm
            return [target.register_forward_pre_hook(_raise_stop, with_kwargs=True)]
        if kind in ("qkv", "mlp_in", "attn_out", "pre", "z_in"):
            return getattr(self, f"_install_{kind}")(layer)
        block = parts.layers[layer]
        if kind == "post":
            return [block.register_forward_hook(fire_output(m, block_name(layer, "hook_resid_post")))]
        if kind in ("router", "experts", "shared_expert", "shared_gate"):
            return self._install_moe(kind, layer)
        rows = self._rows(layer)
        if kind in ("ln1", "ln2"):
            module = parts.norm_module(layer, kind)
            return [module.register_forward_hook(fire_output(m, block_name(layer, f"{kind}.hook_normalized"),
                                                             rows=rows if kind == "ln2" else None))]
        if kind == "mlp_out":
            post_norm = parts.norm_module(layer, "mlp_post")
            site = post_norm if post_norm is not None else parts.mlp_out_site(layer)
            return [site.register_forward_hook(fire_output(m, block_name(layer, "hook_mlp_out"),
                                                           scale=self.cfg.residual_scale, rows=rows,
                                                           copy=self.family.inplace_mlp_out))]
        if kind == "mlp_post":
            down = parts.mlp_proj(layer, self.family.mlp_out)
            return [down.register_forward_pre_hook(fire_input(m, block_name(layer, "mlp.hook_post"), rows=rows))]
        raise KeyError(group)  # pragma: no cover - every registry group is handled above

    def _install_moe(self, kind: str, layer: int) -> list:
        """The router, experts and shared-expert sites of an MoE block (see :mod:`mechscope.core.moe`)."""
        m, parts, rows = self.manager, self.parts, self._rows(layer, always=True)
        if kind == "router":
            return _moe.install_router(m, parts.moe_part(layer, "router"), layer, self.family.moe_routing,
                                       self.cfg.top_k, rows)
        if kind == "experts":
            return _moe.install_experts(m, parts.moe_part(layer, "experts"), layer, rows)
        which, short = ("shared", "shared_expert_out") if kind == "shared_expert" else ("shared_gate", "shared_expert_gate")
        hook = fire_output(m, block_name(layer, f"mlp.hook_{short}"), rows=rows)
        return [parts.moe_part(layer, which).register_forward_hook(hook)]

    def _install_z_in(self, layer: int) -> list:
        """``hook_z`` on the output projection's input, for a family whose attention is its own code (Falcon)."""
        m, c = self.manager, self.cfg
        name, n_result = block_name(layer, "attn.hook_z"), block_name(layer, "attn.hook_result")

        def keep(z):
            if m.is_active(n_result):
                m.state.z[layer] = z

        hook = fire_input(m, name, view=(c.n_heads, c.d_head), also=keep)
        return [self.parts.attn_proj(layer, self.family.o).register_forward_pre_hook(hook)]

    # ---- the residual stream ------------------------------------------------------------------
    def _install_pre(self, layer: int) -> list:
        m, name = self.manager, block_name(layer, "hook_resid_pre")

        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            new = m.fire(name, x) if m.is_active(name) else x
            m.state.resid_pre[layer] = new
            if new is x:
                return None
            if args:
                return (new,) + tuple(args[1:]), kwargs
            return args, {**kwargs, "hidden_states": new}

        return [self.parts.layers[layer].register_forward_pre_hook(hook, with_kwargs=True)]

    def _install_attn_out(self, layer: int) -> list:
        """``hook_result`` (from the per-pass ``z``), ``hook_attn_out`` and ``hook_resid_mid``, in that order."""
        m, weights, r = self.manager, self.weights, self.cfg.residual_scale
        n_result, n_out, n_mid = (block_name(layer, s) for s in ("attn.hook_result", "hook_attn_out", "hook_resid_mid"))
        post_norm = self.parts.norm_module(layer, "attn_post")

        def hook(module, args, output):
            orig = _out0(output)
            out = orig * r if r != 1.0 else orig  # what attention adds to the residual stream
            if m.is_active(n_result):
                pre_norm = args[0] if post_norm is not None else None
                res = weights.head_results(layer, m.state.z.pop(layer), pre_norm_out=pre_norm)
                new_res = m.fire(n_result, res)
                if new_res is not res and not torch.equal(new_res, res):
                    out = (new_res.sum(-2) + weights.result_bias(layer, pre_norm, res)).to(out.dtype)
                elif m.has_backward(n_result) and new_res.requires_grad:
                    # same value, but the gradient flows through the per-head results (straight-through);
                    # with a post-attention norm (Gemma 2/3) its scale is treated as a constant
                    s = new_res.sum(-2).to(out.dtype)
                    out = out.detach() + (s - s.detach())
            if m.is_active(n_out):
                out = m.fire(n_out, out)
            if m.is_active(n_mid):
                pre = m.state.resid_pre[layer]
                mid = pre + out
                new_mid = m.fire(n_mid, mid)
                if (m.has_backward(n_mid) and new_mid.requires_grad) or \
                        (new_mid is not mid and not torch.equal(new_mid, mid)):
                    out = new_mid - pre
            if r != 1.0:
                if torch.equal(out, orig * r) and not (m.has_backward(n_out) or m.has_backward(n_result)):
                    return None
                out = out / r
            return None if out is orig else _with_out0(output, out)

        site = post_norm if post_norm is not None else self.parts.attn(layer)
        return [site.register_forward_hook(hook)]

    # ---- projections ------------------------------------------------------------------------------
    def split_qkv(self, out: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], Callable]:
        """A fused projection's output -> ``(q [.., head, d], k [.., kv, d], v [.., kv, d])`` views, and a merger."""
        c, layout = self.cfg, self.family.qkv_layout
        lead = out.shape[:-1]
        parts = split_qkv(out, layout, c.n_heads, c.n_kv_heads, c.d_head)
        return parts, (lambda q, k, v: merge_qkv(q, k, v, layout).reshape(*lead, -1))

    def _install_qkv(self, layer: int) -> list:
        fam, m, c = self.family, self.manager, self.cfg
        names = [block_name(layer, f"attn.hook_{s}") for s in "qkv"]
        if fam.qkv_layout == "separate":
            return [self.parts.attn_proj(layer, path).register_forward_hook(fire_output(m, name, view=(n, c.d_head)))
                    for name, path, n in zip(names, (fam.q, fam.k, fam.v), (c.n_heads, c.n_kv_heads, c.n_kv_heads))]

        def hook(module, args, output):
            parts, merge = self.split_qkv(output)
            return self._fire_parts(names, parts, merge)

        return [self.parts.attn_proj(layer, fam.qkv).register_forward_hook(hook)]

    def _fire_parts(self, names: list[str], parts, merge):
        """Fire each of ``names`` on its slice of a fused output; merge only when something may have changed."""
        m = self.manager
        new = [m.fire(n, t) if m.is_active(n) else t for n, t in zip(names, parts)]
        if all(a is b for a, b in zip(new, parts)) and not any(m.has_backward(n) for n in names):
            return None
        return merge(*new)

    def _install_mlp_in(self, layer: int) -> list:
        fam, m = self.family, self.manager
        pre, pre_linear = block_name(layer, "mlp.hook_pre"), block_name(layer, "mlp.hook_pre_linear")
        if fam.mlp_gate_up_fused:  # Phi-3: one projection whose output is [gate | up]
            def hook(module, args, output):
                return self._fire_parts([pre, pre_linear], output.chunk(2, dim=-1), lambda g, u: torch.cat([g, u], -1))

            return [self.parts.mlp_proj(layer, fam.mlp_gate).register_forward_hook(hook)]
        rows = self._rows(layer)
        if fam.mlp_gate is None:
            return [self.parts.mlp_proj(layer, fam.mlp_in).register_forward_hook(fire_output(m, pre, rows=rows))]
        return [self.parts.mlp_proj(layer, fam.mlp_gate).register_forward_hook(fire_output(m, pre, rows=rows)),
                self.parts.mlp_proj(layer, fam.mlp_in).register_forward_hook(fire_output(m, pre_linear, rows=rows))]
