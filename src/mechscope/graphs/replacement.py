"""The local replacement model of one prompt (Ameisen et al. 2025, "Circuit Tracing", §2).

Around one prompt, the model is made linear from feature to feature:

- attention patterns and norm scales are frozen from the clean pass (:mod:`mechscope.core.linearize`);
- each replaced MLP writes ``sum_f a_f W_dec[f] + x W_skip + b + error``, where the feature activations
  ``a_f`` and the error ``error = mlp_out - prediction`` are held at their clean values (an MLP without a
  transcoder is all error). With a cross-layer transcoder the sum runs over the features of this layer and of
  every earlier one, each through its decoder into this layer (Ameisen et al. 2025, §2.1); error nodes stay one
  per layer;
- only the skip term still reads the live input ``x``.

Every quantity an attribution graph needs is then a linear function of the *sources*: the token
embeddings, the feature writes ``a_f W_dec[f]`` and the error vectors. At the clean input the
replacement model returns the logits of the model's pattern-recording pass, bit for bit (each replaced
site answers its clean value plus a difference that is exactly zero there). Against a plain
``model(tokens)`` they differ by float rounding (3.8e-5 on SmolLM2 in fp32), because recording the
attention patterns runs attention in eager form instead of SDPA.

:meth:`ReplacementModel.run` adds arbitrary vectors at the write sites (``"embed"`` or a layer),
for perturbation checks, and hands back the live points that targets are read from.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..core import HookedModel, InputError
from ..core.hookpoints import act_name
from ..core.linearize import Frozen, record_frozen
from ..sae.model import SAE
from ..sae.replacement import Replacement, replacement_of
from ..sae.transcoders import TranscoderSet

EMBED = "embed"


@dataclass
class LayerState:
    """One block's MLP in the replacement model, and its clean values.

    ``replaced``: whether the replacement predicts this MLP's output (else it is all error). ``x [pos, d_in]``
    what the replacement reads at this layer and ``acts [pos, F]`` its features there (zero before
    ``skip_first``; None where no features are read). ``mlp_out [pos, d_model]`` the real MLP output,
    ``writes [pos, d_model]`` what every active feature writes into it (from this layer or earlier ones, for a
    CLT), ``error`` what the replacement misses.
    """

    layer: int
    replaced: bool
    x: torch.Tensor | None
    acts: torch.Tensor | None
    mlp_out: torch.Tensor
    writes: torch.Tensor | None
    error: torch.Tensor

    @property
    def out_hook(self) -> str:
        return act_name("mlp_out", self.layer)


@dataclass
class Run:
    """The live points of one replacement-model run: each input ``x[layer] [B, pos, d_in]`` and the final norm's
    output ``final [B, pos, d_model]``."""

    x: dict[int, torch.Tensor] = field(default_factory=dict)
    final: torch.Tensor | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # the hook points asked for with ``capture``


class ReplacementModel:
    """The frozen replacement model of ``model`` on ``tokens [1, pos]`` with ``transcoders``: per-layer transcoders
    (a :class:`~mechscope.sae.transcoders.TranscoderSet` or list, any subset of layers) or a cross-layer transcoder
    (:class:`~mechscope.sae.clt.CrossLayerTranscoder`, whose features at layer i write into every later MLP output).
    They are moved to the model's device.

    Features at positions before ``skip_first`` (default 1: the first position is the attention sink,
    BOS or not, and mechscope's harvest leaves it out of transcoder training) are left out. Their error
    vectors are zeroed too, so the MLP output there is part of the constant, as in circuit-tracer;
    ``sink_errors=True`` keeps it as error instead.
    """

    def __init__(self, model: HookedModel, transcoders: "TranscoderSet | list[SAE] | Replacement", tokens: torch.Tensor,
                 skip_first: int | None = None, sink_errors: bool = False):
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.shape[0] != 1:
            raise InputError(f"an attribution graph is built for one prompt: tokens must be [1, pos], got "
                             f"{tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__}")
        self.model, self.tokens = model, tokens.to(model.device)
        self.n_pos = tokens.shape[1]
        self.skip_first = 1 if skip_first is None else skip_first
        self.sink_errors = sink_errors
        self.transcoders = replacement_of(model, transcoders).to(model.device)
        # per layer, its active features (sorted) and their decoder writes [u, targets x d_model] (the graph's edges
        # read them here instead of reading a lazy CLT's files again)
        self.frozen, self.layers, self.embed, self.logits = self._clean_pass()

    # ------------------------------------------------------------------ the clean pass
    def _clean_pass(self) -> tuple[Frozen, list[LayerState], torch.Tensor, torch.Tensor]:
        model, rep, seen = self.model, self.transcoders, {}

        def keep(act, hook):
            seen[hook.name] = act.detach()[0]

        names = model.embed_hooks + [act_name("mlp_out", layer) for layer in range(model.cfg.n_layers)]
        names += [rep.input_hook(layer) for layer in rep.layers]
        with torch.no_grad(), record_frozen(model) as frozen:
            logits = model.run_with_hooks(self.tokens, fwd_hooks=[(n, keep) for n in dict.fromkeys(names)])
        embed = sum(seen[e] for e in model.embed_hooks)
        xs = {layer: seen[rep.input_hook(layer)].reshape(self.n_pos, -1) for layer in rep.layers}
        acts, writes = {}, {}
        self.tables: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        with torch.no_grad():
            for layer in rep.layers:
                a = rep.encode(layer, xs[layer].float())
                a[:self.skip_first] = 0
                acts[layer] = a
                pos, f = a.nonzero(as_tuple=True)
                if not len(f):
                    continue
                uniq, inv = f.unique(return_inverse=True)
                dirs = rep.write_directions(layer, uniq).float()  # [u, T, d]: read once (from disk, for a lazy CLT)
                self.tables[layer] = (uniq.cpu(), dirs.cpu().reshape(len(uniq), -1))
                w = dirs[inv] * a[pos, f][:, None, None]  # [m, T, d]
                for j, target in enumerate(rep.targets(layer)):
                    buf = writes.setdefault(target, torch.zeros(self.n_pos, model.cfg.d_model, device=a.device))
                    buf.index_add_(0, pos, w[:, j])
        outputs = set(rep.output_layers)
        layers = []
        for layer in range(model.cfg.n_layers):
            mlp = seen[act_name("mlp_out", layer)]
            if layer not in outputs:
                layers.append(LayerState(layer, False, xs.get(layer), acts.get(layer), mlp, None,
                                         self._sink(mlp.clone())))
                continue
            with torch.no_grad():
                wr = writes.get(layer, torch.zeros(self.n_pos, model.cfg.d_model, device=mlp.device))
                predicted = wr + rep.decoder_bias(layer).float() + (rep.skip_term(layer, xs[layer].float())
                                                                    if rep.has_skip(layer) else 0.0)
            layers.append(LayerState(layer, True, xs.get(layer), acts.get(layer), mlp, wr,
                                     self._sink(mlp - predicted.to(mlp.dtype))))
        return frozen, layers, embed, logits.detach()

    def _sink(self, error: torch.Tensor) -> torch.Tensor:
        """``error [pos, d_model]`` with the sink positions zeroed (unless ``sink_errors``)."""
        if not self.sink_errors:
            error[:self.skip_first] = 0
        return error

    # ------------------------------------------------------------------ running it
    def run(self, batch: int = 1, add: dict[str | int, torch.Tensor] | None = None,
            capture: tuple[str, ...] = ()) -> tuple[Run, torch.Tensor]:
        """The replacement model on ``batch`` copies of the prompt, with ``add[site] [batch|1, pos, d_model]``
        added to what ``site`` (``"embed"`` or a layer's MLP) writes. Returns the live points (and the hook
        points named in ``capture``) and the logits."""
        add = add or {}
        rep = self.transcoders
        live = Run()
        hooks = [(act_name("embed"), lambda act, hook: act + add[EMBED].to(act.device, act.dtype) if EMBED in add else act)]
        hooks += [(name, lambda act, hook: live.extra.__setitem__(hook.name, act)) for name in capture]
        for layer in rep.layers:
            def read(act, hook, layer=layer):
                live.x[layer] = act.reshape(*act.shape[:2], -1)

            hooks.append((rep.input_hook(layer), read))
        for st in self.layers:
            def write(act, hook, st=st):
                out = st.mlp_out.to(act.dtype).expand_as(act)
                if st.replaced and rep.has_skip(st.layer):  # the one live path through a transcoder
                    delta = rep.skip_term(st.layer, (live.x[st.layer] - st.x).float())
                    out = out + delta.to(act.dtype)
                return out + add[st.layer].to(act.device, act.dtype) if st.layer in add else out

            hooks.append((st.out_hook, write))

        def final(act, hook):
            live.final = act

        hooks.append((act_name("ln_final"), final))
        tokens = self.tokens.expand(batch, -1)
        with self.frozen.applied():
            logits = self.model.run_with_hooks(tokens, fwd_hooks=hooks)
        return live, logits

    def without_sources(self) -> dict[str | int, torch.Tensor]:
        """What :meth:`run` must add to remove every source at once (each feature write, error and embedding):
        what is left is the bias part of every quantity."""
        add: dict[str | int, torch.Tensor] = {EMBED: -self.embed.float()[None]}
        for st in self.layers:
            w = -st.error.float()[None]
            if st.writes is not None:
                w = w - st.writes.float()[None]
            add[st.layer] = w
        return {k: v.to(self.model.dtype) for k, v in add.items()}

    # ------------------------------------------------------------------ reading targets
    def logit_directions(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[n] -> [n, d_model]``: the final-norm output's gradient of each demeaned logit
        ``logit_t - mean_v logit_v`` (before any soft-capping)."""
        W = self.model.W_U.float()
        return (W[:, tokens] - W.mean(1, keepdim=True)).T

    def logit_values(self, run: Run, tokens: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Demeaned last-position logits of ``tokens [n]`` (copy ``rows[i]`` for entry i; default copy 0)."""
        final = run.final[:, -1].float()
        h = final[rows] if rows is not None else final[:1].expand(len(tokens), -1)
        b = self.model.b_U.float()
        return (h * self.logit_directions(tokens)).sum(-1) + b[tokens] - b.mean()

    def feature_values(self, run: Run, layer: int, pos: torch.Tensor, feats: torch.Tensor,
                       rows: torch.Tensor) -> torch.Tensor:
        """Pre-activations of features ``feats`` at positions ``pos`` of layer ``layer``, one per copy ``rows[i]``."""
        x = run.x[layer][rows, pos].float()
        return self.transcoders.pre_acts_at(layer, x, feats)
