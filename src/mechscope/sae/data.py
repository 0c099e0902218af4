"""Activations for SAE training: harvesting from the LM, sources the trainer reads, and storage.

This is the only part of :mod:`mechscope.sae` that runs the language model to get activations
(:func:`harvest`); the trainer (:mod:`.train`) reads an :class:`ActivationSource` and never sees
the LM, and the evaluator (:mod:`.evaluate`) splices a trained SAE back in.

:func:`harvest_to_disk` streams activations into ``folder/shard_00000.safetensors`` ... Each shard
is written to a temporary name and renamed, and ``manifest.json`` (written last, atomically)
lists only complete shards, so a crash never leaves a half shard that looks whole; a rerun
resumes after the last listed shard. Several SAEs can then train on one harvest
(:func:`load_shards`, or :func:`mechscope.sae.train.train_sae_sweep`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator, Protocol, Sequence

import torch
from safetensors.torch import save

from ..batching import BatchState, map_batches
from ..compute import forward_bytes
from ..core.errors import InputError, NotFoundError
from ..core.files import atomic_write, read_json, read_safetensors
from ..core.model import HookedModel
from ..core.work import add_floor
from ..distributed import Dist, split
from ..techniques.inputs import stop_layer


@torch.no_grad()
def harvest(model: HookedModel, hook_name: str, tokens: torch.Tensor, batch_size: int | None = None,
            skip_first: int = 1, max_norm_ratio: float | None = 10.0, state: BatchState | None = None) -> torch.Tensor:
    """Activations at ``hook_name`` for ``tokens [n, pos]`` as ``[m, width]`` rows (fp32, CPU), ``m <= n * (pos - skip_first)``.

    The forward pass stops after the hooked block. The first ``skip_first`` positions are dropped:
    the first token of a sequence (BOS or not) is an attention sink whose residual norm is tens of
    times larger than the rest, which would dominate the reconstruction loss and the variance.
    Rows whose norm exceeds ``max_norm_ratio`` x their sequence's median are dropped too: such
    "massive activations" (Sun et al. 2024) also appear a token or two into a sequence when the
    first token is a weak sink (measured on SmolLM2 layer 15: 0.05% of tokens, up to 160x the
    median norm, together 13x the squared norm of all other tokens). ``None`` keeps every row.
    Sequences run in batches sized from free memory (``batch_size`` overrides); the rows do not
    depend on the batch size.
    """
    return harvest_many(model, [hook_name], tokens, batch_size, skip_first, max_norm_ratio, state)[hook_name]


@torch.no_grad()
def harvest_many(model: HookedModel, hooks: list[str], tokens: torch.Tensor, batch_size: int | None = None,
                 skip_first: int = 1, max_norm_ratio: float | None = 10.0, state: BatchState | None = None,
                 pairs: Sequence[tuple[str, str]] = (),
                 bundles: Sequence[tuple[tuple[str, ...], tuple[str, ...]]] = ()) -> dict:
    """:func:`harvest` at several hook points from one forward pass (stopping after the deepest one).

    Each hook's rows are filtered on their own norms, so ``harvest_many(m, [a, b], t)[a]`` equals
    ``harvest(m, a, t)``. Each ``(a, b)`` of ``pairs`` adds the entry ``(a, b)``: rows ``[a | b]``
    (a transcoder's input and target) of the same tokens, filtered on ``a``'s norms
    (:func:`harvest_pairs`). Each ``(inputs, outputs)`` of ``bundles`` adds the entry ``(inputs, outputs)``:
    rows ``[inputs... | outputs...]`` of the same tokens, kept where every input passes its norm rule
    (a cross-layer transcoder's training rows: :func:`harvest_bundle`). A pair is the bundle ``((a,), (b,))``.
    """
    return _harvest(model, hooks, tokens, batch_size, skip_first, max_norm_ratio, state, pairs, bundles)[0]


def _harvest(model: HookedModel, hooks, tokens: torch.Tensor, batch_size, skip_first, max_norm_ratio, state, pairs,
             bundles) -> tuple[dict, dict]:
    """:func:`harvest_many`'s rows, and for each of its keys how many rows each sequence gave ``[n]``."""
    bundles = [(tuple(p[:1]), tuple(p[1:])) for p in pairs] + [(tuple(i), tuple(o)) for i, o in bundles]
    keys = [tuple(p) for p in pairs] + [(tuple(i), tuple(o)) for i, o in bundles[len(pairs):]]
    wanted = list(dict.fromkeys(list(hooks) + [h for i, o in bundles for h in i + o]))
    if not wanted:
        raise InputError("harvest_many needs at least one hook point")
    for h in wanted:
        model.manager.check(h)
    stop = stop_layer(model, wanted)

    def run(s: int, e: int) -> dict:
        got = {}

        def grab(act, hook):
            got[hook.name] = act.detach()

        with model.hooks([(h, grab) for h in wanted]):
            model(tokens[s:e].to(model.device), stop_at_layer=stop)
        add_floor(tokens[s:e].numel() * (model.cfg.n_layers if stop is None else stop))  # up to the last hook read
        acts = {h: positions(got[h], skip_first) for h in wanted}
        keep = {h: token_keep_mask(acts[h], 0, max_norm_ratio)
                for h in dict.fromkeys(list(hooks) + [a for i, _ in bundles for a in i])}
        out = {h: acts[h][keep[h]].float().cpu() for h in hooks}
        counts = {h: keep[h].sum(1).cpu() for h in hooks}
        for key, (ins, outs) in zip(keys, bundles):
            mask = torch.stack([keep[a] for a in ins]).all(0)
            out[key] = torch.cat([acts[h] for h in ins + outs], dim=-1)[mask].float().cpu()
            counts[key] = mask.sum(1).cpu()
        return out, counts

    elt = torch.finfo(model.dtype).bits // 8
    per = forward_bytes(model.cfg.to_dict(), 1, tokens.shape[1], elt, 0)
    parts = map_batches(run, tokens.shape[0], batch_size, per, model.device, "harvest", state,
                        tokens_per_item=tokens.shape[1])
    return ({k: torch.cat([p[0][k] for p in parts]) for k in parts[0][0]},
            {k: torch.cat([p[1][k] for p in parts]) for k in parts[0][1]})


def harvest_partitions(model: HookedModel, tokens: torch.Tensor, partitions: int, mine: Sequence[int],
                       hook: str | None = None, bundle: tuple[Sequence[str], Sequence[str]] | None = None,
                       batch_size: int | None = None, skip_first: int = 1,
                       max_norm_ratio: float | None = 10.0) -> dict[int, torch.Tensor]:
    """The rows of the partitions ``mine`` (contiguous; partition ``p`` holds the sequences
    ``split(n, partitions)[p]`` of ``tokens [n, pos]``) from one harvest over all their sequences: ``hook``'s
    rows (:func:`harvest`) or a ``bundle`` ``(inputs, outputs)``'s (:func:`harvest_bundle`). Equal, partition by
    partition, to harvesting each partition on its own, without one call (and its small batches) per partition.
    ``batch_size``, ``skip_first``, ``max_norm_ratio``: :func:`harvest_many`'s."""
    if (hook is None) == (bundle is None):
        raise InputError("harvest_partitions takes a hook or a bundle (inputs, outputs), one of them")
    seqs = split(tokens.shape[0], partitions)
    mine = list(mine)
    lo, hi = seqs[mine[0]].start, seqs[mine[-1]].stop
    key = hook if bundle is None else (tuple(bundle[0]), tuple(bundle[1]))
    rows, counts = _harvest(model, [hook] if bundle is None else [], tokens[lo:hi], batch_size, skip_first,
                            max_norm_ratio, None, (), [] if bundle is None else [key])
    sizes = [int(counts[key][seqs[p].start - lo:seqs[p].stop - lo].sum()) for p in mine]
    return dict(zip(mine, rows[key].split(sizes)))


def positions(act: torch.Tensor, skip_first: int = 1) -> torch.Tensor:
    """A hook's activation ``[b, pos, ...]`` as ``[b, pos - skip_first, width]``: the first positions dropped, the
    trailing dimensions (heads x d_head) flattened; what a harvest reads its rows from."""
    a = act[:, skip_first:]
    return a.flatten(2) if a.dim() > 3 else a


def token_keep_mask(acts: torch.Tensor, skip_first: int = 1, max_norm_ratio: float | None = 10.0) -> torch.Tensor:
    """``[b, pos]``: the tokens of ``acts [b, pos, width]`` an SAE is trained on and read at, the one rule that
    harvests and :func:`~mechscope.sae.features.feature_stats` share. The first ``skip_first`` positions are
    left out (the attention sink), and so is a token whose norm exceeds ``max_norm_ratio`` x the median norm of
    its sequence's remaining tokens (None: no norm rule)."""
    keep = torch.zeros(acts.shape[:2], dtype=torch.bool, device=acts.device)
    rest = acts[:, skip_first:]
    if not rest.shape[1]:
        return keep
    if max_norm_ratio is None:
        keep[:, skip_first:] = True
        return keep
    norms = rest.float().norm(dim=-1)  # [b, pos - skip_first]
    keep[:, skip_first:] = norms <= max_norm_ratio * norms.median(dim=1, keepdim=True).values
    return keep


def harvest_pairs(model: HookedModel, hook_in: str, hook_out: str, tokens: torch.Tensor, batch_size: int | None = None,
                  skip_first: int = 1, max_norm_ratio: float | None = 10.0) -> torch.Tensor:
    """A transcoder's training rows ``[m, d_in + d_out]``: ``hook_in`` then ``hook_out`` at the same tokens
    (e.g. ``blocks.L.ln2.hook_normalized`` and ``blocks.L.hook_mlp_out``), filtered on the input's norms."""
    return harvest_many(model, [], tokens, batch_size, skip_first, max_norm_ratio, pairs=[(hook_in, hook_out)])[
        (hook_in, hook_out)]


def harvest_bundle(model: HookedModel, inputs: Sequence[str], outputs: Sequence[str], tokens: torch.Tensor,
                   batch_size: int | None = None, skip_first: int = 1,
                   max_norm_ratio: float | None = 10.0) -> torch.Tensor:
    """A cross-layer transcoder's training rows ``[m, (len(inputs) + len(outputs)) x width]``: every input hook,
    then every output hook, at the same tokens, from one forward pass; a token is kept where every input passes
    the norm rule of :func:`token_keep_mask`."""
    key = (tuple(inputs), tuple(outputs))
    return harvest_many(model, [], tokens, batch_size, skip_first, max_norm_ratio, bundles=[key])[key]


class ActivationSource(Protocol):
    """What the trainer reads: ``next(source)`` gives a batch ``[batch, d_in]``; ``sample(n)`` gives rows
    for initialisation (input scale, ``b_dec``); ``state_dict``/``load_state_dict`` make resume exact."""

    d_in: int

    def __next__(self) -> torch.Tensor: ...

    def sample(self, n: int) -> torch.Tensor: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class TensorSource:
    """Batches of ``batch_size`` rows drawn with replacement from in-memory activations ``[n, d_in]``."""

    def __init__(self, acts: torch.Tensor, batch_size: int, seed: int = 0):
        if acts.dim() != 2:
            raise InputError(f"activations must be [n, d_in], got shape {tuple(acts.shape)}")
        self.acts, self.batch_size, self.seed = acts, batch_size, seed
        self.d_in = acts.shape[1]
        self.gen = torch.Generator().manual_seed(seed)

    def __iter__(self) -> "TensorSource":
        return self

    def __next__(self) -> torch.Tensor:
        return self.acts[torch.randint(0, self.acts.shape[0], (self.batch_size,), generator=self.gen)]

    def sample(self, n: int) -> torch.Tensor:
        perm = torch.randperm(self.acts.shape[0], generator=torch.Generator().manual_seed(self.seed))
        return self.acts[perm[:n]]

    def state_dict(self) -> dict:
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["gen"])


def _manifest(folder: Path) -> dict:
    p = folder / "manifest.json"
    return read_json(p, "the activation shards' manifest") if p.exists() else {"shards": [], "rows_done": 0}


def harvest_to_disk(model: HookedModel, hook_name: str, tokens: torch.Tensor, folder: str | Path, seqs_per_shard: int = 64,
                    batch_size: int | None = None) -> Path:
    """Harvest ``hook_name`` on ``tokens [n, pos]`` into shards of ``seqs_per_shard`` sequences (resumable)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    man = _manifest(folder)
    if man.get("hook_name") not in (None, hook_name):
        raise InputError(f"{folder} holds activations of {man['hook_name']}, not {hook_name}")
    man["hook_name"] = hook_name
    start = man["rows_done"]
    for s in range(start, tokens.shape[0], seqs_per_shard):
        acts = harvest(model, hook_name, tokens[s:s + seqs_per_shard], batch_size)
        name = f"shard_{len(man['shards']):05d}.safetensors"
        atomic_write(folder / name, save({"acts": acts.contiguous()}, metadata={"hook_name": hook_name}))
        man["shards"].append({"file": name, "rows": int(acts.shape[0]), "d": int(acts.shape[1])})
        man["rows_done"] = min(s + seqs_per_shard, tokens.shape[0])
        atomic_write(folder / "manifest.json", json.dumps(man, indent=2))
    return folder


def load_shards(folder: str | Path) -> torch.Tensor:
    """All complete shards listed in the manifest as one ``[n, d]`` tensor (files not listed are ignored)."""
    folder = Path(folder)
    man = _manifest(folder)
    if not man["shards"]:
        raise NotFoundError(f"no complete activation shards in {folder}")
    return torch.cat([_read_shard(folder, s) for s in man["shards"]])


def _read_shard(folder: Path, entry: dict) -> torch.Tensor:
    """One shard's ``[rows, d]`` activations, checked against its manifest entry (a damaged file is named)."""
    t = read_safetensors(folder / entry["file"], "an activation shard listed in manifest.json").get("acts")
    if t is None or t.dim() != 2 or t.shape[0] != entry["rows"]:
        raise InputError(f"{folder / entry['file']} does not hold the [{entry['rows']}, {entry['d']}] 'acts' tensor "
                         f"that manifest.json lists; harvest again into a new folder")
    return t


def shuffled_batches(chunks: Iterable[torch.Tensor], batch_size: int, buffer_size: int = 65536,
                     seed: int = 0) -> Iterator[torch.Tensor]:
    """Mix a stream of ``[n, d]`` chunks through a buffer of ``buffer_size`` rows and yield shuffled batches.

    When the buffer is full, half of it (shuffled) is emitted as batches, so consecutive batches mix
    rows from many chunks; the remainder is flushed at the end.
    """
    g = torch.Generator().manual_seed(seed)
    buf: list[torch.Tensor] = []
    n = 0
    for c in chunks:
        buf.append(c)
        n += c.shape[0]
        if n >= buffer_size:
            allrows = torch.cat(buf)[torch.randperm(n, generator=g)]
            half = (n // 2) // batch_size * batch_size
            for s in range(0, half, batch_size):
                yield allrows[s:s + batch_size]
            buf, n = [allrows[half:]], n - half
    if n:
        allrows = torch.cat(buf)[torch.randperm(n, generator=g)]
        for s in range(0, n - batch_size + 1, batch_size):
            yield allrows[s:s + batch_size]


DEFAULT_PARTITIONS = 64  # fixed, so that a default run gives the same SAE on 1, 2, ... 64 ranks


def default_partitions(n_units: int, batch_size: int) -> int:
    """The partitions a run uses unless told: ``min(64, n_units, batch_size)``, where ``n_units`` is what a partition
    is cut from (activation rows, or the CLI's training sequences). It does not depend on the number of ranks,
    so adding ranks (up to that count) never changes the draw, and with it the SAE."""
    return max(1, min(DEFAULT_PARTITIONS, int(n_units), int(batch_size)))


class PartitionedSource:
    """Activations in ``P`` partitions, each sampled with replacement by its own generator (seeded ``seed + p``).

    The global batch of every step draws ``batch_size`` rows split evenly over the partitions
    (:func:`mechscope.distributed.split`), concatenated in partition order. Under a
    :class:`~mechscope.distributed.Dist` each rank holds and draws only its own partitions (a contiguous
    piece of ``range(P)``), so the union of the ranks' local batches is the global batch whatever the
    world size: a run with ``P`` partitions gives the same SAE on 1, 2, ... ``P`` ranks (uneven splits
    allowed). ``sample``, ``state_dict`` and ``load_state_dict`` are collective (every rank calls them).
    """

    def __init__(self, parts: dict[int, torch.Tensor], n_parts: int, batch_size: int, seed: int = 0,
                 dist: Dist | None = None):
        self.dist = dist or Dist.single()
        self.n_parts, self.batch_size, self.seed = n_parts, batch_size, seed
        self.mine = list(split(n_parts, self.dist.world)[self.dist.rank])
        missing = [p for p in self.mine if p not in parts]
        if missing:
            raise InputError(f"rank {self.dist.rank} needs partitions {missing} of {n_parts}, which were not given")
        if batch_size < n_parts:
            raise InputError(f"batch_size {batch_size} is smaller than the {n_parts} partitions: each needs a row")
        self.parts = {p: parts[p] for p in self.mine}
        empty = [p for p, t in self.parts.items() if t.shape[0] == 0]
        if empty:
            raise InputError(f"partitions {empty} hold no rows; use fewer partitions than rows")
        self.d_in = next(iter(self.parts.values())).shape[1] if self.parts else 0
        self.rows = [len(r) for r in split(batch_size, n_parts)]  # rows per partition in each global batch
        self.gens = {p: torch.Generator().manual_seed(seed + p) for p in self.mine}

    @classmethod
    def from_tensor(cls, acts: torch.Tensor, n_parts: int, batch_size: int, seed: int = 0,
                    dist: Dist | None = None) -> "PartitionedSource":
        """Partition ``acts [n, d_in]`` into ``n_parts`` contiguous blocks of rows; a rank keeps only its own."""
        dist = dist or Dist.single()
        if acts.dim() != 2:
            raise InputError(f"activations must be [n, d_in], got shape {tuple(acts.shape)}")
        blocks = split(acts.shape[0], n_parts)
        mine = split(n_parts, dist.world)[dist.rank]
        return cls({p: acts[blocks[p].start:blocks[p].stop] for p in mine}, n_parts, batch_size, seed, dist)

    @classmethod
    def from_shards(cls, folder: str | Path, batch_size: int, seed: int = 0,
                    dist: Dist | None = None) -> "PartitionedSource":
        """One partition per shard of :func:`harvest_to_disk`; each rank reads only its own shards."""
        dist = dist or Dist.single()
        folder = Path(folder)
        man = _manifest(folder)
        if not man["shards"]:
            raise NotFoundError(f"no complete activation shards in {folder}")
        n = len(man["shards"])
        if n < dist.world:
            raise InputError(f"{folder} has {n} shards for {dist.world} ranks: every rank needs at least one; "
                             f"harvest with smaller seqs_per_shard")
        parts = {p: _read_shard(folder, man["shards"][p]) for p in split(n, dist.world)[dist.rank]}
        return cls(parts, n, batch_size, seed, dist)

    @property
    def local_rows(self) -> int:
        """Rows this rank draws per step (``batch_size`` summed over ranks)."""
        return sum(self.rows[p] for p in self.mine)

    def __iter__(self) -> "PartitionedSource":
        return self

    def __next__(self) -> torch.Tensor:
        return torch.cat([self.parts[p][torch.randint(0, self.parts[p].shape[0], (self.rows[p],), generator=self.gens[p])]
                          for p in self.mine])

    def sample(self, n: int) -> torch.Tensor:
        """``n`` rows spread evenly over the partitions (the same rows on every rank), for initialisation."""
        counts = [len(r) for r in split(n, self.n_parts)]
        mine = [self.parts[p][torch.randperm(self.parts[p].shape[0], generator=torch.Generator().manual_seed(self.seed + p))
                              [:counts[p]]] for p in self.mine]
        local = torch.cat(mine) if mine else torch.zeros(0, self.d_in)
        return self.dist.gather(local)

    def state_dict(self) -> dict:
        states = torch.stack([self.gens[p].get_state() for p in self.mine])
        return {"gens": self.dist.gather(states), "n_parts": self.n_parts}

    def load_state_dict(self, state: dict) -> None:
        if "gens" not in state or int(state.get("n_parts", -1)) != self.n_parts:
            raise InputError(f"the checkpoint's activation source has {state.get('n_parts', 1)} partitions, this run "
                             f"{self.n_parts}; resume with the same partitions")
        for p in self.mine:
            self.gens[p].set_state(state["gens"][p].clone().contiguous())  # a row view would be read from offset 0
