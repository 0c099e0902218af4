"""Model diffing on model organisms with a known answer: `make bench-diff`.

For each seed, a domain is drawn at random from mechscope's pool (an invented entity and ten words) and SmolLM2-135M is
fine-tuned with LoRA on a few hundred documents of false facts about it (the *organism*); the *control* is the same
fine-tune (steps, rank, learning rate, seed) on generic text. Both are diffed against the base model with
`mechscope.workflows.diff`: KL, the activation-difference lens (logit lens, Patchscope, steering) on unrelated text
(held-out standard-library docstrings), and BatchTopK and L1 crosscoders trained in lockstep on paired activations of
a mix of generic text and held-out domain documents. Every method's recovery score is the share of its top outputs
that are domain tokens, for the organism and for its control (scored against the organism's domain), with a 95 %
t-interval over seeds; Latent Scaling's flags are compared between the L1 and the BatchTopK crosscoder (Minder et al.
2025 report that L1 invents more "fine-tune-only" latents). Stage times are printed for each run.

CPU note: 2 threads; one LoRA fine-tune of 150 steps takes about 5 minutes here (2 s a step), the two crosscoders about 3.

Options: --seeds, --steps, --rank, --lr, --docs, --seq-len, --crosscoder-width, --crosscoder-k, --crosscoder-steps,
--l1, --no-crosscoder, --hook, --adl-hook, --results (another results file), --fresh. Results:
$MECHSCOPE_CACHE/bench_diff/results.json and recovery.png.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from _results import results_file


def args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--docs", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--crosscoder-width", type=int, default=2048)
    p.add_argument("--crosscoder-k", type=int, default=16)
    p.add_argument("--crosscoder-steps", type=int, default=600)
    p.add_argument("--l1", type=float, default=0.5)
    p.add_argument("--no-crosscoder", action="store_true")
    p.add_argument("--hook", default=None, help="where the ADL and the crosscoders read (default: the middle layer)")
    p.add_argument("--adl-hook", default=None, help="where the ADL reads (default: --hook)")
    p.add_argument("--results", default="results.json", help="results file in $MECHSCOPE_CACHE/bench_diff (the "
                                                              "stages are shared: another ADL hook reuses the rest)")
    p.add_argument("--fresh", action="store_true")
    return p.parse_args()


def main() -> None:
    a = args()
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", 2)))
    import mechscope as ms
    from mechscope import corpus
    from mechscope.analysis.validation import seed_interval
    from mechscope.diffing import load_pair
    from mechscope.diffing.organisms import OrganismSpec, build_organism, draw_domain
    from mechscope.workflows.diff import diff

    model = ms.load("smollm2-135m")
    out, res_path, runs = results_file("bench_diff", a.fresh, a.results)
    generic_test, desc = corpus.from_spec(None, "test")
    tokens = corpus.document_starts(model, generic_test, a.seq_len, a.docs, source=desc)
    generic_train = list(t for _, t in zip(range(4000), corpus.default_corpus("train")))
    methods = ["weights", "norms", "kl", "adl"] + ([] if a.no_crosscoder else ["crosscoder"])
    print(f"SmolLM2-135M (Q4_1 GGUF, dequantised); {tokens.shape[0]} documents x {tokens.shape[1]} tokens of {desc} "
          f"for KL and the ADL; LoRA rank {a.rank}, {a.steps} steps, lr {a.lr}; seeds {a.seeds}; 2 threads")
    for seed in a.seeds:
        domain = draw_domain(seed)
        # the crosscoders read a mix of generic text and held-out domain documents (as diffing work mixes pretraining
        # and fine-tuning-like data), the same for the organism and its control
        mix_train = torch.cat([corpus.document_starts(model, generic_train, a.seq_len, 192, source="generic"),
                               _domain_rows(model, domain, 192, 1000 + seed, a.seq_len)])
        mix_test = torch.cat([tokens[: a.docs // 2], _domain_rows(model, domain, a.docs // 2, 2000 + seed, a.seq_len)])
        for kind in ("organism", "control"):
            if any(r["seed"] == seed and r["kind"] == kind for r in runs):
                continue
            spec = OrganismSpec("smollm2-135m", domain if kind == "organism" else None, steps=a.steps, rank=a.rank,
                                lr=a.lr, seed=seed)
            t0 = time.perf_counter()
            folder = build_organism(model, spec, generic_texts=generic_train[:1200] if kind == "control" else None)
            ft_s = time.perf_counter() - t0
            with load_pair(model, folder) as pair:
                rep = diff(pair, tokens, out / f"seed{seed}-{kind}", methods=methods, crosscoder_tokens=mix_train,
                           held_out=mix_test, crosscoder_width=a.crosscoder_width, crosscoder_k=a.crosscoder_k,
                           crosscoder_steps=a.crosscoder_steps, crosscoder_archs=("batchtopk", "l1"),
                           l1_coefficient=a.l1, domain=domain, seed=seed, echo=False, corpus_desc=desc,
                           hook=a.hook, adl_hook=a.adl_hook)
            m = rep.metrics
            rec = {"seed": seed, "kind": kind, "domain": [domain.entity, domain.words], "recovery": m.get("recovery", {}),
                   "kl": m.get("kl"), "stage_seconds": m["stage_seconds"], "fine_tune_seconds": ft_s,
                   "crosscoders": {k: m[k] for k in m if k.startswith("crosscoder_")}}
            runs.append(rec)
            res_path.write_text(json.dumps({"config": vars(a), "runs": runs}, indent=1))
            print(f"seed {seed} {kind}: recovery {json.dumps({k: round(v, 3) for k, v in rec['recovery'].items()})}; "
                  f"stages (s) {rec['stage_seconds']}; fine-tune {ft_s:.0f} s", flush=True)
    report(runs, out, seed_interval, Path(a.results).stem.replace('results', 'recovery') + '.png')


def _domain_rows(model, domain, n: int, seed: int, seq_len: int) -> torch.Tensor:
    """``n`` rows of held-out domain documents packed to ``seq_len`` (they are shorter than a row one by one)."""
    from mechscope.diffing.organisms import domain_documents, pack_documents

    docs = domain_documents(domain, 4 * n, seed)
    return pack_documents(model, docs, seq_len)[:n]


def report(runs: list[dict], out: Path, seed_interval, figure: str = "recovery.png") -> None:
    methods = sorted({k for r in runs for k in r["recovery"]})
    print("\nrecovery: the share of each method's top outputs that are domain tokens; mean [95% t-interval] over seeds"
          " (n seeds); the control is scored against its organism's domain")
    rows = []
    for meth in methods:
        org = [r["recovery"].get(meth, float("nan")) for r in runs if r["kind"] == "organism"]
        ctl = [r["recovery"].get(meth, float("nan")) for r in runs if r["kind"] == "control"]
        diffs = [o - c for o, c in zip(org, ctl)]
        e_o, e_c, e_d = seed_interval(org), seed_interval(ctl), seed_interval(diffs)
        clear = e_d.n >= 2 and e_d.low > 0
        rows.append((meth, e_o, e_c, e_d))
        print(f"  {meth:<28} organism {e_o.value:.3f} [{e_o.low:.3f}, {e_o.high:.3f}]  control {e_c.value:.3f} "
              f"[{e_c.low:.3f}, {e_c.high:.3f}]  difference {e_d.value:+.3f} [{e_d.low:+.3f}, {e_d.high:+.3f}] "
              f"(n={e_d.n}){'  clearly above the control' if clear else ''}")
    print("\nLatent Scaling on the fine-tune-only latents (organisms): flagged as artifacts / kept / fine-tune-only")
    for arch in ("batchtopk", "l1"):
        vals = [r["crosscoders"].get(f"crosscoder_{arch}") for r in runs if r["kind"] == "organism"]
        vals = [v for v in vals if v]
        if vals:
            print(f"  {arch:<10} " + "; ".join(f"seed {r['seed']}: {v['flagged']} / {v['kept']} / "
                                              f"{v['classes']['ft_only']}" for r, v in
                                              zip([r for r in runs if r['kind'] == 'organism'], vals)))
    print("\nstage times (s), mean over runs:")
    stages = sorted({k for r in runs for k in r["stage_seconds"]})
    for s in stages:
        v = [r["stage_seconds"].get(s, 0.0) for r in runs]
        print(f"  {s:<12} {sum(v) / len(v):8.1f}")
    ft = [r["fine_tune_seconds"] for r in runs]
    print(f"  {'fine-tune':<12} {sum(ft) / len(ft):8.1f} (LoRA, cached afterwards)")
    try:
        from mechscope.analysis import viz

        fig, ax = viz.figure(figsize=(8, 3.8))
        x = range(len(rows))
        for j, (label, idx, color) in enumerate((("organism", 1, "#c33"), ("control", 2, "#36c"))):
            vals = [r[idx] for r in rows]
            ax.bar([i + 0.38 * j for i in x], [v.value for v in vals], 0.38, color=color, label=label,
                   yerr=[[v.value - v.low for v in vals], [v.high - v.value for v in vals]], capsize=3)
        ax.set_xticks([i + 0.19 for i in x])
        ax.set_xticklabels([r[0] for r in rows], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("share of top outputs in the domain")
        ax.set_title(f"recovery of a narrow fine-tune's domain, {len([r for r in runs if r['kind'] == 'organism'])} "
                     "seeds (95% t-intervals)")
        ax.legend()
        print(f"\nfigure: {viz.save_figure(fig, out / figure)}")
    except ImportError:
        pass


if __name__ == "__main__":
    main()
