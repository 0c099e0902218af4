"""run_with_cache with 3 hook points against a bare HF forward pass, on the default model.

Prints the ratio of medians measured in this run (goal: <= 1.05x). Interleaved repetitions.
"""

import statistics
import time

import torch

import mechscope

torch.set_grad_enabled(False)
torch.manual_seed(0)


def timeit(fn, reps):
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main(batch=4, seq=128, reps=15):
    model = mechscope.load("smollm2-135m")
    toks = torch.randint(100, 40000, (batch, seq))
    names = ["blocks.5.hook_resid_post", "blocks.15.hook_resid_post", "blocks.25.attn.hook_z"]
    bare = lambda: model.hf(input_ids=toks)  # noqa: E731
    cached = lambda: model.run_with_cache(toks, names_filter=names)  # noqa: E731
    unhooked = lambda: model(toks)  # noqa: E731
    for f in (bare, cached, unhooked):
        f()
    tb, tc, tu = [], [], []
    for _ in range(reps):
        tb += timeit(bare, 1)
        tc += timeit(cached, 1)
        tu += timeit(unhooked, 1)
    mb, mc, mu = (statistics.median(x) for x in (tb, tc, tu))
    print(f"default model, batch {batch} x {seq} tokens, {reps} interleaved reps, medians")
    print(f"  bare HF forward              {mb * 1000:8.1f} ms")
    print(f"  mechscope forward, no hooks  {mu * 1000:8.1f} ms   ratio {mu / mb:.3f}x")
    print(f"  run_with_cache, 3 hooks      {mc * 1000:8.1f} ms   ratio {mc / mb:.3f}x   (goal <= 1.05x)")


if __name__ == "__main__":
    main()
