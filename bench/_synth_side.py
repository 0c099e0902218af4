"""The SAELens 6.54 side of bench/bench_synth.py; runs in bench/.venv-saelens (never imports mechscope).

``world OUT.safetensors [--full]``: builds SAELens's own SyntheticModel with mechscope's scaled-world parameters
(2,048 features in 128 dimensions; ``--full``: SynthSAEBench-16k v2) and exports it in mechscope's world layout
(dictionary, bias, compensated probabilities, magnitudes, correlation factor, forest), with SAELens's per-feature
firing rates and L0 on 200,000 of its own samples beside it (``OUT.saelens.json``).

``train WORLD.safetensors ARCH SEED SAMPLES OUT.json``: trains ARCH (batchtopk | matryoshka) with SAELens's own
SyntheticSAERunner on that world (rebuilt from the export) and writes its final SyntheticDataEvalResult.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def saelens_config(full: bool, seed: int = 0):
    from sae_lens.synthetic import (
        FoldedNormalMagnitudeConfig,
        LinearMagnitudeConfig,
        ZipfianFiringProbabilityConfig,
    )
    from sae_lens.synthetic.hierarchy import HierarchyConfig
    from sae_lens.synthetic.synthetic_model import (
        LowRankCorrelationConfig,
        OrthogonalizationConfig,
        SyntheticModelConfig,
    )

    n, d, roots = (16384, 768, 128) if full else (2048, 128, 16)
    return SyntheticModelConfig(
        num_features=n, hidden_dim=d,
        firing_probability=ZipfianFiringProbabilityConfig(exponent=0.5, max_prob=0.4, min_prob=5e-4),
        hierarchy=HierarchyConfig(total_root_nodes=roots, branching_factor=4, max_depth=3, mutually_exclusive_portion=1.0,
                                  compensate_probabilities=True, scale_children_by_parent=True),
        orthogonalization=OrthogonalizationConfig(num_steps=100, lr=3e-4),
        correlation=LowRankCorrelationConfig(rank=25, correlation_scale=0.1, seed=None),
        std_firing_magnitudes=FoldedNormalMagnitudeConfig(mean=0.5, std=0.5),
        mean_firing_magnitudes=LinearMagnitudeConfig(start=5.0, end=4.0),
        bias=1.0, seed=seed)


def mechscope_config(full: bool, seed: int = 0) -> dict:
    """The same parameters under mechscope's SynthConfig names (kept in the export's metadata)."""
    n, d, roots = (16384, 768, 128) if full else (2048, 128, 16)
    return dict(num_features=n, hidden_dim=d, zipf_exponent=0.5, p_max=0.4, p_min=5e-4, roots=roots, branching=4,
                depth=3, mutually_exclusive=1.0, scale_children_by_parent=True, compensate=True, corr_rank=25,
                corr_scale=0.1, ortho_steps=100, ortho_lr=3e-4, mean_magnitude=[5.0, 4.0], std_magnitude=[0.5, 0.5],
                bias_norm=1.0, seed=seed)


def export(model, out: Path, full: bool) -> None:
    n = model.cfg.num_features
    parent, level = torch.full((n,), -1, dtype=torch.long), torch.zeros(n, dtype=torch.long)
    exclusive = torch.zeros(n, dtype=torch.bool)

    def walk(node, depth):
        exclusive[node.feature_index] = bool(node.mutually_exclusive_children)
        for c in node.children:
            parent[c.feature_index], level[c.feature_index] = node.feature_index, depth + 1
            walk(c, depth + 1)

    for r in model.hierarchy.roots:
        walk(r, 0)
    gen = model.activation_generator
    tensors = {"features": model.feature_dict.feature_vectors.detach(), "bias": model.feature_dict.bias.detach(),
               "probs": gen.firing_probabilities, "mean_mag": gen.mean_firing_magnitudes,
               "std_mag": gen.std_firing_magnitudes, "corr_factor": model.correlation_matrix.correlation_factor,
               "parent": parent, "level": level, "exclusive": exclusive}
    save_file({k: v.contiguous().float() if v.is_floating_point() else v.contiguous() for k, v in tensors.items()},
              str(out), metadata={"config": json.dumps(mechscope_config(full))})


def world(out: str, full: bool) -> None:
    from sae_lens.synthetic import SyntheticModel

    torch.manual_seed(0)
    model = SyntheticModel(saelens_config(full))
    export(model, Path(out), full)
    fires, total = torch.zeros(model.cfg.num_features), 0
    for _ in range(50):
        a = model.activation_generator.sample(4000)
        fires += (a > 0).sum(0)
        total += a.shape[0]
    rate = fires / total
    Path(out).with_suffix(".saelens.json").write_text(json.dumps({"rate": rate.tolist(), "l0": float(rate.sum()),
                                                                   "samples": total}))
    print(json.dumps({"world": out, "l0": float(rate.sum()), "samples": total}))


def rebuilt(path: str):
    """SAELens's SyntheticModel with the exported tensors put back (the same world, exactly)."""
    from sae_lens.synthetic import SyntheticModel

    cfg = json.loads(safe_open(path, "pt").metadata()["config"])
    model = SyntheticModel(saelens_config(cfg["num_features"] == 16384))
    with safe_open(path, "pt") as fh:
        with torch.no_grad():
            model.feature_dict.feature_vectors.copy_(fh.get_tensor("features"))
            model.feature_dict.bias.copy_(fh.get_tensor("bias"))
    return model


def train(world_path: str, arch: str, seed: int, samples: int, out: str) -> None:
    from sae_lens import BatchTopKTrainingSAEConfig, LoggingConfig, MatryoshkaBatchTopKTrainingSAEConfig
    from sae_lens.synthetic import SyntheticSAERunner, SyntheticSAERunnerConfig

    torch.manual_seed(seed)
    model = rebuilt(world_path)
    d, width, k = model.cfg.hidden_dim, model.cfg.num_features // 4, 8 if model.cfg.num_features == 2048 else 25
    if arch == "matryoshka":
        sae_cfg = MatryoshkaBatchTopKTrainingSAEConfig(d_in=d, d_sae=width, k=k,
                                                       matryoshka_widths=[width // 8, width // 4, width // 2, width])
    else:
        sae_cfg = BatchTopKTrainingSAEConfig(d_in=d, d_sae=width, k=k)
    runner = SyntheticSAERunner(SyntheticSAERunnerConfig(
        synthetic_model=world_path, sae=sae_cfg, training_samples=samples, batch_size=1024, lr=3e-4,
        eval_samples=100_000, output_path=None, checkpoint_path=None,
        logger=LoggingConfig(log_to_wandb=False)), override_synthetic_model=model)
    run = runner.run()
    res = run.final_eval
    run.sae.save_inference_model(str(Path(out).with_suffix('')))  # read back by mechscope's load_sae
    Path(out).write_text(json.dumps({"arch": arch, "seed": seed, "samples": samples, **res.to_dict()}))
    print(json.dumps({"arch": arch, "seed": seed, "f1": res.classification.f1_score, "mcc": res.mcc,
                      "explained_variance": res.explained_variance}))


if __name__ == "__main__":
    if sys.argv[1] == "world":
        world(sys.argv[2], "--full" in sys.argv)
    else:
        train(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6])
