"""`mechscope circuit` and `mechscope investigate` (--task ioi --n 100) on SmolLM2-135M: wall time by stage and
peak memory, against the baseline.

Each configuration runs in a fresh process (the CLI's own ``main``), which reports its own peak resident memory
(``mechscope.compute.peak_rss``: VmHWM, this process's high-water mark) and the time at which each stage line
appeared on stderr. The baseline is the circuit command with CPU batches sized by free memory alone
(``MECHSCOPE_CPU_BATCH_TOKENS=0``, the behaviour before the compute cap), and the circuit command with one forward
pass per ablation (``MECHSCOPE_STACK_TOKENS=0``, before ablations were stacked), measured in the same run; investigate
runs with ``--fresh`` (no stored stage reused) into a temporary folder, and again with
``MECHSCOPE_SHARE_PAIRS=0`` (each split patches its heads and MLPs on its own, the path before per-pair sharing)
as its baseline. Each run also prints its work per stage
(``--json``'s work log, :mod:`mechscope.core.work`): the token-layers each stage ran against the floor its answer
needs, and the ratio. The goals: `circuit` at most 60 s,
`investigate` (no SAE, no graph) at most 120 s, both at most 4 GB. Run alone: other work changes every figure.

    python bench/bench_circuit.py [--n 100] [--extra "--screen 64"] [--skip-investigate | --investigate-only]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
from mechscope.cli import main
from mechscope.compute import peak_rss
rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, "peak_rss": peak_rss(), "seconds": time.perf_counter() - t0}), file=sys.stderr)
"""

THROUGHPUT = r"""
import json, sys, time, torch
import mechscope
from mechscope.core.work import WorkMeter
m = mechscope.load(mechscope.DEFAULT_MODEL)
t = torch.randint(100, 10000, (64, 32))
with torch.no_grad(), WorkMeter(m) as w:
    m(t)
    t0 = time.perf_counter()
    for _ in range(3):
        m(t)
    s = time.perf_counter() - t0
print(json.dumps({"token_layers_per_s": (w.token_layers * 3 / 4) / s}))
"""


def throughput(env: dict) -> float:
    """Token-layers a second of one plain batched forward pass (64 x 32 tokens) here: what a floor costs in time."""
    r = subprocess.run([sys.executable, "-c", THROUGHPUT], capture_output=True, text=True, env=env)
    return json.loads(r.stdout.strip().splitlines()[-1])["token_layers_per_s"]


def run(args: list[str], env: dict) -> dict:
    """One run: stage lines with their arrival time, the child's peak RSS and total seconds."""
    t0 = time.perf_counter()
    out = tempfile.TemporaryFile("w+")
    p = subprocess.Popen([sys.executable, "-c", CHILD, *args, "--json"], stdout=out, stderr=subprocess.PIPE,
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
    out.seek(0)
    data = json.loads(out.read())
    work = data.get("work") or data.get("metrics", {}).get("work") or {"stages": []}  # circuit / investigate
    return {**last, "stages": stages, "work": work}


def work_table(work: dict, per_s: float) -> list[str]:
    """Each metered stage's token-layers against its floor (mechscope.core.work), and its time against the time its
    floor takes at a plain forward pass's throughput ``per_s``; and the total."""
    rows = [(w["name"], w["seconds"], w["token_layers"], w["floor"]) for w in work["stages"]]
    rows.append(("total (with the work outside the stages)", sum(r[1] for r in rows), work["token_layers"],
                 work["floor"]))
    return [f"    {n:<44} {s:7.1f} s {t:>12,} token-layers, floor {f:>12,} "
            + (f"{t / f:5.2f}x; time {s / (f / per_s):5.1f}x the floor's {f / per_s:5.1f} s" if f
               else "(no floor claimed)") for n, s, t, f in rows]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--extra", default="", help="more circuit options, e.g. '--screen 64'")
    ap.add_argument("--skip-investigate", action="store_true")
    ap.add_argument("--investigate-only", action="store_true", help="only investigate and its baseline")
    a = ap.parse_args()
    argv = ["circuit", "--task", "ioi", "--n", str(a.n), *a.extra.split()]
    base_env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    base_env.pop("MECHSCOPE_CPU_BATCH_TOKENS", None)
    out = tempfile.mkdtemp(prefix="bench-investigate-")
    runs = [("circuit (default)", argv, {}), ("baseline: circuit, batches by free memory", argv,
                                              {"MECHSCOPE_CPU_BATCH_TOKENS": "0"}),
            ("baseline: circuit, one forward pass per ablation", argv, {"MECHSCOPE_STACK_TOKENS": "0"})]
    if not a.skip_investigate:
        inv = ["investigate", "--task", "ioi", "--n", str(a.n), "--fresh", "--out"]
        runs += [("investigate (no SAE, no graph)", inv + [out + "/shared"], {}),
                 ("baseline: investigate, each split patched on its own", inv + [out + "/own"],
                  {"MECHSCOPE_SHARE_PAIRS": "0"})]
    if a.investigate_only:
        runs = runs[3:]
    per_s = throughput(base_env)
    print(f"a plain forward pass (64 x 32 tokens, batched): {per_s:,.0f} token-layers a second here; a floor's time is "
          "its token-layers at that rate")
    res = {}
    for name, args, env in runs:
        res[name] = r = run(args, {**base_env, **env})
        print(f"{name}: {r['seconds']:.1f} s wall, peak RSS {r['peak_rss'] / 2**30:.2f} GiB")
        prev = 0.0
        for t, line in r["stages"]:
            print(f"    +{t - prev:6.1f} s  (at {t:6.1f} s)  {line}")
            prev = t
        print("  work per stage (token-layers: tokens x blocks run forward; floor: what the answer needs):")
        print("\n".join(work_table(r["work"], per_s)))
    goals = []
    if not a.investigate_only:
        new, old = res["circuit (default)"], res["baseline: circuit, batches by free memory"]
        print(f"ratio circuit (default / baseline): time {new['seconds'] / old['seconds']:.2f}x, "
              f"peak memory {new['peak_rss'] / old['peak_rss']:.2f}x")
        one = res["baseline: circuit, one forward pass per ablation"]
        print(f"ratio circuit (stacked ablations / one pass per ablation): time {new['seconds'] / one['seconds']:.2f}x")
        goals.append(("circuit", new, 60))
    if not a.skip_investigate:
        inv, own = res["investigate (no SAE, no graph)"], res["baseline: investigate, each split patched on its own"]
        print(f"ratio investigate (pairs shared by the splits / each split patched on its own): time "
              f"{inv['seconds'] / own['seconds']:.2f}x, token-layers "
              f"{inv['work']['token_layers'] / max(1, own['work']['token_layers']):.2f}x")
        if not a.investigate_only:
            print(f"ratio investigate / circuit (default): time {inv['seconds'] / new['seconds']:.2f}x")
        goals.append(("investigate", inv, 120))
    for name, r, limit in goals:
        print(f"goals, {name}: <= {limit} s: {'met' if r['seconds'] <= limit else 'NOT met'} ({r['seconds']:.0f} s, "
              f"{os.cpu_count()} cores); peak <= 4 GiB: {'met' if r['peak_rss'] <= 4 * 2**30 else 'NOT met'} "
              f"({r['peak_rss'] / 2**30:.2f} GiB)")


if __name__ == "__main__":
    main()
