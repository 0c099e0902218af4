"""The peers' side of bench/bench_diff_formats.py, run in bench/.venv-diff (never a mechscope dependency): peft, and
science-of-finetuning's dictionary_learning fork (crosscoder_learning), imported from a checkout without its
``__init__`` (which pulls nnsight for its activation buffer, unused here).

    python _diff_side.py fixtures OUT DL_REPO      write the fixtures (files in each tool's own layout + its outputs)
    python _diff_side.py read-adapter BASE ADAPTER TOKENS OUT   peft's logits of BASE + ADAPTER on TOKENS
    python _diff_side.py read-crosscoder FOLDER INPUT OUT DL_REPO  dictionary_learning's outputs of FOLDER on INPUT
"""

from __future__ import annotations

import importlib
import json
import sys
import types
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def dictionary_learning(repo: str):
    """``dictionary_learning.dictionary`` from a checkout, its package ``__init__`` skipped."""
    pkg = types.ModuleType("dictionary_learning")
    pkg.__path__ = [str(Path(repo) / "dictionary_learning")]
    sys.modules["dictionary_learning"] = pkg
    return importlib.import_module("dictionary_learning.dictionary")


def tiny_llama(seed: int = 0):
    import transformers as T

    torch.manual_seed(seed)
    cfg = T.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=64)
    return T.AutoModelForCausalLM.from_config(cfg).eval()


def peft_fixtures(out: Path) -> None:
    from peft import LoraConfig, get_peft_model

    base = tiny_llama()
    base.save_pretrained(out / "base", safe_serialization=True)
    tokens = torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    expected = {"tokens": tokens, "base": base(tokens).logits.detach()}
    variants = {
        "lora": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                           rank_pattern={"down_proj": 2}, alpha_pattern={"down_proj": 6}, init_lora_weights=False),
        "rslora": LoraConfig(r=4, lora_alpha=8, target_modules=["k_proj", "o_proj", "up_proj"], use_rslora=True,
                             init_lora_weights=False),
    }
    for name, cfg in variants.items():
        torch.manual_seed(2)
        m = get_peft_model(tiny_llama(), cfg)
        m.save_pretrained(out / name)
        expected[name] = m(tokens).logits.detach()
        with m.disable_adapter():
            expected[f"{name}_off"] = m(tokens).logits.detach()
    dora = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    dora.save_pretrained(out / "dora")
    save_file({k: v.contiguous() for k, v in expected.items()}, str(out / "expected.safetensors"))


def crosscoder_fixtures(out: Path, repo: str) -> None:
    D = dictionary_learning(repo)
    g = torch.Generator().manual_seed(3)
    S, d, F = 2, 8, 16
    mean, std = torch.randn(S, d, generator=g) * 0.3, torch.rand(S, d, generator=g) + 0.5
    btk = D.BatchTopKCrossCoder(d, F, S, k=3, activation_mean=mean, activation_std=std)
    l1 = D.CrossCoder(d, F, S)
    with torch.no_grad():
        for cc in (btk, l1):
            cc.encoder.weight.copy_(torch.randn(S, d, F, generator=g) * 0.4)
            cc.encoder.bias.copy_(torch.randn(F, generator=g) * 0.1)
            cc.decoder.weight.copy_(torch.randn(S, F, d, generator=g) * 0.3)
            cc.decoder.bias.copy_(torch.randn(S, d, generator=g) * 0.1)
        btk.threshold.fill_(0.25)
    x = torch.randn(6, S, d, generator=g) * 2
    expected = {"input": x}
    for name, cc in (("batchtopk", btk), ("l1", l1)):
        cc.save_pretrained(str(out / name))
        with torch.no_grad():
            f = cc.encode(x)
            expected[f"{name}_f"] = f
            expected[f"{name}_x_hat"] = cc.decode(f)
            expected[f"{name}_forward"] = cc(x)
    save_file({k: v.contiguous() for k, v in expected.items()}, str(out / "expected.safetensors"))


def main() -> None:
    mode = sys.argv[1]
    if mode == "fixtures":
        out, repo = Path(sys.argv[2]), sys.argv[3]
        (out / "peft").mkdir(parents=True, exist_ok=True)
        (out / "crosscoder").mkdir(parents=True, exist_ok=True)
        peft_fixtures(out / "peft")
        crosscoder_fixtures(out / "crosscoder", repo)
        import subprocess

        import peft
        import transformers

        commit = subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        (out / "VERSION").write_text(json.dumps({"peft": peft.__version__, "transformers": transformers.__version__,
                                                 "torch": torch.__version__, "dictionary_learning":
                                                 f"science-of-finetuning/crosscoder_learning@{commit or '?'}"}))
    elif mode == "read-adapter":
        import transformers as T
        from peft import PeftModel

        base = T.AutoModelForCausalLM.from_pretrained(sys.argv[2]).eval()
        m = PeftModel.from_pretrained(base, sys.argv[3]).eval()
        tokens = load_file(sys.argv[4])["tokens"]
        with torch.no_grad():
            on = m(tokens).logits
            with m.disable_adapter():
                off = m(tokens).logits
        save_file({"on": on.contiguous(), "off": off.contiguous()}, sys.argv[5])
    elif mode == "read-crosscoder":
        D = dictionary_learning(sys.argv[5])
        cls = D.BatchTopKCrossCoder if json.loads((Path(sys.argv[2]) / "config.json").read_text()).get(
            "dict_class") == "BatchTopKCrossCoder" else D.CrossCoder
        cc = cls.from_pretrained(sys.argv[2], from_hub=True)
        x = load_file(sys.argv[3])["input"]
        with torch.no_grad():
            f = cc.encode(x)
            save_file({"f": f.contiguous(), "x_hat": cc.decode(f).contiguous(), "forward": cc(x).contiguous()},
                      sys.argv[4])
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
