"""The toy model with a known answer: a 2-layer attention-only transformer that learns induction.

The fixture trains it once (about 20 s; later runs read it from ``$MECHSCOPE_CACHE/toys``) and checks that the
detectors, the composition scores and an ablation recover the circuit that Olsson et al. 2022 predict: a
previous-token head in layer 0 that the layer-1 induction head reads through K-composition.
"""

import pytest
import torch

import mechscope
from mechscope.analysis.metrics import induction_loss
from mechscope.circuits.heads import detect_heads, induction_tokens
from mechscope.circuits.toy import periodic_sequences, toy_tokenizer, train_attn_only
from mechscope.circuits.weights import composition_scores
from mechscope.techniques.ablation import ablate


@pytest.fixture(scope="module")
def heads(toy):
    return detect_heads(toy.model)


def test_periodic_sequences_are_periodic_with_varied_periods():
    g = torch.Generator().manual_seed(0)
    x = periodic_sequences(256, 48, 64, (4, 23), g)
    assert x.shape == (256, 48) and (x[:, 0] == 0).all() and (x[:, 1:] >= 2).all() and (x < 64).all()
    periods = set()
    for row in x[:, 1:]:
        p = next(p for p in range(4, 24) if torch.equal(row[p:], row[:-p]))
        periods.add(p)
    assert len(periods) > 10  # no fixed offset predicts the next token


def test_toy_tokenizer_round_trip_and_bos():
    tok = toy_tokenizer(16)
    ids = tok("t3 t5 t3").input_ids
    assert ids == [0, 3, 5, 3]
    assert tok.decode(ids[1:]) == "t3 t5 t3"
    assert tok("nonsense").input_ids == [0, 1]


def test_training_learns_the_repeats(toy):
    k = 40
    assert sum(toy.losses[:k]) / k > 3.5  # ~log(62) before training
    # the first period (mean 14 of 47 tokens) is unpredictable: ~1.2 nats is the floor
    assert sum(toy.losses[-k:]) / k < 1.5
    assert "2 layers x 2 heads" in toy.summary()


def test_previous_token_head_in_layer_0_and_induction_head_in_layer_1(heads):
    prev, ind = heads["previous-token"], heads["induction"]
    assert prev.top(1)[0][0].startswith("L0H") and prev.top(1)[0][1] > 0.6
    assert ind.top(1)[0][0].startswith("L1H") and ind.top(1)[0][1] > 0.6
    assert ind.scores[0].max() < 0.1  # one layer cannot do induction
    assert prev.scores[1].max() < 0.2


def test_k_composition_joins_the_previous_token_head_to_an_induction_head(toy, heads):
    model = toy.model
    K = composition_scores(model, "K")[0, :, 1]  # [L0 head, L1 head]
    a, b = divmod(int(K.argmax()), K.shape[1])
    assert a == int(heads["previous-token"].scores[0].argmax())
    assert heads["induction"].scores[1, b] > 0.6
    # the prev-token head's K-composition beats the other layer-0 head's, for every induction head
    others = [h for h in range(K.shape[0]) if h != a]
    assert (K[a] > K[others].max(0).values + 0.03).all()
    # and it is K-composition, not Q- or V-composition, that links them
    Q, V = composition_scores(model, "Q")[0, a, 1, b], composition_scores(model, "V")[0, a, 1, b]
    assert K[a, b] > Q and K[a, b] > V


def test_ablating_the_induction_head_raises_loss_on_the_repeat(toy, heads):
    model = toy.model
    toks, _ = induction_tokens(model, 20, 16, seed=3)
    ref, _ = induction_tokens(model, 20, 16, seed=9)
    metric = lambda logits: induction_loss(logits, toks, 20)
    ind_head = heads["induction"].top(1)[0][0]
    res = ablate(model, toks, metric, [ind_head], method="mean", reference=ref)
    assert float(res.baseline.mean()) < 0.2  # the repeat is predicted
    assert res.effect.low > 0.05  # CI excludes zero, upward
    # the previous-token head it reads from matters even more: without it no induction at all
    prev_head = heads["previous-token"].top(1)[0][0]
    assert ablate(model, toks, metric, [prev_head], method="mean", reference=ref).effect.value > 2.0


def test_saved_toy_loads_with_mechscope(toy, tmp_path):
    path = toy.save(tmp_path / "toy")
    m = mechscope.load(str(path))
    toks = m.to_tokens(["t5 t9 t11 t5 t9"])
    assert toks[0, 0].item() == 0
    assert torch.allclose(m(toks), toy.model(toks), atol=1e-5)


def test_a_trained_toy_is_cached_and_read_back_as_trained(tmp_path, monkeypatch):
    import json

    monkeypatch.setenv("MECHSCOPE_CACHE", str(tmp_path))
    fresh = train_attn_only(steps=30, cache=False)
    assert not (tmp_path / "toys").exists()
    first = train_attn_only(steps=30)  # trains, equal to the uncached run (a seed's training is deterministic)
    again = train_attn_only(steps=30)  # reads it back
    assert not first.cached and again.cached and "read from the cache" in again.summary()
    assert again.losses == first.losses == fresh.losses and again.config == fresh.config
    toks = again.model.to_tokens(["t5 t9 t11 t5 t9 t11"])
    assert torch.equal(again.model(toks), fresh.model(toks)) and torch.equal(first.model(toks), fresh.model(toks))
    assert not any(p.requires_grad for layer in again.model.hf.gpt_neox.layers for p in layer.mlp.parameters())
    assert not train_attn_only(steps=31).cached  # other settings: another entry
    (folder,) = [f for f in (tmp_path / "toys").iterdir() if json.loads((f / "toy.json").read_text())["config"]
                 ["steps"] == 30]
    saved = json.loads((folder / "toy.json").read_text())
    saved["config"]["seed"] = 5  # a file that does not match its name
    (folder / "toy.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="other settings"):
        train_attn_only(steps=30)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="periods"):
        train_attn_only(periods=(4, 30), n_ctx=48, steps=1)
    with pytest.raises(ValueError, match="d_head"):
        train_attn_only(d_model=30, n_heads=4, steps=1)


def test_cli_toy_trains_saves_and_reports(tmp_path, capsys):
    import json

    from mechscope.cli import main

    assert main(["toy", "--out", str(tmp_path / "t"), "--steps", "30", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (tmp_path / "t" / "model.safetensors").exists() and (tmp_path / "t" / "tokenizer.json").exists()
    assert set(out["top"]) == {"previous-token", "induction"} and out["final_loss"] < 4.2
    assert main(["heads", "--model", str(tmp_path / "t"), "--json"]) == 0
    assert "induction" in json.loads(capsys.readouterr().out)
