"""Attribution graphs on the default model (SmolLM2-135M, CPU): the 60 s budget for a 10-token prompt.

1. The whole graph (clean pass, every row up to ``max_feature_nodes`` = 7,500, the certificate) for a
   10-token prompt, with the transcoders in ``$MECHSCOPE_CACHE/transcoders/smollm2-135m`` when
   ``mechscope transcoders train`` has put them there, else random ones of the same shape (2,304
   latents, k = 32, skip; the cost does not depend on training, only on how many features fire).
2. Rows from batched backward passes against one row per backward pass (the same rows, same run):
   the ratio says what batching buys; and 128 rows drawn across the layers in one backward pass against passes of
   rows of similar depth (``RowEngine.rows``; a batched pass runs every row from its deepest target down).
3. The graph's edge certificate (worst error of sampled edges against perturbations), and the work table: each
   stage's forward token-layers and the rows' backward token-layers, each against its floor.
4. Memory, in two regimes: capped at 7,500 features and with every active feature traced, each graph built in
   a fresh process (bench/_graph_run.py): its peak resident memory (and the memory after loading, so the graph's
   own share shows), its file size, against the dense ``[nodes, nodes]`` float32 adjacency the sparse storage
   replaced (circuit-tracer's layout; bench/bench_circuit_tracer.py measures circuit-tracer itself).

Environment: GRAPH_MAX (max_feature_nodes, default 7500), GRAPH_ONE_BY_ONE (rows for the baseline, default 64).
Usage: python bench/bench_graph.py
"""

from __future__ import annotations

import os
import time

import torch

import mechscope as ms
from mechscope.core.work import WorkMeter
from mechscope.graphs import ReplacementModel, attribution_graph
from mechscope.graphs.attribute import RowEngine, active_features, depth_groups
from mechscope.sae import SAE, SAEConfig, load_transcoders, transcoder_cache

PROMPT = "Fact: the capital of the state containing Dallas is"


def transcoders(model: ms.HookedModel) -> tuple[list[SAE], str]:
    folder = transcoder_cache(model.cfg.model_name)
    if folder.is_dir():
        tcs = load_transcoders(folder, model)
        if len(tcs) == model.cfg.n_layers:
            return tcs, f"trained ({folder})"
    d = model.cfg.d_model
    return [SAE(SAEConfig(d_in=d, d_sae=4 * d, architecture="topk", k=32, hook_name=f"blocks.{i}.ln2.hook_normalized",
                          hook_name_out=f"blocks.{i}.hook_mlp_out", skip=True), seed=i)
            for i in range(model.cfg.n_layers)], "random (none trained in the cache)"


def main() -> None:
    model = ms.load("smollm2-135m")
    tcs, where = transcoders(model)
    toks = model.to_tokens(PROMPT)
    print(f"prompt: {PROMPT!r} ({toks.shape[1]} tokens); transcoders: {len(tcs)} layers, {where}")
    cap = int(os.environ.get("GRAPH_MAX", 7500))
    t0 = time.perf_counter()
    with WorkMeter(model) as meter:
        g = attribution_graph(model, tcs, toks, max_feature_nodes=cap, progress=False)
    total = time.perf_counter() - t0
    print(g.summary())
    print(f"graph: {total:.1f} s for {g.stats['feature_nodes']} feature rows + {len(g.nodes_of(3))} logit rows "
          f"(budget 60 s: {'met' if total <= 60 else 'NOT met'}; ratio {total / 60:.2f})")
    pruned = g.prune()
    print(pruned.summary())
    print(meter.log.summary())  # each stage against its floor; the rows' backward work against theirs

    n = int(os.environ.get("GRAPH_ONE_BY_ONE", 64))
    rm = ReplacementModel(model, tcs, toks)
    eng = RowEngine(rm, active_features(rm))
    targets = [("feature", int(a), int(b), int(c)) for a, b, c in eng.src.feats[-n:]]
    t0 = time.perf_counter()
    batched = eng._rows(targets)
    t_batched = time.perf_counter() - t0
    t0 = time.perf_counter()
    single = torch.cat([eng.rows([t]) for t in targets])
    t_single = time.perf_counter() - t0
    print(f"{n} rows: one batched backward pass {t_batched:.2f} s, one pass per row {t_single:.2f} s "
          f"(batched is {t_single / t_batched:.1f}x faster; largest difference {float((batched - single).abs().max()):.1e})")
    mixed_depths(eng)
    memory(model, tcs, toks, cap)


def mixed_depths(eng: RowEngine, n: int = 128) -> None:
    """A batch of rows drawn across every layer, as the influence order makes them: one backward pass for all
    against passes of rows of similar depth (``RowEngine.rows``), alternated twice, the faster of each."""
    pick = torch.randperm(eng.src.n_feats, generator=torch.Generator().manual_seed(0))[:n]
    targets = [("feature", int(a), int(b), int(c)) for a, b, c in eng.src.feats[pick]]
    depths = [eng.depth(t) for t in targets]
    groups = depth_groups(depths, eng.rm.n_pos)
    best = {"one": float("inf"), "grouped": float("inf")}
    for _ in range(2):
        for name, fn in (("one", eng._rows), ("grouped", eng.rows)):
            t0 = time.perf_counter()
            fn(targets)
            best[name] = min(best[name], time.perf_counter() - t0)
    one, grouped = eng._rows(targets), eng.rows(targets)
    P = eng.rm.n_pos
    run_one = n * P * max(depths)
    run_grouped = sum(len(g) * P * max(depths[i] for i in g) for g in groups)
    print(f"{n} rows across layers (depths {min(depths)}-{max(depths)}): one backward pass {best['one']:.2f} s "
          f"({run_one / (P * sum(depths)):.2f}x the backward floor), {len(groups)} passes by depth {best['grouped']:.2f} s "
          f"({run_grouped / (P * sum(depths)):.2f}x): {best['grouped'] / best['one']:.2f}x the time; largest difference "
          f"{float((grouped - one).abs().max()):.1e}")


def memory(model: ms.HookedModel, tcs: list[SAE], toks: torch.Tensor, cap: int) -> None:
    """Peak memory and file size of both regimes, each graph in a fresh process."""
    import json
    import tempfile
    from pathlib import Path

    from _graph_run import run
    from mechscope.sae import save_sae

    work = Path(tempfile.mkdtemp(prefix="bench-graph-"))
    (work / "job.json").write_text(json.dumps({"tokens": toks[0].tolist()}))
    for tc in tcs:
        save_sae(tc, work / "ms_transcoders" / f"layer_{tc.cfg.hook_name_out.split('.')[1]}")
    for name, c in ((f"capped at {cap:,} features", cap), ("every active feature", 0)):
        r = run(work, c)
        dense = r["nodes"] ** 2 * 4
        print(f"{name}: {r['features']:,} features, {r['edges']:,} edges; {r['seconds']:.1f} s; peak resident memory "
              f"{r['peak_rss_gib']:.2f} GiB ({r['peak_rss_gib'] - r['rss_loaded_gib']:.2f} GiB above the loaded model "
              f"and transcoders); file {r['file_bytes'] / 2**20:.0f} MiB (12 bytes an edge), against "
              f"{dense / 2**20:.0f} MiB for the dense float32 adjacency of its {r['nodes']:,} nodes "
              f"(sparse/dense: {r['file_bytes'] / dense:.2f})")


if __name__ == "__main__":
    main()
