"""The offline size table and estimates before download: counts, hub ids offline, and the GPU table."""

import json
import math

import pytest

import mechscope
from mechscope import sizes
from mechscope.cli import main
from mechscope.compute import GPU_CLASSES_GB, config_for, gpu_fit

REQUIRED = ["openai-community/gpt2", "openai-community/gpt2-xl", "EleutherAI/pythia-70m", "EleutherAI/pythia-12b",
            "meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-13b-hf", "meta-llama/Llama-2-70b-hf",
            "meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.2-3B", "meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-70B",
            "mistralai/Mistral-7B-v0.1", "google/gemma-2b", "google/gemma-7b", "google/gemma-2-2b", "google/gemma-2-9b",
            "google/gemma-2-27b", "google/gemma-3-270m", "google/gemma-3-27b-pt", "Qwen/Qwen2.5-0.5B",
            "Qwen/Qwen2.5-72B", "Qwen/Qwen3-0.6B", "Qwen/Qwen3-32B", "microsoft/Phi-3-mini-4k-instruct",
            "microsoft/Phi-3-medium-4k-instruct", "HuggingFaceTB/SmolLM2-135M", "HuggingFaceTB/SmolLM2-360M",
            "HuggingFaceTB/SmolLM2-1.7B"]


def test_table_covers_the_families_and_cites_sources():
    rows = {r: sizes.lookup(r) for r in sizes.known_models()}
    assert len(rows) >= 50 and set(REQUIRED) <= set(rows)
    for rid, row in rows.items():
        for field in ("n_layers", "d_model", "n_heads", "n_kv_heads", "d_head", "d_mlp", "d_vocab", "n_ctx",
                      "tied_embeddings", "published_params"):
            assert field in row, (rid, field)
        assert row["source"].startswith("https://huggingface.co/") and row["params_source"], rid


def test_counts_from_the_table_agree_with_published_counts():
    off = {}
    for rid in sizes.known_models():
        row = sizes.lookup(rid)
        n = sizes.param_count(sizes.config_from_row(row))
        off[rid] = abs(n - row["published_params"]) / row["published_params"]
    bad = {k: f"{v:.2%}" for k, v in off.items() if v > 0.02}
    assert not bad, bad
    exact = [k for k, v in off.items() if v == 0]
    assert len(exact) >= 40  # most published counts are exact (safetensors metadata), the rest rounded


def test_param_count_is_exact_on_a_real_model():
    from tiny import tiny_hf

    for arch in ("gpt2", "gemma2", "phi3"):
        hf = tiny_hf(arch, "eager")
        assert sizes.param_count(hf.config) == sum(p.numel() for p in hf.parameters())


def test_hub_ids_answer_offline_including_fine_tunes(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty HF cache: only the table can answer
    cfg = config_for("meta-llama/Llama-3.1-8B-Instruct")
    assert cfg.num_hidden_layers == 32 and cfg.num_key_value_heads == 8
    est = mechscope.estimate_memory("meta-llama/Llama-3.1-8B", dtype="bfloat16", available=10**12, device="cpu")
    assert est.n_params == 8_030_261_248 and est.weights == 2 * est.n_params
    assert sizes.lookup("gpt2")["id"] == "openai-community/gpt2"
    with pytest.raises(mechscope.ModelNotFoundError, match="offline size table"):
        config_for("someone/not-a-model")


def test_gpu_table_counts_cards(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    fit = gpu_fit("meta-llama/Llama-3.1-70B", seq_len=512, sae_width=32768)
    assert {r["dtype"] for r in fit.rows} == {"bfloat16", "float32"} and len(fit.rows) == 8
    for r in fit.rows:
        for c in GPU_CLASSES_GB:
            n = r["gpus"][f"{c}GB"]
            assert n == math.ceil(r["bytes"] / int(0.9 * c * 1e9))
    inf = {r["dtype"]: r for r in fit.rows if r["workload"].startswith("inference")}
    weights_bf16 = 2 * fit.n_params  # 141 GB: more than one 141 GB card can hold, about two 80 GB cards
    assert inf["bfloat16"]["bytes"] > weights_bf16 and inf["bfloat16"]["gpus"]["141GB"] == 2
    assert inf["float32"]["bytes"] > 2 * weights_bf16  # float32 doubles the weights
    assert all(inf["float32"]["gpus"][c] >= inf["bfloat16"]["gpus"][c] for c in inf["float32"]["gpus"])
    assert "141GB" in fit.summary()


def test_cli_estimate_offline_json(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    assert main(["estimate", "--model", "google/gemma-2-2b", "--dtype", "bfloat16", "--seq-len", "256",
                 "--sae-width", "16384", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n_params"] == 2_614_341_888 and len(out["gpus"]["rows"]) == 8
    assert main(["estimate", "--model", "nobody/nothing"]) == 2
    assert "offline size table" in capsys.readouterr().err
