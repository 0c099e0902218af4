"""A randomly initialised ~1.1B-parameter Llama (TinyLlama's shapes), built once and cached as safetensors.

Used by the slow big-model tests and by ``bench/bench_big.py``. It is saved under
``$MECHSCOPE_CACHE/test-models/`` (atomically), so a second run reads it from disk.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SHAPES = dict(num_hidden_layers=22, hidden_size=2048, num_attention_heads=32, num_key_value_heads=4,
              intermediate_size=5632, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False)


def big_llama_dir() -> Path:
    """The folder of the cached 1.1B model (built on first use: about 4.4 GB in float32)."""
    import fcntl

    import torch
    import transformers as T

    from mechscope.core.files import atomic_dir
    from mechscope.loading import cache_dir

    path = cache_dir() / "test-models" / "llama-1.1b-random-v1"
    if (path / "config.json").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / ".llama-1.1b.lock", "w") as lock:  # one builder across xdist workers: 4.4 GB each
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (path / "config.json").exists():
            return path
        cfg = T.LlamaConfig(**SHAPES)
        torch.manual_seed(0)
        with atomic_dir(path, replace=False) as tmp:
            model = T.LlamaForCausalLM(cfg)
            model.save_pretrained(tmp, safe_serialization=True)
            (tmp / "mechscope_source.json").write_text(json.dumps({"built_by": "tests/big.py", "shapes": SHAPES}))
            del model
    return path


CODE = r"""
import json, sys, time, torch, psutil
import mechscope
torch.set_grad_enabled(False)
phase, path = sys.argv[1], sys.argv[2]
extra = json.loads(sys.argv[3])
torch.set_num_threads(extra.get("threads", torch.get_num_threads()))  # the parent's: same reductions, same bits
base = psutil.Process().memory_info().rss
B, P = extra.get("batch", 4), extra.get("seq", 512)
out = {}
if phase == "offload":
    model = mechscope.load(path, max_memory={"cpu": extra["budget"]}, offload_folder=extra["folder"])
    out["device_map"] = sorted(set(model.cfg.device_map.values()))
else:
    model = mechscope.load(path)
for p in model.hf.parameters():  # safetensors maps the file lazily: touch every weight so that it is resident
    p.data.view(-1)[::512].sum()
toks = torch.randint(100, 30000, (B, P), generator=torch.Generator().manual_seed(0))
hooks = [f"blocks.{l}.hook_resid_post" for l in (5, 10, 15)]
if phase == "forward":
    logits = model(toks)
elif phase == "cache":
    logits, cache = model.run_with_cache(toks, names_filter=hooks)
elif phase == "patch":
    from mechscope.techniques.patching import patch
    Pp = extra["patch_len"]
    clean = toks[:, :Pp]
    corr = clean.clone(); corr[0, 3] = 555
    res = patch(model, clean, corr, lambda lg: lg[:, -1, 7] - lg[:, -1, 9], site="resid_pre",
                layers=list(range(0, 22, 3)), batch_size=extra["rows"])
    out["stats"] = res.stats
elif phase == "offload":
    logits = model(toks)
    torch.save(logits[:, -4:].clone(), extra["logits_out"])
elif phase == "timing":  # interleaved pairs: this VM's speed drifts by ~20% between runs
    hf, ratios, bare_t = model.hf, [], []
    for i in range(extra["reps"] + 1):
        t0 = time.perf_counter()
        hf(input_ids=toks)
        t1 = time.perf_counter()
        model.run_with_cache(toks, names_filter=hooks)
        t2 = time.perf_counter()
        if i:
            ratios.append((t2 - t1) / (t1 - t0))
            bare_t.append(t1 - t0)
    ratios.sort()
    out["median_ratio"], out["min_ratio"], out["bare"] = ratios[len(ratios) // 2], ratios[0], min(bare_t)
from mechscope.compute import peak_rss
peak = peak_rss()  # VmHWM: ru_maxrss would carry the parent process's peak across fork + exec
out["measured"] = peak - base
print(json.dumps(out))
"""


def run(phase: str, path: str, **extra) -> dict:
    """Run one measured phase (``CODE``) in a fresh process; returns its JSON line."""
    import torch

    extra.setdefault("threads", torch.get_num_threads())
    r = subprocess.run([sys.executable, "-c", CODE, phase, path, json.dumps(extra)], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])



if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(big_llama_dir())
