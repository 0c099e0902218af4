"""Metrics for patching, ablation and attribution. Functions of logits ``[batch, pos, d_vocab]``.

Answer positions: by default the last position of each prompt. With right padding pass the
``attention_mask`` so that the last *real* token of each row is used.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..core.errors import InputError, InputTypeError
from ..core.types import Answer


def labelled(fn: Callable, name: str, unit: str, higher: str = "higher is better") -> Callable:
    """``fn`` with a printable description: what the metric is, its unit, and which way is good.

    Every printed metric reads e.g. ``logit difference (answer - wrong), logits; higher = clean behaviour``.
    Works on functions and lambdas (the attributes go on the function)."""
    fn.metric_name, fn.metric_unit, fn.metric_direction = name, unit, higher
    return fn


def describe_metric(metric: Callable) -> str:
    """The description set by :func:`labelled` (on the function, or on the object a bound method belongs to),
    or ``"metric (unnamed: pass a labelled() metric to name it)"``."""
    for owner in (metric, getattr(metric, "__self__", None), getattr(metric, "__func__", None)):
        name = getattr(owner, "metric_name", None)
        if isinstance(name, str):
            return f"{name}, {owner.metric_unit}; {owner.metric_direction}"
    return "metric (unnamed; name it with mechscope.analysis.metrics.labelled)"


def answer_logits(logits: torch.Tensor, pos: int | torch.Tensor = -1,
                  attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``[batch, d_vocab]`` in float32: the logits at the answer position of each prompt.

    ``pos`` is an int (same for every row) or a ``[batch]`` tensor; with ``attention_mask`` (either
    padding side) and ``pos=-1`` it is each row's last unmasked position. Logits of a padded batch
    from :meth:`HookedModel.forward` carry their mask, so ``pos=-1`` never reads a padding position
    even when no mask is passed. Every metric computes in float32, whatever the model's dtype (a bf16
    logit difference would lose its low bits).
    """
    b = logits.shape[0]
    if attention_mask is None:
        attention_mask = getattr(logits, "attention_mask", None)
    if attention_mask is not None and isinstance(pos, int) and pos == -1:
        mask = attention_mask.to(logits.device).long()
        if mask.shape != logits.shape[:2]:
            raise InputError(f"attention_mask {tuple(mask.shape)} does not match the logits' [batch, pos] "
                             f"{tuple(logits.shape[:2])}")
        pos = (mask * torch.arange(1, mask.shape[1] + 1, device=mask.device)).argmax(-1)  # the last real token
    if isinstance(pos, int):
        return logits[:, pos].float()
    return logits[torch.arange(b, device=logits.device), pos.to(logits.device)].float()


def _reject_text(x) -> None:
    """Metrics take token ids: a clear error for answers given as text."""
    if isinstance(x, str) or (isinstance(x, (list, tuple)) and x and isinstance(x[0], str)):
        raise InputTypeError(f"metrics take token ids, got text {x!r}; convert answers with model.to_single_token("
                             f"{x if isinstance(x, str) else x[0]!r}) (or use a TaskDataset, which does it for you)")


def _ids(x, b: int, device) -> torch.Tensor:
    _reject_text(x)
    t = torch.as_tensor(x, device=device)
    if t.dim() > 1:
        raise InputError(f"expected one token id per prompt, got ids of shape {tuple(t.shape)}: a multi-token answer "
                         "(e.g. model.to_tokens(' New York')) cannot be read at one position: score its first token "
                         "(ids[..., 0]), or the whole continuation's log-probability from a forward pass of prompt + "
                         "answer")
    if t.dim() == 0:
        t = t.expand(b)
    if t.shape[0] != b:
        raise InputError(f"expected one answer per prompt ({b}), got {t.shape[0]}")
    return t.long()


def logit_diff(logits: torch.Tensor, correct: Answer, incorrect: Answer, pos: int | torch.Tensor = -1,
               attention_mask: torch.Tensor | None = None, mean: bool = False, alternatives: bool = False) -> torch.Tensor:
    """``logit[correct] - logit[incorrect]`` at the answer position: ``[batch]`` (or its mean).

    ``correct``/``incorrect``: an id, a ``[batch]`` tensor, or with ``alternatives=True`` ``[batch, k]``:
    k alternative answers per prompt, whose logits are averaged. (A multi-token answer is not k
    alternatives: a logit difference reads one position; score the first token, or compare log-probs.)
    """
    a = answer_logits(logits, pos, attention_mask)
    b = a.shape[0]

    def pick(ids):
        _reject_text(ids)
        t = torch.as_tensor(ids, device=a.device).long()
        if t.dim() == 2 and not alternatives:
            raise InputError(f"answers of shape {tuple(t.shape)} are k={t.shape[1]} answers per prompt; pass "
                             "alternatives=True if they are alternatives (their logits are averaged). A multi-token "
                             "answer cannot be scored at one position: use its first token")
        if t.dim() == 2:
            if t.shape[0] != b:
                raise InputError(f"expected {b} rows of answers, got {t.shape[0]}")
            return a.gather(1, t).mean(-1)
        return a.gather(1, _ids(t, b, a.device)[:, None])[:, 0]

    d = pick(correct) - pick(incorrect)
    return d.mean() if mean else d


def normalized_metric(value: torch.Tensor, clean: torch.Tensor | float, corrupted: torch.Tensor | float) -> torch.Tensor:
    """``(value - corrupted) / (clean - corrupted)``: 0 at the corrupted run, 1 at the clean run.

    Raises when clean and corrupted give the same value (the task has no signal to recover).
    """
    clean, corrupted = torch.as_tensor(clean), torch.as_tensor(corrupted)
    gap = clean - corrupted
    if bool((gap.abs() < 1e-8).any()):
        raise InputError(f"clean ({clean.tolist()}) and corrupted ({corrupted.tolist()}) metrics are equal: "
                         "nothing to normalise against; check that the corruption changes the answer")
    return (value - corrupted) / gap


def token_prob(logits: torch.Tensor, target: Answer, pos: int | torch.Tensor = -1,
               attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``softmax(logits)[target]`` at the answer position: ``[batch]``."""
    a = answer_logits(logits, pos, attention_mask).float()
    t = _ids(target, a.shape[0], a.device)
    return torch.softmax(a, -1).gather(1, t[:, None])[:, 0]


def token_rank(logits: torch.Tensor, target: Answer, pos: int | torch.Tensor = -1,
               attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Rank of ``target`` at the answer position (0 = top-1): ``[batch]``."""
    a = answer_logits(logits, pos, attention_mask)
    t = _ids(target, a.shape[0], a.device)
    return (a > a.gather(1, t[:, None])).sum(-1)


def kl_div(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """``KL(ref || p) = sum ref_p (log ref_p - log p)`` per position: ``[...]`` (last axis summed)."""
    if logits.shape != ref_logits.shape:
        raise InputError(f"logits {tuple(logits.shape)} and reference {tuple(ref_logits.shape)} differ in shape")
    lp = torch.log_softmax(logits.float(), -1)
    lr = torch.log_softmax(ref_logits.float(), -1)
    return (lr.exp() * (lr - lp)).sum(-1)


def auroc(pos: torch.Tensor | Sequence[float], neg: torch.Tensor | Sequence[float]) -> float:
    """The area under the ROC curve for telling ``pos`` scores from ``neg`` ones (ties count half): the chance
    that a random positive outscores a random negative (Mann-Whitney U / (n_pos n_neg))."""
    p, n = torch.as_tensor(pos, dtype=torch.float64).flatten(), torch.as_tensor(neg, dtype=torch.float64).flatten()
    if not p.numel() or not n.numel():
        raise InputError("AUROC needs at least one positive and one negative score")
    return float(((p[:, None] > n[None, :]).double() + 0.5 * (p[:, None] == n[None, :]).double()).mean())


def explained_variance(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """``1 - ||x - x_hat||^2 / ||x - mean_batch(x)||^2`` for ``x``, ``x_hat`` ``[n, d]``: a scalar.

    The mean is taken over the batch, not zero (the conventional definition; SAELens #443, #659).
    """
    return 1 - (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()


class StreamedExplainedVariance:
    """:func:`explained_variance` over batches ``x``, ``x_hat`` ``[n, d]`` without holding them: float64 sums of
    ``||x - x_hat||^2``, ``||x||^2`` and ``x``, then ``1 - sse / (sum ||x||^2 - n ||mean x||^2)``."""

    def __init__(self):
        self.sse = self.sxx = 0.0
        self.sx: torch.Tensor | None = None
        self.n = 0

    def add(self, x: torch.Tensor, x_hat: torch.Tensor) -> None:
        x64 = x.double()
        self.sse += float((x64 - x_hat.double()).pow(2).sum())
        self.sxx += float(x64.pow(2).sum())
        self.sx = x64.sum(0) if self.sx is None else self.sx + x64.sum(0)
        self.n += x.shape[0]

    @property
    def value(self) -> float:
        if self.sx is None:
            raise InputError("no batches were added")
        return 1.0 - self.sse / (self.sxx - float(self.sx @ self.sx) / self.n)


def repeated_tokens(n_tokens: int, batch: int = 1, vocab_low: int = 100, vocab_high: int = 20000,
                    seed: int = 0, bos: int | None = None) -> torch.Tensor:
    """Random tokens repeated twice, ``[batch, (1 +) 2 * n_tokens]``: the induction test input.

    (Olsson et al. 2022, "In-context Learning and Induction Heads".)
    """
    g = torch.Generator().manual_seed(seed)
    half = torch.randint(vocab_low, vocab_high, (batch, n_tokens), generator=g)
    toks = torch.cat([half, half], dim=1)
    if bos is not None:
        toks = torch.cat([torch.full((batch, 1), bos), toks], dim=1)
    return toks


def induction_loss(logits: torch.Tensor, tokens: torch.Tensor, n_tokens: int | None = None) -> torch.Tensor:
    """Mean next-token loss over the second copy of a repeated sequence: ``[batch]``.

    The sequence is ``[prefix?] A A`` with ``len(A) = n_tokens`` (default: half the length). Only
    predictions of tokens 2..n of the second copy count (the first token of the copy cannot be
    predicted by induction).
    """
    L = tokens.shape[1]
    n = n_tokens or L // 2
    start = L - n  # first token of the second copy
    logp = torch.log_softmax(logits[:, start:-1].float(), -1)
    nll = -logp.gather(-1, tokens[:, start + 1:, None])[..., 0]
    return nll.mean(-1)
