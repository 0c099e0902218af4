"""Shared by the patching benches: time mechscope's engine with and without the identical-patch skip."""

import time

from mechscope.techniques.patching import patch


def time_engine(model, clean, corrupted, metric, site="resid_pre"):
    """Returns ``(result, seconds, result_running_every_patch, seconds)`` after a warm-up run."""
    patch(model, clean, corrupted, metric, layers=[0], positions=[0])  # warm-up
    t = time.perf_counter()
    fast = patch(model, clean, corrupted, metric, site=site)
    t_fast = time.perf_counter() - t
    t = time.perf_counter()
    every = patch(model, clean, corrupted, metric, site=site, skip_identical=False)
    return fast, t_fast, every, time.perf_counter() - t
