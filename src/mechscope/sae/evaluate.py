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
from ..core.model import HookedModel, lm_loss
from ..core.result import Result
from .data import harvest
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


@torch.no_grad()
def evaluate_sae(model: HookedModel, sae: SAE, tokens: torch.Tensor, batch_size: int | None = None) -> SAEEval:
    """L0, MSE, explained variance and CE loss recovered (against zero-ablation) on held-out ``tokens``.

    All positions but the first (the attention sink, see :func:`harvest`) are measured, spliced and
    zero-ablated, massive-norm rows included; ``explained_variance_typical`` leaves out the rows
    whose norm exceeds 5x the median.
    """
    hook = sae.cfg.hook_name
    state = BatchState()
    acts = harvest(model, hook, tokens, batch_size, max_norm_ratio=None, state=state)
    f = sae.encode(acts)
    recon = sae.decode(f)
    ev = float(explained_variance(acts, recon))
    norms = acts.norm(dim=-1)
    typical = norms <= 5 * norms.median()  # massive-activation tokens (sinks, separators) dominate variance
    ev_typ = float(explained_variance(acts[typical], recon[typical]))
    mse = float((acts - recon).pow(2).sum(-1).mean())
    l0 = float((f > 0).sum(-1).float().mean())
    dead = float(((f > 0).sum(0) == 0).float().mean())
    def ce_sums(s: int, e: int) -> torch.Tensor:  # summed next-token losses: clean, SAE spliced in, zero-ablated
        t = tokens[s:e].to(model.device)
        runs = [model(t), model.run_with_hooks(t, fwd_hooks=[(hook, splice_hook(sae))]),
                model.run_with_hooks(t, fwd_hooks=[(hook, _zero_after_first)])]
        return torch.stack([lm_loss(lg, t, per_token=True).sum() for lg in runs]).cpu()

    elt = torch.finfo(model.dtype).bits // 8
    per = forward_bytes(model.cfg.to_dict(), 1, tokens.shape[1], elt)
    sums = torch.stack(map_batches(ce_sums, tokens.shape[0], batch_size, per, model.device, "SAE evaluation",
                                   state)).sum(0)
    m = dict(zip(("clean", "sae", "zero"), (sums / (tokens.shape[0] * (tokens.shape[1] - 1))).tolist()))
    return SAEEval(l0, mse, ev, dead, m["clean"], m["sae"], m["zero"], ev_typ, int((~typical).sum()))
