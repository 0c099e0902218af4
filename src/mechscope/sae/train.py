"""Harvest activations, train an SAE with monitoring, checkpoint and resume, and evaluate it.

Metrics (conventional definitions, after SAELens's bug history; see ``shared/NOTES.md``):

- explained variance ``= 1 - ||x - x_hat||^2 / ||x - mean_batch(x)||^2`` (mean over the batch, not 0);
  evaluation also reports it over typical tokens only (norm <= 5x the median), because a few
  massive-activation tokens (attention sinks, separators) can dominate both sums;
- MSE ``= mean over examples of ||x - x_hat||^2`` (divided once);
- L0 = active latents per example; dead = no activation in the last ``dead_window`` tokens;
  dense = firing on more than 10% of tokens;
- CE loss recovered ``= (CE_zero - CE_sae) / (CE_zero - CE_clean)`` on held-out text, reported
  with the raw ``CE_sae - CE_clean`` because the ratio flatters residual-stream SAEs.

Checkpoints hold the SAE, the optimiser, the data-order generator and the monitoring state, so a
resumed run ends with the same weights as an uninterrupted one. They are written to a temporary
file and renamed; a non-finite loss stops training with an error and leaves the last good
checkpoint in place.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..hooks import split_name
from ..viz import atomic_write
from .model import SAE, SAEConfig


class SAETrainingError(RuntimeError):
    pass


@torch.no_grad()
def harvest(model, hook_name: str, tokens: torch.Tensor, batch_size: int = 8, skip_first: int = 1,
            max_norm_ratio: float | None = 10.0) -> torch.Tensor:
    """Activations at ``hook_name`` for ``tokens [n, pos]`` as ``[m, width]`` rows (fp32, CPU), ``m <= n * (pos - skip_first)``.

    The forward pass stops after the hooked block. The first ``skip_first`` positions are dropped:
    the first token of a sequence (BOS or not) is an attention sink whose residual norm is tens of
    times larger than the rest, which would dominate the reconstruction loss and the variance.
    Rows whose norm exceeds ``max_norm_ratio`` x the batch median are dropped too: such "massive
    activations" (Sun et al. 2024) also appear a token or two into a sequence when the first token
    is a weak sink (measured on SmolLM2 layer 15: 0.05% of tokens, up to 160x the median norm,
    together 13x the squared norm of all other tokens). ``None`` keeps every row.
    """
    model.manager.check(hook_name)
    layer, _ = split_name(hook_name)
    stop = None if layer is None or hook_name.startswith("ln_final") else layer + 1
    if stop is not None and stop > model.cfg.n_layers:
        stop = None
    skip = skip_first
    out = []
    for s in range(0, tokens.shape[0], batch_size):
        got = {}

        def grab(act, hook):
            got["a"] = act.detach()

        with model.hooks([(hook_name, grab)]):
            model(tokens[s:s + batch_size].to(model.device), stop_at_layer=stop)
        a = got["a"][:, skip:]
        a = a.reshape(-1, a.shape[-1]) if a.dim() == 3 else a.reshape(a.shape[0] * a.shape[1], -1)
        if max_norm_ratio is not None and a.shape[0]:
            n = a.float().norm(dim=-1)
            a = a[n <= max_norm_ratio * n.median()]
        out.append(a)
    return torch.cat(out).float().cpu()


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 1024
    lr: float = 3e-4
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 200
    dead_window: int = 100_000  # tokens
    dense_threshold: float = 0.1
    b_dec_init: str = "geometric_median"
    resample_every: int = 0  # ReLU SAEs: resample dead latents every this many steps (0: never)
    sparse: bool | None = None  # TopK/BatchTopK sparse kernels; None: on for float32/float64 on CPU
    wandb_project: str | None = None  # log to Weights & Biases when given (needs `pip install wandb`)


@torch.no_grad()
def resample_dead(sae: SAE, x: torch.Tensor, dead: torch.Tensor, opt, seed: int = 0) -> int:
    """Re-initialise dead latents toward badly reconstructed inputs (after Bricken et al. 2023).

    Inputs are drawn with probability proportional to their squared error; each dead latent's decoder
    row becomes the normalised error direction, its encoder column that direction scaled to 0.2 x the
    mean live encoder norm, its bias 0, and its Adam moments are reset. Returns how many were resampled.
    """
    idx = torch.nonzero(dead).flatten()
    if len(idx) == 0:
        return 0
    xs = sae.scale_in(x)
    err = xs - (sae.activate(sae.pre_acts(x)) @ sae.W_dec + sae.b_dec)
    w = err.pow(2).sum(-1)
    if float(w.sum()) <= 0:
        return 0
    g = torch.Generator().manual_seed(seed)
    pick = torch.multinomial(w, len(idx), replacement=True, generator=g)
    dirs = err[pick] / err[pick].norm(dim=-1, keepdim=True).clamp(min=1e-8)
    live = ~dead
    scale = 0.2 * (sae.W_enc[:, live].norm(dim=0).mean() if bool(live.any()) else 1.0)
    sae.W_dec[idx] = dirs
    sae.W_enc[:, idx] = dirs.T * scale
    sae.b_enc[idx] = 0.0
    for p, sl in ((sae.W_dec, (idx,)), (sae.W_enc, (slice(None), idx)), (sae.b_enc, (idx,))):
        st = opt.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in st:
                st[key][sl] = 0.0
    return len(idx)


def train_sae_sweep(acts: torch.Tensor, cfgs: list[SAEConfig], train: TrainConfig | None = None,
                    out: str | Path | None = None, progress: bool = True) -> list[SAE]:
    """Train several SAE configs on one harvest, each seeing the same batches in the same order."""
    return [train_sae(acts, c, train, None if out is None else Path(out) / f"sae_{i}", progress=progress)
            for i, c in enumerate(cfgs)]


def _ev(x, x_hat):
    return 1 - (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()


def _checkpoint_path(out: Path) -> Path:
    return out / "checkpoint.pt"


def _save_checkpoint(out: Path, sae, opt, gen, step, last_fired, fired_count, seen):
    import io

    buf = io.BytesIO()
    torch.save({"sae": sae.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(), "step": step,
                "last_fired": last_fired, "fired_count": fired_count, "seen": seen}, buf)
    atomic_write(_checkpoint_path(out), buf.getvalue())


def train_sae(acts: torch.Tensor, cfg: SAEConfig, train: TrainConfig | None = None, out: str | Path | None = None,
              resume: bool = False, progress: bool = True, stop_after: int | None = None) -> SAE:
    """Train an SAE on activations ``[n, d_in]`` sampled with replacement, ``train.steps`` batches.

    With ``out``: JSON-lines monitoring in ``out/log.jsonl`` every ``log_every`` steps and a
    checkpoint every ``checkpoint_every`` steps; ``resume=True`` continues from the checkpoint.
    ``stop_after`` ends this call after that many steps (as an interruption would).
    """
    train = train or TrainConfig()
    if acts.dim() != 2 or acts.shape[1] != cfg.d_in:
        raise ValueError(f"activations must be [n, d_in={cfg.d_in}], got {tuple(acts.shape)}")
    out = Path(out) if out is not None else None
    sae = SAE(cfg, seed=train.seed)
    fused = sae.W_enc.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16)
    opt = torch.optim.Adam(sae.parameters(), lr=train.lr, betas=(0.9, 0.999), fused=fused)
    gen = torch.Generator().manual_seed(train.seed)
    last_fired = torch.zeros(cfg.d_sae, dtype=torch.long)  # token count at the last firing
    fired_count = torch.zeros(cfg.d_sae, dtype=torch.long)
    seen, start = 0, 0
    if resume and out is not None and _checkpoint_path(out).exists():
        ck = torch.load(_checkpoint_path(out), weights_only=True)
        sae.load_state_dict(ck["sae"])
        opt.load_state_dict(ck["opt"])
        gen.set_state(ck["gen"])
        start, last_fired, fired_count, seen = ck["step"], ck["last_fired"], ck["fired_count"], ck["seen"]
        log = out / "log.jsonl"
        if log.exists():  # drop records of steps that will be run again
            kept = [ln for ln in log.read_text().splitlines() if ln and json.loads(ln)["step"] <= start]
            atomic_write(log, "".join(ln + "\n" for ln in kept))
    else:
        sample = acts[torch.randperm(acts.shape[0], generator=torch.Generator().manual_seed(train.seed))[:4096]]
        sae.fit_input_scale(sample)
        sae.init_b_dec(sample, train.b_dec_init)
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            (out / "log.jsonl").unlink(missing_ok=True)
    it = range(start, train.steps)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=f"SAE {cfg.architecture}", initial=start, total=train.steps)
    run = None
    if train.wandb_project:
        try:
            import wandb
        except ImportError as e:
            raise ImportError("wandb_project was given but wandb is not installed: pip install wandb") from e
        run = wandb.init(project=train.wandb_project, config={**cfg.to_dict(), **train.__dict__})
    sparse = train.sparse if train.sparse is not None else (
        sae.W_enc.dtype in (torch.float32, torch.float64) and acts.device.type == "cpu")  # measured on CPU only
    done = 0
    for step in it:
        idx = torch.randint(0, acts.shape[0], (train.batch_size,), generator=gen)
        x = acts[idx]
        dead = (seen - last_fired) >= train.dead_window if seen >= train.dead_window else None
        terms = sae.training_loss(x, step, dead, sparse=sparse)
        loss = terms["loss"]
        if not torch.isfinite(loss):
            raise SAETrainingError(f"non-finite loss ({float(loss.detach())}) at step {step}; the last good checkpoint "
                                   f"is kept{' in ' + str(out) if out else ''}. Lower the learning rate or "
                                   f"check the activations for NaN/Inf.")
        opt.zero_grad()
        loss.backward()
        sae.remove_parallel_grad()
        opt.step()
        sae.set_decoder_norm_to_unit()
        if cfg.architecture == "relu" and train.resample_every and (step + 1) % train.resample_every == 0 \
                and dead is not None:
            resample_dead(sae, x, dead, opt, seed=train.seed + step)
            last_fired[dead] = seen  # give resampled latents a fresh window
        fires = terms["fires"]
        seen += x.shape[0]
        last_fired[fires > 0] = seen
        fired_count += fires
        if out is not None and (step + 1) % train.log_every == 0:
            with torch.no_grad():
                xs = sae.scale_in(x)
                recon = terms["recon"]
                density = fired_count.float() / max(seen, 1)
                hist = torch.histc(torch.log10(density.clamp(min=1e-10)), bins=20, min=-10, max=0)
                rec = {"step": step + 1, "tokens": seen, "loss": float(loss), "mse": float(terms["mse"]),
                       "explained_variance": float(_ev(xs, recon)), "l0": float(terms["l0"]),
                       "l1": float(terms.get("l1", float("nan"))), "aux": float(terms.get("aux", 0.0)),
                       "dead": int(((seen - last_fired) >= train.dead_window).sum()) if seen >= train.dead_window else 0,
                       "dense": int((density > train.dense_threshold).sum()),
                       "log10_density_hist": hist.tolist()}
            with open(out / "log.jsonl", "a") as fh:
                fh.write(json.dumps(rec) + "\n")
            if run is not None:
                run.log({k: v for k, v in rec.items() if k != "log10_density_hist"}, step=step + 1)
        if out is not None and (step + 1) % train.checkpoint_every == 0:
            _save_checkpoint(out, sae, opt, gen, step + 1, last_fired, fired_count, seen)
        done += 1
        if stop_after is not None and done >= stop_after:
            break
    if run is not None:
        run.finish()
    sae.extra_state = {"seen": seen, "log10_density": torch.log10((fired_count.float() / max(seen, 1)).clamp(min=1e-10))}
    return sae


@dataclass
class SAEEval:
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
                f"MSE {self.mse:.4g}, dead {self.dead_fraction:.1%}\nCE loss: clean {self.ce_clean:.4f}, with SAE {self.ce_sae:.4f} "
                f"(+{self.ce_sae - self.ce_clean:.4f}), zero-ablated {self.ce_zero:.4f}; recovered "
                f"{self.ce_recovered:.3f}")

    __str__ = __repr__ = summary


@torch.no_grad()
def splice_hook(sae: SAE, use_error_term: bool = False, skip_first: int = 1):
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
def evaluate_sae(model, sae: SAE, tokens: torch.Tensor, batch_size: int = 8) -> SAEEval:
    """L0, MSE, explained variance and CE loss recovered (against zero-ablation) on held-out ``tokens``.

    All positions but the first (the attention sink, see :func:`harvest`) are measured, spliced and
    zero-ablated, massive-norm rows included; ``explained_variance_typical`` leaves out the rows
    whose norm exceeds 5x the median.
    """
    from ..model import lm_loss

    hook = sae.cfg.hook_name
    acts = harvest(model, hook, tokens, batch_size, max_norm_ratio=None)
    f = sae.encode(acts)
    recon = sae.decode(f)
    ev = float(_ev(acts, recon))
    norms = acts.norm(dim=-1)
    typical = norms <= 5 * norms.median()  # massive-activation tokens (sinks, separators) dominate variance
    ev_typ = float(_ev(acts[typical], recon[typical]))
    mse = float((acts - recon).pow(2).sum(-1).mean())
    l0 = float((f > 0).sum(-1).float().mean())
    dead = float(((f > 0).sum(0) == 0).float().mean())
    ce = {"clean": [], "sae": [], "zero": []}
    for s in range(0, tokens.shape[0], batch_size):
        t = tokens[s:s + batch_size].to(model.device)
        ce["clean"].append(lm_loss(model(t), t))
        ce["sae"].append(lm_loss(model.run_with_hooks(t, fwd_hooks=[(hook, splice_hook(sae))]), t))
        ce["zero"].append(lm_loss(model.run_with_hooks(t, fwd_hooks=[(hook, _zero_after_first)]), t))
    m = {k: float(torch.stack(v).mean()) for k, v in ce.items()}
    return SAEEval(l0, mse, ev, dead, m["clean"], m["sae"], m["zero"], ev_typ, int((~typical).sum()))
