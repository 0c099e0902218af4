"""Attribution patching on the default model: cost in forward-equivalents, and agreement with true patching.

Goal: every head x position estimated in <= 3 forward-equivalents. The baseline (one forward pass
on the same prompts) is measured in this run.
"""

import statistics
import time

import torch

import mechscope
from mechscope.analysis.metrics import logit_diff
from mechscope.techniques.attribution_patching import attribution_patch
from mechscope.techniques.patching import patch

CLEAN = ["When Mary and John went to the store, John gave a drink to",
         "When Tom and James went to the park, James gave a ball to"]
CORR = ["When Mary and John went to the store, Mary gave a drink to",
        "When Tom and James went to the park, Tom gave a ball to"]


def main(reps=5):
    model = mechscope.load("smollm2-135m")
    ans = torch.tensor([model.to_single_token(" Mary"), model.to_single_token(" Tom")])
    wrong = torch.tensor([model.to_single_token(" John"), model.to_single_token(" James")])
    metric = lambda lg: logit_diff(lg, ans, wrong)  # noqa: E731
    toks = model.to_tokens(CLEAN)
    with torch.no_grad():
        model(toks)
        fwd = statistics.median([_time(lambda: model(toks)) for _ in range(reps)])
    attribution_patch(model, CLEAN, CORR, metric, sites=("z",), per_position=True)
    t_attr = statistics.median([_time(lambda: attribution_patch(model, CLEAN, CORR, metric, sites=("z",),
                                                                 per_position=True)) for _ in range(reps)])
    est = attribution_patch(model, CLEAN, CORR, metric, sites=("resid_pre", "attn_out", "mlp_out", "z"))
    print("attribution patching, default model, IOI (2 prompts x 14 tokens)")
    print(f"  one forward pass                        {fwd * 1000:7.1f} ms")
    print(f"  all {model.cfg.n_layers}x{toks.shape[1]}x{model.cfg.n_heads} head x position estimates "
          f"{t_attr * 1000:7.1f} ms = {t_attr / fwd:4.2f} forward-equivalents (goal <= 3)")
    for site in ("resid_pre", "attn_out", "mlp_out", "z"):
        t = time.perf_counter()
        true = patch(model, CLEAN, CORR, metric, site=site)
        dt = time.perf_counter() - t
        a, b = est[site].normalized().flatten(), true.normalized().flatten()
        r = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
        print(f"  {site:10s} correlation with true patching {r:5.3f}   (true patching took {dt:5.2f} s)")


def _time(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
