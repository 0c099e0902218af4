"""Scaling beyond one process, measured in one run on the default model (SmolLM2-135M, CPU, gloo).

1. Data-parallel SAE training: 2 ranks (torchrun, gloo) against 1 rank, same partitions and global
   batch, on activation shards harvested once; tokens per second and scaling efficiency
   ``(tps_2 / tps_1) / 2``.
2. A sharded patching sweep (IOI prompts, every head): 2 ranks against 1 process.
3. Many SAEs from one pass: 4 TopK SAEs on 4 hooks in lockstep (``train_many``) against the same 4
   trained one after another, each with its own streamed harvest (goal: >= 1.8x); peak memory of
   both beside that of a sweep over one stored harvest per hook.

On this machine (2 cores) torchrun sets OMP_NUM_THREADS=1 per rank, so 2 ranks have the same two
cores that 1 process with 2 threads has: a 2-rank figure here measures the overhead of the
collectives and the split, not the speed-up of more hardware. The 1-rank baseline is run both
with 1 thread (the per-rank share) and with 2 threads (the whole machine).
Environment variables: DIST_STEPS (SAE steps, default 300), DIST_PROMPTS (sweep prompts, default 16).
Usage: python bench/bench_distributed.py [--only sae|sweep|many]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HOOK = "blocks.15.hook_resid_post"


def _torchrun(n: int, args: list[str], threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port",
           str(29400 + os.getpid() % 500 + n), __file__, *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode:
        raise SystemExit(r.stderr[-4000:])
    return json.loads([ln for ln in r.stdout.splitlines() if ln.startswith("{")][-1])


def worker(task: str, folder: str) -> None:
    """Runs under torchrun: one measured task; rank 0 prints a JSON line."""
    import torch

    from mechscope import distributed

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    with distributed.session() as dist:
        if task == "sae":
            from mechscope.sae import SAEConfig, TrainConfig, fit_sae
            from mechscope.sae.data import PartitionedSource

            steps = int(os.environ.get("DIST_STEPS", 300))
            src = PartitionedSource.from_shards(folder, 2048, 0, dist)
            cfg = SAEConfig(d_in=576, d_sae=4608, architecture="topk", k=32, hook_name=HOOK)
            tc = TrainConfig(steps=steps, batch_size=2048, lr=1e-3, partitions=0)
            fit_sae(src, cfg, TrainConfig(**{**tc.__dict__, "steps": 5}), progress=False, dist=dist)  # warm-up
            src = PartitionedSource.from_shards(folder, 2048, 0, dist)
            dist.barrier()
            t0 = time.perf_counter()
            res = fit_sae(src, cfg, tc, progress=False, dist=dist)
            dist.barrier()
            dt = time.perf_counter() - t0
            if dist.is_main:
                print(json.dumps({"tokens_per_s": res.tokens_seen / dt, "seconds": dt, "world": dist.world}))
        elif task == "sweep":
            import mechscope
            from mechscope import datasets
            from mechscope.sweeps import sharded_patch

            model = mechscope.load("smollm2-135m")
            ds = datasets.ioi(model, int(os.environ.get("DIST_PROMPTS", 16)), seed=0)
            a, b = model.to_single_token(" Mary"), model.to_single_token(" John")
            dist.barrier()
            t0 = time.perf_counter()
            sharded_patch(model, ds.clean, ds.corrupted, ("logit_diff", a, b), site="z",
                          folder=Path(folder) / f"sweep-{dist.world}", shard_size=4, dist=dist, progress=False)
            dt = time.perf_counter() - t0
            if dist.is_main:
                print(json.dumps({"prompts_per_s": ds.clean.shape[0] / dt, "seconds": dt, "world": dist.world}))


def many_saes(tmp: Path) -> None:
    """Part 3, in this process: lockstep against one after another (each measured in a fresh process for memory)."""
    for mode in ("lockstep", "sequential", "stored"):
        r = subprocess.run([sys.executable, __file__, "many", mode], capture_output=True, text=True,
                           env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if r.returncode:
            raise SystemExit(r.stderr[-4000:])
        yield mode, json.loads(r.stdout.strip().splitlines()[-1])


def many(mode: str) -> None:
    import torch

    import mechscope
    from mechscope import corpus
    from mechscope.compute import peak_rss
    from mechscope.sae import SAEConfig, TrainConfig, harvest, train_many, train_sae_sweep

    model = mechscope.load("smollm2-135m")
    toks = corpus.pack(model, corpus.default_corpus("train"), 128, n_seqs=96)
    hooks = [f"blocks.{l}.hook_resid_post" for l in (6, 12, 18, 24)]
    cfgs = [SAEConfig(d_in=576, d_sae=2304, architecture="topk", k=32, hook_name=h) for h in hooks]
    tc = TrainConfig(steps=40, batch_size=1024, lr=1e-3)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    if mode == "lockstep":
        res = train_many(model, toks, cfgs, tc, seqs_per_chunk=16, progress=False)
    elif mode == "sequential":
        res = [train_many(model, toks, [c], tc, seqs_per_chunk=16, progress=False)[0] for c in cfgs]
    else:  # one stored harvest per hook, then a sweep over it (the pre-streaming way)
        res = []
        for c in cfgs:
            acts = harvest(model, c.hook_name, toks)
            res += [train_sae_sweep(acts, [c], tc, progress=False)[0]]
            del acts
    dt = time.perf_counter() - t0
    tokens = sum(getattr(r, "tokens_seen", tc.steps * tc.batch_size) for r in res)
    print(json.dumps({"seconds": dt, "tokens_per_s": tokens / dt,
                      "peak_gib": peak_rss() / 2**30}))


def main(only: str | None = None) -> None:
    import mechscope
    from mechscope import corpus
    from mechscope.sae import harvest_to_disk

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = mechscope.load("smollm2-135m")
        toks = corpus.pack(model, corpus.default_corpus("train"), 128, n_seqs=64)
        t0 = time.perf_counter()
        harvest_to_disk(model, HOOK, toks, tmp / "acts", seqs_per_shard=16)
        print(f"harvested {toks.numel()} tokens of {HOOK} into 4 shards in {time.perf_counter() - t0:.1f} s\n")
        del model

        for name, part in (("sae", _part1), ("sweep", _part2), ("many", _part3)):
            if only in (None, name):
                part(tmp)
        print("\nOn 2 cores the 2-rank figures show the cost of the collectives and the split, not added hardware.")


def _part1(tmp: Path) -> None:
    print("1. data-parallel SAE training (TopK, 4608 latents, k=32, global batch 2048)")
    one1 = _torchrun(1, ["worker", "sae", str(tmp / "acts")], threads=1)
    one2 = _torchrun(1, ["worker", "sae", str(tmp / "acts")], threads=2)
    two = _torchrun(2, ["worker", "sae", str(tmp / "acts")], threads=1)
    for name, r in (("1 rank, 1 thread", one1), ("1 rank, 2 threads", one2), ("2 ranks x 1 thread", two)):
        print(f"  {name:20s} {r['tokens_per_s']:9.0f} tokens/s ({r['seconds']:.1f} s)")
    print(f"  scaling efficiency, 2 ranks vs 1 rank x 1 thread: {two['tokens_per_s'] / one1['tokens_per_s'] / 2:.2f}"
          f"; vs the whole machine in one process: {two['tokens_per_s'] / one2['tokens_per_s']:.2f}x\n")


def _part2(tmp: Path) -> None:
    print("2. sharded patching sweep (IOI, every head)")
    s1 = _torchrun(1, ["worker", "sweep", str(tmp)], threads=2)
    s2 = _torchrun(2, ["worker", "sweep", str(tmp)], threads=1)
    print(f"  1 process, 2 threads  {s1['prompts_per_s']:.2f} prompts/s ({s1['seconds']:.1f} s)")
    print(f"  2 ranks x 1 thread    {s2['prompts_per_s']:.2f} prompts/s ({s2['seconds']:.1f} s)"
          f"  -> {s2['prompts_per_s'] / s1['prompts_per_s']:.2f}x the one-process rate\n")


def _part3(tmp: Path) -> None:
    print("3. four TopK SAEs (2304 latents) on four hooks (layers 6, 12, 18, 24), 40 steps of 1024 each")
    got = dict(many_saes(tmp))
    for mode, r in got.items():
        print(f"  {mode:10s} {r['tokens_per_s']:8.0f} SAE-tokens/s ({r['seconds']:.1f} s), peak {r['peak_gib']:.2f} GiB")
    ratio = got["lockstep"]["tokens_per_s"] / got["sequential"]["tokens_per_s"]
    print(f"  lockstep vs one after another: {ratio:.2f}x (goal >= 1.8x: {'met' if ratio >= 1.8 else 'NOT met'})")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        worker(sys.argv[2], sys.argv[3])
    elif len(sys.argv) > 1 and sys.argv[1] == "many":
        many(sys.argv[2])
    else:
        main(sys.argv[2] if len(sys.argv) > 2 and sys.argv[1] == "--only" else None)
