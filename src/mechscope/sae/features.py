"""Reading SAE features: max-activating examples, histograms, logit effects, dashboards, search, interventions.

In the spirit of sae_vis and Neuronpedia, a feature dashboard shows its firing density, a
histogram of its nonzero activations, the top and bottom tokens of ``W_dec[i] @ W_U`` (its direct
logit effect, through the unembedding only), the top activating contexts and samples from
activation quantiles, each with about 5 tokens of context and per-token activations. Examples
are gathered in one streaming pass over the corpus, keeping only a fixed number per feature, so
memory does not grow with the corpus.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from ..analysis import viz
from ..core.errors import InputError
from ..core.files import atomic_write
from ..core.model import HookedModel
from ..core.progress import bar
from ..core.result import Result
from .data import harvest, token_keep_mask
from .interventions import ablate_features_hook, steer_hook  # noqa: F401  (their home before 0.6)
from .model import SAE


def _token_acts(model: HookedModel, hook: str, tokens: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """``[n * pos, width]``: one row per token of ``tokens [n, pos]``, in order, none skipped or
    dropped (unlike training harvests), so that rows map back to ``[n, pos]``."""
    return harvest(model, hook, tokens, batch_size, skip_first=0, max_norm_ratio=None)


def token_latents(model: HookedModel, sae: "SAE", tokens: torch.Tensor, batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """``(acts [n * pos, width], latents [n * pos, d_sae])`` for every token of ``tokens [n, pos]``, in order: the
    activations its encoder reads at ``sae.cfg.hook_name`` and its latents. A dictionary whose latents need more than
    one hook of one model (a crosscoder's view, which reads two models) supplies its own ``token_latents``."""
    own = getattr(sae, "token_latents", None)
    if own is not None:
        return own(tokens, batch_size)
    acts = _token_acts(model, sae.cfg.hook_name, tokens, batch_size)
    return acts, sae.encode(acts)


@dataclass
class Example:
    activation: float
    tokens: list[str]  # the context window
    acts: list[float]  # per-token activation of the feature in the window
    center: int  # index of the max token in the window


@dataclass(repr=False)
class FeatureStats(Result):
    """What one pass over a corpus says about every feature (streamed; bounded memory)."""

    n_tokens: int
    fire_count: torch.Tensor  # [d_sae]
    max_act: torch.Tensor  # [d_sae]
    top: dict[int, list[Example]]
    quantile_samples: dict[int, list[Example]]
    hist: dict[int, torch.Tensor]  # feature -> histogram counts of nonzero activations
    hist_edges: dict[int, torch.Tensor]
    bands: dict[int, str] = field(default_factory=dict)  # feature -> its density band, when chosen by band

    _skip_in_dict = ("hist", "hist_edges", "quantile_samples")

    @property
    def density(self) -> torch.Tensor:
        return self.fire_count.float() / max(self.n_tokens, 1)

    def summary(self) -> str:
        fired = int((self.fire_count > 0).sum())
        lines = [f"{fired} of {self.fire_count.numel()} features fired on {self.n_tokens} tokens; "
                 f"examples kept for {len(self.top)}"]
        for i, ex in list(self.top.items())[:10]:
            ctx = "".join(ex[0].tokens) if ex else ""
            lines.append(f"  feature {i:6d}  density {float(self.density[i]):.3%}  max {float(self.max_act[i]):.3f}  "
                         f"{ctx!r}")
        return "\n".join(lines)


#: Firing-density bands for choosing features to read: dense features are rarely monosemantic, and the rare ones are
#: where most interpretable features live, so a sample across bands shows what the SAE really holds.
DENSITY_BANDS = ((0.1, 1.01, "dense: fires on >= 10% of tokens"), (0.01, 0.1, "1-10%"), (0.001, 0.01, "0.1-1%"),
                 (1e-4, 0.001, "0.01-0.1%"), (0.0, 1e-4, "rare: < 0.01%"))


def features_by_density(density: torch.Tensor, n: int = 20, seed: int = 0) -> dict[int, str]:
    """About ``n`` live features sampled evenly across :data:`DENSITY_BANDS` (a band's unused share goes to the
    others), as ``{feature: band}``, rarest band last. ``density [d_sae]`` is each feature's firing rate."""
    g = torch.Generator().manual_seed(seed)
    queues = []
    for lo, hi, _ in DENSITY_BANDS:
        m = ((density > lo) & (density < hi)).nonzero().flatten() if lo == 0 else \
            ((density >= lo) & (density < hi)).nonzero().flatten()
        queues.append([int(x) for x in m[torch.randperm(m.numel(), generator=g)]])
    out: dict[int, str] = {}
    while len(out) < n and any(queues):  # round robin: one from each band that has any left
        for b, q in enumerate(queues):
            if q and len(out) < n:
                out[q.pop()] = DENSITY_BANDS[b][2]
    order = {label: i for i, (_, _, label) in enumerate(DENSITY_BANDS)}
    return dict(sorted(out.items(), key=lambda kv: (order[kv[1]], -float(density[kv[0]]))))


class _Density:
    """How often each of ``d`` features fires, and its largest activation, over the kept tokens."""

    def __init__(self, d: int):
        self.fire, self.max, self.n_tokens = torch.zeros(d, dtype=torch.long), torch.zeros(d), 0

    def update(self, f: torch.Tensor, keep: torch.Tensor) -> None:  # f [b, pos, d] (zero where not kept)
        self.fire += (f > 0).sum((0, 1))
        self.max = torch.maximum(self.max, f.amax((0, 1)))
        self.n_tokens += int(keep.sum())


class _TopExamples:
    """The ``n`` largest activations of one feature, each with its window of ``context`` tokens each side (a heap)."""

    def __init__(self, n: int, context: int):
        self.n, self.context, self.heap, self.counter = n, context, [], 0

    def update(self, fi: torch.Tensor, row0: int) -> None:  # fi [b, pos]: one feature, rows row0 ...
        k = min(self.n, int((fi > 0).sum()))
        if k == 0:
            return
        P = fi.shape[1]
        vals, idx = fi.flatten().topk(k)
        for v, j in zip(vals.tolist(), idx.tolist()):
            b, p = divmod(j, P)
            self.counter += 1
            item = (v, self.counter, row0 + b, p, _window(fi[b], p, self.context))
            if len(self.heap) < self.n:
                heapq.heappush(self.heap, item)
            elif v > self.heap[0][0]:
                heapq.heapreplace(self.heap, item)

    def items(self) -> list[tuple]:
        return [(v, row, p, w) for v, _, row, p, w in sorted(self.heap, reverse=True)]


class _FiringSample:
    """A bounded uniform sample of one feature's firing positions (5 per batch, the last ``cap`` kept), from which
    the quantile view picks ``n_quantiles`` examples."""

    def __init__(self, context: int, generator: torch.Generator, cap: int = 200):
        self.context, self.g, self.cap, self.pool = context, generator, cap, []

    def update(self, fi: torch.Tensor, row0: int) -> None:
        pos = torch.nonzero(fi > 0)
        take = pos[torch.randperm(len(pos), generator=self.g)[:5]]
        self.pool.extend((float(fi[b, p]), row0 + int(b), int(p), _window(fi[b], p, self.context)) for b, p in take.tolist())
        self.pool = self.pool[-self.cap:]

    def quantiles(self, n_quantiles: int = 10) -> list[tuple]:
        s = sorted(self.pool)
        return [s[int(q * (len(s) - 1))] for q in torch.linspace(0, 1, n_quantiles).tolist()] if s else []


class _Histogram:
    """One feature's nonzero activations, binned at the end into ``n_bins`` from 0 to its maximum."""

    def __init__(self, n_bins: int):
        self.n_bins, self.values = n_bins, []

    def update(self, fi: torch.Tensor) -> None:
        self.values.append(fi[fi > 0].float())

    def finish(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        allv = torch.cat(self.values) if self.values else torch.zeros(0)
        if not allv.numel():
            return None
        top = float(allv.max())
        return torch.histc(allv, bins=self.n_bins, min=0, max=top), torch.linspace(0, top, self.n_bins + 1)


def _window(row: torch.Tensor, p: int, context: int) -> list[float]:
    """The activations of ``row [pos]`` from ``p - context`` to ``p + context``."""
    return row[max(0, p - context):min(row.shape[0], p + context + 1)].tolist()


@torch.no_grad()
def feature_stats(model: HookedModel, sae: SAE, tokens: torch.Tensor, features: Sequence[int] | None = None, n_top: int = 20,
                  context: int = 5,
                  batch_size: int = 8, n_bins: int = 30, seed: int = 0, skip_first: int = 1,
                  max_norm_ratio: float | None = 10.0) -> FeatureStats:
    """One streaming pass over ``tokens [n, pos]``: density and max for all features; top examples,
    quantile samples and activation histograms for ``features``. The default, ``features=None``, is 20 features
    sampled across firing-density bands (:func:`features_by_density`), found by a first, density-only pass;
    ``features="densest"`` keeps the old rule (the 20 densest after a first batch).

    Tokens the SAE was not trained on are left out by the rule harvests use
    (:func:`~mechscope.sae.data.token_keep_mask`): the first ``skip_first`` positions (the attention sink,
    whose residual norm is ~140x the median in SmolLM2's layer 15) and tokens whose norm exceeds
    ``max_norm_ratio`` x their sequence's median. Kept in, they fill every feature's top examples with the
    same sink tokens.
    """
    d, P = sae.cfg.d_sae, tokens.shape[1]
    bands: dict[int, str] = {}
    if features is None:
        pre = _Density(d)
        for s in bar(range(0, tokens.shape[0], batch_size), desc="feature density"):
            toks = tokens[s:s + batch_size]
            acts, lat = token_latents(model, sae, toks, batch_size)
            keep = token_keep_mask(acts.reshape(toks.shape[0], P, -1), skip_first, max_norm_ratio)
            pre.update(lat.reshape(toks.shape[0], P, d) * keep[..., None], keep)
        bands = features_by_density(pre.fire.float() / max(pre.n_tokens, 1), 20, seed)
        features = list(bands)
    elif features == "densest":
        features = None
    density = _Density(d)
    g = torch.Generator().manual_seed(seed)
    tops: dict[int, _TopExamples] = {}
    samples: dict[int, _FiringSample] = {}
    hists: dict[int, _Histogram] = {}
    for s in range(0, tokens.shape[0], batch_size):
        toks = tokens[s:s + batch_size]
        acts, lat = token_latents(model, sae, toks, batch_size)
        keep = token_keep_mask(acts.reshape(toks.shape[0], P, -1), skip_first, max_norm_ratio)
        f = lat.reshape(toks.shape[0], P, d) * keep[..., None]
        density.update(f, keep)
        if features is None:
            live = torch.nonzero(density.fire > 0).flatten()
            features = live[density.fire[live].argsort(descending=True)][:20].tolist()
        for i in features:
            fi = f[..., i]
            hists.setdefault(i, _Histogram(n_bins)).update(fi)
            tops.setdefault(i, _TopExamples(n_top, context)).update(fi, s)
            samples.setdefault(i, _FiringSample(context, g)).update(fi, s)
    strs_cache: dict[int, list[str]] = {}

    def example(v, row, p, window_acts):
        if row not in strs_cache:
            strs_cache[row] = model.to_str_tokens(tokens[row])
        lo = max(0, p - context)
        return Example(v, strs_cache[row][lo:lo + len(window_acts)], window_acts, p - lo)

    features = features or []
    top = {i: [example(*it) for it in (tops[i].items() if i in tops else [])] for i in features}
    qs = {i: [example(*it) for it in (samples[i].quantiles() if i in samples else [])] for i in features}
    hist, edges = {}, {}
    for i in features:
        h = hists[i].finish() if i in hists else None
        if h is not None:
            hist[i], edges[i] = h
    return FeatureStats(density.n_tokens, density.fire, density.max, top, qs, hist, edges, bands)


@torch.no_grad()
def logit_effects(model: HookedModel, sae: SAE, feature: int,
                  k: int = 10) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """Top and bottom ``k`` tokens of ``W_dec[feature] @ W_U`` (direct effect through the unembedding only; a
    transcoder's decoder row is read in its output space)."""
    eff = sae.write_directions(torch.tensor([feature]))[0].float() @ model.W_U.float().cpu()
    top, bot = eff.topk(k), (-eff).topk(k)
    tok = model.tokens.need_tokenizer()
    name = lambda i: tok.decode([int(i)])  # noqa: E731
    return ([(name(i), float(v)) for v, i in zip(top.values, top.indices)],
            [(name(i), float(-v)) for v, i in zip(bot.values, bot.indices)])


def _example_html(ex: Example) -> str:
    m = max(ex.acts + [1e-9])
    spans = []
    for j, (t, a) in enumerate(zip(ex.tokens, ex.acts)):
        style = f"background:rgba(255,120,0,{min(1.0, a / m):.2f});"
        if j == ex.center:
            style += "border-bottom:2px solid #000;"
        spans.append(f"<span class='ms-tok' style='{style}' title='{viz.esc(f'{a:.3f}')}'>{viz.esc(t)}</span>")
    return f"<div class='ms-ex'><b>{ex.activation:.3f}</b> {''.join(spans)}</div>"


def dashboard_html(model: HookedModel, sae: SAE, stats: FeatureStats, feature: int, heading: bool = True) -> str:
    """One feature's dashboard as an HTML fragment (every token escaped); ``heading=False`` leaves out its title
    (a page that has one)."""
    dens = float(stats.density[feature])
    top, bot = logit_effects(model, sae, feature)
    band = f" (density band: {stats.bands[feature]})" if feature in stats.bands else ""
    expl = getattr(sae, "explanations", {}).get(feature)
    parts = [(f"<h2>feature {feature}</h2>" if heading else "")
             + (f"<p><b>explanation</b> (autointerp; see its scores in explanations.json): {viz.esc(expl)}</p>"
                if expl else "")
             + f"<p>fires on {dens:.3%} of {stats.n_tokens} "
             f"tokens{viz.esc(band)}; max activation {float(stats.max_act[feature]):.3f}</p>"]
    if feature in stats.hist:
        h, e = stats.hist[feature], stats.hist_edges[feature]
        bars = "".join(f"<div title='{float(e[j]):.2f}-{float(e[j + 1]):.2f}: {int(c)}' style='display:inline-block;"
                       f"width:8px;margin-right:1px;background:#36c;height:{int(100 * float(c) / max(float(h.max()), 1))}px'>"
                       f"</div>" for j, c in enumerate(h))
        parts.append(f"<h3>activation histogram (nonzero)</h3><div style='display:flex;align-items:flex-end;"
                     f"height:105px'>{bars}</div>")
    row = lambda xs: "".join(f"<tr><td>{viz.esc(repr(t))}</td><td>{v:+.3f}</td></tr>" for t, v in xs)  # noqa: E731
    parts.append(f"<h3>logit effect (W_dec @ W_U)</h3><table class='ms-heat'><tr><th>promoted</th><th></th></tr>"
                 f"{row(top)}</table><table class='ms-heat'><tr><th>suppressed</th><th></th></tr>{row(bot)}</table>")
    parts.append("<h3>top activations</h3>" + "".join(_example_html(x) for x in stats.top.get(feature, [])))
    parts.append("<h3>samples across activation quantiles</h3>" +
                 "".join(_example_html(x) for x in stats.quantile_samples.get(feature, [])))
    return "".join(parts)


def _marked_context(ex: Example) -> str:
    """An example's context as escaped HTML with the firing token marked."""
    return "".join(f"<mark>{viz.esc(t)}</mark>" if j == ex.center else viz.esc(t) for j, t in enumerate(ex.tokens))


def write_dashboards(model: HookedModel, sae: SAE, stats: FeatureStats, folder: str | Path,
                     source: str = "") -> Path:
    """An HTML page per feature in ``stats.top`` plus ``index.html`` (offline; written atomically). The index groups
    the features by density band (when chosen by band), marks the firing token in each top context, and every
    page links back to it. ``source`` says what text the examples come from."""
    folder = Path(folder)
    css = ("<style>.ms-tok{white-space:pre;padding:0 1px}.ms-ex{margin:3px 0;font-family:monospace}"
           "mark{background:#fb3;font-weight:bold}</style>")
    back = "<p><a href='index.html'>&larr; all features</a></p>"
    rows, last_band = [], None
    for i in stats.top:
        atomic_write(folder / f"feature_{i}.html", viz.page(f"feature {i}", css + back + dashboard_html(
            model, sae, stats, i, heading=False) + back))
        band = stats.bands.get(i)
        if band is not None and band != last_band:
            rows.append(f"<tr><th colspan='4' style='text-align:left'>density band: {viz.esc(band)}</th></tr>")
            last_band = band
        best = stats.top[i][0] if stats.top[i] else None
        snippet = _marked_context(best) if best else ""
        rows.append(f"<tr><td><a href='feature_{i}.html'>{i}</a></td><td>{float(stats.density[i]):.3%}</td>"
                    f"<td>{float(stats.max_act[i]):.3f}</td><td style='white-space:pre;text-align:left'>{snippet}"
                    "</td></tr>")
    chosen = ("sampled across firing-density bands (dense features are rarely monosemantic)" if stats.bands
              else "as given")
    index = (f"<p>{viz.esc(sae.cfg.architecture)} SAE on {viz.esc(sae.cfg.hook_name)}, {sae.cfg.d_sae} features; "
             f"{int((stats.fire_count == 0).sum())} never fired on {stats.n_tokens} tokens"
             + (f" of {viz.esc(source)}" if source else "") + f". Features shown: {len(stats.top)}, {chosen}; the "
             "marked token is where the top example fires.</p>"
             "<table class='ms-heat'><tr><th>feature</th><th>density</th><th>max</th><th>top context</th></tr>"
             + "".join(rows) + "</table>" + css)
    return atomic_write(folder / "index.html", viz.page("SAE features", index))


@dataclass(repr=False)
class TokenFeatures(Result):
    """The features that fire most on one text, token by token: ``acts [pos, k]`` for the ``k`` features ranked by
    their summed activation. Iterating gives ``(feature, total activation)`` pairs, as before 0.6."""

    text: str
    tokens: list[str]  # every token of the text; the first (the sink) is not read by the SAE
    features: list[int]
    totals: list[float]
    acts: torch.Tensor  # [pos, k]
    hook: str = ""

    def __iter__(self):
        return iter(zip(self.features, self.totals))

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i):
        return (self.features[i], self.totals[i])

    def summary(self, per_feature: int = 6) -> str:
        lines = [f"top {len(self.features)} features on {self.text!r} ({len(self.tokens)} tokens; SAE on {self.hook}; "
                 "the first token, the attention sink, is not read)",
                 f"{'feature':>8s} {'total':>8s}  fires on (position: token activation), strongest first"]
        for j, (i, tot) in enumerate(zip(self.features, self.totals)):
            col = self.acts[:, j]
            on = [p for p in col.argsort(descending=True).tolist() if float(col[p]) > 0][:per_feature]
            fires = ", ".join(f"{p}: {self.tokens[p]!r} {float(col[p]):.2f}" for p in on) or "(none)"
            more = int((col > 0).sum()) - len(on)
            lines.append(f"{i:8d} {tot:8.3f}  {fires}" + (f" (+{more} more)" if more > 0 else ""))
        return "\n".join(lines)

    def _html_body(self) -> str:
        return viz.heatmap_html(self.acts.T, [f"feature {i}" for i in self.features],
                                viz.position_labels(self.tokens), title="feature activation by token")

    def plot(self, path: str | Path = "features.png") -> Path:
        return viz.heatmap_png(self.acts.T, [f"feature {i}" for i in self.features], viz.position_labels(self.tokens),
                               path, title="feature activation by token", xlabel="position: token")


@torch.no_grad()
def top_features(model: HookedModel, sae: SAE, text: str, k: int = 10) -> TokenFeatures:
    """The ``k`` features with the largest summed activation on ``text``, with each one's activation on every token
    (the first token, the sink, left out as in training)."""
    toks = model.to_tokens(text)
    acts = harvest(model, sae.cfg.hook_name, toks, max_norm_ratio=None)  # one row per position 1.., none dropped
    if acts.shape[0] == 0:
        raise InputError(f"{text!r} has no token after the first one; the SAE reads positions 1 onwards")
    f = sae.encode(acts)  # [pos - 1, d_sae]
    k = min(k, f.shape[1])
    v, i = f.sum(0).topk(k)
    per_tok = torch.cat([torch.zeros(1, k), f[:, i].float().cpu()])  # position 0 (the sink) reads as 0
    strs = model.to_str_tokens(toks[0]) if model.tokenizer is not None else [str(int(t)) for t in toks[0]]
    return TokenFeatures(text, strs, [int(a) for a in i], [float(b) for b in v], per_tok, sae.cfg.hook_name)


@torch.no_grad()
def separating_features(model: HookedModel, sae: SAE, texts_a: list[str], texts_b: list[str],
                        k: int = 10) -> list[tuple[int, float]]:
    """Features whose mean activation differs most between two sets of texts: ``[(feature, mean_a - mean_b)]``."""
    def mean_acts(texts):
        return torch.stack([sae.encode(_token_acts(model, sae.cfg.hook_name, model.to_tokens(t))).mean(0)
                            for t in texts]).mean(0)

    diff = mean_acts(texts_a) - mean_acts(texts_b)
    idx = diff.abs().topk(k).indices
    return [(int(i), float(diff[i])) for i in idx]
