"""Attribution through attention scores: which sources make head H attend from query q to key k.

In the frozen replacement model the query vector at ``q`` and the key vector at ``k`` (after q/k
norms, frozen, and rotary, which is linear at a fixed position) are linear in the sources, so

    score = scale · Q·K,   Q = Σ_s Q_s + Q_0,   K = Σ_t K_t + K_0

with ``Q_s`` source ``s``'s part of the query and ``Q_0`` the bias part. The score then splits
exactly into query-side terms ``scale · Q_s·K``, key-side terms ``scale · Q_0·K_t`` ... and pairs
``scale · Q_s·K_t``. Each part comes from ``d_head`` backward rows (one batched pass per side),
as an attribution graph's rows do. circuit-tracer does not attribute through QK (its issue #53);
the maths is that of "Tracing Attention" (Kamath et al. 2025, transformer-circuits.pub).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core import Component, InputError
from ..core.hookpoints import act_name
from ..core.result import Result
from .attribute import RowEngine, active_features
from .replacement import ReplacementModel


@dataclass(repr=False)
class QKAttribution(Result):
    """Head ``layer.head``'s score from ``q_pos`` to ``k_pos``, split over the sources of each side."""

    layer: int
    head: int
    q_pos: int
    k_pos: int
    score: float
    query_side: list[tuple[str, float]]  # scale · Q_s · K, largest first
    key_side: list[tuple[str, float]]  # scale · Q · K_t
    pairs: list[tuple[str, str, float]]  # scale · Q_s · K_t
    bias_term: float  # scale · Q_0 · K_0
    check: float  # largest difference between Q_0, K_0 and the query and key with every source removed

    def summary(self) -> str:
        lines = [f"L{self.layer}H{self.head} score from position {self.q_pos} to {self.k_pos}: {self.score:+.4f} "
                 f"(bias parts re-measured with every source removed: within {self.check:.1e})", "  query side (scale Q_s.K):"]
        lines += [f"    {n:28s} {v:+.4f}" for n, v in self.query_side]
        lines.append("  key side (scale Q.K_t):")
        lines += [f"    {n:28s} {v:+.4f}" for n, v in self.key_side]
        lines.append("  pairs (scale Q_s.K_t):")
        lines += [f"    {a:24s} x {b:24s} {v:+.4f}" for a, b, v in self.pairs]
        return "\n".join(lines)


def qk_attribution(rm: ReplacementModel, layer: int, head: int, q_pos: int, k_pos: int, top: int = 10,
                   token_strs: list[str] | None = None) -> QKAttribution:
    """Split head ``head`` of block ``layer``'s attention score from ``q_pos`` to ``k_pos`` over the sources."""
    model, n = rm.model, rm.n_pos
    cfg = model.cfg
    Component(layer, "head", head).validate(cfg)
    if not 0 <= k_pos <= q_pos < n:
        raise InputError(f"need 0 <= k_pos <= q_pos < {n} (a query attends to itself and earlier keys); got "
                         f"q_pos={q_pos}, k_pos={k_pos}")
    rot = model.has_hook(act_name("rot_q", layer))
    qn, kn = (act_name("rot_q", layer), act_name("rot_k", layer)) if rot else (
        act_name("q", layer), act_name("k", layer))
    eng = RowEngine(rm, active_features(rm), capture=(qn, kn))
    q, k = eng.run.extra[qn], eng.run.extra[kn]  # [1, pos, head | kv_head, d_head]
    kv = head // (cfg.n_heads // k.shape[2])
    Q, K = q[0, q_pos, head].detach().float().cpu(), k[0, k_pos, kv].detach().float().cpu()
    d = Q.numel()

    def parts(out: torch.Tensor, pos: int, h: int) -> torch.Tensor:  # [d_head, n_sources]: each source's part
        G = torch.zeros(d, *out.shape, dtype=out.dtype, device=out.device)
        G[torch.arange(d), 0, pos, h, torch.arange(d)] = 1
        return eng.backward([out], [G])

    Qs, Ks = parts(q, q_pos, head), parts(k, k_pos, kv)
    scale = model.attn_scale(layer)
    Q0, K0 = Q - Qs.sum(1), K - Ks.sum(1)
    score = scale * float(Q @ K)
    q_side, k_side = scale * (K @ Qs), scale * (Q @ Ks)
    strs = token_strs or [str(int(t)) for t in rm.tokens[0]]
    name = lambda i: eng.source_name(int(i), strs)  # noqa: E731
    qi, ki = q_side.abs().argsort(descending=True)[:top], k_side.abs().argsort(descending=True)[:top]
    pair = scale * Qs[:, qi].T @ Ks[:, ki]  # [top, top] among the strongest of each side
    flat = pair.flatten().abs().argsort(descending=True)[:top]
    pairs = [(name(qi[i // len(ki)]), name(ki[i % len(ki)]), float(pair.flatten()[i])) for i in flat]
    with torch.no_grad():  # linearity check: the bias parts are what is left with every source removed
        bare, _ = rm.run(1, rm.without_sources(), capture=(qn, kn))
    check = max(float((bare.extra[qn][0, q_pos, head].float().cpu() - Q0).abs().max()),
                float((bare.extra[kn][0, k_pos, kv].float().cpu() - K0).abs().max()))
    return QKAttribution(layer, head, q_pos, k_pos, score, [(name(i), float(q_side[i])) for i in qi],
                         [(name(i), float(k_side[i])) for i in ki], pairs, scale * float(Q0 @ K0), check)

