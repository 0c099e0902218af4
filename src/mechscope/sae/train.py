"""Train a dictionary on activations, with monitoring, checkpoints and exact resume. The LM is never seen here.

A dictionary is an SAE, a transcoder (:class:`~mechscope.sae.model.SAE`), a cross-layer transcoder
(:class:`~mechscope.sae.clt.CrossLayerTranscoder`) or a crosscoder (:class:`~mechscope.sae.crosscoder.Crosscoder`): one
trainer serves them all, through the methods they share
(``step_loss``, ``init_from_sample``, ``scaled_target``, ``set_decoder_norm_to_unit``, ``remove_parallel_grad``).
The trainer reads an :class:`~mechscope.sae.data.ActivationSource` (or an in-memory tensor of
activations, sampled with replacement) and returns a :class:`TrainResult`: the SAE plus its
monitoring history and feature densities. Harvesting lives in :mod:`.data`, evaluation in
:mod:`.evaluate`.

Monitoring (every ``log_every`` steps, in ``out/log.jsonl``): loss, MSE, explained variance
``1 - ||x - x_hat||^2 / ||x - mean_batch(x)||^2`` (:func:`mechscope.analysis.metrics.explained_variance`),
L0, dead latents (no activation in the last ``dead_window`` tokens), dense latents (firing on
more than ``dense_threshold`` of tokens) and a log10-density histogram.

Checkpoints hold the SAE, the optimiser, the source's sampling state and the monitoring state,
so a resumed run ends with the same weights as an uninterrupted one. They are written to a
temporary file and renamed; a non-finite loss stops training with an error and leaves the last
good checkpoint in place.
"""

from __future__ import annotations

import dataclasses
import io
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..analysis.metrics import explained_variance
from ..core.errors import InputError, MechscopeError
from ..core.files import atomic_write, clear_leftovers, read_torch
from ..core.progress import bar
from ..core.result import Result
from ..distributed import Dist
from .clt import CLTConfig, CrossLayerTranscoder
from .crosscoder import Crosscoder, CrosscoderConfig
from .data import ActivationSource, PartitionedSource, default_partitions
from .model import SAE, LossTerms, SAEConfig


class SAETrainingError(MechscopeError, RuntimeError):
    """Training cannot go on (a non-finite loss); the last good checkpoint is kept."""


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
    partitions: int = 0  # split in-memory activations into this many partitions (0: data.default_partitions)
    wandb_project: str | None = None  # log to Weights & Biases when given (needs `pip install wandb`)


@torch.no_grad()
def resample_dead(sae: SAE, x: torch.Tensor, dead: torch.Tensor, opt: torch.optim.Optimizer, seed: int = 0) -> int:
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


@dataclass(repr=False)
class TrainResult(Result):
    """A trained SAE, its monitoring history (one record per ``log_every`` steps), and feature densities."""

    sae: SAE
    history: list[dict]
    steps: int
    tokens_seen: int
    log10_density: torch.Tensor  # [d_sae] over the whole run

    _skip_in_dict = ("sae", "log10_density")

    def summary(self) -> str:
        c = self.sae.cfg
        what = _what(c)
        head = f"{what}, {self.steps} steps on {self.tokens_seen} tokens"
        if not self.history:
            return head
        last = self.history[-1]
        return (f"{head}\n  last log (step {last['step']}): loss {last['loss']:.4g}, explained variance "
                f"{last['explained_variance']:.3f}, L0 {last['l0']:.1f}, dead {last['dead']}, dense {last['dense']}")

    def _dict_extra(self) -> dict:
        return {"config": self.sae.cfg.to_dict(), "dead_fraction": float((self.log10_density <= -10).float().mean())}


def _what(c: "SAEConfig | CLTConfig | CrosscoderConfig") -> str:
    """A dictionary config in a few words (a result's summary)."""
    if isinstance(c, CLTConfig):
        return f"{c.kind.upper()} ({c.architecture}), {c.n_layers} layers x {c.d_sae} features"
    if isinstance(c, CrosscoderConfig):
        return f"{c.architecture} crosscoder, {c.n_sources} sources x {c.d_model} -> {c.d_sae} latents"
    return f"{c.architecture} SAE, {c.d_in} -> {c.d_sae} latents"


@dataclass
class TrainerState:
    """Where one SAE's training stands: steps and rows seen, and per latent the row count at its last firing and
    how often it fired (what a checkpoint holds besides the SAE and the optimiser)."""

    step: int = 0
    seen: int = 0
    last_fired: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    fired_count: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))

    def dead(self, window: int) -> torch.Tensor | None:
        """Latents that have not fired in the last ``window`` tokens (None until ``window`` tokens are seen)."""
        return (self.seen - self.last_fired) >= window if self.seen >= window else None


def split_pairs(sae: SAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A training row's input and target (:meth:`SAE.split_rows`)."""
    return sae.split_rows(x)


#: each dictionary config and the dictionary it describes
DICTIONARIES = {SAEConfig: SAE, CLTConfig: CrossLayerTranscoder, CrosscoderConfig: Crosscoder}


def build_dictionary(cfg: "SAEConfig | CLTConfig | CrosscoderConfig", seed: int = 0) -> "SAE | CrossLayerTranscoder | Crosscoder":
    """The dictionary a config describes, initialised with ``seed``: an :class:`SAE` (or transcoder), a
    :class:`~mechscope.sae.clt.CrossLayerTranscoder` or a :class:`~mechscope.sae.crosscoder.Crosscoder`. Everything the
    trainer does goes through the methods they share (``step_loss``, ``init_from_sample``, ``scaled_target``, the
    decoder-norm constraint)."""
    kind = DICTIONARIES.get(type(cfg))
    if kind is None:
        raise InputError(f"the trainer takes one of {', '.join(c.__name__ for c in DICTIONARIES)}, got "
                         f"{type(cfg).__name__}")
    return kind(cfg, seed=seed)


@dataclass
class _BatchGroup:
    """What BatchTopK needs to select over a batch spread across ranks (see ``SAE.batch_group``)."""

    dist: Dist
    global_rows: int

    @property
    def active(self) -> bool:
        return self.dist.active

    def kth_largest(self, values: torch.Tensor, k: int) -> torch.Tensor:
        return self.dist.kth_largest(values, k)


def _checkpoint_path(out: Path) -> Path:
    return out / "checkpoint.pt"


#: where dictionaries trained in lockstep keep their one checkpoint (in the first one's parent folder)
LOCKSTEP_CHECKPOINT = "lockstep_checkpoint.pt"


def _lockstep_path(outs: "list[Path | None]") -> Path | None:
    """One run's checkpoint file: ``out/checkpoint.pt`` for one dictionary, ``<parent>/lockstep_checkpoint.pt`` for
    several (one file, written atomically, so the dictionaries can never be saved at different steps)."""
    if not outs or outs[0] is None:
        return None
    return _checkpoint_path(outs[0]) if len(outs) == 1 else outs[0].parent / LOCKSTEP_CHECKPOINT


# Settings a resumed run may change: how long it runs, how often it logs and checkpoints, and where it logs.
RESUMABLE_CHANGES = ("steps", "log_every", "checkpoint_every", "wandb_project")


def _settings(sae: SAE, train: TrainConfig) -> dict:
    """What a checkpoint records of the run's settings, compared on resume."""
    return {"sae": json.loads(json.dumps(sae.cfg.to_dict(), default=str)),
            "train": json.loads(json.dumps(dataclasses.asdict(train), default=str))}


def _save_checkpoint(path: Path, trainers: "list[SAETrainer]", source, dist: Dist) -> None:
    """Every rank takes part (the source's state is gathered); rank 0 alone writes, atomically. One dictionary's
    checkpoint is its trainer's dict plus the source's state; several share one file (``"trainers"``)."""
    src = source.state_dict()
    if not dist.is_main:
        return
    buf = io.BytesIO()
    body = trainers[0].checkpoint() if len(trainers) == 1 else \
        {"trainers": [t.checkpoint() for t in trainers], "step": trainers[0].state.step}
    torch.save({**body, "source": src, "world": dist.world}, buf)
    atomic_write(path, buf.getvalue())


def _check_settings(path: Path, saved: dict, now: dict) -> None:
    """A resumed run must keep the settings its checkpoint was trained with (``steps`` and logging may change)."""
    diffs = [f"{part}.{k}: checkpoint {saved[part].get(k)!r}, now {v!r}" for part in ("sae", "train")
             for k, v in now[part].items()
             if not (part == "train" and k in RESUMABLE_CHANGES) and saved.get(part, {}).get(k) != v]
    if diffs:
        raise InputError(f"--resume from {path} with settings that differ from the checkpoint's: " + "; ".join(diffs)
                         + f". Resume with the original settings (only {', '.join(RESUMABLE_CHANGES)} may change), "
                         "or train into a new folder.")


def _read_log(log: Path, upto: int) -> list[str]:
    """The lines of ``log.jsonl`` up to step ``upto``; a torn last line (a kill mid-write) is dropped with a warning."""
    lines = [ln for ln in log.read_text().splitlines() if ln.strip()]
    kept = []
    for i, ln in enumerate(lines):
        try:
            rec = json.loads(ln)
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                warnings.warn(f"{log}: dropped a torn last line (the run was stopped while writing it)", stacklevel=3)
                break
            raise InputError(f"{log} line {i + 1} is not JSON ({e}); the log is damaged. Delete the line or "
                             "train into a new folder") from e
        if rec.get("step", upto + 1) <= upto:
            kept.append(ln)
    return kept


def _resume(trainers: "list[SAETrainer]", source, path: Path, outs: "list[Path]", dist: Dist) -> None:
    """Continue ``trainers`` and ``source`` from the checkpoint at ``path``, after checking it matches this run (rank 0
    reads, all receive)."""
    if dist.is_main:  # a run killed while writing leaves temporary files beside the checkpoint and logs
        clear_leftovers(path)
        for out in outs:
            clear_leftovers(out / "log.jsonl")
    ck = dist.broadcast(read_torch(path, "the SAE training checkpoint") if dist.is_main else None)
    if len(trainers) == 1:
        cks = [ck]
    elif isinstance(ck, dict) and isinstance(ck.get("trainers"), list) and len(ck["trainers"]) == len(trainers):
        cks = ck["trainers"]
    else:
        n = len(ck["trainers"]) if isinstance(ck, dict) and isinstance(ck.get("trainers"), list) else "no"
        raise InputError(f"{path} holds {n} dictionaries' states, this run trains {len(trainers)} in lockstep; resume "
                         "with the original configs or train into a new folder")
    for one in cks:
        if not isinstance(one, dict) or not {"sae", "opt", "step"} <= set(one) or "source" not in ck:
            has = sorted(one) if isinstance(one, dict) else type(one).__name__
            raise InputError(f"{path} is not a mechscope SAE training checkpoint (it has {has})")
    for trainer, one in zip(trainers, cks):
        if "settings" in one:
            _check_settings(path, json.loads(one["settings"]), _settings(trainer.sae, trainer.train))
        trainer.load_checkpoint(one, str(path))
    source.load_state_dict(ck["source"])
    for trainer, out in zip(trainers, outs):
        log = out / "log.jsonl"
        if dist.is_main and log.exists():  # drop records of steps that will be run again
            atomic_write(log, "".join(ln + "\n" for ln in _read_log(log, trainer.state.step)))


def _start(trainers: "list[SAETrainer]", source, outs: "list[Path | None]", resume: bool, dist: Dist) -> None:
    """A fresh run (input scale and ``b_dec`` fitted on a sample) or the state of the last checkpoint."""
    path = _lockstep_path(outs)
    has_ck = dist.broadcast(bool(resume and path is not None and path.exists()))
    if has_ck:
        return _resume(trainers, source, path, outs, dist)
    sample = source.sample(4096)
    for trainer, out in zip(trainers, outs):
        trainer.init(sample)
        if out is not None and dist.is_main:
            out.mkdir(parents=True, exist_ok=True)
            (out / "log.jsonl").unlink(missing_ok=True)


def _global_terms(sae: SAE, x: torch.Tensor, terms: LossTerms, weight: float, dist: Dist) -> dict:
    """The logged batch statistics over the whole (distributed) batch: weighted means, and the explained
    variance from summed squared errors and moments (``1 - SSE / (sum ||x||^2 - n ||mean||^2)``)."""
    xs = sae.scaled_target(x).double()
    err = (xs - terms.recon.double()).pow(2).sum()
    vals = torch.tensor([weight * float(terms.loss), weight * float(terms.mse), weight * float(terms.l0),
                         weight * (float(terms.l1) if terms.l1 is not None else float("nan")),
                         weight * (float(terms.aux) if terms.aux is not None else 0.0),
                         float(err), float(xs.pow(2).sum()), float(x.shape[0])], dtype=torch.float64)
    mean_sum = xs.sum(0)
    dist.sum_many_([vals, mean_sum])
    loss, mse, l0, l1, aux, sse, sq, n = vals.tolist()
    var = sq - float(mean_sum.pow(2).sum()) / n
    return {"loss": loss, "mse": mse, "l0": l0, "l1": l1, "aux": aux,
            "explained_variance": 1.0 - sse / var if var > 0 else float("nan")}


def _log_record(sae: SAE, x: torch.Tensor, terms: LossTerms, st: TrainerState, train: TrainConfig,
                dist: Dist | None = None, weight: float = 1.0) -> dict:
    """One monitoring record (a JSON line); under torchrun its batch statistics cover every rank's rows."""
    with torch.no_grad():
        density = st.fired_count.float() / max(st.seen, 1)
        hist = torch.histc(torch.log10(density.clamp(min=1e-10)), bins=20, min=-10, max=0)
        dead = st.dead(train.dead_window)
        if dist is not None and dist.active:
            g = _global_terms(sae, x, terms, weight, dist)
        else:
            g = {"loss": float(terms.loss), "mse": float(terms.mse),
                 "explained_variance": float(explained_variance(sae.scaled_target(x), terms.recon)),
                 "l0": float(terms.l0), "l1": float(terms.l1) if terms.l1 is not None else float("nan"),
                 "aux": float(terms.aux) if terms.aux is not None else 0.0}
        return {"step": st.step, "tokens": st.seen, **g,
                "dead": int(dead.sum()) if dead is not None else 0,
                "dense": int((density > train.dense_threshold).sum()), "log10_density_hist": hist.tolist()}


def _step(sae: SAE, opt, x: torch.Tensor, st: TrainerState, train: TrainConfig, sparse: bool, out,
          dist: Dist | None = None, global_rows: int | None = None) -> LossTerms:
    """One optimiser step on batch ``x``, with the decoder-norm constraint, resampling and bookkeeping.

    Under torchrun ``x`` is this rank's part of the ``global_rows`` batch; weighted by its share of the rows,
    the gradients summed over ranks are the gradient of the global batch's mean loss, and the
    firing counts are summed, so dead-latent masks (AuxK) agree on every rank and with one process.
    """
    dist = dist or Dist.single()
    global_rows = global_rows or x.shape[0]
    weight = x.shape[0] / global_rows
    dead = st.dead(train.dead_window)  # the bookkeeping stays on the CPU; the SAE may be on a GPU
    dead = dead.to(x.device) if dead is not None else None
    terms = sae.step_loss(x, st.step, dead, sparse=sparse)
    finite = float(torch.isfinite(terms.loss.detach()))
    if not dist.active:
        _check_finite(terms, finite, 1, st, out, dist)
    opt.zero_grad()
    (terms.loss * weight if dist.active else terms.loss).backward()
    if dist.active:
        dist.sum_each_([p.grad for p in sae.parameters() if p.grad is not None])
        # one small collective: how many ranks have a finite loss, and the firing counts (exact in float64)
        flags = torch.cat([torch.tensor([finite], dtype=torch.float64), terms.fires.cpu().to(torch.float64)])
        dist.sum_(flags)
        _check_finite(terms, float(flags[0]), dist.world, st, out, dist)  # every rank stops at the same step
        terms.fires = flags[1:].round().long()
    sae.remove_parallel_grad()
    opt.step()
    sae.set_decoder_norm_to_unit()
    if isinstance(sae, SAE) and sae.cfg.architecture == "relu" and train.resample_every \
            and (st.step + 1) % train.resample_every == 0 and dead is not None:
        resample_dead(sae, x, dead, opt, seed=train.seed + st.step)
        st.last_fired[dead.cpu()] = st.seen  # give resampled latents a fresh window
    st.seen += global_rows
    st.step += 1
    fires = terms.fires.cpu()
    st.last_fired[fires > 0] = st.seen
    st.fired_count += fires
    return terms


class SAETrainer:
    """The optimisation of one SAE, a batch at a time; it never sees the language model (as in dictionary_learning,
    data, training and evaluation are separate). :func:`fit_sae` and :func:`~mechscope.sae.many.train_many` both
    drive it::

        trainer = SAETrainer(cfg, TrainConfig(lr=3e-4))
        trainer.init(sample)            # input scale and b_dec from a sample of rows [n, d_in (+ d_out)]
        for x in batches:
            terms = trainer.step(x)     # one Adam step on a batch of rows: LossTerms
        ck = trainer.checkpoint()       # the SAE, the optimiser and trainer.state, for torch.save
        result = trainer.result()       # a TrainResult

    ``cfg``: an :class:`SAEConfig` or a :class:`~mechscope.sae.clt.CLTConfig` (:func:`build_dictionary`).
    ``dist``: data parallelism (each rank steps on its share of a ``global_rows`` batch; see :func:`fit_sae`).
    ``sparse``: the sparse TopK kernels (default: ``train.sparse``, else in float32/64). Adam runs its fused
    kernel for floating-point SAEs.
    """

    def __init__(self, cfg: "SAEConfig | CLTConfig", train: TrainConfig | None = None, dist: Dist | None = None,
                 sparse: bool | None = None, out: Path | None = None):
        self.train = train or TrainConfig()
        self.dist = dist or Dist.single()
        self.sae = build_dictionary(cfg, self.train.seed).to(self.dist.device)  # a GPU rank trains on its GPU
        self.sae.batch_group = _BatchGroup(self.dist, self.train.batch_size) if self.dist.active else None
        dtype = next(self.sae.parameters()).dtype
        fused = dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16)
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=self.train.lr, betas=(0.9, 0.999), fused=fused)
        if sparse is None:
            sparse = self.train.sparse if self.train.sparse is not None else dtype in (torch.float32, torch.float64)
        self.sparse = sparse
        self.out = out  # named in the error raised on a non-finite loss
        d = cfg.n_latents
        self.state = TrainerState(last_fired=torch.zeros(d, dtype=torch.long), fired_count=torch.zeros(d, dtype=torch.long))

    def init(self, rows: torch.Tensor) -> None:
        """Fit the input (and a transcoder's output) scale, then ``b_dec``, on ``rows [n, d_in (+ d_out)]``."""
        self.sae.init_from_sample(rows.to(self.dist.device), self.train.b_dec_init)

    def step(self, x: torch.Tensor, global_rows: int | None = None) -> LossTerms:
        """One optimiser step on ``x [rows, d_in (+ d_out)]`` (under torchrun, this rank's part of ``global_rows``)."""
        x = x.to(self.dist.device, non_blocking=True)
        return _step(self.sae, self.opt, x, self.state, self.train, self.sparse, self.out, self.dist, global_rows)

    def checkpoint(self) -> dict:
        """What resumes this trainer: the SAE's and the optimiser's state dicts and :attr:`state`."""
        st = self.state
        return {"sae": self.sae.state_dict(), "opt": self.opt.state_dict(), "step": st.step, "seen": st.seen,
                "last_fired": st.last_fired, "fired_count": st.fired_count,
                "settings": json.dumps(_settings(self.sae, self.train))}

    def load_checkpoint(self, ck: dict, where: str = "the checkpoint") -> None:
        """Continue from :meth:`checkpoint`'s dict (a clear error when it holds another SAE)."""
        d_saved = ck["sae"]["W_dec"].shape[0] if "W_dec" in ck["sae"] else None
        if isinstance(self.sae, SAE) and d_saved != self.sae.cfg.d_sae:
            raise InputError(f"{where} holds an SAE with d_sae={d_saved}, this run asks for d_sae={self.sae.cfg.d_sae}; "
                             "resume with the original width or train into a new folder")
        try:
            self.sae.load_state_dict(ck["sae"])
            self.opt.load_state_dict(ck["opt"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise InputError(f"{where} does not fit this SAE ({e}); resume with the original settings") from e
        self.state = TrainerState(ck["step"], ck["seen"], ck["last_fired"], ck["fired_count"])

    def result(self, history: list[dict] | None = None) -> TrainResult:
        """The trained SAE, ``history`` and the log10 firing density of every latent over the run."""
        st = self.state
        self.sae.batch_group = None
        density = torch.log10((st.fired_count.float() / max(st.seen, 1)).clamp(min=1e-10))
        return TrainResult(self.sae, history or [], st.step, st.seen, density)


def _check_finite(terms: LossTerms, finite: float, world: int, st: TrainerState, out, dist: Dist) -> None:
    if finite < world:
        where = f" on {world - round(finite)} of {world} ranks" if dist.active else \
            f" ({float(terms.loss.detach())})"
        raise SAETrainingError(f"non-finite loss{where} at step {st.step}; the last good "
                               f"checkpoint is kept{' in ' + str(out) if out else ''}. Lower the learning rate or "
                               f"check the activations for NaN/Inf.")


def _wandb_run(train: TrainConfig, cfg: SAEConfig):
    if not train.wandb_project:
        return None
    try:
        import wandb
    except ImportError as e:
        raise InputError("wandb_project was given but wandb is not installed: pip install wandb") from e
    return wandb.init(project=train.wandb_project, config={**cfg.to_dict(), **train.__dict__})


def _source(source: ActivationSource | torch.Tensor, cfg: SAEConfig, train: TrainConfig, dist: Dist):
    """The activation source for this rank: a tensor becomes a sampler (partitioned under torchrun)."""
    if isinstance(source, torch.Tensor):
        if source.dim() != 2 or source.shape[1] != cfg.row_width:
            raise InputError(f"activations must be [n, {cfg.row_desc}], got {tuple(source.shape)}")
        parts = train.partitions or default_partitions(source.shape[0], train.batch_size)
        if parts < dist.world:
            raise InputError(f"partitions={parts} is fewer than the {dist.world} ranks: each rank needs one"
                             + ("" if train.partitions else f" (the default, min(64, rows {source.shape[0]}, "
                                                             f"batch_size {train.batch_size}))"))
        return PartitionedSource.from_tensor(source, parts, train.batch_size, train.seed, dist)
    if dist.active and not isinstance(source, PartitionedSource):
        raise InputError("under torchrun the activations must be a tensor or a PartitionedSource "
                         "(PartitionedSource.from_shards(folder, ...) reads each rank's own shards)")
    if source.d_in != cfg.row_width:
        raise InputError(f"the activation source has width {source.d_in}, the SAE needs rows of {cfg.row_desc}")
    return source


def fit_sae(source: ActivationSource | torch.Tensor, cfg: "SAEConfig | CLTConfig | CrosscoderConfig",
            train: TrainConfig | None = None, out: str | Path | None = None, resume: bool = False,
            progress: bool = True, stop_after: int | None = None, dist: Dist | None = None) -> TrainResult:
    """Train an SAE, a transcoder, a cross-layer transcoder or a crosscoder (``cfg``: an :class:`SAEConfig`, a
    :class:`~mechscope.sae.clt.CLTConfig` or a :class:`~mechscope.sae.crosscoder.CrosscoderConfig`) for ``train.steps``
    batches from ``source`` (a tensor ``[n, row width]`` is sampled with replacement; a CLT's rows are
    :func:`~mechscope.sae.data.harvest_bundle`'s).

    With ``out``: JSON-lines monitoring in ``out/log.jsonl`` every ``log_every`` steps and a
    checkpoint every ``checkpoint_every`` steps; ``resume=True`` continues from the checkpoint.
    ``stop_after`` ends this call after that many steps (as an interruption would).

    ``dist`` (:func:`mechscope.distributed.init` under torchrun): data-parallel training. Each rank draws
    its partitions' share of the global batch of ``train.batch_size`` rows; gradients, firing counts and
    logged statistics are summed across ranks, BatchTopK selects over the whole batch, and rank 0 alone
    writes logs, checkpoints and W&B. With the same ``train.partitions`` the SAE equals the one-process
    run's (to float rounding), on any number of ranks up to the partition count. The default
    (:func:`~mechscope.sae.data.default_partitions`: ``min(64, rows, batch_size)``) does not depend on the
    number of ranks, so the same call gives the same SAE on 1 rank and on 2.
    """
    return fit_saes(source, [cfg], train, [out], resume, progress, stop_after, dist)[0]


def fit_saes(source: ActivationSource | torch.Tensor, cfgs: list, train: TrainConfig | None = None,
             outs: "list[str | Path | None] | None" = None, resume: bool = False, progress: bool = True,
             stop_after: int | None = None, dist: Dist | None = None) -> list[TrainResult]:
    """:func:`fit_sae` for several dictionaries in lockstep (a sweep of widths, ``k`` or seeds over one set of rows):
    every step draws one batch and each dictionary takes its step on it, so each ends as it would trained alone on the
    same stream, and the rows are read once. ``outs``: a folder per dictionary (logs there; the one checkpoint of the
    sweep is ``lockstep_checkpoint.pt`` beside them, so all resume from the same step)."""
    train = train or TrainConfig()
    dist = dist or Dist.single()
    if not cfgs:
        raise InputError("fit_saes needs at least one dictionary config")
    outs = [None] * len(cfgs) if outs is None else [Path(o) if o is not None else None for o in outs]
    if len(outs) != len(cfgs) or (len(cfgs) > 1 and any(o is None for o in outs) and any(o is not None for o in outs)):
        raise InputError(f"give one output folder per dictionary ({len(cfgs)}), or none")
    if len(cfgs) > 1 and outs[0] is not None and len({o.parent for o in outs}) > 1:
        raise InputError("dictionaries trained in lockstep keep their folders side by side (one parent folder, where "
                         "their one checkpoint lives)")
    widths = {c.row_width for c in cfgs}
    if len(widths) > 1:
        raise InputError(f"dictionaries trained in lockstep read the same rows; their row widths differ ({sorted(widths)})")
    for cfg in cfgs:
        if train.resample_every and (not isinstance(cfg, SAEConfig) or cfg.is_transcoder):
            raise InputError("resample_every is for ReLU SAEs; a transcoder or crosscoder uses AuxK (TopK/BatchTopK) "
                             "against dead latents")
    if dist.active and train.resample_every:
        raise InputError("resample_every (dead-latent resampling of ReLU SAEs) is not supported across ranks; "
                         "use a TopK/BatchTopK SAE with AuxK, or train in one process")
    source = _source(source, cfgs[0], train, dist)
    local_rows = getattr(source, "local_rows", train.batch_size)
    on_cpu = dist.device.type == "cpu"  # the sparse kernels: faster on CPU only
    trainers = [SAETrainer(cfg, train, dist, sparse=train.sparse if train.sparse is not None else (
        not isinstance(cfg, SAEConfig) or on_cpu and cfg.dtype in ("float32", "float64")), out=out)
        for cfg, out in zip(cfgs, outs)]
    _start(trainers, source, outs, resume, dist)
    ck_path = _lockstep_path(outs)
    first = trainers[0].state
    steps = range(first.step, train.steps if stop_after is None else min(train.steps, first.step + stop_after))
    if progress and dist.is_main:
        cfg = cfgs[0]
        what = f"SAE {cfg.architecture}" if isinstance(cfg, SAEConfig) else f"{cfg.kind.upper()} {cfg.architecture}"
        what = what if len(cfgs) == 1 else f"{len(cfgs)} dictionaries in lockstep"
        steps = bar(steps, desc=what + (f" on {dist.world} ranks" if dist.active else ""),
                    initial=first.step, total=train.steps)
    runs = [_wandb_run(train, c) if dist.is_main else None for c in cfgs]
    histories: list[list[dict]] = [[] for _ in cfgs]
    for _ in steps:
        x = next(source)
        for trainer, out, run, history in zip(trainers, outs, runs, histories):
            terms = trainer.step(x, train.batch_size if dist.active else None)
            if out is not None and trainer.state.step % train.log_every == 0:
                rec = _log_record(trainer.sae, x, terms, trainer.state, train, dist, local_rows / train.batch_size)
                history.append(rec)
                if dist.is_main:
                    with open(out / "log.jsonl", "a") as fh:
                        fh.write(json.dumps(rec) + "\n")
                if run is not None:
                    run.log({k: v for k, v in rec.items() if k != "log10_density_hist"}, step=trainer.state.step)
        step = trainers[0].state.step
        if ck_path is not None and (step % train.checkpoint_every == 0 or step == train.steps):
            _save_checkpoint(ck_path, trainers, source, dist)  # and at the end: --resume with more --steps continues
    for run in runs:
        if run is not None:
            run.finish()
    return [t.result(h) for t, h in zip(trainers, histories)]


def train_sae(acts: ActivationSource | torch.Tensor, cfg: SAEConfig, train: TrainConfig | None = None,
              out: str | Path | None = None, resume: bool = False, progress: bool = True,
              stop_after: int | None = None, dist: Dist | None = None) -> SAE:
    """:func:`fit_sae` returning only the trained SAE."""
    return fit_sae(acts, cfg, train, out, resume, progress, stop_after, dist).sae


def train_sae_sweep(acts: torch.Tensor, cfgs: list[SAEConfig], train: TrainConfig | None = None,
                    out: str | Path | None = None, progress: bool = True) -> list[SAE]:
    """Train several SAE configs on one harvest, each seeing the same batches in the same order."""
    return [train_sae(acts, c, train, None if out is None else Path(out) / f"sae_{i}", progress=progress)
            for i, c in enumerate(cfgs)]
