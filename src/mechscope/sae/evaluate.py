"""Evaluate an SAE spliced into the model, on held-out text.

Conventional definitions (after SAELens's bug history; see ``shared/NOTES.md``):

- explained variance ``= 1 - ||x - x_hat||^2 / ||x - mean_batch(x)||^2`` (mean over the batch, not 0);
  also reported over typical tokens only (norm <= 5x the median), because a few massive-activation
  tokens (attention sinks, separators) can dominate both sums;
- MSE ``= mean over examples of ||x - x_hat||^2`` (divided once);
- L0 = active latents per example; dead = latents that never fire on the evaluation tokens;
- CE loss recovered ``= (CE_zero - CE_sae) / (CE_zero - CE_clean)``, reported with the raw
  ``CE_sae - CE_clean`` because the ratio flatters residual-stream SAEs;
- shrinkage (SAEBench's ``l2_ratio``) ``= mean over tokens of ||x_hat|| / ||x||``: below 1 when the
  sparsity penalty shrinks activations (Wright & Sharkey 2024);
- decoder similarity: each latent's largest cosine with another latent's decoder row; a share of
  latents above 0.9 means near-duplicates;
- feature density: each latent's log10 firing rate on the evaluation tokens (the histogram), and the
  fraction of latents alive.

L0, MSE, explained variance and shrinkage carry a 95 % bootstrap interval over tokens (500 resamples; the
variance's mean is the whole sample's), CE recovered one over sequences.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from ..analysis.metrics import explained_variance
from ..analysis.validation import Estimate, bootstrap_ci
from ..batching import BatchState, map_batches
from ..compute import forward_bytes
from ..core.errors import InputError
from ..core.model import HookedModel, lm_loss
from ..core.progress import bar, stage
from ..core.result import Result
from ..techniques.inputs import logits_under
from .data import positions
from .model import SAE

if TYPE_CHECKING:
    from .clt import CrossLayerTranscoder

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
    l2_ratio: float = float("nan")  # shrinkage: mean ||x_hat|| / ||x||
    decoder_max_cos: float = float("nan")  # mean over latents of the largest cosine with another decoder row
    near_duplicates: float = float("nan")  # share of latents whose decoder row has a cosine > 0.9 with another
    log10_density: torch.Tensor | None = None  # [d_sae] log10 firing rate on the evaluation tokens (-inf: never)
    token_ci: dict = field(default_factory=dict)  # metric -> Estimate, bootstrap over tokens
    # the rest of the suite (evaluate_sae(..., suite=...)); None where not run
    absorption: "Result | None" = None  # suite.AbsorptionResult
    probing: "Result | None" = None  # suite.ProbingResult
    autointerp: "Result | None" = None  # autointerp.ExplainResult

    _skip_in_dict = ("log10_density",)

    @property
    def alive_fraction(self) -> float:
        return 1.0 - self.dead_fraction

    def density_histogram(self, bins: int = 20) -> tuple[list[float], list[int]]:
        """Bin edges (log10 firing rate) and counts of the latents that fired; the dead are left out."""
        d = self.log10_density
        if d is None or not torch.isfinite(d).any():
            return [], []
        d = d[torch.isfinite(d)]
        lo, hi = float(d.min()), max(float(d.max()), float(d.min()) + 1e-6)
        counts = torch.histc(d, bins=bins, min=lo, max=hi)
        return torch.linspace(lo, hi, bins + 1).tolist(), [int(c) for c in counts]

    def plot(self, path: "str | Path") -> Path:
        """The feature-density histogram (log10 firing rate of the latents that fired) as a PNG."""
        from ..analysis.viz import histogram_png

        d = self.log10_density
        if d is None:
            raise InputError("this evaluation has no feature densities (evaluate_sae records them)")
        return histogram_png(d[torch.isfinite(d)], path, title=f"feature density ({self.alive_fraction:.1%} alive, "
                             f"{self.n_tokens} tokens)", xlabel="log10 firing rate (fraction of tokens)", log_y=True)

    @property
    def ce_recovered(self) -> float:
        return (self.ce_zero - self.ce_sae) / (self.ce_zero - self.ce_clean)

    def warnings(self) -> list[str]:
        """What in these numbers should not be read as a finding, and why, with what would be enough."""
        out = []
        if self.n_tokens and self.n_tokens < MIN_EVAL_TOKENS:
            per_seq = max(1, self.n_tokens // max(1, self.n_seqs))
            out.append(f"only {self.n_tokens} evaluation tokens: these figures are noisy; use at least "
                       f"{MIN_EVAL_TOKENS} (e.g. --eval-seqs {-(-MIN_EVAL_TOKENS // per_seq)} at this --seq-len, if "
                       "the corpus's held-out split has that many sequences; if it does not, a larger --corpus)")
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
        def band(name: str, fmt: str) -> str:
            e = self.token_ci.get(name)
            return f" [{e.low:{fmt}}, {e.high:{fmt}}]" if e is not None and e.informative else ""

        every = f"{self.explained_variance:.3f}{band('explained_variance', '.3f')}"
        ev = (f"{self.explained_variance_typical:.3f} on typical tokens, {every} including "
              f"{self.n_outliers} massive-norm token(s) (> 5x the median)" if self.n_outliers else every)
        ci = ""
        if self.ce_recovered_ci is not None:
            ci = (f" [{self.ce_recovered_ci.low:.3f}, {self.ce_recovered_ci.high:.3f}] (95% CI over {self.n_seqs} "
                  "sequences)" if self.ce_recovered_ci.informative else f" ({self.n_seqs} sequences: too few for a CI)")
        data = f" on {self.n_tokens} held-out tokens ({self.n_seqs} sequences, first position left out)" \
            if self.n_tokens else ""
        lines = [f"SAE evaluation{data}:",
                 f"  L0 (active latents per token) {self.l0:.1f}{band('l0', '.1f')}",
                 f"  explained variance (fraction of the activation variance; 1 is perfect; [95% CI over tokens]) {ev}",
                 f"  MSE (squared L2 error per token) {self.mse:.4g}{band('mse', '.4g')}",
                 f"  dead latents (never fired on these tokens) {self.dead_fraction:.1%} (alive {self.alive_fraction:.1%})"]
        if self.l2_ratio == self.l2_ratio:
            lines += [f"  shrinkage (mean ||x_hat|| / ||x||; 1 = none) {self.l2_ratio:.3f}{band('l2_ratio', '.3f')}",
                      f"  decoder similarity: largest cosine with another latent {self.decoder_max_cos:.3f} on average; "
                      f"{self.near_duplicates:.1%} of latents above 0.9 (near-duplicates)"]
        if self.log10_density is not None and torch.isfinite(self.log10_density).any():
            d = self.log10_density[torch.isfinite(self.log10_density)]
            q = torch.quantile(d, torch.tensor([0.1, 0.5, 0.9])).tolist()
            lines.append(f"  feature density (log10 firing rate of the latents that fired): 10th/50th/90th percentile "
                         f"{q[0]:.2f} / {q[1]:.2f} / {q[2]:.2f}; densest {float(d.max()):.2f}")
        lines += [f"  CE loss (next-token, nats per token): clean {self.ce_clean:.4f}, with the SAE {self.ce_sae:.4f} "
                 f"({self.ce_sae - self.ce_clean:+.4f}), zero-ablated {self.ce_zero:.4f}",
                 f"  CE loss recovered {self.ce_recovered:.3f}{ci} (fraction of the zero-ablation loss gap closed; "
                 "1 = as good as the model)"]
        lines += [f"  WARNING: {w}" for w in self.warnings()]
        lines += [part.summary() for part in (self.absorption, self.probing, self.autointerp) if part is not None]
        return "\n".join(lines)

    def _dict_extra(self) -> dict:
        edges, counts = self.density_histogram()
        return {"ce_recovered": self.ce_recovered, "ce_delta": self.ce_sae - self.ce_clean, "warnings": self.warnings(),
                "alive_fraction": self.alive_fraction, "density_histogram": {"log10_edges": edges, "counts": counts}}


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


#: the parts of the evaluation suite, in the order they run
SUITE = ("core", "absorption", "probing", "autointerp")


def parse_suite(spec: "str | tuple[str, ...] | list[str]") -> tuple[str, ...]:
    """``"core,absorption"`` (or a sequence) as a checked tuple; core always runs."""
    parts = [p.strip() for p in (spec.split(",") if isinstance(spec, str) else spec) if p.strip()]
    bad = [p for p in parts if p not in SUITE]
    if bad:
        raise InputError(f"unknown evaluation(s) {bad}: the suite has {', '.join(SUITE)}")
    return tuple(p for p in SUITE if p in parts or p == "core")


@torch.no_grad()
def evaluate_sae(model: HookedModel, sae: SAE, tokens: torch.Tensor, batch_size: int | None = None,
                 suite: "str | tuple[str, ...]" = ("core",), reseeds: int = 3, options: dict | None = None) -> SAEEval:
    """L0, MSE, explained variance and CE loss recovered (against zero-ablation) on held-out ``tokens``,
    then the other parts of ``suite`` (:data:`SUITE`): first-letter absorption and k-sparse probing
    (:mod:`.suite`, each over ``reseeds`` data-order reseeds) and autointerp (:func:`.autointerp.explain_features`).
    ``options`` maps a part's name to keyword arguments for it, e.g. ``{"absorption": {"n_words": 4000}}``.

    All positions but the first (the attention sink, see :func:`harvest`) are measured, spliced and
    zero-ablated, massive-norm rows included; ``explained_variance_typical`` leaves out the rows
    whose norm exceeds 5x the median. A transcoder is measured on its target (the MLP output it
    predicts from the MLP input): the CE loss with it in place of that MLP, against zeroing the MLP.
    """
    parts = parse_suite(suite)
    state = BatchState()
    if sae.cfg.is_transcoder:
        reads, splice, zero_at = [sae.cfg.hook_name, sae.cfg.hook_name_out], transcoder_hooks([sae]), sae.cfg.hook_name_out
    else:
        reads, splice, zero_at = [sae.cfg.hook_name], [(sae.cfg.hook_name, splice_hook(sae))], sae.cfg.hook_name
    # the CE runs first: its unhooked run also gives the activations the SAE reads (every position but the first,
    # what harvest(..., max_norm_ratio=None) gives), so there is no separate harvest pass
    per_seq, rows = _ce_per_sequence(model, tokens, [[], splice, [(zero_at, _zero_after_first)]], batch_size, state,
                                     record=reads)
    x, acts = rows[reads[0]], rows[reads[-1]]  # what it reads, and what it reconstructs (for an SAE, the same)
    f = sae.encode(x)
    recon = sae(x) if sae.cfg.is_transcoder else sae.decode(f)
    core = core_metrics(sae, acts, recon, f)
    ev = float(explained_variance(acts, recon))
    norms = acts.norm(dim=-1)
    typical = norms <= 5 * norms.median()  # massive-activation tokens (sinks, separators) dominate variance
    ev_typ = float(explained_variance(acts[typical], recon[typical]))
    mse, l0 = core["token_ci"]["mse"].value, core["token_ci"]["l0"].value
    dead = float(((f > 0).sum(0) == 0).float().mean())
    ce = per_seq.mean(1).tolist()
    recovered_ci = bootstrap_ci(per_seq.T, stat=_recovered) if per_seq.shape[1] > 1 else None
    out = SAEEval(l0, mse, ev, dead, ce[0], ce[1], ce[2], ev_typ, int((~typical).sum()), int(acts.shape[0]),
                  int(tokens.shape[0]), recovered_ci, **core)
    opts = options or {}
    if "absorption" in parts:
        from .suite import absorption

        out.absorption = absorption(model, sae, reseeds=reseeds, **opts.get("absorption", {}))
    if "probing" in parts:
        from .suite import sparse_probing

        out.probing = sparse_probing(model, sae, reseeds=reseeds, **opts.get("probing", {}))
    if "autointerp" in parts:
        from .autointerp import explain_features

        out.autointerp = explain_features(model, sae, tokens, **opts.get("autointerp", {}))
    return out


@torch.no_grad()
def decoder_similarity(sae: SAE, chunk: int = 4096) -> torch.Tensor:
    """``[d_sae]``: each latent's largest cosine similarity with another latent's decoder row (in chunks of rows)."""
    W = torch.nn.functional.normalize(sae.W_dec.float(), dim=-1)
    out = torch.empty(W.shape[0])
    for s in range(0, W.shape[0], chunk):
        cos = W[s:s + chunk] @ W.T
        cos[torch.arange(cos.shape[0]), torch.arange(s, s + cos.shape[0])] = -2.0  # not itself
        out[s:s + chunk] = cos.max(-1).values.cpu()
    return out


@torch.no_grad()
def core_metrics(sae: SAE, acts: torch.Tensor, recon: torch.Tensor, f: torch.Tensor, n_boot: int = 500) -> dict:
    """Shrinkage, decoder similarity, feature densities, and bootstrap intervals over tokens for L0, MSE,
    explained variance and shrinkage (``acts``, ``recon`` ``[n, d]``, ``f`` ``[n, d_sae]``)."""
    err = (acts - recon).pow(2).sum(-1).double()
    dev = (acts - acts.mean(0)).pow(2).sum(-1).double()
    ratio = (recon.norm(dim=-1) / acts.norm(dim=-1).clamp_min(1e-12)).double()
    l0 = (f > 0).sum(-1).double()
    cos = decoder_similarity(sae)
    fires = (f > 0).sum(0).double()
    ci = {"l0": bootstrap_ci(l0, n_boot=n_boot), "mse": bootstrap_ci(err, n_boot=n_boot),
          "l2_ratio": bootstrap_ci(ratio, n_boot=n_boot),
          "explained_variance": bootstrap_ci(torch.stack([err, dev], 1), stat=lambda v: 1 - v[:, 0].sum() / v[:, 1].sum(),
                                             n_boot=n_boot)}
    return {"l2_ratio": float(ratio.mean()), "decoder_max_cos": float(cos.mean()),
            "near_duplicates": float((cos > 0.9).float().mean()), "log10_density": (fires / max(1, f.shape[0])).log10().float(),
            "token_ci": ci}


def _recovered(v: torch.Tensor) -> torch.Tensor:
    """CE recovered from per-sequence losses ``[seq, (clean, sae, zero)]``: ``(zero - sae) / (zero - clean)``."""
    m = v.mean(0)
    return (m[2] - m[1]) / (m[2] - m[0])


def _ce_per_sequence(model: HookedModel, tokens: torch.Tensor, hook_sets: list[list], batch_size: int | None,
                     state: BatchState, record: list[str] = ()) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``[hook set, sequence]``: each sequence's mean next-token loss under each list of forward hooks; and the
    activations at the hook points ``record`` in the first run (whose hook list must be empty: the model itself),
    as rows ``[n * (pos - 1), width]`` of every position but the first, sequence by sequence."""
    if record and hook_sets[0]:
        raise InputError("_ce_per_sequence records activations in the unhooked run: the first hook list must be empty")
    got: dict[int, dict[str, torch.Tensor]] = {}  # first row of a batch -> its rows (a batch retried smaller overwrites)

    def ce_rows(s: int, e: int) -> torch.Tensor:
        t = tokens[s:e].to(model.device)
        seen: dict[str, torch.Tensor] = {}
        readers = [(n, lambda a, h: seen.__setitem__(h.name, a.detach())) for n in record]  # read, change nothing
        runs = logits_under(model, t, [readers, *hook_sets[1:]] if record else hook_sets)  # shared blocks: once
        if record:
            got[s] = {n: positions(seen[n], 1).flatten(0, 1).float().cpu() for n in record}
        return torch.stack([lm_loss(lg, t, per_token=True).mean(-1) for lg in runs]).cpu()

    elt = torch.finfo(model.dtype).bits // 8
    per = forward_bytes(model.cfg.to_dict(), 1, tokens.shape[1], elt)
    ce = torch.cat(map_batches(ce_rows, tokens.shape[0], batch_size, per, model.device, "SAE evaluation",
                               state, tokens_per_item=tokens.shape[1]), dim=1).float()
    return ce, {n: torch.cat([got[s][n] for s in sorted(got)]) for n in record}


def _ce(model: HookedModel, tokens: torch.Tensor, hook_sets: list[list], batch_size: int | None,
        state: BatchState) -> list[float]:
    """The mean next-token loss on ``tokens`` under each list of forward hooks."""
    return _ce_per_sequence(model, tokens, hook_sets, batch_size, state)[0].mean(1).tolist()


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


def clt_hooks(clt: "CrossLayerTranscoder", skip_first: int = 1) -> list[tuple[str, Callable]]:
    """Forward hooks putting a cross-layer transcoder in place of every MLP it covers, closed loop: each layer's
    input hook encodes that layer's features, and each output hook returns the prediction from the features of that
    layer and every earlier one (plus bias and skip); the first ``skip_first`` positions are kept."""
    feats: dict = {}
    hooks = []
    for s, layer in enumerate(clt.cfg.layers):
        def read(act, h, s=s, layer=layer):
            x = act.reshape(*act.shape[:2], -1).float()
            feats[s] = (x, clt.encode(layer, x))

        def put(act, h, t=s, layer=layer):
            x = feats[t][0]
            out = clt.decoder_bias(layer) + (clt.skip_term(layer, x) if clt.cfg.skip else 0.0)
            out = out.expand(*x.shape[:2], -1).clone()
            for s_, (_, a) in feats.items():
                if s_ <= t < s_ + clt.cfg.n_targets(s_):
                    nz = a.flatten(0, 1).abs().sum(0).nonzero(as_tuple=True)[0]
                    if nz.numel():
                        w = clt.write_directions(clt.cfg.layers[s_], nz)[:, t - s_]  # [m, d]
                        out = out + a[..., nz] @ w
            out = out.to(act.dtype).reshape(act.shape)
            if t == clt.cfg.n_layers - 1:
                feats.clear()
            return torch.cat([act[:, :skip_first], out[:, skip_first:]], dim=1) if skip_first else out

        hooks += [(clt.input_hook(layer), read), (clt.output_hook(layer), put)]
    return hooks


@dataclass(repr=False)
class CLTEval(Result):
    """A cross-layer transcoder (or per-layer set) on held-out tokens: per layer, the normalised MSE of the MLP
    output it predicts from the model's own inputs (NMSE ``= ||y - ŷ||² / ||y - mean(y)||²`` = 1 - explained
    variance), the active features per token and the dead share; and the CE loss with it in place of every MLP at
    once (closed loop: later layers read what earlier predictions made)."""

    kind: str
    layers: list[int]
    nmse: list[float]
    l0: list[float]
    dead_fraction: list[float]
    ce_clean: float
    ce_clt: float
    ce_zero: float
    n_tokens: int
    n_seqs: int
    n_outliers: int = 0  # massive-norm tokens left out of NMSE and L0, as training leaves them out
    nmse_all: list[float] = field(default_factory=list)  # with them in

    @property
    def ce_recovered(self) -> float:
        return (self.ce_zero - self.ce_clt) / (self.ce_zero - self.ce_clean)

    @property
    def mean_nmse(self) -> float:
        return sum(self.nmse) / len(self.nmse)

    def summary(self) -> str:
        lines = [f"{self.kind.upper()} evaluation on {self.n_tokens} held-out tokens ({self.n_seqs} sequences, first "
                 f"position left out, and {self.n_outliers} massive-norm token(s) (> 10x their sequence's median at some "
                 "layer's input, the harvest's rule: training never sees them)): per layer NMSE (normalised MSE of the "
                 "MLP output, 1 - explained variance; 0 is perfect; in brackets with the massive-norm tokens in), L0 "
                 "(active features per token) and dead (never fired here)",
                 f"  {'layer':>5s} {'NMSE':>7s} {'(all)':>8s} {'L0':>7s} {'dead':>6s}"]
        every = self.nmse_all or [float("nan")] * len(self.nmse)
        lines += [f"  {layer:5d} {n:7.3f} {f'({a:.3f})':>8s} {l0:7.1f} {d:6.1%}" for layer, n, a, l0, d in
                  zip(self.layers, self.nmse, every, self.l0, self.dead_fraction)]
        lines += [f"  mean NMSE {self.mean_nmse:.3f}; L0 per token over all layers {sum(self.l0):.1f}",
                  f"  CE loss (next-token, nats per token) with it in place of all {len(self.layers)} MLPs: "
                  f"{self.ce_clt:.4f} (clean {self.ce_clean:.4f}, {self.ce_clt - self.ce_clean:+.4f}; those MLPs "
                  f"zero-ablated {self.ce_zero:.4f}); CE loss recovered {self.ce_recovered:.3f}"]
        if self.n_tokens < MIN_EVAL_TOKENS:
            lines.append(f"  WARNING: only {self.n_tokens} evaluation tokens: these figures are noisy; use at least "
                         f"{MIN_EVAL_TOKENS}")
        return "\n".join(lines)

    def _dict_extra(self) -> dict:
        return {"ce_recovered": self.ce_recovered, "mean_nmse": self.mean_nmse, "l0_total": sum(self.l0)}


@torch.no_grad()
def evaluate_clt(model: HookedModel, clt: "CrossLayerTranscoder", tokens: torch.Tensor,
                 batch_size: int | None = None, skip_first: int = 1) -> CLTEval:
    """:class:`CLTEval` of ``clt`` on ``tokens [n, pos]`` (held-out text)."""
    from .clt import CrossLayerTranscoder
    from .data import harvest_bundle

    if not isinstance(clt, CrossLayerTranscoder):
        raise InputError(f"evaluate_clt takes a CrossLayerTranscoder, got {type(clt).__name__}")
    clt.check_fits(model)
    c = clt.cfg
    every = harvest_bundle(model, c.input_hooks, c.output_hooks, tokens, batch_size, skip_first, max_norm_ratio=None)
    kept = harvest_bundle(model, c.input_hooks, c.output_hooks, tokens, batch_size, skip_first)
    dev = clt.b_enc.device

    def pass_over(rows: torch.Tensor, count: bool) -> torch.Tensor:
        x = rows[:, :c.n_layers * c.d_model].reshape(-1, c.n_layers, c.d_model)
        y = rows[:, c.n_layers * c.d_model:].reshape(-1, c.n_layers, c.d_model)
        sse = torch.zeros(c.n_layers)
        for s0 in range(0, x.shape[0], 1024):
            xb = x[s0:s0 + 1024].to(dev)
            sse += (y[s0:s0 + 1024] - clt(xb).cpu()).pow(2).sum((0, 2))
            if count:
                for s in range(c.n_layers):
                    on = clt.encode_index(s, xb[:, s]) > 0
                    fired[s] |= on.any(0).cpu()
                    l0[s] += float(on.sum())
        return sse / (y - y.mean(0)).pow(2).sum((0, 2)).clamp_min(1e-30)

    fired, l0 = torch.zeros(c.n_layers, c.d_sae, dtype=torch.bool), torch.zeros(c.n_layers)
    nmse, nmse_all = pass_over(kept, True), pass_over(every, False)
    state = BatchState()
    zero = [(clt.output_hook(layer), _zero_after_first) for layer in c.layers]
    ce_clean, ce_clt, ce_zero = _ce(model, tokens, [[], clt_hooks(clt, skip_first), zero], batch_size, state)
    n = kept.shape[0]
    return CLTEval(c.kind, list(c.layers), nmse.tolist(), (l0 / max(n, 1)).tolist(), (1 - fired.float().mean(1)).tolist(),
                   ce_clean, ce_clt, ce_zero, every.shape[0], tokens.shape[0], every.shape[0] - n, nmse_all.tolist())
