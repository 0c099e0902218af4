"""The activation-difference lens (ADL): what the mean activation difference on unrelated text says.

Minder et al. 2025 ("Narrow finetuning leaves clearly readable traces in activation differences") take, at one layer,
the mean difference of the two models' residual streams over the first few positions of unrelated text,

    δ = mean_{documents, positions 1..k} (h_ft - h_base)                       [d_model]

and read it four ways, each here beside a control, a random direction of the same norm:

- **logit lens**: the top tokens of ``W_U · norm_final(δ)``;
- **Patchscope** (Ghandeharioun et al. 2024): the base model reads δ (scaled to the layer's mean residual norm) in
  place of the last token of an identity prompt (``"cat → cat; 1135 → 1135; hello → hello; ? →"``) and says what it
  decodes to: its top next tokens;
- **steering**: the base model generates from neutral prompts with ``α δ̂`` added at that layer at every position
  (``α`` a multiple of the mean residual norm), against the same with the random direction;
- **next-token effect**: δ added to the base model's residual stream on the documents it came from; the tokens whose
  log-probability rises most (:func:`token_effect_readout`).

:func:`layer_norms` gives, per layer, ``||δ_l||`` and the mean per-token ``||h_ft - h_base||`` relative to
``||h_base||``, with a noise floor: ``||δ_l||`` from the difference of two halves of the documents.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..analysis.validation import Estimate, bootstrap_ci
from ..core.errors import InputError
from ..core.hookpoints import act_name
from ..core.result import Result
from ..sae.data import harvest_many
from ..techniques.steering import steering_hook
from .pair import ModelPair

IDENTITY_PROMPT = "cat -> cat\n1135 -> 1135\nhello -> hello\n? ->"
NEUTRAL_PROMPTS = ("The", "I think that", "Here is a short story:", "Yesterday", "My favourite thing is")


@dataclass(repr=False)
class Readout(Result):
    """The top tokens (or texts) one reading of δ gives, beside those of the random-direction control."""

    method: str
    tokens: list[tuple[str, float]]
    control: list[tuple[str, float]]
    texts: list[str] = field(default_factory=list)
    control_texts: list[str] = field(default_factory=list)

    def summary(self) -> str:
        fmt = lambda xs: ", ".join(f"{t!r} ({v:.2f})" for t, v in xs[:12])  # noqa: E731
        lines = [f"{self.method}: {fmt(self.tokens)}" if self.tokens else f"{self.method}:"]
        if self.control:
            lines.append(f"  control (random direction, same norm): {fmt(self.control)}")
        for t in self.texts[:5]:
            lines.append(f"  steered: {t!r}")
        for t in self.control_texts[:2]:
            lines.append(f"  control: {t!r}")
        return "\n".join(lines)


@dataclass(repr=False)
class ActivationDifference(Result):
    """δ at one hook (module docstring) with its readouts. ``per_position [k, d]``: δ at each of the first positions;
    ``norm``: ``||δ||`` with a bootstrap interval over documents; ``resid_norm``: the mean residual norm there (what
    patching and steering scale to)."""

    hook: str
    positions: list[int]
    delta: torch.Tensor  # [d]
    per_position: torch.Tensor  # [k, d]
    norm: Estimate
    resid_norm: float
    n_docs: int
    readouts: list[Readout] = field(default_factory=list)

    _skip_in_dict = ("delta", "per_position")

    def summary(self) -> str:
        lines = [f"activation-difference lens at {self.hook}, positions {self.positions[0]}..{self.positions[-1]} of "
                 f"{self.n_docs} documents: ||mean(h_ft - h_base)|| = {self.norm.summary()} (the mean residual norm "
                 f"there is {self.resid_norm:.2f})"]
        lines += [r.summary() for r in self.readouts]
        if self.n_docs < 10:
            lines.append(f"only {self.n_docs} documents: δ rests on little data")
        return "\n".join(lines)

    def readout(self, method: str) -> Readout | None:
        return next((r for r in self.readouts if r.method == method), None)


@torch.no_grad()
def activation_difference(pair: ModelPair, tokens: torch.Tensor, hook: str | None = None, first: int = 5,
                          skip_first: int = 1) -> ActivationDifference:
    """δ at ``hook`` (default: the residual stream after the middle block) over positions ``skip_first ..
    skip_first + first - 1`` of ``tokens [n_docs, pos]`` (position 0 is the attention sink, identical in spirit in
    both models and huge in norm: left out)."""
    hook = hook or act_name("resid_post", pair.cfg.n_layers // 2)
    if tokens.dim() != 2:
        raise InputError(f"tokens must be [documents, pos], got {tuple(tokens.shape)}")
    if first < 1 or skip_first + first > tokens.shape[1]:
        raise InputError(f"first={first} positions after {skip_first} need documents of at least {skip_first + first} "
                         f"tokens; these have {tokens.shape[1]}")
    t = tokens[:, :skip_first + first]
    acts = {}
    for side in ("base", "ft"):
        with pair.side(side) as m:
            m.manager.check(hook)
            acts[side] = harvest_many(m, [hook], t, None, skip_first, None)[hook].reshape(t.shape[0], first, -1)
    diff = (acts["ft"] - acts["base"]).double()  # [n, k, d]
    per_doc = diff.mean(1)  # [n, d]
    delta = per_doc.mean(0)
    norm = bootstrap_ci(per_doc, stat=lambda v: v.mean(0).norm())
    resid = float(acts["base"].norm(dim=-1).mean())
    return ActivationDifference(hook, list(range(skip_first, skip_first + first)), delta.float(),
                                diff.mean(0).float(), norm, resid, int(tokens.shape[0]))


def _random_like(v: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(v.shape[-1], generator=g)
    return r / r.norm() * v.norm()


def _top(model, logits: torch.Tensor, k: int) -> list[tuple[str, float]]:
    return _named(model, torch.softmax(logits.float(), -1), k)


def _named(model, scores: torch.Tensor, k: int) -> list[tuple[str, float]]:
    """The ``k`` highest ``scores [d_vocab]`` as (token string, score)."""
    v, i = scores.topk(k)
    tok = model.tokenizer
    return [(tok.decode([int(x)]) if tok is not None else str(int(x)), float(y)) for y, x in zip(v, i)]


@torch.no_grad()
def logit_lens_readout(pair: ModelPair, adl: ActivationDifference, k: int = 20, seed: int = 0) -> Readout:
    """The top tokens of ``W_U norm_final(δ)`` (through the fine-tune's final norm and unembedding), and of a random
    direction of the same norm."""
    pair.require_same_vocab("the activation-difference logit lens")
    with pair.side("ft") as m:
        dev = m.device
        read = lambda v: m.unembed(m.ln_final(v.to(dev, m.dtype)[None, None]))[0, 0]  # noqa: E731
        return Readout("logit lens of δ", _top(m, read(adl.delta), k), _top(m, read(_random_like(adl.delta, seed)), k))


@torch.no_grad()
def patchscope_readout(pair: ModelPair, adl: ActivationDifference, k: int = 20, scale: float = 1.0, seed: int = 0,
                       prompt: str = IDENTITY_PROMPT) -> Readout:
    """What the base model decodes δ to: δ̂ · ``scale`` · (mean residual norm) in place of the residual stream of the
    last token of ``prompt`` at δ's hook; the top next tokens, and the same for a random direction."""
    pair.require_same_vocab("the Patchscope")
    with pair.side("base") as m:
        toks = m.to_tokens(prompt)
        unit = adl.resid_norm * scale

        def run(v):
            vec = v / v.norm().clamp_min(1e-12) * unit

            def put(act, hook):
                out = act.clone()
                out[:, -1] = vec.to(act.device, act.dtype)
                return out
            with m.hooks([(adl.hook, put)]):
                return m(toks)[0, -1]
        return Readout("Patchscope of δ (base model)", _top(m, run(adl.delta), k), _top(m, run(_random_like(adl.delta, seed)), k))


@torch.no_grad()
def token_effect_readout(pair: ModelPair, adl: ActivationDifference, tokens: torch.Tensor, k: int = 20,
                         seed: int = 0) -> Readout:
    """The next-token effect of δ: δ added to the base model's own residual stream at δ's hook and positions on the
    documents ``tokens [n_docs, pos]`` it was measured on, the rest of the network run; the tokens whose mean
    log-probability over those positions rises most, ``mean_{docs, p} (log p(t | h + δ) - log p(t | h))``, beside the
    same for a random direction of the same norm. The causal counterpart of the logit lens (activation addition,
    Turner et al. 2023), on one step of the documents instead of generated text; where a small model's middle
    layers do not read through the unembedding, its later layers can."""
    t = tokens[:, :adl.positions[-1] + 1]
    pos = torch.tensor(adl.positions)
    with pair.side("base") as m:
        t = t.to(m.device)
        before = torch.log_softmax(m(t).float(), -1)[:, pos].mean((0, 1))

        def top(v):
            def add(act, hook):
                out = act.clone()
                out[:, pos] += v.to(act.device, act.dtype)
                return out
            with m.hooks([(adl.hook, add)]):
                return _named(m, torch.log_softmax(m(t).float(), -1)[:, pos].mean((0, 1)) - before, k)
        return Readout("next-token effect of δ (base model; rise in log-probability)", top(adl.delta),
                       top(_random_like(adl.delta, seed)))


@torch.no_grad()
def steering_readout(pair: ModelPair, adl: ActivationDifference, alpha: float = 1.0,
                     prompts: "tuple[str, ...] | list[str]" = NEUTRAL_PROMPTS, max_new_tokens: int = 24,
                     seed: int = 0) -> Readout:
    """The base model's greedy continuations of ``prompts`` with ``α · mean residual norm · δ̂`` added at δ's hook at
    every position, beside the same with a random direction of the same norm."""
    with pair.side("base") as m:
        def gen(v):
            d = v / v.norm().clamp_min(1e-12)
            return m.generate(list(prompts), max_new_tokens=max_new_tokens,
                              fwd_hooks=[(adl.hook, steering_hook(d, alpha * adl.resid_norm))])
        return Readout(f"steering the base model with δ (α = {alpha:g} x the residual norm)", [], [],
                       list(gen(adl.delta)), list(gen(_random_like(adl.delta, seed))))


@dataclass(repr=False)
class LayerNorms(Result):
    """Per layer: ``||δ_l||`` (the mean difference over all scored positions), its noise floor (``||δ_A - δ_B||/2``
    for two halves of the documents: what a δ of pure sampling noise would measure), and the mean per-token
    ``||h_ft - h_base|| / ||h_base||``."""

    layers: list[int]
    mean_diff_norm: list[float]
    noise_floor: list[float]
    relative_token_diff: list[float]
    n_tokens: int

    def summary(self) -> str:
        lines = [f"per-layer activation differences (residual stream after each block, {self.n_tokens} tokens): "
                 "||mean(h_ft - h_base)|| / noise floor, and mean ||h_ft - h_base|| / ||h_base||"]
        for layer, a, b, r in zip(self.layers, self.mean_diff_norm, self.noise_floor, self.relative_token_diff):
            lines.append(f"  layer {layer:>3}: {a:8.3f} / {b:.3f}{'  (within noise)' if a <= 3 * b else ''};  {r:.3f}")
        top = max(range(len(self.layers)), key=lambda i: self.relative_token_diff[i])
        lines.append(f"the fine-tune changed the residual stream most after layer {self.layers[top]} "
                     f"({self.relative_token_diff[top]:.1%} of its norm per token)")
        return "\n".join(lines)


@torch.no_grad()
def layer_norms(pair: ModelPair, tokens: torch.Tensor, skip_first: int = 1, batch_size: int = 8) -> LayerNorms:
    """:class:`LayerNorms` of ``pair`` on ``tokens [n_docs, pos]`` (all positions after ``skip_first``)."""
    L = pair.cfg.n_layers
    hooks = [act_name("resid_post", layer) for layer in range(L)]
    n = tokens.shape[0]
    sums = torch.zeros(2, L, pair.cfg.d_model, dtype=torch.float64)  # halves A, B
    counts = torch.zeros(2)
    rel, m_tok = torch.zeros(L, dtype=torch.float64), 0
    for s in range(0, n, batch_size):
        t = tokens[s:s + batch_size]
        got = {}
        for side in ("base", "ft"):
            with pair.side(side) as m:
                got[side] = harvest_many(m, hooks, t, None, skip_first, None)
        for i, h in enumerate(hooks):
            d = (got["ft"][h] - got["base"][h]).double().reshape(t.shape[0], -1, pair.cfg.d_model)
            for j in range(t.shape[0]):
                sums[(s + j) % 2, i] += d[j].sum(0)
            rel[i] += (d.norm(dim=-1) / got["base"][h].double().reshape(d.shape).norm(dim=-1).clamp_min(1e-12)).sum()
        per_doc = t.shape[1] - skip_first
        for j in range(t.shape[0]):
            counts[(s + j) % 2] += per_doc
        m_tok += t.shape[0] * per_doc
    mean = sums.sum(0) / counts.sum()
    halves = sums / counts.clamp_min(1)[:, None, None]
    floor = ((halves[0] - halves[1]).norm(dim=-1) / 2).tolist() if n >= 2 else [float("nan")] * L
    return LayerNorms(list(range(L)), mean.norm(dim=-1).tolist(), floor, (rel / max(m_tok, 1)).tolist(), m_tok)


@dataclass(repr=False)
class StateTransfer(Result):
    """Per layer, how much of the fine-tune's next-token shift its residual state there carries into the base model.

    ``state[i]``: the fine-tune's whole residual stream after layer ``layers[i]`` (every position of the first
    ``positions[-1] + 1``) written into the base model there, the base model's later layers run;
    ``delta[i]``: only the mean difference δ of that layer added at the ADL's positions (what the ADL reads). Each is
    the share of the shift reproduced, ``1 - KL(p_ft || p_patched) / KL(p_ft || p_base)`` over the documents and the
    ADL's positions (1: the fine-tune's own predictions; 0: the base model's), with a bootstrap interval over
    documents. Every readout of δ through the base model (Patchscope, steering, next-token effect) runs the base
    model's later layers, so where ``state`` is near 0 the fine-tune has not yet written, at that layer, anything
    those layers act on: no such readout can find it there (an upper bound, not a property of the readout)."""

    layers: list[int]
    positions: list[int]
    state: list[Estimate]
    delta: list[Estimate]
    kl_base: float  # mean KL(p_ft || p_base), nats per token, at the positions read
    n_docs: int

    def first_reaching(self, share: float = 0.5) -> int | None:
        """The first layer whose state reproduces at least ``share`` of the shift (None if none does)."""
        return next((layer for layer, e in zip(self.layers, self.state) if e.value >= share), None)

    def at(self, layer: int) -> tuple[Estimate, Estimate] | None:
        return next(((s, d) for l, s, d in zip(self.layers, self.state, self.delta) if l == layer), None)

    def summary(self) -> str:
        lines = [f"where the fine-tune's difference becomes readable by the base model: its residual state after each "
                 f"layer written into the base model (state), or only the mean difference δ added (δ); the share of "
                 f"the fine-tune's next-token shift reproduced, 1 - KL(ft || patched) / KL(ft || base), positions "
                 f"{self.positions[0]}..{self.positions[-1]} of {self.n_docs} documents (KL(ft || base) "
                 f"{self.kl_base:.3f} nats per token)"]
        for layer, s, d in zip(self.layers, self.state, self.delta):
            lines.append(f"  layer {layer:>3}: state {s.value:+.2f} [{s.low:+.2f}, {s.high:+.2f}]   δ {d.value:+.2f} "
                         f"[{d.low:+.2f}, {d.high:+.2f}]")
        half, most = self.first_reaching(0.5), self.first_reaching(0.9)
        if half is None:
            lines.append("no layer's state reproduces half of the shift: the fine-tune writes its change in the "
                         "unembedding or the final norm, which no residual readout sees")
        else:
            most = "none" if most is None else most
            lines.append(f"the first layer whose state reproduces half of the shift: {half}; 90 %: {most}. A readout "
                         f"of δ through the base model at a layer cannot find what the fine-tune adds after it (and "
                         f"the share says how much, not which part: a narrow fine-tune's generic changes come first)")
        if self.n_docs < 10:
            lines.append(f"only {self.n_docs} documents: these intervals rest on too few")
        return "\n".join(lines)


def transfer_layers(n_layers: int, also: "int | None" = None) -> list[int]:
    """The layers :func:`state_transfer` reads by default: every layer of a model of up to 32, else 8 from the first
    to the last and the middle one; and ``also``."""
    every = range(n_layers) if n_layers <= 32 else {round(i * (n_layers - 1) / 7) for i in range(8)} | {n_layers // 2}
    return sorted(set(every) | ({also} if also is not None else set()))


@torch.no_grad()
def state_transfer(pair: ModelPair, tokens: torch.Tensor, layers: "list[int] | None" = None, first: int = 5,
                   skip_first: int = 1, n_boot: int = 1000, seed: int = 0) -> StateTransfer:
    """:class:`StateTransfer` of ``pair`` on ``tokens [n_docs, pos]`` at ``layers`` (default:
    :func:`transfer_layers`), read at positions ``skip_first .. skip_first + first - 1`` as the ADL is.

    A layer-by-layer activation patch from the fine-tune into the base model (Meng et al. 2022's patching, across
    models): it says where the difference the ADL reads is already what the fine-tune acts on."""
    pair.require_same_vocab("the state transfer (it compares next-token distributions)")
    L = pair.cfg.n_layers
    layers = sorted(set(layers)) if layers is not None else transfer_layers(L)
    bad = [layer for layer in layers if not 0 <= layer < L]
    if bad:
        raise InputError(f"layers {bad} are not in 0..{L - 1}")
    if tokens.dim() != 2 or first < 1 or skip_first + first > tokens.shape[1]:
        raise InputError(f"tokens must be [documents, pos] with at least {skip_first + first} positions, got "
                         f"{tuple(tokens.shape)}")
    t = tokens[:, :skip_first + first]
    pos = torch.arange(skip_first, skip_first + first)
    hooks = [act_name("resid_post", layer) for layer in layers]
    with pair.side("ft") as m:
        t = t.to(m.device)
        ft_states = harvest_many(m, hooks, t, None, 0, None)
        lp_ft = torch.log_softmax(m(t).float(), -1)[:, pos]  # [n, k, V]
    p_ft = lp_ft.exp()

    def kl_per_doc(logits: torch.Tensor) -> torch.Tensor:  # KL(p_ft || q) averaged over the positions: [n]
        return (p_ft * (lp_ft - torch.log_softmax(logits.float(), -1)[:, pos])).sum(-1).double().mean(-1).cpu()

    with pair.side("base") as m:
        base_states = harvest_many(m, hooks, t, None, 0, None)
        kl_b = kl_per_doc(m(t))
        shares = {"state": [], "delta": []}
        for h in hooks:
            f = ft_states[h].reshape(t.shape[0], t.shape[1], -1)
            d = (f - base_states[h].reshape(f.shape))[:, skip_first:].mean((0, 1))

            def write(act, hook, _f=f):
                return _f.to(act.device, act.dtype)

            def add(act, hook, _d=d):
                out = act.clone()
                out[:, pos] += _d.to(act.device, act.dtype)
                return out
            for name, fn in (("state", write), ("delta", add)):
                with m.hooks([(h, fn)]):
                    kl_p = kl_per_doc(m(t))
                shares[name].append(bootstrap_ci(torch.stack([kl_p, kl_b], 1), n_boot=n_boot, seed=seed,
                                                 stat=lambda v: 1 - v[:, 0].mean() / v[:, 1].mean().clamp_min(1e-12)))
    return StateTransfer(layers, pos.tolist(), shares["state"], shares["delta"], float(kl_b.mean()), int(t.shape[0]))
