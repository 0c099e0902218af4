"""mechscope's patching engine against TransformerLens 4.3's get_act_patch_resid_pre, in one run.

TransformerLens lives in its own virtual environment (it must never be a dependency of the
package): `make bench-tl` creates bench/.venv-tl, or set TL_PYTHON to a Python that has
transformer-lens installed. The model is a randomly initialised GPT-2-architecture model the size
of SmolLM2-135M (30 layers, d_model 576, 9 heads, vocabulary 49,152), saved to a temporary folder
and loaded by both tools from there (TransformerBridge.boot_transformers on the local folder).
"""

import json
import os
import subprocess
import tempfile
from pathlib import Path

import torch

import mechscope
from _engine_timing import time_engine
from mechscope.analysis.metrics import logit_diff

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORR = "When Mary and John went to the store, Mary gave a drink to"

TL_CODE = r"""
import json, sys, time, torch
from transformer_lens.model_bridge import TransformerBridge
from transformer_lens import patching
folder, clean, corr, a, b = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.set_grad_enabled(False)
model = TransformerBridge.boot_transformers(folder, device="cpu")
clean, corr = torch.tensor(clean), torch.tensor(corr)
_, clean_cache = model.run_with_cache(clean)
metric = lambda lg: (lg[:, -1, a] - lg[:, -1, b]).mean()
t = time.perf_counter()
res = patching.get_act_patch_resid_pre(model, corr, clean_cache, metric)
print(json.dumps({"seconds": time.perf_counter() - t, "values": res.tolist()}))
"""


def tl_python():
    cand = os.environ.get("TL_PYTHON") or str(Path(__file__).parent / ".venv-tl" / "bin" / "python")
    return cand if Path(cand).exists() else None


def main():
    py = tl_python()
    if py is None:
        print("TransformerLens is not installed: run `make bench-tl` (creates bench/.venv-tl) or set TL_PYTHON")
        return
    from transformers import GPT2Config, GPT2LMHeadModel

    smol = mechscope.load("smollm2-135m")
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=smol.cfg.d_vocab, n_embd=576, n_layer=30, n_head=9, n_positions=2048,
                     bos_token_id=smol.tokenizer.bos_token_id, eos_token_id=smol.tokenizer.eos_token_id)
    with tempfile.TemporaryDirectory() as folder:
        GPT2LMHeadModel(cfg).save_pretrained(folder)
        smol.tokenizer.save_pretrained(folder)
        model = mechscope.load(folder)
        clean, corr = model.to_tokens(CLEAN), model.to_tokens(CORR)
        a, b = model.to_single_token(" Mary"), model.to_single_token(" John")
        metric = lambda lg: logit_diff(lg, a, b).mean()  # noqa: E731
        out = subprocess.run([py, "-c", TL_CODE, folder, json.dumps(clean.tolist()), json.dumps(corr.tolist()),
                              str(a), str(b)], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if out.returncode != 0:
            print("TransformerLens run failed:\n" + out.stderr[-3000:])
            return
        tl = json.loads(out.stdout.strip().splitlines()[-1])
        ours, t_ours, every, t_every = time_engine(model, clean, corr, metric)
    diff = float((ours.values - torch.tensor(tl["values"])).abs().max())
    P = clean.shape[1]
    print(f"resid_pre patching sweep, GPT-2 architecture at SmolLM2-135M size, 30 layers x {P} positions")
    print(f"  TransformerLens 4.3 get_act_patch_resid_pre  {tl['seconds']:7.2f} s")
    print(f"  mechscope patch                              {t_ours:7.2f} s   {tl['seconds'] / t_ours:5.1f}x faster")
    print(f"  mechscope patch, running every patch         {t_every:7.2f} s   {tl['seconds'] / t_every:5.1f}x faster")
    print(f"  max |mechscope - TransformerLens| = {diff:.2e}  (TransformerLens forces eager attention)")


if __name__ == "__main__":
    main()
