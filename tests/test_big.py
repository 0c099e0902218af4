"""A ~1.1B-parameter Llama on this CPU (slow tier): memory estimates against measured peaks, and disk offload.

The model is random with TinyLlama's shapes, built once and cached (``tests/big.py``). Each
measurement runs in a fresh process (peak RSS above its post-import baseline). The full set of
figures, with a patching sweep and the hook overhead, is ``bench/bench_big.py``.
"""

import tempfile

import pytest
import torch

import mechscope
from big import big_llama_dir, run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def path():
    return str(big_llama_dir())


def test_estimate_within_15_percent_of_measured_peak(path):
    hooks = ["blocks.5.hook_resid_post", "blocks.10.hook_resid_post", "blocks.15.hook_resid_post"]
    est = mechscope.estimate_memory(path, batch=2, seq_len=256, cache_names=hooks, available=10**13, device="cpu")
    assert 1.09e9 < est.n_params < 1.11e9
    measured = run("cache", path, batch=2, seq=256)["measured"]
    assert abs(est.total - measured) / measured < 0.15, (est.total / 2**30, measured / 2**30)


def test_disk_offload_within_half_the_weights_gives_the_same_logits(path):
    weights = mechscope.estimate_memory(path, batch=0, available=10**13, device="cpu").weights
    with tempfile.TemporaryDirectory() as tmp:
        m = run("offload", path, batch=1, seq=16, budget=weights // 2, folder=f"{tmp}/off", logits_out=f"{tmp}/l.pt")
        assert m["device_map"] == ["cpu", "disk"]
        assert m["measured"] < 0.65 * weights, (m, weights)  # the process stays near its budget of half the weights
        model = mechscope.load(path)
        toks = torch.randint(100, 30000, (1, 16), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert torch.equal(model(toks)[:, -4:], torch.load(f"{tmp}/l.pt", weights_only=True))
