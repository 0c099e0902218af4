"""Many short rows after one shared prefix, with the prefix run once.

Autointerp's scoring prompts all open with the same chat template and instruction; absorption's words all follow
the same in-context examples. The prefix runs once and its keys and values are kept; each batch of rows then runs
only its own tokens on them. Rows may share a second segment too (a scoring prompt and its shuffled control ask
about the same text): each such head runs once on the prefix, and its rows' tails on both. A causal model's states
at a position do not depend on what follows it, so this equals running every ``prefix + row`` in full, to float
rounding (``tests/test_shared_prefix.py`` checks it on every supported family). Where the hooks do not hold what
attention caches (Falcon rotates its keys past every hook) or padding could push a row past a sliding window, the
rows run in full instead.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..core.errors import InputError
from ..core.model import HookedModel
from ..core.progress import bar
from ..core.work import add_floor
from .patch_engine import kv_hook_names, kv_prefix_exact, prefix_cache

#: below this many shared tokens the prefix is not worth its own pass: every row runs in full
MIN_SHARED = 4


def common_prefix_length(rows: Sequence[Sequence[int]]) -> int:
    """How many leading tokens every row shares, leaving each row at least one token of its own."""
    if not rows:
        return 0
    first, n = rows[0], min(len(r) for r in rows) - 1
    c = 0
    while c < n and all(r[c] == first[c] for r in rows):
        c += 1
    return c


def _layout(rows: Sequence[Sequence[Sequence[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of segments (token-id lists) as ``ids, mask [rows, width]``: each segment left-padded to its widest
    row's length (padding masked), the segments side by side."""
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
    ids, mask = torch.zeros(len(rows), sum(widths), dtype=torch.long), torch.zeros(len(rows), sum(widths),
                                                                                   dtype=torch.long)
    for i, row in enumerate(rows):
        end = 0
        for seg, w in zip(row, widths):
            end += w
            if len(seg):
                ids[i, end - len(seg):end], mask[i, end - len(seg):end] = torch.as_tensor(list(seg)), 1
    return ids, mask


class SharedPrefix:
    """``prefix`` (token ids ``[P]``) run once on ``model``; :meth:`run` then runs rows of tokens after it, and
    :meth:`run_groups` rows that share a second segment (each group's own prefix) after it.

    ``longest``: the longest ``prefix + row`` to come (a row past a sliding window makes every row run in full)."""

    @torch.no_grad()
    def __init__(self, model: HookedModel, prefix: Sequence[int] | torch.Tensor, longest: int = 0):
        self.model = model
        self.prefix = torch.as_tensor(prefix, dtype=torch.long).flatten().cpu()
        window = model.cfg.sliding_window  # padding after the prefix counts against the window
        self.cached = (self.prefix.numel() >= MIN_SHARED and kv_prefix_exact(model)
                       and not (window and longest > window))
        self.kv: dict | None = None
        if self.cached:
            knames, vnames = kv_hook_names(model)
            _, self.kv = model.run_with_cache(self.prefix[None].to(model.device), names_filter=knames + vnames)
            add_floor(self.prefix.numel() * model.cfg.n_layers)

    def run(self, own: Sequence[Sequence[int]], stop_at_layer: int | None = None) -> torch.Tensor:
        """Each row of ``own`` (token ids after the prefix, at least one each) at its last position: logits
        ``[rows, d_vocab]``, or with ``stop_at_layer=L`` the stream entering block L ``[rows, d_model]``. Hooks
        fire on the rows' own positions (all positions, when the rows run in full), left-padded within a batch."""
        return self.run_groups([[]] * len(own), [[r] for r in own], stop_at_layer)

    @torch.no_grad()
    def run_groups(self, heads: Sequence[Sequence[int]], tails: Sequence[Sequence[Sequence[int]]],
                   stop_at_layer: int | None = None) -> torch.Tensor:
        """Group ``g``'s rows are ``prefix + heads[g] + tails[g][j]``: each head runs once (on the prefix's keys and
        values), then each tail on the prefix's and its head's. Returns every row's last position, in order, as
        :meth:`run` does (hooks fire on the heads' pass too)."""
        model, P, L = self.model, self.prefix.numel(), self.model.cfg.n_layers
        if not tails or any(not t or any(len(r) == 0 for r in t) for t in tails):
            raise InputError("every row needs at least one token after the prefix")
        prefix = self.prefix.tolist()
        H, T = max(len(h) for h in heads), max(len(r) for t in tails for r in t)
        window = model.cfg.sliding_window  # [prefix | padding, head | padding, tail] may be wider than any row
        if not self.cached or (window and P + H + T > window):  # [padding, prefix, head, tail]: plain rows
            ids, mask = _layout([[prefix + list(h) + list(r)] for h, t in zip(heads, tails) for r in t])
            add_floor(int(mask.sum()) * L)
            out = model(ids.to(model.device), attention_mask=mask.to(model.device), logits_to_keep=1,
                        stop_at_layer=stop_at_layer)
            return out[:, -1]
        ids, mask = _layout([[prefix, h, r] for h, t in zip(heads, tails) for r in t])
        past = prefix_cache(model, self.kv, P, len(heads) if H else len(ids))
        if H:  # [prefix | padding, head]: the heads once each, into the cache; then one cache row per tail
            hid, hmask = _layout([[prefix, h] for h in heads])
            self._after_prefix(hid, hmask, past, None)
            past.reorder_cache(torch.tensor([g for g, t in enumerate(tails) for _ in t], device=model.device))
            add_floor(sum(len(h) for h in heads) * L)
        add_floor(sum(len(r) for t in tails for r in t) * L)
        return self._after_prefix(ids, mask, past, stop_at_layer, start=P + H)[:, -1]

    def _after_prefix(self, ids: torch.Tensor, mask: torch.Tensor, past: object, stop_at_layer: int | None,
                      start: int | None = None) -> torch.Tensor:
        """Run ``ids [rows, width]`` from ``start`` (default: the prefix's end) on the keys and values in ``past``,
        which HF extends in place; ``mask`` covers every position, cached ones included."""
        model, start = self.model, self.prefix.numel() if start is None else start
        ids, mask = ids.to(model.device), mask.to(model.device)
        # the stream entering block 0 at the rows' own positions (learned position embeddings included)
        x = model(ids, attention_mask=mask, stop_at_layer=0)[:, start:]
        pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, start:]
        return model.run_from(0, x, position_ids=pos, past_key_values=past, attention_mask=mask, logits_to_keep=1,
                              stop_at_layer=stop_at_layer)


def group_rows(rows: Sequence[Sequence[int]], least: int = MIN_SHARED) -> list[tuple[int, list[int]]]:
    """Rows that begin alike, as ``(head length, row indices)`` groups: rows sorted by their tokens; a row joins its
    neighbour's group when it shares at least ``least`` leading tokens with it and no fewer than the group's head
    (a row sharing less starts a group of its own, so that heads never shrink to a common word or two). The head
    is what all of a group's rows share, leaving each at least one token (0 for a row alone)."""
    order = sorted(range(len(rows)), key=lambda i: list(rows[i]))
    groups: list[tuple[int, list[int]]] = []
    for i in order:
        if groups:
            head, members = groups[-1]
            shared = common_prefix_length([rows[members[0]], rows[i]])
            if shared >= least and (len(members) == 1 or shared >= head):
                groups[-1] = (shared if len(members) == 1 else head, members + [i])
                continue
        groups.append((0, [i]))
    return groups


@torch.no_grad()
def next_token_logprobs(model: HookedModel, rows: Sequence[Sequence[int]], targets: Sequence[int], batch: int = 32,
                        desc: str = "next-token log-probabilities") -> torch.Tensor:
    """``[len(rows), len(targets)]``: ``log P(t | row)`` of each target token ``t`` after each row of token ids.
    The rows' longest common prefix runs once (:class:`SharedPrefix`); rows that then share a longer beginning
    (:func:`group_rows`: a scoring prompt and its control, the same text with another explanation) run it once
    per group; about ``batch`` rows a pass, groups of similar length together."""
    if not rows:
        return torch.zeros(0, len(targets))
    if any(len(r) == 0 for r in rows):
        raise InputError("every row needs at least one token")
    V = model.cfg.d_vocab
    bad = [t for t in targets if not 0 <= int(t) < V]
    if bad:
        raise InputError(f"target token ids {bad} are outside the vocabulary (0..{V - 1})")
    c = common_prefix_length(rows)
    shared = SharedPrefix(model, list(rows[0][:c]), longest=max(len(r) for r in rows))
    after = [list(r[c:]) for r in rows]
    groups = sorted(group_rows(after), key=lambda g: (g[0], max(len(after[i]) for i in g[1])))
    batches, cur = [], []
    for g in groups:
        if cur and sum(len(m) for _, m in cur) + len(g[1]) > batch:
            batches.append(cur)
            cur = []
        cur.append(g)
    batches.append(cur)
    idx = torch.tensor([int(t) for t in targets], device=model.device)
    out = torch.empty(len(rows), len(targets))
    for b in bar(batches, desc=desc):
        heads = [after[m[0]][:h] for h, m in b]
        tails = [[after[i][h:] for i in m] for h, m in b]
        lp = shared.run_groups(heads, tails).float().log_softmax(-1)[:, idx].cpu()
        out[[i for _, m in b for i in m]] = lp
    return out
