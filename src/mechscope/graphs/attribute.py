"""Attribution graphs: the direct linear effects between the nodes of a replacement model.

Nodes (Ameisen et al. 2025, "Circuit Tracing", §3): the token embeddings, the active transcoder
features ``(layer, pos, feature)``, one error node per ``(layer, pos)``, and the target logits.
The edge from source ``s`` to target ``t`` is

    A[t, s] = value(s) · ∂ pre(t) / ∂ write(s)     (in the frozen replacement model)

where ``value(s)`` is the source's write into the residual stream (``a_f W_dec[f]``, the error
vector, the embedding) and ``pre(t)`` a feature's pre-activation or a demeaned logit. Because
features and errors are held at their clean values, the gradient runs only along direct paths:
the residual stream, attention's OV circuit (patterns frozen) and skip connections. A target's
value is the sum of its incoming edges plus a constant (the biases).

Rows are computed with one forward pass of the replacement model and one batched backward pass
per ``batch_size`` targets (``torch.autograd.grad(..., is_grads_batched=True)``), never one
perturbation per edge. Feature rows are computed in order of their estimated influence on the
logits, up to ``max_feature_nodes``; the features left out are counted, with their influence.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..core import HookedModel, InputError, work
from ..core.errors import InputTypeError
from ..core.progress import bar
from ..core.types import checked
from ..sae.clt import CrossLayerTranscoder
from ..sae.model import SAE
from ..sae.transcoders import TranscoderSet
from .graph import KIND_NAMES, AttributionGraph, sweep_influence
from .nodes import EMBEDDING, ERROR, FEATURE, node_label
from .replacement import EMBED, ReplacementModel
from .validate import edge_certificate


@dataclass
class Sources:
    """Every source node of one prompt: active features ``feats [N, 3]`` (layer, pos, feature) with their
    activations ``acts [N]``, then ``n_layers x n_pos`` errors, then ``n_pos`` embeddings."""

    feats: torch.Tensor
    acts: torch.Tensor
    n_layers: int
    n_pos: int

    @property
    def n_feats(self) -> int:
        return self.feats.shape[0]

    @property
    def n(self) -> int:
        return self.n_feats + (self.n_layers + 1) * self.n_pos

    def error(self, layer: int, pos: int) -> int:
        return self.n_feats + layer * self.n_pos + pos

    def embed(self, pos: int) -> int:
        return self.n_feats + self.n_layers * self.n_pos + pos


def active_features(rm: ReplacementModel) -> Sources:
    """The replacement model's active features, ordered by (layer, pos, feature) (the layer a feature reads)."""
    feats, acts = [], []
    for st in rm.layers:
        if st.acts is None:
            continue
        pos, f = st.acts.nonzero(as_tuple=True)
        feats.append(torch.stack([torch.full_like(pos, st.layer), pos, f], 1).cpu())
        acts.append(st.acts[pos, f].cpu())
    if not feats:
        return Sources(torch.zeros(0, 3, dtype=torch.long), torch.zeros(0), rm.model.cfg.n_layers, rm.n_pos)
    return Sources(torch.cat(feats), torch.cat(acts).float(), rm.model.cfg.n_layers, rm.n_pos)


@checked
def graph_tokens(model: HookedModel, prompt: str | torch.Tensor, prepend_bos: bool = True) -> tuple[torch.Tensor, str | None]:
    """``[1, pos]`` tokens of ``prompt`` (text, or tokens ``[pos]`` / ``[1, pos]``) and the text of the token put in
    front (None when none was). With ``prepend_bos``, a prompt whose first token is not a special token gets the
    tokenizer's BOS in front (else its pad, EOS or first special token: circuit-tracer's ``ensure_tokenized``
    order), because the first position is the attention sink, whose features and errors a graph leaves out."""
    tokens = model.to_tokens(prompt) if isinstance(prompt, str) else torch.as_tensor(prompt)
    tokens = tokens[None] if tokens.dim() == 1 else tokens
    if tokens.dim() != 2 or tokens.shape[0] != 1 or tokens.shape[1] == 0:
        raise InputError(f"an attribution graph is built for one prompt: tokens must be [1, pos] with pos >= 1, got "
                         f"{tuple(tokens.shape)}")
    tok = model.tokenizer
    special = list(getattr(tok, "all_special_ids", None) or [])
    if not prepend_bos or tok is None or not special or int(tokens[0, 0]) in special:
        return tokens, None
    candidates = [getattr(tok, f"{n}_token_id", None) for n in ("bos", "pad", "eos")] + special
    bos = next(int(c) for c in candidates if c is not None)
    return torch.cat([torch.tensor([[bos]], dtype=tokens.dtype, device=tokens.device), tokens], 1), tok.decode([bos])


def fit_batch(batch_size: int, rm: ReplacementModel, src: Sources, budget: float) -> int:
    """The rows per backward pass within ``budget`` bytes: each row holds a gradient ``[pos, d_model]`` at every write
    site (about four copies while the batched backward runs) and one dense row of edges."""
    per_row = rm.n_pos * rm.model.cfg.d_model * (rm.model.cfg.n_layers + 1) * 4 * 4 + src.n * 4
    return max(1, min(batch_size, int(budget // per_row)))


#: a backward pass's cost apart from its rows, in token-layers (measured on SmolLM2-135M, CPU): about 1,000 a call
#: and 50 a block it runs through, against one per token a row sends through a block
CALL_COST, BLOCK_COST = 1000, 50


def depth_groups(depths: list[int], n_pos: int) -> list[list[int]]:
    """The rows (their indices) split into groups of neighbouring depth, one backward pass each: the split whose
    estimated cost, ``sum over groups of CALL_COST + max depth x (BLOCK_COST + rows x n_pos)`` token-layers, is
    least (exact over the sorted depths). One group when splitting does not pay."""
    levels = sorted(set(depths))
    count = [sum(1 for d in depths if d == lv) for lv in levels]
    best, cut = [0.0] * (len(levels) + 1), [0] * (len(levels) + 1)  # best[j]: levels[:j] split; cut: its last group
    for j in range(1, len(levels) + 1):
        rows, best[j] = 0, float("inf")
        for i in range(j - 1, -1, -1):  # the last group holds levels[i:j]
            rows += count[i]
            cost = best[i] + CALL_COST + levels[j - 1] * (BLOCK_COST + rows * n_pos)
            if cost < best[j]:
                best[j], cut[j] = cost, i
    bounds, j = [], len(levels)
    while j:
        bounds.append((levels[cut[j]], levels[j - 1]))
        j = cut[j]
    return [[i for i, d in enumerate(depths) if lo <= d <= hi] for lo, hi in reversed(bounds)]


@checked
def check_arguments(model: object, transcoders: object, prompt: object) -> None:
    """Clear errors for arguments of the wrong type (swapped ones, say) before any work: ``model`` a HookedModel,
    ``transcoders`` a replacement, ``prompt`` text or token ids."""
    if not (hasattr(model, "run_with_cache") and hasattr(model, "cfg")):
        raise InputTypeError(f"the model must be a mechscope HookedModel (mechscope.load), got {type(model).__name__}")
    if not isinstance(prompt, (str, torch.Tensor, list)):
        raise InputTypeError(f"the prompt must be text or token ids, got {type(prompt).__name__}"
                             + (" (are the transcoders and the prompt swapped? the order is (model, transcoders, "
                                "prompt))" if isinstance(transcoders, str) else ""))
    if isinstance(transcoders, (str, torch.Tensor)):
        raise InputTypeError(f"transcoders must be a TranscoderSet, a list of transcoders or a CrossLayerTranscoder, "
                             f"got {type(transcoders).__name__} (the order is (model, transcoders, prompt))")


def choose_logits(logits: torch.Tensor, target_logits: list[int] | None, prob_mass: float,
                  max_logits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The target tokens and their probabilities at the last position: ``target_logits``, or the most
    likely tokens until they hold ``prob_mass`` of the probability (at most ``max_logits``)."""
    probs = torch.softmax(logits[0, -1].float(), -1).cpu()
    if target_logits is not None:
        toks = torch.as_tensor(list(target_logits), dtype=torch.long)
        bad = [int(t) for t in toks if not 0 <= int(t) < probs.numel()]
        if bad or toks.numel() == 0:
            raise InputError(f"target_logits must be 1..n token ids in [0, {probs.numel()}); got {list(target_logits)}")
        return toks, probs[toks]
    if not 0 < prob_mass <= 1 or max_logits < 1:
        raise InputError(f"prob_mass must be in (0, 1] and max_logits >= 1; got {prob_mass}, {max_logits}")
    p, idx = probs.sort(descending=True)
    n = int((p.cumsum(0) < prob_mass).sum()) + 1
    n = min(n, max_logits)
    return idx[:n], p[:n]


class RowEngine:
    """One forward pass of the replacement model, then batched backward passes: rows of the adjacency."""

    def __init__(self, rm: ReplacementModel, sources: Sources, capture: tuple[str, ...] = ()):
        self.rm, self.src = rm, sources
        d = rm.model.cfg.d_model
        self.sites = [EMBED] + [st.layer for st in rm.layers]
        self.z = {s: torch.zeros(1, rm.n_pos, d, dtype=rm.model.dtype, device=rm.model.device, requires_grad=True)
                  for s in self.sites}
        with torch.enable_grad():
            self.run, _ = rm.run(1, add=self.z, capture=capture)
        self._feature_groups = self._group_sources()

    def _group_sources(self) -> list[tuple[list[int], int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per (layer, position): the layers its features write to, the source indices of its features, their
        activations, and their rows in that layer's table of decoder writes ``W_dec[f]`` (``[unique features,
        targets x d_model]``: a cross-layer transcoder's feature writes into every later MLP output, so its edge sums
        over them). Each active feature's decoder is held (and, read lazily, read) once however many positions it
        fires at: long prompts repeat features, and a CLT's decoder rows are ``targets`` times an SAE's."""
        feats, out, rep = self.src.feats, [], self.rm.transcoders
        self._tables = {layer: table for layer, (_, table) in self.rm.tables.items()}
        key = feats[:, 0] * self.rm.n_pos + feats[:, 1]  # non-decreasing: features come in (layer, pos) order
        _, counts = torch.unique_consecutive(key, return_counts=True)
        for idx in torch.arange(len(key)).split(counts.tolist()):
            layer, pos = int(feats[idx[0], 0]), int(feats[idx[0], 1])
            rows = torch.searchsorted(self.rm.tables[layer][0], feats[idx, 2].contiguous())
            out.append((rep.targets(layer), pos, idx, self.src.acts[idx], layer, rows))
        return out

    def depth(self, target: tuple[str, int, int, int]) -> int:
        """The blocks a target's gradient runs back through: a feature read in block l needs blocks 0..l."""
        return self.rm.model.cfg.n_layers if target[0] == "logit" else target[1] + 1

    def rows(self, targets: list[tuple[str, int, int, int]]) -> torch.Tensor:
        """``[len(targets), n_sources]`` edge rows; a target is ``("feature", layer, pos, feature)`` or
        ``("logit", -1, -1, token)``. The targets run as backward passes of rows of similar depth
        (:func:`depth_groups`): a batched pass runs every row from its deepest target down."""
        groups = depth_groups([self.depth(t) for t in targets], self.rm.n_pos)
        if len(groups) == 1:
            return self._rows(targets)
        out = torch.empty(len(targets), self.src.n)
        for g in groups:
            out[g] = self._rows([targets[i] for i in g])
        return out

    def _rows(self, targets: list[tuple[str, int, int, int]]) -> torch.Tensor:
        """:meth:`rows` in one batched backward pass."""
        B, rm = len(targets), self.rm
        outputs, grads = [], []
        by_layer: dict[int, list[int]] = {}
        for b, (kind, layer, _, _) in enumerate(targets):
            if kind == "feature":
                by_layer.setdefault(layer, []).append(b)
        for layer, bs in by_layer.items():
            x = self.run.x[layer]
            G = torch.zeros(B, *x.shape, dtype=x.dtype, device=x.device)
            feats = torch.tensor([targets[b][3] for b in bs])
            dirs = rm.transcoders.read_directions(layer, feats).detach().to(x.device, x.dtype)
            G[torch.tensor(bs), 0, torch.tensor([targets[b][2] for b in bs])] = dirs
            outputs.append(x)
            grads.append(G)
        logit_bs = [b for b, t in enumerate(targets) if t[0] == "logit"]
        depth = [self.depth(t) for t in targets]  # the batched pass runs every row from the deepest target down
        work.add_backward(B * rm.n_pos * max(depth), rm.n_pos * sum(depth))
        if logit_bs:
            f = self.run.final
            G = torch.zeros(B, *f.shape, dtype=f.dtype, device=f.device)
            toks = torch.tensor([targets[b][3] for b in logit_bs])
            G[torch.tensor(logit_bs), 0, -1] = rm.logit_directions(toks).to(f.dtype)
            outputs.append(f)
            grads.append(G)
        return self.backward(outputs, grads)

    def backward(self, outputs: list[torch.Tensor], grads: list[torch.Tensor]) -> torch.Tensor:
        """``[B, n_sources]``: row ``b`` holds each source's value dotted with the gradient of
        ``sum_i <grads[i][b], outputs[i]>`` at the source's write site (one batched backward pass)."""
        B = grads[0].shape[0]
        gs = torch.autograd.grad(outputs, [self.z[s] for s in self.sites], grads, retain_graph=True,
                                 allow_unused=True, is_grads_batched=True)
        g = {s: (torch.zeros(B, self.rm.n_pos, self.z[s].shape[-1]) if v is None else v[:, 0].float().cpu())
             for s, v in zip(self.sites, gs)}
        return self._edges(g)

    def source_name(self, i: int, token_strs: list[str]) -> str:
        """The name of source index ``i`` (see :func:`~mechscope.graphs.nodes.node_label`)."""
        src = self.src
        if i < src.n_feats:
            layer, pos, f = src.feats[i].tolist()
            return node_label(FEATURE, layer, pos, f)
        if i < src.embed(0):
            layer, pos = divmod(i - src.n_feats, src.n_pos)
            return node_label(ERROR, layer, pos)
        pos = i - src.embed(0)
        return node_label(EMBEDDING, -1, pos, token_strs[pos])

    @torch.no_grad()
    def _edges(self, g: dict) -> torch.Tensor:
        """Source values dotted with the gradients at their write sites."""
        src, rm = self.src, self.rm
        B = next(iter(g.values())).shape[0]
        out = torch.zeros(B, src.n)
        for targets, pos, idx, acts, layer, rows in self._feature_groups:
            grad = g[targets[0]][:, pos] if len(targets) == 1 else torch.cat([g[t][:, pos] for t in targets], -1)
            out[:, idx] = (grad @ self._tables[layer][rows].T) * acts
        n = src.n_pos
        for st in rm.layers:
            out[:, src.error(st.layer, 0):src.error(st.layer, 0) + n] = (g[st.layer] * st.error.float().cpu()).sum(-1)
        out[:, src.embed(0):src.embed(0) + n] = (g[EMBED] * rm.embed.float().cpu()).sum(-1)
        return out


class SparseRows:
    """Rows of the adjacency kept as sparse entries as they are computed: per batch and target layer, int32
    ``(rows, sources)`` and float32 weights (12 bytes an entry, stored once; ``Â`` is derived when needed from
    each row's total magnitude). Row ``i < n_logits`` is logit ``i``'s; the others are features', ``row_src``
    saying which source each is."""

    def __init__(self, sources: "Sources", tolerance: float):
        self.src, self.tolerance = sources, tolerance
        # layer -> [(rows, sources, weights)]
        self.by_layer: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
        self.row_src: list[int] = []
        self.row_total: list[torch.Tensor] = []  # per batch: each row's kept |weight|, summed
        self.dropped = 0.0  # |weight| dropped by the tolerance, summed
        self.total = 0.0

    @property
    def n_rows(self) -> int:
        return len(self.row_src)

    def add(self, dense: torch.Tensor, sources: list[int]) -> None:
        """Append ``dense [B, n_src]`` rows (``sources[b]``: the source index of row ``b``'s target, -1 for a logit)."""
        mag = dense.abs()
        self.total += float(mag.sum())
        keep = mag > 0 if self.tolerance <= 0 else mag > self.tolerance * mag.amax(1, keepdim=True)
        self.dropped += float(mag[~keep].sum())
        b, c = keep.nonzero(as_tuple=True)
        v = dense[b, c]
        self.row_total.append(torch.zeros(len(sources)).index_add_(0, b, v.abs()))
        src = torch.tensor(sources)
        layer = torch.full((len(sources),), self.src.n_layers)  # logits above every layer
        is_feat = src >= 0
        layer[is_feat] = self.src.feats[src[is_feat], 0]
        entry_layer = layer[b]
        for lay in entry_layer.unique().tolist():
            m = entry_layer == lay
            self.by_layer.setdefault(int(lay), []).append(((b[m] + self.n_rows).int(), c[m].int(), v[m]))
        self.row_src += sources

    def influence(self, weights: torch.Tensor) -> torch.Tensor:
        """``[n_src]``: each source's influence on the logits through the rows so far (``weights [n_rows]``: the
        logit rows' probabilities), ``sum_k w Â^k`` (Ameisen et al. 2025, §3.4), in one sweep from the top
        layer down (:func:`mechscope.graphs.graph.sweep_influence`)."""
        total = torch.cat(self.row_total).clamp_min(1e-30)
        groups = ((r, c, v.abs() / total[r]) for lay in sorted(self.by_layer, reverse=True)
                  for r, c, v in self.by_layer[lay])
        return sweep_influence(groups, weights, torch.tensor(self.row_src), self.src.n)

    def take_edges(self, row_node: torch.Tensor, col: torch.Tensor,
                   n_nodes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every entry whose source has a node (``col[source] >= 0``) as ``(targets, sources, weights)`` (int32, int32,
        float32) over node indices, sorted by target then source, emptying this store as it goes (a counting sort:
        a row's entries are contiguous in one chunk, in source order; at most one chunk is ever copied twice)."""
        chunks = [ch for lay in sorted(self.by_layer) for ch in self.by_layer[lay]]
        self.by_layer = {}
        counts = torch.zeros(n_nodes, dtype=torch.long)
        for r, c, _ in chunks:
            counts.index_add_(0, row_node[r], (col[c] >= 0).long())
        start = counts.cumsum(0) - counts
        nnz = int(counts.sum())
        tgt, src, val = torch.empty(nnz, dtype=torch.int32), torch.empty(nnz, dtype=torch.int32), torch.empty(nnz)
        while chunks:
            r, c, v = chunks.pop()
            keep = col[c] >= 0
            node, s = row_node[r[keep]], col[c[keep]]
            _, inv, n = torch.unique_consecutive(node, return_inverse=True, return_counts=True)
            dest = start[node] + torch.arange(len(node)) - (n.cumsum(0) - n)[inv]
            tgt[dest], src[dest], val[dest] = node.int(), s.int(), v[keep]
        return tgt, src, val


@checked
def attribution_graph(model: HookedModel, transcoders: "TranscoderSet | list[SAE] | CrossLayerTranscoder",
                      prompt: str | torch.Tensor,
                      target_logits: list[int] | None = None, max_feature_nodes: int = 7500,
                      batch_size: int = 128, prob_mass: float = 0.95, max_logits: int = 10,
                      skip_first: int | None = None, certify: int = 32, update_every: int = 4,
                      edge_tolerance: float = 0.0, prepend_bos: bool = True, sink_errors: bool = False,
                      progress: bool = True, batch_bytes: float = 2 * 2**30) -> AttributionGraph:
    """The attribution graph of ``prompt`` (text, or tokens ``[1, pos]``) through ``transcoders``: per-layer
    transcoders, or a cross-layer transcoder (:func:`mechscope.sae.load_replacement` reads published ones).

    ``target_logits``: token ids to explain (default: the most likely next tokens holding
    ``prob_mass`` of the probability, at most ``max_logits``). ``max_feature_nodes``: how many
    feature rows to compute, most influential first (circuit-tracer's CLI default is 7,500; each
    costs one backward row); the graph reports how many active features the cap left out and the
    share of influence they held at the last estimate. ``batch_size``: target rows per backward pass.
    ``update_every``: batches between re-estimates of the features' influence (which picks the next rows).
    ``batch_bytes``: what one batch of rows may hold (its gradients at every write site grow with the prompt); a long
    prompt's batch is made smaller to stay within it (``stats["batch_size"]`` says what was used).
    ``edge_tolerance``: edges below this fraction of their row's largest are not stored (0, the default,
    keeps every nonzero edge; for long prompts 1e-3 bounds memory); the share of edge weight dropped is
    reported. ``certify``: how many edges to re-check by perturbation
    (:func:`~mechscope.graphs.validate.edge_certificate`; the worst error is printed with the graph); 0 skips it.
    Rows are stored sparsely as they come; only one batch of rows, ``[batch_size, sources]``, is ever dense.

    Conventions follow circuit-tracer 0.5 (docs/circuits.md, "Conventions"): ``prepend_bos`` puts a BOS-like
    token first when the prompt does not start with a special token (:func:`graph_tokens`), so the skipped
    sink position is never a real word; features *and* error vectors at the first ``skip_first`` positions are
    zeroed (their MLP output becomes part of the constant). ``sink_errors=True`` keeps error nodes there
    (mechscope's earlier convention), which lowers the replacement score.
    """
    t0 = time.perf_counter()
    check_arguments(model, transcoders, prompt)
    if max_feature_nodes < 0 or batch_size < 1 or update_every < 1 or not 0 <= edge_tolerance < 1:
        raise InputError(f"max_feature_nodes must be >= 0, batch_size and update_every >= 1, edge_tolerance in "
                         f"[0, 1); got {max_feature_nodes}, {batch_size}, {update_every}, {edge_tolerance}")
    tokens, bos = graph_tokens(model, prompt, prepend_bos)
    one_pass = tokens.numel() * model.cfg.n_layers
    with work.stage("graph: the real model's clean pass"):
        work.add_floor(one_pass)  # what the replacement freezes (attention, norms) and the MLP outputs it keeps
        rm = ReplacementModel(model, transcoders, tokens, skip_first, sink_errors=sink_errors)
    src = active_features(rm)
    toks, probs = choose_logits(rm.logits, target_logits, prob_mass, max_logits)
    with work.stage("graph: the replacement model's forward"):
        work.add_floor(one_pass)  # the one pass every row's gradient runs back through
        engine = RowEngine(rm, src)
    batch_size = fit_batch(batch_size, rm, src, batch_bytes)
    rows = SparseRows(src, edge_tolerance)
    with work.stage("graph: rows (batched backward passes)"):
        n_batches, dropped_share = _all_rows(engine, rows, src, toks, probs, max_feature_nodes, batch_size,
                                             update_every, progress)
    budget = min(max_feature_nodes, src.n_feats)
    graph = _assemble(model, rm, src, toks, probs, rows, {
        "active_features": src.n_feats, "feature_nodes": budget, "dropped_features": src.n_feats - budget,
        "dropped_influence": dropped_share, "max_feature_nodes": max_feature_nodes, "batches": n_batches + 1,
        "batch_size": batch_size,
        "edge_tolerance": edge_tolerance, "edge_weight_dropped": rows.dropped / max(rows.total, 1e-30),
        "transcoder_layers": sorted(rm.transcoders.output_layers), "replacement": rm.transcoders.describe(),
        "prepended_bos": bos, "sink_errors": sink_errors,
        "model": model.cfg.model_name, "prompt": prompt if isinstance(prompt, str) else "".join(_strs(model, tokens[0])),
        "skip_first": rm.skip_first})
    if certify:
        with work.stage("graph: edge certificate"):  # a check: each perturbed copy is one pass (the base run is extra)
            graph.certificate = edge_certificate(rm, graph, certify)
    graph.stats["seconds"] = time.perf_counter() - t0
    return graph


def _all_rows(engine: RowEngine, rows: "SparseRows", src: Sources, toks: torch.Tensor, probs: torch.Tensor,
              max_feature_nodes: int, batch_size: int, update_every: int, progress: bool) -> tuple[int, float]:
    """Into ``rows``: the logits' rows, then feature rows, most influential first (re-estimated every
    ``update_every`` batches), until ``max_feature_nodes``. Returns the number of feature batches and the share of
    the estimated influence the cap left out."""
    rows.add(engine.rows([("logit", -1, -1, int(t)) for t in toks]), [-1] * len(toks))
    budget = min(max_feature_nodes, src.n_feats)
    n_l = len(toks)
    visited = torch.zeros(src.n_feats, dtype=torch.bool)
    n_batches = 0
    inf = torch.zeros(src.n_feats)  # when every feature gets a row the order does not matter: no estimates

    def weights() -> torch.Tensor:
        return torch.cat([probs, torch.zeros(rows.n_rows - n_l)])

    steps = range(0, budget, batch_size)
    for step in bar(steps, desc="attribution graph rows") if progress else steps:
        if budget < src.n_feats and (step // batch_size) % update_every == 0:  # re-estimate which matter most
            inf = rows.influence(weights())[:src.n_feats]
        score = torch.where(visited, torch.tensor(-1.0), inf + 1e-12 * src.acts.abs() / (src.acts.abs().max() + 1))
        take = score.topk(min(batch_size, budget - (rows.n_rows - n_l))).indices
        rows.add(engine.rows([("feature", int(a), int(b), int(c)) for a, b, c in src.feats[take]]), take.tolist())
        visited[take] = True
        n_batches += 1
    if budget == src.n_feats:
        return n_batches, 0.0
    final_inf = rows.influence(weights())[:src.n_feats]
    return n_batches, float(final_inf[~visited].sum() / final_inf.sum().clamp_min(1e-30))


def _assemble(model: HookedModel, rm: ReplacementModel, src: Sources, toks: torch.Tensor, probs: torch.Tensor,
              rows: SparseRows, stats: dict) -> AttributionGraph:
    """Nodes ``[features kept][errors][embeddings][logits]`` and the sparse adjacency over them."""
    n_l = len(toks)
    chosen = torch.tensor(rows.row_src[n_l:], dtype=torch.long)
    order = chosen.sort().values  # kept features in (layer, pos, feature) order
    n_k, L, n = len(order), src.n_layers, src.n_pos
    n_nodes = n_k + (L + 1) * n + n_l
    col = torch.full((src.n,), -1, dtype=torch.long)  # source index -> node index (-1: a feature not kept)
    col[order] = torch.arange(n_k)
    col[src.n_feats:] = n_k + torch.arange((L + 1) * n)
    row_node = torch.cat([torch.arange(n_nodes - n_l, n_nodes), col[chosen]])  # row -> node index
    tgt, srcs, w = rows.take_edges(row_node, col, n_nodes)
    kind = torch.cat([torch.zeros(n_k), torch.ones(L * n), torch.full((n,), 2.0), torch.full((n_l,), 3.0)]).long()
    layer = torch.cat([src.feats[order, 0], torch.arange(L).repeat_interleave(n), torch.full((n,), -1),
                       torch.full((n_l,), L)])
    pos = torch.cat([src.feats[order, 1], torch.arange(n).repeat(L), torch.arange(n), torch.full((n_l,), n - 1)])
    index = torch.cat([src.feats[order, 2], torch.full((L * n,), -1), rm.tokens[0].cpu(), toks])
    value = torch.cat([src.acts[order],
                       torch.stack([st.error.float().norm(dim=-1).cpu() for st in rm.layers]).reshape(-1),
                       rm.embed.float().norm(dim=-1).cpu(), probs])
    return AttributionGraph(prompt_tokens=rm.tokens[0].cpu(), token_strs=_strs(model, rm.tokens[0].cpu()),
                            kind=kind, layer=layer, pos=pos, index=index, value=value,
                            edge_target=tgt, edge_source=srcs, edge_weight=w,
                            logit_probs=probs, stats=stats, n_layers=L,
                            token_labels=_strs(model, toks),
                            kind_names=list(KIND_NAMES))


def _strs(model: HookedModel, ids: torch.Tensor) -> list[str]:
    """Each token id as text (its id in brackets when the model has no tokenizer)."""
    if model.tokenizer is None:
        return [f"[{int(i)}]" for i in ids]
    return model.to_str_tokens(ids)
