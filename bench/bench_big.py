"""A ~1.1B-parameter Llama on this CPU: estimate_memory against measured peaks, disk offload, hook overhead.

The model is random (TinyLlama's shapes, built once by ``tests/big.py``). Each phase runs in a
fresh process; "measured" is the peak resident memory of that process minus its resident memory
after importing mechscope (``mechscope.compute.peak_rss``: VmHWM), and the estimate is ``estimate_memory`` for the same
workload. The offloaded load uses ``max_memory`` of half the weights plus ``offload_folder``.
Hook overhead: a forward pass with 3 cached hooks against the bare HF forward pass, interleaved.
"""

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

def main() -> None:
    import torch

    import mechscope
    from big import big_llama_dir, run

    path = str(big_llama_dir())
    g = 1024**3

    def est(**kw):
        return mechscope.estimate_memory(path, available=10**13, device="cpu", **kw)

    hooks = ["blocks.5.hook_resid_post", "blocks.10.hook_resid_post", "blocks.15.hook_resid_post"]
    cases = [  # (label, phase, sizes for the run, the estimate of the same workload)
        ("load (weights resident)", "load", {}, est(batch=0)),
        ("forward 4 x 512", "forward", {"batch": 4, "seq": 512}, est(batch=4, seq_len=512)),
        ("3-hook cache 4 x 512", "cache", {"batch": 4, "seq": 512}, est(batch=4, seq_len=512, cache_names=hooks)),
        ("patching sweep, 64 rows x 16", "patch", {"batch": 1, "seq": 16, "patch_len": 16, "rows": 64},
         est(batch=0, seq_len=16, patch_rows=64)),
    ]
    print("estimate_memory vs measured peak RSS (above the post-import baseline), 1.1B Llama, fp32 CPU")
    print(f"{'workload':>30} {'estimate GiB':>13} {'measured GiB':>13} {'est/meas':>9}")
    for label, phase, extra, e in cases:
        m = run(phase, path, **extra)
        print(f"{label:>30} {e.total / g:13.3f} {m['measured'] / g:13.3f} {e.total / m['measured']:9.3f}")

    weights = est(batch=0).weights
    with tempfile.TemporaryDirectory() as tmp:
        m_off = run("offload", path, batch=1, seq=128, budget=weights // 2, folder=f"{tmp}/off",
                    logits_out=f"{tmp}/off.pt")
        model = mechscope.load(path)
        toks = torch.randint(100, 30000, (1, 128), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ref = model(toks)[:, -4:]
        same = torch.equal(ref, torch.load(f"{tmp}/off.pt", weights_only=True))
        del model
    print(f"\ndisk offload, max_memory = half the weights ({weights / 2 / g:.2f} GiB): peak {m_off['measured'] / g:.2f} "
          f"GiB = {m_off['measured'] / weights:.2f} x the weights; devices {m_off['device_map']}; "
          f"logits equal to the in-memory model: {same}")

    t = run("timing", path, batch=1, seq=32, reps=20)
    print(f"\nhook overhead (3 cached hooks vs the bare HF forward, 1 x 32 tokens, 20 interleaved pairs; bare "
          f"{t['bare']:.2f} s): median ratio {t['median_ratio']:.3f}, best pair {t['min_ratio']:.3f} (goal <= 1.05)")


if __name__ == "__main__":
    main()
