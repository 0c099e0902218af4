"""Edge attribution patching (EAP; Syed et al. 2023) and EAP-IG (Hanna et al. 2024).

Each edge from an upstream component ``u`` (the embedding, a head, an MLP) to a downstream reader
``v`` is scored ``sum_pos (out_u(clean) - out_u(corrupted)) . g_v``, where ``g_v`` is the exact
gradient of the metric that flows into the residual stream through reader ``v``. Readers are the
query input of each head (``L5H3.q``), the key and value inputs of each KV head (``L5H3.k``,
``L5H3.v``; under grouped-query attention one KV head serves a group of query heads and is written
``L5G1.k``), each MLP (``L5.mlp_in``) and the logits. One backward pass gives them all: the
gradient at ``attn.hook_q/k/v`` of a head, mapped back through that head's ``W_Q``/``W_K``/``W_V``
and the vector-Jacobian product of the pre-attention norm, is the part of ``dM/d resid_pre`` that
flows through that head's input; the parts add up exactly to the attention block's share
``dM/d resid_pre - dM/d resid_mid`` (tested), and the MLP's share is ``dM/d resid_mid - dM/d resid_post``.
With ``ig_steps > 0`` the gradients are averaged along the path from corrupted to clean embeddings.

In parallel-residual blocks (GPT-NeoX/Pythia with ``use_parallel_residual``, Phi), attention and
MLP both read ``resid_pre``: the MLP's share of ``dM/d resid_pre`` is the vector-Jacobian product of
``ln2`` applied to the gradient at its output (``ln2.hook_normalized``), the attention's is the rest
(``dM/d resid_pre - dM/d resid_post - mlp share``), and a layer's heads do not feed its own MLP.
"""

from __future__ import annotations

import torch

from ..batching import map_batches
from ..compute import forward_bytes
from ..core.cache import ActivationCache
from ..core.components import Component, kv_component
from ..core.errors import InputError
from ..core.hookpoints import act_name
from ..core.model import HookedModel
from ..core.progress import bar
from ..core.types import Metric, TextOrTokens, checked
from ..core.work import add_floor
from ..techniques.inputs import PreparedPair, as_pair, metric_on_rows


def _layer(name: str) -> int:
    """``embed`` -> -1; ``L5H3``, ``L5G1``, ``L5.mlp``, ``L5H3.q`` -> 5."""
    return Component.parse(name).layer


@checked
def edge_attribution(model: HookedModel, clean: TextOrTokens | PreparedPair, corrupted: TextOrTokens | None = None,
                     metric: Metric | None = None, ig_steps: int = 0, per_head: bool = True,
                     batch_size: int | None = None) -> dict[tuple[str, str], float]:
    """EAP scores ``{(upstream, reader): score}`` (see the module docstring), summed over positions, mean over prompts.

    ``clean``, ``corrupted``: ``[batch, pos]`` token ids of equal shape. ``metric(logits) -> [batch]``.
    Upstream: ``embed``, ``L{l}H{h}``, ``L{l}.mlp``. Readers: ``L{l}H{h}.q``, the KV heads'
    ``L{l}H{g}.k``/``.v`` (``L{l}G{g}`` under grouped-query attention), ``L{l}.mlp_in`` and
    ``logits``; with ``per_head=False`` one ``L{l}.attn_in`` per attention block instead of the
    q/k/v readers. Score: ``sum_{pos} (out_u(clean) - out_u(corrupted)) . g_v`` averaged over prompts.
    Prompts run in batches sized from free memory (``batch_size`` overrides; see :mod:`mechscope.batching`).
    ``clean`` may be a :class:`~mechscope.techniques.inputs.PreparedPair` alone: the clean and corrupted
    activations then come from its (shared) runs instead of two runs per batch.
    """
    c = model.cfg
    pair = clean if isinstance(clean, PreparedPair) else None
    if pair is not None:
        clean, corrupted, metric = pair.clean, pair.corrupted, as_pair(model, pair, corrupted, metric).metric
    elif corrupted is None or metric is None or clean.shape != corrupted.shape:
        raise InputError("edge attribution needs clean and corrupted tokens of one shape and a metric (or one "
                         f"PreparedPair); got {tuple(getattr(clean, 'shape', ()))} and "
                         f"{tuple(getattr(corrupted, 'shape', ()))}")
    N, P = clean.shape
    elt = torch.finfo(model.dtype).bits // 8
    per_prompt = 4 * forward_bytes(c.to_dict(), 1, P, elt)  # two cached runs, a forward with its graph, gradients

    def run(s: int, e: int) -> dict:
        return _eap_batch(model, clean[s:e], corrupted[s:e], metric, ig_steps, per_head, torch.arange(s, e), N, pair)

    sums: dict[tuple[str, str], float] = {}
    for part in map_batches(run, N, batch_size, per_prompt, model.device, "edge attribution",
                            tokens_per_item=4 * P):  # two cached runs and a forward-backward pass
        for k, v in part.items():
            sums[k] = sums.get(k, 0.0) + v
    return {k: v / N for k, v in sums.items()}


def _eap_batch(model, clean, corrupted, metric, ig_steps: int, per_head: bool, rows: torch.Tensor,
               n_prompts: int, pair: PreparedPair | None = None) -> dict[tuple[str, str], float]:
    """EAP score sums over the prompts ``rows`` (``clean``/``corrupted`` ``[b, pos]``) of a dataset of ``n_prompts``
    (their activations from ``pair``'s runs when given)."""
    c = model.cfg
    n = c.n_layers
    out_names = model.embed_hooks + [act_name("z", l) for l in range(n)] + [act_name("mlp_out", l) for l in range(n)]
    if pair is not None:
        cc, cx = (ActivationCache({k: pair.run(w, out_names)[1][k][rows] for k in out_names}, model)
                  for w in ("clean", "corrupted"))
        if pair.prompt_len is not None:  # an answer continuation follows: differences at the prompt's positions only
            cc = ActivationCache({k: torch.cat([cc[k][:, :pair.prompt_len], cx[k][:, pair.prompt_len:]], 1)
                                  for k in out_names}, model)
    else:
        with torch.no_grad():
            _, cc = model.run_with_cache(clean, names_filter=out_names)
            _, cx = model.run_with_cache(corrupted, names_filter=out_names)
        add_floor(2 * clean.numel() * n)  # the clean and corrupted runs the scores difference
    grad_names = [act_name(s, l) for l in range(n) for s in ("resid_pre", "resid_mid", "resid_post")]
    shared = c.parallel_residual and not model.has_hook(act_name("normalized", 0, "ln2"))
    if c.parallel_residual:  # the MLP reads ln2(resid_pre) (or ln1's output, shared with attention)
        grad_names = [g for g in grad_names if "resid_mid" not in g]
        grad_names += [act_name("normalized", l, "ln1" if shared else "ln2") for l in range(n)]
    if per_head or shared:
        grad_names += [act_name(s, l) for l in range(n) for s in ("q", "k", "v")]
        W = (model.W_Q, model.W_K_kv, model.W_V_kv)  # hoisted: each access rebuilds the stack
    readers: dict[str, torch.Tensor] = {}
    steps = max(1, ig_steps)
    add_floor(steps * corrupted.numel() * n)  # one forward (with its backward) per integration step
    params = [p for p in model.hf.parameters() if p.requires_grad]
    emb_c, emb_x = (sum(cache[e] for e in model.embed_hooks) for cache in (cc, cx))
    try:
        for p in params:
            p.requires_grad_(False)
        for k in bar(range(steps), desc="EAP-IG steps"):
            alpha = (k + 0.5) / steps if ig_steps else 0.0
            store, resid = {}, {}

            def start(act, hook, _a=alpha):  # the graph starts at the residual stream entering block 0
                return (emb_x + _a * (emb_c - emb_x)).detach().requires_grad_(True)

            def record(act, hook, _resid=resid):
                _resid[hook.layer()] = act.detach()

            def keep(g, hook, _store=store):
                _store[hook.name] = g.detach()

            fwd = [("blocks.0.hook_resid_pre", start)]
            if per_head or c.parallel_residual:
                fwd += [(act_name("resid_pre", l), record) for l in range(n)]
            with torch.enable_grad(), model.hooks(fwd, [(g, keep) for g in grad_names]):
                value = metric_on_rows(metric, model(corrupted), rows, n_prompts)
                value.sum().backward()
            for r, g in _reader_grads(model, store, resid, W if (per_head or shared) else None, per_head).items():
                readers[r] = readers.get(r, 0.0) + g / steps
    finally:
        for p in params:
            p.requires_grad_(True)
    return _edge_scores(model, cc, cx, readers, emb_c, emb_x, clean.shape[0])  # sums over this batch


def _reader_grads(model, store: dict, resid: dict, W, per_head: bool = True) -> dict[str, torch.Tensor]:
    """``{reader: dM/d resid through that reader}`` ``[batch, pos, d_model]`` from one backward pass."""
    n = model.cfg.n_layers
    out = {}
    for l in range(n):
        g_pre, g_post = store[act_name("resid_pre", l)], store[act_name("resid_post", l)]
        heads = _head_input_grads(model, l, store, resid[l], W) if W is not None else None
        if model.cfg.parallel_residual:
            # resid_post = resid_pre + attn(ln1(resid_pre)) + mlp(ln2(resid_pre)): the MLP's share of dM/d resid_pre
            # is ln2's vector-Jacobian product of the gradient at its output; the attention's is the rest
            if act_name("normalized", l, "ln2") in store:
                mlp = _norm_vjp(model.ln2(l), resid[l], store[act_name("normalized", l, "ln2")])
            else:  # one norm feeds both: the MLP's part of the gradient at ln1's output is what q/k/v do not take
                at_norm = store[act_name("normalized", l, "ln1")] - _head_input_grads(
                    model, l, store, resid[l], W, at_norm=True)
                mlp = _norm_vjp(model.ln1(l), resid[l], at_norm)
            attn = g_pre - g_post - mlp
        else:
            g_mid = store[act_name("resid_mid", l)]
            mlp, attn = g_mid - g_post, g_pre - g_mid
        if per_head and heads is not None:
            out.update(heads)
        else:
            out[f"L{l}.attn_in"] = attn
        out[f"L{l}.mlp_in"] = mlp
    out["logits"] = store[act_name("resid_post", n - 1)]
    return out


def _norm_vjp(norm, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``J_norm(x)ᵀ g``: the gradient at the norm's input ``x [batch, pos, d_model]`` of ``g`` at its output."""
    if norm is None:
        return g
    x = x.clone().requires_grad_(True)
    with torch.enable_grad():
        (gx,) = torch.autograd.grad(norm(x), x, g.to(x.dtype))
    return gx


def _head_input_grads(model, l: int, store: dict, resid_pre: torch.Tensor, W,
                      at_norm: bool = False) -> dict[str, torch.Tensor] | torch.Tensor:
    """Per-head shares of ``dM/d resid_pre`` through the attention input: ``J_ln1ᵀ (g_q[h] W_Q[h]ᵀ)`` etc.
    With ``at_norm``: their sum at the norm's output instead (``Σ g W ᵀ``, before the norm's VJP)."""
    W_Q, W_K, W_V = (w[l].to(resid_pre.dtype) for w in W)  # [head | kv_head, d_model, d_head]
    g = {s: store[act_name(s, l)] for s in ("q", "k", "v")}  # [batch, pos, head | kv_head, d_head]
    v = torch.cat([torch.einsum("bphe,hde->bphd", g["q"], W_Q), torch.einsum("bphe,hde->bphd", g["k"], W_K),
                   torch.einsum("bphe,hde->bphd", g["v"], W_V)], dim=2)  # [batch, pos, readers, d_model]
    if at_norm:
        return v.sum(2)
    ln1 = model.ln1(l)
    if ln1 is None:  # attention reads the residual stream itself (OLMo-2): the map is the identity
        gx = v
    else:
        x = resid_pre[:, :, None, :].expand(-1, -1, v.shape[2], -1).clone().requires_grad_(True)
        with torch.enable_grad():
            (gx,) = torch.autograd.grad(ln1(x), x, v)  # the norm's vector-Jacobian product, one per reader
    kv = [kv_component(model.cfg, l, g) for g in range(model.cfg.n_kv_heads)]
    names = [f"L{l}H{h}.q" for h in range(model.cfg.n_heads)] + [f"{c}.k" for c in kv] + [f"{c}.v" for c in kv]
    return {name: gx[:, :, i] for i, name in enumerate(names)}


@torch.no_grad()
def _edge_scores(model, cc, cx, readers: dict, emb_c, emb_x, N) -> dict[tuple[str, str], float]:
    """Every allowed (upstream, reader) pair as matmuls: ``sum_b U_b [n_up, P·D] @ R_b [n_read, P·D]ᵀ`` (summed over prompts)."""
    c, n = model.cfg, model.cfg.n_layers
    up_names, up_layer, deltas = ["embed"], [-1], [(emb_c - emb_x).float()]
    for l in range(n):
        res_c = model.head_results(l, cc["z", l])
        res_x = model.head_results(l, cx["z", l])
        for h in range(c.n_heads):
            up_names.append(f"L{l}H{h}")
            up_layer.append(l)
            deltas.append((res_c[:, :, h] - res_x[:, :, h]).float())
        up_names.append(f"L{l}.mlp")
        up_layer.append(l)
        deltas.append((cc["mlp_out", l] - cx["mlp_out", l]).float())
    up_head = [Component.parse(u).kind == "head" for u in up_names]
    r_names = list(readers)
    r_layer = [n if r == "logits" else _layer(r) for r in r_names]
    S = torch.zeros(len(up_names), len(r_names))
    dev = model.device  # layers may sit on different devices: meet on the first one
    for b in range(N):  # one prompt at a time keeps memory at (n_up + n_read) x pos x d_model
        U = torch.stack([d[b].reshape(-1).to(dev) for d in deltas])  # [n_up, P·D]
        R = torch.stack([readers[r][b].float().reshape(-1).to(dev) for r in r_names])  # [n_read, P·D]
        S += (U @ R.T).cpu()
    S = S.tolist()
    scores = {}
    for i, (u, lu) in enumerate(zip(up_names, up_layer)):
        for j, (r, lr) in enumerate(zip(r_names, r_layer)):
            # a reader reads the blocks before its own; a layer's MLP also reads that layer's heads, unless the
            # block is parallel (attention and MLP both read resid_pre)
            if lu < lr or (r.endswith("mlp_in") and lu == lr and up_head[i] and not c.parallel_residual):
                scores[(u, r)] = S[i][j]
    return scores


