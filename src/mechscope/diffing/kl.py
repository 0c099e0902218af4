"""Where the two models' next-token distributions differ: per-token KL, loss differences, the tokens that moved.

On every position of a corpus, with ``p`` the fine-tune's and ``q`` the base model's next-token distribution:

    KL(p || q) = Σ_v p(v) (log p(v) - log q(v))              (nats per token)
    Δloss      = -log p(x_{t+1}) + log q(x_{t+1})             (nats; negative where the fine-tune predicts better)
    Δp(v)      = p(v) - q(v), averaged over a document's positions

Every estimate is a mean over documents with a percentile-bootstrap interval over documents (a document's positions
are not independent). The control is split-half agreement: the tokens whose probability moved most on one half of
the documents are looked up on the other half, beside the overlap that chance gives; top tokens that do not come back
are noise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..analysis import viz
from ..analysis.validation import Estimate, bootstrap_ci
from ..core.errors import InputError
from ..core.progress import bar
from ..core.result import Result
from .pair import ModelPair


@dataclass
class Context:
    """One position where the models disagree: its text, the token that came next, and each model's top guess."""

    doc: int
    pos: int
    kl: float
    text: str
    next_token: str
    base_top: str
    base_p: float
    ft_top: str
    ft_p: float


@dataclass(repr=False)
class KLDiff(Result):
    """Per-token divergence between a pair's next-token distributions on a corpus (module docstring)."""

    kl: Estimate  # mean KL(ft || base) per token, nats, interval over documents
    loss_diff: Estimate  # mean (loss_ft - loss_base) per token, nats
    top_contexts: list[Context]
    moved_up: list[tuple[str, Estimate]]  # tokens whose mean probability rose most (Δp, probability points)
    moved_down: list[tuple[str, Estimate]]
    split_overlap: int  # of the top-k risers on half A, how many are among the top-k on half B
    split_k: int
    chance_overlap: float
    n_docs: int
    n_tokens: int
    per_doc_kl: list[float] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"KL(fine-tune || base) per token: {self.kl.summary()} nats over {self.n_docs} documents "
                 f"({self.n_tokens} tokens)",
                 f"loss difference (fine-tune - base): {self.loss_diff.summary()} nats per token ({self._loss_word()})"]
        if self.moved_up:
            lines.append("tokens whose probability rose most (mean Δp per position, probability points, interval "
                         "over documents):")
            lines += [f"  {t!r}: {e.summary()}" for t, e in self.moved_up[:10]]
        if self.moved_down:
            lines.append("tokens whose probability fell most:")
            lines += [f"  {t!r}: {e.summary()}" for t, e in self.moved_down[:5]]
        lines.append(f"control (split-half): {self.split_overlap} of the top {self.split_k} risers on one half of the "
                     f"documents are in the other half's top {self.split_k} (chance: {self.chance_overlap:.2f}); "
                     + ("the shift is reproducible" if self.split_overlap > max(3 * self.chance_overlap, 2)
                        else "the top tokens do NOT reproduce across halves: read them as noise"))
        if self.top_contexts:
            lines.append("contexts where the distributions differ most (KL in nats):")
            for c in self.top_contexts[:8]:
                lines.append(f"  {c.kl:.3f}  ...{c.text!r} -> {c.next_token!r}: base {c.base_top!r} ({c.base_p:.2f}), "
                             f"fine-tune {c.ft_top!r} ({c.ft_p:.2f})")
        if self.n_docs < 10:
            lines.append(f"only {self.n_docs} documents: the intervals are not evidence; give 10 or more")
        return "\n".join(lines)

    def _loss_word(self) -> str:
        e = self.loss_diff
        if e.informative and e.low > 0:
            return "the fine-tune predicts this corpus worse"
        if e.informative and e.high < 0:
            return "the fine-tune predicts this corpus better"
        return "no clear change in loss"

    def _html_body(self) -> str:
        return viz.histogram_svg(self.per_doc_kl, bins=30, title="mean KL(fine-tune || base) per document, nats/token")

    def top_tokens(self, k: int = 20) -> list[str]:
        """The ``k`` tokens whose probability rose most (what recovery scores read)."""
        return [t for t, _ in self.moved_up[:k]]


@torch.no_grad()
def kl_diff(pair: ModelPair, tokens: torch.Tensor, n_contexts: int = 20, n_moved: int = 20, batch_size: int = 8,
            split_k: int = 20, context_window: int = 12) -> KLDiff:
    """:class:`KLDiff` of ``pair`` on ``tokens [n_docs, pos]`` (one document per row; position 0, the BOS/attention
    sink, is predicted from, never scored)."""
    pair.require_same_vocab("KL")
    if tokens.dim() != 2 or tokens.shape[1] < 2:
        raise InputError(f"tokens must be [documents, pos] with pos >= 2, got {tuple(tokens.shape)}")
    n, P = tokens.shape
    V = pair.cfg.d_vocab
    doc_kl, doc_loss = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    dp = torch.zeros(n, V, dtype=torch.float64)  # per document: mean Δp per position
    kl_all = torch.zeros(n, P - 1)
    tops = torch.zeros(n, P - 1, 4)  # base top id, base p, ft top id, ft p
    for s in bar(range(0, n, batch_size), desc="KL over the corpus"):
        t = tokens[s:s + batch_size]
        logp = {}
        for side in ("base", "ft"):
            with pair.side(side) as m:
                logp[side] = torch.log_softmax(m(t.to(m.device)).float().cpu()[:, :-1], dim=-1)  # [b, P-1, V]
        lp, lq = logp["ft"], logp["base"]
        p = lp.exp()
        kl = (p * (lp - lq)).sum(-1)  # [b, P-1]
        nxt = t[:, 1:, None]
        dl = -lp.gather(-1, nxt)[..., 0] + lq.gather(-1, nxt)[..., 0]
        kl_all[s:s + t.shape[0]] = kl
        doc_kl[s:s + t.shape[0]] = kl.double().mean(-1)
        doc_loss[s:s + t.shape[0]] = dl.double().mean(-1)
        dp[s:s + t.shape[0]] = (p - lq.exp()).double().mean(1)
        qb, ib = lq.exp().max(-1)
        pf, i_f = p.max(-1)
        tops[s:s + t.shape[0]] = torch.stack([ib.float(), qb, i_f.float(), pf], -1)
    tok = pair.tokenizer
    dec = (lambda i: tok.decode([int(i)])) if tok is not None else str  # noqa: E731
    flat = kl_all.flatten().topk(min(n_contexts, kl_all.numel())).indices
    contexts = []
    for f in flat.tolist():
        d, q = divmod(f, P - 1)
        lo = max(0, q + 1 - context_window)
        text = "".join(dec(x) for x in tokens[d, lo:q + 1].tolist())
        bt, bp, ft, fp = tops[d, q].tolist()
        contexts.append(Context(d, q, float(kl_all[d, q]), text, dec(tokens[d, q + 1]), dec(bt), bp, dec(ft), fp))
    mean_dp = dp.mean(0)
    up = mean_dp.topk(min(n_moved, V)).indices.tolist()
    down = (-mean_dp).topk(min(n_moved, V)).indices.tolist()
    moved_up = [(dec(i), bootstrap_ci(dp[:, i])) for i in up]
    moved_down = [(dec(i), bootstrap_ci(dp[:, i])) for i in down]
    k = min(split_k, V)
    if n >= 2:
        a, b = dp[0::2].mean(0), dp[1::2].mean(0)
        overlap = len(set(a.topk(k).indices.tolist()) & set(b.topk(k).indices.tolist()))
    else:
        overlap = 0
    return KLDiff(bootstrap_ci(doc_kl), bootstrap_ci(doc_loss), contexts, moved_up, moved_down, overlap, k, k * k / V,
                  n, n * (P - 1), doc_kl.tolist())
