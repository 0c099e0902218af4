"""Residual-stream patching sweep (all layers x positions) on the default model: engine vs naive loop.

Prints the speed-up measured in this run (goal: >= 20x), the ratio of the engine's time to the
compute floor (the FLOPs of the blocks and positions that genuinely need recomputing, at the
machine's measured forward throughput), and the largest difference between the two results.
"""

import time

import torch

import mechscope
from _engine_timing import time_engine
from mechscope.analysis.metrics import logit_diff
from mechscope.techniques.patching import patch_naive

torch.set_grad_enabled(False)

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORR = "When Mary and John went to the store, Mary gave a drink to"


def main():
    model = mechscope.load("smollm2-135m")
    mary, john = model.to_single_token(" Mary"), model.to_single_token(" John")
    metric = lambda lg: logit_diff(lg, mary, john)  # noqa: E731
    P = model.to_tokens(CLEAN).shape[1]
    L = model.cfg.n_layers
    fast, t_fast, every, t_every = time_engine(model, CLEAN, CORR, metric)
    t = time.perf_counter()
    slow = patch_naive(model, CLEAN, CORR, metric, site="resid_pre")
    t_slow = time.perf_counter() - t
    # compute floor: token-layers that must be recomputed, at the throughput of one big batched forward
    toks = torch.randint(100, 40000, (32, P))
    model(toks)
    t = time.perf_counter()
    model(toks)
    per_token_layer = (time.perf_counter() - t) / (32 * P * L)
    floor_tl = fast.stats["floor_token_layers"]  # patches that change something: positions >= p, blocks >= l
    floor = floor_tl * per_token_layer
    print(f"residual patching sweep, default model, {L} layers x {P} positions = {L * P} patches")
    print(f"  naive loop (one forward per patch)  {t_slow:7.2f} s")
    print(f"  mechscope engine                    {t_fast:7.2f} s   speed-up {t_slow / t_fast:5.1f}x (goal >= 20x)")
    print(f"  engine, running every patch        {t_every:7.2f} s   speed-up {t_slow / t_every:5.1f}x "
          f"({every.stats['forward_passes']} passes, {every.stats['token_layers']} token-layers)")
    print(f"  engine: {fast.stats['forward_passes']} batched passes, {fast.stats['token_layers']} token-layers "
          f"(naive {fast.stats['naive_token_layers']}, floor {floor_tl}); "
          f"{fast.stats['skipped_identical']} patches write identical values and are not run")
    print(f"  compute floor at batched throughput {floor:7.2f} s   engine / floor {t_fast / floor:5.2f}x")
    print(f"  max |engine - naive| = {float((fast.values - slow.values).abs().max()):.2e}")
    top = fast.top(3)
    print("  top patches:", ", ".join(f"{n} {v:+.2f}" for n, v in top))


if __name__ == "__main__":
    main()
