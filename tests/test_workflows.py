"""The demo investigation and the technique commands on the default model (slow tier)."""

import json
import re

import pytest

from mechscope.cli import main

pytestmark = pytest.mark.slow


def test_demo_investigation_writes_report(smollm, tmp_path, monkeypatch):
    from mechscope.workflows import demo_investigation

    monkeypatch.setenv("MECHSCOPE_CACHE", str(tmp_path / "empty-cache"))  # CI's case: no transcoders trained
    # 10 held-out prompts: the fewest that give a CI; 5 random head sets a seed in the induction check (the demo's
    # default is 20): its bounds below hold with room to spare, and compare_to_random with 20 runs in the tutorial
    rep = demo_investigation(smollm, tmp_path, n_prompts=10, induction_random=5)
    html = (tmp_path / "report.html").read_text()
    titles = [s.title for s in rep.sections]
    assert [t.split(".")[0] for t in titles] == [str(i) for i in range(1, len(titles) + 1)]
    sec = {t.split(". ", 1)[1].split(": ", 1)[-1]: s for t, s in zip(titles, rep.sections)}
    # the IOI part is `investigate`, the same code path as `mechscope investigate --task ioi`
    assert {"does the model do the task?", "the circuit, validated on held-out prompts", "what to do next",
            "does the circuit depend on the split?"} <= set(sec)
    assert "mechscope transcoders train" in rep.sections[-1].text and not (tmp_path / "graph.html").exists()
    for png in ("logit_lens.png", "dla.png", "resid_patching.png", "head_patching.png", "circuit.png", "induction.png",
                "probe.png"):
        assert (tmp_path / png).stat().st_size > 5000 and f"alt='{png}'" in html
    assert f"src='{png}'" not in html and html.count("src='data:image/png;base64,") >= 6  # one file: PNGs inline
    # offline: no script, stylesheet or picture is fetched from anywhere
    assert not re.search(r"""<(script|img|link|iframe)[^>]+(src|href)=["']?(https?:)?//""", html)
    assert "Plotly.newPlot" in html
    # findings at the top, each linking to a section that exists, with its effect and its baseline
    ids = set(re.findall(r"<section id='([^']+)'", html))
    links = re.findall(r"<li(?: class=ms-fails)?><a href='#([^']+)'", html.split("<nav")[0])
    assert len(links) == len(rep.findings) >= 5 and set(links) <= ids
    assert all("baseline" in html.split(f"href='#{k}'")[1][:600] for k in links)
    toc = re.findall(r"<a href='#([^']+)'>", html.split("<nav")[1].split("</nav>")[0])
    assert set(toc) <= ids and len(toc) == len(rep.sections) + 1 and len(ids) == len(rep.sections) + 2
    assert html.index("findings") < html.index("quality checklist") < html.index("1. environment")
    assert html.count("<details><summary>raw output</summary>") >= 6
    rec = json.loads((tmp_path / "record.json").read_text())
    assert rec["checklist"]["met"]["causal"] and rec["checklist"]["met"]["alternatives"]
    assert len(rec["findings"]) == len(rep.findings) and "Plotly" not in json.dumps(rec)
    assert "Paris" in html
    # the real model's answers. This one run also holds what four real-model tests checked on runs of their own
    # (the IOI circuit, the induction heads, the probe, the TopK SAE), with the same or stricter bounds
    m = rep.metrics
    assert m["accuracy"] > 0.9 and m["circuit"]
    assert "more faithful than" in sec["the circuit, validated on held-out prompts"].text
    assert m["faithfulness_ci"][0] > 0.3 and m["rank_p"] < 0.05
    assert m["faithfulness"] > 0.4 and m["faithfulness_ci"][0] > m["random_faithfulness_highest"]  # every random
    assert m["knockout_ci"][1] < 0 and {"L20H0", "L23H3", "L17H4"} & set(m["circuit"])  # IOI's known heads
    assert m["induction_top_score"] > 0.3 and m["induction_top_minus_random"] > 1.0
    assert all(low > 0.5 for _, low, _ in m["induction_seed_differences"])  # top 4 - random, each of 3 seeds
    assert "beats its control task" in sec["linear probe with a control task"].text
    sel = m["probe_selectivity"]  # layers 0, n/3, 2n/3, n-3: context, not token identity, at the late layer
    assert sel[-1][1] > 0 and sel[0][0] < sel[-1][0], (m["probe_hooks"], sel)
    assert (tmp_path / "features" / "index.html").exists() and (tmp_path / "sae" / "cfg.json").exists()
    ce_clean, ce_sae, ce_zero = m["sae_ce"]
    assert ce_zero > ce_sae > ce_clean and m["sae_explained_variance_typical"] > 0.5 and m["sae_ce_recovered"] > 0.5


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
    assert main(["ablate", "--task", "ioi", "--n", "12", "L20H0", "L23H3", "--method", "mean", "--n-random", "3",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["effect"]["high"] < 0 and out["target"]["ci"][1] < 0 and len(out["random_effects"]) == 3
    assert "mean over the ablated prompts themselves (12)" in out["target"]["reference"]
    assert main(["patch", "--clean", "The capital of France is", "--corrupted", "The capital of Italy is",
                 "--answer", " Paris", "--wrong", " Rome", "--site", "z"]) == 0
    assert main(["patch", "--clean", "a b", "--corrupted", "a b c", "--answer", " c"]) == 2
    assert "same token length" in capsys.readouterr().err
    assert main(["dla", "x", "--answer", " Parisianism"]) == 2
    assert "not one" in capsys.readouterr().err
