"""Sparse training kernels for TopK and BatchTopK SAEs: only the encoder's forward matmul stays dense.

The kept latents form a sparse ``F [batch, d_sae]`` with ``nnz = batch · k`` non-zeros, stored as
CSR. With ``xc = x - b_dec`` ``[batch, d_in]``, ``pre = xc @ W_enc + b_enc`` and the upstream
gradient ``g``:

- decode ``x_hat = F @ W_dec``: ``nnz · d_in`` multiply-adds instead of ``batch · d_sae · d_in``;
- ``dL/dW_dec = Fᵀ g``; ``dL/dF = (g W_decᵀ)`` evaluated only at F's pattern (a sampled
  dense-dense product, SDDMM);
- for the kept pre-activations, ``dL/dW_enc = xcᵀ G``, ``dL/dxc = G W_encᵀ`` and
  ``dL/db_enc = Σ_rows G``, with ``G`` the sparse gradient.

A dense implementation spends five ``batch x d_in x d_sae`` matmuls per step (encode, two for the
encoder's backward, decode, two for the decoder's backward, less the unused input gradient); this
spends one. The gradients equal the dense ones up to float rounding; ``tests/test_sae.py`` checks
that, and ``bench/bench_sae.py`` measures the speed against a dense loop.
"""

from __future__ import annotations

import warnings

import torch

# CSR tensors are marked beta; the operations used here (mm, t, sampled_addmm) are tested in tests/test_sae.py
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


class Pattern:
    """The non-zero positions of a sparse ``[rows, cols]`` matrix: ``rows`` sorted, and CSR ``crow``."""

    def __init__(self, rows: torch.Tensor, cols: torch.Tensor, shape: tuple[int, int]):
        self.rows, self.cols, self.shape = rows, cols, shape
        counts = torch.bincount(rows, minlength=shape[0])
        self.crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)])

    @classmethod
    def from_flat(cls, flat_idx: torch.Tensor, shape: tuple[int, int]) -> tuple["Pattern", torch.Tensor]:
        """From indices into the row-major flattened matrix (any order); returns the pattern and the sort order."""
        order = flat_idx.argsort()
        flat = flat_idx[order]
        return cls(flat // shape[1], flat % shape[1], shape), order

    def csr(self, values: torch.Tensor) -> torch.Tensor:
        return torch.sparse_csr_tensor(self.crow, self.cols, values, self.shape, check_invariants=False)


class _GatherPre(torch.autograd.Function):
    """``vals[i] = (xc @ W_enc + b_enc)[rows[i], cols[i]]``, given those values precomputed (no grad)."""

    @staticmethod
    def forward(ctx, xc, W_enc, b_enc, picked, pattern):
        ctx.save_for_backward(xc, W_enc)
        ctx.pattern = pattern
        return picked.clone()

    @staticmethod
    def backward(ctx, g):
        xc, W_enc = ctx.saved_tensors
        p = ctx.pattern
        G = p.csr(g.contiguous())  # [batch, d_sae], the gradient of the kept pre-activations
        g_xc = G @ W_enc.T if ctx.needs_input_grad[0] else None
        g_W = (G.t() @ xc).T if ctx.needs_input_grad[1] else None
        g_b = torch.zeros(W_enc.shape[1], dtype=g.dtype, device=g.device).index_add_(0, p.cols, g) \
            if ctx.needs_input_grad[2] else None
        return g_xc, g_W, g_b, None, None


class _SparseDecode(torch.autograd.Function):
    """``F @ W_dec`` for ``F = csr(vals)`` ``[batch, d_sae]``."""

    @staticmethod
    def forward(ctx, vals, W_dec, pattern):
        ctx.save_for_backward(vals, W_dec)
        ctx.pattern = pattern
        return pattern.csr(vals) @ W_dec

    @staticmethod
    def backward(ctx, g):
        vals, W_dec = ctx.saved_tensors
        p = ctx.pattern
        g = g.contiguous()
        g_vals = None
        if ctx.needs_input_grad[0]:  # SDDMM: (g @ W_dec^T) at the pattern only
            zero = p.csr(torch.zeros_like(vals))
            g_vals = torch.sparse.sampled_addmm(zero, g, W_dec.T, beta=0.0).values()
        g_W = p.csr(vals).t() @ g if ctx.needs_input_grad[1] else None  # F^T g
        return g_vals, g_W, None


def select_topk(pre: torch.Tensor, k: int, mask: torch.Tensor | None = None) -> tuple[Pattern, torch.Tensor]:
    """The ``k`` largest positive entries of each row of ``pre [batch, d_sae]`` (restricted to ``mask [d_sae]``).

    Returns the pattern and the kept values ``[nnz]`` (no grad); non-positive picks are dropped.
    """
    r = pre if mask is None else pre.masked_fill(~mask, 0.0)
    vals, idx = r.topk(k, dim=-1)  # topk(relu(pre)) = relu(topk(pre)): relu is monotone
    B = pre.shape[0]
    rows = torch.arange(B, device=pre.device).repeat_interleave(k)
    keep = vals.reshape(-1) > 0
    pattern = Pattern(rows[keep], idx.reshape(-1)[keep], tuple(pre.shape))
    return pattern, vals.reshape(-1)[keep]


def select_batch_topk(pre: torch.Tensor, k: int, threshold: torch.Tensor | None = None) -> tuple[Pattern, torch.Tensor]:
    """The ``k · batch`` largest positive entries of the whole batch ``pre [batch, d_sae]`` (Bussmann et al. 2024).

    With ``threshold`` (a batch spread over ranks): the entries ``>= threshold``, the global cut computed
    by :meth:`mechscope.distributed.Dist.kth_largest`.
    """
    flat = pre.reshape(-1)
    if threshold is not None:
        idx = torch.nonzero(flat >= threshold).flatten()
        vals = flat[idx]
    else:
        vals, idx = flat.topk(min(flat.numel(), k * pre.shape[0]))
    keep = vals > 0
    pattern, order = Pattern.from_flat(idx[keep], tuple(pre.shape))
    return pattern, vals[keep][order]


def sparse_latents(xc: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, pattern: Pattern,
                   picked: torch.Tensor) -> torch.Tensor:
    """The kept latent values ``[nnz]`` with gradients to ``xc``, ``W_enc`` and ``b_enc``."""
    return _GatherPre.apply(xc, W_enc, b_enc, picked, pattern)


def sparse_decode(vals: torch.Tensor, W_dec: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """``[batch, d_in]`` = ``F @ W_dec`` with ``F`` given by ``pattern`` and ``vals``."""
    return _SparseDecode.apply(vals, W_dec, pattern)
