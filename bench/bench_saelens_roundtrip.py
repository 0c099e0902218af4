"""SAEs written by SAELens itself, and SAEs written by mechscope read by SAELens: `make bench-saelens-roundtrip`.

SAELens 6.54 lives in bench/.venv-saelens (never a mechscope dependency) and runs in a subprocess
(bench/_saelens_side.py).

1. SAELens saves one small SAE of each architecture it has (standard, TopK, BatchTopK saved for inference as
   JumpReLU, JumpReLU, and the four transcoder classes), plus the fields that mean something particular there
   (``rescale_acts_by_decoder_norm``, ``apply_b_dec_to_input=False``, ``normalize_activations``) and a Matryoshka
   BatchTopK SAE (saved for inference as JumpReLU, its prefix sizes in the metadata), with SAELens's
   outputs beside each. They are written to tests/fixtures/saelens_6_54/, where tests/test_saelens_roundtrip.py
   checks ``mechscope.load_sae`` against them in CI (no SAELens needed there). This bench prints the same check.
2. The other direction: mechscope trains an SAE or transcoder of each architecture for a few steps on random
   activations, saves it with ``save_sae``, and SAELens's ``SAE.load_from_disk`` must give the same ``encode``,
   ``decode`` and ``forward`` (goal: 1e-5).

Usage: python bench/bench_saelens_roundtrip.py [--no-fixtures]
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

HERE = Path(__file__).parent
SL_PY = HERE / ".venv-saelens" / "bin" / "python"
FIXTURES = HERE.parent / "tests" / "fixtures" / "saelens_6_54"


def side(*args: str) -> str:
    r = subprocess.run([str(SL_PY), str(HERE / "_saelens_side.py"), *args], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"the SAELens side failed:\n{r.stderr[-4000:]}")
    return r.stdout


def write_fixtures() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="saelens-fixtures-"))
    side("fixtures", str(tmp))
    if FIXTURES.exists():
        shutil.rmtree(FIXTURES)
    shutil.copytree(tmp, FIXTURES)
    shutil.rmtree(tmp)


def read_fixtures() -> None:
    from mechscope.core.errors import InputError
    from mechscope.sae import load_sae

    for folder in sorted(p for p in FIXTURES.iterdir() if p.is_dir()):
        ref = load_file(str(folder / "expected.safetensors"))
        try:
            sae = load_sae(folder)
        except InputError as e:
            print(f"  {folder.name:26s} refused by mechscope: {str(e)[:110]}")
            continue
        with torch.no_grad():
            f = sae.encode(ref["x"])
            got = {"encode": f, "decode": sae.decode(f), "forward": sae(ref["x"])}
        worst = max(float((got[k] - ref[k]).abs().max()) for k in got)
        print(f"  {folder.name:26s} mechscope {sae.cfg.architecture:9s} largest |diff| over encode/decode/forward "
              f"{worst:.1e} ({'ok' if worst <= 1e-5 else 'NOT within 1e-5'})")


def mechscope_saes(out: Path) -> None:
    """Small mechscope SAEs and transcoders, trained for a few steps, saved with their outputs."""
    from mechscope.sae import SAEConfig, save_sae, train_sae
    from mechscope.sae.train import TrainConfig

    d, width = 16, 48
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, d, generator=g) @ torch.randn(d, d, generator=g) * 0.5 + 0.3
    y = torch.tanh(x @ torch.randn(d, d, generator=g)) * 2
    cases = [(arch, False, False) for arch in ("relu", "topk", "batchtopk", "jumprelu", "matryoshka")]
    cases += [(arch, True, skip) for arch in ("relu", "jumprelu", "batchtopk", "matryoshka") for skip in (False, True)]
    probe = torch.randn(32, d, generator=torch.Generator().manual_seed(1))
    for arch, tc, skip in cases:
        cfg = SAEConfig(d_in=d, d_sae=width, architecture=arch, k=6, hook_name="blocks.1.ln2.hook_normalized",
                        hook_name_out="blocks.1.hook_mlp_out" if tc else "", skip=skip)
        data = torch.cat([x, y], 1) if tc else x
        sae = train_sae(data, cfg, TrainConfig(steps=60, batch_size=256, log_every=1000), progress=False)
        name = f"{arch}{'_transcoder' if tc else ''}{'_skip' if skip else ''}"
        save_sae(sae, out / name)
        with torch.no_grad():
            f = sae.encode(probe)
            save_file({"x": probe, "encode": f, "decode": sae.decode(f), "forward": sae(probe)},
                      str(out / name / "mechscope.safetensors"))


def main() -> None:
    if not SL_PY.exists():
        raise SystemExit("SAELens's venv is missing: run `make bench-saelens-roundtrip`")
    if "--no-fixtures" not in sys.argv:
        write_fixtures()
    version = (FIXTURES / "VERSION").read_text().strip()
    print(f"1. SAEs saved by SAELens {version} (tests/fixtures/saelens_6_54), read by mechscope.load_sae:")
    read_fixtures()
    work = Path(tempfile.mkdtemp(prefix="saelens-check-"))
    mechscope_saes(work)
    res = json.loads(side("check", str(work)).strip().splitlines()[-1])
    print(f"2. SAEs trained and saved by mechscope, read by SAELens {res['sae_lens']}'s SAE.load_from_disk:")
    for name, r in res["results"].items():
        if "error" in r:
            print(f"  {name:26s} SAELens could not load it: {r['error'][:120]}")
            continue
        worst = max(r["encode"], r["decode"], r["forward"])
        print(f"  {name:26s} as SAELens {r['architecture']:25s} encode {r['encode']:.1e}, decode {r['decode']:.1e}, "
              f"forward {r['forward']:.1e} ({'ok' if worst <= 1e-5 else 'NOT within 1e-5'})")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
