"""Task datasets on the default model: equal lengths, single-token answers, metrics that separate runs."""

import pytest
import torch

from mechscope import datasets as D

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("make", [lambda m: D.ioi(m, 12, seed=1), lambda m: D.ioi(m, 12, corruption="abc"),
                                  lambda m: D.factual(m), lambda m: D.greater_than(m, 12),
                                  lambda m: D.induction(m, 6, length=15)],
                         ids=["ioi", "ioi-abc", "factual", "greater-than", "induction"])
def test_dataset_pairs_and_metric(smollm, make):
    ds = make(smollm)
    assert ds.clean.shape == ds.corrupted.shape and len(ds) >= 6
    assert not torch.equal(ds.clean, ds.corrupted)
    with torch.no_grad():
        clean, corr = ds.metric(smollm(ds.clean)), ds.metric(smollm(ds.corrupted))
    assert clean.shape == (len(ds),)
    assert float(clean.mean()) > float(corr.mean()) + 0.5, (ds.name, clean.mean(), corr.mean())
    train, held = ds.split(0.5)
    assert len(train) + len(held) == len(ds)
    assert not set(train.texts) & set(held.texts) or ds.name.startswith("induction")


def test_ioi_structure(smollm):
    ds = D.ioi(smollm, 20, seed=3)
    orders = {m["order"] for m in ds.meta}
    assert orders == {"ABBA", "BABA"}
    for text, bad, meta in zip(ds.texts, ds.corrupted_texts, ds.meta):
        assert text.count(meta["s"]) == 2 and text.count(meta["io"]) == 1
        assert bad.count(meta["io"]) == 2  # s2 flipped
    assert all(smollm.to_str_tokens(a[None])[0].startswith(" ") for a in ds.answers)
    with pytest.raises(ValueError, match="corruption"):
        D.ioi(smollm, corruption="swap")


def test_factual_is_verified(smollm):
    ds = D.factual(smollm)
    with torch.no_grad():
        top = smollm(ds.clean)[:, -1].argmax(-1)
    assert torch.equal(top, ds.answers)
    assert (ds.answers != ds.wrong).all()
