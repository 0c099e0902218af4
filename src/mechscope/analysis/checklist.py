"""The quality checklist every write-up carries, filled in from what the run actually did.

The seven lines follow the research loop's closing checklist: the question was stated, a
technique was chosen for it, results were visualised, a causal validation was run, edge cases
(held-out prompts, several seeds) were tested, alternatives (baselines, control tasks, a second
technique) were considered, and the run is reproducible (seeds, commit, versions). A line is
met only by evidence recorded while the run did the thing, each piece of evidence a sentence
and, where there is one, a link to the section or file that shows it; a line with no evidence is
flagged as not met. Nothing is ticked by default.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..core.errors import UnknownNameError
from ..core.result import Result
from .viz import esc

ITEMS: dict[str, str] = {
    "question": "question stated",
    "technique": "technique chosen",
    "visualised": "results visualised",
    "causal": "causal validation performed",
    "edge_cases": "edge cases tested",
    "alternatives": "alternatives considered",
    "reproducibility": "reproducibility recorded",
}


@dataclass
class Evidence:
    text: str
    link: str | None = None  # "#section-id" in a report, or a file path beside it


@dataclass(repr=False)
class Checklist(Result):
    """Evidence per checklist item (keys of :data:`ITEMS`); an item without evidence is not met."""

    evidence: dict[str, list[Evidence]] = field(default_factory=lambda: {k: [] for k in ITEMS})
    why_not: dict[str, str] = field(default_factory=dict)  # item -> what is missing, shown while unmet

    def add(self, item: str, text: str, link: str | None = None) -> "Checklist":
        """Record that the run did ``item``, with a one-sentence ``text`` and an optional ``link`` to the proof."""
        if item not in ITEMS:
            raise UnknownNameError(f"unknown checklist item {item!r}; the items are {', '.join(ITEMS)}")
        self.evidence.setdefault(item, []).append(Evidence(str(text), link))
        return self

    def missing(self, item: str, reason: str) -> "Checklist":
        """Say what keeps ``item`` from being met (shown in place of "not met" until evidence arrives)."""
        self.evidence.setdefault(item, [])
        self.why_not[item] = str(reason)
        return self

    def merged(self, other: "Checklist") -> "Checklist":
        """This checklist's evidence followed by ``other``'s (reasons for unmet items kept from both)."""
        out = Checklist()
        for c in (self, other):
            for k, evs in c.evidence.items():
                for e in evs:
                    out.add(k, e.text, e.link)
            out.why_not.update(c.why_not)
        return out

    def met(self, item: str) -> bool:
        return bool(self.evidence.get(item))

    @property
    def unmet(self) -> list[str]:
        return [k for k in ITEMS if not self.met(k)]

    def summary(self) -> str:
        lines = [f"quality checklist: {len(ITEMS) - len(self.unmet)}/{len(ITEMS)} met"]
        for k, label in ITEMS.items():
            ev = self.evidence.get(k, [])
            lines.append(f"  [{'x' if ev else ' '}] {label}: " + ("; ".join(e.text for e in ev) if ev else
                                                                 "NOT MET" + self._why(k)))
        return "\n".join(lines)

    def _why(self, k: str) -> str:
        return f" ({self.why_not[k]})" if k in self.why_not else ""

    def _dict_extra(self) -> dict:
        return {"met": {k: self.met(k) for k in ITEMS}, "unmet": self.unmet}

    @classmethod
    def from_dict(cls, d: dict | None) -> "Checklist":
        """The checklist stored by :meth:`to_dict` (unknown items and malformed entries are skipped)."""
        c = cls()
        for k, evs in ((d or {}).get("evidence") or {}).items():
            for e in evs if isinstance(evs, list) and k in ITEMS else []:
                if isinstance(e, dict) and "text" in e:
                    c.add(k, e["text"], e.get("link"))
        for k, why in ((d or {}).get("why_not") or {}).items():
            if k in ITEMS:
                c.missing(k, why)
        return c

    def to_html(self) -> str:
        rows = []
        for k, label in ITEMS.items():
            ev = self.evidence.get(k, [])
            items = "".join(f"<li>{esc(e.text)}" + (f" (<a href='{esc(e.link)}'>evidence</a>)" if e.link else "")
                            + "</li>" for e in ev)
            mark, cls = ("&#10003;", "ms-met") if ev else ("&#10007; not met", "ms-unmet")
            if not ev and k in self.why_not:
                items = f"<li>{esc(self.why_not[k])}</li>"
            rows.append(f"<tr class='{cls}'><td>{mark}</td><th>{esc(label)}</th><td><ul>{items}</ul></td></tr>")
        css = ("<style>table.ms-check{border-collapse:collapse}table.ms-check td,table.ms-check th{padding:3px 8px;"
               "vertical-align:top;text-align:left;border-bottom:1px solid #eee}table.ms-check ul{margin:0;"
               "padding-left:1.1em}tr.ms-unmet{background:#fde8e6}tr.ms-unmet td:first-child{color:#b3261e;"
               "font-weight:bold}tr.ms-met td:first-child{color:#1e7b34}</style>")
        return (f"{css}<table class='ms-check'>{''.join(rows)}</table>"
                f"<p>{len(ITEMS) - len(self.unmet)} of {len(ITEMS)} met"
                + (f"; not met: {esc(', '.join(ITEMS[k] for k in self.unmet))}" if self.unmet else "") + "</p>")
