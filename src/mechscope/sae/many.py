"""Several SAEs trained in lockstep from one streamed harvest: the LM runs once per chunk, however many SAEs.

The SAEs may sit on different hooks or layers, or share one hook with different widths, k or
architectures; transcoders (``SAEConfig(hook_name_out=...)``, e.g. every layer's MLP input to its output)
train the same way from the same pass. Activations are never stored: each chunk of sequences goes through the LM once
(:func:`~mechscope.sae.data.harvest_many`, stopping after the deepest hook), each SAE's rows go
into its own shuffle buffer, and every SAE takes a step whenever its buffer holds a batch. An SAE
trained here equals the same SAE trained alone by this function (same seed, same stream), so
adding SAEs to a run changes none of them.

Under torchrun the SAEs are dealt over the ranks (:func:`mechscope.distributed.split`: any
number, uneven allowed); each rank harvests only the hooks of its own SAEs, from its own replica
of the LM on the same token stream, and writes its own SAEs. This is module distribution (one
SAE per layer on different ranks), the complement of data parallelism (:func:`.train.fit_sae` with
a ``dist``): the LM's forward is repeated on each rank, the SAE work is divided.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.errors import InputError
from ..core.model import HookedModel
from ..core.progress import bar
from ..distributed import Dist, split
from .clt import CLTConfig, CrossLayerTranscoder
from .data import harvest_many
from .io import check_fits
from .model import SAEConfig
from .train import SAETrainer, TrainConfig, TrainResult


@dataclass
class _Buffer:
    """A shuffle buffer of activation rows: emits batches once it holds ``fill`` rows, keeping half mixed in."""

    batch: int
    fill: int
    gen: torch.Generator
    pool: torch.Tensor | None = None

    def add(self, rows: torch.Tensor) -> None:
        self.pool = rows if self.pool is None else torch.cat([self.pool, rows])

    def batches(self) -> list[torch.Tensor]:
        if self.pool is None or self.pool.shape[0] < max(self.fill, self.batch):
            return []
        pool = self.pool[torch.randperm(self.pool.shape[0], generator=self.gen)]
        n = max(1, (pool.shape[0] - self.fill // 2) // self.batch)
        out = [pool[i * self.batch:(i + 1) * self.batch] for i in range(n)]
        self.pool = pool[n * self.batch:]
        return out


def train_many(model: HookedModel, tokens: torch.Tensor, cfgs: list[SAEConfig], train: TrainConfig | None = None,
               seqs_per_chunk: int = 16, buffer_rows: int | None = None, dist: Dist | None = None,
               progress: bool = True) -> list[TrainResult | None]:
    """Train one SAE per config in ``cfgs`` for ``train.steps`` batches each, from one pass per chunk of ``tokens``.

    ``tokens [n, pos]`` are streamed in chunks of ``seqs_per_chunk`` sequences (cycling when the SAEs need
    more batches than one pass gives). ``buffer_rows`` (default 4 batches) sets each shuffle buffer. The
    first chunk initialises every SAE's input scale and ``b_dec``. Returns one result per config; under
    torchrun a rank returns None for the configs it does not own.
    """
    train = train or TrainConfig()
    dist = dist or Dist.single()
    if not cfgs:
        raise InputError("train_many needs at least one SAEConfig")
    if train.resample_every:
        raise InputError("resample_every is not supported in train_many; use TopK/BatchTopK with AuxK")
    missing = [i for i, c in enumerate(cfgs) if isinstance(c, SAEConfig) and not c.hook_name]
    if missing:
        raise InputError(f"every SAEConfig needs its hook_name in train_many (configs {missing} have none)")
    if tokens.dim() != 2 or tokens.shape[0] == 0:
        raise InputError(f"tokens must be [n, pos] with n >= 1, got {tuple(tokens.shape)}")
    mine = list(split(len(cfgs), dist.world)[dist.rank])
    keys = list(dict.fromkeys(_key(cfgs[i]) for i in mine))
    hooks = [k for k in keys if isinstance(k, str)]
    bundles = [k for k in keys if not isinstance(k, str)]
    trainers = {i: SAETrainer(cfgs[i], train, sparse=train.sparse if train.sparse is not None else True) for i in mine}
    for t in trainers.values():  # the hooks exist and their widths match
        t.sae.check_fits(model) if isinstance(t.sae, CrossLayerTranscoder) else check_fits(t.sae, model)
    bufs = {i: _Buffer(train.batch_size, buffer_rows or 4 * train.batch_size,
                       torch.Generator().manual_seed(train.seed + _config_key(cfgs[i]))) for i in mine}
    chunks = [range(s, min(s + seqs_per_chunk, tokens.shape[0])) for s in range(0, tokens.shape[0], seqs_per_chunk)]
    pbar = bar(total=train.steps * len(mine), desc=f"{len(mine)} SAEs from one pass") if progress and mine else None
    c, first = 0, True
    while mine and any(trainers[i].state.step < train.steps for i in mine):
        r = chunks[c % len(chunks)]
        acts = harvest_many(model, hooks, tokens[r.start:r.stop], bundles=bundles)
        c += 1
        for i in mine:
            rows = acts[_key(cfgs[i])]
            if first:  # the first chunk initialises each SAE (input scale, then b_dec)
                trainers[i].init(rows[:4096])
            bufs[i].add(rows)
            for x in bufs[i].batches():
                if trainers[i].state.step >= train.steps:
                    break
                trainers[i].step(x)
                if pbar is not None:
                    pbar.update(1)
        first = False
    if pbar is not None:
        pbar.close()
    out: list[TrainResult | None] = [None] * len(cfgs)
    for i in mine:
        out[i] = trainers[i].result()
    return out


def _key(cfg: "SAEConfig | CLTConfig") -> str | tuple[tuple[str, ...], tuple[str, ...]]:
    """Which harvested rows a dictionary reads: an SAE's hook, or a transcoder's (inputs, targets) bundle."""
    if isinstance(cfg, CLTConfig):
        return tuple(cfg.input_hooks), tuple(cfg.output_hooks)
    return ((cfg.hook_name,), (cfg.hook_name_out,)) if cfg.is_transcoder else cfg.hook_name


def _config_key(cfg: SAEConfig) -> int:
    """A stable number from an SAE's config: its buffer's seed, so an SAE's batches do not depend on the others."""
    import hashlib
    import json

    return int(hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:8], 16)


def save_many(results: list[TrainResult | None], folder: str | Path, names: list[str] | None = None) -> list[Path]:
    """Each result this rank holds as ``folder/<names[i]>`` (default ``sae_<i>``; SAELens format, atomically)."""
    from .io import save_sae

    folder = Path(folder)
    names = names or [f"sae_{i}" for i in range(len(results))]
    if len(names) != len(results):
        raise InputError(f"{len(names)} names for {len(results)} results")
    return [save_sae(r.sae, folder / names[i], log10_density=r.log10_density)
            for i, r in enumerate(results) if r is not None]
