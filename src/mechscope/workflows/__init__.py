"""End-to-end investigations that combine the techniques and write one report.

- :func:`investigate`: "find the circuit for behaviour X" on a task dataset, from checking the pairs to a
  validated circuit and its components, in resumable stages (:mod:`.investigate`, :mod:`.stages`);
- :func:`demo_investigation`: what ``make demo`` runs: :func:`investigate` on IOI plus a tour of the other
  techniques (:mod:`.demo`);
- :class:`Report`: the one offline page both write (:mod:`.report`).
"""

from .demo import demo_investigation
from .investigate import investigate
from .report import Finding, Report, Section
from .stages import StageCache

__all__ = ["Finding", "Report", "Section", "StageCache", "demo_investigation", "investigate"]
