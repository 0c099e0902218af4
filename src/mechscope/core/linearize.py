"""The model made linear around one prompt: attention patterns and norm scales frozen from a clean pass.

With every attention pattern fixed and every norm's per-position scale fixed, what flows along the
residual stream (embeddings, attention's OV path, anything an MLP's replacement writes) reaches
every later point through linear maps only. This is the "frozen" model of attribution graphs
(Ameisen et al. 2025, "Circuit Tracing"; Elhage et al. 2021 for the frozen norm): a norm becomes

    norm(x) = norm(x_clean) + center(x - x_clean) * scale(x_clean) * gain

and a pattern becomes a constant. At the clean input both equal the real model's values to the
bit (the difference term is exactly zero), so a run under :meth:`Frozen.applied` returns the
model's own logits; away from it, the response is the linearised one.

Usage::

    with record_frozen(model) as frozen:
        model(tokens)                      # the clean pass (any hooks may run beside it)
    with frozen.applied():
        model(tokens)                      # the frozen model (batches of copies of the prompt work too)
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

import torch

from .errors import InputError
from .hookpoints import split_name
from .norms import NormSpec
from .parts import NORMS

if TYPE_CHECKING:
    from .model import HookedModel


_QK_NORMS = ("q_norm", "k_norm", "q_layernorm", "k_layernorm")


def norm_specs(model: HookedModel) -> list[NormSpec]:
    """Every norm of ``model`` (each block's ``ln1`` ..., the q/k norms inside attention, ``ln_final``), each module
    once. The q/k norms matter only to attribution through attention scores: patterns are frozen anyway."""
    out, seen = [], set()
    for layer in range(model.cfg.n_layers):
        for which in NORMS:
            s = model.parts.norm(layer, which)
            if s is not None and id(s.module) not in seen:
                seen.add(id(s.module))
                out.append(s)
        attn = model.parts.attn(layer)
        for name in _QK_NORMS:
            module = getattr(attn, name, None)
            if isinstance(module, torch.nn.Module) and id(module) not in seen:
                seen.add(id(module))
                out.append(NormSpec(model.family.norm, module, model.family.norm_eps))
    s = model.parts.norm(None)
    if s is not None and id(s.module) not in seen:
        out.append(s)
    return out


class Frozen:
    """The clean pass's norm inputs, outputs and scales, and its attention patterns ``{layer: [1, head, q, k]}``."""

    def __init__(self, model: HookedModel):
        self.model = model
        self.norms = norm_specs(model)
        self.calls: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
        self.patterns: dict[int, torch.Tensor] = {}

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Run the model frozen: each norm answers ``y_clean + center(x - x_clean) * scale_clean * gain``, each
        pattern is the clean one (detached). Inputs may be a batch of copies of the clean prompt."""
        if not self.calls:
            raise InputError("nothing was recorded: run the clean pass inside record_frozen(model) first")
        handles, counters = [], {}

        def frozen_norm(spec: NormSpec):
            key = id(spec.module)

            def hook(module, args, output):
                calls = self.calls[key]
                i = counters.get(key, 0)
                counters[key] = (i + 1) % len(calls)
                x_c, y_c, scale = calls[i]
                x = args[0]
                if x.shape[1:] != x_c.shape[1:]:
                    raise InputError(f"the frozen model was recorded on inputs of shape {tuple(x_c.shape)}; "
                                     f"got {tuple(x.shape)}: run it on (copies of) the clean prompt")
                return y_c + spec.apply_frozen(x - x_c, scale)

            return hook

        def frozen_pattern(act: torch.Tensor, hook) -> torch.Tensor:
            return self.patterns[split_name(hook.name)[0]].to(act.dtype).expand_as(act)

        try:
            for spec in self.norms:
                if id(spec.module) in self.calls:  # prepend: mechscope's own norm hooks then see the frozen output
                    handles.append(spec.module.register_forward_hook(frozen_norm(spec), prepend=True))
            with self.model.hooks([(f"blocks.{layer}.attn.hook_pattern", frozen_pattern) for layer in self.patterns]):
                yield
        finally:
            for h in handles:
                h.remove()


@contextmanager
def record_frozen(model: HookedModel) -> Iterator[Frozen]:
    """Record what :class:`Frozen` needs during the one forward pass run inside the block (batch 1)."""
    frozen, handles = Frozen(model), []

    def recorder(spec: NormSpec):
        def hook(module, args, output):
            x = args[0].detach()
            y = (output[0] if isinstance(output, tuple) else output).detach()
            frozen.calls.setdefault(id(spec.module), []).append((x, y, spec.scale(x)))

        return hook

    def keep_pattern(act: torch.Tensor, hook) -> None:
        if act.shape[0] != 1:
            raise InputError(f"record the frozen model on one prompt (batch 1); the pass had batch {act.shape[0]}")
        frozen.patterns[split_name(hook.name)[0]] = act.detach()

    names = [n for n in model.hook_names if n.endswith("attn.hook_pattern")]
    if len(names) != model.cfg.n_layers:
        raise InputError(f"{model.cfg.model_name}'s attention does not run through mechscope's attention function "
                         "at every layer, so its patterns cannot be frozen")
    try:
        for spec in frozen.norms:
            handles.append(spec.module.register_forward_hook(recorder(spec)))
        with model.hooks([(n, keep_pattern) for n in names]):
            yield frozen
    finally:
        for h in handles:
            h.remove()
