"""The demo: what ``make demo`` runs on the default model, written as one report.

The environment and a memory estimate; a logit lens and DLA on a factual prompt;
:func:`~mechscope.workflows.investigate` on IOI (the same stages as ``mechscope investigate --task
ioi``: the pairs checked, patching, a circuit chosen from the faithfulness curve and validated on
held-out prompts and other splits, its heads read); induction heads with their ablation evidence
over seeds; a linear probe against its control task; a short SAE run with its metrics and feature
dashboards; and an attribution graph when transcoders are cached.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .. import corpus
from .. import datasets as D
from ..analysis import viz
from ..analysis.metrics import induction_loss, labelled
from ..analysis.validation import across_seeds, bootstrap_ci
from ..circuits.heads import induction_scores, induction_tokens
from ..compute import env, estimate_memory
from ..core.hookpoints import act_name
from ..core.model import HookedModel
from ..core.progress import stage
from ..sae import SAEConfig, TrainConfig, evaluate_sae, fit_sae, harvest, save_sae
from ..sae.features import feature_stats, write_dashboards
from ..techniques.ablation import compare_to_random
from ..techniques.attribution import direct_logit_attribution
from ..techniques.lens import logit_lens
from ..techniques.probing import next_token_continues_word, probe_sweep
from .investigate import graph_section, investigate
from .report import Figures, Report, Section, estimates_table, fmt, reproducibility


def _environment(rep: Report, model: HookedModel, out: Path) -> None:
    est = estimate_memory(model, batch=8, seq_len=128, cache_names="all")
    sec = Section("environment and memory", f"{env().summary()}\n\n{model!r}\n\n"
                                              f"memory estimate, batch 8 x 128 tokens, full cache:\n{est.summary()}",
                  key="environment")
    rep.add(sec)


def _lens_and_dla(rep: Report, model: HookedModel, out: Path, prompt: str = "The capital of France is") -> None:
    lens = logit_lens(model, prompt, targets=[" Paris"])
    lens.plot(out / "logit_lens.png")
    sec = Section(f"logit lens: {prompt!r}", lens.summary(), lens.figures_html(), ["logit_lens.png"], key="lens")
    rep.add(sec)
    dla = direct_logit_attribution(model, prompt, " Paris", " London")
    dla.plot(out / "dla.png")
    sec = Section("direct logit attribution of ' Paris' - ' London'", dla.summary(), "", ["dla.png"], key="dla")
    rep.add(sec)
    i = int(dla.values.abs().argmax())
    rep.find(f"{dla.components[i]} writes the largest direct share of the ' Paris' - ' London' logit difference "
             f"({dla.values[i]:+.2f} of {dla.target:+.2f}; the shares add up to it within {abs(dla.error):.1e})",
             float(dla.values[i]), f"the mean share of a component: {dla.target / len(dla.components):+.3f}", sec)
    rep.checklist.add("question", "which components write ' Paris' over ' London' for a factual prompt?", "#dla")
    rep.checklist.add("visualised", "logit lens and DLA pictures", "#lens")
    rep.metrics["dla_paris_london"] = dla.target


def _induction(rep: Report, model: HookedModel, out: Path, figs: Figures, seed: int, n_random: int = 20) -> None:
    ind = induction_scores(model, seed=seed)
    ind.plot(out / "induction.png")
    top = [n for n, _ in ind.top(4)]

    def check(s):
        toks, _ = induction_tokens(model, 20, 16, seed=100 + s)  # 16 sequences: enough for a CI (10+)
        ref = induction_tokens(model, 20, 16, seed=1000 + s)[0]
        return compare_to_random(model, toks, labelled(lambda lg: induction_loss(lg, toks, 20),
                                                       "next-token loss on the repeated half", "nats per token",
                                                       "lower is better"),
                                 top, method="mean", n_random=n_random, reference=ref, seed=s)

    checks = [check(s) for s in range(3)]
    agg = across_seeds(lambda s: checks[s].difference.value, seeds=range(3), name="loss increase, top - random")
    text = f"{ind.summary(6)}\n\nseed 0:\n{checks[0].summary()}\n\n{agg.summary()}"
    sc = ind.scores
    html = figs.heatmap(sc, [f"L{l}" for l in range(sc.shape[0])], [f"H{h}" for h in range(sc.shape[1])],
                        title="induction score per head (repeated random tokens)", diverging=False)
    spread = bootstrap_ci(agg.values)
    html += estimates_table([(f"seed {i}: top 4 - random", c.difference) for i, c in enumerate(checks)]
                             + [("mean over seeds", spread)], "mean ablation: loss increase on repeated tokens (nats)")
    sec = Section("induction heads and their ablation evidence", text, html, ["induction.png"], key="induction")
    rep.add(sec)
    rep.find(f"mean-ablating the 4 top induction heads ({', '.join(top)}) raises the loss on repeated tokens by "
             f"{float(agg.mean):.2f} nats more than random heads (3 seeds)", spread,
             f"{n_random} random sets of 4 heads per seed; seed 0: effects "
             f"{min(e.value for e in checks[0].random_effects):+.2f}"
             f" to {max(e.value for e in checks[0].random_effects):+.2f} (rank p = {checks[0].p_value:.3f})", sec,
             holds=all(c.difference.excludes(0.0) and c.difference.value > 0 for c in checks))
    rep.checklist.add("causal", f"ablating the induction heads vs random heads over 3 seeds: {fmt(spread)}",
                      "#induction")
    rep.checklist.add("edge_cases", "the induction check repeated on 3 seeds of fresh random tokens", "#induction")
    rep.metrics.update(induction_heads=top, induction_top_minus_random=float(agg.mean),
                       induction_top_score=float(ind.top(1)[0][1]),
                       induction_seed_differences=[[c.difference.value, c.difference.low, c.difference.high]
                                                   for c in checks])


def _probe(rep: Report, model: HookedModel, out: Path, toks: torch.Tensor) -> None:
    n = model.cfg.n_layers
    layers = sorted({0, n // 3, 2 * n // 3, n - 3})
    probe = probe_sweep(model, toks, next_token_continues_word(model, toks),
                        hooks=[act_name("resid_post", l) for l in layers], task="next token continues the word")
    probe.plot(out / "probe.png")
    sec = Section("linear probe with a control task", probe.summary(), probe.figures_html(), ["probe.png"], key="probe")
    rep.add(sec)
    best = probe.best
    sel = probe.selectivity[best]
    rep.find(f"a linear probe at {probe.hooks[best]} reads whether the next token continues the word, above its "
             f"control task (selectivity: task accuracy minus control accuracy, in accuracy points)", sel,
             f"held-out accuracy of the same probe: task {fmt(probe.scores[best])} against the control task (random "
             f"labels per token type) {fmt(probe.control[best])}; selectivity is their difference", sec,
             holds=sel.excludes(0.0) and sel.value > 0)
    rep.checklist.add("alternatives", "the probe's control task (Hewitt & Liang 2019)", "#probe")
    rep.metrics.update(probe_best_selectivity=sel.value, probe_hooks=list(probe.hooks),
                       probe_selectivity=[[e.value, e.low, e.high] for e in probe.selectivity])


def _sae(rep: Report, model: HookedModel, out: Path, toks: torch.Tensor) -> None:
    hook = act_name("resid_post", model.cfg.n_layers // 2)
    acts = harvest(model, hook, corpus.pack(model, corpus.default_corpus("train"), 64, n_seqs=64))
    cfg = SAEConfig(d_in=acts.shape[1], d_sae=4 * acts.shape[1], architecture="topk", k=32, hook_name=hook,
                    model_name=model.cfg.model_name, normalize_activations="expected_average_only_in")
    run = fit_sae(acts, cfg, TrainConfig(steps=200, batch_size=256, lr=1e-3, log_every=50, checkpoint_every=1000),
                  out=out / "sae_train", progress=False)
    save_sae(run.sae, out / "sae", log10_density=run.log10_density)
    ev = evaluate_sae(model, run.sae, toks[:8])
    stats = feature_stats(model, run.sae, toks[8:24], n_top=10)
    write_dashboards(model, run.sae, stats, out / "features")
    links = "".join(f"<li><a href='features/feature_{i}.html'>feature {i}</a></li>" for i in list(stats.top)[:10])
    text = (f"TopK SAE, {cfg.d_sae} latents, k=32, on {hook}, trained on {acts.shape[0]} tokens for 200 steps "
            f"(a CPU-sized run: see bench/bench_sae.py for a longer one)\n{ev.summary()}")
    sec = Section("a short SAE run and its features", text,
                  f"<p>{viz.esc(ev.summary().splitlines()[0])}</p><p><a href='features/index.html'>all feature "
                  f"dashboards</a> (separate pages beside this report)</p><ul>{links}</ul>", key="sae")
    rep.add(sec)
    rep.find(f"a 200-step TopK SAE on {hook} recovers this fraction of the cross-entropy lost to zero-ablating the "
             f"layer, at L0 {ev.l0:.0f}", ev.ce_recovered,
             f"zero-ablation: CE {ev.ce_zero:.2f} vs clean {ev.ce_clean:.2f} (SAE: {ev.ce_sae:.2f})", sec,
             holds=ev.ce_recovered > 0)
    rep.metrics.update(sae_l0=ev.l0, sae_explained_variance=ev.explained_variance, sae_ce_recovered=ev.ce_recovered,
                       sae_explained_variance_typical=ev.explained_variance_typical,
                       sae_ce=[ev.ce_clean, ev.ce_sae, ev.ce_zero])  # nats per token: clean, with the SAE, zeroed


def demo_investigation(model: HookedModel, out: str | Path = "mechscope-demo", n_prompts: int = 12, seed: int = 0,
                       echo: bool = True, induction_random: int = 20) -> Report:
    """Run the demo on ``model`` and write ``out/report.html`` with PNGs beside it: the environment, a logit lens
    and DLA, :func:`~mechscope.workflows.investigate` on IOI (``n_prompts`` held-out prompts; the same code
    path as ``mechscope investigate --task ioi``), induction heads (against ``induction_random`` random sets of
    heads on each of 3 seeds), a probe, a short SAE run and, when transcoders are cached, an attribution graph."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rep = Report(f"mechscope investigation of {model.cfg.model_name}", echo=echo)
    figs = Figures()
    t0 = time.time()
    toks = corpus.pack(model, corpus.default_corpus("test"), 64, n_seqs=32)
    steps = {"environment": lambda: _environment(rep, model, out),
             "lens and DLA": lambda: _lens_and_dla(rep, model, out),
             "investigate IOI": lambda: investigate(model, D.ioi(model, 2 * n_prompts, seed=seed), out, report=rep,
                                                    echo=echo),
             "induction heads": lambda: _induction(rep, model, out, figs, seed, induction_random),
             "probe": lambda: _probe(rep, model, out, toks), "SAE": lambda: _sae(rep, model, out, toks),
             "attribution graph": lambda: graph_section(rep, model, out)}
    for i, (name, step) in enumerate(steps.items()):
        stage(f"demo {i + 1}/{len(steps)}: {name}")
        step()
    reproducibility(rep, model, seed, n_prompts)
    path = rep.write(out)
    if echo:
        print(f"\nreport: {path.resolve()}  ({time.time() - t0:.1f} s)")
    return rep
