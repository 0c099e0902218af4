"""SAE quality on the default model and training throughput against a plain PyTorch loop.

Quality: a TopK SAE (8 x d_model = 4608 latents, k = 32) on the layer-15 residual stream of
SmolLM2-135M, trained on the standard library's docstrings (train split) and evaluated on the
held-out split: L0, explained variance, CE loss recovered (and the raw CE increase), dead
fraction. Goals: explained variance >= 0.7 at L0 ~ 32, CE recovered >= 0.8, dead < 10%.
On 2 CPU cores the token budget is small (see the numbers printed); say so when quoting them.

Throughput: tokens per second of mechscope's trainer against a TopK loop written the obvious way
(dense encode, dense decode, Adam), same width, k, batch and activations, measured in this run.
Environment variables: SAE_SEQS (training sequences of 128 tokens), SAE_STEPS.
"""

import os
import time

import torch

import mechscope
from mechscope import corpus
from mechscope.sae import SAEConfig, TrainConfig, evaluate_sae, harvest, train_sae

HOOK = "blocks.15.hook_resid_post"


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
    seqs, steps = int(os.environ.get("SAE_SEQS", 256)), int(os.environ.get("SAE_STEPS", 1500))
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
    n_base = max(50, steps // 10)
    t = time.perf_counter()
    plain_topk_loop(acts * float(sae.input_scale), 8 * d, 32, n_base, batch, 1e-3)
    t_plain = (time.perf_counter() - t) / n_base * steps
    print(f"TopK SAE, {8 * d} latents, k=32, on {HOOK} of SmolLM2-135M")
    print(f"  harvest: {acts.shape[0]} tokens in {t_h:.1f} s (forward stops after block 15)")
    print(f"  training: {steps} steps x {batch} = {steps * batch} token-samples "
          f"({steps * batch / acts.shape[0]:.1f} epochs) in {t_ours:.1f} s")
    print(f"  held-out ({test_toks.numel()} tokens): {ev.summary()}")
    print(f"  goals: explained variance >= 0.7 at L0 ~ 32, CE recovered >= 0.8, dead < 10%")
    print(f"  throughput: mechscope {steps * batch / t_ours:,.0f} tokens/s, plain loop "
          f"{steps * batch / t_plain:,.0f} tokens/s (estimated from {n_base} steps): ratio {t_plain / t_ours:.2f}x")


if __name__ == "__main__":
    main()
