"""Memory-aware batching: choose a batch size from free memory, and halve it when memory runs out.

Every technique that loops over prompts, patch jobs or sequences (patching, ablation, EAP,
harvests, probes, SAE evaluation) goes through :func:`map_batches`:

- the batch size is ``batch_size`` when given; otherwise the largest that fits a fraction of
  the free memory of the device (``torch.cuda.mem_get_info`` on CUDA, psutil elsewhere), given
  an estimate of the bytes one item needs (:func:`mechscope.compute.forward_bytes`); on a CPU it is
  also capped by compute, at :func:`cpu_batch_tokens` tokens a pass: past about a thousand tokens a
  pass a CPU runs no faster (SmolLM2-135M on 2 cores: 474 tokens/s at 1x128, 683 at 8x128, 620 at
  32x128), while memory grows with the batch (``mechscope circuit --task ioi --n 100``: 3.3 GiB peak
  with the cap, 13.1 GiB without; ``bench/bench_circuit.py``);
- an out-of-memory error (``torch.OutOfMemoryError``, or the CPU allocator's "can't allocate
  memory") halves the batch and retries the same items, with one warning per call; the results
  are the same as with any other batch size, since items are independent.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch

from .compute import free_memory
from .core.errors import MechscopeError
from .core.progress import bar

T = TypeVar("T")


class MemoryWarning(UserWarning):
    """A batch ran out of memory and was retried with half its size."""


class OutOfMemory(MechscopeError, MemoryError):
    """Even one item does not fit in memory; the message says what to reduce."""


def is_oom(err: BaseException) -> bool:
    """Whether ``err`` is an out-of-memory error from torch (CUDA, MPS or the CPU allocator)."""
    if isinstance(err, (torch.OutOfMemoryError, MemoryError)):
        return True
    msg = str(err)
    return isinstance(err, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg
                                              or "not enough memory" in msg)


CPU_BATCH_TOKENS = 1024  # the compute knee on a CPU (8 x 128 tokens): see the module docstring and bench/bench_circuit.py


def cpu_batch_tokens() -> int:
    """Tokens per forward pass above which a CPU batch grows no faster: :data:`CPU_BATCH_TOKENS`, or
    ``$MECHSCOPE_CPU_BATCH_TOKENS`` (0: no cap, batches sized by free memory alone, as before)."""
    import os

    return int(os.environ.get("MECHSCOPE_CPU_BATCH_TOKENS", CPU_BATCH_TOKENS))


def compute_cap(device: torch.device | str | None, tokens_per_item: int | None) -> int | None:
    """The most items of ``tokens_per_item`` tokens a batch on ``device`` should hold for speed (None: no cap;
    accelerators are sized by memory alone)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    limit = cpu_batch_tokens()
    if dev.type != "cpu" or not tokens_per_item or limit <= 0:
        return None
    return max(1, limit // int(tokens_per_item))


def auto_batch(per_item_bytes: int, n_items: int, device: torch.device | str | None, fraction: float = 0.25,
               cap: int = 512, tokens_per_item: int | None = None) -> int:
    """The largest batch of items (each ``per_item_bytes``) that fits ``fraction`` of ``device``'s free memory, and
    on a CPU at most :func:`compute_cap` items of ``tokens_per_item`` tokens."""
    fit = int(fraction * free_memory(device) // max(int(per_item_bytes), 1))
    knee = compute_cap(device, tokens_per_item)
    return max(1, min(n_items, cap, fit, knee if knee is not None else cap))


@dataclass
class BatchState:
    """Shared by the calls that make up one run: the largest batch that fit so far, and whether it warned."""

    limit: int | None = None
    warned: bool = False


def map_batches(fn: Callable[[int, int], T], n_items: int, batch_size: int | None = None,
                per_item_bytes: int = 0, device: torch.device | str | None = None, what: str = "work",
                state: BatchState | None = None, tokens_per_item: int | None = None) -> list[T]:
    """``[fn(start, stop) for each batch of [0, n_items)]`` with the batch size chosen and adapted as above.

    ``state``: shared by the several calls of one run, so that later calls start at a size that fit
    and the run warns once in all. ``tokens_per_item``: the tokens one item runs through the model, for the
    CPU's compute cap. The results do not depend on the batch size.
    """
    state = BatchState() if state is None else state
    size = int(batch_size) if batch_size else auto_batch(per_item_bytes, n_items, device,
                                                         tokens_per_item=tokens_per_item)
    size = min(size, state.limit) if state.limit else size
    out: list[T] = []
    start = 0
    progress = bar(total=n_items, desc=what, min_items=size + 1)  # a bar once there is more than one batch
    while start < n_items:
        stop = min(n_items, start + size)
        try:
            out.append(fn(start, stop))
        except Exception as e:
            if not is_oom(e):
                raise
            if size == 1:
                raise OutOfMemory(f"{what}: one item does not fit in memory ({e}); use a shorter input, a smaller "
                                  f"model dtype (bfloat16), or device_map='auto' to offload weights") from e
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            new = max(1, size // 2)
            if not state.warned:
                warnings.warn(f"mechscope {what}: out of memory with batch {size}; retrying with batch {new} "
                              f"(results are unchanged)", MemoryWarning, stacklevel=2)
                state.warned = True
            size = state.limit = new
            continue
        progress.update(stop - start)
        start = stop
    progress.close()
    return out
