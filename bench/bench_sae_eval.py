"""What the SAE evaluation suite costs on this machine (issue goals: core+absorption+probing <= 5 min, autointerp
<= 1 min for 50 features with the local model), on a 4,608-latent TopK SAE at SmolLM2-135M's layer 15.

Autointerp's scoring is timed twice on the same explanations: as it runs (the prompts' shared chat template and
instruction run once, mechscope.techniques.shared_prefix) and with every prompt run in full (the baseline, in the
same run). The SAE is the one in --sae when given, else a freshly initialised one of that shape (the cost does not depend on
training; the scores do, and a random SAE's are printed as such). Prints each part's wall time, the ratio to its
goal, and the scores. Run alone: `make bench-sae-eval` (nothing else on the CPU).
"""

from __future__ import annotations

import argparse
import time

import torch


def _mean(values) -> float:
    got = [v for v in values if v == v]  # nan: a feature with no context on one side
    return sum(got) / len(got) if got else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sae", default=None, help="an SAE folder (default: a random 4,608-latent TopK SAE)")
    ap.add_argument("--features", type=int, default=50)
    ap.add_argument("--autointerp-only", action="store_true", help="skip the core/absorption/probing suite")
    args = ap.parse_args()
    import mechscope
    from mechscope import corpus
    from mechscope.sae import SAE, SAEConfig, evaluate_sae, load_sae
    from mechscope.sae.autointerp import explain_features

    model = mechscope.load("smollm2-135m")
    if args.sae:
        sae, what = load_sae(args.sae, model), args.sae
    else:
        sae = SAE(SAEConfig(d_in=576, d_sae=4608, architecture="topk", k=32, hook_name="blocks.15.hook_resid_post"))
        what = "a random 4,608-latent TopK SAE (scores are a random SAE's)"
    print(f"SAE: {what}; {torch.get_num_threads()} torch threads")
    if not args.autointerp_only:
        held = corpus.pack(model, corpus.default_corpus("test"), 128, n_seqs=32)
        t = time.time()
        ev = evaluate_sae(model, sae, held, suite="core")
        core = time.time() - t
        t = time.time()
        ev = evaluate_sae(model, sae, held, suite="core,absorption,probing")
        suite = time.time() - t
        print(ev.summary())
        print(f"\ncore alone {core:.0f} s; core + absorption + probing {suite:.0f} s = {suite / 300:.2f} x the 5-minute "
              f"goal ({'met' if suite <= 300 else 'NOT met'})")
    toks = corpus.pack(model, corpus.default_corpus("test"), 64, n_seqs=128)
    t = time.time()
    res = explain_features(model, sae, toks, n_features=args.features)
    ai = time.time() - t
    print(res.summary())
    n = len(res.explanations)
    print(f"\nautointerp: {ai:.0f} s for {n} features explained and scored (+ {len(res.random_explanations)} random "
          f"directions, + the shuffled control) = {ai / 60:.2f} x the 1-minute goal ({'met' if ai <= 60 else 'NOT met'})")
    # the same explanations scored again, the prefix shared and not (the random directions are explained again)
    from mechscope.techniques import shared_prefix

    times: dict[str, list[float]] = {}
    shared = shared_prefix.MIN_SHARED
    for _ in range(2):  # alternated twice, the faster of each kept: this machine's runs vary by up to ~20%
        for name, least in (("shared prefix", shared), ("every prompt in full", 10**9)):
            shared_prefix.MIN_SHARED = least
            t = time.time()
            again = explain_features(model, sae, toks, features=list(res.explanations), explanations=res.explanations)
            times.setdefault(name, []).append(time.time() - t)
            print(f"  scoring {name}: {times[name][-1]:.0f} s (detection AUROC, mean over features: "
                  f"{_mean(again.detection.values()):.3f})")
    shared_prefix.MIN_SHARED = shared
    print(f"scoring with the shared prefix: {min(times['shared prefix']) / min(times['every prompt in full']):.2f} x "
          f"the time of every prompt in full (the faster of two runs each, alternated, same process)")


if __name__ == "__main__":
    main()
