"""The investigation report: findings with effect sizes on top, the quality checklist, then sections, in one
offline HTML page (:class:`Report`), written atomically with its ``record.json``."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..analysis import viz
from ..analysis.checklist import Checklist
from ..analysis.validation import Estimate
from ..core.files import atomic_write
from ..core.model import HookedModel
from ..core.result import Result


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

    def to_dict(self) -> dict:
        """The finding for ``--json``: its text, effect (an estimate's own fields, or the value), baseline, verdict."""
        effect = self.effect.to_dict() if isinstance(self.effect, Estimate) else {"value": float(self.effect)}
        return {"text": self.text, "effect": effect, "baseline": self.baseline, "holds": self.holds}


def fmt(e: Estimate | float) -> str:
    """An effect as the findings show it: a value with its CI, or, resting on too few samples for one, the value and
    how few (never a CI the estimate itself calls uninformative)."""
    if not isinstance(e, Estimate):
        return f"{e:+.3g}"
    if e.exact:
        return f"{e.value:+.3g} (exact)"
    if not e.informative:
        return f"{e.value:+.3g} (n={e.n}: too few for a CI)"
    return f"{e.value:+.3g} [{e.low:+.3g}, {e.high:+.3g}]"


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
    prefix: str = ""  # put before each added section's title (an investigation inside a larger report)

    _skip_in_dict = ("echo", "folder", "sections", "prefix")

    def _dict_extra(self) -> dict:  # the sections' text, not their inline JavaScript and pictures
        return {"sections": [{"title": s.title, "anchor": s.anchor(), "text": s.text, "images": s.images}
                             for s in self.sections]}

    def add(self, section: Section) -> None:
        """Append ``section``, numbered in order ("3. ..."), and echo its text when ``echo``."""
        section.title = f"{len(self.sections) + 1}. {self.prefix}{section.title}"
        self.sections.append(section)
        if self.echo:
            print(f"\n== {section.title}\n{section.text}", flush=True)

    def find(self, text: str, effect: Estimate | float, baseline: str, section: Section, holds: bool = True) -> None:
        self.findings.append(Finding(text, effect, baseline, section.anchor(), holds))

    def summary(self) -> str:
        lines = [self.title] + [f"- {f.text}: {fmt(f.effect)} (baseline: {f.baseline})" for f in self.findings]
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
            f"<span class='ms-effect'>{viz.esc(fmt(f.effect))}</span>; baseline: {viz.esc(f.baseline)}"
            + ("" if f.holds else " <b>(does not hold)</b>") + "</li>" for f in self.findings)
        toc = "".join(f"<li><a href='#{viz.esc(s.anchor())}'>{viz.esc(s.title)}</a></li>" for s in self.sections)
        parts = [f"<style>{REPORT_CSS}</style>",
                 f"<section id='findings'><h2>findings</h2><p>Effects are means with 95% bootstrap CIs over "
                 f"held-out prompts or seeds (where fewer than 10 values were measured, the value and n instead: too "
                 f"few for a CI), each beside the baseline it is compared with.</p>"
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


def estimates_table(rows: list[tuple[str, Estimate]], what: str) -> str:
    """An HTML table of estimates: one row per comparison, with the point value and its 95% CI."""
    body = "".join(f"<tr><th>{viz.esc(name)}</th><td>{e.value:+.3f}</td><td>[{e.low:+.3f}, {e.high:+.3f}]</td>"
                   f"<td>{e.n}</td><td>{'yes' if e.excludes(0.0) else 'no'}</td></tr>" for name, e in rows)
    return (f"<table class='ms-heat'><tr><th>{viz.esc(what)}</th><th>mean</th><th>95% CI</th><th>n</th>"
            f"<th>CI excludes 0</th></tr>{body}</table>")


class Figures:
    """Interactive figures for one page: plotly.js is inlined with the first heatmap only."""

    def __init__(self):
        self.js_done = False

    def heatmap(self, values: torch.Tensor, rows: list[str], cols: list[str], title: str, diverging: bool = True) -> str:
        html = viz.heatmap_plotly(values, rows, cols, title=title, include_js=not self.js_done, diverging=diverging)
        self.js_done = True
        return html


def reproducibility(rep: Report, model: HookedModel, seed: int, n_prompts: int) -> None:
    """The checklist's reproducibility line: seed, commit (and whether the tree is clean), torch and transformers."""
    from ..project import provenance

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
