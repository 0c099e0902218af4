"""Tiny randomly initialised HF models, one per supported architecture (the first test tier)."""

from __future__ import annotations

import torch
import transformers as T

V = 97  # vocabulary size

_COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
               max_position_embeddings=64)

CONFIGS = {
    "gpt2": lambda: T.GPT2Config(vocab_size=V, n_embd=32, n_layer=3, n_head=4, n_positions=64,
                                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    "gpt_neox": lambda: T.GPTNeoXConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                        num_attention_heads=4, max_position_embeddings=64, rotary_pct=0.5,
                                        use_parallel_residual=True),
    "gpt_neox_seq": lambda: T.GPTNeoXConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                            num_attention_heads=4, max_position_embeddings=64,
                                            use_parallel_residual=False),
    "llama": lambda: T.LlamaConfig(**_COMMON, num_key_value_heads=2),
    "mistral": lambda: T.MistralConfig(**_COMMON, num_key_value_heads=2, sliding_window=4),
    "qwen2": lambda: T.Qwen2Config(**_COMMON, num_key_value_heads=2),
    "qwen3": lambda: T.Qwen3Config(**_COMMON, num_key_value_heads=2, head_dim=8),
    "phi3": lambda: T.Phi3Config(**_COMMON, num_key_value_heads=2, pad_token_id=0),
    "gemma": lambda: T.GemmaConfig(**_COMMON, num_key_value_heads=1, head_dim=8),
    "gemma2": lambda: T.Gemma2Config(**_COMMON, num_key_value_heads=2, head_dim=8, sliding_window=4,
                                     attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
                                     query_pre_attn_scalar=8),
    "gemma3": lambda: T.Gemma3TextConfig(**_COMMON, num_key_value_heads=1, head_dim=8, sliding_window=4,
                                         layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                         query_pre_attn_scalar=8),
}
_GENERIC = dict(_COMMON, num_key_value_heads=2, head_dim=8, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _generic(model_type: str, **over):
    """A tiny config of any Llama-shaped model type (the shared sizes above, plus ``over``)."""
    return lambda: T.AutoConfig.for_model(model_type, **{**_GENERIC, **over})


# model types whose tiny config needs nothing beyond the shared sizes
for _t in ("smollm3", "helium", "ernie4_5", "seed_oss", "cwm", "exaone", "internlm3", "iquestcoder", "ministral",
           "ministral3", "hunyuan_v1_dense", "arcee", "jais2", "starcoder2",
           "glm", "glm4", "olmo", "olmo2", "olmo3", "exaone4", "apertus", "hyperclovax", "vaultgemma", "opt",
           "biogpt", "persimmon"):
    CONFIGS[_t] = _generic(_t)
CONFIGS.update({
    "granite": _generic("granite", embedding_multiplier=3.0, residual_multiplier=0.5, logits_scaling=4.0,
                        attention_multiplier=0.2),
    "nemotron": _generic("nemotron", partial_rotary_factor=0.5),
    "stablelm": _generic("stablelm", partial_rotary_factor=0.5, qk_layernorm=True),
    "stablelm_par": _generic("stablelm", use_parallel_residual=True),
    "phi": _generic("phi", partial_rotary_factor=0.5),
    "cohere": _generic("cohere", logit_scale=0.5),
    "cohere2": _generic("cohere2", logit_scale=0.25, sliding_window=4,
                        layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    "gpt_bigcode": lambda: T.GPTBigCodeConfig(vocab_size=V, n_embd=32, n_layer=3, n_head=4, n_positions=64,
                                              multi_query=True),
    "gpt_bigcode_mha": lambda: T.GPTBigCodeConfig(vocab_size=V, n_embd=32, n_layer=3, n_head=4, n_positions=64,
                                                  multi_query=False),
    "gptj": lambda: T.GPTJConfig(vocab_size=V, n_embd=32, n_layer=3, n_head=4, n_positions=64, rotary_dim=4),
    "falcon": lambda: T.FalconConfig(vocab_size=V, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                     num_kv_heads=2, new_decoder_architecture=True, max_position_embeddings=64),
    "falcon_mq": lambda: T.FalconConfig(vocab_size=V, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                        multi_query=True, parallel_attn=True, max_position_embeddings=64),
    "falcon_seq": lambda: T.FalconConfig(vocab_size=V, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                         multi_query=False, parallel_attn=False, bias=True, max_position_embeddings=64),
})
ARCHS = list(CONFIGS)
SLIDING = {"mistral": 4, "gemma2": 4, "gemma3": 4, "cohere2": 4}


def tiny_hf(arch: str, attn_implementation: str = "sdpa", seed: int = 0):
    """A tiny random ``*ForCausalLM`` of ``arch``; norm weights randomised so norms are not identities."""
    torch.manual_seed(seed)
    cfg = CONFIGS[arch]()
    try:
        model = T.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn_implementation).eval()
    except ValueError:  # a family that refuses sdpa (Gemma 2, gpt-oss, Flint, VaultGemma): HF's eager, as load() does
        torch.manual_seed(seed)
        model = T.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln" in name:
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.add_(0.05 * torch.randn_like(p))
    return model

_MOE = dict(_GENERIC, num_experts_per_tok=2, moe_intermediate_size=24)
MOE_CONFIGS = {
    "mixtral": _generic("mixtral", num_local_experts=4, num_experts_per_tok=2),
    "olmoe": _generic("olmoe", num_experts=4, num_experts_per_tok=2),
    "qwen3_moe": lambda: T.AutoConfig.for_model("qwen3_moe", **{**_MOE, "num_experts": 4, "decoder_sparse_step": 1,
                                                                 "mlp_only_layers": [], "norm_topk_prob": True}),
    "qwen2_moe": lambda: T.AutoConfig.for_model("qwen2_moe", **{**_MOE, "num_experts": 4, "decoder_sparse_step": 1,
                                                                 "mlp_only_layers": [],
                                                                 "shared_expert_intermediate_size": 40}),
    "gpt_oss": _generic("gpt_oss", num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
                        layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    "mellum": lambda: T.AutoConfig.for_model("mellum", **{**_MOE, "num_experts": 4}),
    "flint": lambda: T.AutoConfig.for_model("flint", **{**_MOE, "num_experts": 4, "shared_expert_intermediate_size": 40}),
    "granitemoe": _generic("granitemoe", num_local_experts=4, num_experts_per_tok=2, embedding_multiplier=2.0,
                           residual_multiplier=0.5, logits_scaling=3.0),
}
CONFIGS.update(MOE_CONFIGS)
ARCHS = list(CONFIGS)
SLIDING["gpt_oss"] = 4


def worded_llama():
    """The tiny Llama as a HookedModel with the toy's word-level tokenizer ("t5 t6" -> [bos, 5, 6]), for text prompts."""
    from mechscope import HookedModel
    from mechscope.circuits.toy import toy_tokenizer

    return HookedModel(tiny_hf("llama"), tokenizer=toy_tokenizer(V))


def random_clt(model, tokens, d_sae: int = 40, k: int = 5, reach: int = 0, tied: bool = False, skip: bool = False,
               architecture: str = "jumprelu", input: str = "resid_mid", seed: int = 0, layers=None):
    """A random cross-layer transcoder for ``model`` whose JumpReLU thresholds let about ``k`` features per layer fire
    on ``tokens`` (decoders scaled so that features matter), with a small random skip when asked."""
    from mechscope.sae import CrossLayerTranscoder, clt_config

    cfg = clt_config(model, d_sae, layers, input=input, architecture=architecture, k=k, reach=reach, tied=tied,
                     skip=skip, normalize_activations="none")
    clt = CrossLayerTranscoder(cfg, seed=seed)
    _, cache = model.run_with_cache(tokens)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for s in range(cfg.n_layers):
            x = cache[cfg.input_hooks[s]][0].reshape(tokens.shape[-1], -1).float()
            pre = clt.pre_acts_index(s, x)
            if architecture == "jumprelu":
                clt.log_threshold[s] = pre.quantile(1 - k / d_sae, dim=-1).mean().clamp_min(1e-4).log()
            clt.W_dec[s].mul_(3.0)
            clt.b_dec[s].normal_(0, 0.02, generator=g)
            if skip:
                clt.W_skip[s].normal_(0, 0.05, generator=g)
    return clt
