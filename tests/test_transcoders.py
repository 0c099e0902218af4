"""Transcoders: an SAE whose target is another hook (an MLP's input -> its output), on the SAE trainer,
data pipeline, format and evaluation."""

from __future__ import annotations

import pytest
import torch

from mechscope.core.model import HookedModel
from mechscope.sae import SAE, SAEConfig, TrainConfig, fit_sae, harvest, load_sae, save_sae, train_many
from mechscope.sae.data import harvest_pairs
from mechscope.sae.evaluate import evaluate_sae, evaluate_transcoders
from tiny import V, tiny_hf, worded_llama


def planted_pairs(n: int = 3000, d: int = 16, n_feat: int = 20, skip: bool = False, seed: int = 0) -> torch.Tensor:
    """Rows [x | y]: y is a sparse function of x (TopK of x E, decoded by D), plus x A with ``skip``."""
    g = torch.Generator().manual_seed(seed)
    E = torch.randn(d, n_feat, generator=g)
    D = torch.nn.functional.normalize(torch.randn(n_feat, d, generator=g), dim=-1) * 3
    x = torch.randn(n, d, generator=g)
    pre = torch.relu(x @ E)
    v, i = pre.topk(3, dim=-1)
    y = torch.zeros_like(pre).scatter(-1, i, v) @ D
    if skip:
        y = y + x @ torch.randn(d, d, generator=g)
    return torch.cat([x, y], dim=-1)


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu", "matryoshka"])
def test_transcoder_learns_a_sparse_map_from_input_to_target(arch):
    rows = planted_pairs()
    cfg = SAEConfig(d_in=16, d_sae=64, architecture=arch, k=3, hook_name="a", hook_name_out="b",
                    l0_coefficient=1e-4)
    tc = fit_sae(rows[:2500], cfg, TrainConfig(steps=800, batch_size=128, lr=1e-2), progress=False).sae
    x, y = rows[2500:, :16], rows[2500:, 16:]
    with torch.no_grad():
        pred = tc(x)
        ev = 1 - (y - pred).pow(2).sum() / (y - y.mean(0)).pow(2).sum()
        trivial = 1 - (y - tc.decode(torch.zeros(1, 64))).pow(2).sum() / (y - y.mean(0)).pow(2).sum()
    assert float(ev) > 0.7 > float(trivial) + 0.5, (float(ev), float(trivial))  # predicts y from x, held out


def test_skip_transcoder_round_trips_and_beats_no_skip(tmp_path):
    rows = planted_pairs(skip=True)
    x, y = rows[2500:, :16], rows[2500:, 16:]
    evs = {}
    for skip in (False, True):
        cfg = SAEConfig(d_in=16, d_sae=64, architecture="topk", k=3, hook_name="blocks.0.ln2.hook_normalized",
                        hook_name_out="blocks.0.hook_mlp_out", skip=skip, normalize_activations="expected_average_only_in")
        tc = fit_sae(rows[:2500], cfg, TrainConfig(steps=800, batch_size=128, lr=1e-2), progress=False).sae
        with torch.no_grad():
            evs[skip] = float(1 - (y - tc(x)).pow(2).sum() / (y - y.mean(0)).pow(2).sum())
        save_sae(tc, tmp_path / f"tc{skip}")
        back = load_sae(tmp_path / f"tc{skip}")
        assert back.cfg.hook_name_out == "blocks.0.hook_mlp_out" and back.cfg.skip == skip
        with torch.no_grad():  # the scales are folded into the saved weights: same predictions
            torch.testing.assert_close(back(x), tc(x), rtol=1e-4, atol=1e-4)
    assert evs[True] > evs[False] + 0.05, evs
    with pytest.raises(ValueError, match="for transcoders"):
        SAEConfig(d_in=16, d_sae=8, k=2, skip=True)
    with pytest.raises(ValueError, match=r"d_in \+ d_out = 16 \+ 16 \(input, then target\)"):
        fit_sae(rows[:, :16], SAEConfig(d_in=16, d_sae=8, k=2, hook_name="a", hook_name_out="b"), progress=False)


def test_harvest_pairs_and_transcoder_plumbing_on_a_model():
    model = HookedModel(tiny_hf("llama"))
    toks = torch.randint(0, V, (6, 10), generator=torch.Generator().manual_seed(1))
    a, b = "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"
    rows = harvest_pairs(model, a, b, toks, max_norm_ratio=None)
    assert torch.equal(rows, torch.cat([harvest(model, a, toks, max_norm_ratio=None),
                                        harvest(model, b, toks, max_norm_ratio=None)], dim=-1))
    # a transcoder that predicts 0 replaces the MLP exactly as zero-ablating it does
    zero = SAE(SAEConfig(d_in=32, d_sae=16, architecture="topk", k=2, hook_name=a, hook_name_out=b))
    with torch.no_grad():
        zero.W_dec.zero_()
        zero.b_dec.zero_()
    ev = evaluate_sae(model, zero, toks)
    assert ev.ce_sae == pytest.approx(ev.ce_zero, abs=1e-6) and abs(ev.ce_zero - ev.ce_clean) > 1e-5


def test_all_layers_transcoders_from_one_pass():
    model = HookedModel(tiny_hf("llama"))
    toks = torch.randint(0, V, (24, 12), generator=torch.Generator().manual_seed(4))
    cfgs = [SAEConfig(d_in=32, d_sae=96, architecture="topk", k=8, hook_name=f"blocks.{l}.ln2.hook_normalized",
                      hook_name_out=f"blocks.{l}.hook_mlp_out", skip=True,
                      normalize_activations="expected_average_only_in") for l in range(3)]
    tcs = [r.sae for r in train_many(model, toks, cfgs, TrainConfig(steps=60, batch_size=64, lr=3e-3),
                                     seqs_per_chunk=8, progress=False)]
    held = torch.randint(0, V, (6, 12), generator=torch.Generator().manual_seed(9))
    res = evaluate_transcoders(model, tcs, held)
    untrained = evaluate_transcoders(model, [SAE(c) for c in cfgs], held)
    # a random tiny model's MLPs are near-quadratic maps of tiny outputs: 60 steps learn part of them
    for e, u in zip(res.each, untrained.each):
        assert e.mse < 0.5 * u.mse and e.explained_variance > u.explained_variance, res.summary()
    assert abs(res.ce_all - res.ce_clean) < abs(untrained.ce_all - untrained.ce_clean)
    assert "all 3 in place at once" in res.summary()
    alone = train_many(model, toks, cfgs[1:2], TrainConfig(steps=60, batch_size=64, lr=3e-3), seqs_per_chunk=8,
                       progress=False)[0].sae
    assert torch.equal(alone.W_dec, tcs[1].W_dec)  # one pass for all layers changes none of them


def test_transcoders_train_cli(tmp_path, capsys, monkeypatch):
    import json

    import mechscope
    from mechscope.cli import main

    model = worded_llama()
    monkeypatch.setattr(mechscope, "load", lambda *a, **k: model)
    assert main(["transcoders", "train", "--layers", "0", "2", "--width", "64", "--k", "4", "--steps", "6",
                 "--batch", "32", "--seqs", "12", "--seq-len", "10", "--eval-seqs", "2", "--out", str(tmp_path),
                 "--json", "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["layers"] == [0, 2] and len(out["each"]) == 2 and out["ce_all"] > 0
    back = load_sae(tmp_path / "layer_2", model)
    assert back.cfg.hook_name_out == "blocks.2.hook_mlp_out" and back.cfg.skip
    saved = json.loads((tmp_path / "evaluation.json").read_text())
    assert saved["ce_all"] == out["ce_all"] and saved["layers"] == [0, 2]
    from mechscope.sae import load_transcoders, transcoder_cache

    assert [t.cfg.hook_name_out for t in load_transcoders(tmp_path, model)] == ["blocks.0.hook_mlp_out",
                                                                                 "blocks.2.hook_mlp_out"]
    monkeypatch.setenv("MECHSCOPE_CACHE", str(tmp_path / "cache"))
    assert transcoder_cache("org/My Model") == tmp_path / "cache" / "transcoders" / "My_Model"
    assert main(["transcoders", "train", "--layers", "7", "--out", str(tmp_path / "x")]) == 2
    assert "layers [7] out of range: valid layers are 0..2" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ["gptj", "phi", "cohere", "olmo2"])
def test_transcoders_train_on_families_without_ln2(arch, tmp_path, capsys, monkeypatch):
    """Parallel blocks with one shared norm (GPT-J, Phi, Cohere) and post-norm blocks (OLMo-2) have no
    ``ln2.hook_normalized``: each transcoder reads the block's real MLP input (``model.mlp_input``), is saved
    with it, loads back as a TranscoderSet and feeds an attribution graph."""
    import json

    import mechscope
    from mechscope.circuits.toy import toy_tokenizer
    from mechscope.cli import main
    from mechscope.graphs import attribution_graph
    from mechscope.sae import TranscoderSet, load_transcoders

    model = mechscope.HookedModel(tiny_hf(arch), tokenizer=toy_tokenizer(V))
    assert not model.has_hook("blocks.0.ln2.hook_normalized")
    monkeypatch.setattr(mechscope, "load", lambda *a, **k: model)
    assert main(["transcoders", "train", "--layers", "0", "1", "--width", "32", "--k", "4", "--steps", "4",
                 "--batch", "32", "--seqs", "8", "--seq-len", "10", "--eval-seqs", "2", "--out", str(tmp_path),
                 "--json", "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["layers"] == [0, 1] and out["ce_all"] > 0
    tcs = load_transcoders(tmp_path, model)
    assert isinstance(tcs, TranscoderSet) and tcs.layers == [0, 1]
    for layer in (0, 1):
        assert tcs.input_hook(layer) == model.mlp_input(layer)
        assert tcs.output_hook(layer) == f"blocks.{layer}.hook_mlp_out"
    g = attribution_graph(model, tcs, torch.tensor([[0, 5, 9, 14, 20]]), max_feature_nodes=50, certify=4, progress=False)
    assert g.certificate["n"] > 0 and g.certificate["worst_rel"] < 1e-3  # edges are real perturbations here too
