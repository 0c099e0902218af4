"""Direct logit attribution (DLA): how much each component writes along an answer's unembedding.

With the final norm's scale ``s`` frozen from the actual forward pass (the standard
linearisation; Elhage et al. 2021), the pre-softcap logit difference splits exactly::

    logit[a] - logit[b] = sum_c s * center(c) . (gain * u)  +  bias . u  +  b_U[a] - b_U[b]

with ``u = W_U[:, a] - W_U[:, b]`` and ``c`` ranging over the embedding, each layer's
``attn_out`` and ``mlp_out``. Heads (``attn.hook_result``) and neurons (``mlp.hook_post`` times
``W_out``) refine the layer terms; for Gemma's post-norms their frozen scale is applied too.
For soft-capped models (Gemma 2) the decomposition is of the logit before soft-capping.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import viz


@dataclass
class DLAResult:
    """Contributions to the logit (difference), averaged over prompts; ``per_prompt`` keeps each prompt.

    ``components``: labels ``embed``, ``pos_embed``, ``L{l}.attn``, ``L{l}.mlp``, then ``bias``;
    ``values``: ``[component]``; ``heads``: ``[layer, head]``; ``head_bias``: ``[layer]`` (``b_O``
    terms); ``neurons``: the top neurons as ``(layer, index, mean contribution)`` (all of them in
    ``extra["neuron_contributions"]`` ``[layer, d_mlp]``, with ``extra["mlp_bias"]``); ``target``: the
    actual logit difference; ``error``: ``sum(values) - target`` (fp32 rounding only).
    """

    label: str
    components: list[str]
    values: torch.Tensor
    per_prompt: torch.Tensor
    heads: torch.Tensor
    head_bias: torch.Tensor
    neurons: list[tuple[int, int, float]]
    target: float
    per_prompt_target: torch.Tensor
    extra: dict = field(default_factory=dict)

    @property
    def error(self) -> float:
        return float(self.values.sum() - self.target)

    def summary(self, k: int = 8) -> str:
        lines = [f"direct logit attribution of {self.label}: total {self.target:+.4f} "
                 f"(sum of parts {float(self.values.sum()):+.4f}, error {self.error:+.1e})",
                 "largest components:"]
        order = self.values.abs().argsort(descending=True)[:k]
        lines += [f"  {self.components[int(i)]:>12} {float(self.values[i]):+8.4f}" for i in order]
        flat = self.heads.flatten()
        H = self.heads.shape[1]
        hs = flat.abs().argsort(descending=True)[:k]
        lines.append("largest heads:")
        lines += [f"  {'L%dH%d' % (int(i) // H, int(i) % H):>12} {float(flat[i]):+8.4f}" for i in hs]
        lines.append("largest neurons:")
        lines += [f"  {'L%dN%d' % (l, n):>12} {v:+8.4f}" for l, n, v in self.neurons[:k]]
        return "\n".join(lines)

    __str__ = __repr__ = summary

    def plot(self, path: str | Path = "dla.png") -> Path:
        """Bar chart of the components and a layer x head heatmap, side by side, as a PNG."""
        fig, (a, b) = viz.figure(1, 2, figsize=(13, 4.5))
        v = self.values.numpy()
        a.bar(range(len(v)), v, color=["#c33" if x < 0 else "#36c" for x in v])
        step = max(1, len(v) // 24)
        a.set_xticks(range(0, len(v), step), self.components[::step], rotation=70, fontsize=7)
        a.set_title(f"DLA of {self.label}")
        m = float(self.heads.abs().max()) or 1.0
        im = b.imshow(self.heads.numpy(), aspect="auto", cmap="RdBu_r", vmin=-m, vmax=m)
        b.set_xlabel("head")
        b.set_ylabel("layer")
        b.set_title("per-head DLA")
        fig.colorbar(im, ax=b)
        return viz.save_figure(fig, path)

    def to_html(self) -> str:
        L, H = self.heads.shape
        body = viz.heatmap_html(self.values[None], ["contribution"], self.components,
                                title=f"DLA of {self.label} by component", diverging=True)
        body += viz.heatmap_html(self.heads, [str(l) for l in range(L)], [str(h) for h in range(H)],
                                 title="per-head DLA (layer x head)", diverging=True)
        return body + f"<pre>{viz.esc(self.summary())}</pre>"

    def _repr_html_(self) -> str:
        return self.to_html()


def _ids(model, x, n: int) -> torch.Tensor:
    if isinstance(x, str):
        x = [x]
    if isinstance(x, (list, tuple)):
        x = [model.to_single_token(t) if isinstance(t, str) else int(t) for t in x]
    t = torch.as_tensor(x, dtype=torch.long).reshape(-1)
    if t.numel() == 1:
        t = t.expand(n)
    if t.numel() != n:
        raise ValueError(f"expected one answer per prompt ({n}), got {t.numel()}")
    return t.to(model.device)


@torch.no_grad()
def direct_logit_attribution(
    model,
    tokens,
    answer,
    wrong=None,
    pos: int = -1,
    attention_mask: torch.Tensor | None = None,
    top_neurons: int = 20,
) -> DLAResult:
    """Decompose ``logit[answer] - logit[wrong]`` (or ``logit[answer]``) at ``pos`` into components.

    ``tokens``: text, list of texts or ``[batch, pos]``; ``answer``/``wrong``: strings (single
    tokens) or ids, one per prompt or shared. With padding (a text batch, or ``attention_mask``)
    ``pos=-1`` means each prompt's last real token.
    """
    if isinstance(tokens, (str, list, tuple)):
        tokens, mask = model.tokenize(tokens)
        attention_mask = attention_mask if attention_mask is not None else (None if bool(mask.all()) else mask)
    tokens = tokens if tokens.dim() == 2 else tokens[None]
    N = tokens.shape[0]
    a = _ids(model, answer, N)
    u = model.W_U[:, a].T.float()  # [N, d_model]
    b_u = model.b_U[a].float()
    label = f"logit({model.to_str_tokens(a[:1])[0]!r})" if model.tokenizer is not None else "logit"
    if wrong is not None:
        b = _ids(model, wrong, N)
        u = u - model.W_U[:, b].T.float()
        b_u = b_u - model.b_U[b].float()
        if model.tokenizer is not None:
            label = f"logit({model.to_str_tokens(a[:1])[0]!r}) - logit({model.to_str_tokens(b[:1])[0]!r})"
    n = model.cfg.n_layers
    names = ["hook_embed", "hook_pos_embed", f"blocks.{n - 1}.hook_resid_post"]
    names += [f"blocks.{l}.{s}" for l in range(n) for s in ("hook_attn_out", "hook_mlp_out", "attn.hook_z",
                                                            "mlp.hook_post")]
    names = [x for x in names if x in model.hook_names]
    logits, cache = model.run_with_cache(tokens, names_filter=names, attention_mask=attention_mask)
    if attention_mask is not None and pos == -1:
        p = attention_mask.long().sum(-1) - 1
    else:
        p = torch.full((N,), pos % tokens.shape[1], dtype=torch.long)
    rows = torch.arange(N)

    def at(x):  # [N, pos, ...] -> [N, ...] at each prompt's answer position
        return x[rows, p.to(x.device)].float()

    norm = model.ln_final
    s = norm.scale(at(cache["resid_post", n - 1]))  # [N, 1]
    ue = u * norm.gain.float()  # [N, d]
    if norm.kind == "layernorm":
        ue = ue - ue.mean(-1, keepdim=True)  # center(v) . w == v . (w - mean(w))

    def contrib(v):  # [N, ..., d] -> [N, ...]
        shape = (N,) + (1,) * (v.dim() - 2)
        return (v * ue.view(N, *([1] * (v.dim() - 2)), -1)).sum(-1) * s.view(shape)

    comps, vals = [], []
    comps.append("embed")
    vals.append(contrib(at(cache["embed"])))
    if "hook_pos_embed" in model.hook_names:
        comps.append("pos_embed")
        vals.append(contrib(at(cache["pos_embed"])))
    heads, head_bias, neuron_vals, mlp_bias = [], [], [], []
    fam = model.family
    W_outs, b_outs = model.W_out.float(), model.b_out.float()  # stacked once, not per layer
    for l in range(n):
        comps += [f"L{l}.attn", f"L{l}.mlp"]
        vals += [contrib(at(cache["attn_out", l])), contrib(at(cache["mlp_out", l]))]
        z = cache["z", l][rows, p][:, None]  # [N, 1, head, d_head]
        res = model.head_results(l, z)[:, 0].float()  # [N, head, d_model]
        heads.append(contrib(res))
        o = None
        if fam.attn_post_norm:  # the norm's input, from which its frozen scale is read
            o = torch.einsum("nhd,hdm->nm", z[:, 0].float(), model.W_O_layer(l).float()) + model._b_O(l).float()
        bias = model._result_bias(l, o, res).float()
        head_bias.append(contrib(bias.expand(N, -1)))
        post = at(cache["post", l])  # [N, d_mlp]
        W_out = W_outs[l]  # [d_mlp, d]
        b_out = b_outs[l].expand(N, -1)
        if fam.mlp_post_norm:
            pn = model._norm_spec(model._sub(l, fam.mlp_post_norm))
            k = pn.scale(post @ W_out + b_out) * pn.gain.float()  # [N, d]: the frozen post-norm
            neuron_vals.append(contrib(post[..., None] * (W_out[None] * k[:, None, :])))
            mlp_bias.append(contrib(b_out * k))
        else:
            neuron_vals.append(contrib(post[..., None] * W_out[None]))
            mlp_bias.append(contrib(b_out))
    const = b_u.clone()
    if norm.bias is not None:
        const = const + (u * norm.bias.float()).sum(-1)
    comps.append("bias")
    vals.append(const)
    per_prompt = torch.stack(vals)  # [component, N]
    final = at(cache["resid_post", n - 1])
    target_pp = ((model.ln_final(final[:, None])[:, 0].float() * u).sum(-1) + b_u).cpu()
    neurons = torch.stack(neuron_vals, 1).mean(0)  # [layer, d_mlp]
    top = neurons.flatten().abs().argsort(descending=True)[:top_neurons]
    d_mlp = neurons.shape[1]
    top_list = [(int(i) // d_mlp, int(i) % d_mlp, float(neurons.flatten()[i])) for i in top]
    return DLAResult(
        label=label, components=comps, values=per_prompt.mean(1).cpu(), per_prompt=per_prompt.cpu(),
        heads=torch.stack(heads, 1).mean(0).cpu(), head_bias=torch.stack(head_bias, 1).mean(0).cpu(),
        neurons=top_list, target=float(target_pp.mean()), per_prompt_target=target_pp,
        extra={"neuron_contributions": neurons.cpu(), "mlp_bias": torch.stack(mlp_bias, 1).mean(0).cpu(),
               "final_scale": s.cpu()},
    )


ATTRIB_SITES = {
    "resid_pre": "hook_resid_pre", "resid_mid": "hook_resid_mid", "resid_post": "hook_resid_post",
    "attn_out": "hook_attn_out", "mlp_out": "hook_mlp_out", "z": "attn.hook_z", "q": "attn.hook_q",
    "k": "attn.hook_k", "v": "attn.hook_v", "pattern": "attn.hook_pattern", "post": "mlp.hook_post",
}


def attribution_patch(
    model,
    clean,
    corrupted,
    metric,
    sites=("resid_pre", "attn_out", "mlp_out", "z"),
    direction: str = "denoise",
    per_position: bool = False,
) -> dict:
    """First-order estimate of every activation patch at once (attribution patching).

    ``metric(patched) ~ metric(base) + (a_source - a_base) . d metric / d a |base`` for every layer,
    position and head (Nanda 2023, "Attribution Patching"; Syed et al. 2023). One forward and one
    backward pass on the base run and one forward pass on the source run, whatever the number of
    patches. Returns ``{site: PatchResult}`` with the same axes as :func:`mechscope.patching.patch`
    (``[layer, pos]`` for residual sites; ``[layer, head]``, or ``[layer, pos, head]`` with
    ``per_position``, for ``z q k v pattern``; ``[layer, d_mlp]`` neurons for ``post``). The
    metric must be differentiable and return a scalar or one value per prompt.
    """
    from .patching import PatchResult, prompt_pair, reads_last_only

    if direction not in ("denoise", "noise"):
        raise ValueError(f"direction must be 'denoise' or 'noise', got {direction!r}")
    unknown = [s for s in sites if s not in ATTRIB_SITES]
    if unknown:
        raise KeyError(f"unknown attribution sites {unknown}; use {sorted(ATTRIB_SITES)}")
    clean_t, corr_t = prompt_pair(model, clean, corrupted)
    N, P = clean_t.shape
    base_t, src_t = (corr_t, clean_t) if direction == "denoise" else (clean_t, corr_t)
    n = model.cfg.n_layers
    names = [f"blocks.{l}.{ATTRIB_SITES[s]}" for s in sites for l in range(n)]
    final = f"blocks.{n - 1}.hook_resid_post"
    with torch.no_grad():
        src_logits, src = model.run_with_cache(src_t, names_filter=names + [final], logits_to_keep=1)
        keep = 1 if reads_last_only(metric, src_logits, P) else 0
        if not keep:  # the metric reads other positions: unembed them all
            src_logits = model.unembed(model.ln_final(src[final]))
    acts, grads = {}, {}

    def save(act, hook):
        acts[hook.name] = act.detach()

    def keep_grad(g, hook):
        grads[hook.name] = g.detach()

    def leaf(act, hook):  # the graph starts at the embedding: no weight gradients are computed
        return act.detach().requires_grad_(True)

    params = [p for p in model.hf.parameters() if p.requires_grad]
    fwd = [("hook_embed", leaf)] + [(x, save) for x in names]
    try:
        for prm in params:
            prm.requires_grad_(False)
        with torch.enable_grad(), model.hooks(fwd, [(x, keep_grad) for x in names]):
            base_logits = model(base_t, logits_to_keep=keep)
            value = torch.as_tensor(metric(base_logits))
            value.sum().backward()
    finally:
        for prm in params:
            prm.requires_grad_(True)
    base_value = float(value.detach().float().mean())
    src_value = float(torch.as_tensor(metric(src_logits)).detach().float().mean())
    clean_v, corr_v = (src_value, base_value) if direction == "denoise" else (base_value, src_value)
    out = {}
    for s in sites:
        per_layer = []
        for l in range(n):
            name = f"blocks.{l}.{ATTRIB_SITES[s]}"
            d = (src[name] - acts[name]).float() * grads[name].float()
            if s == "pattern":  # [N, head, q, k]
                e = d.sum(-1).permute(0, 2, 1) if per_position else d.sum((-1, -2))
            elif s in ("z", "q", "k", "v"):  # [N, pos, head, d_head]
                e = d.sum(-1) if per_position else d.sum((1, -1))
            elif s == "post":  # neurons, summed over positions
                e = d.sum(1)
            else:  # [N, pos, d_model]
                e = d.sum(-1)
            per_layer.append(e.mean(0))
        grid = base_value + torch.stack(per_layer).cpu()
        layers = [str(l) for l in range(n)]
        if s in ("z", "q", "k", "v", "pattern"):
            hk = "kv_head" if s in ("k", "v") else "head"
            H = grid.shape[-1]
            axes = ("layer", "pos", hk) if per_position else ("layer", hk)
            labels = {"layer": layers, "pos": list(range(P)), hk: [str(h) for h in range(H)]}
        elif s == "post":
            axes, labels = ("layer", "neuron"), {"layer": layers, "neuron": list(range(grid.shape[1]))}
        else:
            axes, labels = ("layer", "pos"), {"layer": layers, "pos": list(range(P))}
        out[s] = PatchResult(f"{s} (attribution)", direction, grid, axes, labels, clean_v, corr_v,
                             stats={"method": "attribution patching", "forward_passes": 2, "backward_passes": 1})
    return out
