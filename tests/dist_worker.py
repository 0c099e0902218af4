"""Jobs run by every rank of a 2-process gloo group in tests/test_distributed.py (spawned with torch.multiprocessing)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file


def planted(n: int = 1500, d: int = 16, n_feat: int = 40, seed: int = 0) -> torch.Tensor:
    """Sparse combinations of a planted dictionary (the same data in every process)."""
    g = torch.Generator().manual_seed(seed)
    D = torch.nn.functional.normalize(torch.randn(n_feat, d, generator=g), dim=-1)
    on = torch.rand(n, n_feat, generator=g) < 0.08
    return (on * torch.rand(n, n_feat, generator=g) * 3) @ D + 0.01 * torch.randn(n, d, generator=g)


JOBS = {  # name -> (SAEConfig kwargs, TrainConfig kwargs)
    "topk_sparse_auxk": (dict(architecture="topk", k=3), dict(sparse=True, dead_window=300)),
    "topk_dense": (dict(architecture="topk", k=3), dict(sparse=False)),
    "batchtopk_sparse": (dict(architecture="batchtopk", k=3), dict(sparse=True, dead_window=300, steps=20)),
    "batchtopk_dense": (dict(architecture="batchtopk", k=3), dict(sparse=False, steps=20)),
    "jumprelu": (dict(architecture="jumprelu"), dict()),
    "matryoshka": (dict(architecture="matryoshka", k=3, matryoshka_widths=(6, 24, 48)), dict(sparse=False, steps=20)),
    "relu": (dict(architecture="relu"), dict()),
    "topk_3_partitions": (dict(architecture="topk", k=3), dict(partitions=3)),  # uneven: 2 + 1 over 2 ranks
    # BatchTopK keeps the k x batch largest values of the whole batch: equal to 1e-7 for 20 steps, then a value
    # within float rounding of the cut (gradients summed over 2 ranks round differently) flips one selection and
    # the runs drift apart slowly (4e-4 after 40 steps, measured): hence 20 steps at 1e-5 and 40 at 1e-3
    "batchtopk_long": (dict(architecture="batchtopk", k=3), dict(sparse=True, dead_window=300, steps=40)),
}
TOLERANCE = {"batchtopk_long": 1e-3}


def planted_clt_rows(n: int = 3000, L: int = 3, d: int = 16, F: int = 24, seed: int = 0) -> torch.Tensor:
    """Rows [x | y] from a planted CLT teacher: sparse features at each layer writing into every later output."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, L, d, generator=g)
    y = torch.zeros(n, L, d)
    for s in range(L):
        enc = torch.randn(d, F, generator=g)
        a = torch.relu(x[:, s] @ enc - 2.2)
        for t in range(s, L):
            y[:, t] += a @ (torch.randn(F, d, generator=g) / F ** 0.5)
    return torch.cat([x.reshape(n, -1), y.reshape(n, -1)], 1)


# BatchTopK: equal to 1e-7 for 8 steps; then a value within rounding of a layer's cut flips one selection (3 cuts a
# step here) and the runs drift apart slowly (1.5e-4 at step 12, 9e-4 at step 20, measured), as for the SAE above
CLT_JOBS = {"clt_batchtopk": (dict(architecture="batchtopk"), 8), "clt_jumprelu": (dict(architecture="jumprelu"), 20),
            "clt_tied_topk": (dict(architecture="topk", tied=True), 20)}


def clt_configs(name: str):
    from mechscope.core.hookpoints import act_name
    from mechscope.sae import CLTConfig, TrainConfig

    kw, steps = CLT_JOBS[name]
    cfg = CLTConfig(d_model=16, d_sae=48, layers=(0, 1, 2), input_hooks=tuple(act_name("resid_mid", i) for i in range(3)),
                    output_hooks=tuple(act_name("mlp_out", i) for i in range(3)), k=4,
                    normalize_activations="expected_average_only_in", **kw)
    return cfg, TrainConfig(steps=steps, batch_size=96, lr=2e-3, partitions=2, dead_window=300)


# crosscoders over a model pair's paired rows [base | fine-tune]: BatchTopK (8 steps, as for the CLT above) and L1
CROSSCODER_JOBS = {"cc_batchtopk": (dict(architecture="batchtopk", k=4), 8),
                   "cc_l1": (dict(architecture="relu", l1_coefficient=0.05), 20)}


def crosscoder_configs(name: str):
    from mechscope.sae import TrainConfig
    from mechscope.sae.crosscoder import CrosscoderConfig

    kw, steps = CROSSCODER_JOBS[name]
    return (CrosscoderConfig(d_model=16, d_sae=48, hooks=("blocks.1.hook_resid_post",), **kw),
            TrainConfig(steps=steps, batch_size=96, lr=2e-3, partitions=2, dead_window=300))


def configs(name: str):
    from mechscope.sae import SAEConfig, TrainConfig

    sc, tc = JOBS[name]
    return (SAEConfig(d_in=16, d_sae=48, **sc),
            TrainConfig(**{"steps": 40, "batch_size": 96, "lr": 2e-3, "log_every": 10, "checkpoint_every": 10,
                           "partitions": 2, **tc}))


def shards_setup():
    from mechscope.sae import SAEConfig

    return SAEConfig(d_in=32, d_sae=48, architecture="topk", k=3), configs("topk_sparse_auxk")[1]


def sweep_tokens() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randint(3, 97, (7, 6), generator=g), torch.randint(3, 97, (7, 6), generator=g)


def many_setup():
    import mechscope as ms
    from mechscope.sae import SAEConfig, TrainConfig
    from tiny import tiny_hf

    model = ms.HookedModel(tiny_hf("llama"))
    toks = torch.randint(0, 97, (24, 12), generator=torch.Generator().manual_seed(4))
    cfgs = [SAEConfig(d_in=32, d_sae=64, architecture="topk", k=4, hook_name="blocks.0.hook_resid_post"),
            SAEConfig(d_in=32, d_sae=96, architecture="batchtopk", k=2, hook_name="blocks.2.hook_resid_post"),
            SAEConfig(d_in=32, d_sae=48, architecture="jumprelu", hook_name="blocks.1.hook_mlp_out")]
    return model, toks, cfgs, TrainConfig(steps=12, batch_size=32, lr=1e-3)


def _save(sae, path: Path) -> None:
    save_file({k: v.contiguous() for k, v in sae.state_dict().items()}, str(path))


def run(rank: int, world: int, port: int, out: str, job: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from mechscope import distributed
    from mechscope.sae import fit_sae

    out = Path(out)
    with distributed.session(timeout_s=120) as dist:
        if job == "train":
            acts = planted()
            for name in JOBS:
                cfg, tc = configs(name)
                res = fit_sae(acts, cfg, tc, progress=False, dist=dist)
                if dist.is_main:
                    _save(res.sae, out / f"{name}.safetensors")
            cfg, tc = configs("topk_sparse_auxk")  # killed after 23 steps, then resumed on 2 ranks
            fit_sae(acts, cfg, tc, out=out / "resume", progress=False, stop_after=23, dist=dist)
            res = fit_sae(acts, cfg, tc, out=out / "resume", resume=True, progress=False, dist=dist)
            if dist.is_main:
                _save(res.sae, out / "resumed.safetensors")
        elif job in ("clt", "crosscoder"):  # other dictionaries on 2 ranks: CLTs (BatchTopK per layer over the whole
            # batch) and crosscoders (BatchTopK on c_j f_j over the whole batch), by the same trainer
            rows, names, make = ((planted_clt_rows(), CLT_JOBS, clt_configs) if job == "clt" else
                                 (planted(n=1500, d=32), CROSSCODER_JOBS, crosscoder_configs))
            for name in names:
                cfg, tc = make(name)
                res = fit_sae(rows, cfg, tc, progress=False, dist=dist)
                if dist.is_main:
                    _save(res.sae, out / f"{name}.safetensors")
        elif job == "fail":  # rank 1 raises mid-training: every rank must stop, none may hang
            acts = planted()
            if rank == 1:
                acts = acts.clone()
                acts[:] = float("nan")
            cfg, tc = configs("topk_dense")
            fit_sae(acts, cfg, tc, progress=False, dist=dist)
        elif job == "many":  # three SAEs dealt over two ranks (2 + 1), each rank harvesting its own hooks
            from mechscope.sae import train_many

            model, toks, cfgs, tc = many_setup()
            for i, r in enumerate(train_many(model, toks, cfgs, tc, seqs_per_chunk=6, progress=False, dist=dist)):
                if r is not None:
                    _save(r.sae, out / f"many_{i}_rank{rank}.safetensors")
        elif job == "shards":  # each rank reads only its own shards of a harvest on disk
            import mechscope as ms
            from mechscope.sae import harvest_to_disk
            from mechscope.sae.data import PartitionedSource
            from tiny import tiny_hf

            cfg, tc = shards_setup()
            folder = out / "acts"
            if dist.is_main:
                model = ms.HookedModel(tiny_hf("llama"))
                toks = torch.randint(0, 97, (24, 12), generator=torch.Generator().manual_seed(6))
                harvest_to_disk(model, "blocks.1.hook_resid_post", toks, folder, seqs_per_shard=8)
            dist.barrier()
            src = PartitionedSource.from_shards(folder, tc.batch_size, tc.seed, dist)
            res = fit_sae(src, cfg, tc, progress=False, dist=dist)
            if dist.is_main:
                _save(res.sae, out / "from_shards.safetensors")
        elif job == "sweep_kill":  # rank 1 is killed (SIGKILL) right after writing its first shard
            import signal

            import mechscope as ms
            import mechscope.sweeps as sw
            from tiny import tiny_hf

            model = ms.HookedModel(tiny_hf("llama"))
            clean, corrupted = sweep_tokens()
            real, calls = sw.atomic_write, []

            def write_then_die(path, data):
                real(path, data)
                calls.append(path)
                if rank == 1:
                    os.kill(os.getpid(), signal.SIGKILL)

            sw.atomic_write = write_then_die
            sw.sharded_patch(model, clean, corrupted, ("logit", 5), site="z", folder=out / "shards", shard_size=1,
                             dist=dist, progress=False)
        elif job == "sweep":
            import mechscope as ms
            from mechscope.sweeps import sharded_patch
            from tiny import tiny_hf

            model = ms.HookedModel(tiny_hf("llama"))
            clean, corrupted = sweep_tokens()
            res = sharded_patch(model, clean, corrupted, ("logit", 5), site="z", folder=out / "shards",
                                shard_size=2, dist=dist)
            if dist.is_main:
                save_file({"values": res.values.contiguous(), "per_prompt": res.per_prompt.contiguous()},
                          str(out / "sweep.safetensors"))
