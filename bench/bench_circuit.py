"""`mechscope circuit` and `mechscope investigate` (--task ioi --n 100) on SmolLM2-135M: wall time by stage and
peak memory, against the baseline.

Each configuration runs in a fresh process (the CLI's own ``main``), which reports its own peak resident memory
(``mechscope.compute.peak_rss``: VmHWM, this process's high-water mark) and the time at which each stage line
appeared on stderr. The baseline is the circuit command with CPU batches sized by free memory alone
(``MECHSCOPE_CPU_BATCH_TOKENS=0``, the behaviour before the compute cap), and the circuit command with one forward
pass per ablation (``MECHSCOPE_STACK_TOKENS=0``, before ablations were stacked), measured in the same run; investigate
runs with ``--fresh`` (no stored stage reused) into a temporary folder. The goals: `circuit` at most 60 s,
`investigate` (no SAE, no graph) at most 120 s, both at most 4 GB. Run alone: other work changes every figure.

    python bench/bench_circuit.py [--n 100] [--extra "--screen 64"] [--skip-investigate]
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
        elif any(k in line for k in ("find_circuit", "investigate", "edge_circuit")) or line.startswith("loaded"):
            stages.append((time.perf_counter() - t0, line[:90]))
    p.wait()
    if last is None or last["rc"] != 0:
        raise SystemExit(f"the run failed (exit {p.returncode}): {args}")
    return {**last, "stages": stages}


def main() -> None:
    import tempfile

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--extra", default="", help="more circuit options, e.g. '--screen 64'")
    ap.add_argument("--skip-investigate", action="store_true")
    a = ap.parse_args()
    argv = ["circuit", "--task", "ioi", "--n", str(a.n), *a.extra.split()]
    base_env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    base_env.pop("MECHSCOPE_CPU_BATCH_TOKENS", None)
    out = tempfile.mkdtemp(prefix="bench-investigate-")
    runs = [("circuit (default)", argv, {}), ("baseline: circuit, batches by free memory", argv,
                                              {"MECHSCOPE_CPU_BATCH_TOKENS": "0"}),
            ("baseline: circuit, one forward pass per ablation", argv, {"MECHSCOPE_STACK_TOKENS": "0"})]
    if not a.skip_investigate:
        runs.append(("investigate (no SAE, no graph)", ["investigate", "--task", "ioi", "--n", str(a.n), "--fresh",
                                                        "--out", out], {}))
    res = {}
    for name, args, env in runs:
        res[name] = r = run(args, {**base_env, **env})
        print(f"{name}: {r['seconds']:.1f} s wall, peak RSS {r['peak_rss'] / 2**30:.2f} GiB")
        prev = 0.0
        for t, line in r["stages"]:
            print(f"    +{t - prev:6.1f} s  (at {t:6.1f} s)  {line}")
            prev = t
    new, old = res["circuit (default)"], res["baseline: circuit, batches by free memory"]
    print(f"ratio circuit (default / baseline): time {new['seconds'] / old['seconds']:.2f}x, "
          f"peak memory {new['peak_rss'] / old['peak_rss']:.2f}x")
    one = res["baseline: circuit, one forward pass per ablation"]
    print(f"ratio circuit (stacked ablations / one pass per ablation): time {new['seconds'] / one['seconds']:.2f}x")
    goals = [("circuit", new, 60)]
    if not a.skip_investigate:
        inv = res["investigate (no SAE, no graph)"]
        print(f"ratio investigate / circuit (default): time {inv['seconds'] / new['seconds']:.2f}x")
        goals.append(("investigate", inv, 120))
    for name, r, limit in goals:
        print(f"goals, {name}: <= {limit} s: {'met' if r['seconds'] <= limit else 'NOT met'} ({r['seconds']:.0f} s, "
              f"{os.cpu_count()} cores); peak <= 4 GiB: {'met' if r['peak_rss'] <= 4 * 2**30 else 'NOT met'} "
              f"({r['peak_rss'] / 2**30:.2f} GiB)")


if __name__ == "__main__":
    main()
