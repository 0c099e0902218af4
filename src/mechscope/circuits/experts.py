"""What does this expert do? Routing, logit effect and ablation effect of one expert of a mixture of experts.

For expert ``e`` of MoE block ``L``, on a text corpus (the default held-out docstrings, or given tokens):

- **routing**: the fraction of tokens routed to it (``e`` among each token's top-k), its mean weight
  when chosen, and the tokens routed to it most often (count and rate per token type);
- **logit effect**: its mean output over the tokens routed to it, read through the unembedding
  (``mean_out @ W_U``, the direct path: the tokens it promotes and suppresses);
- **ablation effect**: the change in each sequence's next-token loss when its output is removed from
  every token routed to it (zero ablation), with a bootstrap CI over sequences.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import corpus
from ..analysis import viz
from ..analysis.validation import Estimate, bootstrap_ci
from ..core.components import Component
from ..core.hookpoints import act_name
from ..core.model import HookedModel, lm_loss
from ..core.result import Result
from ..core.types import checked
from ..techniques.ablation import ablation_hooks


@dataclass(repr=False)
class ExpertReport(Result):
    """One expert's routing statistics, logit effect and ablation effect."""

    component: str
    n_tokens: int
    route_rate: float  # fraction of tokens that chose it
    mean_weight: float  # its mean router weight when chosen
    top_tokens: list[tuple[str, int, float]]  # (token, times routed, rate among that token's occurrences)
    promoted: list[tuple[str, float]]
    suppressed: list[tuple[str, float]]
    ablation: Estimate | None  # change in next-token loss per sequence when zero-ablated
    extra: dict = field(default_factory=dict)

    def summary(self) -> str:
        c = self.component
        lines = [f"expert {c}: chosen by {self.route_rate:.1%} of {self.n_tokens} tokens (uniform routing: "
                 f"{self.extra.get('uniform_rate', float('nan')):.1%}), mean weight {self.mean_weight:.3f} when chosen",
                 "  tokens routed to it most: " + ", ".join(f"{t!r} ({n}x, {r:.0%})" for t, n, r in self.top_tokens[:10]),
                 "  promotes (direct path): " + ", ".join(f"{t!r} {v:+.2f}" for t, v in self.promoted[:8]),
                 "  suppresses: " + ", ".join(f"{t!r} {v:+.2f}" for t, v in self.suppressed[:8])]
        if self.ablation is not None:
            lines.append(f"  zero-ablating it changes the next-token loss (nats per token, mean per sequence; lower is "
                         f"better) by {self.ablation} ({self.ablation.verdict()})")
        return "\n".join(lines)

    def _html_body(self) -> str:
        rows = [f"<tr><td>{viz.esc(t)}</td><td>{n}</td><td>{r:.0%}</td></tr>" for t, n, r in self.top_tokens[:20]]
        return (f"<h3>expert {viz.esc(self.component)}</h3><table><tr><th>token</th><th>routed</th><th>rate</th></tr>"
                + "".join(rows) + "</table>")


def _routed(model: HookedModel, tokens: torch.Tensor, layer: int, expert: int) -> tuple[torch.Tensor, ...]:
    """``(routed [n, pos] bool, weight [n, pos], mean output [d_model])`` of the expert on ``tokens``."""
    names = [act_name(s, layer) for s in ("expert_indices", "expert_weights", "expert_out")]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=names, device="cpu", stop_at_layer=layer + 1)
    idx, w, out = (cache[n] for n in names)
    slot = idx == expert  # [n, pos, top_k]
    routed = slot.any(-1)
    weight = (w.float() * slot).sum(-1)
    mean_out = (out.float() * slot[..., None]).sum((0, 1, 2)) / slot.sum().clamp(min=1)
    return routed, weight, mean_out


@checked
def expert_report(model: HookedModel, layer: int, expert: int, tokens: torch.Tensor | None = None, n_seqs: int = 16,
                  seq_len: int = 64, seed: int = 0) -> ExpertReport:
    """Answer "what does this expert do?" for expert ``expert`` of MoE block ``layer`` (see the module docstring)."""
    comp = Component(layer, "expert", expert).validate(model.cfg)
    if tokens is None:
        tokens = corpus.pack(model, corpus.default_corpus("test"), seq_len, n_seqs=n_seqs)
    tokens = tokens.to(model.device)
    routed, weight, mean_out = _routed(model, tokens, layer, expert)
    name = (lambda i: model.to_str_tokens(torch.tensor([int(i)]))[0]) if model.tokenizer is not None else str
    flat, hit = tokens.flatten().cpu(), routed.flatten()
    counts = torch.bincount(flat, minlength=model.cfg.d_vocab)
    hits = torch.bincount(flat[hit], minlength=model.cfg.d_vocab)
    order = hits.argsort(descending=True)[:20]
    top = [(name(t), int(hits[t]), float(hits[t] / counts[t])) for t in order.tolist() if hits[t] > 0]
    effect = mean_out.to(model.device, model.dtype) @ model.W_U  # [d_vocab]
    up, down = effect.topk(10), (-effect).topk(10)
    metric = _per_sequence_loss(tokens)
    with torch.no_grad():
        base = metric(model(tokens))
        with model.hooks(ablation_hooks(model, [comp], {comp: None})):
            abl = metric(model(tokens))
    return ExpertReport(
        str(comp), int(routed.numel()), float(routed.float().mean()),
        float(weight[routed].mean()) if bool(routed.any()) else 0.0, top,
        [(name(i), float(v)) for v, i in zip(up.values.tolist(), up.indices.tolist())],
        [(name(i), -float(v)) for v, i in zip(down.values.tolist(), down.indices.tolist())],
        bootstrap_ci((abl - base).cpu(), seed=seed) if tokens.shape[0] > 1 else None,
        extra={"uniform_rate": model.cfg.top_k / model.cfg.n_experts},
    )


def _per_sequence_loss(tokens: torch.Tensor):
    def metric(logits: torch.Tensor) -> torch.Tensor:
        return lm_loss(logits, tokens, per_token=True).mean(-1)

    return metric
