"""Many processes with ``torch.distributed``: the process group from torchrun's environment, shard plans,
and the few collectives mechscope needs.

mechscope runs on ``torch.distributed`` as it is, launched with ``torchrun`` (one node or many,
under Slurm or Kubernetes): NCCL on GPUs, gloo on CPUs, the same code apart from the backend and
the device. :func:`session` starts the group from ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/
``MASTER_ADDR`` (or runs as one process when they are absent) and always destroys it on the way
out, also when a rank raises, so a failed rank ends the job instead of leaving the others waiting.

A :class:`Dist` is what the rest of mechscope takes: ``rank``, ``world``, ``device`` and the
collectives (sum, weighted mean, gather of uneven pieces, broadcast of a Python object,
the k-th largest value across ranks). ``Dist.single()`` is the one-process case, where every
collective is the identity, so code paths do not branch on "distributed or not".

Shard plans (:func:`split`) are deterministic and allow any number of ranks: ``n`` items over
``world`` ranks in contiguous pieces whose sizes differ by at most one.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator

import torch

from .core.errors import InputError


def split(n: int, world: int) -> list[range]:
    """``range(n)`` cut into ``world`` contiguous pieces, sizes differing by at most one (the first ones larger)."""
    if world < 1:
        raise InputError(f"world size must be >= 1, got {world}")
    base, extra = divmod(n, world)
    out, start = [], 0
    for r in range(world):
        size = base + (r < extra)
        out.append(range(start, start + size))
        start += size
    return out


@dataclass
class Dist:
    """This process's place in the group and the collectives, all no-ops when ``world == 1``."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @classmethod
    def single(cls, device: str | torch.device = "cpu") -> "Dist":
        return cls(device=torch.device(device))

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that prints, logs and writes files."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def mine(self, n: int) -> range:
        """This rank's piece of ``range(n)`` under :func:`split`."""
        return split(n, self.world)[self.rank]

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduce ``t`` in place (sum over ranks); returns it."""
        if self.active:
            dev = t.device
            buf = t.to(self.device) if dev != self.device else t
            torch.distributed.all_reduce(buf, op=torch.distributed.ReduceOp.SUM)
            if buf is not t:
                t.copy_(buf.to(dev))
        return t

    def sum_each_(self, tensors: list[torch.Tensor]) -> None:
        """All-reduce each tensor in place, in its own dtype, all in flight at once (gradients: no copies)."""
        if not self.active or not tensors:
            return
        if any(t.device != self.device for t in tensors):
            for t in tensors:
                self.sum_(t)
            return
        works = [torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM, async_op=True) for t in tensors]
        for w in works:
            w.wait()

    def sum_many_(self, tensors: list[torch.Tensor]) -> None:
        """All-reduce a list of tensors in one float64 buffer (one collective; counts stay exact to 2^53)."""
        if not self.active or not tensors:
            return
        flat = torch.cat([t.detach().reshape(-1).to(self.device, torch.float64) for t in tensors])
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
        i = 0
        for t in tensors:
            t.copy_(flat[i:i + t.numel()].reshape(t.shape).to(t.device, t.dtype))
            i += t.numel()

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's ``t`` (first dims may differ) concatenated in rank order along dim 0, on every rank."""
        if not self.active:
            return t
        n = torch.tensor([t.shape[0]], device=self.device)
        sizes = [torch.zeros_like(n) for _ in range(self.world)]
        torch.distributed.all_gather(sizes, n)
        m = int(max(int(s) for s in sizes))
        pad = torch.zeros((m, *t.shape[1:]), dtype=t.dtype, device=self.device)
        pad[:t.shape[0]] = t.to(self.device)
        parts = [torch.empty_like(pad) for _ in range(self.world)]
        torch.distributed.all_gather(parts, pad)
        return torch.cat([p[:int(s)] for p, s in zip(parts, sizes)]).to(t.device)

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """A picklable Python object from rank ``src`` to every rank (rank ``src``'s own objects only)."""
        if not self.active:
            return obj
        box = [obj if self.rank == src else None]
        torch.distributed.broadcast_object_list(box, src=src, device=self.device if self.backend == "nccl" else None)
        return box[0]

    def kth_largest(self, values: torch.Tensor, k: int) -> torch.Tensor:
        """The ``k``-th largest entry of the union of every rank's ``values`` (1-D); ``-inf`` if there are fewer."""
        local = values.topk(min(k, values.numel())).values if values.numel() else values
        allv = self.gather(local)
        if allv.numel() < k or k < 1:
            return torch.tensor(float("-inf"), dtype=values.dtype, device=values.device)
        return allv.topk(k).values[-1]


def from_env() -> dict | None:
    """torchrun's variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), or None when not launched by torchrun."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    try:
        return {"rank": int(os.environ["RANK"]), "world": int(os.environ["WORLD_SIZE"]),
                "local_rank": int(os.environ.get("LOCAL_RANK", 0))}
    except ValueError as e:
        raise InputError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers ({e}); launch with torchrun") from e


def init(backend: str | None = None, timeout_s: float = 1800.0) -> Dist:
    """Join the process group torchrun set up (NCCL when CUDA is available, else gloo); one process otherwise.

    Each rank uses ``cuda:LOCAL_RANK`` on a GPU node and the CPU otherwise. ``timeout_s`` bounds how long
    a collective waits for a rank that died, so a failure ends the job rather than hanging it.
    """
    env = from_env()
    if env is None or env["world"] == 1:
        dev = torch.device("cuda", env["local_rank"] if env else 0) if torch.cuda.is_available() else torch.device("cpu")
        return Dist(device=dev)
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("nccl", "gloo"):
        raise InputError(f"backend must be 'nccl' (GPUs) or 'gloo' (CPUs), got {backend!r}")
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise InputError("backend 'nccl' needs CUDA GPUs; use 'gloo' on CPUs")
        dev = torch.device("cuda", env["local_rank"])
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend, rank=env["rank"], world_size=env["world"],
                                             timeout=timedelta(seconds=timeout_s))
    return Dist(env["rank"], env["world"], env["local_rank"], dev, backend)


def shutdown() -> None:
    """Leave the process group (safe to call twice, or when none was started)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@contextlib.contextmanager
def session(backend: str | None = None, timeout_s: float = 1800.0) -> Iterator[Dist]:
    """``with session() as dist: ...``: the group for the block, destroyed on the way out, error or not."""
    dist = init(backend, timeout_s)
    try:
        yield dist
    finally:
        shutdown()
