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
from ..analysis.validation import Estimate, bootstrap_ci
from ..batching import BatchState, map_batches
from ..compute import forward_bytes
from ..core.errors import InputError
from ..core.model import HookedModel, lm_loss
from ..core.progress import bar, stage
from ..core.result import Result
from .data import harvest, harvest_pairs
from .model import SAE

#: Below this many evaluation tokens the CE and variance figures are flagged as resting on too little data.
MIN_EVAL_TOKENS = 4096
#: A dead fraction above this, from fewer than DEAD_CHECK_TOKENS tokens, is flagged as implausible: rare
#: latents simply had no chance to fire (a latent firing once in 10,000 tokens needs ~30,000 to be seen at 95 %).
DEAD_IMPLAUSIBLE, DEAD_CHECK_TOKENS = 0.5, 100_000


@dataclass(repr=False)
class SAEEval(Result):
    """Held-out quality of an SAE spliced into the model, with how much data it rests on and what looks wrong."""

    l0: float
    mse: float
    explained_variance: float
    dead_fraction: float
    ce_clean: float
    ce_sae: float
    ce_zero: float
    explained_variance_typical: float = float("nan")
    n_outliers: int = 0
    n_tokens: int = 0  # evaluation tokens (every position but the first of each sequence)
    n_seqs: int = 0
    ce_recovered_ci: Estimate | None = None  # bootstrap over sequences

    @property
    def ce_recovered(self) -> float:
        return (self.ce_zero - self.ce_sae) / (self.ce_zero - self.ce_clean)

    def warnings(self) -> list[str]:
        """What in these numbers should not be read as a finding, and why, with what would be enough."""
        out = []
        if self.n_tokens and self.n_tokens < MIN_EVAL_TOKENS:
            per_seq = max(1, self.n_tokens // max(1, self.n_seqs))
            out.append(f"only {self.n_tokens} evaluation tokens: these figures are noisy; use at least "
                       f"{MIN_EVAL_TOKENS} (e.g. --eval-seqs {-(-MIN_EVAL_TOKENS // per_seq)} at this --seq-len)")
        if self.ce_recovered > 1:
            out.append(f"CE recovered {self.ce_recovered:.3f} is above 1: the SAE would beat the model itself. That is "
                       "implausible; on this much data it is noise" + (
                           f" (its CI {self.ce_recovered_ci.low:.3f} to {self.ce_recovered_ci.high:.3f} includes 1)"
                           if self.ce_recovered_ci is not None and self.ce_recovered_ci.low <= 1 else "")
                       + "; evaluate on more tokens before reporting it")
        if self.dead_fraction > DEAD_IMPLAUSIBLE and self.n_tokens < DEAD_CHECK_TOKENS:
            out.append(f"dead {self.dead_fraction:.1%} on {self.n_tokens} tokens is not evidence of dead latents: a "
                       f"latent firing less than once per {self.n_tokens} tokens cannot show up here; measure density on "
                       f"{DEAD_CHECK_TOKENS}+ tokens (feature_stats on the training split)")
        return out

    def summary(self) -> str:
        ev = (f"{self.explained_variance_typical:.3f} on typical tokens, {self.explained_variance:.3f} including "
              f"{self.n_outliers} massive-norm token(s) (> 5x the median)"
              if self.n_outliers else f"{self.explained_variance:.3f}")
        ci = ""
        if self.ce_recovered_ci is not None:
            ci = (f" [{self.ce_recovered_ci.low:.3f}, {self.ce_recovered_ci.high:.3f}] (95% CI over {self.n_seqs} "
                  "sequences)" if self.ce_recovered_ci.informative else f" ({self.n_seqs} sequences: too few for a CI)")
        data = f" on {self.n_tokens} held-out tokens ({self.n_seqs} sequences, first position left out)" \
            if self.n_tokens else ""
        lines = [f"SAE evaluation{data}:",
                 f"  L0 (active latents per token) {self.l0:.1f}",
                 f"  explained variance (fraction of the activation variance; 1 is perfect) {ev}",
                 f"  MSE (squared L2 error per token) {self.mse:.4g}",
                 f"  dead latents (never fired on these tokens) {self.dead_fraction:.1%}",
                 f"  CE loss (next-token, nats per token): clean {self.ce_clean:.4f}, with the SAE {self.ce_sae:.4f} "
                 f"({self.ce_sae - self.ce_clean:+.4f}), zero-ablated {self.ce_zero:.4f}",
                 f"  CE loss recovered {self.ce_recovered:.3f}{ci} (fraction of the zero-ablation loss gap closed; "
                 "1 = as good as the model)"]
        lines += [f"  WARNING: {w}" for w in self.warnings()]
        return "\n".join(lines)

    def _dict_extra(self) -> dict:
        return {"ce_recovered": self.ce_recovered, "ce_delta": self.ce_sae - self.ce_clean, "warnings": self.warnings()}


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
    per_seq = _ce_per_sequence(model, tokens, [[], splice, [(zero_at, _zero_after_first)]], batch_size, state)
    ce = per_seq.mean(1).tolist()
    recovered_ci = bootstrap_ci(per_seq.T, stat=_recovered) if per_seq.shape[1] > 1 else None
    return SAEEval(l0, mse, ev, dead, ce[0], ce[1], ce[2], ev_typ, int((~typical).sum()), int(acts.shape[0]),
                   int(tokens.shape[0]), recovered_ci)


def _recovered(v: torch.Tensor) -> torch.Tensor:
    """CE recovered from per-sequence losses ``[seq, (clean, sae, zero)]``: ``(zero - sae) / (zero - clean)``."""
    m = v.mean(0)
    return (m[2] - m[1]) / (m[2] - m[0])


def _ce_per_sequence(model: HookedModel, tokens: torch.Tensor, hook_sets: list[list], batch_size: int | None,
                     state: BatchState) -> torch.Tensor:
    """``[hook set, sequence]``: each sequence's mean next-token loss under each list of forward hooks."""
    def ce_rows(s: int, e: int) -> torch.Tensor:
        t = tokens[s:e].to(model.device)
        runs = [model.run_with_hooks(t, fwd_hooks=hs) if hs else model(t) for hs in hook_sets]
        return torch.stack([lm_loss(lg, t, per_token=True).mean(-1) for lg in runs]).cpu()

    elt = torch.finfo(model.dtype).bits // 8
    per = forward_bytes(model.cfg.to_dict(), 1, tokens.shape[1], elt)
    return torch.cat(map_batches(ce_rows, tokens.shape[0], batch_size, per, model.device, "SAE evaluation",
                                 state, tokens_per_item=tokens.shape[1]), dim=1).float()


def _ce(model: HookedModel, tokens: torch.Tensor, hook_sets: list[list], batch_size: int | None,
        state: BatchState) -> list[float]:
    """The mean next-token loss on ``tokens`` under each list of forward hooks."""
    return _ce_per_sequence(model, tokens, hook_sets, batch_size, state).mean(1).tolist()


@dataclass(repr=False)
class TranscodersEval(Result):
    """Each transcoder on its own (:class:`SAEEval`), and the CE loss with every one in place at once."""

    names: list[str]
    each: list[SAEEval]
    ce_clean: float
    ce_all: float

    def summary(self) -> str:
        lines = ["each transcoder alone: L0 (active latents per token), EV (explained variance of the MLP output), dead "
                 "(never fired), CE +alone (next-token loss change, nats), recovered (CE loss recovered, 1 = as good "
                 "as the MLP)",
                 f"{'transcoder':46s} {'L0':>6s} {'EV':>6s} {'dead':>6s} {'CE +alone':>10s} {'recovered':>9s}"]
        for n, e in zip(self.names, self.each):
            lines.append(f"{n:46s} {e.l0:6.1f} {e.explained_variance:6.3f} {e.dead_fraction:6.1%} "
                         f"{e.ce_sae - e.ce_clean:+10.4f} {e.ce_recovered:9.3f}")
        lines.append(f"all {len(self.each)} in place at once: CE loss {self.ce_all:.4f} nats per token (clean "
                     f"{self.ce_clean:.4f}, {self.ce_all - self.ce_clean:+.4f})")
        warn = sorted({w for e in self.each for w in e.warnings() if w.startswith("only ")})
        lines += [f"WARNING: {w}" for w in warn]
        return "\n".join(lines)


@torch.no_grad()
def evaluate_transcoders(model: HookedModel, transcoders: list[SAE], tokens: torch.Tensor,
                         batch_size: int | None = None) -> TranscodersEval:
    """:func:`evaluate_sae` for each transcoder, and the CE loss with all of them replacing their MLPs at once."""
    if not transcoders:
        raise InputError("evaluate_transcoders needs at least one transcoder")
    each = [evaluate_sae(model, tc, tokens, batch_size)
            for tc in bar(transcoders, desc=f"evaluating transcoders on {tokens.numel()} tokens", unit="transcoder")]
    stage(f"CE loss with all {len(transcoders)} transcoders in place")
    ce_clean, ce_all = _ce(model, tokens, [[], transcoder_hooks(transcoders)], batch_size, BatchState())
    names = [f"{tc.cfg.hook_name} -> {tc.cfg.hook_name_out}" for tc in transcoders]
    return TranscodersEval(names, each, ce_clean, ce_all)
