"""Compute awareness, the logit lens on a tiny model, and the CLI."""

import json

import pytest
import torch

import mechscope
from mechscope import HookedModel, estimate_memory
from mechscope.cli import main
from tiny import tiny_hf


def test_env_reports_memory():
    e = mechscope.env()
    assert e.total_memory > 0 and 0 < e.free_memory <= e.total_memory
    assert e.device in ("cpu", "cuda", "mps")
    assert "GiB" in e.summary()
    # bfloat16 computes on any CPU; the report says how fast, from a measurement, and says SLOWER when it is
    assert e.bf16_supported and e.bf16_speed > 0 and e.fp16_speed > 0
    assert ("bfloat16 yes" in e.summary()) and (("SLOWER" in e.summary()) == (min(e.bf16_speed, e.fp16_speed) < 0.8))


def test_estimate_matches_parameter_count_and_scales():
    hf = tiny_hf("llama")
    model = HookedModel(hf)
    est = estimate_memory(model, batch=2, seq_len=9, cache_names="all", available=10**9, device="cpu")
    n_real = sum(p.numel() for p in hf.parameters())
    assert abs(est.n_params - n_real) / n_real < 0.02
    assert est.weights == est.n_params * 4
    # the cache estimate equals the bytes run_with_cache actually records
    toks = torch.randint(0, 97, (2, 9))
    _, cache = model.run_with_cache(toks)
    assert est.cache == sum(v.numel() * v.element_size() for v in cache.values())
    half = estimate_memory(model, dtype="bfloat16", batch=2, seq_len=9, available=10**9, device="cpu")
    assert half.weights == est.weights // 2
    bigger = estimate_memory(model, batch=4, seq_len=9, cache_names="all", available=10**9, device="cpu")
    assert bigger.cache == 2 * est.cache


def test_estimate_advises_when_it_does_not_fit():
    hf = tiny_hf("llama")
    n = estimate_memory(HookedModel(hf), available=10**12, device="cpu").weights
    tight = estimate_memory(hf.config, available=int(n * 0.5), device="cpu")
    assert not tight.fits
    assert any("device_map" in a for a in tight.advice)
    mid = estimate_memory(hf.config, batch=10**4, seq_len=64, available=int(n * 1.5), device="cpu")
    assert not mid.fits and any("bfloat16" in a or "reduce the batch" in a for a in mid.advice)
    assert mid.max_batch < 10**4


def test_logit_lens_final_row_is_model_output():

    model = HookedModel(tiny_hf("gpt2"))
    model.tokenizer = None
    toks = torch.randint(0, 97, (1, 6))

    class Tok:  # a minimal tokenizer: ids as strings
        bos_token_id = None

        def decode(self, ids):
            return "<" + ",".join(map(str, ids)) + ">"

    model.tokenizer = Tok()
    res = mechscope.logit_lens(model, toks, targets=[5, 7])
    probs = model(toks)[0].softmax(-1)
    torch.testing.assert_close(res.top_probs[-1, :, 0], probs.max(-1).values)
    torch.testing.assert_close(res.target_probs[0, -1], probs[:, 5])
    assert res.target_ranks.shape == (2, model.cfg.n_layers + 1, 6)
    assert (res.target_ranks[0, -1] == (probs > probs[:, 5:6]).sum(-1)).all()
    html = res.to_html()
    assert "&lt;" in html and "<5" not in html  # tokens are escaped
    assert "final" not in res.summary() and res.summary().count("\n") == model.cfg.n_layers + 2


def test_cli_env_json(capsys):
    assert main(["env", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["total_memory"] > 0


def test_cli_errors_are_readable(capsys, tmp_path):
    assert main(["info", "--model", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert "error: no such file" in err and "Traceback" not in err


def test_cli_help_has_examples(capsys):
    with pytest.raises(SystemExit):
        main(["lens", "--help"])
    assert "examples:" in capsys.readouterr().out


@pytest.mark.slow
def test_cli_lens_and_estimate_on_default_model(capsys, tmp_path):
    assert main(["lens", "The capital of France is", "--target", " Paris", "--png", str(tmp_path / "l.png"),
                 "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["top1"][-1][-1] == " Paris"
    assert (tmp_path / "l.png").stat().st_size > 1000
    assert main(["estimate", "--batch", "4", "--cache", "all", "--json"]) == 0
    est = json.loads(capsys.readouterr().out)
    assert 130e6 < est["n_params"] < 140e6


def test_peak_rss_of_a_subprocess_is_its_own():
    """The cause of a fresh-clone failure: a subprocess's ``ru_maxrss`` starts at its parent's peak (Linux keeps it
    across fork + exec), so the worker that had just built the 1.1B fixture made its measured child look 1.17x the
    weights. ``peak_rss`` reads the child's own high-water mark."""
    import subprocess
    import sys

    import numpy as np

    from mechscope.compute import peak_rss

    held = np.ones(1536 * 2**20 // 8)  # the parent touches 1.5 GiB
    assert peak_rss() >= 1536 * 2**20
    code = ("import resource; from mechscope.compute import peak_rss; "
            "print(peak_rss(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)")
    own, inherited = map(int, subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                             check=True).stdout.split())
    del held
    assert own < 1024 * 2**20  # importing torch and mechscope (about 0.4 GiB): well below the parent's 1.5 GiB
    if sys.platform == "linux":
        assert inherited >= 1536 * 2**20  # what the old measure would have reported


def test_the_model_is_a_positional_argument_where_a_command_has_no_other(tmp_path, capsys):
    """``mechscope check ./my-model`` and ``mechscope info ./my-model`` as users type them; ``--model`` still works."""
    import json

    from mechscope.cli import main
    from mechscope.cli.registry import COMMANDS, MODEL_POSITIONAL
    from tiny import tiny_hf

    tiny_hf("llama").save_pretrained(tmp_path / "m")
    for argv in (["info", str(tmp_path / "m"), "--json"], ["info", "--model", str(tmp_path / "m"), "--json"]):
        assert main(argv) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["n_layers"] == 3 and out["args"]["model"] == str(tmp_path / "m")
    assert main(["check", str(tmp_path / "m"), "--no-interventions", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == str(tmp_path / "m")
    assert main(["info", str(tmp_path / "m"), "--model", "smollm2-135m"]) == 2
    assert "two models given" in capsys.readouterr().err
    takes = {n for n, c in COMMANDS.items() if any(a.flags == (MODEL_POSITIONAL,) for a in c.args)}
    assert {"info", "check", "estimate", "heads", "circuit", "sae train", "transcoders train", "demo"} <= takes
