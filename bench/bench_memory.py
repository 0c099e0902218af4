"""estimate_memory against the measured peak resident memory, on the default model (CPU).

Each configuration runs in a fresh process: peak RSS after the run minus the RSS before loading.
"""

import json
import subprocess
import sys

CODE = r"""
import json, resource, sys, torch, psutil, mechscope
torch.set_grad_enabled(False)
batch, seq, cache = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
base = psutil.Process().memory_info().rss
model = mechscope.load("smollm2-135m")
after_load = psutil.Process().memory_info().rss
toks = torch.randint(100, 40000, (batch, seq))
if cache == "none":
    model(toks)
else:
    _, c = model.run_with_cache(toks)
from mechscope.compute import peak_rss
peak = peak_rss()  # VmHWM: ru_maxrss would carry the parent process's peak across fork + exec
est = mechscope.estimate_memory(model, batch=batch, seq_len=seq, cache_names=None if cache == "none" else "all")
print(json.dumps({"measured_weights": after_load - base, "measured_total": peak - base,
                  "est_weights": est.weights, "est_total": est.total}))
"""


def main():
    print("estimate vs measured (peak RSS above the pre-load baseline), default model, fp32 CPU")
    print(f"{'batch x seq':>12} {'cache':>6} {'est GiB':>8} {'meas GiB':>9} {'est/meas':>9}")
    for batch, seq, cache in [(1, 128, "none"), (8, 128, "none"), (8, 128, "all"), (4, 512, "all")]:
        out = subprocess.run([sys.executable, "-c", CODE, str(batch), str(seq), cache], capture_output=True,
                             text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        g = 1024**3
        print(f"{batch:>5} x {seq:<5} {cache:>6} {r['est_total'] / g:8.3f} {r['measured_total'] / g:9.3f} "
              f"{r['est_total'] / r['measured_total']:9.2f}")
    print(f"weights: estimate {r['est_weights'] / g:.3f} GiB, measured {r['measured_weights'] / g:.3f} GiB "
          f""
          f"(safetensors maps the file lazily: pages count only once a forward pass touches them)")


if __name__ == "__main__":
    main()
