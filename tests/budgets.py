"""Time budgets of the slow tests (tests/budget.toml): the check and the order tests/conftest.py applies."""

from __future__ import annotations

import os
import re
from pathlib import Path

BUDGET_FILE = Path(__file__).with_name("budget.toml")


def load(path: Path = BUDGET_FILE) -> dict[str, float]:
    """``{test node id: seconds}``, times ``MECHSCOPE_TEST_BUDGET_SCALE`` (default 1: a slower machine may scale
    every budget at once)."""
    try:
        import tomllib  # Python 3.11+
    except ImportError:  # 3.10: the file's one table of "node id" = seconds lines, read directly
        text = Path(path).read_text()
        table = {m.group(1): float(m.group(2)) for m in re.finditer(r'^"([^"]+)"\s*=\s*([\d.]+)', text, re.M)}
    else:
        with open(path, "rb") as f:
            table = tomllib.load(f)["seconds"]
    scale = float(os.environ.get("MECHSCOPE_TEST_BUDGET_SCALE", "1"))
    return {k: float(v) * scale for k, v in table.items()}


def verdict(nodeid: str, took: float, budgets: dict[str, float]) -> str | None:
    """Why a slow test that took ``took`` seconds fails its budget, or None when it is within twice the budget."""
    budget = budgets.get(nodeid)
    if budget is None:
        return (f"{nodeid} is marked slow but has no budget in tests/budget.toml: add one (the seconds it may take "
                f"inside `make test`; it took {took:.0f} s here)")
    if took > 2 * budget:
        return (f"{nodeid} took {took:.1f} s, more than twice its budget of {budget:g} s in tests/budget.toml: find "
                "what made it slower (or, if the extra work is wanted, raise the budget and say why)")
    return None


def order(items: list, budgets: dict[str, float], workers: int) -> list:
    """``items`` (anything with a ``nodeid``) with the budgeted ones first, the longest first, dealt in turn to the
    starting shares of ``workers`` workers.

    pytest-xdist's worksteal scheduler starts each of its n workers on a contiguous share of the collection
    (``len(pending) // workers left``) and balances the rest by stealing. Left in file order, the two longest
    tests (the demo and the tutorial, minutes each) started last, and one worker ran them alone at the end while
    the other sat idle. The order changes no result: every test is independent of the others."""
    n = max(1, workers)
    heavy = sorted((it for it in items if it.nodeid in budgets), key=lambda it: -budgets[it.nodeid])
    rest = [it for it in items if it.nodeid not in budgets]
    out, left = [], len(items)
    for w in range(n):
        share = left // (n - w)
        left -= share
        mine = heavy[w::n]
        take = max(0, share - len(mine))
        out += mine + rest[:take]
        rest = rest[take:]
    return out + rest
