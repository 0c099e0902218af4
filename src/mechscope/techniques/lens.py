"""Logit lens: read the residual stream after each block through the final norm and unembedding.

``logits_l = unembed(ln_final(resid_l))`` with ``resid_l`` the residual stream after ``l`` blocks
(``l = 0`` is the embedding; ``l = n_layers`` is the model's own output). nostalgebraist (2020),
"interpreting GPT: the logit lens". The norm is applied with each layer's own scale (what the
model would do if it stopped there), soft-capping included.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch

from ..analysis import viz
from ..analysis.metrics import kl_div
from ..core.errors import InputError
from ..core.files import atomic_write, path_then_model
from ..core.hookpoints import act_name
from ..core.model import HookedModel
from ..core.progress import bar
from ..core.result import Result
from ..core.types import checked


@dataclass(repr=False)
class LogitLensResult(Result):
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

    def _cells(self):
        return [[s[0] for s in row] for row in self.top_strs]

    def _html_body(self) -> str:
        """An offline HTML heatmap (layer x position) of the top-1 probability, labelled with the top token."""
        cols = viz.position_labels(self.str_tokens)
        body = viz.heatmap_html(self.top_probs[..., 0], self.layer_labels, cols,
                                title="logit lens: top-1 token and its probability", cell_text=self._cells())
        for t, name in enumerate(self.targets):
            body += viz.heatmap_html(self.target_probs[t], self.layer_labels, cols,
                                     title=f"p({name!r}) by layer and position")
        return body

    def plot(self, path: str | Path = "logit_lens.png") -> Path:
        """Save a PNG heatmap (layer x position), each cell labelled with its top-1 token."""
        return viz.heatmap_png(self.top_probs[..., 0], self.layer_labels, viz.position_labels(self.str_tokens), path,
                               title="logit lens: top-1 probability", cell_text=self._cells(),
                               xlabel="position: token", ylabel="blocks applied")

    def to_dict(self) -> dict:
        d = {"str_tokens": self.str_tokens, "layers": self.layer_labels,
             "top1": [[s[0] for s in row] for row in self.top_strs],
             "top1_prob": self.top_probs[..., 0].tolist()}
        for t, name in enumerate(self.targets):
            d[f"p({name})"] = self.target_probs[t].tolist()
            d[f"rank({name})"] = self.target_ranks[t].tolist()
        return d


@torch.no_grad()
@checked
def logit_lens(model: HookedModel, tokens: str | torch.Tensor, targets: Sequence[str | int] | None = None, k: int = 5,
               prepend_bos: bool | None = None) -> LogitLensResult:
    """Logit lens over one prompt (text or tokens ``[1, pos]``).

    ``targets``: answer strings (each one token, e.g. ``" Paris"``) or ids; their probability and
    rank are reported at every ``[layer, pos]``.
    """
    if isinstance(tokens, str):
        tokens = model.to_tokens(tokens, prepend_bos=prepend_bos)
    if tokens.dim() == 1:
        tokens = tokens[None]
    if tokens.shape[0] != 1:
        raise InputError(f"logit_lens takes one prompt; got a batch of {tokens.shape[0]}")
    n = model.cfg.n_layers
    names = [act_name("resid_pre", l) for l in range(n)] + [act_name("resid_post", n - 1)]
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


# ------------------------------------------------------------------------------ tuned lens
class TunedLens(torch.nn.Module):
    """One affine translator per layer: ``h -> h + A_l h + b_l``, read through the final norm and unembedding.

    Belrose et al. 2023, "Eliciting Latent Predictions from Transformers with the Tuned Lens".
    Translators start at the identity (``A = 0, b = 0``: the logit lens) and are trained to minimise
    ``KL(p_final || p_lens)``. Layer ``l`` reads the residual stream after ``l`` blocks (``l = 0``: the
    embedding), for ``l < n_layers``.
    """

    def __init__(self, n_layers: int, d_model: int, model_name: str = ""):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(n_layers, d_model, d_model))
        self.bias = torch.nn.Parameter(torch.zeros(n_layers, d_model))
        self.model_name = model_name

    def translate(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """``[..., d_model]`` -> ``[..., d_model]``: ``h + h A_l + b_l``."""
        return h + h @ self.weight[layer] + self.bias[layer]

    def logits(self, model: HookedModel, layer: int, h: torch.Tensor) -> torch.Tensor:
        return model.unembed(model.ln_final(self.translate(layer, h)))

    def save(self, path: str | Path) -> Path:
        """Safetensors with the translators and a JSON header (model name, sizes); written atomically."""
        from safetensors.torch import save

        meta = {"format": "mechscope-tuned-lens", "model_name": self.model_name,
                "n_layers": str(self.weight.shape[0]), "d_model": str(self.weight.shape[1])}
        data = save({"weight": self.weight.detach().cpu().contiguous(), "bias": self.bias.detach().cpu().contiguous()},
                    metadata=meta)
        return atomic_write(path, data)

    @classmethod
    def load(cls, path: str | Path, model: HookedModel | None = None) -> "TunedLens":
        """Load translators saved by :meth:`save` (safetensors only); checks the sizes against ``model``."""
        from safetensors import safe_open

        path, model = path_then_model(path, model, "TunedLens.load")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            w, b = f.get_tensor("weight"), f.get_tensor("bias")
        lens = cls(w.shape[0], w.shape[1], meta.get("model_name", ""))
        if model is not None and (w.shape[0] != model.cfg.n_layers or w.shape[1] != model.cfg.d_model):
            raise InputError(f"tuned lens {path} has {w.shape[0]} layers x d_model {w.shape[1]}; the model has "
                             f"{model.cfg.n_layers} x {model.cfg.d_model}")
        with torch.no_grad():
            lens.weight.copy_(w)
            lens.bias.copy_(b)
        if model is not None:
            lens.to(model.device)
        return lens


@dataclass(repr=False)
class LensComparison(Result):
    """Per-layer KL(final || lens) in nats on held-out tokens, for the logit lens and the tuned lens."""

    logit_lens_kl: torch.Tensor  # [layer]
    tuned_lens_kl: torch.Tensor  # [layer]
    n_tokens: int

    def summary(self) -> str:
        lines = [f"KL(final || lens) per layer, nats, on {self.n_tokens} held-out tokens",
                 f"{'layer':>6} {'logit lens':>11} {'tuned lens':>11}"]
        for l, (a, b) in enumerate(zip(self.logit_lens_kl.tolist(), self.tuned_lens_kl.tolist())):
            lines.append(f"{l:>6} {a:11.3f} {b:11.3f}")
        return "\n".join(lines)

    def plot(self, path: str | Path = "lens_kl.png") -> Path:
        fig, ax = viz.figure(figsize=(6, 4))
        ax.plot(self.logit_lens_kl.numpy(), label="logit lens", marker="o", ms=3)
        ax.plot(self.tuned_lens_kl.numpy(), label="tuned lens", marker="o", ms=3)
        ax.set_xlabel("layer (blocks applied)")
        ax.set_ylabel("KL(final || lens), nats")
        ax.legend()
        return viz.save_figure(fig, path)

    def _html_body(self) -> str:
        grid = torch.stack([self.logit_lens_kl, self.tuned_lens_kl])
        return viz.heatmap_html(grid, ["logit lens", "tuned lens"], [str(i) for i in range(grid.shape[1])],
                                title="KL(final || lens) by layer")


def _residuals(model, tokens):
    n = model.cfg.n_layers
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=[act_name("resid_pre", l) for l in range(n)])
    return logits, [cache["resid_pre", l] for l in range(n)]


@torch.no_grad()
def compare_lenses(model: HookedModel, lens: TunedLens, tokens: torch.Tensor) -> LensComparison:
    """KL to the final distribution at every layer for the logit lens and ``lens``, on ``tokens`` ``[n, pos]``."""
    logits, resid = _residuals(model, tokens)
    ll, tl = [], []
    for l, h in enumerate(resid):
        ll.append(kl_div(model.unembed(model.ln_final(h)), logits).mean())
        tl.append(kl_div(lens.logits(model, l, h), logits).mean())
    return LensComparison(torch.stack(ll).cpu(), torch.stack(tl).cpu(), tokens.numel())


def train_tuned_lens(model: HookedModel, corpus: Iterable[str] | torch.Tensor | None = None, n_steps: int = 100,
                     seq_len: int = 64, batch: int = 4, lr: float = 1e-3,
                     seed: int = 0, held_out_seqs: int = 8, progress: bool = True) -> tuple["TunedLens", "LensComparison"]:
    """Train a :class:`TunedLens` on text and compare it with the logit lens on held-out text.

    ``corpus``: an iterable of texts (default: the standard library's docstrings, train split) or
    a token tensor ``[n, seq_len]``. Returns ``(lens, comparison)``; the comparison is computed on
    the held-out split (the test docstrings, or the last ``held_out_seqs`` rows of a tensor).
    """
    from .. import corpus as C

    torch.manual_seed(seed)
    if corpus is None:  # the standard library's docstrings, split by file
        train = C.pack(model, C.default_corpus("train"), seq_len, n_seqs=n_steps * batch)
        test = C.pack(model, C.default_corpus("test"), seq_len, n_seqs=held_out_seqs)
    else:  # the last rows are held out and never trained on
        rows = corpus if isinstance(corpus, torch.Tensor) else C.pack(model, corpus, seq_len,
                                                                       n_seqs=n_steps * batch + held_out_seqs)
        train, test = rows[:-held_out_seqs], rows[-held_out_seqs:]
    if len(train) == 0:
        raise InputError("no training sequences")
    lens = TunedLens(model.cfg.n_layers, model.cfg.d_model, model.cfg.model_name).to(model.device)
    opt = torch.optim.Adam(lens.parameters(), lr=lr)
    params = [p for p in model.hf.parameters() if p.requires_grad]
    for p in params:  # no gradients into the model
        p.requires_grad_(False)
    it = range(n_steps)
    if progress:
        it = bar(it, desc="tuned lens")
    try:
        for _ in it:
            rows = torch.randint(0, len(train), (batch,))
            toks = train[rows].to(model.device)
            logits, resid = _residuals(model, toks)
            loss = sum(kl_div(lens.logits(model, l, h), logits).mean() for l, h in enumerate(resid)) / len(resid)
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        for p in params:
            p.requires_grad_(True)
    return lens, compare_lenses(model, lens, test.to(model.device))
