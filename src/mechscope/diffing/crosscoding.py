"""Crosscoders on a model pair: harvesting paired activations, training, evaluation, latent classes and Latent Scaling.

- :func:`harvest_pair`: rows ``[x_base(h_1) .. x_base(h_n) | x_ft(h_1) .. x_ft(h_n)]`` of the same tokens, one forward
  pass of each model per batch; a token is kept where both models' activations pass the norm rule the SAE harvests use
  (:func:`mechscope.sae.data.token_keep_mask`).
- :func:`train_crosscoder`: mechscope's one dictionary trainer (:func:`mechscope.sae.train.fit_saes`: resumable,
  data-parallel under torchrun; several widths in lockstep from one harvest).
- :func:`latent_classes`: each latent's relative decoder norm ``r_j = ||d_j^ft|| / (||d_j^base|| + ||d_j^ft||)``
  (Lindsey et al. 2024's crosscoder note): base-only (``r < 0.1``), fine-tune-only (``r > 0.9``), shared
  (``0.3 <= r <= 0.7``), and the decoder cosine of the shared ones.
- :func:`latent_scaling` (Minder et al. 2025, arXiv 2504.02922, §3): for a latent ``j`` with fine-tune decoder ``d_j``
  and activations ``f_j``, ``β = argmin_β Σ_x ||β f_j(x) d_j - y(x)||² = <d_j, Σ f_j y> / (||d_j||² Σ f_j²)`` for the
  targets ``y``: each model's reconstruction ``x̂^M`` and each model's error with the latent's own term added back
  ``x^M - x̂^M + f_j d_j^M``. ``ν_ε = β_ε^base / β_ε^ft`` near 1 says the base model's activations hold the latent's
  direction (Complete Shrinkage: L1 pushed its base decoder to zero); ``ν_r = β_r^base / β_r^ft`` near 1 says the base
  reconstruction holds it through other latents (Latent Decoupling). A genuinely fine-tune-only latent has both near 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from ..analysis import viz
from ..compute import free_memory
from ..core.errors import InputError
from ..core.hookpoints import act_name
from ..core.model import lm_loss
from ..core.progress import bar, stage
from ..core.result import Result
from ..distributed import Dist, split
from ..sae.crosscoder import Crosscoder, CrosscoderConfig
from ..sae.data import PartitionedSource, default_partitions, harvest_many, token_keep_mask
from ..sae.train import TrainConfig, TrainResult, fit_saes
from .pair import SIDES, ModelPair

#: relative decoder norm cuts (Lindsey et al. 2024 read the histogram's modes at 0, 0.5 and 1)
BASE_ONLY, FT_ONLY, SHARED = 0.1, 0.9, (0.3, 0.7)


def default_hooks(pair: ModelPair) -> list[str]:
    """The residual stream after the middle block (the published crosscoders read Gemma 2 2B's layer 13 of 26)."""
    return [act_name("resid_post", pair.cfg.n_layers // 2)]


def crosscoder_config(pair: ModelPair, d_sae: int, hooks: "list[str] | None" = None, **kwargs) -> CrosscoderConfig:
    """A :class:`~mechscope.sae.crosscoder.CrosscoderConfig` for ``pair`` over ``hooks`` (default
    :func:`default_hooks`), each checked in both models; ``kwargs`` set the rest (``architecture``, ``k``, ...)."""
    hooks = list(hooks or default_hooks(pair))
    for side in SIDES:
        with pair.side(side) as m:
            for h in hooks:
                m.manager.check(h)
                width = m.cfg.d_model if "resid" in h or h.endswith(("hook_mlp_out", "hook_attn_out")) else None
                if width is None:
                    raise InputError(f"a crosscoder reads d_model-wide hooks (the residual stream, attention or MLP "
                                     f"outputs); {h} is not one")
    return CrosscoderConfig(d_model=pair.cfg.d_model, d_sae=d_sae, hooks=tuple(hooks), base_model=pair.base_name,
                            ft_model=pair.ft_name, **kwargs)


@torch.no_grad()
def harvest_pair(pair: ModelPair, hooks: "list[str]", tokens: torch.Tensor, batch_size: int | None = None,
                 skip_first: int = 1, max_norm_ratio: float | None = 10.0, keep_all: bool = False) -> torch.Tensor:
    """Paired rows ``[m, 2 len(hooks) d]`` for ``tokens [n, pos]``: the base model's activations at every hook, then the
    fine-tune's, at the same tokens (fp32, CPU). Positions before ``skip_first`` are dropped and a token is kept where
    both models pass the norm rule of :func:`~mechscope.sae.data.token_keep_mask`. ``keep_all=True`` keeps every token
    (``m = n · pos``, in order: what per-token readers need)."""
    if tokens.dim() != 2:
        raise InputError(f"tokens must be [n, pos], got {tuple(tokens.shape)}")
    skip = 0 if keep_all else skip_first
    out, step = [], batch_size or 8
    for s in range(0, tokens.shape[0], step):
        toks = tokens[s:s + step]
        sides = []
        for side in SIDES:
            with pair.side(side) as m:
                got = harvest_many(m, hooks, toks, batch_size, skip, None)
            sides.append([got[h].reshape(toks.shape[0], toks.shape[1] - skip, -1) for h in hooks])
        acts = sides[0] + sides[1]  # each [b, pos - skip, d]
        if keep_all or max_norm_ratio is None:
            keep = torch.ones(acts[0].shape[:2], dtype=torch.bool)
        else:
            keep = torch.stack([token_keep_mask(a, 0, max_norm_ratio) for a in acts]).all(0)
        out.append(torch.cat(acts, dim=-1)[keep])
    return torch.cat(out)


def pair_partitions(pair: ModelPair, cfg: CrosscoderConfig, tokens: torch.Tensor, partitions: int,
                    dist: Dist | None = None, batch_size: int | None = None) -> dict[int, torch.Tensor]:
    """This rank's partitions of paired rows: partition ``p`` from the sequences ``split(n, partitions)[p]``. Refused
    up front when the rows would not fit in memory."""
    dist = dist or Dist.single()
    need = tokens.numel() * cfg.row_width * 4
    free = free_memory(pair.base.device)
    if need > 0.8 * free:
        raise InputError(f"the paired rows of {tokens.numel()} tokens take {need / 2**30:.1f} GiB ({cfg.row_width} floats "
                         f"a token: {len(cfg.hooks)} hook(s) in 2 models), more than the {free / 2**30:.1f} GiB free; "
                         "give fewer sequences")
    mine = split(partitions, dist.world)[dist.rank]
    seqs = split(tokens.shape[0], partitions)
    stage(f"harvesting paired activations at {len(cfg.hooks)} hook(s) of both models on {tokens.numel()} tokens "
          f"({need / 2**30:.2f} GiB of rows)")
    parts = {}
    for p in bar(list(mine), desc="paired harvest"):
        parts[p] = harvest_pair(pair, list(cfg.hooks), tokens[seqs[p].start:seqs[p].stop], batch_size)
    return parts


def train_crosscoder(pair: ModelPair, tokens: torch.Tensor, cfgs: "CrosscoderConfig | list[CrosscoderConfig]",
                     train: TrainConfig | None = None, out: "str | Path | list | None" = None, resume: bool = False,
                     progress: bool = True, stop_after: int | None = None,
                     dist: Dist | None = None) -> "TrainResult | list[TrainResult]":
    """Train crosscoder(s) on ``pair``'s paired activations of ``tokens [n, pos]``, harvested once (one forward pass
    of each model per batch). Several configs (a sweep of widths or k over the same hooks) train in lockstep on the
    same batches; ``out`` is then a folder per config. Resumable (``resume``), and data-parallel under torchrun."""
    train = train or TrainConfig()
    dist = dist or Dist.single()
    many = isinstance(cfgs, (list, tuple))
    cfgs = list(cfgs) if many else [cfgs]
    if not cfgs or any(c.hooks != cfgs[0].hooks for c in cfgs):
        raise InputError("the crosscoders of one harvest read the same hooks; train other hooks separately")
    if tokens.dim() != 2 or tokens.shape[0] == 0:
        raise InputError(f"tokens must be [n, pos] with n >= 1, got {tuple(tokens.shape)}")
    parts = train.partitions or default_partitions(tokens.shape[0], train.batch_size)
    if parts < dist.world:
        raise InputError(f"{parts} partitions for {dist.world} ranks: each rank needs one; give more sequences")
    source = PartitionedSource(pair_partitions(pair, cfgs[0], tokens, parts, dist), parts, train.batch_size,
                               train.seed, dist)
    if isinstance(out, (list, tuple)):
        outs = list(out)
    elif out is None:
        outs = [None] * len(cfgs)
    else:
        outs = [Path(out) / f"crosscoder_{i}" for i in range(len(cfgs))] if many else [out]
    if len(outs) != len(cfgs):
        raise InputError(f"{len(outs)} output folders for {len(cfgs)} crosscoders")
    results = fit_saes(source, cfgs, train, outs=outs, resume=resume, progress=progress, stop_after=stop_after,
                       dist=dist)
    return results if many else results[0]


# ---------------------------------------------------------------------------------------------- evaluation


@dataclass(repr=False)
class CrosscoderEval(Result):
    """A crosscoder's reconstruction of each model on held-out tokens: per source the fraction of variance unexplained
    (``||x - x̂||² / ||x - mean(x)||²``), the mean L0 (latents on per token) and the dead fraction (latents that never
    fired), and per model the next-token loss with the reconstruction spliced in at every hook."""

    sources: list[str]
    fvu: list[float]
    l0: float
    dead_fraction: float
    ce_clean: dict
    ce_spliced: dict
    n_tokens: int

    def summary(self) -> str:
        lines = [f"crosscoder on {self.n_tokens} held-out tokens: L0 {self.l0:.1f} latents/token, "
                 f"{self.dead_fraction:.1%} of latents never fired"]
        lines += [f"  {s}: fraction of variance unexplained {v:.3f}" for s, v in zip(self.sources, self.fvu)]
        for side in SIDES:
            if side in self.ce_clean:
                lines.append(f"  {side}: next-token loss {self.ce_clean[side]:.3f} nats clean, "
                             f"{self.ce_spliced[side]:.3f} with the reconstruction spliced in")
        if self.n_tokens < 2000:
            lines.append(f"  (only {self.n_tokens} tokens: figures rest on little data)")
        return "\n".join(lines)


@torch.no_grad()
def evaluate_crosscoder(pair: ModelPair, cc: Crosscoder, tokens: torch.Tensor, splice: bool = True) -> CrosscoderEval:
    """Reconstruction quality of ``cc`` on ``tokens [n, pos]`` (see :class:`CrosscoderEval`)."""
    cfg = cc.cfg
    rows = harvest_pair(pair, list(cfg.hooks), tokens)
    x = cc.split_rows(rows.to(cc.W_enc.device).float())
    f = cc.encode(x)
    xh = cc.decode(f)
    var = (x - x.mean(0)).pow(2).sum((0, 2))
    fvu = ((x - xh).pow(2).sum((0, 2)) / var.clamp_min(1e-12)).tolist()
    l0 = float((f > 0).float().sum(-1).mean())
    dead = float(((f > 0).sum(0) == 0).float().mean())
    names = [f"{side} {h}" for side, h in cfg.sources]
    clean, spliced = {}, {}
    if splice:
        losses = {side: [[], []] for side in SIDES}
        for s in range(0, tokens.shape[0], 8):
            toks = tokens[s:s + 8]
            recon = cc(cc.split_rows(harvest_pair(pair, list(cfg.hooks), toks, keep_all=True).to(cc.W_enc.device)))
            recon = recon.reshape(toks.shape[0], toks.shape[1], cfg.n_sources, -1)
            for side in SIDES:
                with pair.side(side) as m:
                    t = toks.to(m.device)
                    losses[side][0].append(lm_loss(m(t), t, per_token=True).cpu())
                    hooks = [(h, _splice(recon[:, :, cfg.sources.index((side, h))])) for h in cfg.hooks]
                    with m.hooks(hooks):
                        losses[side][1].append(lm_loss(m(t), t, per_token=True).cpu())
        clean = {side: float(torch.cat(v[0]).mean()) for side, v in losses.items()}
        spliced = {side: float(torch.cat(v[1]).mean()) for side, v in losses.items()}
    return CrosscoderEval(names, fvu, l0, dead, clean, spliced, int(rows.shape[0]))


def _splice(rec: torch.Tensor):
    """A hook replacing an activation ``[b, pos, d]`` by ``rec`` after the first position (the attention sink, which
    the crosscoder was not trained on)."""
    def fn(act, hook):
        out = act.clone()
        out[:, 1:] = rec[:, 1:].to(act.device, act.dtype)
        return out
    return fn


# ---------------------------------------------------------------------------------------------- latent classes


@dataclass(repr=False)
class LatentClasses(Result):
    """Each latent's relative decoder norm ``r_j = ||d_j^ft|| / (||d_j^base|| + ||d_j^ft||)`` (0: base only, 1:
    fine-tune only), the classes it falls in, and the base/fine-tune decoder cosine of the shared latents."""

    relative_norm: torch.Tensor  # [F]
    cosine: torch.Tensor  # [F]
    alive: torch.Tensor  # [F] bool: fired at least once on the tokens read (all, when none were read)
    n_tokens: int

    _skip_in_dict = ("relative_norm", "cosine", "alive")

    def _mask(self, name: str) -> torch.Tensor:
        r = self.relative_norm
        m = {"base_only": r < BASE_ONLY, "ft_only": r > FT_ONLY, "shared": (r >= SHARED[0]) & (r <= SHARED[1])}[name]
        return m & self.alive

    def latents(self, name: str) -> list[int]:
        """The live latents of a class (``"base_only"``, ``"ft_only"``, ``"shared"``), most extreme first."""
        idx = torch.nonzero(self._mask(name)).flatten()
        key = self.relative_norm[idx] if name == "ft_only" else -self.relative_norm[idx] if name == "base_only" \
            else -(self.relative_norm[idx] - 0.5).abs()
        return idx[key.argsort(descending=True)].tolist()

    def counts(self) -> dict:
        alive = int(self.alive.sum())
        c = {k: len(self.latents(k)) for k in ("base_only", "ft_only", "shared")}
        return {**c, "other": alive - sum(c.values()), "dead": int((~self.alive).sum())}

    def summary(self) -> str:
        c = self.counts()
        shared = self._mask("shared")
        cos = self.cosine[shared]
        lines = [f"latent classes by relative decoder norm r = |d_ft| / (|d_base| + |d_ft|) over {int(self.alive.sum())} "
                 f"live latents ({c['dead']} dead on {self.n_tokens} tokens): fine-tune-only (r > {FT_ONLY}) "
                 f"{c['ft_only']}, base-only (r < {BASE_ONLY}) {c['base_only']}, shared ({SHARED[0]} <= r <= "
                 f"{SHARED[1]}) {c['shared']}, in between {c['other']}"]
        if cos.numel():
            lines.append(f"  shared latents' decoder cosine (base vs fine-tune): median {float(cos.median()):.3f}, "
                         f"{float((cos < 0.5).float().mean()):.1%} below 0.5")
        return "\n".join(lines)

    def _dict_extra(self) -> dict:
        return {"counts": self.counts(), "ft_only": self.latents("ft_only"), "base_only": self.latents("base_only")}

    def _html_body(self) -> str:
        r = self.relative_norm[self.alive].tolist()
        return (viz.histogram_svg(r, bins=40, lo=0.0, hi=1.0, title="relative decoder norm |d_ft| / (|d_base| + |d_ft|)"
                                  " over live latents (0: base only, 1: fine-tune only)")
                if r else "")


@torch.no_grad()
def latent_classes(cc: Crosscoder, fires: "torch.Tensor | None" = None, n_tokens: int = 0) -> LatentClasses:
    """The classes of :class:`LatentClasses` for ``cc``; ``fires [F]`` (how often each latent fired on some tokens)
    marks the dead ones, which are left out of every class."""
    norms = cc.decoder_norms()  # [F, S]
    base, ft = cc.cfg.side_sources("base"), cc.cfg.side_sources("ft")
    nb, nf = norms[:, base].pow(2).sum(-1).sqrt(), norms[:, ft].pow(2).sum(-1).sqrt()
    rel = nf / (nb + nf).clamp_min(1e-12)
    db, df = cc.decoder_directions("base").flatten(1), cc.decoder_directions("ft").flatten(1)
    cos = torch.nn.functional.cosine_similarity(db, df, dim=-1)
    alive = torch.ones_like(rel, dtype=torch.bool) if fires is None else fires.cpu() > 0
    return LatentClasses(rel.cpu(), cos.cpu(), alive, n_tokens)


# ---------------------------------------------------------------------------------------------- Latent Scaling


@dataclass(repr=False)
class LatentScaling(Result):
    """Latent Scaling's ratios for a set of latents (module docstring): ``nu_error``, ``nu_recon``, the four ``beta``s
    and how many tokens each latent fired on. A latent is *flagged* as a likely artifact when either ratio exceeds
    ``threshold`` (the base model carries at least that share of what the fine-tune carries of its direction);
    ``baseline`` holds the same ratios for shared latents, the control that shows what ``ν`` is for a latent both
    models have."""

    latents: list[int]
    betas: dict  # name -> [k] floats: error_base, error_ft, recon_base, recon_ft
    nu_error: list[float]
    nu_recon: list[float]
    fired: list[int]
    threshold: float
    baseline: "LatentScaling | None" = None

    def flagged(self) -> list[int]:
        return [j for j, e, r in zip(self.latents, self.nu_error, self.nu_recon) if _above(e, self.threshold)
                or _above(r, self.threshold)]

    def kept(self) -> list[int]:
        bad = set(self.flagged())
        return [j for j, n in zip(self.latents, self.fired) if j not in bad and n > 0]

    def summary(self) -> str:
        n, fl = len(self.latents), self.flagged()
        lines = [f"Latent Scaling on {n} fine-tune-only latent(s): {len(fl)} flagged as likely artifacts "
                 f"(ν_ε or ν_r > {self.threshold}: the base model holds that share of the latent's direction), "
                 f"{len(self.kept())} kept"]
        if self.baseline is not None and self.baseline.latents:
            b = self.baseline
            lines.append(f"  control, {len(b.latents)} shared latents: median ν_ε {_median(b.nu_error):.2f}, median ν_r "
                         f"{_median(b.nu_recon):.2f} (a latent both models use sits near 1)")
        rows = list(zip(self.latents, self.nu_error, self.nu_recon, self.fired))
        for title, group in (("kept (likely genuinely fine-tune-only)", [r for r in rows if r[0] not in fl]),
                             ("flagged (the base model holds the direction)", [r for r in rows if r[0] in fl])):
            if group:
                lines.append(f"  {title}:")
                lines += [f"    latent {j}: ν_ε {e:.2f}, ν_r {r:.2f} ({k} tokens)" for j, e, r, k in group[:8]]
                if len(group) > 8:
                    lines.append(f"    ... and {len(group) - 8} more")
        few = [j for j, k in zip(self.latents, self.fired) if 0 < k < 20]
        if few:
            lines.append(f"  {len(few)} latent(s) fired on fewer than 20 tokens: their ratios rest on little data")
        return "\n".join(lines)

    def _dict_extra(self) -> dict:
        return {"flagged": self.flagged(), "kept": self.kept()}


def _above(v: float, t: float) -> bool:
    return v == v and v > t


def _median(v: list[float]) -> float:
    t = torch.tensor([x for x in v if x == x])
    return float(t.median()) if t.numel() else float("nan")


@torch.no_grad()
def latent_scaling(cc: Crosscoder, rows: torch.Tensor, latents: "list[int]", threshold: float = 0.5,
                   baseline: "list[int] | None" = None, batch: int = 4096) -> LatentScaling:
    """Latent Scaling (Minder et al. 2025) of ``latents`` on paired rows ``[m, S d]`` (:func:`harvest_pair`), in the
    crosscoder's scaled space, streamed in batches; ``baseline`` latents (shared ones) get the same ratios as the
    control. One hook per model is read (the first, when there are several)."""
    res = _scaling(cc, rows, list(latents), threshold, batch)
    if baseline:
        res.baseline = _scaling(cc, rows, list(baseline), threshold, batch)
    return res


def _scaling(cc: Crosscoder, rows: torch.Tensor, latents: list[int], threshold: float, batch: int) -> LatentScaling:
    if not latents:
        return LatentScaling([], {k: [] for k in ("error_base", "error_ft", "recon_base", "recon_ft")}, [], [], [],
                             threshold)
    dev = cc.W_enc.device
    idx = torch.tensor(latents, device=dev)
    b, f = cc.cfg.side_sources("base")[0], cc.cfg.side_sources("ft")[0]
    d_ft = cc.W_dec[idx, f].float()  # [k, d] scaled space
    d_base = cc.W_dec[idx, b].float()
    num = {k: torch.zeros(len(latents), dtype=torch.float64, device=dev)
           for k in ("error_base", "error_ft", "recon_base", "recon_ft")}
    f2 = torch.zeros(len(latents), dtype=torch.float64, device=dev)
    fired = torch.zeros(len(latents), dtype=torch.long, device=dev)
    for s in range(0, rows.shape[0], batch):
        x = cc.split_rows(rows[s:s + batch].to(dev).float())
        xs = x * cc.input_scale[:, None]
        a = cc.encode(x)  # [B, F]
        rec = a @ cc.W_dec.reshape(cc.cfg.d_sae, -1) + cc.b_dec.reshape(-1)
        rec = rec.reshape(x.shape[0], cc.cfg.n_sources, -1)
        fj = a[:, idx].double()  # [B, k]
        for name, src, own in (("base", b, d_base), ("ft", f, d_ft)):
            err = (xs[:, src] - rec[:, src]).double()  # [B, d]
            # Σ_x f_j <d_j, err + f_j d_j^M> and Σ_x f_j <d_j, x̂^M>
            num[f"error_{name}"] += fj.T.mul(1).matmul(err).mul(d_ft.double()).sum(-1) \
                + (fj.pow(2).sum(0) * (own.double() * d_ft.double()).sum(-1))
            num[f"recon_{name}"] += (fj.T @ rec[:, src].double()).mul(d_ft.double()).sum(-1)
        f2 += fj.pow(2).sum(0)
        fired += (fj > 0).sum(0)
    dn = d_ft.double().pow(2).sum(-1)
    betas = {k: (v / (dn * f2).clamp_min(1e-30)).where(f2 > 0, torch.tensor(float("nan"), device=dev, dtype=v.dtype))
             for k, v in num.items()}
    nu_e = (betas["error_base"] / betas["error_ft"]).tolist()
    nu_r = (betas["recon_base"] / betas["recon_ft"]).tolist()
    return LatentScaling(latents, {k: v.tolist() for k, v in betas.items()}, nu_e, nu_r, fired.tolist(), threshold)


class CrosscoderView:
    """A crosscoder seen as one SAE by the dashboards (:func:`mechscope.sae.features.feature_stats`,
    :func:`~mechscope.sae.features.write_dashboards`) and autointerp (:func:`mechscope.sae.autointerp.explain_features`):
    its latents on a text read both models (:meth:`token_latents`), and a latent's logit effect is its fine-tune
    decoder (at the first hook) through the fine-tune's unembedding."""

    def __init__(self, pair: ModelPair, cc: Crosscoder):
        from types import SimpleNamespace

        self.pair, self.cc = pair, cc
        c = cc.cfg
        self.cfg = SimpleNamespace(hook_name=c.hooks[0], hook_name_out=None, d_sae=c.d_sae, d_in=c.d_model,
                                   architecture=f"{c.architecture} crosscoder (base and fine-tune)",
                                   is_transcoder=False, model_name=pair.ft_name)
        self.explanations = dict(cc.explanations)

    @torch.no_grad()
    def token_latents(self, tokens: torch.Tensor, batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
        """``(fine-tune activations at the first hook [n pos, d], latents [n pos, F])`` for every token, in order."""
        rows = harvest_pair(self.pair, list(self.cc.cfg.hooks), tokens, batch_size, keep_all=True)
        x = self.cc.split_rows(rows.to(self.cc.W_enc.device))
        return x[:, self.cc.cfg.side_sources("ft")[0]].cpu(), self.cc.encode(x).cpu()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        raise InputError("a crosscoder's latents need both models' activations: read them with token_latents(tokens)")

    def write_directions(self, features: torch.Tensor) -> torch.Tensor:
        """``[m, d]``: each latent's fine-tune decoder at the first hook (raw space)."""
        return self.cc.decoder_directions("ft")[features.to(self.cc.W_dec.device), 0].cpu()

    def parameters(self) -> "Iterator[torch.nn.Parameter]":
        return self.cc.parameters()
