"""Two gloo processes on localhost against one process: data-parallel SAE training, resume, a failing rank,
sharded sweeps; and the pieces (shard plans, sources) in one process."""

from __future__ import annotations

import socket
import time

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from dist_worker import JOBS, TOLERANCE, configs, planted
from mechscope.distributed import Dist, split
from mechscope.sae import fit_sae
from mechscope.sae.data import PartitionedSource
from tiny import tiny_hf


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _in_use(text: str) -> bool:
    return "EADDRINUSE" in text or "ddress already in use" in text


def _spawn(job: str, out, world: int = 2):
    """Run ``job`` on ``world`` gloo ranks; a free port taken by another test between pick and bind is retried.

    The ranks fork from a server process that imported torch, mechscope and the jobs once (``forkserver``), instead
    of each importing them anew (``spawn``: about 5 s of CPU a rank here). The server never ran a parallel region,
    so its children are as fresh as spawned ones; a job must not read environment variables a test sets, since the
    server keeps the environment it started with."""
    import dist_worker

    mp.set_forkserver_preload(["torch", "mechscope", "mechscope.sae", "mechscope.distributed", "dist_worker"])
    for attempt in range(3):
        try:
            return mp.start_processes(dist_worker.run, args=(world, _port(), str(out), job), nprocs=world, join=True,
                                      start_method="forkserver")
        except mp.ProcessRaisedException as e:
            if attempt == 2 or not _in_use(str(e)):
                raise


def test_split_is_deterministic_and_uneven():
    assert [list(r) for r in split(5, 2)] == [[0, 1, 2], [3, 4]]
    assert [len(r) for r in split(7, 3)] == [3, 2, 2] and [len(r) for r in split(1, 3)] == [1, 0, 0]
    with pytest.raises(ValueError, match="world size"):
        split(3, 0)


def test_one_harvest_over_a_ranks_partitions_equals_one_harvest_each():
    """`sae train` and `transcoders train --kind clt` harvest all of a rank's partitions in one pass: each partition's
    rows (a hook's, and a bundle's of inputs and outputs) equal harvesting that partition alone, with a norm rule that
    drops different numbers of rows in different sequences."""
    from mechscope import HookedModel
    from mechscope.sae.data import harvest, harvest_bundle, harvest_partitions

    model = HookedModel(tiny_hf("llama"))
    toks = torch.randint(0, 64, (11, 9), generator=torch.Generator().manual_seed(0))
    hook, ins, outs = "blocks.1.hook_resid_post", ["blocks.0.ln2.hook_normalized"], ["blocks.0.hook_mlp_out"]
    seqs = split(11, 5)
    for mine in ([0, 1, 2, 3, 4], [3, 4]):
        for ratio in (10.0, 1.2):  # 1.2 x the median norm: some rows dropped, unevenly over sequences
            got = harvest_partitions(model, toks, 5, mine, hook=hook, max_norm_ratio=ratio)
            each = {p: harvest(model, hook, toks[seqs[p]], max_norm_ratio=ratio) for p in mine}
            assert list(got) == mine and all(torch.allclose(got[p], each[p], atol=1e-5) for p in mine)
            dropped = sum((seqs[p].stop - seqs[p].start) * 8 - len(each[p]) for p in mine)
            got = harvest_partitions(model, toks, 5, mine, bundle=(ins, outs), max_norm_ratio=ratio)
            assert all(torch.allclose(got[p], harvest_bundle(model, ins, outs, toks[seqs[p]], max_norm_ratio=ratio),
                                      atol=1e-5) for p in mine)
        assert dropped > 0  # at 1.2 x the median norm the rule drops rows, so partitions are not a fixed size
    with pytest.raises(Exception, match="a hook or a bundle"):
        harvest_partitions(model, toks, 5, [0])


def test_partitioned_source_is_the_union_of_its_ranks():
    acts = planted(n=300)
    whole = PartitionedSource.from_tensor(acts, 3, 30, seed=1)
    ranks = [PartitionedSource.from_tensor(acts, 3, 30, seed=1, dist=Dist(rank=r, world=2)) for r in range(2)]
    assert [s.mine for s in ranks] == [[0, 1], [2]] and [s.local_rows for s in ranks] == [20, 10]
    for _ in range(3):
        assert torch.equal(next(whole), torch.cat([next(s) for s in ranks]))
    with pytest.raises(ValueError, match="smaller than the 3 partitions"):
        PartitionedSource.from_tensor(acts, 3, 2)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    t0 = time.time()
    _spawn("train", out)
    return out, time.time() - t0


@pytest.mark.parametrize("name", list(JOBS))
def test_two_ranks_train_the_one_process_sae(name, two_ranks):
    out, _ = two_ranks
    cfg, tc = configs(name)
    one = fit_sae(planted(), cfg, tc, progress=False).sae.state_dict()
    two = load_file(str(out / f"{name}.safetensors"))
    moved = 0.0
    for k, v in one.items():
        torch.testing.assert_close(two[k], v, rtol=0, atol=TOLERANCE.get(name, 1e-5), msg=f"{name}: {k}")
        moved = max(moved, float((v - fit_sae(planted(), cfg, tc.__class__(**{**tc.__dict__, "steps": 0}),
                                                progress=False).sae.state_dict()[k]).abs().max()) if k == "W_enc" else 0)
    assert moved > 1e-2  # training did move the weights, so the equality is not trivially true


def test_resumed_two_rank_run_ends_where_an_uninterrupted_one_does(two_ranks):
    out, _ = two_ranks
    cfg, tc = configs("topk_sparse_auxk")
    one = fit_sae(planted(), cfg, tc, progress=False).sae.state_dict()
    resumed = load_file(str(out / "resumed.safetensors"))
    for k, v in one.items():
        torch.testing.assert_close(resumed[k], v, rtol=0, atol=1e-5, msg=k)
    steps = [int(__import__("json").loads(ln)["step"]) for ln in (out / "resume" / "log.jsonl").read_text().splitlines()]
    assert steps == [10, 20, 30, 40]  # rank 0 alone logged, once per step, none repeated after the resume
    assert not list((out / "resume").glob("*.tmp"))


def test_a_failing_rank_stops_every_rank(tmp_path):
    t0 = time.time()
    with pytest.raises(mp.ProcessRaisedException, match=r"non-finite loss on [12] of 2 ranks at step 0"):
        _spawn("fail", tmp_path)
    assert time.time() - t0 < 60  # no hang: both ranks leave the group and exit


def test_sharded_patch_equals_one_process_and_resumes(tmp_path):
    import mechscope as ms
    from mechscope.sweeps import sharded_patch

    _spawn("sweep", tmp_path)
    model = ms.HookedModel(tiny_hf("llama"))
    g = torch.Generator().manual_seed(3)
    clean, corrupted = torch.randint(3, 97, (7, 6), generator=g), torch.randint(3, 97, (7, 6), generator=g)
    ref = ms.patch(model, clean, corrupted, lambda lg: lg[:, -1, 5], site="z")
    got = load_file(str(tmp_path / "sweep.safetensors"))
    torch.testing.assert_close(got["values"], ref.values, rtol=0, atol=1e-6)
    torch.testing.assert_close(got["per_prompt"], ref.per_prompt, rtol=0, atol=1e-6)
    shards = sorted((tmp_path / "shards").glob("shard-*.safetensors"))
    assert len(shards) == 4  # 7 prompts in shards of 2
    shards[1].unlink()
    shards[3].unlink()  # as if the rank computing them had been killed
    again = sharded_patch(model, clean, corrupted, ("logit", 5), site="z", folder=tmp_path / "shards", shard_size=2,
                          progress=False)
    assert again.stats["shards_computed"] == 2 and again.stats["shards_reused"] == 2
    torch.testing.assert_close(again.values, ref.values, rtol=0, atol=1e-6)
    assert again.clean_value == pytest.approx(ref.clean_value, abs=1e-6)


def test_saes_dealt_over_ranks_equal_one_process(tmp_path):
    from dist_worker import many_setup
    from mechscope.sae import train_many

    _spawn("many", tmp_path)
    model, toks, cfgs, tc = many_setup()
    one = train_many(model, toks, cfgs, tc, seqs_per_chunk=6, progress=False)
    owner = {0: 0, 1: 0, 2: 1}  # split(3, 2): SAEs 0 and 1 on rank 0, SAE 2 on rank 1
    assert sorted(p.name for p in tmp_path.glob("many_*")) == [f"many_{i}_rank{owner[i]}.safetensors" for i in range(3)]
    for i, r in enumerate(one):
        got = load_file(str(tmp_path / f"many_{i}_rank{owner[i]}.safetensors"))
        for k, v in r.sae.state_dict().items():
            assert torch.equal(got[k], v), (i, k)


def test_torchrun_sae_train_cli(tmp_path):
    """``torchrun --nproc_per_node 2 -m mechscope sae train``: rank 0 alone writes and prints; 1 rank gives the same SAE."""
    import json
    import os
    import subprocess
    import sys

    from mechscope.circuits.toy import toy_tokenizer

    tiny_hf("llama").save_pretrained(tmp_path / "m")
    toy_tokenizer(97).save_pretrained(tmp_path / "m")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    args = ["-m", "mechscope", "sae", "train", "--model", str(tmp_path / "m"), "--hook", "blocks.1.hook_resid_post",
            "--width", "64", "--k", "4", "--steps", "20", "--batch", "64", "--seqs", "16", "--seq-len", "16",
            "--eval-seqs", "2", "--json"]  # default partitions: the same SAE on 1 and 2 ranks
    for _ in range(3):  # a free port taken by another test between pick and bind is retried
        two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                              "--master_port", str(_port()), *args, "--out", str(tmp_path / "two")],
                             capture_output=True, text=True, env=env, timeout=300)
        if two.returncode == 0 or not _in_use(two.stderr):
            break
    assert two.returncode == 0, two.stderr[-3000:]
    out = json.loads(two.stdout)  # one JSON document: only rank 0 printed
    assert out["world"] == 2 and out["training"]["steps"] == 20
    assert {w["name"] for w in out["work"]["stages"]} >= {"harvest", "training (the dictionary alone)"}
    one = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "one")], capture_output=True, text=True,
                         env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    a = load_file(str(tmp_path / "one" / "sae" / "sae_weights.safetensors"))
    b = load_file(str(tmp_path / "two" / "sae" / "sae_weights.safetensors"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=k)


def test_sharded_ablation_and_harvest_equal_one_call(tmp_path):
    import mechscope as ms
    from mechscope.sae import harvest
    from mechscope.sweeps import sharded_ablate, sharded_harvest

    model = ms.HookedModel(tiny_hf("llama"))
    toks = torch.randint(3, 97, (9, 7), generator=torch.Generator().manual_seed(5))
    ref = ms.ablate(model, toks, lambda lg: lg[:, -1, 5] - lg[:, -1, 6], ["L1H2", "L0.mlp"], method="mean",
                    reference=toks)
    got = sharded_ablate(model, toks, ("logit_diff", 5, 6), ["L1H2", "L0.mlp"], method="mean", folder=tmp_path / "a",
                         shard_size=4, progress=False)
    torch.testing.assert_close(got.ablated, ref.ablated, rtol=0, atol=1e-6)
    torch.testing.assert_close(got.baseline, ref.baseline, rtol=0, atol=1e-6)
    assert got.effect.value == pytest.approx(ref.effect.value, abs=1e-6) and got.extra["sweep"]["shards"] == 3
    again = sharded_ablate(model, toks, ("logit_diff", 5, 6), ["L1H2", "L0.mlp"], method="mean",
                           folder=tmp_path / "a", shard_size=4, progress=False)
    assert again.extra["sweep"]["shards_reused"] == 3  # nothing recomputed
    with pytest.raises(ValueError, match="supports method 'zero' or 'mean'"):
        sharded_ablate(model, toks, ("logit", 5), ["L1H2"], method="resample", folder=tmp_path / "b")
    with pytest.raises(ValueError, match="metric spec must start with one of"):
        sharded_ablate(model, toks, ("kl", 5), ["L1H2"], folder=tmp_path / "b")
    rows = sharded_harvest(model, "blocks.1.hook_resid_post", toks, folder=tmp_path / "h", shard_size=4,
                           progress=False)
    # equal to the bit on one thread (make test's); with more, a batch of 4 and one of 9 round apart (4e-9 seen)
    torch.testing.assert_close(rows, harvest(model, "blocks.1.hook_resid_post", toks), rtol=0, atol=1e-6)


def test_each_rank_reads_its_own_shards(tmp_path):
    from dist_worker import shards_setup

    _spawn("shards", tmp_path)  # 3 shards of 8 sequences: 2 on rank 0, 1 on rank 1
    cfg, tc = shards_setup()
    one = fit_sae(PartitionedSource.from_shards(tmp_path / "acts", tc.batch_size, tc.seed), cfg, tc, progress=False)
    two = load_file(str(tmp_path / "from_shards.safetensors"))
    for k, v in one.sae.state_dict().items():
        torch.testing.assert_close(two[k], v, rtol=0, atol=1e-5, msg=k)


def test_a_rank_killed_mid_sweep_costs_only_its_missing_shards(tmp_path):
    import mechscope as ms
    from dist_worker import sweep_tokens
    from mechscope.sweeps import sharded_patch

    with pytest.raises(mp.ProcessExitedException, match="SIGKILL"):
        _spawn("sweep_kill", tmp_path)  # 7 one-prompt shards: rank 0 owns 4, rank 1 dies after its first of 3
    finished = sorted((tmp_path / "shards").glob("shard-*.safetensors"))
    written = len(finished)
    assert 1 <= written < 7
    for p in finished:  # a finished shard is whole (rank 0 may be stopped by SIGTERM mid-write: only a .tmp is torn)
        assert set(load_file(str(p))) == {"per_prompt", "clean", "corrupted"}
    (tmp_path / "shards" / (finished[0].name + ".x1y2.tmp")).write_bytes(b"torn")  # a writer killed mid-write
    model = ms.HookedModel(tiny_hf("llama"))
    clean, corrupted = sweep_tokens()
    again = sharded_patch(model, clean, corrupted, ("logit", 5), site="z", folder=tmp_path / "shards", shard_size=1,
                          progress=False)
    assert again.stats["shards_computed"] == 7 - written and again.stats["shards_reused"] == written
    assert not list((tmp_path / "shards").glob("*.tmp"))  # the resumed run cleared what the killed writers left
    ref = ms.patch(model, clean, corrupted, lambda lg: lg[:, -1, 5], site="z")
    torch.testing.assert_close(again.values, ref.values, rtol=0, atol=1e-6)


def test_sharded_eap_equals_one_call(tmp_path):
    import mechscope as ms
    from mechscope.circuits.discovery import edge_attribution
    from mechscope.sweeps import sharded_eap

    model = ms.HookedModel(tiny_hf("llama"))
    g = torch.Generator().manual_seed(8)
    clean, corrupted = torch.randint(3, 97, (5, 6), generator=g), torch.randint(3, 97, (5, 6), generator=g)
    ref = edge_attribution(model, clean, corrupted, lambda lg: lg[:, -1, 5] - lg[:, -1, 6])
    got = sharded_eap(model, clean, corrupted, ("logit_diff", 5, 6), folder=tmp_path, shard_size=2, progress=False)
    assert set(got) == set(ref)
    worst = max(abs(got[k] - ref[k]) for k in ref)
    assert worst < 1e-6 and max(abs(v) for v in ref.values()) > 1e-3
