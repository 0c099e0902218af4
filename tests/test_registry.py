"""The hook-point registry is the one source of truth: every family's hook names, sizes and docs follow it."""

from pathlib import Path

import pytest
import torch

import mechscope
from mechscope import HookedModel, estimate_memory
from mechscope.core import hookpoints as H
from mechscope.core.config import describe, hook_names_from_config
from tiny import ARCHS, V, tiny_hf

TOKENS = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(3))
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("arch", ARCHS)
def test_hook_names_equal_the_registry_prediction_from_config(arch, tmp_path):
    hf = tiny_hf(arch, "eager")  # (Gemma 2 refuses sdpa)
    predicted = hook_names_from_config(hf.config)  # from the config alone, no weights
    assert HookedModel(hf).hook_names == predicted  # the model reads its facts from its modules
    hf.save_pretrained(tmp_path / "m")
    loaded = mechscope.load(str(tmp_path / "m"), attn_implementation="eager")  # weights loaded from disk
    assert loaded.hook_names == predicted
    assert estimate_memory(hf.config, cache_names="all", available=10**12, device="cpu").cache > 0


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma3", "phi3"])
def test_sizes_and_widths_match_real_activations(arch):
    hf = tiny_hf(arch)
    model = HookedModel(hf)
    dims = describe(hf.config).to_dict()
    _, cache = model.run_with_cache(TOKENS, names_filter=lambda n: True)
    B, P = TOKENS.shape
    for name in model.hook_names:
        assert H.numel(name, dims, B, P) == cache[name].numel(), name
        s = H.spec(name)
        if s.width_rule != "pattern":
            assert s.width(dims) == cache[name][0, 0].numel(), name


def test_gpt2_estimate_from_config_has_no_rotary_hooks_and_has_positions():
    import transformers as T

    names = hook_names_from_config(T.GPT2Config(n_layer=2))
    assert "hook_pos_embed" in names and not any("rot_" in n for n in names)
    names = hook_names_from_config(T.LlamaConfig(num_hidden_layers=2))
    assert "hook_pos_embed" not in names and "blocks.1.attn.hook_rot_k" in names and \
        "blocks.1.mlp.hook_pre_linear" in names


def test_shorthand_sites_and_docs_derive_from_the_registry():
    assert H.act_name("resid_post", 3) == "blocks.3.hook_resid_post"
    assert H.act_name("scores", 1) == "blocks.1.attn.hook_attn_scores"
    assert H.act_name("normalized", 2, "ln2") == "blocks.2.ln2.hook_normalized"
    with pytest.raises(KeyError, match="unknown activation shorthand"):
        H.act_name("resid_sideways", 0)
    for short, (suffix, axis) in H.PATCH_SITES.items():
        assert H.BY_SUFFIX[suffix].short == short and (axis is None) == (H.BY_SUFFIX[suffix].head_axis is None)
    # every patching site is an attribution site, except the MoE router's logits: HF routes from its own copy of them,
    # so their gradient is zero and only patching (which re-routes) measures them
    assert set(H.PATCH_SITES) - {"router_logits"} <= set(H.ATTRIB_SITES)
    assert set(H.ATTN_INTERNAL) == {"attn.hook_rot_q", "attn.hook_rot_k", "attn.hook_attn_scores",
                                    "attn.hook_pattern", "attn.hook_z"}
    hooks_doc = (ROOT / "docs" / "hooks.md").read_text()
    missing = [s.suffix for s in H.HOOK_SPECS if s.suffix not in hooks_doc]
    assert not missing, f"docs/hooks.md does not document {missing}"
