"""The local replacement model of one prompt (Ameisen et al. 2025, "Circuit Tracing", §2).

Around one prompt, the model is made linear from feature to feature:

- attention patterns and norm scales are frozen from the clean pass (:mod:`mechscope.core.linearize`);
- each MLP with a transcoder writes ``sum_f a_f W_dec[f] + x W_skip + b + error``, where the feature
  activations ``a_f`` and the error ``error = mlp_out - transcoder(x)`` are held at their clean values
  (an MLP without a transcoder is all error);
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
from ..sae.transcoders import TranscoderSet

EMBED = "embed"


@dataclass
class LayerState:
    """One block's MLP in the replacement model: its transcoder (or None) and its clean values.

    ``x [pos, d_in]`` the transcoder's input, ``acts [pos, d_sae]`` its features (zero before
    ``skip_first``), ``mlp_out [pos, d_model]`` the real MLP output, ``error`` what the transcoder misses.
    """

    layer: int
    transcoder: SAE | None
    x: torch.Tensor | None
    acts: torch.Tensor | None
    mlp_out: torch.Tensor
    error: torch.Tensor

    @property
    def out_hook(self) -> str:
        return act_name("mlp_out", self.layer)


@dataclass
class Run:
    """The live points of one replacement-model run: each transcoder's input ``x[layer] [B, pos, d_in]``
    and the final norm's output ``final [B, pos, d_model]``."""

    x: dict[int, torch.Tensor] = field(default_factory=dict)
    final: torch.Tensor | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # the hook points asked for with ``capture``


class ReplacementModel:
    """The frozen replacement model of ``model`` on ``tokens [1, pos]`` with ``transcoders`` (one per layer, any subset;
    they are moved to the model's device).

    Features at positions before ``skip_first`` (default 1: the first position is the attention sink,
    BOS or not, and mechscope's harvest leaves it out of transcoder training) are left out. Their error
    vectors are zeroed too, so the MLP output there is part of the constant, as in circuit-tracer;
    ``sink_errors=True`` keeps it as error instead.
    """

    def __init__(self, model: HookedModel, transcoders: TranscoderSet | list[SAE], tokens: torch.Tensor,
                 skip_first: int | None = None, sink_errors: bool = False):
        if tokens.dim() != 2 or tokens.shape[0] != 1:
            raise InputError(f"an attribution graph is built for one prompt: tokens must be [1, pos], got "
                             f"{tuple(tokens.shape)}")
        self.model, self.tokens = model, tokens.to(model.device)
        self.n_pos = tokens.shape[1]
        self.skip_first = 1 if skip_first is None else skip_first
        self.sink_errors = sink_errors
        self.transcoders = TranscoderSet.of(model, transcoders).to(model.device)
        self.frozen, self.layers, self.embed, self.logits = self._clean_pass()

    # ------------------------------------------------------------------ the clean pass
    def _clean_pass(self) -> tuple[Frozen, list[LayerState], torch.Tensor, torch.Tensor]:
        model, seen = self.model, {}

        def keep(act, hook):
            seen[hook.name] = act.detach()[0]

        names = model.embed_hooks + [act_name("mlp_out", layer) for layer in range(model.cfg.n_layers)]
        names += [tc.cfg.hook_name for tc in self.transcoders]
        with torch.no_grad(), record_frozen(model) as frozen:
            logits = model.run_with_hooks(self.tokens, fwd_hooks=[(n, keep) for n in dict.fromkeys(names)])
        embed = sum(seen[e] for e in model.embed_hooks)
        layers = []
        for layer in range(model.cfg.n_layers):
            mlp = seen[act_name("mlp_out", layer)]
            tc = self.transcoders.get(layer)
            if tc is None:
                layers.append(LayerState(layer, None, None, None, mlp, self._sink(mlp.clone())))
                continue
            x = seen[tc.cfg.hook_name].reshape(self.n_pos, -1)
            with torch.no_grad():
                acts = tc.encode(x.float())
                acts[:self.skip_first] = 0
                predicted = tc.decode(acts) + tc.skip_term(x.float())
            layers.append(LayerState(layer, tc, x, acts, mlp, self._sink(mlp - predicted.to(mlp.dtype))))
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
        live = Run()
        hooks = [(act_name("embed"), lambda act, hook: act + add[EMBED].to(act.device, act.dtype) if EMBED in add else act)]
        hooks += [(name, lambda act, hook: live.extra.__setitem__(hook.name, act)) for name in capture]
        for st in self.layers:
            tc = st.transcoder
            if tc is not None:
                def read(act, hook, layer=st.layer):
                    live.x[layer] = act.reshape(*act.shape[:2], -1)

                hooks.append((tc.cfg.hook_name, read))

            def write(act, hook, st=st):
                out = st.mlp_out.to(act.dtype).expand_as(act)
                if st.transcoder is not None and st.transcoder.cfg.skip:  # the one live path through a transcoder
                    delta = st.transcoder.skip_term((live.x[st.layer] - st.x).float())
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
            if st.acts is not None:
                tc = st.transcoder
                w = w - (st.acts.float() @ tc.write_directions(torch.arange(tc.cfg.d_sae)).detach().float())[None]
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
        return self.transcoders[layer].pre_acts_at(x, feats)
