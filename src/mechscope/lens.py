"""Logit lens: read the residual stream after each block through the final norm and unembedding.

``logits_l = unembed(ln_final(resid_l))`` with ``resid_l`` the residual stream after ``l`` blocks
(``l = 0`` is the embedding; ``l = n_layers`` is the model's own output). nostalgebraist (2020),
"interpreting GPT: the logit lens". The norm is applied with each layer's own scale (what the
model would do if it stopped there), soft-capping included.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import viz


@dataclass
class LogitLensResult:
    """Top-k predictions and target statistics at every ``[layer, pos]``.

    ``top_ids``/``top_probs``: ``[layer, pos, k]``; ``target_probs``/``target_ranks``:
    ``[target, layer, pos]`` (rank 0 = top-1). ``layer_labels[i]`` names row ``i``.
    """

    str_tokens: list[str]
    layer_labels: list[str]
    top_ids: torch.Tensor
    top_probs: torch.Tensor
    top_strs: list[list[list[str]]]
    targets: list[str] = field(default_factory=list)
    target_ids: list[int] = field(default_factory=list)
    target_probs: torch.Tensor | None = None
    target_ranks: torch.Tensor | None = None

    def summary(self, pos: int = -1) -> str:
        """A plain-text table for one position (default: the last)."""
        p = pos % len(self.str_tokens)
        head = f"logit lens at position {p} ({self.str_tokens[p]!r})"
        cols = f"{'layer':>7}  {'top-1':>14} {'p':>6}"
        for t in self.targets:
            cols += f"  {('p(' + repr(t) + ')'):>14} {'rank':>6}"
        lines = [head, cols]
        for i, lab in enumerate(self.layer_labels):
            row = f"{lab:>7}  {self.top_strs[i][p][0]!r:>14} {float(self.top_probs[i, p, 0]):6.3f}"
            for t in range(len(self.targets)):
                row += f"  {float(self.target_probs[t, i, p]):14.4f} {int(self.target_ranks[t, i, p]):6d}"
            lines.append(row)
        return "\n".join(lines)

    __str__ = summary

    def _cells(self):
        return [[s[0] for s in row] for row in self.top_strs]

    def to_html(self) -> str:
        """An offline HTML heatmap (layer x position) of the top-1 probability, labelled with the top token."""
        body = viz.heatmap_html(self.top_probs[..., 0], self.layer_labels, self.str_tokens,
                                title="logit lens: top-1 token and its probability", cell_text=self._cells())
        for t, name in enumerate(self.targets):
            body += viz.heatmap_html(self.target_probs[t], self.layer_labels, self.str_tokens,
                                     title=f"p({name!r}) by layer and position")
        body += f"<pre>{viz.esc(self.summary())}</pre>"
        return body

    def _repr_html_(self) -> str:
        return self.to_html()

    def plot(self, path: str | Path = "logit_lens.png") -> Path:
        """Save a PNG heatmap (layer x position), each cell labelled with its top-1 token."""
        return viz.heatmap_png(self.top_probs[..., 0], self.layer_labels, self.str_tokens, path,
                               title="logit lens: top-1 probability", cell_text=self._cells(),
                               xlabel="position", ylabel="blocks applied")

    def to_dict(self) -> dict:
        d = {"str_tokens": self.str_tokens, "layers": self.layer_labels,
             "top1": [[s[0] for s in row] for row in self.top_strs],
             "top1_prob": self.top_probs[..., 0].tolist()}
        for t, name in enumerate(self.targets):
            d[f"p({name})"] = self.target_probs[t].tolist()
            d[f"rank({name})"] = self.target_ranks[t].tolist()
        return d


@torch.no_grad()
def logit_lens(model, tokens, targets=None, k: int = 5, prepend_bos: bool | None = None) -> LogitLensResult:
    """Logit lens over one prompt (text or tokens ``[1, pos]``).

    ``targets``: answer strings (each one token, e.g. ``" Paris"``) or ids; their probability and
    rank are reported at every ``[layer, pos]``.
    """
    if isinstance(tokens, str):
        tokens = model.to_tokens(tokens, prepend_bos=prepend_bos)
    if tokens.dim() == 1:
        tokens = tokens[None]
    if tokens.shape[0] != 1:
        raise ValueError(f"logit_lens takes one prompt; got a batch of {tokens.shape[0]}")
    n = model.cfg.n_layers
    names = [f"blocks.{l}.hook_resid_pre" for l in range(n)] + [f"blocks.{n - 1}.hook_resid_post"]
    _, cache = model.run_with_cache(tokens, names_filter=names)
    resid = cache.accumulated_resid()[:, 0]  # [layer+1, pos, d_model]
    target_ids = [t if isinstance(t, int) else model.to_single_token(t) for t in (targets or [])]
    top_ids, top_probs, t_probs, t_ranks = [], [], [], []
    for r in resid:  # one layer at a time: memory stays [pos, d_vocab]
        probs = torch.softmax(model.unembed(model.ln_final(r)).float(), dim=-1)
        p, i = probs.topk(k, dim=-1)
        top_ids.append(i)
        top_probs.append(p)
        if target_ids:
            tp = probs[:, target_ids].T  # [target, pos]
            t_probs.append(tp)
            t_ranks.append((probs[None] > tp[..., None]).sum(-1))
    top_ids = torch.stack(top_ids)
    strs = model.to_str_tokens(tokens[0])
    tok = model.tokenizer
    top_strs = [[[tok.decode([int(x)]) for x in pos] for pos in layer] for layer in top_ids]
    labels = ["embed"] + [str(l) for l in range(1, n + 1)]
    res = LogitLensResult(strs, labels, top_ids, torch.stack(top_probs), top_strs,
                          targets=[t if isinstance(t, str) else tok.decode([t]) for t in (targets or [])],
                          target_ids=target_ids)
    if target_ids:
        res.target_probs = torch.stack(t_probs, dim=1)
        res.target_ranks = torch.stack(t_ranks, dim=1)
    return res
