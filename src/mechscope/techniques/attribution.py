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

from ..analysis import viz
from ..core.hookpoints import act_name, block_name
from ..core.model import HookedModel
from ..core.result import Result
from ..core.types import Answer, TextOrTokens
from .inputs import answer_ids


@dataclass(repr=False)
class DLAResult(Result):
    """Contributions to the logit (difference), averaged over prompts; ``per_prompt`` keeps each prompt.

    ``components``: labels ``embed``, ``pos_embed``, ``L{l}.attn``, ``L{l}.mlp``, then ``bias``;
    ``values``: ``[component]``; ``heads``: ``[layer, head]``; ``head_bias``: ``[layer]`` (``b_O``
    terms); ``neurons``: the top neurons as ``(layer, index, mean contribution)`` (all of them in
    ``extra["neuron_contributions"]`` ``[layer, d_mlp]``, with ``extra["mlp_bias"]``; in a mixture of
    experts, ``extra["expert_contributions"]`` ``[layer, expert]`` refines each MoE block and its
    ``mlp_bias`` entry holds the shared expert's term); ``target``: the actual logit difference;
    ``error``: ``sum(values) - target`` (fp32 rounding only).
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

    def _dict_extra(self) -> dict:
        return {"error": self.error}

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

    def _html_body(self) -> str:
        L, H = self.heads.shape
        body = viz.heatmap_html(self.values[None], ["contribution"], self.components,
                                title=f"DLA of {self.label} by component", diverging=True)
        return body + viz.heatmap_html(self.heads, [str(l) for l in range(L)], [str(h) for h in range(H)],
                                       title="per-head DLA (layer x head)", diverging=True)


def _answer_direction(model, answer, wrong, N: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``(u [N, d_model], b_u [N], label)``: the unembedding direction of ``answer`` (minus ``wrong``) per prompt."""
    a = answer_ids(model, answer, N)
    u, b_u = model.W_U[:, a].T.float(), model.b_U[a].float()

    def name(ids: torch.Tensor, what: str) -> str:
        """The answer's token when every prompt has the same one, else "each prompt's <what>" (never the first
        prompt's token standing for all of them)."""
        if model.tokenizer is None:
            return what
        if bool((ids == ids[0]).all()):
            return repr(model.to_str_tokens(ids[:1])[0])
        return f"each prompt's {what}"

    label = f"logit({name(a, 'answer')})"
    if wrong is not None:
        b = answer_ids(model, wrong, N)
        u, b_u = u - model.W_U[:, b].T.float(), b_u - model.b_U[b].float()
        label = f"logit({name(a, 'answer')}) - logit({name(b, 'wrong answer')})"
    return u, b_u, label


def _dla_inputs(model, tokens, attention_mask, pos: int):
    """Run once with the hooks DLA reads; returns ``(cache, rows, answer positions [N])``."""
    if isinstance(tokens, (str, list, tuple)):
        tokens, mask = model.tokenize(tokens)
        attention_mask = attention_mask if attention_mask is not None else (None if bool(mask.all()) else mask)
    tokens = tokens if tokens.dim() == 2 else tokens[None]
    N, n = tokens.shape[0], model.cfg.n_layers
    names = ["hook_embed", "hook_pos_embed", act_name("resid_post", n - 1)]
    names += [block_name(l, s) for l in range(n) for s in ("hook_attn_out", "hook_mlp_out", "attn.hook_z",
                                                            "mlp.hook_post", "mlp.hook_expert_out",
                                                            "mlp.hook_expert_indices", "mlp.hook_expert_weights",
                                                            "mlp.hook_shared_expert_out", "mlp.hook_shared_expert_gate")]
    _, cache = model.run_with_cache(tokens, names_filter=[x for x in names if x in model.hook_names],
                                    attention_mask=attention_mask)
    if attention_mask is not None and pos == -1:
        p = attention_mask.long().sum(-1) - 1
    else:
        p = torch.full((N,), pos % tokens.shape[1], dtype=torch.long)
    return cache, torch.arange(N), p


def _layer_terms(model, cache, l: int, rows, p, at, contrib) -> tuple[torch.Tensor, ...]:
    """Layer ``l``'s refinements: ``(per-head [N, head], head bias [N], per-neuron [N, d_mlp], MLP bias [N])``.

    Computed where layer ``l`` lives, then moved to the unembedding's device by ``at``/``contrib``.
    """
    N = rows.shape[0]
    zl = cache["z", l]
    z = zl[rows.to(zl.device), p.to(zl.device)][:, None]  # [N, 1, head, d_head]
    res = model.head_results(l, z)[:, 0].float()  # [N, head, d_model]
    o = None
    if model.norm(l, "attn_post") is not None:  # the post-norm's input, from which its frozen scale is read
        o = torch.einsum("nhd,hdm->nm", z[:, 0].float(), model.W_O_layer(l).float()) + model.b_O_layer(l).float()
    head_bias = contrib(model.result_bias(l, o, res).float().expand(N, -1))
    res = res.to(at.device)
    if l in (model.cfg.moe_layers or []):  # no neurons: the MLP splits into its experts (and the shared one)
        experts, shared = _expert_terms(model, cache, l, at, contrib)
        return contrib(res), head_bias, torch.zeros(N, model.cfg.d_mlp, device=at.device), shared, experts
    W_out = model.W_out_layer(l).float().to(at.device)  # [d_mlp, d_model], read one layer at a time
    b_out = model.b_out_layer(l).float().to(at.device)
    post = at(cache["post", l])  # [N, d_mlp]
    b = b_out.expand(N, -1)
    post_norm = model.norm(l, "mlp_post")
    no_experts = torch.zeros(N, model.cfg.n_experts, device=at.device)
    if post_norm is None:
        return contrib(res), head_bias, contrib(post[..., None] * W_out[None]), contrib(b), no_experts
    k = post_norm.scale(post @ W_out + b) * post_norm.gain.float()  # [N, d]: the frozen post-norm
    return (contrib(res), head_bias, contrib(post[..., None] * (W_out[None] * k[:, None, :])), contrib(b * k),
            no_experts)


def _expert_terms(model, cache, l: int, at, contrib) -> tuple[torch.Tensor, torch.Tensor]:
    """An MoE block's terms: ``(per expert [N, n_experts], shared expert [N])``, from
    ``mlp_out = sum_k w_k expert_out_k (+ sigmoid(g) shared)``; each routed slot is credited to its expert."""
    out, w, idx = at(cache["expert_out", l]), at(cache["expert_weights", l]), at(cache["expert_indices", l]).long()
    per_slot = contrib(out * w[..., None] * model.cfg.residual_scale)  # [N, top_k]
    experts = torch.zeros(out.shape[0], model.cfg.n_experts, device=per_slot.device).scatter_add_(1, idx, per_slot)
    shared = torch.zeros(out.shape[0], device=per_slot.device)
    if ("shared_expert_out", l) in cache:
        s = at(cache["shared_expert_out", l])
        if ("shared_expert_gate", l) in cache:
            s = s * torch.sigmoid(at(cache["shared_expert_gate", l]))
        shared = contrib(s * model.cfg.residual_scale)
    return experts, shared


@torch.no_grad()
def direct_logit_attribution(
    model: HookedModel,
    tokens: TextOrTokens,
    answer: Answer,
    wrong: Answer | None = None,
    pos: int = -1,
    attention_mask: torch.Tensor | None = None,
    top_neurons: int = 20,
) -> DLAResult:
    """Decompose ``logit[answer] - logit[wrong]`` (or ``logit[answer]``) at ``pos`` into components.

    ``tokens``: text, list of texts or ``[batch, pos]``; ``answer``/``wrong``: strings (single
    tokens) or ids, one per prompt or shared. With padding (a text batch, or ``attention_mask``)
    ``pos=-1`` means each prompt's last real token.
    """
    cache, rows, p = _dla_inputs(model, tokens, attention_mask, pos)
    N, n = rows.shape[0], model.cfg.n_layers
    u, b_u, label = _answer_direction(model, answer, wrong, N)

    dev = u.device  # where the unembedding lives: every term is moved there

    def at(x):  # [N, pos, ...] -> [N, ...] at each prompt's answer position
        return x[rows.to(x.device), p.to(x.device)].float().to(dev)

    at.device = dev

    norm = model.ln_final
    s = norm.scale(at(cache["resid_post", n - 1]))  # [N, 1]
    ue = u * norm.gain.float()  # [N, d]
    if norm.centers:
        ue = ue - ue.mean(-1, keepdim=True)  # center(v) . w == v . (w - mean(w))

    def contrib(v):  # [N, ..., d] -> [N, ...]
        v = v.to(dev)
        return (v * ue.view(N, *([1] * (v.dim() - 2)), -1)).sum(-1) * s.view((N,) + (1,) * (v.dim() - 2))

    comps, vals = ["embed"], [contrib(at(cache["embed"]))]
    if model.has_hook("hook_pos_embed"):
        comps.append("pos_embed")
        vals.append(contrib(at(cache["pos_embed"])))
    terms = []
    for l in range(n):
        comps += [f"L{l}.attn", f"L{l}.mlp"]
        vals += [contrib(at(cache["attn_out", l])), contrib(at(cache["mlp_out", l]))]
        terms.append(_layer_terms(model, cache, l, rows, p, at, contrib))
    heads, head_bias, neuron_vals, mlp_bias, experts = (torch.stack(t, 1).mean(0) for t in zip(*terms))
    const = b_u.clone() if norm.bias is None else b_u + (u * norm.bias.float()).sum(-1)
    comps.append("bias")
    vals.append(const)
    per_prompt = torch.stack(vals)  # [component, N]
    target_pp = ((norm(at(cache["resid_post", n - 1])[:, None])[:, 0].float() * u).sum(-1) + b_u).cpu()
    d_mlp = neuron_vals.shape[1]
    top = neuron_vals.flatten().abs().argsort(descending=True)[:top_neurons]
    return DLAResult(
        label=label, components=comps, values=per_prompt.mean(1).cpu(), per_prompt=per_prompt.cpu(),
        heads=heads.cpu(), head_bias=head_bias.cpu(),
        neurons=[(int(i) // d_mlp, int(i) % d_mlp, float(neuron_vals.flatten()[i])) for i in top],
        target=float(target_pp.mean()), per_prompt_target=target_pp,
        extra={"neuron_contributions": neuron_vals.cpu(), "mlp_bias": mlp_bias.cpu(), "final_scale": s.cpu(),
               **({"expert_contributions": experts.cpu()} if model.cfg.n_experts else {})},
    )
