"""Grading circuit discovery against planted circuits: edge AUROC of exact edge patching, EAP and EAP-IG.

The zoo (:mod:`mechscope.circuits.zoo`): ``copier`` and ``two-hop`` (patterns planted, weights
trained), ``induction`` (layer 0 planted, layer 1 trained into induction heads) and
``induction-free`` (the free toy, heads named by detectors: an incomplete ground truth). Each model
is trained anew per seed; the table gives the mean AUROC with a bootstrap CI over seeds. Attribution
graphs (no MLPs here, so no features) are graded at the token level: does the embedding edge from the
answer's source position into the answer's logit outrank the other positions' (graph_auroc)?
Environment: ZOO_SEEDS (default 5).
Usage: python bench/bench_zoo.py
"""

from __future__ import annotations

import os
import time

from mechscope.circuits.zoo import grade
from mechscope.graphs.zoo import graph_auroc


def main() -> None:
    seeds = list(range(int(os.environ.get("ZOO_SEEDS", 5))))
    t0 = time.perf_counter()
    g = grade(seeds=seeds, progress=True, extra={"graph (tokens)": graph_auroc})
    print(g.summary())
    for name, by in g.per_seed.items():
        print(f"  {name}: " + "; ".join(f"{m} {[round(v, 3) for v in vals]}" for m, vals in by.items()))
    print(f"{time.perf_counter() - t0:.0f} s for {len(g.per_seed)} models x {len(seeds)} seeds")


if __name__ == "__main__":
    main()
