"""Edge circuits: a circuit as a set of edges, judged by ablating every edge outside it (MIB, Mueller et al. 2025).

An edge ``(u, r)`` runs from an upstream component ``u`` (the embedding, a head, an MLP) to a reader
``r`` (a head's query, a KV head's key or value, an MLP's input, the logits), named as
:func:`~mechscope.circuits.edges.edge_attribution` names them. Keeping the edge set ``E`` means every
reader sees the reference run's residual stream plus what its kept senders changed:

    in_r = resid_ref(r) + Σ_{u : (u, r) ∈ E} (out_u(run) - out_u(ref))

so with every edge kept ``in_r`` is the model's own input, and with none it is the reference's. The
reference is the corrupted run of the same prompt (``"cf"``, counterfactual) or the mean over the
corrupted prompts per position (``"mean"``). A head's query, key and value are recomputed from its own
``in_r`` through ``ln1`` and its ``W_Q``/``W_K``/``W_V`` (at ``hook_q/k/v``), an MLP's input through
``ln2``, the logits through the final norm. Faithfulness is normalised as for nodes:
``(m(E) - m(∅)) / (m(all) - m(∅))``; the curve runs over the fraction of edges kept, and CPR/CMD are its
areas (:func:`~mechscope.circuits.faithfulness.cpr_cmd`).

Sequential-residual models without a post-attention norm (the per-head outputs then add up to the
attention output exactly); others get a clear error.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..analysis.metrics import describe_metric
from ..analysis.validation import Estimate
from ..core.components import Component, kv_component
from ..core.errors import InputError
from ..core.hookpoints import act_name
from ..core.model import HookedModel
from ..core.progress import bar, stage
from ..core.result import Result
from ..core.types import Metric, checked
from ..datasets import TaskDataset
from ..techniques.inputs import logits_to_keep, prepare_task
from .discovery import no_memo
from .edges import edge_attribution
from .faithfulness import (
    ABLATION_MODES,
    FaithfulnessCurve,
    Lazy,
    check_mode,
    choose_from_curve,
    curve_over_sizes,
    normalised_ci,
    random_verdict,
    rank_p,
)

Edge = tuple[str, str]
#: the fractions of edges MIB evaluates an edge ranking at (its CPR/CMD integrate over them)
EDGE_FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


@checked
def graph_nodes(model: HookedModel) -> tuple[list[str], list[str]]:
    """``(upstream, readers)`` in forward order: ``embed``, ``L{l}H{h}``, ``L{l}.mlp``; ``L{l}H{h}.q``, the KV
    heads' ``.k``/``.v``, ``L{l}.mlp_in`` and ``logits``."""
    c = model.cfg
    up, readers = ["embed"], []
    for l in range(c.n_layers):
        kv = [kv_component(c, l, g) for g in range(c.n_kv_heads)]
        readers += [f"L{l}H{h}.q" for h in range(c.n_heads)] + [f"{k}.k" for k in kv] + [f"{k}.v" for k in kv]
        readers.append(f"L{l}.mlp_in")
        up += [f"L{l}H{h}" for h in range(c.n_heads)] + [f"L{l}.mlp"]
    return up, readers + ["logits"]


@checked
def all_edges(model: HookedModel) -> list[Edge]:
    """Every edge of the model's graph: ``u`` writes before ``r`` reads (a layer's heads feed its own MLP)."""
    up, readers = graph_nodes(model)
    n = model.cfg.n_layers

    def layer(name: str) -> float:
        if name == "logits":
            return n
        c = Component.parse(name)
        return c.layer + (0.5 if c.kind == "mlp" else 0.0)  # an MLP sits after its layer's heads

    return [(u, r) for r in readers for u in up if layer(u) < layer(r)]


def edge_ranking(scores: dict[Edge, float], signed: bool = False) -> list[Edge]:
    """Edges by ``|score|``, largest first (``signed=True``: by the signed score, as MIB's signed option)."""
    return sorted(scores, key=lambda e: -(scores[e] if signed else abs(scores[e])))


class EdgeAblator:
    """``metric`` on ``data.clean`` with every edge outside a kept set ablated (see the module docstring).

    ``full`` and ``empty`` are the metric ``[prompt]`` with every edge kept and with none: in ``"cf"`` mode
    the clean and the corrupted runs exactly (tested). One reference pass is cached; each evaluation is one
    forward pass.
    """

    def __init__(self, model: HookedModel, data: TaskDataset, metric: Metric, mode: str = "cf", seed: int = 0):
        c = model.cfg
        if c.parallel_residual or any(model.weights.norm(l, "attn_post") is not None for l in range(c.n_layers)):
            raise InputError("edge circuits need a sequential residual stream and per-head outputs that add up to the "
                             "attention output (no post-attention norm); use node circuits (find_circuit) here")
        self.model, self.data, self.metric, self.mode, self.seed = model, data, metric, check_mode(mode), seed
        self.up, self.readers = graph_nodes(model)
        self.edges = all_edges(model)
        self.edge_set = set(self.edges)
        self.up_index = {u: i for i, u in enumerate(self.up)}
        self.allowed = {r: [] for r in self.readers}
        for u, r in self.edges:
            self.allowed[r].append(u)
        # in cf mode nothing differs before the first position where a clean and a corrupted token differ, so the
        # differences out_u(run) - out_u(ref) are kept from there on only (exactly zero before it)
        diff = (data.clean != data.corrupted).any(0).nonzero()
        self.start = int(diff[0]) if mode == "cf" and len(diff) else 0
        self.ref = self._reference(data.corrupted)
        with torch.no_grad():  # the model itself (every edge kept), and the embedding every run starts from
            logits, cache = model.run_with_cache(data.clean, names_filter=model.embed_hooks)
        self.emb_delta = sum(cache[e] for e in model.embed_hooks).float()[:, self.start:] - self.ref["out"][0]
        self.full = torch.as_tensor(metric(logits)).float().cpu()
        self.keep = logits_to_keep(model, data.clean, metric)
        self.empty = self.kept([])

    @torch.no_grad()
    def _reference(self, tokens) -> dict:
        """``out [n_up, b, pos, d]`` (every upstream output) and the residual stream each reader starts from."""
        model, n = self.model, self.model.cfg.n_layers
        emb = model.embed_hooks
        names = emb + [act_name(s, l) for l in range(n) for s in ("z", "mlp_out", "resid_pre", "resid_mid")]
        _, cache = model.run_with_cache(tokens, names_filter=names + [act_name("resid_post", n - 1)],
                                        stop_at_layer=n)  # no unembedding: nothing here reads the logits
        outs = [sum(cache[e] for e in emb).float()]
        for l in range(n):
            res = model.weights.head_results(l, cache["z", l]).float()
            outs += [res[:, :, h] for h in range(res.shape[2])] + [cache["mlp_out", l].float()]
        ref = {"out": torch.stack(outs)[:, :, self.start:], "pre": [cache["resid_pre", l].float() for l in range(n)],
               "mid": [cache["resid_mid", l].float() for l in range(n)],
               "post": cache["resid_post", n - 1].float()}
        if self.mode == "mean":  # the mean over the reference prompts, per position
            ref = {k: (v.mean(-3, keepdim=True) if isinstance(v, torch.Tensor) else [x.mean(0, keepdim=True) for x in v])
                   for k, v in ref.items()}
        return ref

    def _masks(self, edges: Sequence[Edge]) -> dict[str, torch.Tensor | None]:
        """``{reader: 0/1 row over upstream}`` for each reader that does not keep every allowed edge (None: none kept)."""
        kept: dict[str, set] = {}
        for u, r in edges:
            kept.setdefault(r, set()).add(u)
        out = {}
        for r in self.readers:
            k = kept.get(r, set())
            if len(k) == len(self.allowed[r]):
                continue  # every edge into r kept: r reads the model's own input
            row = torch.zeros(len(self.up))
            row[[self.up_index[u] for u in k]] = 1.0
            out[r] = row if k else None
        return out

    @torch.no_grad()
    def kept(self, edges: Sequence[Edge]) -> torch.Tensor:
        """The metric ``[prompt]`` with every edge outside ``edges`` ablated."""
        unknown = [e for e in edges if e not in self.edge_set]
        if unknown:
            raise InputError(f"edges {unknown[:3]} are not edges of this model's graph (see all_edges)")
        masks = self._masks(edges)
        with self.model.hooks(_EdgeRun(self, masks).hooks() if masks else []):
            out = torch.as_tensor(self.metric(self.model(self.data.clean, logits_to_keep=self.keep))).float().cpu()
        return self.data.per_pair(out) if out.dim() else out  # a prompt pair's rows give one value

    def faithfulness(self, edges: Sequence[Edge]) -> Estimate:
        """MIB's normalised faithfulness of the edge set with a bootstrap CI over prompts."""
        return normalised_ci(self.kept(edges), self.full, self.empty, self.seed)


class _EdgeRun:
    """The hooks of one forward pass in which each masked reader reads its own residual stream.

    ``D [n_up, b, pos, d]`` fills with ``out_u(run) - out_u(ref)`` in upstream order as the pass goes; the
    masked readers of a hook point get ``resid_ref + M @ D`` in one matrix product (``M [readers, n_up]``).
    """

    def __init__(self, abl: EdgeAblator, masks: dict):
        self.abl, self.masks, self.model, self.ref = abl, masks, abl.model, abl.ref
        self.D = torch.zeros(len(abl.up), *abl.emb_delta.shape, device=abl.emb_delta.device)
        self.D[0] = abl.emb_delta
        self.H = self.model.cfg.n_heads

    def _inputs(self, readers: list[str], resid_ref: torch.Tensor) -> torch.Tensor:
        """``[len(readers), b, pos, d]``: each reader's residual stream (see the class docstring)."""
        rows = torch.stack([self.masks[r] if self.masks[r] is not None else torch.zeros(len(self.abl.up))
                            for r in readers]).to(self.D.device)
        used = int(torch.nonzero(rows.sum(0)).max()) + 1 if rows.any() else 0
        b, _, d = self.D.shape[1:]
        x = resid_ref.expand(b, resid_ref.shape[1], d).unsqueeze(0).repeat(len(readers), 1, 1, 1)
        if used:  # positions before `start` differ nowhere: only the later ones get the kept differences
            x[:, :, self.abl.start:] += (rows[:, :used] @ self.D[:used].flatten(1)).view(len(readers), *self.D.shape[1:])
        return x

    def hooks(self) -> list:
        model, n, c = self.model, self.model.cfg.n_layers, self.model.cfg
        hooks = []
        for l in range(n):
            for s in ("q", "k", "v"):
                names = ([f"L{l}H{h}.q" for h in range(c.n_heads)] if s == "q"
                         else [f"{kv_component(c, l, g)}.{s}" for g in range(c.n_kv_heads)])
                if any(r in self.masks for r in names):
                    hooks.append((act_name(s, l), self._qkv(l, s, names)))
            hooks += [(act_name("z", l), self._record_heads(l)), (act_name("mlp_out", l), self._record_mlp(l))]
            if f"L{l}.mlp_in" in self.masks:
                hooks.append((act_name("normalized", l, "ln2"), self._replace(
                    f"L{l}.mlp_in", self.ref["mid"][l], model.weights.ln2(l))))
        if "logits" in self.masks:
            hooks.append((act_name("ln_final"), self._replace("logits", self.ref["post"], model.weights.ln_final)))
        return hooks

    def _qkv(self, l: int, s: str, names: list[str]):
        W_Q, W_K, W_V, b_Q, b_K, b_V = self.model.weights.qkv(l)
        W, b = {"q": (W_Q, b_Q), "k": (W_K, b_K), "v": (W_V, b_V)}[s]
        ln1 = self.model.weights.ln1(l)
        idx = [i for i, r in enumerate(names) if r in self.masks]

        def put(act, hook):
            x = self._inputs([names[i] for i in idx], self.ref["pre"][l])
            x = ln1.apply(x) if ln1 is not None else x
            act = act.clone()
            for j, i in enumerate(idx):
                act[:, :, i] = (x[j].to(W.device, W.dtype) @ W[i] + b[i]).to(act.dtype)
            return act

        return put

    def _record_heads(self, l: int):
        def rec(z, hook):
            res = self.model.weights.head_results(l, z[:, self.abl.start:]).float().to(self.D.device)
            base = 1 + l * (self.H + 1)
            self.D[base:base + self.H] = res.permute(2, 0, 1, 3) - self.ref["out"][base:base + self.H]
            return z

        return rec

    def _record_mlp(self, l: int):
        def rec(out, hook):
            i = (l + 1) * (self.H + 1)
            self.D[i] = out[:, self.abl.start:].float().to(self.D.device) - self.ref["out"][i]
            return out

        return rec

    def _replace(self, reader: str, resid_ref: torch.Tensor, norm):
        def put(act, hook):
            return norm.apply(self._inputs([reader], resid_ref)[0]).to(act.device, act.dtype)

        return put


def edge_patching_scores(abl: EdgeAblator, edges: Sequence[Edge]) -> dict[Edge, float]:
    """Exact edge patching: ``mean(m(all) - m(all but e))`` for each edge ``e`` (one forward pass each) on
    ``abl``'s prompts: the edge alone takes its reference value (Wang et al. 2022's path patching of one edge)."""
    every = abl.edges
    return {e: float((abl.full - abl.kept([x for x in every if x != e])).mean()) for e in bar(edges, desc="edge patching")}


def _sizes(n: int) -> list[int]:
    return sorted({max(1, round(f * n)) for f in EDGE_FRACTIONS})


@dataclass(repr=False)
class EdgeCircuitResult(Result):
    """An edge circuit chosen from a ranking's faithfulness curve, with its held-out validation."""

    edges: list[tuple[str, str, float]]  # (upstream, reader, score of the ranking that chose it)
    n_edges: int  # edges in the model's graph
    faithfulness: Estimate
    random_faithfulness: list[Estimate]
    ranking: str
    mode: str
    rule: str
    curve: FaithfulnessCurve | None = None
    extra: dict = field(default_factory=dict)

    @property
    def nodes(self) -> list[str]:
        """The components the kept edges touch (upstream components and the components of their readers)."""
        out = {u for u, _, _ in self.edges if u != "embed"}
        for c in (Component.parse(r) for _, r, _ in self.edges if r != "logits"):
            out.add(str(Component(c.layer, c.kind, c.index)))  # the reader's component, without its port
        return sorted(out, key=lambda x: (Component.parse(x).layer, x))

    @property
    def p_value(self) -> float:
        return rank_p(self.faithfulness.value, [e.value for e in self.random_faithfulness])

    def verdict(self) -> str:
        return random_verdict(self.faithfulness.value, [e.value for e in self.random_faithfulness],
                              math.comb(self.n_edges, len(self.edges)))

    def summary(self) -> str:
        x = self.extra
        lines = [f"edge circuit of {len(self.edges)} edges ({len(self.edges) / self.n_edges:.2%} of {self.n_edges}), "
                 f"touching {len(self.nodes)} components",
                 f"  chosen: {self.rule}",
                 f"  ablation: {ABLATION_MODES.get(self.mode, self.mode)}; every edge outside the circuit ablated",
                 f"  metric: {x.get('metric', '?')}",
                 f"  faithfulness on {x.get('n_held_out', '?')} held-out prompts ((circuit - no edge) / (every edge - "
                 f"no edge)): {self.faithfulness}",
                 f"  against random edge circuits: {self.verdict()}",
                 "  strongest kept edges:"]
        lines += [f"    {u:>8} -> {r:<10} {v:+.4f}" for u, r, v in sorted(self.edges, key=lambda e: -abs(e[2]))[:12]]
        if self.curve is not None:
            lines.append(self.curve.summary())
        return "\n".join(lines)

    def _dict_extra(self) -> dict:
        return {"p_value": self.p_value, "nodes": self.nodes}

    def plot(self, path: str | Path = "edge_curve.png") -> Path:
        """The faithfulness curve over the fraction of edges kept (needs ``curve=True``)."""
        if self.curve is None:
            raise InputError("this edge circuit has no curve: run edge_circuit(..., curve=True)")
        return self.curve.plot(path)


def _edge_rankings(model, search, key: dict, ig_steps: int, patching_top: int, signed: bool, memo,
                   search_abl) -> tuple[dict[str, list[Edge]], dict[str, dict[Edge, float]]]:
    """The EAP, EAP-IG and (``patching_top``) exact-patching edge rankings on the search prompts."""
    # EAP and EAP-IG share its two runs
    pair = prepare_task(model, search)
    scores = {"eap": memo("eap", {**key, "ig_steps": 0}, lambda: edge_attribution(model, pair))}
    if ig_steps:
        scores["eap-ig"] = memo("eap", {**key, "ig_steps": ig_steps},
                                lambda: edge_attribution(model, pair, ig_steps=ig_steps))
    rankings = {k: edge_ranking(v, signed) for k, v in scores.items()}
    if patching_top:
        base = rankings["eap-ig" if ig_steps else "eap"]
        top = base[:patching_top]
        stage(f"edge_circuit: exact patching of the {len(top)} edges EAP{'-IG' if ig_steps else ''} ranks highest")
        exact = memo("edge_patching", {**key, "ig_steps": ig_steps, "top": patching_top, "mode": search_abl().mode},
                     lambda: edge_patching_scores(search_abl(), top))
        scores["patching"] = exact
        rankings["patching"] = edge_ranking(exact, signed) + base[len(top):]
    return rankings, scores


@checked
def edge_circuit(model: HookedModel, dataset: TaskDataset, target: float = 0.8, ablation: str = "cf",
                 ig_steps: int = 5, held_out: float = 0.5, n_random: int = 20, seed: int = 0, patching_top: int = 0,
                 curve: bool = True, signed: bool = False, memo: Callable = no_memo) -> EdgeCircuitResult:
    """The smallest top-``k`` edges of a ranking whose faithfulness on the search prompts reaches ``target``,
    validated on the held-out prompts (``held_out`` fraction) against ``n_random`` random edge sets of its size.

    Rankings (on the search prompts): EAP, EAP-IG (``ig_steps``; 0 leaves it out) and, with
    ``patching_top=K``, exact edge patching of the K edges EAP-IG ranks highest (the rest after them in
    EAP-IG's order). The circuit is chosen from the most exact ranking given. ``signed``: rank by the signed
    score instead of its magnitude. ``curve``: the held-out faithfulness of every ranking and of random edge
    sets at MIB's edge fractions (:data:`EDGE_FRACTIONS`), with CPR and CMD. ``memo``: as in
    :func:`~mechscope.circuits.discovery.find_circuit` (the EAP stages are shared with it).
    """
    check_mode(ablation)
    search, test = dataset.split(held_out, seed=seed)
    key = {"held_out": held_out, "seed": seed}
    search_abl = Lazy(lambda: EdgeAblator(model, search, search.metric, ablation, seed))
    stage(f"edge_circuit 1/3: edge scores on {search.n_pairs} search prompts")
    rankings, scores = _edge_rankings(model, search, key, ig_steps, patching_top, signed, memo, search_abl)
    chooser = "patching" if patching_top else ("eap-ig" if ig_steps else "eap")
    n = len(rankings[chooser])
    stage(f"edge_circuit 2/3: the smallest top-k of the {chooser} ranking reaching faithfulness {target}")
    how = {**key, "ig_steps": ig_steps, "patching_top": patching_top, "signed": signed, "ablation": ablation}
    edges, points, rule = memo("edge_choice", {**how, "target": target}, lambda: choose_from_curve(
        search_abl(), rankings[chooser], target, _sizes(n), "edges", chooser))
    stage(f"edge_circuit 3/3: faithfulness on {test.n_pairs} held-out prompts, random edge sets, the curve")
    val = memo("edge_validation", {**how, "edges": [list(e) for e in edges], "n_random": n_random, "curve": curve},
               lambda: _validate_edges(model, test, ablation, seed, edges, rankings, n_random, curve))
    return EdgeCircuitResult([(u, r, scores[chooser].get((u, r), 0.0)) for u, r in edges], n, val["faithfulness"],
                             val["random"], chooser, ablation, rule,
                             val.get("curve"), {"metric": describe_metric(test.metric), "n_search": search.n_pairs,
                                                "n_held_out": test.n_pairs, "search_curve": points})


def _validate_edges(model, test, ablation, seed, edges, rankings, n_random, curve) -> dict:
    abl = EdgeAblator(model, test, test.metric, ablation, seed)
    rng = random.Random(seed)
    out = {"faithfulness": abl.faithfulness(edges),
           "random": [abl.faithfulness(rng.sample(abl.edges, len(edges)))
                      for _ in bar(range(n_random), desc="random edge circuits")]}
    if curve:
        out["curve"] = curve_over_sizes(abl.faithfulness, rankings, abl.edges, _sizes(len(abl.edges)), min(n_random, 3),
                                        seed, "the edges", ABLATION_MODES[ablation].split(":")[0] + " ablation", "edges")
    return out
