"""A zoo of tiny models whose circuits are known, to grade circuit discovery by edge AUROC.

MIB (Mueller et al. 2025) grades methods on InterpBench models trained to contain a known circuit,
by the area under the ROC curve of each method's edge scores against the true edge set. mechscope's
zoo has four attention-only GPT-NeoX models (rotary, LayerNorm), each with clean/corrupted prompts,
a logit-difference metric and its true edges (``(upstream, reader)`` as :func:`edge_attribution`
names them):

- ``copier`` (1 layer, 2 heads; planted by construction and training): head 0's pattern is fixed to
  the previous token, head 1's to the token itself; trained on period-2 sequences, where the next
  token is the one before the current. True: ``embed -> L0H0.v``, ``L0H0 -> logits``.
- ``two-hop`` (2 layers, 2 heads; planted): in both layers head 0 attends to the previous token and
  head 1 to itself; trained on period-3 sequences, where the next token is the one two back, which
  only the path through both previous-token heads can bring (V-composition). True: ``embed ->
  L0H0.v``, ``L0H0 -> L1H0.v``, ``L1H0 -> logits``.
- ``induction`` (2 layers, 2 heads; layer 0 planted, layer 1 trained freely on the toy's periodic
  sequences): layer 0's head 0 attends to the previous token and head 1 to itself, so previous-token
  information reaches layer 1 only through L0H0; the layer-1 heads that become induction heads
  (induction score above 0.5) are I. Prompts ``[BOS] A A[:-1]`` against ``[BOS] B A[:-1]``. True:
  ``embed -> L0H0.v``, ``L0H0 -> I.k``, ``embed -> I.v``, ``I -> logits``. Unscored: the second
  value path (``embed -> L0H1.v``, ``L0H1 -> I.v``: L0H1 copies each token in place, so the value
  may read it there too) and ``embed -> I.k``.
- ``induction-free`` (:func:`~mechscope.circuits.toy.train_attn_only`, nothing planted): the heads
  are named by the detectors alone (previous-token and induction scores above 0.5). That ground
  truth can be incomplete: on seed 0 exact patching finds L0H1 (previous-token score 0.2) carrying
  as much as L0H0, which the detector-named truth counts as false edges.

:func:`edge_patching` is the exact reference: one forward pass per edge, in which only the reader
of that edge sees the sender's corrupted output. :func:`grade` scores patching, EAP and EAP-IG by
edge AUROC over several seeds, with bootstrap CIs over seeds (MIB reports none). These models have
no MLPs, so an attribution graph over them has no features: :func:`mechscope.graphs.zoo.graph_auroc`
grades its embedding-to-logit edges at the token level instead (``source_pos``: the position whose
token the answer is).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..analysis.metrics import auroc, logit_diff
from ..analysis.validation import Estimate, bootstrap_ci
from ..core.components import Component
from ..core.errors import InputError
from ..core.hookpoints import act_name
from ..core.model import HookedModel, lm_loss
from ..core.progress import bar
from ..core.result import Result
from ..core.types import checked
from ..datasets import TaskDataset
from .discovery import edge_attribution
from .heads import detect_heads
from .toy import BOS, FIRST_TOKEN, attn_only_neox, periodic_sequences, toy_tokenizer, train_attn_only

Edge = tuple[str, str]


@dataclass
class PlantedModel:
    """A model with its task (``clean``/``corrupted`` ``[n, pos]``, ``metric(logits) -> [n]``) and its true edges;
    edges in ``unscored`` count neither way. ``hooks`` stay attached to ``model`` (its planted patterns)."""

    name: str
    model: HookedModel
    clean: torch.Tensor
    corrupted: torch.Tensor
    metric: Callable[[torch.Tensor], torch.Tensor]
    true_edges: set[Edge]
    unscored: set[Edge] = field(default_factory=set)
    source_pos: int | None = None  # the position whose token the answer is (for token-level grading)

    def task(self) -> TaskDataset:
        """The prompts as a :class:`~mechscope.datasets.TaskDataset` (answers and wrong answers per prompt, the
        last position's logit difference), for :func:`~mechscope.circuits.discovery.find_circuit` and investigate."""
        kw = self.metric.keywords
        texts = [[" ".join(str(int(t)) for t in row) for row in x] for x in (self.clean, self.corrupted)]
        return TaskDataset(self.name, self.clean, self.corrupted, kw["correct"], kw["incorrect"], *texts)


# ---------------------------------------------------------------------------------------------- the models
def _fixed_patterns(kinds: dict[int, list[str]]) -> list[tuple[str, Callable]]:
    """Hooks fixing head patterns: ``"prev"`` (each query on the previous token; the first on itself),
    ``"self"`` (each query on itself), ``"free"`` (left as computed)."""
    def hook_for(layer: int) -> Callable:
        def fix(act: torch.Tensor, hook) -> torch.Tensor:
            n, q = act.shape[-1], act.shape[-2]  # fewer queries than keys: the last q (a reused prefix's suffix)
            eye = torch.eye(n, dtype=act.dtype, device=act.device)
            prev = torch.roll(eye, -1, dims=1)
            prev[0] = eye[0]
            prev, eye = torch.tril(prev)[n - q:], eye[n - q:]
            out = act.clone()
            for h, kind in enumerate(kinds[layer]):
                if kind != "free":
                    out[:, h] = prev if kind == "prev" else eye
            return out

        return fix

    return [(act_name("pattern", layer), hook_for(layer)) for layer in kinds]


def _periodic(batch: int, n_ctx: int, d_vocab: int, period: int, g: torch.Generator) -> torch.Tensor:
    """``[batch, n_ctx]``: ``[BOS] s s s ...`` with a random segment ``s`` of ``period`` tokens (all different)."""
    seg = torch.stack([torch.randperm(d_vocab - FIRST_TOKEN, generator=g)[:period] + FIRST_TOKEN for _ in range(batch)])
    idx = torch.arange(n_ctx - 1) % period
    return torch.cat([torch.full((batch, 1), BOS), seg[:, idx]], 1)


def _corrupt_at(tokens: torch.Tensor, pos: int, d_vocab: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``tokens`` with the token at ``pos`` replaced by another one absent from its row; and the new tokens."""
    out = tokens.clone()
    new = torch.empty(tokens.shape[0], dtype=torch.long)
    for b in range(tokens.shape[0]):
        while True:
            t = int(torch.randint(FIRST_TOKEN, d_vocab, (1,), generator=g))
            if t not in set(tokens[b].tolist()):
                break
        new[b] = t
        out[b, pos] = t
    return out, new


def _logit_diff(answer: torch.Tensor, wrong: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The last position's ``logit[answer] - logit[wrong]`` per prompt (:func:`~mechscope.analysis.metrics.logit_diff`)."""
    return functools.partial(logit_diff, correct=answer, incorrect=wrong)


def _train(model: HookedModel, data: Callable[[torch.Generator], torch.Tensor], steps: int, lr: float,
           seed: int) -> None:
    """AdamW on the next-token loss of ``data(generator)`` batches, with the model's hooks (its planted patterns)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.hf.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    model.hf.train()
    for _ in range(steps):
        x = data(g)
        loss = lm_loss(model(x), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.hf.eval()


def _induction_prompts(n: int, half: int, d_vocab: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    """``[BOS] A A[:-1]`` (clean: the answer is ``A[-1]``) and ``[BOS] B A[:-1]`` (corrupted: ``B[-1]``)."""
    first = torch.randint(FIRST_TOKEN, d_vocab, (n, half), generator=g)
    other = torch.randint(FIRST_TOKEN, d_vocab, (n, half), generator=g)
    bos = torch.full((n, 1), BOS)
    return (torch.cat([bos, first, first[:, :-1]], 1), torch.cat([bos, other, first[:, :-1]], 1), first[:, -1],
            other[:, -1])


def planted(name: str, seed: int = 0, steps: int | None = None, n_prompts: int = 16) -> PlantedModel:
    """``copier``, ``two-hop`` or ``induction`` with planted patterns (see the module docstring), trained with AdamW."""
    if name not in ("copier", "two-hop", "induction"):
        raise InputError(f"unknown planted model {name!r}; the zoo has 'copier', 'two-hop', 'induction' and "
                         "'induction-free'")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1000)
    if name == "induction":  # layer 0 planted (previous token, self), layer 1 free to learn induction
        V, n_ctx = 64, 48
        model = HookedModel(attn_only_neox(2, 2, 64, V, n_ctx), toy_tokenizer(V), name="zoo-induction")
        for hook_name, fn in _fixed_patterns({0: ["prev", "self"]}):
            model.add_hook(hook_name, fn)
        _train(model, lambda gen: periodic_sequences(64, n_ctx, V, (4, 23), gen), steps or 600, 1e-3, seed)
        clean, corrupted, answer, wrong = _induction_prompts(n_prompts, 10, V, g)
        ind = _induction_heads(model)
        true = {("embed", "L0H0.v")} | {("L0H0", f"L1H{h}.k") for h in ind}
        true |= {("embed", f"L1H{h}.v") for h in ind} | {(f"L1H{h}", "logits") for h in ind}
        unscored = ({("embed", "L0H1.v")} | {("L0H1", f"L1H{h}.v") for h in ind}
                    | {("embed", f"L1H{h}.k") for h in ind})
        return PlantedModel(name, model, clean, corrupted, _logit_diff(answer, wrong), true, unscored, source_pos=10)
    layers = {"copier": 1, "two-hop": 2}[name]
    period, V, n_ctx = layers + 1, 32, 16  # the next token is the one `layers` positions back
    model = HookedModel(attn_only_neox(layers, 2, 32, V, n_ctx), toy_tokenizer(V), name=f"zoo-{name}")
    for hook_name, fn in _fixed_patterns({layer: ["prev", "self"] for layer in range(layers)}):
        model.add_hook(hook_name, fn)
    _train(model, lambda gen: _periodic(64, n_ctx, V, period, gen), steps or 300, 3e-3, seed)
    clean = _periodic(n_prompts, n_ctx, V, period, g)
    answer = clean[:, -period]
    corrupted, wrong = _corrupt_at(clean, n_ctx - period, V, g)
    true = {("embed", "L0H0.v"), (f"L{layers - 1}H0", "logits")}
    if layers == 2:
        true.add(("L0H0", "L1H0.v"))
    return PlantedModel(name, model, clean, corrupted, _logit_diff(answer, wrong), true, source_pos=n_ctx - period)


def _induction_heads(model: HookedModel) -> list[int]:
    """The layer-1 heads whose induction score exceeds 0.5 (at least one, or an error)."""
    scores = detect_heads(model)["induction"].scores
    heads = [h for h in range(model.cfg.n_heads) if float(scores[1, h]) > 0.5]
    if not heads:
        raise InputError(f"no induction head formed (layer-1 scores {scores[1].tolist()}); train longer")
    return heads


def induction_free(seed: int = 0, steps: int = 800, n_prompts: int = 16) -> PlantedModel:
    """The induction toy of :func:`train_attn_only`, trained freely, with its detector-named circuit (previous-token
    score > 0.5 in layer 0, induction score > 0.5 in layer 1): a ground truth that may be incomplete."""
    model = train_attn_only(seed=seed, steps=steps).model
    g = torch.Generator().manual_seed(seed + 1000)
    clean, corrupted, answer, wrong = _induction_prompts(n_prompts, 10, model.cfg.d_vocab, g)
    prev = [h for h in range(model.cfg.n_heads) if float(detect_heads(model)["previous-token"].scores[0, h]) > 0.5]
    ind = _induction_heads(model)
    if not prev:
        raise InputError(f"seed {seed}: the toy formed no previous-token head; train longer")
    true, unscored = set(), set()
    for p in prev:
        true |= {("embed", f"L0H{p}.v")} | {(f"L0H{p}", f"L1H{i}.k") for i in ind}
        unscored |= {("embed", f"L0H{p}.q"), ("embed", f"L0H{p}.k")}
    true |= {("embed", f"L1H{i}.v") for i in ind} | {(f"L1H{i}", "logits") for i in ind}
    unscored |= {("embed", f"L1H{i}.k") for i in ind}
    return PlantedModel("induction-free", model, clean, corrupted, _logit_diff(answer, wrong), true, unscored,
                        source_pos=10)


# ---------------------------------------------------------------------------------------------- exact edge patching
@checked
@torch.no_grad()
def edge_patching(model: HookedModel, clean: torch.Tensor, corrupted: torch.Tensor,
                  metric: Callable[[torch.Tensor], torch.Tensor], edges: list[Edge],
                  progress: bool = False) -> dict[Edge, float]:
    """For each edge ``(u, v)``: ``mean(metric(clean) - metric(patched))`` where only reader ``v`` sees ``u``'s
    corrupted output (``in_v = in_v(clean) + out_u(corrupted) - out_u(clean)``; everything downstream of ``v``
    recomputes). Sequential-residual models whose attention reads ``ln1``; one forward pass per edge."""
    c = model.cfg
    if c.parallel_residual:
        raise InputError("edge_patching supports sequential-residual models only (the zoo's)")
    names = (["hook_embed"] + [act_name("result", l) for l in range(c.n_layers)]
             + [act_name("mlp_out", l) for l in range(c.n_layers)]
             + [act_name("resid_pre", l) for l in range(c.n_layers)]
             + [act_name("resid_mid", l) for l in range(c.n_layers)] + [act_name("resid_post", c.n_layers - 1)])
    _, cc = model.run_with_cache(clean, names_filter=lambda n: n in names)
    _, cx = model.run_with_cache(corrupted, names_filter=lambda n: n in names)
    base = metric(model(clean)).float()

    def out(cache, name: str) -> torch.Tensor:
        u = Component.parse(name)
        if u.kind == "head":
            return cache[act_name("result", u.layer)][:, :, u.index]
        return cache[u.hook]  # the embedding, or an MLP's output

    def hook_for(name: str, delta: torch.Tensor) -> tuple[str, Callable]:
        # (each replacement is computed here, before the run: a module called inside its own hook recurses)
        v = Component.parse(name)
        layer = v.layer
        if v.kind == "logits":
            final = model.ln_final(cc[act_name("resid_post", c.n_layers - 1)] + delta)
            return act_name("ln_final"), lambda act, hook: final.to(act.dtype)
        if v.kind == "mlp":  # the MLP's input, L.mlp_in
            mlp = model.mlp_module(layer)(model.ln2(layer)(cc[act_name("resid_mid", layer)] + delta))
            mlp = mlp[0] if isinstance(mlp, tuple) else mlp
            return act_name("mlp_out", layer), lambda act, hook: mlp.to(act.dtype)
        h, which = v.index, v.port
        W_Q, W_K, W_V, b_Q, b_K, b_V = model.weights.qkv(layer)
        W, b = {"q": (W_Q, b_Q), "k": (W_K, b_K), "v": (W_V, b_V)}[which]
        x = model.ln1(layer)(cc[act_name("resid_pre", layer)] + delta)
        new = x @ W[h] + b[h]

        def put(act, hook):
            act = act.clone()
            act[:, :, h] = new.to(act.dtype)
            return act

        return act_name(which, layer), put

    scores = {}
    for u, v in bar(edges, desc="edge patching") if progress else edges:
        name, fn = hook_for(v, out(cx, u) - out(cc, u))
        scores[(u, v)] = float((base - metric(model.run_with_hooks(clean, fwd_hooks=[(name, fn)])).float()).mean())
    return scores


# ---------------------------------------------------------------------------------------------- grading
def edge_auroc(scores: dict[Edge, float], true: set[Edge], unscored: set[Edge] = frozenset()) -> float:
    """The area under the ROC curve of ``|score|`` for telling true edges from the rest (ties count half):
    the chance that a random true edge outscores a random false one."""
    pos = [abs(v) for e, v in scores.items() if e in true]
    neg = [abs(v) for e, v in scores.items() if e not in true and e not in unscored]
    missing = true - set(scores)
    if missing:
        raise InputError(f"the scores have no entry for the true edges {sorted(missing)}")
    if not pos or not neg:
        raise InputError("edge AUROC needs at least one true and one false edge")
    return auroc(pos, neg)


@dataclass(repr=False)
class ZooGrades(Result):
    """Edge AUROC per zoo model and method: per seed, and the mean with a bootstrap CI over seeds."""

    seeds: list[int]
    per_seed: dict[str, dict[str, list[float]]]  # model -> method -> AUROC per seed
    n_edges: dict[str, int]
    n_true: dict[str, int]

    def estimate(self, model: str, method: str) -> Estimate:
        return bootstrap_ci(torch.tensor(self.per_seed[model][method]))

    def summary(self) -> str:
        methods = list(next(iter(self.per_seed.values())))
        lines = [f"edge AUROC against planted circuits, {len(self.seeds)} seeds (mean [95% bootstrap CI over seeds])",
                 f"  {'model':15s} {'edges':>6s} {'true':>5s} " + "".join(f"{m:>22s}" for m in methods)]
        for name in self.per_seed:
            cells = "".join(f"{e.value:9.3f} [{e.low:.2f},{e.high:.2f}]" + " " * 2
                            for e in (self.estimate(name, m) for m in methods))
            lines.append(f"  {name:15s} {self.n_edges[name]:6d} {self.n_true[name]:5d} {cells}")
        return "\n".join(lines)

    def _dict_extra(self) -> dict:
        return {"mean": {n: {m: self.estimate(n, m).value for m in by} for n, by in self.per_seed.items()}}


def grade(models: list[str] | None = None, seeds: list[int] | None = None, ig_steps: int = 5,
          progress: bool = True, extra: dict[str, Callable[[PlantedModel], float]] | None = None,
          **train) -> ZooGrades:
    """Edge AUROC of activation (edge) patching, EAP and EAP-IG on each zoo model, for each seed; ``extra``:
    more methods, each a function of the trained :class:`PlantedModel` returning its AUROC (e.g.
    :func:`mechscope.graphs.zoo.graph_auroc`)."""
    from ..core.progress import quiet

    models = models or ["copier", "two-hop", "induction", "induction-free"]
    seeds = list(seeds if seeds is not None else range(3))
    per: dict[str, dict[str, list[float]]] = {}
    n_edges, n_true = {}, {}
    for name in models:
        per[name] = {"patching": [], "eap": [], "eap-ig": [], **{k: [] for k in extra or {}}}
        for seed in bar(seeds, desc=f"zoo: {name}") if progress else seeds:
            with quiet(not progress):
                pm = induction_free(seed, **train) if name == "induction-free" else planted(name, seed, **train)
                eap = edge_attribution(pm.model, pm.clean, pm.corrupted, pm.metric)
                eap_ig = edge_attribution(pm.model, pm.clean, pm.corrupted, pm.metric, ig_steps=ig_steps)
                exact = edge_patching(pm.model, pm.clean, pm.corrupted, pm.metric, list(eap))
            for method, sc in (("patching", exact), ("eap", eap), ("eap-ig", eap_ig)):
                per[name][method].append(edge_auroc(sc, pm.true_edges, pm.unscored))
            for method, fn in (extra or {}).items():
                with quiet(not progress):
                    per[name][method].append(fn(pm))
            n_edges[name], n_true[name] = len(eap) - len(pm.unscored & set(eap)), len(pm.true_edges)
    return ZooGrades(seeds, per, n_edges, n_true)
