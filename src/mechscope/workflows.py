"""End-to-end investigations that combine the techniques and write one report.

:func:`demo_investigation` is what ``make demo`` runs on the default model: the environment and
a memory estimate, a logit lens and DLA on a factual prompt, IOI activation patching (residual
stream, then heads), attribution patching checked against true patching, and the causal check
of the top heads against random heads of the same number, with CIs over held-out prompts; the
induction heads with their ablation evidence over seeds; a linear probe against its control task;
and a short SAE run with its metrics and feature dashboards.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import corpus
from . import datasets as D
from .analysis import viz
from .analysis.metrics import induction_loss
from .analysis.validation import across_seeds, paired_bootstrap
from .circuits.heads import induction_scores, induction_tokens
from .compute import env, estimate_memory
from .core.files import atomic_write
from .core.model import HookedModel
from .core.result import Result
from .sae import SAEConfig, TrainConfig, evaluate_sae, fit_sae, harvest, save_sae
from .sae.features import feature_stats, write_dashboards
from .techniques.ablation import ablate, compare_to_random
from .techniques.attribution import direct_logit_attribution
from .techniques.attribution_patching import attribution_patch
from .techniques.lens import logit_lens
from .techniques.patching import patch
from .techniques.probing import next_token_continues_word, probe_sweep


@dataclass
class Section:
    title: str
    text: str
    html: str = ""
    images: list[str] = field(default_factory=list)


@dataclass(repr=False)
class Report(Result):
    """Sections of text, HTML and PNGs; :meth:`write` makes one offline page (written atomically)."""

    title: str
    sections: list[Section] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    echo: bool = True

    def add(self, section: Section) -> None:
        self.sections.append(section)
        if self.echo:
            print(f"\n== {section.title}\n{section.text}", flush=True)

    def summary(self) -> str:
        return f"{self.title}: " + "; ".join(s.title for s in self.sections)

    def to_html(self) -> str:
        parts = []
        for s in self.sections:
            imgs = "".join(f"<img src='{viz.esc(i)}' style='max-width:100%'>" for i in s.images)
            parts.append(f"<section><h2>{viz.esc(s.title)}</h2><pre>{viz.esc(s.text)}</pre>{imgs}{s.html}</section>")
        return viz.page(self.title, "".join(parts))

    def write(self, folder: str | Path) -> Path:
        return atomic_write(Path(folder) / "report.html", self.to_html())


def _environment(rep: Report, model: HookedModel, out: Path) -> None:
    est = estimate_memory(model, batch=8, seq_len=128, cache_names="all")
    rep.add(Section("1. environment and memory", f"{env().summary()}\n\n{model!r}\n\n"
                                                 f"memory estimate, batch 8 x 128 tokens, full cache:\n{est.summary()}"))


def _lens_and_dla(rep: Report, model: HookedModel, out: Path, prompt: str = "The capital of France is") -> None:
    lens = logit_lens(model, prompt, targets=[" Paris"])
    lens.plot(out / "logit_lens.png")
    rep.add(Section(f"2. logit lens: {prompt!r}", lens.summary(), lens.to_html(), ["logit_lens.png"]))
    dla = direct_logit_attribution(model, prompt, " Paris", " London")
    dla.plot(out / "dla.png")
    rep.add(Section("3. direct logit attribution of ' Paris' - ' London'", dla.summary(), "", ["dla.png"]))
    rep.metrics["dla_paris_london"] = dla.target


def _ioi(rep: Report, model: HookedModel, out: Path, n_prompts: int, seed: int, k: int = 3) -> None:
    ds = D.ioi(model, 2 * n_prompts, seed=seed)
    train, held = ds.split(0.5, seed=seed)
    resid = patch(model, train.clean, train.corrupted, train.metric, site="resid_pre")
    resid.plot(out / "ioi_resid.png")
    heads = patch(model, train.clean, train.corrupted, train.metric, site="z")
    heads.plot(out / "ioi_heads.png")
    attr = attribution_patch(model, train.clean, train.corrupted, train.metric, sites=("z",))["z"]
    r = float(torch.corrcoef(torch.stack([attr.normalized().flatten(), heads.normalized().flatten()]))[0, 1])
    text = (f"{ds.summary()}\n(train {len(train)} / held-out {len(held)} prompts)\n\n{resid.summary(8)}\n\n"
            f"{heads.summary(8)}\n\nattribution patching vs true head patching: correlation {r:.3f}")
    rep.add(Section("4. IOI activation patching (residual stream, then heads)", text,
                    resid.to_html() + heads.to_html(), ["ioi_resid.png", "ioi_heads.png"]))
    v = heads.normalized()
    H = v.shape[1]
    top = [f"L{int(i) // H}H{int(i) % H}" for i in v.flatten().argsort(descending=True)[:k]]
    all_heads = [f"L{l}H{h}" for l in range(v.shape[0]) for h in range(H)]
    rand = random.Random(seed).sample([x for x in all_heads if x not in top], k)
    a_top = ablate(model, held.clean, held.metric, top, method="mean", reference=held.corrupted, seed=seed)
    a_rand = ablate(model, held.clean, held.metric, rand, method="mean", reference=held.corrupted, seed=seed)
    diff = paired_bootstrap(a_top.ablated - a_top.baseline, a_rand.ablated - a_rand.baseline)
    verdict = "the top heads matter more than random heads" if diff.high < 0 else \
        "not distinguishable from ablating random heads"
    text = (f"top {k} heads by patching on the train prompts: {', '.join(top)}\n"
            f"mean-ablate them on the {len(held)} held-out prompts:\n{a_top.summary()}\n"
            f"baseline, {k} random heads ({', '.join(rand)}):\n{a_rand.summary()}\n"
            f"difference (top - random) in effect: {diff}  => {verdict}")
    rep.add(Section("5. causal check on held-out prompts", text))
    rep.metrics.update(ioi_top_heads=top, ioi_top_effect=a_top.effect.value, ioi_random_effect=a_rand.effect.value,
                       ioi_top_minus_random=diff.value, attribution_vs_patching_r=r)


def _induction(rep: Report, model: HookedModel, out: Path, seed: int) -> None:
    ind = induction_scores(model, seed=seed)
    ind.plot(out / "induction.png")
    top = [n for n, _ in ind.top(4)]

    def check(s):
        toks, _ = induction_tokens(model, 20, 8, seed=100 + s)
        ref = induction_tokens(model, 20, 8, seed=1000 + s)[0]
        return compare_to_random(model, toks, lambda lg: induction_loss(lg, toks, 20), top, method="mean",
                                 n_random=3, reference=ref, seed=s)

    checks = [check(s) for s in range(3)]
    agg = across_seeds(lambda s: checks[s].difference.value, seeds=range(3), name="loss increase, top - random")
    text = f"{ind.summary(6)}\n\nseed 0:\n{checks[0].summary()}\n\n{agg.summary()}"
    rep.add(Section("6. induction heads and their ablation evidence", text, ind.to_html(), ["induction.png"]))
    rep.metrics.update(induction_heads=top, induction_top_minus_random=float(agg.mean))


def _probe(rep: Report, model: HookedModel, out: Path, toks: torch.Tensor) -> None:
    n = model.cfg.n_layers
    layers = sorted({0, n // 3, 2 * n // 3, n - 3})
    probe = probe_sweep(model, toks, next_token_continues_word(model, toks),
                        hooks=[f"blocks.{l}.hook_resid_post" for l in layers], task="next token continues the word")
    probe.plot(out / "probe.png")
    rep.add(Section("7. linear probe with a control task", probe.summary(), probe.to_html(), ["probe.png"]))
    rep.metrics["probe_best_selectivity"] = probe.selectivity[probe.best].value


def _sae(rep: Report, model: HookedModel, out: Path, toks: torch.Tensor) -> None:
    hook = f"blocks.{model.cfg.n_layers // 2}.hook_resid_post"
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
    rep.add(Section("8. a short SAE run and its features", text,
                    f"<p><a href='features/index.html'>all feature dashboards</a></p><ul>{links}</ul>"))
    rep.metrics.update(sae_l0=ev.l0, sae_explained_variance=ev.explained_variance, sae_ce_recovered=ev.ce_recovered)


def demo_investigation(model: HookedModel, out: str | Path = "mechscope-demo", n_prompts: int = 8, seed: int = 0,
                       echo: bool = True) -> Report:
    """Run the demo investigation on ``model`` and write ``out/report.html`` with PNGs beside it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rep = Report(f"mechscope investigation of {model.cfg.model_name}", echo=echo)
    t0 = time.time()
    _environment(rep, model, out)
    _lens_and_dla(rep, model, out)
    _ioi(rep, model, out, n_prompts, seed)
    _induction(rep, model, out, seed)
    toks = corpus.pack(model, corpus.default_corpus("test"), 64, n_seqs=32)
    _probe(rep, model, out, toks)
    _sae(rep, model, out, toks)
    path = rep.write(out)
    if echo:
        print(f"\nreport: {path.resolve()}  ({time.time() - t0:.1f} s)")
    return rep
