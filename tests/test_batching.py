"""Memory-aware batching: batch sizes from free memory, batch_size= overrides, and out-of-memory retries.

A fake out-of-memory error is injected with a persistent hook that raises ``torch.OutOfMemoryError``
whenever a forward pass carries more rows than a limit; every technique must halve its batch,
warn once, and give the same result as a run that never ran out of memory.
"""

import warnings

import pytest
import torch

from mechscope import HookedModel
from mechscope.batching import MemoryWarning, OutOfMemory, auto_batch, is_oom, map_batches
from tiny import V, tiny_hf

N, P = 6, 8
TOKENS = torch.randint(0, V, (N, P), generator=torch.Generator().manual_seed(11))
CORRUPTED = torch.randint(0, V, (N, P), generator=torch.Generator().manual_seed(12))
ANSWERS = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(13))


def metric(logits):  # a dataset metric: a closure over one answer per prompt
    return logits[torch.arange(logits.shape[0]), -1, ANSWERS] - logits[:, -1, 0]


@pytest.fixture(scope="module")
def model():
    return HookedModel(tiny_hf("llama"))


class Injector:
    """A persistent hook raising an out-of-memory error when a pass carries more than ``limit`` rows."""

    def __init__(self, model, limit, name="blocks.0.hook_resid_pre"):
        self.model, self.limit, self.name, self.sizes = model, limit, name, []

    def __call__(self, act, hook):
        self.sizes.append(act.shape[0])
        if act.shape[0] > self.limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory (injected: {act.shape[0]} rows > {self.limit})")

    def __enter__(self):
        self.handle = self.model.add_hook(self.name, self)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def oom_run(model, fn, limit=2, name="blocks.0.hook_resid_pre"):
    with warnings.catch_warnings(record=True) as w, Injector(model, limit, name) as inj:
        warnings.simplefilter("always")
        out = fn()
    memory = [x for x in w if issubclass(x.category, MemoryWarning)]
    assert len(memory) == 1, [str(x.message) for x in memory]  # said once
    assert "retrying with batch" in str(memory[0].message)
    assert max(inj.sizes) > limit and min(inj.sizes) <= limit  # it ran out, then ran smaller
    return out


def test_map_batches_halves_and_keeps_order():
    seen = []

    def fn(s, e):
        seen.append(e - s)
        if e - s > 3:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1000 bytes")
        return list(range(s, e))

    with pytest.warns(MemoryWarning):
        out = map_batches(fn, 10, batch_size=8, what="test")
    assert sum(out, []) == list(range(10)) and seen[:2] == [8, 4] and max(seen[2:]) <= 3
    with pytest.raises(ValueError):  # other errors pass through untouched
        map_batches(lambda s, e: (_ for _ in ()).throw(ValueError("bug")), 4, batch_size=2)
    with pytest.raises(OutOfMemory, match="one item does not fit"):
        map_batches(lambda s, e: (_ for _ in ()).throw(torch.OutOfMemoryError("oom")), 4, batch_size=1)
    assert is_oom(torch.OutOfMemoryError("x")) and not is_oom(RuntimeError("shape mismatch"))
    assert auto_batch(10**30, 50, "cpu") == 1 and auto_batch(1, 50, "cpu") == 50  # from free memory, capped by n


def test_batch_size_overrides_the_choice(model):
    from mechscope.techniques.ablation import ablate

    with Injector(model, 10**9) as inj:
        ablate(model, TOKENS, metric, ["L1H2"], method="zero", batch_size=2)
    assert set(inj.sizes) - {1} == {2}  # every pass used the given batch (1: the metric-reading probe)


def test_ablation_unchanged_after_oom(model):
    from mechscope.techniques.ablation import ablate

    ref = ablate(model, TOKENS, metric, ["L1H2", "L0.mlp"], method="mean")
    out = oom_run(model, lambda: ablate(model, TOKENS, metric, ["L1H2", "L0.mlp"], method="mean"))
    torch.testing.assert_close(out.ablated, ref.ablated, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.baseline, ref.baseline, atol=1e-6, rtol=1e-6)


def test_patching_unchanged_after_oom(model):
    from mechscope.techniques.patching import patch

    ref = patch(model, TOKENS, CORRUPTED, metric, site="z")
    out = oom_run(model, lambda: patch(model, TOKENS, CORRUPTED, metric, site="z"), limit=N,
                  name="ln_final.hook_normalized")
    torch.testing.assert_close(out.values, ref.values, atol=1e-6, rtol=1e-6)
    assert out.stats["forward_passes"] > ref.stats["forward_passes"]


def test_eap_unchanged_after_oom(model):
    from mechscope.circuits.discovery import edge_attribution

    ref = edge_attribution(model, TOKENS, CORRUPTED, metric)
    out = oom_run(model, lambda: edge_attribution(model, TOKENS, CORRUPTED, metric))
    assert ref.keys() == out.keys() and max(abs(ref[k] - out[k]) for k in ref) < 1e-5


def test_harvest_probe_and_sae_eval_unchanged_after_oom(model):
    from mechscope.sae import SAE, SAEConfig, evaluate_sae, harvest
    from mechscope.techniques.probing import probe_sweep

    ref = harvest(model, "blocks.1.hook_resid_post", TOKENS)
    out = oom_run(model, lambda: harvest(model, "blocks.1.hook_resid_post", TOKENS))
    assert torch.equal(ref, out)
    labels = (TOKENS % 2).long()
    p1 = probe_sweep(model, TOKENS, labels, hooks=["blocks.1.hook_resid_post"], control=False)
    p2 = oom_run(model, lambda: probe_sweep(model, TOKENS, labels, hooks=["blocks.1.hook_resid_post"], control=False))
    assert p1.scores[0].value == p2.scores[0].value
    sae = SAE(SAEConfig(d_in=model.cfg.d_model, d_sae=64, k=4, hook_name="blocks.1.hook_resid_post"))
    e1 = evaluate_sae(model, sae, TOKENS)
    e2 = oom_run(model, lambda: evaluate_sae(model, sae, TOKENS))
    assert abs(e1.ce_sae - e2.ce_sae) < 1e-5 and abs(e1.explained_variance - e2.explained_variance) < 1e-6
