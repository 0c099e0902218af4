"""Tuned lens: training lowers the KL to the final distribution; save/load round trip; corpus."""

import pytest
import torch

from mechscope import HookedModel
from mechscope.techniques.lens import TunedLens, compare_lenses, train_tuned_lens
from tiny import V, tiny_hf


def test_tuned_lens_beats_logit_lens_and_round_trips(tmp_path):
    model = HookedModel(tiny_hf("llama"))
    toks = torch.randint(0, V, (40, 16), generator=torch.Generator().manual_seed(0))
    lens, cmp = train_tuned_lens(model, toks, n_steps=60, batch=8, lr=3e-3, progress=False)
    assert cmp.tuned_lens_kl.shape == (model.cfg.n_layers,)
    # identity at init: the tuned lens starts as the logit lens and must improve on held-out rows
    assert (cmp.tuned_lens_kl < cmp.logit_lens_kl).all(), cmp.summary()
    path = lens.save(tmp_path / "lens.safetensors")
    again = TunedLens.load(path, model)
    torch.testing.assert_close(again.weight, lens.weight)
    torch.testing.assert_close(compare_lenses(model, again, toks[-8:]).tuned_lens_kl, cmp.tuned_lens_kl)
    wrong_size = TunedLens(5, 32).save(tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="layers x d_model"):
        TunedLens.load(wrong_size, model)
    assert all(p.requires_grad for p in model.hf.parameters())
    assert "tuned lens" in cmp.summary() and cmp.plot(tmp_path / "k.png").stat().st_size > 1000


def test_stdlib_corpus_is_real_and_split():
    from mechscope import corpus as C

    train = list(zip(range(50), C.stdlib_docstrings("train")))
    test = list(zip(range(50), C.stdlib_docstrings("test")))
    assert len(train) == 50 and len(test) == 50
    assert not {t for _, t in train} & {t for _, t in test}
    assert all(len(t) >= 200 for _, t in train)
    with pytest.raises(ValueError, match="split"):
        next(C.stdlib_docstrings("dev"))


def test_jsonl_reader(tmp_path):
    from mechscope import corpus as C

    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "hello"}\n\n{"text": "world"}\n')
    assert list(C.jsonl(p)) == ["hello", "world"]
    p.write_text('{"body": "x"}\n')
    with pytest.raises(KeyError, match="no field 'text'"):
        list(C.jsonl(p))


@pytest.mark.slow
def test_pack_on_default_model(smollm):
    from mechscope import corpus as C

    rows = C.pack(smollm, C.default_corpus(), 32, n_seqs=5)
    assert rows.shape == (5, 32)
    text = smollm.to_string(rows[0])
    assert len(text) > 50
