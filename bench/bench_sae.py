"""SAE quality on the default model and training throughput against a plain PyTorch loop.

Quality: a TopK SAE (8 x d_model = 4608 latents, k = 32) on the layer-15 residual stream of
SmolLM2-135M, trained on the standard library's docstrings (train split) and evaluated on the
held-out split: L0, explained variance, CE loss recovered (and the raw CE increase), dead
fraction. Goals: explained variance >= 0.7 at L0 ~ 32, CE recovered >= 0.8, dead < 10%.
On 2 CPU cores the token budget is small (see the numbers printed); say so when quoting them.

Throughput, same width, k, batch and activations, all measured in this run:
- mechscope's trainer (sparse TopK kernels, the default for float32);
- the same trainer with the dense path (``TrainConfig(sparse=False)``);
- a TopK loop written the obvious way (dense encode, dense decode, Adam);
- SAELens's own ``SAETrainer`` with ``TopKTrainingSAE``, when ``bench/.venv-saelens`` exists
  (``make bench-saelens`` builds it: SAELens pins transformer-lens 3.9, so it has its own venv).
Environment variables: SAE_SEQS (training sequences of 128 tokens), SAE_STEPS.
"""

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import torch

import mechscope
from mechscope import corpus
from mechscope.sae import SAEConfig, TrainConfig, evaluate_sae, harvest, train_sae

HOOK = "blocks.15.hook_resid_post"
SAELENS_PY = Path(__file__).resolve().parent / ".venv-saelens" / "bin" / "python"


def saelens_seconds_per_step(acts, d_sae, k, steps, batch):
    """SAELens's trainer on the same activations, in its own venv; None (and why) when it cannot run."""
    if not SAELENS_PY.exists():
        return None, "bench/.venv-saelens missing (make bench-saelens)"
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "acts.safetensors"
        save_file({"acts": acts[:50_000].contiguous()}, str(path))
        script = Path(__file__).resolve().parent / "_saelens_train.py"
        res = subprocess.run([str(SAELENS_PY), str(script), str(path), str(d_sae), str(k), str(steps), str(batch), "0"],
                             capture_output=True, text=True)
    if res.returncode:
        return None, res.stderr.strip().splitlines()[-1][:200]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    return out["seconds_per_step"], f"sae-lens {out['version']}"


def plain_topk_loop(acts, d_sae, k, steps, batch, lr, seed=0):
    """The obvious implementation, for the throughput baseline."""
    torch.manual_seed(seed)
    d = acts.shape[1]
    W_dec = torch.nn.Parameter(torch.randn(d_sae, d) / d ** 0.5)
    W_enc = torch.nn.Parameter(W_dec.detach().T.clone())
    b_enc, b_dec = torch.nn.Parameter(torch.zeros(d_sae)), torch.nn.Parameter(torch.zeros(d))
    opt = torch.optim.Adam([W_enc, W_dec, b_enc, b_dec], lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = acts[torch.randint(0, acts.shape[0], (batch,), generator=g)]
        pre = torch.relu((x - b_dec) @ W_enc + b_enc)
        v, i = pre.topk(k, dim=-1)
        f = torch.zeros_like(pre).scatter(-1, i, v)
        loss = (x - (f @ W_dec + b_dec)).pow(2).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            W_dec /= W_dec.norm(dim=-1, keepdim=True)


def main():
    seqs, steps = int(os.environ.get("SAE_SEQS", 768)), int(os.environ.get("SAE_STEPS", 2000))
    model = mechscope.load("smollm2-135m")
    train_toks = corpus.pack(model, corpus.default_corpus("train"), 128, n_seqs=seqs)
    test_toks = corpus.pack(model, corpus.default_corpus("test"), 128, n_seqs=16)
    t = time.perf_counter()
    acts = harvest(model, HOOK, train_toks)
    t_h = time.perf_counter() - t
    d = acts.shape[1]
    cfg = SAEConfig(d_in=d, d_sae=8 * d, architecture="topk", k=32, hook_name=HOOK, model_name="smollm2-135m",
                    normalize_activations="expected_average_only_in")
    batch = 1024
    t = time.perf_counter()
    sae = train_sae(acts, cfg, TrainConfig(steps=steps, batch_size=batch, lr=1e-3, dead_window=10 * acts.shape[0]),
                    progress=False)
    t_ours = time.perf_counter() - t
    ev = evaluate_sae(model, sae, test_toks)
    n_base = 40
    t = time.perf_counter()
    train_sae(acts, cfg, TrainConfig(steps=n_base, batch_size=batch, lr=1e-3, sparse=False,
                                     dead_window=10 * acts.shape[0]), progress=False)
    t_dense = (time.perf_counter() - t) / n_base
    t = time.perf_counter()
    plain_topk_loop(acts * float(sae.input_scale), 8 * d, 32, n_base, batch, 1e-3)
    t_plain = (time.perf_counter() - t) / n_base
    t_sl, sl_note = saelens_seconds_per_step(acts * float(sae.input_scale), 8 * d, 32, n_base, batch)
    t_step = t_ours / steps
    print(f"TopK SAE, {8 * d} latents, k=32, on {HOOK} of SmolLM2-135M")
    print(f"  harvest: {acts.shape[0]} tokens in {t_h:.1f} s (forward stops after block 15; massive-norm rows dropped)")
    print(f"  training: {steps} steps x {batch} = {steps * batch} token-samples "
          f"({steps * batch / acts.shape[0]:.1f} epochs) in {t_ours:.1f} s")
    print(f"  held-out ({test_toks.numel()} tokens): {ev.summary()}")
    print("  goals: explained variance >= 0.7 at L0 ~ 32, CE recovered >= 0.8, dead < 10%")
    print(f"  throughput (ms/step, batch {batch}; others timed over {n_base} steps):")
    print(f"    mechscope sparse kernels {1000 * t_step:7.1f}   {batch / t_step:9,.0f} tokens/s")
    print(f"    mechscope dense path     {1000 * t_dense:7.1f}   ratio {t_dense / t_step:.2f}x")
    print(f"    plain PyTorch loop       {1000 * t_plain:7.1f}   ratio {t_plain / t_step:.2f}x")
    if t_sl is None:
        print(f"    SAELens                  not run: {sl_note}")
    else:
        print(f"    SAELens SAETrainer       {1000 * t_sl:7.1f}   ratio {t_sl / t_step:.2f}x  ({sl_note}, dense TopK; "
              f"its use_sparse_activations fails on CPU)")


if __name__ == "__main__":
    main()
