"""Head detectors and "what does this head do?".

Each detector returns a :class:`~mechscope.circuits.HeadScores` ``[layer, head]``:

- previous-token: mean attention from position ``i`` to ``i - 1``;
- duplicate-token: on ``[prefix] A A`` (A random, length n), attention from ``A2[i]`` to ``A1[i]``;
- induction: attention from ``A2[i]`` to ``A1[i + 1]``, the token after the earlier copy
  (Olsson et al. 2022);
- attention sink: mean attention to position 0 (the BOS token where the model uses one);
- copying: the eigenvalue copying score of ``W_E W_V W_O W_U`` (+1 copies, -1 suppresses).

All attention scores are means over query positions and prompts, in ``[0, 1]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import corpus
from ..analysis import viz
from ..analysis.metrics import repeated_tokens
from ..core.errors import InputError
from ..core.files import atomic_write
from ..core.hookpoints import act_name
from ..core.model import HookedModel, lm_loss
from ..core.placement import stack_on
from ..core.result import Result
from ..core.types import checked
from ..techniques.ablation import ablate
from .weights import HeadScores, copying_scores, full_OV, full_QK


@checked
def induction_tokens(model: HookedModel, n: int = 20, batch: int = 8, seed: int = 0) -> tuple[torch.Tensor, int]:
    """``[batch, prefix + 2n]`` random tokens repeated twice (:func:`~mechscope.analysis.metrics.repeated_tokens`),
    with the model's BOS when it uses one; and ``prefix`` (0 or 1)."""
    V = model.cfg.d_vocab
    bos = None
    if model.cfg.default_prepend_bos and model.tokenizer is not None:
        bos = model.tokenizer.bos_token_id
    toks = repeated_tokens(n, batch, vocab_low=min(100, V // 4), vocab_high=V - 1, seed=seed, bos=bos)
    return toks.to(model.device), (1 if bos is not None else 0)


@torch.no_grad()
def _patterns(model: HookedModel, tokens) -> torch.Tensor:
    """``[layer, batch, head, q, k]`` attention patterns."""
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("attn.hook_pattern"),
                                    logits_to_keep=1)  # the patterns are all it reads: one position's unembedding
    return stack_on([cache["pattern", l] for l in range(model.cfg.n_layers)]).float()


def _offset_score(pat: torch.Tensor, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Mean of ``pat[..., q, k]`` over the (q, k) pairs, over batch: ``[layer, head]``."""
    return pat[..., queries, keys].mean(-1).mean(1)


_DESCRIPTIONS = {
    "previous-token": "attention from i to i-1",
    "duplicate-token": "attention to the earlier copy",
    "induction": "attention to the token after the earlier copy",
    "attention sink": "attention to position 0",
}


def _attention_scores(model: HookedModel, tokens, n: int | None, prefix: int) -> dict[str, HeadScores]:
    """The attention detectors from one forward pass; the repeat-based ones need ``tokens = [prefix] A A``."""
    pat = _patterns(model, tokens)
    q_all = torch.arange(1, tokens.shape[1])
    raw = {"previous-token": _offset_score(pat, q_all, q_all - 1),
           "attention sink": _offset_score(pat, q_all, torch.zeros_like(q_all))}
    if n is not None:
        if tokens.shape[1] != prefix + 2 * n:
            raise InputError(f"tokens must be [prefix={prefix}] + 2 x {n} repeated tokens, got length {tokens.shape[1]}")
        q2 = torch.arange(prefix + n, prefix + 2 * n)
        raw["duplicate-token"] = _offset_score(pat, q2, q2 - n)
        raw["induction"] = _offset_score(pat, q2, q2 - n + 1)
    return {k: HeadScores(k, v.cpu(), _DESCRIPTIONS[k]) for k, v in raw.items()}


def _repeated(model: HookedModel, tokens, n, prefix, seed):
    if tokens is None:
        n = max(2, min(n, (model.cfg.n_ctx - 1) // 2))
        tokens, prefix = induction_tokens(model, n, seed=seed)
    return tokens, n, prefix or 0


@checked
def previous_token_scores(model: HookedModel, tokens: torch.Tensor | None = None, seed: int = 0) -> HeadScores:
    toks = tokens if tokens is not None else induction_tokens(model, seed=seed)[0]
    return _attention_scores(model, toks, None, 0)["previous-token"]


@checked
def sink_scores(model: HookedModel, tokens: torch.Tensor | None = None, seed: int = 0) -> HeadScores:
    toks = tokens if tokens is not None else induction_tokens(model, seed=seed)[0]
    return _attention_scores(model, toks, None, 0)["attention sink"]


@checked
def duplicate_token_scores(model: HookedModel, tokens: torch.Tensor | None = None, n: int = 20, prefix: int | None = None,
                           seed: int = 0) -> HeadScores:
    return _attention_scores(model, *_repeated(model, tokens, n, prefix, seed))["duplicate-token"]


@checked
def induction_scores(model: HookedModel, tokens: torch.Tensor | None = None, n: int = 20, prefix: int | None = None,
                     seed: int = 0) -> HeadScores:
    return _attention_scores(model, *_repeated(model, tokens, n, prefix, seed))["induction"]


@checked
def copying_head_scores(model: HookedModel) -> HeadScores:
    return HeadScores("copying", copying_scores(model).cpu(), "eigenvalue score of W_E W_V W_O W_U")


@checked
def detect_heads(model: HookedModel, n: int = 20, batch: int = 8, seed: int = 0) -> dict[str, HeadScores]:
    """Every detector on one batch of repeated random tokens (one forward pass for the attention ones).

    ``n`` is capped so that ``[BOS] A A`` fits the model's context.
    """
    n = max(2, min(n, (model.cfg.n_ctx - 1) // 2))
    toks, prefix = induction_tokens(model, n, batch, seed)
    out = _attention_scores(model, toks, n, prefix)
    order = ["previous-token", "duplicate-token", "induction", "attention sink"]
    return {**{k: out[k] for k in order}, "copying": copying_head_scores(model)}


@dataclass(repr=False)
class HeadReport(Result):
    """Everything mechscope can say about one head, as text and as an offline HTML page."""

    layer: int
    head: int
    scores: dict[str, tuple[float, int]]  # detector -> (score, rank among all heads)
    n_heads_total: int
    patterns: list[tuple[list[str], torch.Tensor]]  # (tokens, [q, k]) per prompt
    ov_top: list[tuple[str, list[str]]]  # input token -> top output tokens
    ov_self_rate: float
    offsets: torch.Tensor  # mean attention by query-key distance 0..k
    qk_top: list[tuple[str, list[str]]] = field(default_factory=list)  # query token -> preferred key tokens
    ablation: object | None = None
    extra: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"L{self.layer}H{self.head}"

    def summary(self) -> str:
        lines = [f"head {self.name}"]
        for k, (v, r) in self.scores.items():
            lines.append(f"  {k:16s} {v:+.3f}   rank {r} of {self.n_heads_total}")
        lines.append("  attention by distance (0 = self): " +
                     ", ".join(f"{d}:{float(x):.2f}" for d, x in enumerate(self.offsets)))
        lines.append(f"  OV circuit: the input token is among its own top-5 outputs for {self.ov_self_rate:.0%} "
                     f"of {len(self.ov_top)} sampled tokens")
        for t, outs in self.ov_top[:5]:
            lines.append(f"    {t!r:>14} -> {', '.join(repr(o) for o in outs)}")
        if self.qk_top:
            lines.append("  QK circuit (content part, no rotary): keys a query token prefers")
            for t, keys in self.qk_top[:5]:
                lines.append(f"    {t!r:>14} -> {', '.join(repr(k) for k in keys)}")
        if self.ablation is not None:
            lines.append("  " + self.ablation.summary().replace("\n", "\n  "))
        return "\n".join(lines)

    def to_html(self) -> str:
        body = f"<pre>{viz.esc(self.summary())}</pre>"
        for toks, pat in self.patterns:
            labels = viz.position_labels(toks)
            body += viz.heatmap_html(pat, labels, labels, title=f"attention pattern of {self.name} (rows: queries)")
        rows = "".join(f"<tr><td>{viz.esc(repr(t))}</td><td>{viz.esc(', '.join(repr(o) for o in outs))}</td></tr>"
                       for t, outs in self.ov_top)
        body += f"<h3>OV circuit: top output tokens</h3><table class='ms-heat'>{rows}</table>"
        rows = "".join(f"<tr><td>{viz.esc(repr(t))}</td><td>{viz.esc(', '.join(repr(k) for k in ks))}</td></tr>"
                       for t, ks in self.qk_top)
        body += f"<h3>QK circuit (content part): preferred key tokens</h3><table class='ms-heat'>{rows}</table>"
        return body

    def write(self, path: str | Path) -> Path:
        """The report as one offline HTML page (written atomically)."""
        return atomic_write(path, viz.page(f"head {self.name}", self.to_html()))

    def plot(self, path: str | Path = "head.png") -> Path:
        toks, pat = self.patterns[0]
        labels = viz.position_labels(toks)
        return viz.heatmap_png(pat, labels, labels, path, title=f"{self.name} attention", xlabel="key position: token",
                               ylabel="query position: token")


@checked
@torch.no_grad()
def head_report(model: HookedModel, layer: int, head: int, prompts: list | None = None, n_ov_tokens: int = 50,
                ablation_seqs: int = 16, seed: int = 0, detectors: dict | None = None) -> HeadReport:
    """Answer "what does this head do?": patterns, detector scores with ranks, OV outputs, positional
    preference, and the effect of mean-ablating it on held-out text loss (with a CI). ``prompts``: texts or
    token rows ``[pos]`` whose patterns are shown. ``detectors``: the
    output of :func:`detect_heads` when several heads are reported (computed once, not per head)."""
    c = model.cfg
    if not (0 <= layer < c.n_layers and 0 <= head < c.n_heads):
        raise InputError(f"no head L{layer}H{head}: layers 0..{c.n_layers - 1}, heads 0..{c.n_heads - 1}")
    det = detectors if detectors is not None else detect_heads(model, seed=seed)
    scores = {k: (float(v.scores[layer, head]), v.rank(layer, head)) for k, v in det.items()}
    patterns = []
    texts = prompts
    if texts is None and model.tokenizer is not None:
        texts = ["When Mary and John went to the store, John gave a drink to"]
        texts += [t[:300] for _, t in zip(range(2), corpus.default_corpus("test"))]
    toks_list = ([t.reshape(1, -1) if isinstance(t, torch.Tensor) else model.to_tokens(t) for t in texts] if texts
                 else [induction_tokens(model, 10, 1, seed)[0]])
    dist = torch.zeros(9)
    for toks in toks_list:
        _, cache = model.run_with_cache(toks, names_filter=act_name("pattern", layer))
        pat = cache["pattern", layer][0, head].float().cpu()
        strs = model.to_str_tokens(toks[0]) if model.tokenizer is not None else [str(int(t)) for t in toks[0]]
        patterns.append((strs, pat))
        P = pat.shape[0]
        for d in range(min(9, P)):
            dist[d] += pat.diagonal(-d).mean()
    dist /= len(toks_list)
    # OV circuit on a sample of tokens
    g = torch.Generator().manual_seed(seed)
    sample = torch.randint(min(100, c.d_vocab // 4), c.d_vocab - 1, (n_ov_tokens,), generator=g).to(model.device)
    ov = full_OV(model, layer, head)
    rows = (ov.A[sample] @ ov.B)  # [n, d_vocab]
    top = rows.topk(5, dim=-1).indices
    self_rate = float((top == sample[:, None]).any(-1).float().mean())
    name = (lambda i: model.to_str_tokens(torch.tensor([int(i)]))[0]) if model.tokenizer is not None else str
    ov_top = [(name(t), [name(o) for o in outs]) for t, outs in zip(sample.tolist(), top.tolist())]
    qk = full_QK(model, layer, head)
    keys = (qk.A[sample[:10]] @ qk.B).topk(5, dim=-1).indices  # [10, 5]: preferred key tokens
    qk_top = [(name(t), [name(k) for k in ks]) for t, ks in zip(sample[:10].tolist(), keys.tolist())]
    abl = None
    if model.tokenizer is not None and ablation_seqs:
        held = corpus.pack(model, corpus.default_corpus("test"), 64, n_seqs=2 * ablation_seqs)
        ref, evalset = held[:ablation_seqs], held[ablation_seqs:]

        def per_seq_loss(logits):
            return lm_loss(logits, evalset.to(logits.device), per_token=True).mean(-1)

        abl = ablate(model, evalset, per_seq_loss, [f"L{layer}H{head}"], method="mean", reference=ref, seed=seed,
                     metric_name=f"next-token loss per sequence on {ablation_seqs} held-out docstring sequences of 64 "
                                 "tokens, nats per token; lower is better (a rise means the head helps)")
    return HeadReport(layer, head, scores, c.n_layers * c.n_heads, patterns, ov_top, self_rate, dist, qk_top, abl)
