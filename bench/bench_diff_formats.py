"""Adapters and crosscoders in the peers' own layouts, both ways: `make bench-diff-formats`.

peft 0.21 and science-of-finetuning's dictionary_learning fork (crosscoder_learning, a git checkout given with
--dl-repo or $DL_REPO) live in bench/.venv-diff (never mechscope dependencies) and run in a subprocess
(bench/_diff_side.py).

1. With --fixtures: peft writes LoRA adapters (rank and alpha patterns, rsLoRA, a DoRA one mechscope must refuse) on a
   tiny Llama, and dictionary_learning writes a BatchTopKCrossCoder (with its activation normaliser) and an L1
   CrossCoder, each with its own outputs beside it, into tests/fixtures/diffing/, which tests/test_diffing.py checks
   in CI (no peer needed there).
2. The other direction: mechscope trains a crosscoder of each architecture and a LoRA adapter for a few steps, saves
   them in the peers' layouts, and the peers' own loaders must give mechscope's outputs (goal: 1e-5).

Usage: python bench/bench_diff_formats.py [--fixtures] [--dl-repo PATH]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

HERE = Path(__file__).parent
PY = HERE / ".venv-diff" / "bin" / "python"
FIXTURES = HERE.parent / "tests" / "fixtures" / "diffing"
sys.path.insert(0, str(HERE.parent / "tests"))


def side(*args: str) -> str:
    r = subprocess.run([str(PY), str(HERE / "_diff_side.py"), *args], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"the peers' side failed:\n{r.stderr[-4000:]}")
    return r.stdout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fixtures", action="store_true", help="write tests/fixtures/diffing again with the peers")
    p.add_argument("--dl-repo", default=os.environ.get("DL_REPO"),
                   help="a git checkout of github.com/science-of-finetuning/crosscoder_learning")
    a = p.parse_args()
    if not PY.exists():
        raise SystemExit("bench/.venv-diff is missing: make bench-diff-formats creates it")
    if not a.dl_repo:
        raise SystemExit("give --dl-repo (or $DL_REPO): a checkout of science-of-finetuning/crosscoder_learning")
    if a.fixtures:
        tmp = Path(tempfile.mkdtemp(prefix="diff-fixtures-"))
        side("fixtures", str(tmp), a.dl_repo)
        shutil.rmtree(FIXTURES, ignore_errors=True)
        shutil.copytree(tmp, FIXTURES)
        shutil.rmtree(tmp)
        print(f"wrote {FIXTURES}")
    from mechscope import HookedModel, load
    from mechscope.diffing import LoraAdapter, load_pair
    from mechscope.sae.crosscoder import CrosscoderConfig, load_crosscoder, save_crosscoder
    from mechscope.sae.train import TrainConfig, fit_sae

    worst = 0.0
    # 1. the fixtures the peers wrote, read by mechscope
    exp = load_file(str(FIXTURES / "crosscoder" / "expected.safetensors"))
    for name in ("batchtopk", "l1"):
        cc = load_crosscoder(FIXTURES / "crosscoder" / name, hooks="blocks.1.hook_resid_post")
        with torch.no_grad():
            err = float((cc(exp["input"]) - exp[f"{name}_forward"]).abs().max())
        worst = max(worst, err)
        print(f"dictionary_learning {name} crosscoder read by mechscope: max |forward difference| {err:.2e}")
    pexp = load_file(str(FIXTURES / "peft" / "expected.safetensors"))
    for name in ("lora", "rslora"):
        pair = load_pair(load(str(FIXTURES / "peft" / "base")), FIXTURES / "peft" / name)
        with torch.no_grad(), pair.side("ft") as m:
            err = float((m(pexp["tokens"]) - pexp[name]).abs().max())
        worst = max(worst, err)
        print(f"peft {name} adapter read by mechscope: max |logit difference| {err:.2e}")
        pair.adapter.detach()
    # 2. written by mechscope, read by the peers
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        rows = torch.randn(2000, 32, generator=torch.Generator().manual_seed(0))
        x = torch.randn(6, 2, 16, generator=torch.Generator().manual_seed(1)) * 2
        save_file({"input": x}, str(d / "input.safetensors"))
        for arch in ("batchtopk", "relu"):
            cfg = CrosscoderConfig(d_model=16, d_sae=64, hooks=("blocks.1.hook_resid_post",), architecture=arch, k=4,
                                   l1_coefficient=0.05)
            cc = fit_sae(rows, cfg, TrainConfig(steps=50, batch_size=128, lr=3e-3), progress=False).sae
            save_crosscoder(cc, d / arch)
            side("read-crosscoder", str(d / arch), str(d / "input.safetensors"), str(d / f"{arch}.out"), a.dl_repo)
            got = load_file(str(d / f"{arch}.out"))
            with torch.no_grad():
                f = cc.encode(x)
                errs = [float((got["f"] - f).abs().max()), float((got["x_hat"] - cc.decode(f)).abs().max()),
                        float((got["forward"] - cc(x)).abs().max())]
            worst = max(worst, *errs)
            print(f"mechscope {arch} crosscoder read by dictionary_learning: max |difference| latents {errs[0]:.2e}, "
                  f"decode {errs[1]:.2e}, forward {errs[2]:.2e}")
        from tiny import tiny_hf

        base = tiny_hf("llama")
        base.save_pretrained(d / "base")
        m = HookedModel(tiny_hf("llama"))
        ad = LoraAdapter.new(m.hf, r=4, seed=0)
        with torch.no_grad():
            for n in ad.names:
                ad.layer(n).B.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(n)))
        ad.save(d / "adapter", base_model=str(d / "base"))
        tokens = torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(2))
        save_file({"tokens": tokens}, str(d / "tokens.safetensors"))
        side("read-adapter", str(d / "base"), str(d / "adapter"), str(d / "tokens.safetensors"), str(d / "peft.out"))
        got = load_file(str(d / "peft.out"))
        pair = load_pair(m, d / "adapter", check_base=False)
        with pair.side("ft") as ft:
            on = ft(tokens)
        with pair.side("base") as b:
            off = b(tokens)
        errs = [float((got["on"] - on).abs().max()), float((got["off"] - off).abs().max())]
        worst = max(worst, *errs)
        print(f"mechscope LoRA adapter read by peft: max |logit difference| adapter on {errs[0]:.2e}, off {errs[1]:.2e}")
    print(f"\nworst difference over every check: {worst:.2e} (goal 1e-5): {'met' if worst <= 1e-5 else 'NOT met'}")


if __name__ == "__main__":
    main()
