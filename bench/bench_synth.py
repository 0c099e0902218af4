"""SynthSAEBench in mechscope against SAELens 6.54's own synthetic runner (bench/.venv-saelens, `make bench-synth`).

Scaled world (default; 2,048 features in 128 dimensions, SynthSAEBench-16k's proportions):
  1. SAELens builds its SyntheticModel and exports it (bench/_synth_side.py world); mechscope builds the same world
     from the same parameters, and the two are compared tensor by tensor;
  2. per-feature firing rates of mechscope's sampler against SAELens's (a z-score per feature);
  3. BatchTopK (512 latents, k 8) trained by SAELens's runner and by mechscope, 3 seeds each, at the CI test's
     budget (409,600 samples) and at --samples; Matryoshka BatchTopK by mechscope at --samples; the SAELens
     SAEs are scored by mechscope's metrics too (metric parity);
  4. prints F1, MCC, explained variance per run and the seeds' spread.

--full: the published 16k world (16,384 features, d 768, width 4,096, k 25), mechscope only, 200M samples by default;
sized for one GPU (--device cuda). It prints the three numbers against the published table. On this CPU it is
not run: the sampler alone draws about 1,400 samples/s of the 16k world here (about 40 hours for 200M).

--write-fixture: writes tests/fixtures/synthsaebench_saelens_6_54 (the world's digest, SAELens's firing rates, one
SAELens-trained SAE and its SAELens evaluation) from the run's files.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SIDE = ROOT / "bench" / "_synth_side.py"
SL_PY = ROOT / "bench" / ".venv-saelens" / "bin" / "python"
FIXTURE = ROOT / "tests" / "fixtures" / "synthsaebench_saelens_6_54"
CI_SAMPLES = 409_600  # the budget of the CI test (400 steps of 1,024)
PUBLISHED = {"batchtopk": (0.732, 0.757, 0.792), "matryoshka": (0.879, 0.793, 0.779), "jumprelu": (0.732, 0.753, 0.795)}


def side(*args: str) -> None:
    r = subprocess.run([str(SL_PY), str(SIDE), *args], capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"SAELens side failed ({' '.join(args)}):\n{r.stderr[-2000:]}")


def spread(vals: list[float]) -> str:
    t = torch.tensor(vals)
    sd = float(t.std()) if len(vals) > 1 else 0.0
    return f"{float(t.mean()):.3f} (sd {sd:.3f}, range {float(t.min()):.3f}-{float(t.max()):.3f})"


def train_mechscope(world, arch: str, seed: int, samples: int, width: int, k: int, device: str):
    from mechscope.sae import SAEConfig, TrainConfig
    from mechscope.sae.synthetic import evaluate_on_world, train_on_world

    batch = 1024
    t = time.time()
    sae = train_on_world(world, SAEConfig(d_in=world.d, d_sae=width, architecture=arch, k=k),
                         TrainConfig(steps=samples // batch, batch_size=batch, lr=3e-4, seed=seed), progress=False)
    return evaluate_on_world(sae, world, 100_000), time.time() - t


def write_fixture(work: Path, sl_world, sl_rate: torch.Tensor, rows: list, n: int, samples: int) -> None:
    """tests/fixtures/synthsaebench_saelens_6_54: the SAELens world's digest and firing rates, its seed-0 SAE and
    SAELens's own evaluation of it, and the SAELens runs' figures."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    FIXTURE.mkdir(parents=True, exist_ok=True)
    digest = {"features_head": sl_world.features[:16].contiguous(), "probs": sl_world.probs,
              "std_mag": sl_world.std_mag, "mean_mag": sl_world.mean_mag, "bias": sl_world.bias,
              "corr_head": sl_world.corr_factor[:16].contiguous(), "parent": sl_world.parent, "level": sl_world.level,
              "exclusive": sl_world.exclusive, "saelens_rate": sl_rate}
    with safe_open(str(work / "world.safetensors"), "pt") as fh:
        meta = fh.metadata()
    save_file(digest, str(FIXTURE / "world_digest.safetensors"), metadata={"config": meta["config"]})
    shutil.copytree(work / f"sl_batchtopk_0_{samples}", FIXTURE / "saelens_batchtopk_seed0", dirs_exist_ok=True)
    keys = ("who", "arch", "samples", "seed", "f1", "mcc", "explained_variance")
    results = {"saelens_6_54_runner": [dict(zip(keys, x)) for x in rows if x[0] == "saelens"],
               "seed0_eval": json.loads((work / f"sl_batchtopk_0_{samples}.json").read_text()), "sampler_samples": n,
               "ci_samples": CI_SAMPLES}
    (FIXTURE / "results.json").write_text(json.dumps(results, indent=1))
    print(f"wrote {FIXTURE}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=2_000_000)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--work", default=None, help="folder for the world and SAELens's results (default: a temp dir)")
    ap.add_argument("--no-saelens", action="store_true", help="mechscope only")
    ap.add_argument("--write-fixture", action="store_true")
    args = ap.parse_args()
    from mechscope.sae.synthetic import SynthConfig, SynthWorld

    if args.full:
        cfg = SynthConfig.synth_16k()
        t = time.time()
        world = SynthWorld.build(cfg).to(args.device)
        print(f"built the 16k world in {time.time() - t:.0f} s; true L0 {world.true_l0():.1f} (published ~34)")
        samples = args.samples if args.samples != 2_000_000 else 200_000_000
        for arch in ("batchtopk", "matryoshka"):
            ev, secs = train_mechscope(world, arch, 0, samples, 4096, 25, args.device)
            f1, mcc, ev_pub = PUBLISHED[arch]
            print(f"{arch:<11} F1 {ev.f1:.3f} (published {f1}), MCC {ev.mcc:.3f} ({mcc}), explained variance "
                  f"{ev.explained_variance:.3f} ({ev_pub}); {secs:.0f} s on {args.device}")
        return

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-synth-"))
    work.mkdir(parents=True, exist_ok=True)
    wpath = work / "world.safetensors"
    if not wpath.exists():
        side("world", str(wpath))
    sl_world = SynthWorld.load(wpath)
    mine = SynthWorld.build(sl_world.cfg)
    print(f"world: {sl_world.summary()}")
    for k in SynthWorld.TENSORS:
        a, b = getattr(sl_world, k).float(), getattr(mine, k).float()
        print(f"  {k:<12} mechscope's build against SAELens's export: max |difference| {float((a - b).abs().max()):.2e}")
    sl_rate = torch.tensor(json.loads(wpath.with_suffix(".saelens.json").read_text())["rate"])
    g, fires, n = torch.Generator().manual_seed(0), torch.zeros(sl_world.n_features), 0
    for _ in range(50):
        fires += (sl_world.feature_acts(4000, g) > 0).sum(0)
        n += 4000
    rate = fires / n
    p = (rate + sl_rate) / 2
    z = (rate - sl_rate) / (p * (1 - p) * 2 / n).sqrt().clamp_min(1e-12)
    print(f"sampler: L0 mechscope {float(rate.sum()):.3f}, SAELens {float(sl_rate.sum()):.3f} on {n} samples each; "
          f"per-feature firing-rate z: mean z^2 {float((z ** 2).mean()):.3f} (1 = agreement), max |z| "
          f"{float(z.abs().max()):.2f} over {sl_world.n_features} features")

    width, k, rows = 512, 8, []
    from mechscope.sae import load_sae
    from mechscope.sae.synthetic import evaluate_on_world

    budgets = sorted({CI_SAMPLES, args.samples})
    for samples in budgets:
        if args.no_saelens:
            break
        for s in range(args.seeds):
            out = work / f"sl_batchtopk_{s}_{samples}.json"
            if not out.exists():
                t = time.time()
                side("train", str(wpath), "batchtopk", str(s), str(samples), str(out))
                print(f"  SAELens batchtopk, {samples:,} samples, seed {s}: {time.time() - t:.0f} s")
            d = json.loads(out.read_text())
            rows.append(("saelens", "batchtopk", samples, s, d["classification"]["f1_score"], d["mcc"],
                         d["explained_variance"]))
            if samples == args.samples:
                ours = evaluate_on_world(load_sae(out.with_suffix("")), sl_world, 100_000)
                print(f"  metric parity on SAELens's seed-{s} SAE: MCC {d['mcc']:.5f} (SAELens) / {ours.mcc:.5f} "
                      f"(mechscope); F1 {d['classification']['f1_score']:.4f} / {ours.f1:.4f}; explained variance "
                      f"{d['explained_variance']:.4f} / {ours.explained_variance:.4f}; uniqueness "
                      f"{d['uniqueness']:.4f} / {ours.uniqueness:.4f}")
    for samples in budgets:
        for arch in ("batchtopk", "matryoshka") if samples == args.samples else ("batchtopk",):
            for s in range(args.seeds):
                ev, secs = train_mechscope(sl_world, arch, s, samples, width, k, "cpu")
                rows.append(("mechscope", arch, samples, s, ev.f1, ev.mcc, ev.explained_variance))
                print(f"  mechscope {arch}, {samples:,} samples, seed {s}: F1 {ev.f1:.3f}, MCC {ev.mcc:.3f}, "
                      f"EV {ev.explained_variance:.3f} ({secs:.0f} s)")
    for samples in budgets:
        print(f"\n{samples:,} samples, {width} latents, k {k}, {args.seeds} seeds (mean, sd, range):")
        for who, arch in (("saelens", "batchtopk"), ("mechscope", "batchtopk"), ("mechscope", "matryoshka")):
            r = [x for x in rows if x[:3] == (who, arch, samples)]
            if r:
                print(f"  {who:<9} {arch:<10} F1 {spread([x[4] for x in r])}  MCC {spread([x[5] for x in r])}  "
                      f"EV {spread([x[6] for x in r])}")
    mb = [x[4] for x in rows if x[:3] == ("mechscope", "batchtopk", args.samples)]
    mm = [x[4] for x in rows if x[:3] == ("mechscope", "matryoshka", args.samples)]
    print(f"Matryoshka's F1 over BatchTopK's (mechscope, {args.samples:,} samples, mean over seeds): "
          f"{sum(mm) / len(mm) - sum(mb) / len(mb):+.3f}")
    if args.write_fixture:
        write_fixture(work, sl_world, sl_rate, rows, n, args.samples)


if __name__ == "__main__":
    main()
