"""``check(model)``: the identity suite, run on the real loaded model, with each check's worst error.

The checks (each on a few short prompts; numbers in float32 unless the model is in another dtype):

- **hooks are inert**: logits with every hook point cached equal the logits with none (bit for bit;
  attention-internal hooks switch a layer to eager maths, so that run is compared to 1e-4);
- **writing the cache back changes nothing** (bit for bit);
- **residual stream**: ``resid_post[l] == resid_pre[l + 1]``, ``resid_mid == resid_pre + attn_out``,
  ``resid_post == resid_mid + mlp_out``, and ``resid_pre[0]`` is the embedding (plus positions);
- **head results** sum (with the bias) to ``hook_attn_out``;
- **experts** (mixtures of experts): ``sum_k w_k expert_out_k`` (+ the shared expert) is ``hook_mlp_out``;
- **unembedding**: the final norm and ``W_U`` give the logits;
- **weight views**: ``attn_input @ W_Q + b_Q`` is ``hook_q`` (and likewise ``W_K``, ``W_V``, ``W_in``);
- **padding**: a padded batch (right and left) gives each prompt's logits run alone;
- **every hook point is live** (``interventions=True``): editing it changes the logits, so no patch
  is silently a no-op (the failure nnsight users lose hours to).

It is nnterp's ``check_model_renaming`` idea made stronger: it checks numbers, not names and shapes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .hookpoints import split_name
from .progress import bar
from .result import Result


@dataclass
class Identity:
    name: str
    error: float  # worst absolute error (0.0 when bit-exact)
    tolerance: float
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.error <= self.tolerance


@dataclass(repr=False)
class CheckReport(Result):
    """The identity suite on one model: each identity's worst error, and which hook points are live."""

    model: str
    identities: list[Identity]
    n_hooks: int
    live: list[str] = field(default_factory=list)
    dead: list[str] = field(default_factory=list)
    interventions: bool = True

    @property
    def ok(self) -> bool:
        return all(i.ok for i in self.identities) and not self.dead

    @property
    def failed(self) -> list[str]:
        return [i.name for i in self.identities if not i.ok] + [f"dead hook {n}" for n in self.dead]

    def summary(self) -> str:
        lines = [f"check of {self.model}: {'PASS' if self.ok else 'FAIL'}",
                 f"  {'identity':40} {'worst error':>12} {'tolerance':>10}  status"]
        for i in self.identities:
            lines.append(f"  {i.name:40} {i.error:12.2e} {i.tolerance:10.0e}  {'ok' if i.ok else 'FAIL'}"
                         + (f"  ({i.detail})" if i.detail else ""))
        if self.interventions:
            lines.append(f"  hook points: {len(self.live)} of {self.n_hooks} change the logits when edited"
                         + (f"; NO effect: {', '.join(self.dead[:12])}" if self.dead else " (all live)"))
        else:
            lines.append(f"  hook points: {self.n_hooks} (interventions not checked)")
        return "\n".join(lines)


def _worst(pairs) -> float:
    return max([float((a.float() - b.float()).abs().max()) for a, b in pairs] + [0.0])


def _tokens(model, batch: int = 2, pos: int = 9, seed: int = 0) -> torch.Tensor:
    V = model.cfg.d_vocab
    g = torch.Generator().manual_seed(seed)
    return torch.randint(min(3, V - 1), V, (batch, pos), generator=g).to(model.device)


def _edit(name: str, n_experts: int):
    def hook(act, h):
        if not act.is_floating_point():  # chosen experts: pick the next one
            return (act + 1) % max(n_experts, 1)
        return act * 0.5 + 0.25 * act.std().clamp(min=1e-3) * torch.ones_like(act)
    return hook


@torch.no_grad()
def _residual(model, cache) -> list[Identity]:
    n = model.cfg.n_layers
    out = [Identity("resid_post[l] == resid_pre[l+1]", _worst((cache["resid_post", l], cache["resid_pre", l + 1])
                                                               for l in range(n - 1)), 0.0)]
    out.append(Identity("resid_mid == resid_pre + attn_out", _worst(
        (cache["resid_mid", l], cache["resid_pre", l] + cache["attn_out", l]) for l in range(n)), 1e-4))
    out.append(Identity("resid_post == resid_mid + mlp_out", _worst(
        (cache["resid_post", l], cache["resid_mid", l] + cache["mlp_out", l]) for l in range(n)), 1e-4))
    emb = cache["embed"] + (cache["pos_embed"] if "hook_pos_embed" in model.hook_names else 0)
    out.append(Identity("resid_pre[0] == embed (+ pos_embed)", _worst([(cache["resid_pre", 0], emb)]), 1e-4))
    return out


@torch.no_grad()
def _components(model, cache, logits) -> list[Identity]:
    c, out = model.cfg, []
    def bias(l):  # b_O, through the frozen post-attention norm where there is one (Gemma 2/3, OLMo-2)
        if model.norm(l, "attn_post") is None:
            return model.b_O_layer(l)
        o = torch.einsum("bphd,hdm->bpm", cache["z", l].float(), model.W_O_layer(l).float()) + model.b_O_layer(l).float()
        return model.result_bias(l, o, cache["result", l])

    if ("result", 0) in cache:
        out.append(Identity("sum of head results + b_O == attn_out", _worst(
            (cache["result", l].sum(-2) + bias(l), cache["attn_out", l]) for l in range(c.n_layers)), 1e-4))
    if c.moe_layers:
        def experts(l):
            total = (cache["expert_out", l] * cache["expert_weights", l][..., None].to(cache["expert_out", l].dtype)).sum(-2)
            if ("shared_expert_out", l) in cache:
                s = cache["shared_expert_out", l]
                total = total + (s * torch.sigmoid(cache["shared_expert_gate", l]) if ("shared_expert_gate", l) in cache
                                 else s)
            return total * c.residual_scale
        out.append(Identity("sum_k w_k expert_out_k (+ shared) == mlp_out",
                            _worst((experts(l), cache["mlp_out", l]) for l in c.moe_layers), 1e-4))
    normed = model.ln_final(cache["resid_post", c.n_layers - 1])
    out.append(Identity("unembed(ln_final(resid)) == logits", _worst([(model.unembed(normed), logits)]), 1e-4))
    out.append(Identity("norms == their frozen-scale linear maps", _worst(_norm_pairs(model, cache)), 1e-4,
                        "what DLA and the lens rely on"))
    return out


def _norm_pairs(model, cache) -> list:
    """``(center(x) * scale(x) * gain + bias, norm(x))`` for the final norm and each block's pre-norms."""
    def pair(norm, x):
        return norm.apply(x), norm(x)

    pairs = [pair(model.ln_final, cache["resid_post", model.cfg.n_layers - 1])]
    for l in range(model.cfg.n_layers):
        if model.norm(l, "ln1") is not None:
            pairs.append(pair(model.norm(l, "ln1"), cache["resid_pre", l]))
    return pairs


@torch.no_grad()
def _weights(model, cache) -> list[Identity]:
    c, pairs_q, pairs_mlp = model.cfg, [], []
    for l in range(c.n_layers):
        x = cache[model.attn_input(l)]
        pairs_q.append((torch.einsum("bpm,hmd->bphd", x, model.W_Q[l]) + model.b_Q[l], cache["q", l]))
        pairs_q.append((torch.einsum("bpm,hmd->bphd", x, model.W_K_kv[l]) + model.b_K[l][:: c.n_groups], cache["k", l]))
        if l not in (c.moe_layers or []):
            name = "pre_linear" if c.gated_mlp else "pre"
            pairs_mlp.append((cache[model.mlp_input(l)] @ model.W_in_layer(l) + model.b_in_layer(l), cache[name, l]))
    out = [Identity("attn_input @ W_Q/W_K + b == hook_q/hook_k", _worst(pairs_q), 1e-4)]
    if pairs_mlp:
        out.append(Identity("mlp_input @ W_in + b_in == mlp pre-activation", _worst(pairs_mlp), 1e-4))
    return out


@torch.no_grad()
def _padding(model, tokens) -> Identity:
    single = model(tokens[1:, :6])
    right_mask = torch.ones_like(tokens)
    right_mask[1, 6:] = 0
    right = model(tokens, attention_mask=right_mask)[1:, :6]
    pad = torch.zeros(1, tokens.shape[1] - 6, dtype=tokens.dtype, device=tokens.device)
    left_toks = torch.cat([pad, tokens[1:, :6]], 1)
    left_mask = torch.cat([torch.zeros_like(pad), torch.ones_like(tokens[1:, :6])], 1)
    left = model(left_toks, attention_mask=left_mask)[:, -6:]
    return Identity("padded batch == one prompt at a time", _worst([(right, single), (left, single)]), 1e-4,
                    "right and left padding")


def check(model: "HookedModel", interventions: bool = True, progress: bool = False) -> CheckReport:  # noqa: F821
    """Run the identity suite on ``model`` (see the module docstring); a :class:`CheckReport`."""
    tokens = _tokens(model)
    with torch.no_grad():
        ref = model(tokens)
        no_attn = lambda n: not n.endswith(("hook_pattern", "hook_attn_scores", "hook_rot_q", "hook_rot_k",  # noqa: E731
                                            "hook_z", "hook_result"))
        logits_inert, _ = model.run_with_cache(tokens, names_filter=no_attn)
        logits, cache = model.run_with_cache(tokens, names_filter=lambda n: True)
        hooks = [(n, lambda act, h: cache[h.name].clone()) for n in model.hook_names]
        written = model.run_with_hooks(tokens, fwd_hooks=hooks)
    ids = [Identity("logits unchanged by cached hooks", _worst([(logits_inert, ref)]), 0.0, "outside attention"),
           Identity("logits unchanged with every hook cached", _worst([(logits, ref)]), 1e-4, "eager attention maths"),
           Identity("writing the cache back changes nothing", _worst([(written, logits)]), 0.0)]
    ids += _residual(model, cache) + _components(model, cache, logits) + _weights(model, cache) + [_padding(model, tokens)]
    live, dead = [], []
    if interventions:
        names = model.hook_names
        if progress:
            names = bar(names, desc="check: every hook point")
        for name in names:
            with torch.no_grad():
                out = model.run_with_hooks(tokens, fwd_hooks=[(name, _edit(name, model.cfg.n_experts))])
            (dead if torch.equal(out, logits) else live).append(name)
    return CheckReport(model.cfg.model_name, ids, len(model.hook_names), live, dead, interventions)


def dead_layers(report: CheckReport) -> set[int]:
    """The blocks with a hook point that had no effect when edited."""
    return {split_name(n)[0] for n in report.dead if split_name(n)[0] is not None}
