"""Rows after a shared prefix, the prefix run once, equal the rows run in full, on every supported family."""

import pytest
import torch
import transformers as T

from mechscope import HookedModel
from mechscope.core.errors import InputError
from mechscope.techniques.patch_engine import kv_hook_names, kv_prefix_exact
from mechscope.techniques.shared_prefix import SharedPrefix, common_prefix_length, group_rows, next_token_logprobs
from tiny import ARCHS, SLIDING, V, tiny_hf

G = torch.Generator().manual_seed(0)
PREFIX = torch.randint(3, V, (9,), generator=G).tolist()
ROWS = [PREFIX + torch.randint(3, V, (int(n),), generator=G).tolist() for n in (1, 4, 2, 6, 3, 5, 1)]
TARGETS = [5, 17, 40]


def _full(model, rows, targets):
    with torch.no_grad():
        return torch.stack([model(torch.tensor([r]))[0, -1].float().log_softmax(-1)[targets] for r in rows])


@pytest.mark.parametrize("arch", ARCHS)
def test_logprobs_after_a_shared_prefix_equal_full_rows(arch):
    """Ragged rows (left-padded after the prefix, in batches of 3) give each row's own next-token log-probabilities.
    Falcon (keys rotated past the hooks) and the sliding-window families (window 4 < these rows) run in full."""
    model = HookedModel(tiny_hf(arch))
    got = next_token_logprobs(model, ROWS, TARGETS, batch=3)
    torch.testing.assert_close(got, _full(model, ROWS, TARGETS), atol=1e-4, rtol=1e-4)
    shared = SharedPrefix(model, PREFIX, longest=max(map(len, ROWS)))
    assert shared.cached == (not arch.startswith("falcon") and arch not in SLIDING)


def _tree_rows():
    """Autointerp's shape: prefix + text + question + explanation + end, each text asked with two explanations."""
    g = torch.Generator().manual_seed(1)
    texts = [torch.randint(3, V, (int(n),), generator=g).tolist() for n in (5, 9, 7, 12, 6)]
    question, end = [11, 12, 13, 14], [15, 16]
    explain = [torch.randint(3, V, (n,), generator=g).tolist() for n in (2, 4)]
    return [PREFIX + t + question + e + end for t in texts for e in explain] + [PREFIX + [20, 21]]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3", "falcon", "qwen3_moe"])
def test_rows_grouped_by_their_shared_text_equal_full_rows(arch):
    """Each text's two rows run their text once (a head on the prefix's keys and values), then each its own end."""
    model = HookedModel(tiny_hf(arch))
    rows = _tree_rows()
    after = [r[len(PREFIX):] for r in rows]
    groups = group_rows(after)
    assert sorted(len(m) for _, m in groups) == [1] + [2] * 5 and sorted(i for _, m in groups for i in m) == list(
        range(len(rows)))
    for head, members in groups:  # a head is what its rows share, each keeping a token of its own
        assert all(after[i][:head] == after[members[0]][:head] and len(after[i]) > head for i in members)
        assert len(members) == 1 and head == 0 or head == common_prefix_length([after[i] for i in members])
    for batch in (3, 4, 64):  # a batch holds whole groups
        torch.testing.assert_close(next_token_logprobs(model, rows, TARGETS, batch=batch), _full(model, rows, TARGETS),
                                   atol=1e-4, rtol=1e-4)


def test_a_sliding_window_longer_than_the_rows_shares_the_prefix():
    torch.manual_seed(0)
    cfg = T.MistralConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=64, sliding_window=16)
    model = HookedModel(T.AutoModelForCausalLM.from_config(cfg).eval())
    assert SharedPrefix(model, PREFIX, longest=15).cached and not SharedPrefix(model, PREFIX, longest=17).cached
    torch.testing.assert_close(next_token_logprobs(model, ROWS, TARGETS, batch=4), _full(model, ROWS, TARGETS),
                               atol=1e-4, rtol=1e-4)
    # every row fits the window, but a long head beside a long tail pads the batch past it: those rows run in full
    heads, tails = [[30, 31, 32, 33, 34], []], [[[35]], [[36, 37, 38, 39, 40, 41]]]
    rows = [PREFIX + h + r for h, t in zip(heads, tails) for r in t]
    assert max(map(len, rows)) <= 16 < len(PREFIX) + 5 + 6
    got = SharedPrefix(model, PREFIX, longest=16).run_groups(heads, tails).float().log_softmax(-1)[:, TARGETS]
    torch.testing.assert_close(got, _full(model, rows, TARGETS), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_key_and_value_hooks_hold_what_hf_caches(arch):
    """Where mechscope reuses a prefix's keys and values (the patching engine, the rows above), its k/v hooks hold
    exactly what HF's own cache holds (this caught GPT-BigCode's multi-head layout: per head [q k v], not
    [q | k | v])."""
    model = HookedModel(tiny_hf(arch))
    if not kv_prefix_exact(model):
        assert arch.startswith("falcon")  # the one family that rotates keys inside its own attention code
        return
    toks = torch.tensor([ROWS[3]])
    knames, vnames = kv_hook_names(model)
    with torch.no_grad():
        hf_cache = model.hf(input_ids=toks, use_cache=True).past_key_values
        _, cache = model.run_with_cache(toks, names_filter=knames + vnames)
    for layer, (kn, vn) in enumerate(zip(knames, vnames)):
        keys, values = hf_cache.layers[layer].keys, hf_cache.layers[layer].values  # [batch, kv heads, pos, d_head]
        n = keys.shape[2]  # a sliding layer keeps only its window
        torch.testing.assert_close(cache[kn].transpose(1, 2)[:, :, -n:], keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cache[vn].transpose(1, 2)[:, :, -n:], values, atol=1e-5, rtol=1e-5)


def test_common_prefix_and_errors():
    assert common_prefix_length([[1, 2, 3], [1, 2, 4], [1, 2, 3, 5]]) == 2
    assert common_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2  # every row keeps a token of its own
    assert common_prefix_length([[7], [7]]) == 0 and common_prefix_length([]) == 0
    model = HookedModel(tiny_hf("llama"))
    assert next_token_logprobs(model, [], TARGETS).shape == (0, 3)
    with pytest.raises(InputError, match="at least one token"):
        next_token_logprobs(model, [[1, 2], []], TARGETS)
    with pytest.raises(InputError, match="outside the vocabulary"):
        next_token_logprobs(model, ROWS, [V + 3])
    with pytest.raises(InputError, match="at least one token after the prefix"):
        SharedPrefix(model, PREFIX).run([[4], []])
    # a short common prefix is not worth a pass of its own: the rows run in full
    assert not SharedPrefix(model, [1, 2, 3]).cached
