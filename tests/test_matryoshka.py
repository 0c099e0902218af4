"""Matryoshka BatchTopK (Bussmann et al. 2025): nested prefixes of the dictionary each reconstruct on their own.
The prefix losses are the defining property, so they are checked against a BatchTopK SAE of the same shape trained
the same way; the rest (save, load, resume, data parallelism in tests/test_distributed.py) is shared machinery."""

from __future__ import annotations

import json

import pytest
import torch

from mechscope.core.errors import InputError
from mechscope.sae import SAE, SAEConfig, TrainConfig, load_sae, save_sae, train_sae


def zipfian(n=6000, d=24, atoms=96, seed=0):
    """Sparse sums of unit directions whose firing rates fall off as 1/rank (a few common, many rare)."""
    g = torch.Generator().manual_seed(seed)
    D = torch.nn.functional.normalize(torch.randn(atoms, d, generator=g), dim=-1)
    p = 0.6 / torch.arange(1, atoms + 1).float()
    on = torch.rand(n, atoms, generator=g) < p
    return (on * (torch.rand(n, atoms, generator=g) + 0.5)) @ D


def test_config_prefixes_default_and_bad_ones_are_refused():
    assert SAEConfig(d_in=8, d_sae=64, architecture="matryoshka", k=4).matryoshka_widths == (8, 16, 32, 64)
    with pytest.raises(InputError, match=r"increasing prefix sizes ending at d_sae \(64\)"):
        SAEConfig(d_in=8, d_sae=64, architecture="matryoshka", k=4, matryoshka_widths=(16, 8, 64))
    with pytest.raises(InputError, match="ending at d_sae"):
        SAEConfig(d_in=8, d_sae=64, architecture="matryoshka", k=4, matryoshka_widths=(16, 32))
    assert "prefixes [8, 16, 32, 64]" in repr(SAE(SAEConfig(d_in=8, d_sae=64, architecture="matryoshka", k=4)))


def test_the_loss_adds_each_inner_prefix_reconstruction():
    sae = SAE(SAEConfig(d_in=8, d_sae=32, architecture="matryoshka", k=3, matryoshka_widths=(4, 16, 32)), seed=1)
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    terms = sae.training_loss(x)
    f = sae.activate(sae.pre_acts(x), training=True)
    by_hand = sum(((x - (f[:, :m] @ sae.W_dec[:m] + sae.b_dec)).pow(2).sum(-1).mean()) for m in (4, 16))
    torch.testing.assert_close(terms.matryoshka, by_hand)
    torch.testing.assert_close(terms.loss, terms.mse + by_hand)


def test_prefixes_reconstruct_on_their_own_better_than_batchtopk():
    acts = zipfian()
    train = TrainConfig(steps=400, batch_size=256, lr=3e-3, log_every=10**6)
    out = {}
    for arch in ("batchtopk", "matryoshka"):
        cfg = SAEConfig(d_in=24, d_sae=96, architecture=arch, k=4, matryoshka_widths=(12, 48, 96))
        out[arch] = train_sae(acts, cfg, train, progress=False)
    x = acts[:1000]

    def fvu(sae, width):
        return float((x - sae.prefix_reconstruction(x, width)).pow(2).sum() / (x - x.mean(0)).pow(2).sum())

    m, b = out["matryoshka"], out["batchtopk"]
    assert fvu(m, 12) < 0.95 * fvu(b, 12), (fvu(m, 12), fvu(b, 12))  # the first 12 latents alone: 0.38 vs 0.43
    assert fvu(m, 96) < 0.3  # and the whole dictionary still reconstructs
    rate = (m.encode(x) > 0).float().mean(0)
    assert rate[:12].mean() > rate[48:].mean()  # the common directions land in the first prefix


def test_saved_as_saelens_jumprelu_with_its_prefixes_and_resumed_exactly(tmp_path):
    acts = zipfian(n=2000)
    cfg = SAEConfig(d_in=24, d_sae=48, architecture="matryoshka", k=3, matryoshka_widths=(6, 24, 48),
                    hook_name="blocks.1.hook_resid_post")
    train = TrainConfig(steps=40, batch_size=128, checkpoint_every=20, log_every=20)
    whole = train_sae(acts, cfg, train, progress=False)
    train_sae(acts, cfg, train, out=tmp_path / "run", progress=False, stop_after=20)
    resumed = train_sae(acts, cfg, train, out=tmp_path / "run", resume=True, progress=False)
    for k, v in whole.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, rtol=0, atol=0, msg=k)
    path = save_sae(whole, tmp_path / "sae")
    raw = json.loads((path / "cfg.json").read_text())
    assert raw["architecture"] == "jumprelu" and raw["matryoshka_widths"] == [6, 24, 48]
    assert raw["metadata"]["training_architecture"] == "matryoshka_batchtopk"
    back = load_sae(path)
    assert back.cfg.matryoshka_widths == (6, 24, 48)
    torch.testing.assert_close(back(acts[:100]), whole(acts[:100]), atol=1e-5, rtol=1e-5)
