"""Metrics: checked against direct computations, padding, and the real model's induction."""

import pytest
import torch

from mechscope.analysis import metrics as M


def test_logit_diff_and_padding():
    logits = torch.randn(3, 5, 11)
    d = M.logit_diff(logits, torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6]))
    assert torch.allclose(d, logits[torch.arange(3), -1, [1, 2, 3]] - logits[torch.arange(3), -1, [4, 5, 6]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    dm = M.logit_diff(logits, 1, 4, attention_mask=mask)
    assert torch.allclose(dm, logits[torch.arange(3), [2, 4, 3], 1] - logits[torch.arange(3), [2, 4, 3], 4])
    multi = M.logit_diff(logits, torch.tensor([[1, 2]] * 3), torch.tensor([4, 4, 4]), alternatives=True)
    assert torch.allclose(multi, logits[:, -1, 1:3].mean(-1) - logits[:, -1, 4])
    with pytest.raises(ValueError, match="one answer per prompt"):
        M.logit_diff(logits, torch.tensor([1, 2]), 3)


def test_normalized_metric_endpoints():
    assert float(M.normalized_metric(torch.tensor(3.0), 3.0, -1.0)) == 1.0
    assert float(M.normalized_metric(torch.tensor(-1.0), 3.0, -1.0)) == 0.0
    with pytest.raises(ValueError, match="nothing to normalise"):
        M.normalized_metric(torch.tensor(1.0), 2.0, 2.0)


def test_prob_rank_kl():
    logits = torch.tensor([[[0.0, 2.0, 1.0]]])
    p = M.token_prob(logits, 2)
    assert torch.allclose(p, torch.softmax(logits[0, 0], -1)[2:3])
    assert M.token_rank(logits, 1).item() == 0 and M.token_rank(logits, 0).item() == 2
    assert torch.allclose(M.kl_div(logits, logits), torch.zeros(1, 1), atol=1e-7)
    other = torch.tensor([[[1.0, 0.0, 0.0]]])
    assert M.kl_div(other, logits).item() > 0
    with pytest.raises(ValueError, match="differ in shape"):
        M.kl_div(logits, logits[..., :2])


@pytest.mark.slow
def test_induction_loss_drops_on_real_model(smollm):
    toks = M.repeated_tokens(30, batch=2, seed=0)
    with torch.no_grad():
        logits = smollm(toks)
    second = M.induction_loss(logits, toks)
    logp = torch.log_softmax(logits[:, :29].float(), -1)
    first = -logp.gather(-1, toks[:, 1:30, None])[..., 0].mean(-1)
    assert (first > 8).all() and (second < 4).all(), (first, second)


def test_streamed_explained_variance_equals_the_held_one():
    """evaluate_on_world no longer holds its samples: explained variance summed over batches equals the formula on
    all of them at once, within 1e-9."""
    from mechscope.analysis.metrics import StreamedExplainedVariance, explained_variance

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 16, generator=g) * 3 + 5  # a mean far from 0: the centring matters
    x_hat = x + 0.5 * torch.randn(1000, 16, generator=g)
    acc = StreamedExplainedVariance()
    for s in range(0, 1000, 77):
        acc.add(x[s:s + 77], x_hat[s:s + 77])
    assert acc.n == 1000 and abs(acc.value - float(explained_variance(x.double(), x_hat.double()))) < 1e-9
    assert 0.9 < acc.value < 1.0
