"""End-to-end investigations that combine the techniques and write one report.

:func:`demo_investigation` is what ``make demo`` runs on the default model: the environment and
a memory estimate, a logit lens and DLA on a factual prompt, IOI activation patching (residual
stream, then heads), attribution patching checked against true patching, and the causal check
of the top heads against random heads of the same number, with CIs over held-out prompts; the
induction heads with their ablation evidence over seeds; a linear probe against its control task;
and a short SAE run with its metrics and feature dashboards.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import corpus
from . import datasets as D
from .analysis import viz
from .analysis.checklist import Checklist
from .analysis.metrics import induction_loss, labelled
from .analysis.validation import Estimate, across_seeds, bootstrap_ci
from .circuits.heads import induction_scores, induction_tokens
from .compute import env, estimate_memory
from .core.components import Component
from .core.files import atomic_write
from .core.hookpoints import act_name
from .core.model import HookedModel
from .core.progress import stage
from .core.result import Result
from .sae import SAEConfig, TrainConfig, evaluate_sae, fit_sae, harvest, save_sae
from .sae.features import feature_stats, write_dashboards
from .techniques.ablation import compare_to_random
from .techniques.attribution import direct_logit_attribution
from .techniques.attribution_patching import attribution_patch
from .techniques.lens import logit_lens
from .techniques.patching import patch
from .techniques.probing import next_token_continues_word, probe_sweep


@dataclass
class Section:
    """One part of a report: interactive ``html`` and PNG ``images`` shown, the raw ``text`` folded away."""

    title: str
    text: str
    html: str = ""
    images: list[str] = field(default_factory=list)  # PNG paths relative to the report's folder
    key: str = ""  # the anchor id (from the title when empty)

    def anchor(self) -> str:
        return self.key or "s-" + "".join(ch if ch.isalnum() else "-" for ch in self.title.lower()).strip("-")[:40]


@dataclass
class Finding:
    """One finding in one sentence, with its effect size and CI, the baseline it beats, and its section."""

    text: str
    effect: Estimate | float
    baseline: str
    section: str  # the anchor of the section that shows it
    holds: bool = True  # False: the check did not come out as the hypothesis predicts (shown as such)


def _fmt(e: Estimate | float) -> str:
    return f"{e.value:+.3g} [{e.low:+.3g}, {e.high:+.3g}]" if isinstance(e, Estimate) else f"{e:+.3g}"


REPORT_CSS = """
body{max-width:1180px;margin:1.5em auto;padding:0 1em;line-height:1.45}
nav.ms-toc ol{columns:2}section{border-top:1px solid #ddd;margin-top:1.6em;padding-top:.4em}
ol.ms-findings li{margin:.35em 0}.ms-effect{font-family:ui-monospace,monospace;background:#eef4ff;padding:0 .3em}
.ms-fails{color:#b3261e}details>summary{cursor:pointer;color:#555}img{max-width:100%}pre{white-space:pre-wrap}
.ms-figs{display:flex;flex-wrap:wrap;gap:1em;align-items:flex-start}.ms-figs img{max-width:560px}
"""


@dataclass(repr=False)
class Report(Result):
    """One offline page: findings with effect sizes at the top, contents, the quality checklist, then sections.

    PNGs are embedded as data URIs and plotly/attention-viewer JavaScript is inline, so the page is
    one file with no network access; :meth:`write` writes it atomically.
    """

    title: str
    sections: list[Section] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    echo: bool = True
    findings: list[Finding] = field(default_factory=list)
    checklist: Checklist = field(default_factory=Checklist)
    folder: Path | None = None  # where PNGs named by sections live

    _skip_in_dict = ("echo", "folder", "sections")

    def _dict_extra(self) -> dict:  # the sections' text, not their inline JavaScript and pictures
        return {"sections": [{"title": s.title, "anchor": s.anchor(), "text": s.text, "images": s.images}
                             for s in self.sections]}

    def add(self, section: Section) -> None:
        self.sections.append(section)
        if self.echo:
            print(f"\n== {section.title}\n{section.text}", flush=True)

    def find(self, text: str, effect: Estimate | float, baseline: str, section: Section, holds: bool = True) -> None:
        self.findings.append(Finding(text, effect, baseline, section.anchor(), holds))

    def summary(self) -> str:
        lines = [self.title] + [f"- {f.text}: {_fmt(f.effect)} (baseline: {f.baseline})" for f in self.findings]
        return "\n".join(lines + [self.checklist.summary()])

    def _img(self, name: str) -> str:
        path = (self.folder / name) if self.folder is not None else Path(name)
        if not path.exists():
            return f"<img src='{viz.esc(name)}' alt='{viz.esc(name)}'>"
        data = base64.b64encode(path.read_bytes()).decode()
        return f"<img src='data:image/png;base64,{data}' alt='{viz.esc(name)}' title='{viz.esc(name)}'>"

    def to_html(self) -> str:
        find = "".join(
            f"<li{'' if f.holds else ' class=ms-fails'}><a href='#{viz.esc(f.section)}'>{viz.esc(f.text)}</a>: "
            f"<span class='ms-effect'>{viz.esc(_fmt(f.effect))}</span>; baseline: {viz.esc(f.baseline)}"
            + ("" if f.holds else " <b>(does not hold)</b>") + "</li>" for f in self.findings)
        toc = "".join(f"<li><a href='#{viz.esc(s.anchor())}'>{viz.esc(s.title)}</a></li>" for s in self.sections)
        parts = [f"<style>{REPORT_CSS}</style>",
                 f"<section id='findings'><h2>findings</h2><p>Effects are means with 95% bootstrap CIs over "
                 f"held-out prompts or seeds, each beside the baseline it is compared with.</p>"
                 f"<ol class='ms-findings'>{find}</ol></section>",
                 f"<nav class='ms-toc'><h2>contents</h2><ol><li><a href='#checklist'>quality checklist</a></li>"
                 f"{toc}</ol></nav>",
                 f"<section id='checklist'><h2>quality checklist</h2>{self.checklist.to_html()}</section>"]
        for s in self.sections:
            imgs = f"<div class='ms-figs'>{''.join(self._img(i) for i in s.images)}</div>" if s.images else ""
            if s.html and imgs:  # the interactive figures come first; their static PNGs are folded away
                imgs = f"<details><summary>static pictures (PNG)</summary>{imgs}</details>"
            raw = (f"<details><summary>raw output</summary><pre>{viz.esc(s.text)}</pre></details>" if s.html or imgs
                   else f"<pre>{viz.esc(s.text)}</pre>")
            parts.append(f"<section id='{viz.esc(s.anchor())}'><h2>{viz.esc(s.title)}</h2>{s.html}{imgs}{raw}"
                         f"</section>")
        return viz.page(self.title, "".join(parts))

    def write(self, folder: str | Path) -> Path:
        self.folder = Path(folder)
        atomic_write(self.folder / "record.json", json.dumps(self.to_dict(), indent=2) + "\n")
        return atomic_write(self.folder / "report.html", self.to_html())


def _estimates_table(rows: list[tuple[str, Estimate]], what: str) -> str:
    """An HTML table of estimates: one row per comparison, with the point value and its 95% CI."""
    body = "".join(f"<tr><th>{viz.esc(name)}</th><td>{e.value:+.3f}</td><td>[{e.low:+.3f}, {e.high:+.3f}]</td>"
                   f"<td>{e.n}</td><td>{'yes' if e.excludes(0.0) else 'no'}</td></tr>" for name, e in rows)
    return (f"<table class='ms-heat'><tr><th>{viz.esc(what)}</th><th>mean</th><th>95% CI</th><th>n</th>"
            f"<th>CI excludes 0</th></tr>{body}</table>")


class _Figures:
    """Interactive figures for one page: plotly.js is inlined with the first heatmap only."""

    def __init__(self):
        self.js_done = False

    def heatmap(self, values: torch.Tensor, rows: list[str], cols: list[str], title: str, diverging: bool = True) -> str:
        html = viz.heatmap_plotly(values, rows, cols, title=title, include_js=not self.js_done, diverging=diverging)
        self.js_done = True
        return html


GRAPH_PROMPT = "When Mary and John went to the store, John gave a drink to"


def _environment(rep: Report, model: HookedModel, out: Path) -> None:
    est = estimate_memory(model, batch=8, seq_len=128, cache_names="all")
    sec = Section("1. environment and memory", f"{env().summary()}\n\n{model!r}\n\n"
                                              f"memory estimate, batch 8 x 128 tokens, full cache:\n{est.summary()}",
                  key="environment")
    rep.add(sec)


def _lens_and_dla(rep: Report, model: HookedModel, out: Path, prompt: str = "The capital of France is") -> None:
    lens = logit_lens(model, prompt, targets=[" Paris"])
    lens.plot(out / "logit_lens.png")
    sec = Section(f"2. logit lens: {prompt!r}", lens.summary(), lens.figures_html(), ["logit_lens.png"], key="lens")
    rep.add(sec)
    dla = direct_logit_attribution(model, prompt, " Paris", " London")
    dla.plot(out / "dla.png")
    sec = Section("3. direct logit attribution of ' Paris' - ' London'", dla.summary(), "", ["dla.png"], key="dla")
    rep.add(sec)
    i = int(dla.values.abs().argmax())
    rep.find(f"{dla.components[i]} writes the largest direct share of the ' Paris' - ' London' logit difference "
             f"({dla.values[i]:+.2f} of {dla.target:+.2f}; the shares add up to it within {abs(dla.error):.1e})",
             float(dla.values[i]), f"the mean share of a component: {dla.target / len(dla.components):+.3f}", sec)
    rep.checklist.add("question", "which components write ' Paris' over ' London' for a factual prompt?", "#dla")
    rep.checklist.add("visualised", "logit lens and DLA pictures", "#lens")
    rep.metrics["dla_paris_london"] = dla.target


def _ioi(rep: Report, model: HookedModel, out: Path, figs: _Figures, n_prompts: int, seed: int, k: int = 3) -> None:
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
    v = heads.normalized()
    H = v.shape[1]
    top = [f"L{int(i) // H}H{int(i) % H}" for i in v.flatten().argsort(descending=True)[:k]]
    html = (figs.heatmap(*resid.grid(), title="IOI: patching the residual stream (clean into corrupted), normalised")
            + figs.heatmap(v, [f"L{l}" for l in range(v.shape[0])], [f"H{h}" for h in range(H)],
                           title="IOI: patching each head's output (z), normalised"))
    toks = train.clean[:1]
    comps = [Component.parse(t) for t in top]
    _, cache = model.run_with_cache(toks, names_filter=[act_name("pattern", c.layer) for c in comps])
    pats = torch.stack([cache["pattern", c.layer][0, c.index] for c in comps])
    html += viz.attention_viewer(model.to_str_tokens(toks[0]), pats, top,
                                 title="attention of the top heads on a clean IOI prompt (hover a token)")
    sec = Section("4. IOI activation patching (residual stream, then heads)", text, html,
                  ["ioi_resid.png", "ioi_heads.png"], key="ioi-patching")
    rep.add(sec)
    rep.find("attribution patching ranks heads as true activation patching does (correlation over all heads)", r,
             "exact activation patching of every head", sec, holds=r > 0.5)
    cmp = compare_to_random(model, held.clean, held.metric, top, method="mean", n_random=20,
                            reference=held.corrupted, seed=seed)
    a_top, diff, n_rand = cmp.target, cmp.difference, len(cmp.random_effects)
    holds = diff.excludes(0.0) and diff.value < 0 and cmp.p_value < 0.05
    verdict = (f"the top heads matter more than random heads (rank p = {cmp.p_value:.3f} over {n_rand} random sets)"
               if holds else f"not distinguishable from ablating random heads (rank p = {cmp.p_value:.3f})")
    text = (f"top {k} heads by patching on the train prompts: {', '.join(top)}\n"
            f"mean-ablate them on the {len(held)} held-out prompts, against {n_rand} random sets of {k} heads:\n"
            f"{cmp.summary()}\n=> {verdict}")
    rnd = cmp.random_effects
    table = _estimates_table([(f"top {k} heads ({', '.join(top)})", a_top.effect),
                              (f"random heads, first of {n_rand} sets", rnd[0]), ("top - mean of random (paired)", diff)],
                             "mean ablation on held-out prompts: change in logit difference (logits)")
    causal = Section("5. causal check on held-out prompts", text, f"{table}<p>{viz.esc(verdict)}</p>",
                     key="ioi-causal")
    rep.add(causal)
    rep.find(f"mean-ablating the top {k} IOI heads ({', '.join(top)}) on held-out prompts "
             f"{'lowers' if diff.value < 0 else 'raises'} the logit difference by {abs(diff.value):.2f} logits more "
             f"than random sets of {k} heads do", diff,
             f"{n_rand} random sets of {k} heads: effects {min(e.value for e in rnd):+.2f} to "
             f"{max(e.value for e in rnd):+.2f} (rank p = {cmp.p_value:.3f})", causal, holds=holds)
    rep.checklist.add("question", "which heads carry the indirect object's name in IOI?", "#ioi-patching")
    rep.checklist.add("technique", "activation patching (residual stream, then each head), checked by attribution "
                                   "patching", "#ioi-patching")
    rep.checklist.add("visualised", "interactive patching heatmaps and an attention viewer", "#ioi-patching")
    rep.checklist.add("causal", f"mean ablation of the top heads: {_fmt(a_top.effect)}", "#ioi-causal")
    rep.checklist.add("edge_cases", f"heads chosen on {len(train)} prompts, tested on {len(held)} held-out ones",
                      "#ioi-causal")
    rep.checklist.add("alternatives", f"{n_rand} random sets of {k} heads as a baseline; attribution patching vs "
                                      f"exact patching (r = {r:.2f})", "#ioi-causal")
    rep.metrics.update(ioi_top_heads=top, ioi_top_effect=a_top.effect.value,
                       ioi_random_effect=sum(e.value for e in rnd) / len(rnd), ioi_top_minus_random=diff.value,
                       ioi_rank_p=cmp.p_value, attribution_vs_patching_r=r)


def _induction(rep: Report, model: HookedModel, out: Path, figs: _Figures, seed: int) -> None:
    ind = induction_scores(model, seed=seed)
    ind.plot(out / "induction.png")
    top = [n for n, _ in ind.top(4)]

    def check(s):
        toks, _ = induction_tokens(model, 20, 16, seed=100 + s)  # 16 sequences: enough for a CI (10+)
        ref = induction_tokens(model, 20, 16, seed=1000 + s)[0]
        return compare_to_random(model, toks, labelled(lambda lg: induction_loss(lg, toks, 20),
                                                       "next-token loss on the repeated half", "nats per token",
                                                       "lower is better"),
                                 top, method="mean", n_random=20, reference=ref, seed=s)

    checks = [check(s) for s in range(3)]
    agg = across_seeds(lambda s: checks[s].difference.value, seeds=range(3), name="loss increase, top - random")
    text = f"{ind.summary(6)}\n\nseed 0:\n{checks[0].summary()}\n\n{agg.summary()}"
    sc = ind.scores
    html = figs.heatmap(sc, [f"L{l}" for l in range(sc.shape[0])], [f"H{h}" for h in range(sc.shape[1])],
                        title="induction score per head (repeated random tokens)", diverging=False)
    spread = bootstrap_ci(agg.values)
    html += _estimates_table([(f"seed {i}: top 4 - random", c.difference) for i, c in enumerate(checks)]
                             + [("mean over seeds", spread)], "mean ablation: loss increase on repeated tokens (nats)")
    sec = Section("6. induction heads and their ablation evidence", text, html, ["induction.png"], key="induction")
    rep.add(sec)
    rep.find(f"mean-ablating the 4 top induction heads ({', '.join(top)}) raises the loss on repeated tokens by "
             f"{float(agg.mean):.2f} nats more than random heads (3 seeds)", spread,
             f"20 random sets of 4 heads per seed; seed 0: effects {min(e.value for e in checks[0].random_effects):+.2f}"
             f" to {max(e.value for e in checks[0].random_effects):+.2f} (rank p = {checks[0].p_value:.3f})", sec,
             holds=all(c.difference.excludes(0.0) and c.difference.value > 0 for c in checks))
    rep.checklist.add("causal", f"ablating the induction heads vs random heads over 3 seeds: {_fmt(spread)}",
                      "#induction")
    rep.checklist.add("edge_cases", "the induction check repeated on 3 seeds of fresh random tokens", "#induction")
    rep.metrics.update(induction_heads=top, induction_top_minus_random=float(agg.mean))


def _probe(rep: Report, model: HookedModel, out: Path, toks: torch.Tensor) -> None:
    n = model.cfg.n_layers
    layers = sorted({0, n // 3, 2 * n // 3, n - 3})
    probe = probe_sweep(model, toks, next_token_continues_word(model, toks),
                        hooks=[act_name("resid_post", l) for l in layers], task="next token continues the word")
    probe.plot(out / "probe.png")
    sec = Section("7. linear probe with a control task", probe.summary(), probe.figures_html(), ["probe.png"], key="probe")
    rep.add(sec)
    best = probe.best
    sel = probe.selectivity[best]
    rep.find(f"a linear probe at {probe.hooks[best]} reads whether the next token continues the word, above its "
             f"control task (selectivity: task accuracy minus control accuracy, in accuracy points)", sel,
             f"held-out accuracy of the same probe: task {_fmt(probe.scores[best])} against the control task (random "
             f"labels per token type) {_fmt(probe.control[best])}; selectivity is their difference", sec,
             holds=sel.excludes(0.0) and sel.value > 0)
    rep.checklist.add("alternatives", "the probe's control task (Hewitt & Liang 2019)", "#probe")
    rep.metrics["probe_best_selectivity"] = sel.value


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
    sec = Section("8. a short SAE run and its features", text,
                  f"<p>{viz.esc(ev.summary().splitlines()[0])}</p><p><a href='features/index.html'>all feature "
                  f"dashboards</a> (separate pages beside this report)</p><ul>{links}</ul>", key="sae")
    rep.add(sec)
    rep.find(f"a 200-step TopK SAE on {hook} recovers this fraction of the cross-entropy lost to zero-ablating the "
             f"layer, at L0 {ev.l0:.0f}", ev.ce_recovered,
             f"zero-ablation: CE {ev.ce_zero:.2f} vs clean {ev.ce_clean:.2f} (SAE: {ev.ce_sae:.2f})", sec,
             holds=ev.ce_recovered > 0)
    rep.metrics.update(sae_l0=ev.l0, sae_explained_variance=ev.explained_variance, sae_ce_recovered=ev.ce_recovered)


def _graph(rep: Report, model: HookedModel, out: Path, prompt: str = GRAPH_PROMPT, max_features: int = 2048) -> None:
    """An attribution graph of ``prompt``, when transcoders for every layer are in the cache (else a pointer)."""
    from .graphs import attribution_graph, intervene
    from .graphs.html import graph_html
    from .graphs.nodes import LOGIT
    from .sae import load_transcoders, transcoder_cache

    folder = transcoder_cache(model.cfg.model_name)
    tcs = load_transcoders(folder, model) if folder.is_dir() else []
    if len(tcs) != model.cfg.n_layers:
        rep.add(Section("9. attribution graph", f"no transcoders for every layer in {folder}: run `mechscope "
                        "transcoders train` once (about 30 min for SmolLM2 here) and the demo adds an attribution "
                        "graph of an IOI prompt here", key="graph"))
        return
    g = attribution_graph(model, tcs, prompt, max_feature_nodes=max_features, progress=False)
    pruned = g.prune()
    atomic_write(out / "graph.html", viz.page(f"attribution graph: {prompt}", graph_html(pruned)))
    iv = intervene(model, g, tcs, g.top_features(3).tolist(), scale=0.0)
    summary = g.summary()
    sec = Section("9. attribution graph", f"{summary}\n{pruned.summary()}\n\n{iv.summary()}",
                  f"<p><a href='graph.html'>the interactive graph</a> (a page beside this report)</p>"
                  f"<pre>{viz.esc(summary)}</pre>", key="graph")
    rep.add(sec)
    cert = g.certificate or {"worst_rel": float("nan"), "n": 0}
    rep.find(f"the attribution graph of {prompt!r} ({len(tcs)} transcoders) is exact about its replacement model: "
             f"{cert['n']} edges re-checked by perturbation, worst relative error", cert["worst_rel"],
             "1e-4, the exactness bar", sec, holds=cert["worst_rel"] < 1e-4)
    target = g.token_labels[0]
    rep.find(f"removing the graph's 3 most influential features from the real model moves the {target!r} logit by "
             f"(predicted {iv.predicted_graph[0]:+.2f})", iv.measured[0], "0: no feature removed", sec,
             holds=(iv.measured[0] < 0) == (iv.predicted_graph[0] < 0))
    rep.metrics.update(graph_replacement_score=g.scores()["replacement"], graph_seconds=g.stats["seconds"],
                       graph_certificate_worst_rel=cert["worst_rel"], graph_logit=int(g.index[g.nodes_of(LOGIT)[0]]))


def _reproducibility(rep: Report, model: HookedModel, seed: int, n_prompts: int) -> None:
    from .project import provenance

    prov = provenance()
    commit, dirty, v = prov["git"]["commit"], prov["git"]["dirty"], prov["versions"]
    rep.metrics.update(seed=seed, n_prompts=n_prompts, model=model.cfg.model_name, versions=v, commit=commit)
    if commit and not dirty:
        rep.checklist.add("reproducibility", f"seed {seed}, commit {commit[:10]} (clean), torch {v['torch']}, "
                                             f"transformers {v['transformers']}; all numbers in record.json",
                          "record.json")
    else:
        rep.checklist.missing("reproducibility", f"seed {seed} and versions are in record.json, but "
                              + ("this is not a git checkout" if not commit else "the working tree has uncommitted "
                                 "changes") + f" (torch {v['torch']}, transformers {v['transformers']})")


def demo_investigation(model: HookedModel, out: str | Path = "mechscope-demo", n_prompts: int = 12, seed: int = 0,
                       echo: bool = True) -> Report:
    """Run the demo investigation on ``model`` and write ``out/report.html`` with PNGs beside it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rep = Report(f"mechscope investigation of {model.cfg.model_name}", echo=echo)
    figs = _Figures()
    t0 = time.time()
    steps = [lambda: _environment(rep, model, out), lambda: _lens_and_dla(rep, model, out),
             lambda: _ioi(rep, model, out, figs, n_prompts, seed), lambda: _induction(rep, model, out, figs, seed)]
    toks = corpus.pack(model, corpus.default_corpus("test"), 64, n_seqs=32)
    steps += [lambda: _probe(rep, model, out, toks), lambda: _sae(rep, model, out, toks),
              lambda: _graph(rep, model, out)]
    names = ["environment", "lens and DLA", "IOI patching", "induction heads", "probe", "SAE", "attribution graph"]
    for i, (name, step) in enumerate(zip(names, steps)):
        stage(f"demo {i + 1}/{len(steps)}: {name}")
        step()
    _reproducibility(rep, model, seed, n_prompts)
    path = rep.write(out)
    if echo:
        print(f"\nreport: {path.resolve()}  ({time.time() - t0:.1f} s)")
    return rep
