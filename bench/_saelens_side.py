"""The SAELens 6.54 side of bench/bench_saelens_roundtrip.py; runs in bench/.venv-saelens (never imports mechscope).

``fixtures OUT``: saves one small SAE of each architecture SAELens has, with SAELens's own ``save_model`` (BatchTopK
with ``save_inference_model``, which writes it as JumpReLU), plus the fields that mean something particular in
SAELens (``rescale_acts_by_decoder_norm``, ``apply_b_dec_to_input=False``, decoder rows that are not unit norm,
``normalize_activations``), and beside each folder ``expected.safetensors``: inputs ``x`` and what SAELens's own
``SAE.load_from_disk`` of that folder returns for ``encode(x)``, ``decode(encode(x))`` and ``forward(x)``.

``check DIR``: loads every folder under DIR (written by mechscope) with ``SAE.load_from_disk`` and prints, as one
JSON line, the largest difference of SAELens's ``encode``/``decode``/``forward`` from mechscope's (DIR/*/mechscope.safetensors).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

D_IN, D_SAE = 16, 48


def randomise(sae, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if name == "threshold":
                p.copy_(torch.rand(p.shape, generator=g) * 0.3 + 0.05)
            elif name == "W_dec":
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 + torch.rand(p.shape[0], 1, generator=g)))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def specs():
    """(folder name, config class, config kwargs, metadata) for every case."""
    import sae_lens as sl

    meta = {"hook_name": "blocks.1.hook_resid_post", "model_name": "toy"}
    tmeta = {"hook_name": "blocks.1.ln2.hook_normalized", "hook_name_out": "blocks.1.hook_mlp_out", "model_name": "toy"}
    base = {"d_in": D_IN, "d_sae": D_SAE}
    return [
        ("standard", sl.StandardSAEConfig, base, meta),
        ("standard_no_b_dec_in", sl.StandardSAEConfig, {**base, "apply_b_dec_to_input": False}, meta),
        ("topk", sl.TopKSAEConfig, {**base, "k": 6}, meta),
        ("topk_rescaled", sl.TopKSAEConfig, {**base, "k": 6, "rescale_acts_by_decoder_norm": True}, meta),
        ("jumprelu", sl.JumpReLUSAEConfig, base, meta),
        ("jumprelu_expected_average", sl.JumpReLUSAEConfig, {**base, "normalize_activations": "expected_average_only_in"}, meta),
        ("jumprelu_layer_norm", sl.JumpReLUSAEConfig, {**base, "normalize_activations": "layer_norm"}, meta),
        ("transcoder", sl.TranscoderConfig, {**base, "d_out": D_IN, "apply_b_dec_to_input": False}, tmeta),
        ("skip_transcoder", sl.SkipTranscoderConfig, {**base, "d_out": D_IN, "apply_b_dec_to_input": False}, tmeta),
        ("jumprelu_transcoder", sl.JumpReLUTranscoderConfig, {**base, "d_out": D_IN, "apply_b_dec_to_input": False}, tmeta),
        ("jumprelu_skip_transcoder", sl.JumpReLUSkipTranscoderConfig, {**base, "d_out": D_IN,
                                                                       "apply_b_dec_to_input": False}, tmeta),
    ]


def outputs(sae, x: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        f = sae.encode(x)
        return {"encode": f, "decode": sae.decode(f), "forward": sae(x)}


def fixtures(out: Path) -> None:
    import sae_lens as sl
    from sae_lens.saes.sae import SAEMetadata

    x = torch.randn(32, D_IN, generator=torch.Generator().manual_seed(99)) * 2
    for seed, (name, cfg_cls, kw, meta) in enumerate(specs()):
        cfg = cfg_cls(**kw)
        cfg.metadata = SAEMetadata(**meta)
        sae = sl.SAE.from_dict(cfg.to_dict())
        randomise(sae, seed)
        sae.save_model(out / name)
    # BatchTopK: a training SAE, saved for inference as JumpReLU with its learned global threshold
    cfg = sl.BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=6)
    cfg.metadata = SAEMetadata(hook_name="blocks.1.hook_resid_post", model_name="toy")
    sae = sl.BatchTopKTrainingSAE(cfg)
    randomise(sae, 50)
    sae.topk_threshold = torch.tensor(0.4)
    sae.save_inference_model(out / "batchtopk")
    # Matryoshka BatchTopK: also written for inference as JumpReLU, its prefix sizes in the metadata
    cfg = sl.MatryoshkaBatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=6, matryoshka_widths=[12, 24, D_SAE])
    cfg.metadata = SAEMetadata(hook_name="blocks.1.hook_resid_post", model_name="toy")
    sae = sl.MatryoshkaBatchTopKTrainingSAE(cfg)
    randomise(sae, 51)
    sae.topk_threshold = torch.tensor(0.4)
    sae.save_inference_model(out / "matryoshka_batchtopk")
    for folder in sorted(p for p in out.iterdir() if p.is_dir()):
        loaded = sl.SAE.load_from_disk(folder)
        save_file({"x": x, **outputs(loaded, x)}, str(folder / "expected.safetensors"))
    (out / "VERSION").write_text(sl.__version__ + "\n")


def check(folder: Path) -> None:
    import sae_lens as sl

    res = {}
    for sub in sorted(p for p in folder.iterdir() if (p / "cfg.json").exists()):
        try:
            sae = sl.SAE.load_from_disk(sub)
        except Exception as e:  # reported per folder: mechscope's writer must not produce one
            res[sub.name] = {"error": f"{type(e).__name__}: {e}"}
            continue
        ref = load_file(str(sub / "mechscope.safetensors"))
        got = outputs(sae, ref["x"])
        res[sub.name] = {"architecture": json.loads((sub / "cfg.json").read_text())["architecture"],
                         **{k: float((got[k] - ref[k]).abs().max()) for k in got}}
    print(json.dumps({"sae_lens": sl.__version__, "results": res}))


if __name__ == "__main__":
    {"fixtures": fixtures, "check": check}[sys.argv[1]](Path(sys.argv[2]))
