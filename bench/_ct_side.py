"""The circuit-tracer 0.5 side of bench/bench_circuit_tracer.py; runs in bench/.venv-ct (never imports mechscope).

Reads WORK/job.json (written by the mechscope side): the HF model folder, the prompt tokens, and the transcoders
already converted to circuit-tracer's layout (WORK/ct_transcoders.safetensors). Loads SmolLM2 three ways and
checks them against each other (HF transformers 4.57 with its config written out explicitly, since 4.57 misreads
a transformers-5 config's ``rope_parameters``; TransformerLens with an explicit config, since TL's generic Llama
branch defaults ``rotary_base`` to 10000), builds circuit-tracer's graph, and writes WORK/ct_graph.safetensors,
WORK/ct_result_CAP.json and circuit-tracer's own graph JSON under WORK/ct_json/.
Usage: python _ct_side.py WORK CAP [KIND] (CAP: max_feature_nodes, 0 for every active feature; KIND: ``plt`` the
converted per-layer transcoders, ``clt`` circuit-tracer's own ``load_clt`` on the CLT mechscope wrote to WORK/ms_clt,
``hub`` circuit-tracer's ``load_transcoder_from_hub`` on the reference in job.json's ``hub_ref``, offline from the
Hugging Face cache the mechscope side made). Results of a KIND other than ``plt`` carry it in their file names.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from _graph_run import rss_gib  # this folder's helper; it imports mechscope only when run as a script


def hf_model(folder: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    raw = json.loads((Path(folder) / "config.json").read_text())
    theta = (raw.get("rope_parameters") or {}).get("rope_theta", raw.get("rope_theta"))
    cfg = LlamaConfig(vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"],
                      intermediate_size=raw["intermediate_size"], num_hidden_layers=raw["num_hidden_layers"],
                      num_attention_heads=raw["num_attention_heads"], num_key_value_heads=raw["num_key_value_heads"],
                      hidden_act=raw["hidden_act"], max_position_embeddings=raw["max_position_embeddings"],
                      rms_norm_eps=raw["rms_norm_eps"], rope_theta=theta, tie_word_embeddings=raw["tie_word_embeddings"],
                      head_dim=raw.get("head_dim"), attention_bias=False, mlp_bias=False,
                      bos_token_id=raw.get("bos_token_id"), eos_token_id=raw.get("eos_token_id"))
    model = LlamaForCausalLM(cfg)
    state = load_file(str(Path(folder) / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    return model.eval(), cfg


def tl_config(cfg, folder: str):
    from transformer_lens import HookedTransformerConfig

    return HookedTransformerConfig(
        d_model=cfg.hidden_size, d_head=cfg.head_dim, n_heads=cfg.num_attention_heads,
        n_key_value_heads=cfg.num_key_value_heads, d_mlp=cfg.intermediate_size, n_layers=cfg.num_hidden_layers,
        n_ctx=2048, d_vocab=cfg.vocab_size, act_fn="silu", normalization_type="RMS", eps=cfg.rms_norm_eps,
        positional_embedding_type="rotary", rotary_base=cfg.rope_theta, rotary_dim=cfg.head_dim,
        rotary_adjacent_pairs=False, gated_mlp=True, final_rms=True, original_architecture="LlamaForCausalLM",
        tokenizer_name=folder, default_prepend_bos=False, dtype=torch.float32, device="cpu")


def tokenizer(folder: str, out: Path) -> str:
    """The model's tokenizer re-saved in transformers 4.57's layout (4.57 cannot read transformers 5's
    ``TokenizersBackend`` class name); returns the folder."""
    from transformers import PreTrainedTokenizerFast

    cfg = json.loads((Path(folder) / "tokenizer_config.json").read_text())
    special = {k: cfg[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token") if isinstance(cfg.get(k), str)}
    tok = PreTrainedTokenizerFast(tokenizer_file=str(Path(folder) / "tokenizer.json"), **special)
    tok.save_pretrained(str(out))
    return str(out)


def transcoders(path: str, n_layers: int, skip: bool):
    from circuit_tracer.transcoder import SingleLayerTranscoder, TranscoderSet
    from circuit_tracer.transcoder.activation_functions import JumpReLU

    w = load_file(path)
    out = {}
    for layer in range(n_layers):
        p = f"layer{layer}."
        d_sae, d = w[p + "W_enc"].shape
        tc = SingleLayerTranscoder(d, d_sae, JumpReLU(w[p + "threshold"]), layer, skip_connection=skip,
                                   device=torch.device("cpu"), dtype=torch.float32)
        with torch.no_grad():
            for name in ("W_enc", "W_dec", "b_enc", "b_dec") + (("W_skip",) if skip else ()):
                getattr(tc, name).copy_(w[p + name])
        out[layer] = tc
    return TranscoderSet(out, feature_input_hook="mlp.hook_in", feature_output_hook="hook_mlp_out",
                         scan="mechscope-parity")


def replacement(work: Path, job: dict, kind: str, n_layers: int):
    """What circuit-tracer builds its graph on: loaded by its own loaders from mechscope's files."""
    if kind == "plt":
        return transcoders(str(work / "ct_transcoders.safetensors"), n_layers, job["skip"])
    if kind == "clt":
        from circuit_tracer.transcoder.cross_layer_transcoder import load_clt

        return load_clt(str(work / "ms_clt"), feature_input_hook=job["clt_input_hook"], feature_output_hook="hook_mlp_out",
                        scan="mechscope-clt-parity", device=torch.device("cpu"), dtype=torch.float32, lazy_decoder=True)
    from circuit_tracer.utils.hf_utils import load_transcoder_from_hub

    tcs, _ = load_transcoder_from_hub(job["hub_ref"], device=torch.device("cpu"), dtype=torch.float32, use_cache=False)
    return tcs


def main(work: Path) -> None:
    from circuit_tracer import attribute
    from circuit_tracer.graph import compute_graph_scores
    from circuit_tracer.replacement_model.replacement_model_transformerlens import TransformerLensReplacementModel
    from circuit_tracer.utils.create_graph_files import create_graph_files
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights
    from transformers import AutoTokenizer

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", 2)))
    job = json.loads((work / "job.json").read_text())
    tokens = torch.tensor(job["tokens"])
    hf, cfg = hf_model(job["model_folder"])
    with torch.no_grad():
        hf_logits = hf(tokens[None]).logits[0].float()
    ms_logits = load_file(str(work / "ms_logits.safetensors"))["logits"]
    res = {"hf_vs_mechscope_logits": float((hf_logits - ms_logits).abs().max())}
    tlcfg = tl_config(cfg, tokenizer(job["model_folder"], work / "ct_tokenizer"))
    state = convert_llama_weights(hf, tlcfg)
    kind = sys.argv[3] if len(sys.argv) > 3 else "plt"
    tag = "" if kind == "plt" else f"_{kind}"
    tcs = replacement(work, job, kind, tlcfg.n_layers)
    model = TransformerLensReplacementModel(tlcfg, tokenizer=AutoTokenizer.from_pretrained(tlcfg.tokenizer_name))
    model.load_and_process_state_dict(state, fold_ln=False, center_writing_weights=False, center_unembed=False)
    model._configure_replacement_model(tcs)
    with torch.no_grad():
        tl_logits = model(tokens[None])[0].float()
    res["transformerlens_vs_hf_logits"] = float((tl_logits - hf_logits).abs().max())
    cap = int(sys.argv[2])
    t0 = time.perf_counter()
    graph = attribute(tokens, model, max_feature_nodes=cap or None, batch_size=job["batch_size"], verbose=False)
    res["seconds"] = time.perf_counter() - t0
    res["peak_rss_gib"] = rss_gib("VmHWM")
    res["replacement"], res["completeness"] = compute_graph_scores(graph)
    res["n_active"] = int(graph.active_features.shape[0])
    feats = graph.active_features[graph.selected_features]
    if cap:  # the capped run is for time and memory only
        (work / f"ct_result{tag}_{cap}.json").write_text(json.dumps(res, indent=2))
        return
    save_file({"adjacency": graph.adjacency_matrix.contiguous(), "features": feats.contiguous(),
               "tokens": graph.input_tokens.cpu().contiguous(), "logit_probs": graph.logit_probabilities.cpu(),
               "logit_ids": torch.tensor([t.vocab_idx for t in graph.logit_targets])},
              str(work / f"ct_graph{tag}.safetensors"))
    if kind == "plt":
        graph.to_pt(str(work / "ct_graph.pt"))
        res["dense_file_bytes"] = (work / "ct_graph.pt").stat().st_size
        create_graph_files(graph, "ct-parity", str(work / "ct_json"), scan="mechscope-parity")
    (work / f"ct_result{tag}_{cap}.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
