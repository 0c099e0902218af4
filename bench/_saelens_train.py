"""Time SAELens's own trainer on given activations (runs inside bench/.venv-saelens; see bench_sae.py).

usage: python _saelens_train.py ACTS.safetensors D_SAE K STEPS BATCH SPARSE(0|1) [DEVICE (default cpu)]
Prints one JSON line: {"seconds_per_step": ..., "version": ...}.
"""

import json
import sys
import time

import torch
from safetensors.torch import load_file


def main():
    path, d_sae, k, steps, batch, sparse = sys.argv[1], *map(int, sys.argv[2:7])
    device = sys.argv[7] if len(sys.argv) > 7 else "cpu"
    import sae_lens
    from sae_lens import SAETrainer
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    acts = load_file(path)["acts"].to(device)
    g = torch.Generator().manual_seed(0)

    def provider():
        while True:
            yield acts[torch.randint(0, acts.shape[0], (batch,), generator=g).to(device)]

    cfg = TopKTrainingSAEConfig(d_in=acts.shape[1], d_sae=d_sae, k=k, use_sparse_activations=bool(sparse),
                                normalize_activations="none", device=device)
    sae = TopKTrainingSAE(cfg)
    warm = 5
    tc = SAETrainerConfig(total_training_samples=(steps + warm) * batch, train_batch_size_samples=batch, lr=1e-3, lr_end=1e-3,
                          device=device)
    trainer = SAETrainer(tc, sae, provider())
    data = provider()
    for _ in range(warm):  # warm-up steps are not timed
        trainer.step(next(data))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        trainer.step(next(data))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    print(json.dumps({"seconds_per_step": (time.perf_counter() - t) / steps, "version": sae_lens.__version__}))


if __name__ == "__main__":
    main()
