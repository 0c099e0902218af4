"""`mechscope circuit --task ioi --n 100` on SmolLM2-135M: wall time by stage and peak memory, against the baseline.

Each configuration runs in a fresh process (the CLI's own ``main``), which reports its own peak resident memory
(``mechscope.compute.peak_rss``: VmHWM, this process's high-water mark) and the time at which each stage line
appeared on stderr. The baseline is the same command with CPU batches sized by free memory alone
(``MECHSCOPE_CPU_BATCH_TOKENS=0``, the behaviour before the compute cap), measured in the same run.
The issue's goals: at most 4 GB peak, and the same time or better (the circuit command's goal is 60 s).
Run alone: other work on the machine changes both figures.

    python bench/bench_circuit.py [--n 100] [--extra "--screen 64"]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
from mechscope.cli import main
from mechscope.compute import peak_rss
rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, "peak_rss": peak_rss(), "seconds": time.perf_counter() - t0}), file=sys.stderr)
"""


def run(args: list[str], env: dict) -> dict:
    """One run: stage lines with their arrival time, the child's peak RSS and total seconds."""
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-c", CHILD, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True, env=env)
    stages, last = [], None
    for line in p.stderr:
        line = line.rstrip().split("\r")[-1]  # tqdm redraws with carriage returns
        if line.startswith("{") and '"peak_rss"' in line:
            last = json.loads(line)
        elif "find_circuit" in line or line.startswith("loaded"):
            stages.append((time.perf_counter() - t0, line[:90]))
    p.wait()
    if last is None or last["rc"] != 0:
        raise SystemExit(f"the run failed (exit {p.returncode}): {args}")
    return {**last, "stages": stages}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--extra", default="", help="more circuit options, e.g. '--screen 64'")
    a = ap.parse_args()
    argv = ["circuit", "--task", "ioi", "--n", str(a.n), *a.extra.split()]
    base_env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = {}
    for name, cap in (("compute-capped batches (default)", None), ("baseline: batches by free memory", "0")):
        env = dict(base_env)
        if cap is not None:
            env["MECHSCOPE_CPU_BATCH_TOKENS"] = cap
        else:
            env.pop("MECHSCOPE_CPU_BATCH_TOKENS", None)
        res[name] = r = run(argv, env)
        print(f"{name}: {r['seconds']:.1f} s wall, peak RSS {r['peak_rss'] / 2**30:.2f} GiB")
        prev = 0.0
        for t, line in r["stages"]:
            print(f"    +{t - prev:6.1f} s  (at {t:6.1f} s)  {line}")
            prev = t
    new, old = res["compute-capped batches (default)"], res["baseline: batches by free memory"]
    print(f"ratio (default / baseline): time {new['seconds'] / old['seconds']:.2f}x, "
          f"peak memory {new['peak_rss'] / old['peak_rss']:.2f}x")
    print(f"goals: peak <= 4 GiB: {'met' if new['peak_rss'] <= 4 * 2**30 else 'NOT met'} "
          f"({new['peak_rss'] / 2**30:.2f} GiB); `circuit` <= 60 s: {'met' if new['seconds'] <= 60 else 'NOT met'} "
          f"({new['seconds']:.0f} s, {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
