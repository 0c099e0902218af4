"""Many short rows after one shared prefix, with the prefix run once.

Autointerp's scoring prompts all open with the same chat template and instruction; absorption's words all follow
the same in-context examples. The prefix runs once and its keys and values are kept; each batch of rows then runs
only its own tokens on them. A causal model's states at the prefix's positions do not depend on what follows, so
this equals running every ``prefix + row`` in full, to float rounding (``tests/test_shared_prefix.py`` checks it on
every supported family). Where the hooks do not hold what attention caches (Falcon rotates its keys past every
hook) or padding could push a row past a sliding window, the rows run in full instead.
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


class SharedPrefix:
    """``prefix`` (token ids ``[P]``) run once on ``model``; :meth:`run` then runs rows of tokens after it.

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

    @torch.no_grad()
    def run(self, own: Sequence[Sequence[int]], stop_at_layer: int | None = None) -> torch.Tensor:
        """Each row of ``own`` (token ids after the prefix, at least one each) at its last position: logits
        ``[rows, d_vocab]``, or with ``stop_at_layer=L`` the stream entering block L ``[rows, d_model]``. Hooks
        fire on the rows' own positions (all positions, when the rows run in full), left-padded within a batch."""
        model, P = self.model, self.prefix.numel()
        if not own or any(len(r) == 0 for r in own):
            raise InputError("every row needs at least one token after the prefix")
        B, S = len(own), max(len(r) for r in own)
        ids, mask = torch.zeros(B, P + S, dtype=torch.long), torch.zeros(B, P + S, dtype=torch.long)  # pads: masked
        for i, r in enumerate(own):
            row = torch.as_tensor(list(r), dtype=torch.long)
            if self.cached:  # [prefix | padding, own]: the prefix's positions are the cached ones
                ids[i, :P], ids[i, P + S - len(r):] = self.prefix, row
                mask[i, :P], mask[i, P + S - len(r):] = 1, 1
            else:  # [padding, prefix, own]: a plain left-padded row
                ids[i, S - len(r):] = torch.cat([self.prefix, row])
                mask[i, S - len(r):] = 1
        ids, mask = ids.to(model.device), mask.to(model.device)
        add_floor(sum(len(r) + (0 if self.cached else P) for r in own) * model.cfg.n_layers)
        if not self.cached:
            out = model(ids, attention_mask=mask, logits_to_keep=1, stop_at_layer=stop_at_layer)
            return out[:, -1]
        # the stream entering block 0 at the rows' own positions (learned position embeddings included)
        x = model(ids, attention_mask=mask, stop_at_layer=0)[:, P:]
        pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, P:]
        out = model.run_from(0, x, position_ids=pos, past_key_values=prefix_cache(model, self.kv, P, B),
                             attention_mask=mask, logits_to_keep=1, stop_at_layer=stop_at_layer)
        return out[:, -1]


@torch.no_grad()
def next_token_logprobs(model: HookedModel, rows: Sequence[Sequence[int]], targets: Sequence[int], batch: int = 32,
                        desc: str = "next-token log-probabilities") -> torch.Tensor:
    """``[len(rows), len(targets)]``: ``log P(t | row)`` of each target token ``t`` after each row of token ids,
    the rows' longest common prefix run once (:class:`SharedPrefix`), ``batch`` rows a pass."""
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
    idx = torch.tensor([int(t) for t in targets], device=model.device)
    out = [shared.run([list(r[c:]) for r in rows[s:s + batch]]).float().log_softmax(-1)[:, idx].cpu()
           for s in bar(range(0, len(rows), batch), desc=desc)]
    return torch.cat(out)
