"""Attribution graphs on long prompts: peak memory and time against the prompt's length (`make bench-long-prompt`).

Each graph is built in a fresh process (bench/_graph_run.py's pattern: its peak resident memory, VmHWM, is its
own) on SmolLM2-135M with random JumpReLU per-layer transcoders on every layer (BENCH_K, default 16, features per
token and layer), ``max_feature_nodes`` BENCH_ROWS (default 2048) and ``edge_tolerance`` 1e-3: rows are stored
sparsely as they are computed and the tolerance drops each row's small edges as it goes, the batch of rows
shrinks to fit 2 GiB (``batch_bytes``), and each active feature's decoder row is held once. circuit-tracer's
users ask for this (its issue #92: a dense adjacency overflows); this states the largest prompt within 8 GiB here.
Lengths: BENCH_LENGTHS (default "128 256 512 1024"); threads: BENCH_THREADS (default 2); text: the standard library's
docstrings, concatenated.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
LIMIT_GIB = 8.0

CHILD = r'''
import json, sys, time, torch
sys.path.insert(0, sys.argv[1])
from _graph_run import rss_gib
import os; torch.set_num_threads(int(os.environ.get("BENCH_THREADS", 2)))
import mechscope as ms
from mechscope.graphs import attribution_graph
from mechscope.sae import load_transcoders
model = ms.load("smollm2-135m")
job = json.loads(open(sys.argv[2]).read())
tcs = load_transcoders(job["folder"], model)
tokens = torch.tensor([job["tokens"]])
loaded = rss_gib()
t0 = time.perf_counter()
g = attribution_graph(model, tcs, tokens, max_feature_nodes=job["rows"], edge_tolerance=1e-3, certify=8,
                      progress=False, prepend_bos=False)
print(json.dumps({"seconds": time.perf_counter() - t0, "peak_gib": rss_gib("VmHWM"), "loaded_gib": loaded,
                  "active": g.stats["active_features"], "edges": g.n_edges, "batch": g.stats["batch_size"],
                  "dropped_weight": g.stats["edge_weight_dropped"], "certificate": g.certificate["worst_rel"],
                  "dropped_influence": g.stats["dropped_influence"]}))
'''


def main() -> None:
    import mechscope as ms
    from mechscope import corpus
    from mechscope.sae import save_sae

    sys.path.insert(0, str(HERE))
    from bench_circuit_tracer import random_transcoders

    k, rows = int(os.environ.get("BENCH_K", 16)), int(os.environ.get("BENCH_ROWS", 2048))
    lengths = [int(x) for x in os.environ.get("BENCH_LENGTHS", "128 256 512 1024").split()]
    model = ms.load("smollm2-135m")
    text = " ".join(corpus.default_corpus("test"))
    ids = model.to_tokens(text, prepend_bos=False)[0]
    work = Path(tempfile.mkdtemp(prefix="long-prompt-"))
    tcs = random_transcoders(model, ids[None, :256], k)
    for tc in tcs:
        save_sae(tc, work / "tc" / f"layer_{tc.cfg.hook_name_out.split('.')[1]}")
    print(f"SmolLM2-135M, random JumpReLU transcoders on all 30 layers (about {k} features per token and layer), "
          f"{rows} feature rows, edge_tolerance 1e-3, batches within 2 GiB; each graph in a fresh process, 2 threads")
    fits = None
    for n in lengths:
        job = work / f"job_{n}.json"
        job.write_text(json.dumps({"folder": str(work / "tc"), "tokens": ids[:n].tolist(), "rows": rows}))
        r = subprocess.run([sys.executable, "-c", CHILD, str(HERE), str(job)], capture_output=True, text=True,
                           env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if r.returncode:
            print(f"{n:5d} tokens: failed ({r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode})")
            break
        d = json.loads(r.stdout.strip().splitlines()[-1])
        above = d["peak_gib"] - d["loaded_gib"]
        print(f"{n:5d} tokens: {d['active']:,} active features, peak {d['peak_gib']:.2f} GiB ({above:.2f} above the "
              f"loaded model and transcoders), {d['seconds']:.0f} s, {d['edges']:,} "
              f"edges kept ({d['dropped_weight']:.1%} of the edge weight under the tolerance), batch {d['batch']}, "
              f"certificate {d['certificate']:.1e}, influence left out by the row cap {d['dropped_influence']:.1%}",
              flush=True)
        if d["peak_gib"] <= LIMIT_GIB:
            fits = n
    print(f"largest prompt measured within {LIMIT_GIB:.0f} GiB: {fits} tokens" if fits else
          f"no prompt measured fits within {LIMIT_GIB:.0f} GiB")


if __name__ == "__main__":
    main()
