"""Evaluate an SAE spliced into the model, on held-out text.

Conventional definitions (after SAELens's bug history; see ``shared/NOTES.md``):

- explained variance ``= 1 - ||x - x_hat||^2 / ||x - mean_batch(x)||^2`` (mean over the batch, not 0);
  also reported over typical tokens only (norm <= 5x the median), because a few massive-activation
  tokens (attention sinks, separators) can dominate both sums;
- MSE ``= mean over examples of ||x - x_hat||^2`` (divided once);
- L0 = active latents per example; dead = latents that never fire on the evaluation tokens;
- CE loss recovered ``= (CE_zero - CE_sae) / (CE_zero - CE_clean)``, reported with the raw
  ``CE_sae - CE_clean`` because the ratio flatters residual-stream SAEs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..analysis.metrics import explained_variance
from ..batching import BatchState, map_batches
from ..compute import forward_bytes
from ..core.errors import InputError
from ..core.model import HookedModel, lm_loss
from ..core.result import Result
from .data import harvest, harvest_pairs
from .model import SAE


@dataclass(repr=False)
class SAEEval(Result):
    """Held-out quality of an SAE spliced into the model."""

    l0: float
    mse: float
    explained_variance: float
    dead_fraction: float
    ce_clean: float
    ce_sae: float
    ce_zero: float
    explained_variance_typical: float = float("nan")
    n_outliers: int = 0

    @property
    def ce_recovered(self) -> float:
        return (self.ce_zero - self.ce_sae) / (self.ce_zero - self.ce_clean)

    def summary(self) -> str:
        ev = (f"explained variance {self.explained_variance_typical:.3f} on typical tokens, "
              f"{self.explained_variance:.3f} including {self.n_outliers} massive-norm token(s) (> 5x the median)"
              if self.n_outliers else f"explained variance {self.explained_variance:.3f}")
        return (f"L0 {self.l0:.1f}, {ev}, "
                f"MSE {self.mse:.4g}, dead {self.dead_fraction:.1%}\n"
                f"CE loss: clean {self.ce_clean:.4f}, with SAE {self.ce_sae:.4f} "
                f"(+{self.ce_sae - self.ce_clean:.4f}), zero-ablated {self.ce_zero:.4f}; recovered "
                f"{self.ce_recovered:.3f}")

    def _dict_extra(self) -> dict:
        return {"ce_recovered": self.ce_recovered, "ce_delta": self.ce_sae - self.ce_clean}


@torch.no_grad()
def splice_hook(sae: SAE, use_error_term: bool = False, skip_first: int = 1) -> Callable:
    """A forward hook replacing the activation by the SAE's reconstruction (plus the error term if asked:
    then the output is unchanged, but features can be edited through further hooks). The first
    ``skip_first`` positions, which the SAE was not trained on, are left as they are."""
    def hook(act, h):
        shape = act.shape
        x = act.reshape(*shape[:2], -1) if act.dim() > 3 else act
        recon = sae(x.float())
        if use_error_term:
            recon = recon + (x.float() - recon)
        recon = recon.to(act.dtype)
        if skip_first:
            recon = torch.cat([x[:, :skip_first], recon[:, skip_first:]], dim=1)
        return recon.reshape(shape)

    return hook


def _zero_after_first(act, hook):
    out = torch.zeros_like(act)
    out[:, :1] = act[:, :1]
    return out


def transcoder_hooks(transcoders: list[SAE], skip_first: int = 1) -> list[tuple[str, Callable]]:
    """Forward hooks putting each transcoder in place of the layer it replaces: its input hook records the
    input, its output hook returns the transcoder's prediction (the first ``skip_first`` positions kept)."""
    hooks = []
    for tc in transcoders:
        if not tc.cfg.is_transcoder:
            raise InputError(f"{tc.cfg.hook_name} is an SAE, not a transcoder (it has no hook_name_out)")
        box: dict = {}

        def keep(act, h, box=box):
            box["x"] = act

        def put(act, h, box=box, tc=tc):
            x = box.pop("x")
            x = x.reshape(*x.shape[:2], -1) if x.dim() > 3 else x
            out = tc(x.float()).to(act.dtype).reshape(act.shape)
            return torch.cat([act[:, :skip_first], out[:, skip_first:]], dim=1) if skip_first else out

        hooks += [(tc.cfg.hook_name, keep), (tc.cfg.hook_name_out, put)]
    return hooks


@torch.no_grad()
def evaluate_sae(model: HookedModel, sae: SAE, tokens: torch.Tensor, batch_size: int | None = None) -> SAEEval:
    """L0, MSE, explained variance and CE loss recovered (against zero-ablation) on held-out ``tokens``.

    All positions but the first (the attention sink, see :func:`harvest`) are measured, spliced and
    zero-ablated, massive-norm rows included; ``explained_variance_typical`` leaves out the rows
    whose norm exceeds 5x the median. A transcoder is measured on its target (the MLP output it
    predicts from the MLP input): the CE loss with it in place of that MLP, against zeroing the MLP.
    """
    state = BatchState()
    if sae.cfg.is_transcoder:
        rows = harvest_pairs(model, sae.cfg.hook_name, sae.cfg.hook_name_out, tokens, batch_size, max_norm_ratio=None)
        x, acts = rows[:, :sae.cfg.d_in], rows[:, sae.cfg.d_in:]
        f = sae.encode(x)
        recon = sae(x)
        splice, zero_at = transcoder_hooks([sae]), sae.cfg.hook_name_out
    else:
        hook = sae.cfg.hook_name
        acts = harvest(model, hook, tokens, batch_size, max_norm_ratio=None, state=state)
        f = sae.encode(acts)
        recon = sae.decode(f)
        splice, zero_at = [(hook, splice_hook(sae))], hook
    ev = float(explained_variance(acts, recon))
    norms = acts.norm(dim=-1)
    typical = norms <= 5 * norms.median()  # massive-activation tokens (sinks, separators) dominate variance
    ev_typ = float(explained_variance(acts[typical], recon[typical]))
    mse = float((acts - recon).pow(2).sum(-1).mean())
    l0 = float((f > 0).sum(-1).float().mean())
    dead = float(((f > 0).sum(0) == 0).float().mean())
    ce = _ce(model, tokens, [[], splice, [(zero_at, _zero_after_first)]], batch_size, state)
    return SAEEval(l0, mse, ev, dead, ce[0], ce[1], ce[2], ev_typ, int((~typical).sum()))


def _ce(model: HookedModel, tokens: torch.Tensor, hook_sets: list[list], batch_size: int | None,
        state: BatchState) -> list[float]:
    """The mean next-token loss on ``tokens`` under each list of forward hooks."""
    def ce_sums(s: int, e: int) -> torch.Tensor:
        t = tokens[s:e].to(model.device)
        runs = [model.run_with_hooks(t, fwd_hooks=hs) if hs else model(t) for hs in hook_sets]
        return torch.stack([lm_loss(lg, t, per_token=True).sum() for lg in runs]).cpu()

    elt = torch.finfo(model.dtype).bits // 8
    per = forward_bytes(model.cfg.to_dict(), 1, tokens.shape[1], elt)
    sums = torch.stack(map_batches(ce_sums, tokens.shape[0], batch_size, per, model.device, "SAE evaluation",
                                   state, tokens_per_item=tokens.shape[1])).sum(0)
    return (sums / (tokens.shape[0] * (tokens.shape[1] - 1))).tolist()


@dataclass(repr=False)
class TranscodersEval(Result):
    """Each transcoder on its own (:class:`SAEEval`), and the CE loss with every one in place at once."""

    names: list[str]
    each: list[SAEEval]
    ce_clean: float
    ce_all: float

    def summary(self) -> str:
        lines = [f"{'transcoder':46s} {'L0':>6s} {'EV':>6s} {'dead':>6s} {'CE +alone':>10s} {'recovered':>9s}"]
        for n, e in zip(self.names, self.each):
            lines.append(f"{n:46s} {e.l0:6.1f} {e.explained_variance:6.3f} {e.dead_fraction:6.1%} "
                         f"{e.ce_sae - e.ce_clean:+10.4f} {e.ce_recovered:9.3f}")
        lines.append(f"all {len(self.each)} in place at once: CE {self.ce_all:.4f} (clean {self.ce_clean:.4f}, "
                     f"+{self.ce_all - self.ce_clean:.4f} nats)")
        return "\n".join(lines)


@torch.no_grad()
def evaluate_transcoders(model: HookedModel, transcoders: list[SAE], tokens: torch.Tensor,
                         batch_size: int | None = None) -> TranscodersEval:
    """:func:`evaluate_sae` for each transcoder, and the CE loss with all of them replacing their MLPs at once."""
    if not transcoders:
        raise InputError("evaluate_transcoders needs at least one transcoder")
    each = [evaluate_sae(model, tc, tokens, batch_size) for tc in transcoders]
    ce_clean, ce_all = _ce(model, tokens, [[], transcoder_hooks(transcoders)], batch_size, BatchState())
    names = [f"{tc.cfg.hook_name} -> {tc.cfg.hook_name_out}" for tc in transcoders]
    return TranscodersEval(names, each, ce_clean, ce_all)
