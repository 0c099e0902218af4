"""Pictures: heatmaps as PNG (matplotlib) and as self-contained HTML (no CDN, every string escaped)."""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Sequence

import torch

from ..core.errors import InputError
from ..core.files import atomic_write


def esc(s: object) -> str:
    """HTML-escape any token or string, quotes included."""
    return html.escape(str(s), quote=True)


def _color(v: float, vmin: float, vmax: float, diverging: bool) -> str:
    if vmax == vmin:
        t = 0.5
    else:
        t = (v - vmin) / (vmax - vmin)
    t = min(max(t, 0.0), 1.0)
    if diverging:  # blue - white - red
        if t < 0.5:
            a = 1 - 2 * t
            return f"rgb({int(255 - 200 * a)},{int(255 - 150 * a)},255)"
        a = 2 * t - 1
        return f"rgb(255,{int(255 - 170 * a)},{int(255 - 200 * a)})"
    return f"rgb({int(255 - 200 * t)},{int(255 - 120 * t)},{int(255 - 40 * t)})"


def ranges(xs: Sequence[int | str]) -> str:
    """Integers as runs, for text: ``[0, 1, 2, 5]`` -> ``"0-2, 5"`` (``"none"`` when empty; non-integers joined)."""
    try:
        v = sorted(int(x) for x in xs)
    except (TypeError, ValueError):
        return ", ".join(map(str, xs))
    out, i = [], 0
    while i < len(v):
        j = i
        while j + 1 < len(v) and v[j + 1] == v[j] + 1:
            j += 1
        out.append(str(v[i]) if i == j else f"{v[i]}-{v[j]}")
        i = j + 1
    return ", ".join(out) or "none"


def position_labels(str_tokens: Sequence[str], positions: Sequence[int] | None = None,
                    other: Sequence[str] | None = None) -> list[str]:
    """Axis labels for positions, with their tokens as circuitsvis shows them: ``0: '<bos>'``, ``11: ' big'``.

    ``other`` (e.g. the corrupted prompt's tokens): where it differs, both are shown, ``3: ' Mary'→' John'``."""
    positions = range(len(str_tokens)) if positions is None else positions
    out = []
    for p in positions:
        p = int(p)
        tok = str_tokens[p] if -len(str_tokens) <= p < len(str_tokens) else "?"
        label = f"{p}: {tok!r}"
        if other is not None and p < len(other) and other[p] != tok:
            label += f"→{other[p]!r}"
        out.append(label)
    return out


def heatmap_html(
    values: torch.Tensor,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    title: str = "",
    cell_text: Sequence[Sequence[str]] | None = None,
    diverging: bool = False,
    fmt: str = "{:.3f}",
) -> str:
    """A ``[rows, cols]`` heatmap as an HTML table; hovering a cell shows its row, column and value."""
    v = values.detach().float().cpu()
    finite = v[torch.isfinite(v)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.numel() else (0.0, 1.0)
    if diverging:
        m = max(abs(vmin), abs(vmax))
        vmin, vmax = -m, m
    out = [f"<h3>{esc(title)}</h3>" if title else "", '<table class="ms-heat"><tr><th></th>']
    out += [f"<th>{esc(c)}</th>" for c in col_labels]
    out.append("</tr>")
    for i, r in enumerate(row_labels):
        out.append(f"<tr><th>{esc(r)}</th>")
        for j, c in enumerate(col_labels):
            x = float(v[i, j])
            text = cell_text[i][j] if cell_text is not None else fmt.format(x)
            tip = f"{r} / {c}: {fmt.format(x)}"
            out.append(f'<td style="background:{_color(x, vmin, vmax, diverging)}" title="{esc(tip)}">'
                       f"{esc(text)}</td>")
        out.append("</tr>")
    out.append("</table>")
    return "".join(out)


PAGE_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table.ms-heat{border-collapse:collapse;font-size:12px}
table.ms-heat td,table.ms-heat th{border:1px solid #ddd;padding:2px 5px;text-align:center;white-space:pre}
table.ms-heat th{background:#f5f5f5;font-weight:normal}
pre{background:#f7f7f7;padding:.7em}
"""


def page(title: str, body: str) -> str:
    """A complete offline HTML page (inline CSS, no external scripts)."""
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>"
            f"<style>{PAGE_CSS}</style></head><body><h2>{esc(title)}</h2>{body}</body></html>")


def figure(*args, **kwargs) -> tuple:
    """A matplotlib figure and axes on the non-interactive Agg backend: ``fig, ax = figure(figsize=(6, 4))``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def save_figure(fig: object, path: str | os.PathLike) -> Path:
    """Lay out, render to PNG, close, and write atomically."""
    import io

    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return atomic_write(path, buf.getvalue())


def line_with_band(ax: object, x: Sequence[float], y: Sequence[float], low: Sequence[float], high: Sequence[float],
                   label: str = "") -> None:
    """A line with a shaded confidence band (e.g. a bootstrap CI) on matplotlib axes."""
    ax.plot(x, y, marker="o", ms=3, label=label)
    ax.fill_between(x, low, high, alpha=0.25)


def heatmap_png(
    values: torch.Tensor,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    path: str | os.PathLike,
    title: str = "",
    cell_text: Sequence[Sequence[str]] | None = None,
    diverging: bool = False,
    xlabel: str = "",
    ylabel: str = "",
) -> Path:
    """Save a ``[rows, cols]`` heatmap with token labels on the axes as a PNG (written atomically)."""
    v = values.detach().float().cpu().numpy()
    rows, cols = v.shape
    fig, ax = figure(figsize=(max(4, 0.9 * cols + 2), max(3, 0.32 * rows + 1.5)))
    kw = {}
    if diverging:
        m = float(abs(v).max()) or 1.0
        kw = dict(cmap="RdBu_r", vmin=-m, vmax=m)
    else:
        kw = dict(cmap="Blues")
    im = ax.imshow(v, aspect="auto", **kw)
    ax.set_xticks(range(cols), [repr(c)[1:-1] for c in col_labels], rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(rows), list(row_labels), fontsize=8)
    if cell_text is not None:
        norm = im.norm
        for i in range(rows):
            for j in range(cols):
                dark = abs(float(norm(v[i, j])) - (0.5 if diverging else 0.0)) > (0.3 if diverging else 0.6)
                ax.text(j, i, repr(cell_text[i][j])[1:-1], ha="center", va="center", fontsize=6,
                        color="white" if dark else "black")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    fig.colorbar(im, ax=ax)
    return save_figure(fig, path)


def json_for_script(obj: object) -> str:
    """JSON that is safe inside a <script> element: ``<``, ``>`` and ``&`` are written as ``\\u003c`` ...,
    so no ``</script>`` or ``<!--`` can appear (the parsed values are unchanged)."""
    import json

    return json.dumps(obj).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


_VIEWER_JS = """
(function(){
  var root = document.getElementById(%(id)s), data = %(data)s;
  var sel = root.querySelector('select'), box = root.querySelector('.ms-toks'), info = root.querySelector('.ms-info');
  data.heads.forEach(function(h, i){
    var o = document.createElement('option'); o.value = i; o.textContent = h; sel.appendChild(o); });
  var spans = data.tokens.map(function(t, i){
    var s = document.createElement('span'); s.textContent = t; s.className = 'ms-tok'; s.dataset.i = i;
    box.appendChild(s); return s; });
  var pinned = -1;
  function show(q){
    var row = data.pattern[+sel.value][q];
    spans.forEach(function(s, k){ var w = k < row.length ? row[k] : 0;
      s.style.background = 'rgba(220,60,40,' + Math.min(1, w).toFixed(3) + ')';
      s.style.outline = k === q ? '2px solid #36c' : 'none'; s.title = 'attention ' + w.toFixed(3); });
    info.textContent = 'query ' + q + ' (' + JSON.stringify(data.tokens[q]) + '), head ' + data.heads[+sel.value];
  }
  spans.forEach(function(s){ s.addEventListener('mouseenter', function(){ if (pinned < 0) show(+s.dataset.i); });
    s.addEventListener('click', function(){ pinned = pinned === +s.dataset.i ? -1 : +s.dataset.i; show(+s.dataset.i); }); });
  sel.addEventListener('change', function(){ show(pinned >= 0 ? pinned : data.tokens.length - 1); });
  show(data.tokens.length - 1);
})();
"""


def attention_viewer(str_tokens: Sequence[str], pattern: torch.Tensor, head_names: Sequence[str] | None = None,
                     title: str = "attention") -> str:
    """An interactive, offline attention viewer: pick a head, hover (or click to pin) a query token, and the
    key tokens are shaded by attention. ``pattern`` is ``[head, q, k]``. Tokens are placed with
    ``textContent`` (never parsed as HTML); the JavaScript is inline."""
    import uuid

    pat = pattern.detach().float().cpu()
    if pat.dim() == 2:
        pat = pat[None]
    if pat.shape[-1] != len(str_tokens) or pat.shape[-2] != len(str_tokens):
        raise InputError(f"pattern {tuple(pat.shape)} does not match {len(str_tokens)} tokens")
    heads = [str(h) for h in (head_names or range(pat.shape[0]))]
    uid = "ms-att-" + uuid.uuid4().hex[:8]
    data = {"tokens": [str(t) for t in str_tokens], "heads": heads,
            "pattern": [[[round(float(x), 4) for x in row] for row in h] for h in pat]}
    js = _VIEWER_JS % {"id": json_for_script(uid), "data": json_for_script(data)}
    return (f"<div id='{uid}' class='ms-att'><h3>{esc(title)}</h3><label>head <select></select></label> "
            f"<span class='ms-info'></span><div class='ms-toks' style='line-height:1.9;margin-top:.5em'></div>"
            f"<style>.ms-tok{{padding:1px 2px;margin:1px;border-radius:3px;cursor:pointer;white-space:pre;"
            f"border:1px solid #eee}}</style><script>{js}</script></div>")


def heatmap_plotly(values: torch.Tensor, row_labels: Sequence[str], col_labels: Sequence[str], title: str = "",
                   include_js: bool = True,
                   diverging: bool = False) -> str:
    """An interactive plotly heatmap as an HTML fragment, with plotly.js inlined (works offline).

    Pass ``include_js=False`` for every heatmap after the first on one page.
    """
    import plotly.graph_objects as go

    v = values.detach().float().cpu()
    def uniq(labels):  # plotly merges equal labels: number them when some repeat
        labels = [str(l) for l in labels]
        return labels if len(set(labels)) == len(labels) else [f"{i}: {l}" for i, l in enumerate(labels)]
    kw = dict(colorscale="RdBu", reversescale=True, zmid=0) if diverging else dict(colorscale="Blues")
    fig = go.Figure(go.Heatmap(z=v.tolist(), x=uniq(col_labels), y=uniq(row_labels), **kw))
    fig.update_layout(title=title, yaxis=dict(autorange="reversed"), height=max(300, 22 * v.shape[0] + 120))
    return fig.to_html(full_html=False, include_plotlyjs=bool(include_js))


def histogram_png(values: torch.Tensor | Sequence[float], path: str | os.PathLike, title: str = "", bins: int = 50,
                  log_y: bool = False,
                  xlabel: str = "") -> Path:
    """A histogram of ``values`` as a PNG (e.g. feature activations or densities)."""
    v = torch.as_tensor(values).detach().float().cpu().flatten().numpy()
    fig, ax = figure(figsize=(6, 3.5))
    ax.hist(v, bins=bins, color="#36c")
    if log_y:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    return save_figure(fig, path)


def histogram_svg(values: Sequence[float], bins: int = 40, lo: float | None = None, hi: float | None = None,
                  title: str = "", width: int = 480, height: int = 140) -> str:
    """A histogram of ``values`` as an inline SVG fragment (no JavaScript, no file): what HTML reports embed."""
    v = [float(x) for x in values if x == x]
    if not v:
        return ""
    lo = min(v) if lo is None else lo
    hi = max(v) if hi is None else hi
    span = (hi - lo) or 1.0
    counts = [0] * bins
    for x in v:
        counts[min(bins - 1, max(0, int((x - lo) / span * bins)))] += 1
    top = max(counts) or 1
    w = width / bins
    bars = "".join(f"<rect x='{i * w:.1f}' y='{height - 20 - (height - 30) * c / top:.1f}' width='{max(w - 1, 1):.1f}' "
                   f"height='{(height - 30) * c / top:.1f}' fill='#36c'><title>{lo + i * span / bins:.3g}.."
                   f"{lo + (i + 1) * span / bins:.3g}: {c}</title></rect>" for i, c in enumerate(counts))
    axis = (f"<text x='0' y='{height - 5}' font-size='10'>{esc(f'{lo:.3g}')}</text>"
            f"<text x='{width - 30}' y='{height - 5}' font-size='10'>{esc(f'{hi:.3g}')}</text>")
    return (f"<figure><figcaption>{esc(title)} (n={len(v)}; tallest bar {top})</figcaption>"
            f"<svg width='{width}' height='{height}' role='img'>{bars}{axis}</svg></figure>")
