"""Inputs shared by the techniques: equal-length prompt pairs, answer ids and metric values.

Techniques that read fixed positions (patching, ablation, attribution patching, EAP) need
prompts of one token length within a batch; these helpers give a clear error when they differ.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import torch

from ..batching import BatchState, map_batches
from ..compute import forward_bytes
from ..core.errors import InputError, InputTypeError
from ..core.hookpoints import act_name, split_name
from ..core.model import HookedModel
from ..core.types import Answer, HookList, Metric, TextOrTokens
from ..core.work import add_floor

if TYPE_CHECKING:
    from ..datasets import TaskDataset


def equal_length_tokens(model: HookedModel, x: TextOrTokens, purpose: str = "patching") -> torch.Tensor:
    """Text, texts or tokens -> ``[batch, pos]`` on the model's device; a clear error when texts differ in length."""
    if isinstance(x, torch.Tensor):
        return (x[None] if x.dim() == 1 else x).to(model.device)
    if not isinstance(x, (str, list, tuple)):
        raise InputTypeError(f"{purpose} takes text, a list of texts or tokens [batch, pos]; got {type(x).__name__}")
    tokens, mask = model.tokenize(x)
    if not bool(mask.all()):
        raise InputError(f"{purpose} needs prompts of one token length within a batch (it reads fixed positions); "
                         f"got lengths {mask.sum(-1).tolist()}")
    return tokens


def prompt_pair(model: HookedModel, clean: TextOrTokens, corrupted: TextOrTokens) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens for a clean/corrupted pair (text or tokens); an error showing both when lengths differ."""
    a, b = equal_length_tokens(model, clean), equal_length_tokens(model, corrupted)
    if a.shape != b.shape:
        def show(t):
            return model.to_str_tokens(t[0]) if model.tokenizer is not None else t[0].tolist()

        raise InputError(
            f"clean and corrupted prompts must have the same token length; got {tuple(a.shape)} and "
            f"{tuple(b.shape)}.\n  clean:     {show(a)}\n  corrupted: {show(b)}"
        )
    return a, b


def answer_ids(model: HookedModel, x: Answer, n: int) -> torch.Tensor:
    """Answers (single-token strings or ids; one, or one per prompt) -> ``[n]`` ids on the model's device."""
    if isinstance(x, str):
        x = [x]
    if isinstance(x, (list, tuple)):
        x = [model.to_single_token(t) if isinstance(t, str) else int(t) for t in x]
    t = torch.as_tensor(x, dtype=torch.long).reshape(-1)
    if t.numel() == 1:
        t = t.expand(n)
    if t.numel() != n:
        raise InputError(f"expected one answer per prompt ({n}), got {t.numel()}")
    if bool(((t < 0) | (t >= model.cfg.d_vocab)).any()):
        raise InputError(f"answer ids must be in 0..{model.cfg.d_vocab - 1}, got {t.tolist()}")
    return t.to(model.device)


def metric_value(v: object, n: int) -> torch.Tensor:
    """A metric's output as a float tensor: a scalar or ``[n]`` (one per prompt); an error otherwise."""
    v = torch.as_tensor(v).detach().float()
    if v.dim() > 1 or (v.dim() == 1 and v.shape[0] not in (1, n)):
        raise InputError(f"the metric must return a scalar or one value per prompt ([{n}]), got shape {tuple(v.shape)}")
    return v


def check_range(what: str, values: Sequence[int] | None, limit: int) -> list[int]:
    """``values`` (or all of ``0..limit-1`` when None) as a list, each checked to lie in ``0..limit-1``."""
    if values is None:
        return list(range(limit))
    out = [int(v) for v in values]
    bad = [v for v in out if not 0 <= v < limit]
    if bad:
        raise InputError(f"{what} {bad} out of range: valid {what} are 0..{limit - 1}")
    return out


def reads_last_only(metric: Metric, last_logits: torch.Tensor, n_pos: int, max_elements: int = 50_000_000) -> bool:
    """True when ``metric`` reads only the last position: it stays finite with every earlier position NaN.

    ``last_logits`` is ``[batch, 1, d_vocab]``. Exact, and needs only the last position's logits.
    """
    N, _, V = last_logits.shape
    if N * n_pos * V > max_elements:
        return False
    probe = torch.full((N, n_pos, V), float("nan"), dtype=last_logits.dtype, device=last_logits.device)
    probe[:, -1:] = last_logits
    try:
        a = torch.as_tensor(metric(probe)).float()
        b = torch.as_tensor(metric(last_logits)).float()
    except (IndexError, RuntimeError, ValueError):
        return False
    return bool(torch.isfinite(a).all()) and a.shape == b.shape and torch.allclose(a, b, atol=1e-6, rtol=1e-6)


def metric_on_rows(metric: Metric, logits: torch.Tensor, rows: torch.Tensor, n: int) -> torch.Tensor:
    """``metric`` of a batch of prompts: ``[b]`` values for the prompts ``rows`` of a dataset of ``n``.

    A task metric is a closure over the whole dataset (its answers, one per prompt), so the batch's
    logits ``[b, pos, d_vocab]`` are placed at their rows of an ``n``-row tensor (differentiably;
    the other rows are zero) and the metric's values at those rows are returned. Exact for any
    metric that scores each prompt on its own row.
    """
    if logits.shape[0] == n:
        return torch.as_tensor(metric(logits)).float()
    full = logits.new_zeros((n,) + tuple(logits.shape[1:])).index_copy(0, rows.to(logits.device), logits)
    v = torch.as_tensor(metric(full)).float()
    if v.dim() != 1 or v.shape[0] != n:
        raise InputError(f"this run is split into batches of prompts, so the metric must return one value per "
                         f"prompt ([{n}]); got shape {tuple(v.shape)}. Pass batch_size={n} to run them at once.")
    return v[rows.to(v.device)]


def logits_to_keep(model: HookedModel, tokens: torch.Tensor, metric: Metric) -> int:
    """1 when ``metric`` reads only the last position of ``tokens [n, pos]``'s logits (exact, from one prompt's
    forward pass; see :func:`reads_last_only`), else 0 (every position): ``model(..., logits_to_keep=...)``."""
    n, P = tokens.shape
    with torch.no_grad():
        first = model(tokens[:1], logits_to_keep=1)
    return 1 if reads_last_only(lambda lg: metric_on_rows(metric, lg, torch.zeros(1, dtype=torch.long), n), first,
                                P) else 0


def batched_metric(model: HookedModel, tokens: torch.Tensor, metric: Metric,
                   hooks_for: Callable[[int, int], HookList] | None = None, batch_size: int | None = None,
                   what: str = "forward passes", state: BatchState | None = None, plain: PlainRun | None = None,
                   start: int = 0, changed: torch.Tensor | None = None) -> torch.Tensor:
    """``metric`` per prompt ``[n]`` for ``tokens [n, pos]``, run in memory-sized batches of prompts.

    ``hooks_for(start, stop)`` gives the forward hooks for the prompts ``start:stop`` (e.g. ablation
    values sliced to those rows). Only the last position's logits are kept when the metric reads
    nothing else (detected exactly, see :func:`reads_last_only`). ``plain`` (:func:`plain_run` of the same tokens
    and metric) with ``start``, the first block any hook sits in: the run resumes from the plain run's stream at
    the latest block it kept at or before ``start`` (the blocks before compute what they did there).
    ``changed`` (bool ``[n]``, with ``plain``): the only prompts the hooks can change (a prompt's run never reads
    another's); the others keep ``plain.value`` without running, and ``hooks_for`` must not depend on its rows.
    """
    n, P = tokens.shape
    keep = plain.keep if plain is not None else logits_to_keep(model, tokens, metric)
    layer = plain.resume_layer(start) if plain is not None else 0
    elt = torch.finfo(model.dtype).bits // 8
    if changed is not None and plain is None:
        raise InputError("batched_metric: `changed` needs the plain run whose values the unchanged prompts keep")
    rows = torch.arange(n) if changed is None else changed.cpu().nonzero().flatten()

    def run(s: int, e: int) -> torch.Tensor:
        hooks = hooks_for(s, e) if hooks_for is not None else ()
        r = rows[s:e]
        pick = slice(s, e) if changed is None else r  # (every prompt: views, not copies)
        with torch.no_grad(), model.hooks(hooks):
            if layer:
                logits = model.run_from(layer, plain.streams[layer][pick].to(model.device), logits_to_keep=keep)
            else:
                logits = model(tokens[pick], logits_to_keep=keep)
        return metric_on_rows(metric, logits, r, n).cpu()

    per = forward_bytes(model.cfg.to_dict(), 1, P, elt, 1 if keep else None)
    parts = map_batches(run, len(rows), batch_size, per, model.device, what, state, tokens_per_item=P) if len(rows) else []
    if changed is not None:  # the unchanged prompts' values are the plain run's
        out = plain.value.clone().float()
        if parts:
            out[rows] = torch.cat(parts).float()
        return out
    return parts[0] if len(parts) == 1 else torch.cat(parts)  # (one batch: the metric's own shape)


@torch.no_grad()
def logits_under(model: HookedModel, tokens: torch.Tensor, hook_sets: Sequence[HookList],
                 keep: int = 0) -> list[torch.Tensor]:
    """The logits ``[n, pos, d_vocab]`` of ``tokens`` under each list of forward hooks (an empty list: the unhooked
    run), the blocks before the first block any hook sits in run once for all of them. ``keep``: as
    ``logits_to_keep``. Hooks named by a filter, not a name, make every run start from the tokens."""
    names = [n for hs in hook_sets for n, _ in hs]
    start = min((hook_block(n) if isinstance(n, str) else 0 for n in names), default=0)
    stream: dict[str, torch.Tensor] = {}
    plain = None
    if any(not hs for hs in hook_sets):
        cap = [(act_name("resid_pre", start), lambda a, h: stream.__setitem__("x", a.detach()))] if start else []
        with model.hooks(cap):
            plain = model(tokens, logits_to_keep=keep)
    elif start:
        stream["x"] = model(tokens, stop_at_layer=start)
    out = []
    for hs in hook_sets:
        if not hs:
            out.append(plain)
            continue
        with model.hooks(hs):
            out.append(model.run_from(start, stream["x"], logits_to_keep=keep) if start
                       else model(tokens, logits_to_keep=keep))
    return out


def stop_layer(model: HookedModel, names: Iterable[str]) -> int | None:
    """The block after which none of the hook points ``names`` is read: ``stop_at_layer`` for a pass that only
    records them (None: run the whole model, for a name outside the blocks such as the final norm)."""
    stops = []
    for h in names:
        layer, _ = split_name(h)
        if layer is None or h.startswith("ln_final"):
            return None
        stops.append(layer + 1)
    stop = max(stops, default=None)
    return None if stop is None or stop > model.cfg.n_layers else stop


def hook_block(name: str) -> int:
    """The block a hook name sits in (``blocks.5.attn.hook_z`` -> 5), 0 for a name outside the blocks (the
    embeddings, the final norm): where a run with that hook must start, at the latest."""
    layer, _ = split_name(name)
    return layer if layer is not None else 0


@dataclass(repr=False)
class PlainRun:
    """The unhooked run of some tokens, kept for the interventions that follow it: the metric per prompt ``value
    [n]``, which logits the metric reads (``keep``, as :func:`logits_to_keep`), and the residual stream entering
    some blocks ``{layer: [n, pos, d_model]}``. An intervention whose hooks all sit in block b or later resumes from
    the latest kept stream at or before b (:func:`batched_metric`'s ``plain``): same values, fewer blocks run."""

    value: torch.Tensor
    keep: int
    streams: dict[int, torch.Tensor]

    def resume_layer(self, start: int) -> int:
        """The block a run whose first hook sits in block ``start`` resumes at (0: from the tokens)."""
        return max((l for l in self.streams if l <= start), default=0)


@torch.no_grad()
def plain_run(model: HookedModel, tokens: torch.Tensor, metric: Metric, layers: Iterable[int] = (),
              state: BatchState | None = None, what: str = "forward passes", batch_size: int | None = None) -> PlainRun:
    """One batched unhooked pass over ``tokens [n, pos]``: the metric per prompt and the stream entering each block
    of ``layers`` (the latest ones first, as many as fit in a quarter of free memory; block 0 needs none)."""
    from ..compute import free_memory

    n, P = tokens.shape
    keep = logits_to_keep(model, tokens, metric)
    elt = torch.finfo(model.dtype).bits // 8
    one = n * P * model.cfg.d_model * elt
    want = sorted({int(l) for l in layers if 0 < int(l) < model.cfg.n_layers}, reverse=True)
    want = want[:int(0.25 * free_memory(model.device) // max(one, 1))]
    parts: dict[int, list[torch.Tensor]] = {l: [] for l in want}

    def run(s: int, e: int) -> torch.Tensor:
        got: dict[int, torch.Tensor] = {}
        hooks = [(act_name("resid_pre", l), (lambda a, h, _l=l: got.__setitem__(_l, a.detach().clone()))) for l in want]
        with model.hooks(hooks):
            logits = model(tokens[s:e], logits_to_keep=keep)
        for l in want:
            parts[l].append(got[l])
        return metric_on_rows(metric, logits, torch.arange(s, e), n).cpu()

    per = forward_bytes(model.cfg.to_dict(), 1, P, elt, 1 if keep else None) + len(want) * P * model.cfg.d_model * elt
    values = map_batches(run, n, batch_size, per, model.device, what, state, tokens_per_item=P)
    value = values[0] if len(values) == 1 else torch.cat(values)
    return PlainRun(value, keep, {l: torch.cat(p) for l, p in parts.items()})


@dataclass(eq=False, repr=False)
class PreparedPair:
    """A clean/corrupted task normalised once, at the boundary, for every technique that reads it.

    ``clean``/``corrupted``: ``[n, pos]`` token ids on the model's device, of one shape (checked once);
    ``metric``: one value per prompt; ``keep``: 1 when the metric reads only the last position's logits
    (:func:`logits_to_keep`), else 0. :meth:`run` gives the clean or the corrupted run's logits
    ``[n, pos, d_vocab]`` and activations, computed on first use and shared: patching, attribution
    patching and EAP given the same pair read the same two runs instead of each running its own.
    ``wanted``: hook names every run caches (the union of what the callers will read, so that one pass
    serves them all; a name asked for later costs one more pass). ``prompt_len``: when the rows continue the
    prompts with answer tokens (a task with answers of several tokens), the prompt's length: patching and
    attribution then read positions ``< prompt_len`` only, the continuation being the same in both runs.
    """

    model: HookedModel
    clean: torch.Tensor
    corrupted: torch.Tensor
    metric: Metric
    wanted: set = field(default_factory=set)
    runs: dict = field(default_factory=dict)  # "clean" | "corrupted" -> (logits, ActivationCache)
    _keep: int | None = None
    prompt_len: int | None = None
    rows_per_pair: int = 1  # rows that make one prompt pair (an answer's row and a wrong answer's): values per pair

    def __len__(self) -> int:
        return self.clean.shape[0]

    @property
    def keep(self) -> int:
        """1 when the metric reads only the last position's logits, else 0 (probed once, on first use)."""
        if self._keep is None:
            self._keep = logits_to_keep(self.model, self.clean, self.metric)
        return self._keep

    @torch.no_grad()
    def run(self, which: str, names: Iterable[str] = ()) -> tuple:
        """``(logits [n, pos, d_vocab], ActivationCache)`` of the ``"clean"`` or ``"corrupted"`` prompts, holding at
        least ``names``: one forward pass, repeated only when a name it does not hold is asked for."""
        if which not in ("clean", "corrupted"):
            raise InputError(f"a prepared pair runs 'clean' or 'corrupted', not {which!r}")
        need = set(names) | self.wanted
        have = self.runs.get(which)
        if have is None or not need <= set(have[1].store):
            need |= set(have[1].store) if have else set()
            tokens = self.clean if which == "clean" else self.corrupted
            if have is None:  # each side's first run is needed work; a rerun for a late name is not
                add_floor(tokens.numel() * self.model.cfg.n_layers)
            self.runs[which] = self.model.run_with_cache(tokens, names_filter=sorted(
                x for x in need if self.model.has_hook(x)))
        return self.runs[which]

    def value(self, which: str) -> torch.Tensor:
        """The metric ``[n]`` (or a scalar) of the unpatched clean or corrupted run."""
        return metric_value(self.metric(self.run(which)[0]), len(self))


def prepare(model: HookedModel, clean: TextOrTokens, corrupted: TextOrTokens, metric: Metric,
            names: Iterable[str] = (), prompt_len: int | None = None) -> PreparedPair:
    """Normalise a clean/corrupted task once (tokens checked, the metric probed); nothing runs until a technique
    asks (:class:`PreparedPair`). ``names``: the hooks the callers will read, cached together in one pass;
    ``prompt_len``: the prompt positions to read when answer tokens follow them (a task's ``prompt_len``)."""
    c, x = prompt_pair(model, clean, corrupted)
    if prompt_len is not None and not 0 < prompt_len <= c.shape[1]:
        raise InputError(f"prompt_len must be in 1..{c.shape[1]} (the rows' length), got {prompt_len}")
    return PreparedPair(model, c, x, metric, set(names), prompt_len=prompt_len)


def prepare_task(model: HookedModel, task: TaskDataset, names: Iterable[str] = (), metric: Metric | None = None) -> PreparedPair:
    """:func:`prepare` for a task dataset (its clean and corrupted rows, its metric unless ``metric`` is given, and,
    for answers of several tokens, its ``prompt_len`` and ``rows_per_pair``)."""
    pair = prepare(model, task.clean, task.corrupted, metric or task.metric, names, task.prompt_len)
    pair.rows_per_pair = task.rows_per_pair
    return pair


def prompt_positions_only(pair: PreparedPair, delta: torch.Tensor) -> torch.Tensor:
    """``delta [n, pos, ...]`` (clean - corrupted activations) with the answer continuation's positions zeroed
    when ``pair`` continues its prompts (``prompt_len``): attribution reads the prompt positions only."""
    if pair.prompt_len is None or pair.prompt_len >= delta.shape[1]:
        return delta
    out = delta.clone()
    out[:, pair.prompt_len:] = 0
    return out


def as_pair(model: HookedModel, clean: TextOrTokens | PreparedPair, corrupted: TextOrTokens | None,
            metric: Metric | None) -> PreparedPair:
    """``clean`` itself when it is a :class:`PreparedPair` (then ``corrupted`` and ``metric`` stay None), else the
    three prepared: how a technique accepts either."""
    if isinstance(clean, PreparedPair):
        if corrupted is not None or metric is not None:
            raise InputError("a prepared pair carries its own corrupted prompts and metric: pass it alone")
        return clean
    if corrupted is None or metric is None:
        raise InputError("give the clean prompts, the corrupted prompts and a metric (or one PreparedPair)")
    return prepare(model, clean, corrupted, metric)
