"""Outputs a researcher can sign: named metrics, data-size warnings, controls that control, readable pictures.

Each test pins one item of the walk-through that misled a new researcher; each fails on the behaviour it replaced.
"""

import argparse
import json

import pytest
import torch

import mechscope as ms
from mechscope.analysis.metrics import describe_metric, labelled
from mechscope.analysis.validation import MIN_CI_N, Estimate, bootstrap_ci
from mechscope.cli import main
from mechscope.core.errors import InputError, InputTypeError
from tiny import worded_llama

T7 = labelled(lambda lg: lg[:, -1, 7] - lg[:, -1, 9], "logit difference t7 - t9", "logits", "higher = more t7")


@pytest.fixture(scope="module")
def model():
    return worded_llama()


def _task_file(tmp_path, n=12):
    rows = [{"clean": f"t{5 + i % 3} t6 t7 t8", "corrupted": f"t{5 + i % 3} t6 t9 t8", "answer": " t7", "wrong": " t9"}
            for i in range(n)]
    p = tmp_path / "task.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return p


# ------------------------------------------------------------------ 1. names, units, and too little data
def test_every_ablation_line_names_its_metric_and_unit(model):
    toks = torch.randint(5, 50, (12, 6))
    res = ms.ablate(model, toks, T7, ["L0H1"], method="mean")
    text = res.summary()
    assert "logit difference t7 - t9, logits; higher = more t7" in text
    assert "values: mean over the ablated prompts themselves (12)" in text
    unnamed = ms.ablate(model, toks, lambda lg: lg[:, -1, 7], ["L0H1"])
    assert "unnamed" in unnamed.summary()  # says it has no name, instead of printing a bare "metric:"
    ds = ms.datasets.TaskDataset.from_texts(model, ["t5 t6 t7"] * 2, ["t5 t6 t9"] * 2, [" t8"] * 2, [" t5"] * 2)
    assert describe_metric(ds.metric).startswith("logit difference (mean answer logit - mean wrong-answer logit)")


def test_head_report_ablation_names_the_loss():
    toy = worded_llama()
    rep = ms.circuits.heads.head_report(toy, 0, 1, prompts=["t5 t6 t7 t8"])
    assert "next-token loss per sequence" in rep.summary() and "nats per token; lower is better" in rep.summary()


def test_tiny_samples_are_never_distinguishable():
    one = bootstrap_ci([-0.6679])
    two = bootstrap_ci([-2.40, -0.67])
    for est in (one, two):
        assert not est.informative and not est.excludes(0.0)
        assert "too few" in est.summary() and f"use {MIN_CI_N}+" in est.verdict()
        assert "distinguishable" not in est.summary()
    many = bootstrap_ci(torch.full((MIN_CI_N,), 1.0) + torch.linspace(0, 0.1, MIN_CI_N))
    assert many.informative and many.excludes(0.0) and many.verdict() == "distinguishable from zero"
    assert Estimate.exactly(0.5).informative and "exact" in Estimate.exactly(0.5).summary()


def test_ablate_cli_refuses_a_ci_from_one_prompt(model, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ms, "load", lambda *a, **k: model)
    path = _task_file(tmp_path, n=1)
    assert main(["ablate", "--task-file", str(path), "L1H1", "--n-random", "0"]) == 0
    out = capsys.readouterr().out
    assert "n=1" in out and "too few" in out and "(distinguishable" not in out


def test_ablate_cli_prints_a_random_baseline_and_its_reference(model, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ms, "load", lambda *a, **k: model)
    path = _task_file(tmp_path)
    assert main(["ablate", "--task-file", str(path), "L1H1", "L0H2", "--method", "mean", "--n-random", "5"]) == 0
    out = capsys.readouterr().out
    assert "baseline: 5 random sets of 2 heads" in out and "rank p =" in out
    assert "mean over the ablated prompts themselves" in out and "cannot give p < 0.05" in out
    assert main(["ablate", "--task-file", str(path), "L1H1", "--method", "mean", "--reference", "corrupted",
                 "--n-random", "0", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["reference"].startswith("mean over a reference set of 12")


def test_compare_to_random_p_value_and_defaults(model):
    toks = torch.randint(5, 50, (12, 6))
    cmp = ms.compare_to_random(model, toks, T7, ["L0H1", "L1H2"], n_random=4)
    assert cmp.p_value == pytest.approx((1 + sum(abs(e.value) >= abs(cmp.effect.value) for e in cmp.random_effects)) / 5)
    # the shared reference pass gives the same effects as ablating each set on its own
    alone = ms.ablate(model, toks, T7, ["L0H1", "L1H2"], method="mean")
    assert cmp.effect.value == pytest.approx(alone.effect.value, abs=1e-6)
    import inspect

    assert inspect.signature(ms.compare_to_random).parameters["n_random"].default >= 20


def test_sae_eval_flags_too_little_data_and_implausible_values():
    from mechscope.sae.evaluate import SAEEval

    short = SAEEval(32, 0.1, 0.8, 0.753, 3.0, 2.99, 6.0, n_tokens=64, n_seqs=1)
    text = short.summary()
    assert short.ce_recovered > 1
    assert "only 64 evaluation tokens" in text and "above 1" in text and "dead 75.3% on 64 tokens" in text
    assert "+-" not in text and "(-0.0100)" in text  # a negative change prints with one sign
    fine = SAEEval(32, 0.1, 0.8, 0.01, 3.0, 3.2, 6.0, n_tokens=20000, n_seqs=160)
    assert not fine.warnings() and "WARNING" not in fine.summary()


def test_sae_eval_reports_its_data_and_a_ci(model):
    from mechscope.sae import SAE, SAEConfig, evaluate_sae

    sae = SAE(SAEConfig(d_in=32, d_sae=64, architecture="topk", k=8, hook_name="blocks.1.hook_resid_post"))
    ev = evaluate_sae(model, sae, torch.randint(5, 90, (12, 9)))
    assert ev.n_tokens == 12 * 8 and ev.n_seqs == 12 and ev.ce_recovered_ci is not None
    assert "on 96 held-out tokens (12 sequences" in ev.summary() and "95% CI over 12 sequences" in ev.summary()


def test_saturated_detector_says_so():
    from mechscope.circuits.weights import HeadScores

    flat = HeadScores("copying", torch.tensor([[0.999, 0.998, 0.999], [0.998, 0.999, -0.5]]))
    assert "saturated" in flat.summary() and flat.saturation() is not None
    spread = HeadScores("copying", torch.tensor([[0.9, 0.5, 0.1], [0.3, 0.7, -0.5]]))
    assert spread.saturation() is None and "WARNING" not in spread.summary()


def test_task_file_errors_use_line_numbers_and_list_every_bad_row(model, tmp_path):
    p = tmp_path / "bad.jsonl"
    rows = [{"clean": "t5 t6", "corrupted": "t5 t7", "answer": " t8"},
            {"clean": "t5 t6", "answer": " t8"},  # line 2: no corrupted
            {"clean": "t5 t6", "corrupted": "t5 t7", "answer": " t8"},
            {"clean": "t5 t6", "corrupted": "t5 t7"}]  # line 4: no answer
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(InputError) as e:
        ms.datasets.load_task(str(p), model)
    msg = str(e.value)
    assert "2 problem(s)" in msg and "bad.jsonl line 2: no corrupted" in msg and "bad.jsonl line 4: no answer" in msg
    rows = [{"clean": "t5 t6", "corrupted": "t5 t7", "answer": " t8"}] * 6 + \
        [{"clean": "t5 t6", "corrupted": "t5 t7", "answer": [" t8", " t8 t9"]}]  # line 7: a two-token alternative
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(InputError, match="bad.jsonl line 7: answer ' t8 t9' is 2 tokens"):
        ms.datasets.load_task(str(p), model)
    rows[-1] = {"clean": "t5 t6", "corrupted": "t5 t7", "answer": " t8 t9"}  # one string of two tokens: scored whole
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert ms.datasets.load_task(str(p), model).prompt_len == 3
    with pytest.raises(InputError, match=r"row 2: 'corrupted'"):  # lists given in Python: 1-based rows
        ms.datasets.TaskDataset.from_texts(model, ["t5 t6", "t5 t6"], ["t5 t7", ""], [" t8", " t8"])


def test_loaders_take_the_path_first_and_accept_the_old_order(model, tmp_path):
    path = _task_file(tmp_path)
    new = ms.datasets.load_task(str(path), model)
    with pytest.warns(DeprecationWarning, match="path first"):
        old = ms.datasets.load_task(model, str(path))
    assert torch.equal(new.clean, old.clean)
    with pytest.raises(InputTypeError, match=r"load_task\(path, model\): the path must be a str"):
        ms.datasets.load_task(42, model)
    from mechscope.sae import load_sae

    with pytest.raises(InputTypeError, match="must be a mechscope HookedModel"):
        load_sae(str(tmp_path), "not a model")


def test_alias_typo_offers_the_alias_and_no_network_advice_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ms.core.errors.NotFoundError) as e:
        ms.load("smolm2-135m")
    msg = str(e.value)
    assert "Did you mean: smollm2-135m?" in msg and "internet" not in msg.lower()
    assert "HF_HUB_OFFLINE is set" in msg


def test_estimate_labels_what_each_figure_counts_and_knows_mixtures(monkeypatch, tmp_path, capsys):
    from mechscope import sizes

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    for rid, active in [("mistralai/Mixtral-8x7B-v0.1", 12.9e9), ("allenai/OLMoE-1B-7B-0924", 1.3e9),
                        ("Qwen/Qwen1.5-MoE-A2.7B", 2.7e9)]:
        cfg = sizes.config_from_row(sizes.lookup(rid))
        assert abs(sizes.active_param_count(cfg) - active) / active < 0.03, rid
    gpt_oss = sizes.config_from_row(sizes.lookup("openai/gpt-oss-20b"))  # OpenAI's 3.6B leaves out the embedding
    assert abs(sizes.active_param_count(gpt_oss) - 0.58e9 - 3.6e9) / 3.6e9 < 0.03
    assert main(["estimate", "--model", "mistralai/Mixtral-8x7B-v0.1", "--dtype", "bfloat16", "--sae-width", "4096",
                 "--seq-len", "64"]) == 0
    out = capsys.readouterr().out
    assert "active per token" in out and "the SAE alone" in out and "the GPU table's SAE row is this total" in out
    gb = float(out.split("(= ")[1].split(" GB")[0])
    row = next(line for line in out.splitlines() if line.startswith("SAE training (width 4096)") and "bfloat16" in line)
    assert float(row.split()[5]) == pytest.approx(gb, abs=0.11)  # the two figures agree
    assert sizes.closest("meta-lama/Lama-3-8b")[0].startswith("meta-llama/")  # by similarity, not alphabetical


# ------------------------------------------------------------------ 2. pictures
def test_patching_positions_carry_their_tokens_everywhere(model, tmp_path):
    clean, corr = ["t5 t6 t7 t8"] * 12, ["t5 t6 t9 t8"] * 12
    res = ms.patch(model, clean, corr, T7)
    grid, rows, cols = res.grid()
    assert cols[0] == "0: '<bos>'" and cols[3] == "3: 't7'→'t9'"
    assert "3: &#x27;t7&#x27;→&#x27;t9&#x27;" in res.to_html()
    assert "engine:" not in res.summary() and res.to_dict()["stats"]  # the engine's counters: --json and --debug
    from mechscope.analysis import viz

    html = viz.heatmap_plotly(grid, rows, cols)
    assert "4: 't8'" in html and "4: 4:" not in html  # labels are not numbered twice
    heads = ms.patch(model, clean, corr, T7, site="z", per_position=True)
    assert "at pos 4: 't8'" in heads.summary()


def test_top_k_groups_by_position(model):
    res = ms.patch(model, ["t5 t6 t7 t8"] * 12, ["t5 t6 t9 t8"] * 12, T7)
    lines = [l for l in res.summary().splitlines() if l.startswith("  pos ")]
    positions = [l.split()[1] for l in lines]
    assert len(positions) == len(set(positions)) == 5  # one line per position, never ten layers of one position


def test_engine_line_only_with_debug(model, monkeypatch, capsys):
    monkeypatch.setattr(ms, "load", lambda *a, **k: model)
    args = ["patch", "--clean", "t5 t6 t7 t8", "--corrupted", "t5 t6 t9 t8", "--answer", "t7", "--wrong", "t9"]
    assert main(args) == 0
    cap = capsys.readouterr()
    assert "engine:" not in cap.out + cap.err
    assert main(["--debug"] + args) == 0
    assert "engine: forward_passes=" in capsys.readouterr().err


# ------------------------------------------------------------------ 3. controls
def _sae(model):
    from mechscope.sae import SAE, SAEConfig

    return SAE(SAEConfig(d_in=32, d_sae=64, architecture="topk", k=8, hook_name="blocks.1.hook_resid_post"), seed=1)


def test_feature_controls_are_active_features_of_similar_activation(model):
    from mechscope.sae.interventions import _feature_acts, compare_features_to_random, matched_controls

    sae = _sae(model)
    toks = torch.randint(5, 90, (12, 8))
    f = _feature_acts(model, sae, toks)
    mass = f.sum((0, 1))
    fired = mass > 0
    target = int(mass.argmax())
    sets = matched_controls(fired, mass, [target], 20, tolerance=2.0)
    for (c,) in sets:
        assert fired[c] and c != target  # never a silent feature, never the target
    res = compare_features_to_random(model, sae, toks, T7, [target], n_random=20)
    assert len(res.random_effects) == 20 and all(e.value != 0.0 for e in res.random_effects)
    from mechscope.sae.interventions import ablate_features_hook
    from mechscope.techniques.inputs import batched_metric

    full = batched_metric(model, toks, T7, lambda a, b: [(sae.cfg.hook_name, ablate_features_hook(sae, [target]))])
    assert torch.allclose(res.target.ablated, full, atol=1e-5)  # resumed at the SAE's block: the full pass's values
    assert "active on the same prompts at a similar activation" in res.summary() and 0 < res.p_value <= 1
    silent = [i for i in range(64) if not fired[i]]
    if silent:
        with pytest.raises(InputError, match="never fire"):
            compare_features_to_random(model, sae, toks, T7, [silent[0]])


def test_feature_ablation_runs_only_the_prompts_its_features_fire_on(model, monkeypatch):
    from mechscope.sae import SAE, SAEConfig
    from mechscope.sae.interventions import _feature_acts, ablate_features_hook, compare_features_to_random
    from mechscope.techniques.inputs import batched_metric, plain_run

    sae = SAE(SAEConfig(d_in=32, d_sae=64, architecture="topk", k=2, hook_name="blocks.1.hook_resid_post"), seed=1)
    toks = torch.randint(5, 90, (12, 8))
    _, fires = _feature_acts(model, sae, toks, rows=True)  # [prompt, feature]: fires at some position
    some = [i for i in range(64) if 0 < int(fires[:, i].sum()) < 6]  # fires on a few prompts only
    assert some
    target = some[0]
    ran = []
    run_from = model.run_from
    monkeypatch.setattr(model, "run_from", lambda l, x, **k: (ran.append(x.shape[0]), run_from(l, x, **k))[1])
    res = compare_features_to_random(model, sae, toks, T7, [target], n_random=6, tolerance=100.0)
    monkeypatch.undo()
    assert ran[0] == int(fires[:, target].sum()) < 12  # only the prompts where the target fires were run
    full = batched_metric(model, toks, T7, lambda a, b: [(sae.cfg.hook_name, ablate_features_hook(sae, [target]))])
    assert torch.allclose(res.target.ablated, full, atol=1e-5)  # equal to running every prompt
    quiet = ~fires[:, target]
    assert torch.equal(res.target.ablated[quiet], res.target.baseline[quiet])  # the hook left them unchanged
    for (c,), est in zip(res.target.extra["controls"], res.random_effects):
        each = batched_metric(model, toks, T7, lambda a, b, _c=c: [(sae.cfg.hook_name, ablate_features_hook(sae, [_c]))])
        assert abs(float((each - res.target.baseline).mean()) - est.value) < 1e-5
    with pytest.raises(InputError, match="plain run"):
        batched_metric(model, toks, T7, changed=fires[:, target])
    plain = plain_run(model, toks, T7, [1])
    nothing = batched_metric(model, toks, T7, lambda a, b: [], plain=plain, start=1, changed=torch.zeros(12, dtype=bool))
    assert torch.equal(nothing, plain.value.float())


def test_steering_is_in_units_of_the_feature_and_has_a_control(model):
    from mechscope.sae.interventions import feature_scale, steer_hook, steering_sweep

    sae = _sae(model)
    toks = torch.randint(5, 90, (12, 8))
    feat = int(sae.encode(torch.randn(50, 32)).sum(0).argmax())
    scale = feature_scale(model, sae, feat, toks)
    sweep = steering_sweep(model, sae, feat, toks, T7, strengths=(0, 1, 4), scale_tokens=toks)
    assert sweep.scale == pytest.approx(scale) and "scale" in sweep.summary() and "random direction" in sweep.summary()
    assert torch.equal(sweep.values[0], sweep.control[0])  # strength 0: both are the plain model
    from mechscope.techniques.inputs import batched_metric

    full = batched_metric(model, toks, T7, lambda a, b: [(sae.cfg.hook_name, steer_hook(sae, feat, 4.0, scale))])
    assert torch.allclose(sweep.values[2], full, atol=1e-5)  # resumed at the SAE's block: the full pass's values
    assert torch.allclose(sweep.values[0], batched_metric(model, toks, T7), atol=1e-6)
    x = torch.zeros(1, 2, 32)
    assert torch.allclose(steer_hook(sae, feat, 2.0, scale=scale)(x, None),
                          steer_hook(sae, feat, 2.0 * scale)(x, None), atol=1e-6)


# ------------------------------------------------------------------ 4. SAE outputs
def test_sae_features_shows_tokens_by_feature(model):
    from mechscope.sae.features import top_features

    sae = _sae(model)
    res = top_features(model, sae, "t5 t6 t7 t8 t9", k=4)
    assert res.acts.shape == (len(res.tokens), 4) and float(res.acts[0].abs().sum()) == 0  # the sink is not read
    text = res.summary()
    assert "fires on (position: token activation)" in text and "'t5'" in text
    assert [f for f, _ in res] == res.features  # still iterates as (feature, total) pairs


def test_dashboards_sample_density_bands_and_link_back(model, tmp_path):
    from mechscope.sae.features import DENSITY_BANDS, feature_stats, features_by_density, write_dashboards

    d = torch.cat([torch.full((5,), 0.2), torch.full((100,), 0.05), torch.full((3,), 0.005), torch.zeros(50),
                   torch.full((40,), 5e-5)])
    picked = features_by_density(d, 20)
    assert len(picked) == 20 and len(set(picked.values())) == 4  # every non-empty band, not the 20 densest
    assert all(float(d[f]) > 0 for f in picked)
    sae = _sae(model)
    stats = feature_stats(model, sae, torch.randint(5, 90, (16, 12)), n_top=3)
    assert stats.bands and set(stats.bands.values()) <= {b[2] for b in DENSITY_BANDS}
    index = write_dashboards(model, sae, stats, tmp_path / "dash").read_text()
    assert "density band:" in index and "<mark>" in index
    page = (tmp_path / "dash" / f"feature_{next(iter(stats.top))}.html").read_text()
    assert "href='index.html'" in page and page.count("<h2>") == 1


def test_sae_dashboard_cli_takes_named_features(model, tmp_path, monkeypatch, capsys):
    from mechscope.sae import save_sae

    sae = _sae(model)
    path = save_sae(sae, tmp_path / "sae")
    monkeypatch.setattr(ms, "load", lambda *a, **k: model)
    corpus_file = tmp_path / "c.txt"
    corpus_file.write_text("\n\n".join(" ".join(f"t{5 + (i * j) % 80}" for j in range(40)) for i in range(40)))
    assert main(["sae", "dashboard", str(path), "--features", "3,7", "--corpus", str(corpus_file), "--seq-len", "16",
                 "--seqs", "8", "--out", str(tmp_path / "d")]) == 0
    assert "named with --features" in capsys.readouterr().out
    assert (tmp_path / "d" / "feature_3.html").exists() and (tmp_path / "d" / "feature_7.html").exists()
    assert main(["sae", "dashboard", str(path), "--features", "999", "--corpus", str(corpus_file)]) == 2


def test_print_sae_and_encode_without_grad():
    from mechscope.sae import SAE, SAEConfig

    sae = SAE(SAEConfig(d_in=8, d_sae=16, architecture="batchtopk", k=2, hook_name="blocks.0.hook_resid_post"))
    text = repr(sae)
    for part in ("batchtopk", "d_in=8", "d_sae=16", "k=2", "blocks.0.hook_resid_post", "dtype=torch.float32"):
        assert part in text
    assert not sae.encode(torch.randn(3, 8)).requires_grad
    assert sae.encode(torch.randn(3, 8), grad=True).requires_grad
    assert sae.encode(torch.randn(3, 8, requires_grad=True)).requires_grad


# ------------------------------------------------------------------ 5. graphs
def test_mostly_error_graph_says_so_on_top(model):
    from mechscope.graphs import attribution_graph
    from mechscope.sae import SAE, SAEConfig

    tc = SAE(SAEConfig(d_in=32, d_sae=16, architecture="topk", k=2, hook_name=model.mlp_input(0),
                       hook_name_out="blocks.0.hook_mlp_out"))
    g = attribution_graph(model, [tc], "t5 t6 t7 t8", certify=0)
    share = 1 - g.scores()["replacement"]
    warn = g.error_warning()
    if share >= 0.5:
        assert warn is not None and g.summary().startswith("WARNING") and "layers 1-2" in warn
    else:  # the check must be able to fail: a threshold below the share warns
        assert warn is None and g.error_warning(threshold=share / 2) is not None


def test_missing_transcoders_error_says_cost_and_subsets(tmp_path):
    from mechscope.sae import load_transcoders

    with pytest.raises(InputError, match="about 30 minutes.*any subset of layers works"):
        load_transcoders(tmp_path / "none")


# ------------------------------------------------------------------ 6. set-up
def test_every_cli_option_has_help_and_shows_its_default():
    from mechscope.cli import build_parser
    from mechscope.cli.registry import COMMANDS

    missing = [(name, a.flags) for name, cmd in COMMANDS.items() for a in cmd.args if not a.options.get("help")]
    assert not missing, missing
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sae = next(a for a in sub.choices["sae"]._actions if isinstance(a, argparse._SubParsersAction))
    text = sae.choices["train"].format_help()
    for flag, default in (("--steps", "1000"), ("--lr", "0.0003"), ("--k", "32"), ("--out", "sae-run")):
        assert flag in text and f"(default: {default})" in " ".join(text.split()), flag


def test_transcoder_evaluation_shows_progress(model, capsys):
    from mechscope.core.progress import quiet
    from mechscope.sae import SAE, SAEConfig
    from mechscope.sae.evaluate import evaluate_transcoders

    tcs = [SAE(SAEConfig(d_in=32, d_sae=16, architecture="topk", k=2, hook_name=model.mlp_input(l),
                         hook_name_out=f"blocks.{l}.hook_mlp_out")) for l in range(3)]
    with quiet(False):
        ev = evaluate_transcoders(model, tcs, torch.randint(5, 90, (4, 8)))
    err = capsys.readouterr().err
    assert "evaluating transcoders on 32 tokens" in err and "CE loss with all 3 transcoders" in err
    assert "next-token loss change, nats" in ev.summary()
