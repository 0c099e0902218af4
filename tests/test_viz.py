"""Pictures: escaping, offline HTML, the attention viewer, plotly heatmaps, PNGs, result reprs."""

import json
import re

import pytest
import torch

from mechscope.analysis import viz

EVIL = ["<script>alert(1)</script>", "a&b", '"q"', "</script><b>x"]


def test_heatmap_html_escapes_everything():
    html = viz.heatmap_html(torch.rand(2, 4), ["<r0>", "r1"], EVIL, title="<t>")
    assert "<script>" not in html and "<b>" not in html and "<r0>" not in html and "<t>" not in html
    assert "&lt;script&gt;" in html and "&amp;" in html


def test_attention_viewer_is_offline_and_safe():
    pat = torch.tril(torch.rand(2, 4, 4))
    pat = pat / pat.sum(-1, keepdim=True)
    html = viz.attention_viewer(EVIL, pat, ["L0H0", "L0H1"], title="<x>")
    scripts = re.findall(r"<script>(.*?)</script>", html, flags=re.S)
    assert len(scripts) == 1  # no token closed the script element
    assert "http" not in html and "src=" not in html  # nothing fetched
    data = json.loads(re.search(r"data = (\{.*?\});", scripts[0].replace("<\\/", "</")).group(1))
    assert data["tokens"] == EVIL and len(data["pattern"]) == 2
    assert "textContent = t" in scripts[0] and "innerHTML" not in scripts[0]
    with pytest.raises(ValueError, match="does not match"):
        viz.attention_viewer(["a"], pat)


def test_plotly_heatmap_inlines_its_javascript():
    html = viz.heatmap_plotly(torch.rand(3, 2), ["a", "a"], ["x", "<y>"], title="t")
    assert len(html) > 1_000_000  # plotly.js is inside the page
    assert not re.search(r"<script[^>]*\bsrc=", html)  # and nothing is loaded from elsewhere
    assert "<y>" not in html and "\\u003cy\\u003e" in html  # labels travel as escaped JSON
    small = viz.heatmap_plotly(torch.rand(3, 2), ["a", "b", "c"], ["x", "y"], include_js=False)
    assert len(small) < 50_000


def test_pngs_and_bands(tmp_path):
    p = viz.histogram_png(torch.randn(1000), tmp_path / "h.png", title="acts", log_y=True)
    assert p.read_bytes()[:4] == b"\x89PNG"
    fig, ax = viz.figure()
    viz.line_with_band(ax, [0, 1, 2], [1, 2, 3], [0.5, 1.5, 2.5], [1.5, 2.5, 3.5], "x")
    assert viz.save_figure(fig, tmp_path / "b.png").stat().st_size > 1000
    assert not list(tmp_path.glob("*.tmp"))


def test_result_reprs_are_summaries():
    from mechscope.analysis.validation import across_seeds
    from mechscope.circuits.weights import HeadScores

    hs = HeadScores("induction", torch.rand(3, 4))
    assert repr(hs).startswith("induction scores") and "tensor(" not in repr(hs)
    assert "<table" in hs._repr_html_()
    assert "seeds" in repr(across_seeds(lambda s: s))
