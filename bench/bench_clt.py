"""Cross-layer against per-layer transcoders on SmolLM2-135M, at the same total number of features and the same L0 per
token: `make bench-clt` (about 2 h on 2 cores with the defaults; resumable).

Both are trained by the same code on the same rows (one harvest of every layer's hook_resid_mid and hook_mlp_out):
a CLT (``reach`` 0: each layer's features write into every later MLP output) and a per-layer set (``reach`` 1), each
``--width`` features per layer, BatchTopK with ``k`` active per layer and token (so the same L0 per token, L x k),
saved as JumpReLU thresholds. For each ``k`` and each seed (data order and initialisation) it reports

- NMSE per layer (normalised MSE of each MLP output on held-out text, from the model's own inputs) and the CE loss
  with every MLP replaced at once;
- the replacement and completeness scores of attribution graphs on IOI and capital-city prompts, and their mean path
  length (the influence-weighted number of edges from the token embeddings to the logits).

Ameisen et al. 2025 report that CLTs give better replacement scores and shorter paths at the same sparsity; the
bench prints what comes out, whichever way it goes, with the spread over seeds. Results go to
``$MECHSCOPE_CACHE/bench_clt/results.json`` (a rerun skips the runs it has) and a figure ``clt_vs_plt.png`` beside it;
the last CLT trained is kept at ``$MECHSCOPE_CACHE/transcoders/smollm2-135m-clt/clt`` for bench/bench_circuit_tracer.py.

Options: --width, --k (a list), --seeds (a list), --steps, --batch, --lr, --seqs, --seq-len, --input
(resid_mid, as Ameisen et al.'s transcoders read the residual stream; or mlp_in), --max-features (graph rows),
--fresh. CPU note: glibc's page faults on the large per-step tensors cost about a third of a step; the bench sets
M_MMAP_THRESHOLD high (mallopt) so freed blocks are reused. Run nothing else beside it.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import time
from pathlib import Path

import torch

from _results import results_file

IOI = ["When Mary and John went to the store, John gave a drink to",
       "When Tom and Sarah went to the park, Sarah gave a ball to",
       "After Lisa and Mark met at the cafe, Mark handed a cup to"]
CAPITALS = ["The capital of France is", "Fact: the capital of the state containing Dallas is",
            "The capital of Japan is"]


def args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--k", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seqs", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--input", default="resid_mid", choices=["resid_mid", "mlp_in"])
    p.add_argument("--max-features", type=int, default=4096)
    p.add_argument("--fresh", action="store_true")
    return p.parse_args()


def graph_metrics(model, rep, prompts: list[str], cap: int) -> dict:
    from mechscope.graphs import attribution_graph

    out = []
    for text in prompts:
        g = attribution_graph(model, rep, text, max_feature_nodes=cap, certify=8, progress=False)
        sc = g.scores()
        out.append({"replacement": sc["replacement"], "completeness": sc["completeness"],
                    "path_length": g.mean_path_length(), "certificate": g.certificate["worst_rel"],
                    "active": g.stats["active_features"], "dropped_influence": g.stats["dropped_influence"]})
    return {k: sum(o[k] for o in out) / len(out) for k in out[0]} | {"per_prompt": out}


def main() -> None:
    a = args()
    try:  # keep freed large blocks for reuse instead of returning them to the OS (page faults every step otherwise)
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 2**31 - 1)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD
    except OSError:
        pass
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", 2)))
    import mechscope as ms
    import mechscope.graphs  # noqa: F401 - imported before the hours of training, whatever changes on disk meanwhile
    from mechscope import corpus
    from mechscope.sae import TrainConfig, clt_config, evaluate_clt, fit_sae, save_replacement, transcoder_cache
    from mechscope.sae.clt_train import clt_activations
    from mechscope.sae.data import PartitionedSource, default_partitions

    model = ms.load("smollm2-135m")
    out, res_path, results = results_file("bench_clt", a.fresh)
    texts, desc = corpus.from_spec(None, "train")
    toks = corpus.pack(model, texts, a.seq_len, n_seqs=a.seqs, source=desc)
    held_texts, _ = corpus.from_spec(None, "test")
    held = corpus.pack(model, held_texts, a.seq_len, n_seqs=16, source=desc)
    print(f"SmolLM2-135M, {model.cfg.n_layers} layers; {toks.numel()} training tokens ({desc}), {held.numel()} held out; "
          f"width {a.width} per layer ({a.width * model.cfg.n_layers} features in all), BatchTopK, {a.steps} steps of "
          f"{a.batch}, lr {a.lr}, encoders reading {a.input}; 2 threads")
    base = clt_config(model, a.width, input=a.input, architecture="batchtopk", k=a.k[0])
    parts = default_partitions(toks.shape[0], a.batch)
    t0 = time.perf_counter()
    rows = clt_activations(model, base, toks, parts)
    print(f"harvest: {sum(r.shape[0] for r in rows.values())} rows of {base.row_width} floats in "
          f"{time.perf_counter() - t0:.0f} s (one pass over {parts} partitions, every layer at once)")
    last = None
    for k in a.k:
        for seed in a.seeds:
            for kind, reach in (("clt", 0), ("plt", 1)):
                if any(r["kind"] == kind and r["k"] == k and r["seed"] == seed for r in results):
                    continue
                cfg = clt_config(model, a.width, input=a.input, architecture="batchtopk", k=k, reach=reach)
                t1 = time.perf_counter()
                src = PartitionedSource(rows, parts, a.batch, seed)
                run = fit_sae(src, cfg, TrainConfig(steps=a.steps, batch_size=a.batch, lr=a.lr, seed=seed),
                              progress=True)
                train_s = time.perf_counter() - t1
                ev = evaluate_clt(model, run.sae, held)
                ioi, caps = graph_metrics(model, run.sae, IOI, a.max_features), \
                    graph_metrics(model, run.sae, CAPITALS, a.max_features)
                rec = {"kind": kind, "k": k, "seed": seed, "l0_per_token": sum(ev.l0), "nmse": ev.nmse,
                       "mean_nmse": ev.mean_nmse, "nmse_with_outliers": ev.nmse_all, "outliers": ev.n_outliers,
                       "ce_clean": ev.ce_clean, "ce_replaced": ev.ce_clt,
                       "ce_recovered": ev.ce_recovered, "ioi": ioi, "capitals": caps, "train_seconds": train_s,
                       "seconds": time.perf_counter() - t1, "decoder_blocks": cfg.decoder_blocks()}
                results.append(rec)
                res_path.write_text(json.dumps({"config": vars(a), "runs": results}, indent=1))
                print(f"{kind.upper()} k={k} seed={seed}: L0 {rec['l0_per_token']:.0f}/token, mean NMSE "
                      f"{rec['mean_nmse']:.3f}, CE recovered {rec['ce_recovered']:.3f}; IOI replacement "
                      f"{ioi['replacement']:.3f} completeness {ioi['completeness']:.3f} path {ioi['path_length']:.2f}; "
                      f"capitals {caps['replacement']:.3f} / {caps['completeness']:.3f} / {caps['path_length']:.2f} "
                      f"({train_s:.0f} s training, {rec['seconds']:.0f} s in all)", flush=True)
                if kind == "clt":
                    last = run.sae
    if last is not None:
        folder = save_replacement(last, Path(f"{transcoder_cache(model.cfg.model_name)}-clt") / "clt", model=model)
        print(f"kept the last CLT at {folder} (bench/bench_circuit_tracer.py compares circuit-tracer's graph on it)")
    report(results, out)


def report(results: list[dict], out: Path) -> None:
    """The table (mean and range over seeds) and the figure."""
    def stat(kind, k, get):
        vals = [get(r) for r in results if r["kind"] == kind and r["k"] == k]
        return (sum(vals) / len(vals), min(vals), max(vals), len(vals)) if vals else None

    ks = sorted({r["k"] for r in results})
    metrics = {"mean NMSE (0 best)": lambda r: r["mean_nmse"], "CE recovered": lambda r: r["ce_recovered"],
               "IOI replacement": lambda r: r["ioi"]["replacement"], "IOI completeness": lambda r: r["ioi"]["completeness"],
               "IOI path length": lambda r: r["ioi"]["path_length"],
               "capitals replacement": lambda r: r["capitals"]["replacement"],
               "capitals completeness": lambda r: r["capitals"]["completeness"],
               "capitals path length": lambda r: r["capitals"]["path_length"]}
    print("\nmean over seeds [min, max] (n seeds); L0 = active features per token over all 30 layers")
    for k in ks:
        l0 = stat("clt", k, lambda r: r["l0_per_token"]) or stat("plt", k, lambda r: r["l0_per_token"])
        print(f"k {k} per layer (L0 {l0[0]:.0f} per token):")
        for name, get in metrics.items():
            cells = []
            for kind in ("clt", "plt"):
                s = stat(kind, k, get)
                cells.append(f"{kind.upper()} {s[0]:.3f} [{s[1]:.3f}, {s[2]:.3f}] ({s[3]})" if s else f"{kind.upper()} -")
            print(f"  {name:24s} " + "   ".join(cells))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
        panels = [("IOI replacement", "replacement score (IOI)"), ("capitals replacement", "replacement score (capitals)"),
                  ("IOI path length", "mean path length (IOI)"), ("mean NMSE (0 best)", "mean NMSE over layers")]
        for ax, (name, label) in zip(axes, panels):
            for kind, colour in (("clt", "tab:blue"), ("plt", "tab:orange")):
                pts = [(stat(kind, k, lambda r: r["l0_per_token"]), stat(kind, k, metrics[name])) for k in ks]
                pts = [(x[0], y) for x, y in pts if x and y]
                if pts:
                    ax.errorbar([p[0] for p in pts], [p[1][0] for p in pts],
                                yerr=[[p[1][0] - p[1][1] for p in pts], [p[1][2] - p[1][0] for p in pts]],
                                label=kind.upper(), color=colour, marker="o", capsize=3)
            ax.set_xlabel("L0 (active features per token)")
            ax.set_title(label)
            ax.set_xscale("log")
        axes[0].legend()
        fig.tight_layout()
        fig.savefig(out / "clt_vs_plt.png", dpi=110)
        print(f"figure: {out / 'clt_vs_plt.png'}")
    except ImportError:
        pass


if __name__ == "__main__":
    main()
