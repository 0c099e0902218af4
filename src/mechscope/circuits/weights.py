"""OV and QK circuits as lazy low-rank products, composition scores and copying scores.

Conventions (row vectors, as in TransformerLens): a head reads ``x [d_model]`` and writes
``x W_V W_O`` (the OV circuit, ``[d_model, d_model]``); its attention score between a query
stream ``x_q`` and a key stream ``x_k`` is ``x_q W_Q W_K^T x_k^T`` (the QK circuit). Both have
rank ``d_head``, so they are kept factored (:class:`FactoredMatrix`) and never materialised
at ``d_vocab x d_vocab`` (Elhage et al. 2021, "A Mathematical Framework for Transformer Circuits").

What these ignore, by construction: the norms before each block (their scale is per token) and
biases. With rotary embeddings the real score is ``x_q W_Q R(i - j) W_K^T x_k^T``, where ``R``
rotates by the query-key distance; ``QK`` here is its value at distance 0 (the content part,
before any positional rotation). For Qwen3 and Gemma 3, a per-head RMSNorm sits between the
projection and the rotation; the factored QK omits it as well.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from ..analysis import viz
from ..core.errors import InputError
from ..core.model import HookedModel
from ..core.result import Result
from ..core.types import checked


class FactoredMatrix:
    """``A @ B`` with ``A [..., m, k]`` and ``B [..., k, n]``, kept factored. Leading axes broadcast."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor):
        if A.shape[-1] != B.shape[-2]:
            raise InputError(f"inner sizes differ: A {tuple(A.shape)} @ B {tuple(B.shape)}")
        self.A, self.B = A, B

    @property
    def shape(self) -> tuple[int, ...]:
        lead = torch.broadcast_shapes(self.A.shape[:-2], self.B.shape[:-2])
        return (*lead, self.A.shape[-2], self.B.shape[-1])

    @property
    def rdim(self) -> int:
        return self.A.shape[-1]

    @property
    def T(self) -> "FactoredMatrix":
        return FactoredMatrix(self.B.transpose(-1, -2), self.A.transpose(-1, -2))

    @property
    def AB(self) -> torch.Tensor:
        """The full product (only for small matrices)."""
        return self.A @ self.B

    @property
    def BA(self) -> torch.Tensor:
        """``B @ A`` ``[..., k, k]``: shares the nonzero eigenvalues of ``A @ B``."""
        if self.A.shape[-2] != self.B.shape[-1]:
            raise InputError("BA needs a square product")
        return self.B @ self.A

    def __matmul__(self, other) -> "FactoredMatrix":
        if isinstance(other, FactoredMatrix):
            return FactoredMatrix(self.A, (self.B @ other.A) @ other.B)
        return FactoredMatrix(self.A, self.B @ other)

    def __rmatmul__(self, other) -> "FactoredMatrix":
        return FactoredMatrix(other @ self.A, self.B)

    def eigenvalues(self) -> torch.Tensor:
        """The nonzero eigenvalues (complex) ``[..., k]``, from the small ``B @ A``."""
        return torch.linalg.eigvals(self.BA.double())

    def svd(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(U [..., m, k], S [..., k], Vh [..., k, n])`` with ``A @ B == U diag(S) Vh``, from QR of the factors."""
        Qa, Ra = torch.linalg.qr(self.A.double())
        Qb, Rb = torch.linalg.qr(self.B.transpose(-1, -2).double())
        U, S, Vh = torch.linalg.svd(Ra @ Rb.transpose(-1, -2))
        return Qa @ U, S, (Qb @ Vh.transpose(-1, -2)).transpose(-1, -2)

    def norm(self) -> torch.Tensor:
        """Frobenius norm ``[...]``: ``sqrt(trace(A^T A B B^T))``, without forming ``A @ B``."""
        a = self.A.transpose(-1, -2).double() @ self.A.double()
        b = self.B.double() @ self.B.transpose(-1, -2).double()
        return (a * b.transpose(-1, -2)).sum((-1, -2)).clamp(min=0).sqrt()

    def row_chunks(self, chunk: int = 4096) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(start, rows [..., chunk, n])`` of the full product, a block of rows at a time."""
        m = self.A.shape[-2]
        for s in range(0, m, chunk):
            yield s, self.A[..., s:s + chunk, :] @ self.B

    def __repr__(self) -> str:
        return f"FactoredMatrix(shape={self.shape}, rank<={self.rdim})"


@checked
@torch.no_grad()
def OV(model: HookedModel, layer: int | None = None) -> FactoredMatrix:
    """``W_V W_O`` per head: ``[layer, head, d_model, d_model]`` (or ``[head, ...]`` for one layer).

    Under grouped-query attention ``W_V`` is the KV head each query head reads.
    """
    W_V, W_O = model.W_V.float(), model.W_O.float()
    if layer is not None:
        W_V, W_O = W_V[layer], W_O[layer]
    return FactoredMatrix(W_V, W_O)


@checked
@torch.no_grad()
def QK(model: HookedModel, layer: int | None = None) -> FactoredMatrix:
    """``W_Q W_K^T`` per head: ``[layer, head, d_model, d_model]``; the content part (see module docstring)."""
    W_Q, W_K = model.W_Q.float(), model.W_K.float()
    if layer is not None:
        W_Q, W_K = W_Q[layer], W_K[layer]
    return FactoredMatrix(W_Q, W_K.transpose(-1, -2))


@checked
@torch.no_grad()
def full_OV(model: HookedModel, layer: int, head: int) -> FactoredMatrix:
    """``W_E W_V W_O W_U`` ``[d_vocab, d_vocab]`` for one head: token in -> logits out (kept factored)."""
    return FactoredMatrix(model.W_E.float() @ model.W_V[layer, head].float(),
                          model.W_O[layer, head].float() @ model.W_U.float())


@checked
@torch.no_grad()
def full_QK(model: HookedModel, layer: int, head: int) -> FactoredMatrix:
    """``W_E W_Q W_K^T W_E^T`` ``[d_vocab, d_vocab]``: query token x key token scores (content part)."""
    W_E = model.W_E.float()
    return FactoredMatrix(W_E @ model.W_Q[layer, head].float(), model.W_K[layer, head].float().T @ W_E.T)


@checked
@torch.no_grad()
def copying_scores(model: HookedModel) -> torch.Tensor:
    """``[layer, head]`` eigenvalue copying score ``sum(λ) / sum(|λ|)`` of ``W_E W_V W_O W_U`` (Elhage et al. 2021).

    Near +1: the head copies the tokens it attends to into the logits; near -1: it suppresses them
    (negative copying). The eigenvalues come from the ``d_head x d_head`` matrix
    ``W_O W_U W_E W_V``, so the vocabulary-sized circuit is never formed.
    """
    W_E, W_U = model.W_E.float(), model.W_U.float()
    UE = W_U @ W_E  # [d_model, d_model]: unembedding then embedding
    M = model.W_O.float() @ UE @ model.W_V.float()  # [layer, head, d_head, d_head]
    lam = torch.linalg.eigvals(M.double())
    return (lam.sum(-1).real / lam.abs().sum(-1)).float()


@checked
@torch.no_grad()
def composition_scores(model: HookedModel, mode: str = "K") -> torch.Tensor:
    """``[layer1, head1, layer2, head2]`` composition of writer head 1 into reader head 2 (zero unless layer1 < layer2).

    ``score = ||W_OV1 M2||_F / (||W_OV1||_F ||M2||_F)`` with ``M2 = W_QK2`` (Q-composition),
    ``W_QK2^T`` (K-composition) or ``W_OV2`` (V-composition); Elhage et al. 2021. Random
    matrices of this size give a baseline around ``sqrt(d_head / d_model)``.
    """
    if mode not in ("Q", "K", "V"):
        raise InputError(f"mode must be 'Q', 'K' or 'V', got {mode!r}")
    ov = OV(model)
    right = {"Q": QK(model), "K": QK(model).T, "V": OV(model)}[mode]
    L, H = model.cfg.n_layers, model.cfg.n_heads
    out = torch.zeros(L, H, L, H)
    n_left, n_right = ov.norm(), right.norm()  # [L, H]
    # ||A1 (B1 A2) B2||_F^2 = trace(G1 X G2 X^T) with X = B1 A2 and the k x k Gram matrices G1, G2
    G1 = ov.A.transpose(-1, -2) @ ov.A  # [L, H, k, k]
    G2 = right.B @ right.B.transpose(-1, -2)  # [L, H, k, k]
    for l1 in range(L - 1):
        X = torch.einsum("ikd,lhde->ilhke", ov.B[l1], right.A[l1 + 1:])  # [H1, L', H2, k, k]
        P = G1[l1][:, None, None] @ X @ G2[l1 + 1:][None]
        norm = (P * X).sum((-1, -2)).clamp(min=0).sqrt()  # trace(P X^T)
        out[l1, :, l1 + 1:] = (norm / (n_left[l1][:, None, None] * n_right[l1 + 1:][None])).float()
    return out


@dataclass(repr=False)
class HeadScores(Result):
    """A ``[layer, head]`` score with a name; ``top(k)`` lists the highest-scoring heads."""

    name: str
    scores: torch.Tensor
    description: str = ""

    def top(self, k: int = 5, largest: bool = True) -> list[tuple[str, float]]:
        H = self.scores.shape[1]
        flat = self.scores.flatten()
        order = flat.argsort(descending=largest)[:k]
        return [(f"L{int(i) // H}H{int(i) % H}", float(flat[i])) for i in order]

    def rank(self, layer: int, head: int) -> int:
        """1 = the highest score of all heads."""
        v = self.scores[layer, head]
        return int((self.scores > v).sum()) + 1

    def saturation(self, k: int = 5, tol: float = 0.01) -> str | None:
        """A warning when the top scores cannot tell heads apart: ``None``, or how many heads score within ``tol``
        of the range of the top one (then the top-``k`` order is noise, not a ranking)."""
        flat = self.scores.flatten().float()
        span = float(flat.max() - flat.min())
        if flat.numel() <= k or span <= 0:
            return None
        tied = int((flat >= flat.max() - tol * span).sum())
        if tied < k:
            return None
        return (f"saturated: {tied} heads score within {tol:.0%} of the range of the top one ({float(flat.max()):+.3f}), "
                f"so the top {k} order does not discriminate; rank these heads with a behavioural test (patching or "
                "ablation on a task) or a finer score")

    def summary(self, k: int = 5) -> str:
        head = f"{self.name} scores" + (f" ({self.description})" if self.description else "")
        lines = [head] + [f"  {n:>7} {v:+.3f}" for n, v in self.top(k)]
        warn = self.saturation(k)
        return "\n".join(lines + ([f"  WARNING: {warn}"] if warn else []))

    def _dict_extra(self) -> dict:
        return {"top": self.top(5), "saturation": self.saturation(5)}

    def plot(self, path: str | Path | None = None) -> Path:
        L, H = self.scores.shape
        return viz.heatmap_png(self.scores, [str(l) for l in range(L)], [str(h) for h in range(H)],
                               path or f"{self.name.replace(' ', '_')}.png", title=f"{self.name} score",
                               diverging=bool((self.scores < 0).any()), xlabel="head", ylabel="layer")

    def _html_body(self) -> str:
        L, H = self.scores.shape
        return viz.heatmap_html(self.scores, [str(l) for l in range(L)], [str(h) for h in range(H)],
                                title=f"{self.name} score (layer x head)", diverging=bool((self.scores < 0).any()))
