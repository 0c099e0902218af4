"""The core SAE metrics beyond L0/MSE/variance (issue 22, section 1, core): shrinkage, decoder similarity, feature
density and fraction alive, each against a value known by construction, and bootstrap intervals over tokens."""

from __future__ import annotations

import json

import torch

from mechscope.sae import SAE, SAEConfig
from mechscope.sae.evaluate import SAEEval, core_metrics, decoder_similarity


def test_shrinkage_density_and_intervals_against_known_values(tmp_path):
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(3000, 16, generator=g) + 1.0
    sae = SAE(SAEConfig(d_in=16, d_sae=40, architecture="topk", k=4), seed=0)
    f = torch.zeros(3000, 40)
    f[:, 0] = 1.0  # fires on every token
    f[::10, 1] = 2.0  # on one token in ten
    f[:3, 2] = 1.0  # on three tokens; latents 3.. never fire
    m = core_metrics(sae, acts, 0.5 * acts, f)
    assert abs(m["l2_ratio"] - 0.5) < 1e-6  # the reconstruction is half the activation: shrinkage 0.5
    d = m["log10_density"]
    torch.testing.assert_close(d[:3], torch.tensor([0.0, -1.0, float(torch.tensor(3 / 3000).log10())]))
    assert torch.isinf(d[3:]).all()
    ci = m["token_ci"]
    for name in ("l0", "mse", "l2_ratio", "explained_variance"):
        assert ci[name].low <= ci[name].value <= ci[name].high and ci[name].n == 3000, name
    assert ci["l2_ratio"].high - ci["l2_ratio"].low < 1e-6  # every token's ratio is 0.5: no spread
    assert ci["mse"].high > ci["mse"].low  # the errors differ from token to token
    ev = SAEEval(1.1, 1.0, 0.7, 37 / 40, 3.0, 3.1, 6.0, n_tokens=3000, n_seqs=30, **m)
    edges, counts = ev.density_histogram(bins=5)
    assert sum(counts) == 3 and len(edges) == 6 and abs(ev.alive_fraction - 3 / 40) < 1e-9
    s = ev.summary()
    assert "shrinkage (mean ||x_hat|| / ||x||; 1 = none) 0.500" in s and "near-duplicates" in s and "feature density" in s
    assert json.loads(json.dumps(ev.to_dict()))["density_histogram"]["counts"] == ev.density_histogram()[1]
    assert ev.plot(tmp_path / "density.png").stat().st_size > 1000


def test_decoder_similarity_finds_a_duplicated_latent():
    sae = SAE(SAEConfig(d_in=16, d_sae=64, architecture="topk", k=4), seed=3)
    with torch.no_grad():
        sae.W_dec[5] = 3.0 * sae.W_dec[9]  # the same direction, another norm
    cos = decoder_similarity(sae, chunk=16)  # in chunks, against the whole matrix at once
    W = torch.nn.functional.normalize(sae.W_dec.detach(), dim=-1)
    full = W @ W.T
    full.fill_diagonal_(-2)
    torch.testing.assert_close(cos, full.max(-1).values)
    assert cos[5] > 0.999 and cos[9] > 0.999 and float((cos > 0.9).float().sum()) == 2
