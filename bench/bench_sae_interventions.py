"""What reading an SAE in the model costs, on the tutorial's SAE (SmolLM2-135M layer 15, 2,304-latent TopK, k=32,
150 steps on 3,024 tokens): ``evaluate_sae`` and ``compare_features_to_random`` each against the path before, in the
same run.

- ``evaluate_sae`` on 66 held-out sequences of 64 tokens: its activations now come from the CE loss's own unhooked
  run; the baseline adds back the harvest pass it no longer runs (timed here on the same tokens).
- ``compare_features_to_random`` of the sparsest of a prompt's top features against 20 matched controls, on 16
  sequences: now only the prompts where an ablated feature fires are run; the baseline runs every prompt for every
  set (the same call with ``batched_metric``'s ``changed`` ignored). The effects must agree to 1e-5.

Each variant runs twice, alternated, and the faster run counts (this machine is noisy). Run alone (nothing else on
the CPU): ``HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_sae_interventions.py``.
"""

from __future__ import annotations

import time

import torch


def _best(fn, runs: int = 2):
    out, best = None, float("inf")
    for _ in range(runs):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return out, best


def main() -> None:
    import mechscope
    from mechscope import corpus
    from mechscope.analysis.metrics import labelled
    from mechscope.core.model import lm_loss
    from mechscope.sae import SAEConfig, TrainConfig, evaluate_sae, fit_sae, harvest
    from mechscope.sae import interventions as I
    from mechscope.sae.features import feature_stats, top_features
    from mechscope.techniques import inputs

    model = mechscope.load("smollm2-135m")
    print(f"{torch.get_num_threads()} torch threads; SmolLM2-135M")
    hook = "blocks.15.hook_resid_post"
    acts = harvest(model, hook, corpus.pack(model, corpus.default_corpus("train"), 64, n_seqs=48))
    cfg = SAEConfig(d_in=acts.shape[1], d_sae=4 * acts.shape[1], architecture="topk", k=32, hook_name=hook,
                    normalize_activations="expected_average_only_in")
    sae = fit_sae(acts, cfg, TrainConfig(steps=150, batch_size=256, lr=1e-3, log_every=1000), progress=False).sae
    test = corpus.pack(model, corpus.default_corpus("test"), 64, n_seqs=82)
    held, text = test[:66], test[66:]

    # evaluate_sae: now, and the harvest pass it no longer runs
    ev, t_eval = _best(lambda: evaluate_sae(model, sae, held))
    _, t_harvest = _best(lambda: harvest(model, hook, held, max_norm_ratio=None))
    print(f"evaluate_sae on {held.shape[0]} x {held.shape[1]} tokens: {t_eval:.1f} s; with the separate harvest "
          f"pass it ran before: {t_eval + t_harvest:.1f} s; ratio {t_eval / (t_eval + t_harvest):.2f}x "
          f"(CE recovered {ev.ce_recovered:.3f})")

    # compare_features_to_random: only the prompts where a feature fires, against every prompt
    on_prompt = top_features(model, sae, "The keys near the cabinet are", k=8)
    stats = feature_stats(model, sae, text, features=[i for i, _ in on_prompt], n_top=5)
    density = {i: float(stats.fire_count[i]) / stats.n_tokens for i, _ in on_prompt if stats.fire_count[i] > 0}
    f = min(density, key=density.get)
    loss = labelled(lambda lg: lm_loss(lg, text.to(lg.device), per_token=True).mean(-1),
                    "next-token loss per sequence", "nats per token", "lower is better")
    _, fires = I._feature_acts(model, sae, text, rows=True)
    every = inputs.batched_metric

    def all_rows(*a, changed=None, **k):
        return every(*a, **k)

    def run(skip: bool):
        I.batched_metric = every if skip else all_rows
        try:
            return I.compare_features_to_random(model, sae, text, loss, [f], n_random=20)
        finally:
            I.batched_metric = every

    for _ in range(2):  # alternated: new, old, new, old
        new, t_new = _best(lambda: run(True), 1)
        old, t_old = _best(lambda: run(False), 1)
        if _ == 0:
            best_new, best_old = t_new, t_old
        best_new, best_old = min(best_new, t_new), min(best_old, t_old)
    worst = max(abs(a.value - b.value) for a, b in zip(new.random_effects + [new.target.effect],
                                                        old.random_effects + [old.target.effect]))
    rows = [int(fires[:, c].any(-1).sum()) for c in [f] + [c[0] for c in new.target.extra["controls"]]]
    print(f"compare_features_to_random, feature {f} (fires on {density[f]:.2%} of tokens) and 20 matched controls, "
          f"{text.shape[0]} sequences: prompts run per set {sum(rows) / len(rows):.1f} of {text.shape[0]} (mean); "
          f"{best_new:.1f} s against {best_old:.1f} s running every prompt: {best_new / best_old:.2f}x; largest "
          f"difference in a mean effect {worst:.1e} nats")


if __name__ == "__main__":
    main()
