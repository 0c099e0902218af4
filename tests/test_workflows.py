"""The demo investigation and the technique commands on the default model (slow tier)."""

import json

import pytest

from mechscope.cli import main

pytestmark = pytest.mark.slow


def test_demo_investigation_writes_report(smollm, tmp_path):
    from mechscope.workflows import demo_investigation

    rep = demo_investigation(smollm, tmp_path, n_prompts=4)
    html = (tmp_path / "report.html").read_text()
    assert [s.title[:2] for s in rep.sections] == ["1.", "2.", "3.", "4.", "5.", "6.", "7.", "8."]
    for png in ("logit_lens.png", "dla.png", "ioi_resid.png", "ioi_heads.png", "induction.png", "probe.png"):
        assert (tmp_path / png).stat().st_size > 5000 and png in html
    assert "<script" not in html and "http" not in html  # offline, no CDN
    assert "&#x27; Paris&#x27;" in html or "&#x27;Paris&#x27;" in html or "Paris" in html
    causal = rep.sections[4].text
    assert "matter more than random heads" in causal, causal
    assert rep.metrics["induction_top_minus_random"] > 1.0
    assert "beats its control task" in rep.sections[6].text
    assert (tmp_path / "features" / "index.html").exists() and (tmp_path / "sae" / "cfg.json").exists()
    assert rep.metrics["sae_ce_recovered"] > 0.3


def test_technique_commands(capsys, monkeypatch, smollm, tmp_path):
    import mechscope

    monkeypatch.setattr(mechscope, "load", lambda *a, **k: smollm)
    assert main(["dla", "The capital of France is", "--answer", " Paris", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert abs(out["error"]) < 1e-3 and out["target"] > 5
    assert main(["patch", "--task", "ioi", "--n", "2", "--site", "attn_out", "--png", str(tmp_path / "p.png"),
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["clean"] > 0 > out["corrupted"] and (tmp_path / "p.png").exists()
    assert main(["attrib", "--task", "ioi", "--n", "2", "--site", "z", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["values"]) == 30
    assert main(["ablate", "--task", "ioi", "--n", "4", "L20H0", "L23H3", "--method", "mean", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ci"][1] < 0
    assert main(["patch", "--clean", "The capital of France is", "--corrupted", "The capital of Italy is",
                 "--answer", " Paris", "--wrong", " Rome", "--site", "z"]) == 0
    assert main(["patch", "--clean", "a b", "--corrupted", "a b c", "--answer", " c"]) == 2
    assert "same token length" in capsys.readouterr().err
    assert main(["dla", "x", "--answer", " Parisianism"]) == 2
    assert "not one" in capsys.readouterr().err
