"""One mechscope attribution graph in a fresh process, so that its peak memory is its own (used by
bench/bench_graph.py and bench/bench_circuit_tracer.py).

Usage: python bench/_graph_run.py WORK CAP [NAME]. Reads WORK/job.json (``tokens``) and the replacement in
WORK/NAME (default ms_transcoders: per-layer transcoders, or a CLT in circuit-tracer's layout, read with
load_replacement, decoders lazily); CAP is max_feature_nodes (0: every active feature). Writes the graph to
WORK/ms_graph[_NAME]_CAP.safetensors and prints one JSON line: seconds, the resident memory after loading and at
its peak (GiB), the file's bytes, edges and feature nodes.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch


def rss_gib(field: str = "VmRSS") -> float:
    """This process's resident memory (``VmHWM``: its peak), GiB. Not ``ru_maxrss``, which a child started from a
    large parent inherits from the fork."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 2**20


def main(work: Path, cap: int, name: str = "ms_transcoders") -> None:
    import mechscope as ms
    from mechscope.graphs import attribution_graph
    from mechscope.sae import load_replacement

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", 2)))
    model = ms.load("smollm2-135m")
    tokens = torch.tensor([json.loads((work / "job.json").read_text())["tokens"]])
    tcs = load_replacement(work / name, model)
    loaded = rss_gib()
    t0 = time.perf_counter()
    g = attribution_graph(model, tcs, tokens, max_feature_nodes=cap or 10**9, certify=0, progress=False)
    sec = time.perf_counter() - t0
    suffix = "" if name == "ms_transcoders" else f"_{name}"
    path = g.save(work / f"ms_graph{suffix}_{cap}.safetensors")
    print(json.dumps({"seconds": sec, "rss_loaded_gib": loaded,
                      "peak_rss_gib": rss_gib("VmHWM"),
                      "file_bytes": path.stat().st_size, "edges": g.n_edges, "features": int((g.kind == 0).sum()),
                      "nodes": g.n_nodes}))


def run(work: Path, cap: int, name: str = "ms_transcoders") -> dict:
    """:func:`main` in a subprocess; its JSON line as a dict."""
    import subprocess

    r = subprocess.run([sys.executable, __file__, str(work), str(cap), name], capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if r.returncode:
        raise SystemExit(f"the mechscope graph process failed:\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), *sys.argv[3:4])
