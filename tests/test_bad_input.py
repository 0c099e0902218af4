"""The bad-input suite: every input a researcher can get wrong gets a mechscope error naming what was wrong.

Each case runs one wrong call and asserts that a :class:`MechscopeError` comes out whose message
names the problem (the regex) - never a raw exception from torch, transformers, safetensors or
Python itself. Cases span loading, tokens and text, hook points, techniques, tasks, SAEs, run
records and the CLI. A case that starts raising something else fails with that exception's type.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import mechscope as ms
from mechscope.cli import main
from mechscope.core.errors import InputError, MechscopeError
from tiny import V, tiny_hf, worded_llama


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    tiny_hf("llama").save_pretrained(tmp / "m")
    return tmp, ms.HookedModel(tiny_hf("llama")), torch.randint(3, V, (2, 6), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def worded(env):
    """The tiny model with a word-level tokenizer ("t5 t6" -> [bos, 5, 6]), for text and task files."""
    return worded_llama()


def _rows(n: int = 4) -> str:
    return "".join(json.dumps({"clean": f"t5 t6 t{10 + i}", "corrupted": f"t7 t6 t{10 + i}", "answer": " t9",
                               "wrong": " t8"}) + "\n" for i in range(n))


def _copy(tmp: Path, name: str) -> Path:
    d = tmp / name
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(tmp / "m", d)
    return d


def _truncated_weights(tmp, model, toks):
    d = _copy(tmp, "trunc")
    p = d / "model.safetensors"
    p.write_bytes(p.read_bytes()[:1000])
    ms.load(str(d))


def _config_not_json(tmp, model, toks):
    d = _copy(tmp, "badcfg")
    (d / "config.json").write_text("{not json")
    ms.load(str(d))


def _gguf(tmp, model, toks):
    (tmp / "x.gguf").write_bytes(b"GGUF\x03\x00\x00\x00 too short")
    ms.load(str(tmp / "x.gguf"))


def _patch(**kw):
    from mechscope.techniques.patching import patch

    return lambda tmp, model, toks: patch(model, toks, toks.flip(1), lambda lg: lg[:, -1, 0], **kw)


def _ablate(components, **kw):
    from mechscope.techniques.ablation import ablate

    return lambda tmp, model, toks: ablate(model, toks, lambda lg: lg[:, -1, 0], components, **kw)


def _sae_folder(tmp: Path, name: str, cfg: str | None, weights: bytes | None = b"x") -> Path:
    d = tmp / name
    d.mkdir(exist_ok=True)
    if cfg is not None:
        (d / "cfg.json").write_text(cfg)
    if weights is not None:
        (d / "sae_weights.safetensors").write_bytes(weights)
    return d


def _saved_sae(tmp: Path, name: str, d_in: int = 32, nan: bool = False) -> Path:
    from mechscope.sae import SAE, SAEConfig, save_sae

    sae = SAE(SAEConfig(d_in=d_in, d_sae=8, k=2, hook_name="blocks.0.hook_resid_post"))
    if nan:
        with torch.no_grad():
            sae.W_enc[0, 0] = float("nan")
    save_sae(sae, tmp / name)
    return tmp / name


def _load_sae(path_fn, **kw):
    def run(tmp, model, toks):
        from mechscope.sae import load_sae

        load_sae(str(path_fn(tmp)), **({"model": model} if kw.get("with_model") else {}))
    return run


def _pickle_checkpoint(tmp, model, toks):
    import argparse

    from mechscope.sae import load_sae

    d = tmp / "dl"
    d.mkdir(exist_ok=True)
    torch.save({"x": torch.zeros(2), "args": argparse.Namespace(a=1)}, d / "ae.pt")
    (d / "config.json").write_text(json.dumps({"trainer": {"layer": 0, "dict_class": "AutoEncoder",
                                                            "activation_dim": 32, "dict_size": 8}}))
    load_sae(str(d))


def _task_file(text: str, suffix: str = ".jsonl"):
    def run(tmp, model, toks):
        p = tmp / f"task{suffix}"
        p.write_text(text)
        ms.datasets.load_task(str(p), model)
    return run


def _resume_with(change: dict, sae_change: dict | None = None):
    def run(tmp, model, toks):
        from mechscope.sae import SAEConfig, TrainConfig, fit_sae

        acts = torch.randn(500, 8, generator=torch.Generator().manual_seed(0))
        cfg = dict(d_in=8, d_sae=16, architecture="topk", k=2)
        tc = dict(steps=20, batch_size=32, checkpoint_every=5, log_every=5)
        out = tmp / f"resume-{len(list(tmp.glob('resume-*')))}"
        fit_sae(acts, SAEConfig(**cfg), TrainConfig(**tc), out=out, progress=False, stop_after=10)
        fit_sae(acts, SAEConfig(**{**cfg, **(sae_change or {})}), TrainConfig(**{**tc, **change}), out=out,
                resume=True, progress=False)
    return run


def _corrupt_run_record(tmp, model, toks):
    from mechscope.core.files import read_json

    (tmp / "runs-bad" / "r").mkdir(parents=True, exist_ok=True)
    (tmp / "runs-bad" / "r" / "run.json").write_text('{"name": "r", "stat')
    read_json(tmp / "runs-bad" / "r" / "run.json", "a run record")


CASES = {
    # loading
    "dtype typo": (lambda tmp, m, t: ms.load(str(tmp / "m"), dtype="float33"), r"unsupported dtype 'float33'.*float32"),
    "dtype int8": (lambda tmp, m, t: ms.load(str(tmp / "m"), dtype="int8"), r"unsupported dtype 'int8'"),
    "dtype object": (lambda tmp, m, t: ms.load(str(tmp / "m"), dtype=torch.int8), r"dtype"),
    "device cuda without GPU": (lambda tmp, m, t: ms.load(str(tmp / "m"), device="cuda"), r"no CUDA GPU|cuda")
    if not torch.cuda.is_available() else (lambda tmp, m, t: ms.load(str(tmp / "m"), device="cuda:99"), r"cuda"),
    "device unknown": (lambda tmp, m, t: ms.load(str(tmp / "m"), device="tpu9"), r"unknown device 'tpu9'"),
    "truncated model.safetensors": (_truncated_weights, r"model.safetensors"),
    "config.json not JSON": (_config_not_json, r"config"),
    "truncated GGUF": (_gguf, r"x.gguf is not a readable GGUF"),
    "missing folder": (lambda tmp, m, t: ms.load(str(tmp / "nope") + "/"), r"no such file or folder"),
    "offload options without device_map": (
        lambda tmp, m, t: ms.load(str(tmp / "m"), max_memory={"cpu": "1GB"}, device_map="sideways"), r"device_map"),
    # tokens and text
    "to_tokens(None)": (lambda tmp, m, t: m.to_tokens(None), r"text must be a string or a list of strings"),
    "to_tokens(5)": (lambda tmp, m, t: m.to_tokens(5), r"got int 5"),
    "non-string prompt in a list": (lambda tmp, m, t: m.tokenize(["a", 3]), r"texts \[1\] are not strings"),
    "text without a tokenizer": (lambda tmp, m, t: m("hello"), r"no tokenizer"),
    "token id past the vocabulary": (lambda tmp, m, t: m(torch.tensor([[1, V + 5]])), rf"valid ids are 0\.\.{V - 1}"),
    "negative token id": (lambda tmp, m, t: m(torch.tensor([[1, -2]])), r"outside the vocabulary"),
    "float tokens": (lambda tmp, m, t: m(torch.rand(1, 4)), r"integer ids"),
    # hook points and caches
    "unknown hook point": (lambda tmp, m, t: m.run_with_cache(t, names_filter="blocks.0.hook_resid_prex"),
                           r"Did you mean: blocks.0.hook_resid_pre"),
    "hook layer out of range": (lambda tmp, m, t: m.run_with_cache(t, names_filter="blocks.9.hook_resid_pre"),
                                r"unknown hook point 'blocks.9"),
    "names_filter matching nothing": (lambda tmp, m, t: m.run_with_cache(t, names_filter=lambda n: False),
                                      r"matches no hook point"),
    "pos_slice past the prompt": (
        lambda tmp, m, t: m.run_with_cache(t, names_filter="blocks.0.hook_resid_pre", pos_slice=100),
        r"pos_slice \[100\] is outside the prompt: it has 6 positions"),
    "cache key not recorded": (
        lambda tmp, m, t: m.run_with_cache(t, names_filter="blocks.0.hook_resid_pre")[1]["blocks.1.hook_resid_pre"],
        r"was not recorded in this cache"),
    # techniques: indices are checked before any work
    "patch heads=[42]": (_patch(site="z", heads=[42]), r"heads \[42\] out of range: valid heads are 0\.\.3"),
    "patch layers=[7]": (_patch(layers=[7]), r"layers \[7\] out of range: valid layers are 0\.\.2"),
    "patch positions=[50]": (_patch(positions=[50]), r"positions \[50\] out of range: valid positions are 0\.\.5"),
    "patch unknown site": (_patch(site="zz"), r"unknown patching site 'zz'"),
    "patch prompts of different lengths": (
        lambda tmp, m, t: __import__("mechscope.techniques.patching", fromlist=["patch"]).patch(
            m, t, t[:, :4], lambda lg: lg[:, -1, 0]), r"same token length"),
    "ablate a layer that does not exist": (_ablate(["L9H0"]), r"layer 9 out of range 0\.\.2"),
    "ablate head 42": (_ablate(["L0H42"]), r"head 42 out of range 0\.\.3"),
    "component that does not parse": (lambda tmp, m, t: ms.Component.parse("L5X3"), r"cannot read component 'L5X3'"),
    "multi-token answers without alternatives": (
        lambda tmp, m, t: __import__("mechscope.analysis.metrics", fromlist=["logit_diff"]).logit_diff(
            torch.zeros(2, 5, V), torch.tensor([[1, 2], [3, 4]]), torch.tensor([5, 6])), r"alternatives=True"),
    "built-in task on a model without a tokenizer": (lambda tmp, m, t: ms.datasets.ioi(m, 4), r"no tokenizer"),
    # task files
    "task file missing": (lambda tmp, m, t: ms.datasets.load_task(str(tmp / "none.jsonl"), m), r"no such task file"),
    "task file not JSON": (_task_file('{"clean": "a b", "corrupted": "a c"\n'), r"task.jsonl line 1: not valid JSON"),
    "task file without a column": (_task_file('{"clean": "a b", "answer": " c"}\n'), r"line 1: no corrupted"),
    "task csv without rows": (_task_file("clean,corrupted,answer\n", ".csv"), r"at least one row"),
    "corpus that does not exist": (lambda tmp, m, t: ms.corpus.from_spec(str(tmp / "none.txt")), r"is not a file"),
    # SAEs
    "SAE cfg.json not JSON": (_load_sae(lambda tmp: _sae_folder(tmp, "sae1", "{x")), r"cfg.json is not valid JSON"),
    "SAE cfg.json without d_in": (_load_sae(lambda tmp: _sae_folder(tmp, "sae2", '{"d_sae": 4}')), r"no 'd_in'"),
    "SAE folder missing": (_load_sae(lambda tmp: tmp / "nosae"), r"no SAE folder"),
    "SAE weights truncated": (_load_sae(lambda tmp: _sae_folder(tmp, "sae5", None, None) if (
        _saved_sae(tmp, "sae5") and (tmp / "sae5" / "sae_weights.safetensors").write_bytes(b"\x08\x00")) else None),
        r"sae_weights.safetensors is damaged or truncated"),
    "SAE with NaN weights": (_load_sae(lambda tmp: _saved_sae(tmp, "sae4", nan=True)), r"NaN or infinite"),
    "SAE d_in does not fit the model": (_load_sae(lambda tmp: _saved_sae(tmp, "sae3", d_in=16), with_model=True),
                                        r"d_in=16 but blocks.0.hook_resid_post .* has width 32"),
    "pickle-only checkpoint": (_pickle_checkpoint, r"would run code when loaded.*refuses"),
    "SAE unknown architecture": (lambda tmp, m, t: ms.sae.SAEConfig(d_in=4, d_sae=8, architecture="gated2"),
                                 r"architecture must be one of"),
    "activations of the wrong width": (
        lambda tmp, m, t: ms.sae.fit_sae(torch.zeros(10, 5), ms.sae.SAEConfig(d_in=4, d_sae=8, k=2), progress=False),
        r"activations must be \[n, d_in=4\]"),
    "resume with a new learning rate": (_resume_with({"lr": 1e-2}), r"train\.lr: checkpoint 0\.0003, now 0\.01"),
    "resume with a different width": (_resume_with({}, {"d_sae": 32}), r"sae\.d_sae: checkpoint 16, now 32"),
    # records
    "a run record that is not JSON": (_corrupt_run_record, r"run.json is not valid JSON"),
    "unknown checklist item": (lambda tmp, m, t: ms.analysis.checklist.Checklist().add("causality", "x"),
                               r"unknown checklist item 'causality'"),
    "project name with a path": (lambda tmp, m, t: ms.project.init_project("../x", tmp), r"plain folder name"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gets_a_clear_mechscope_error(name, env):
    fn, pattern = CASES[name]
    try:
        fn(*env)
    except MechscopeError as e:
        import re

        assert re.search(pattern, str(e)), f"{name}: message {str(e)!r} does not match {pattern!r}"
    except Exception as e:  # noqa: BLE001 - the point of the suite: anything else is a bug
        pytest.fail(f"{name}: a raw {type(e).__module__}.{type(e).__name__} reached the user: {e}")
    else:
        pytest.fail(f"{name}: no error was raised")


def test_the_suite_is_wide():
    assert len(CASES) >= 40


def test_prompt_past_the_context_warns_once(env):
    tmp, model, toks = env
    long = torch.randint(3, V, (1, 70))  # the tiny model's context is 64
    with pytest.warns(UserWarning, match=r"70 tokens.*64") as rec:
        model(long)
        model(long)
    assert len([w for w in rec if "64" in str(w.message)]) == 1


CLI_CASES = {
    "an option the command does not use": (["dla", "x", "--answer", " a", "--corpus", "c.txt"],
                                           "unrecognized arguments: --corpus"),
    "an unknown command": (["frobnicate"], "invalid choice: 'frobnicate'"),
    "a task file that does not exist": (["patch", "--task-file", "{tmp}/none.jsonl"], "no such task file"),
    "a corpus that does not exist": (["sae", "train", "--corpus", "{tmp}/nope", "--hook", "blocks.1.hook_resid_post",
                                      "--steps", "2"], "is not a file"),
    "a built-in task without a tokenizer": (["ablate", "--task", "ioi", "L0H0"], "no tokenizer"),
    "a component out of range": (["ablate", "--task-file", "{tmp}/t.jsonl", "L9H0"], "layer 9 out of range"),
}


@pytest.mark.parametrize("name", list(CLI_CASES))
def test_cli_bad_input_is_one_clear_line(name, env, worded, capsys, monkeypatch):
    tmp, model, _ = env
    (tmp / "t.jsonl").write_text(_rows())
    args, expected = CLI_CASES[name]
    args = [a.replace("{tmp}", str(tmp)) for a in args]
    monkeypatch.setattr(ms, "load", lambda *a, **k: worded if "--task-file" in args else model)
    try:
        rc = main(args + (["--quiet"] if args[0] not in ("frobnicate",) else []))
    except SystemExit as e:  # argparse's own errors exit 2
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, err
    assert expected in err and "Traceback" not in err and "internal error" not in err, err


def test_quiet_and_json_keep_stdout_clean(env, worded, capsys, monkeypatch):
    tmp, _, _ = env
    (tmp / "t.jsonl").write_text(_rows())
    monkeypatch.setattr(ms, "load", lambda *a, **k: worded)
    assert main(["patch", "--task-file", str(tmp / "t.jsonl"), "--site", "resid_pre", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["site"] == "resid_pre"  # stdout is exactly one JSON document
    assert main(["--quiet", "patch", "--task-file", str(tmp / "t.jsonl"), "--site", "resid_pre", "--json"]) == 0
    out, err = capsys.readouterr()
    json.loads(out)
    assert err == "", err


def test_every_numeric_option_is_checked_when_it_is_parsed(capsys):
    """`sae train --steps -5` once exited 0 after saving an untrained SAE, and `sae explain --n-features 0` blamed the
    tokens: every int or float option of every command now has a range (cli.registry.RANGES) checked by argparse."""
    from mechscope.cli import main
    from mechscope.cli.registry import COMMANDS, RANGES

    unranged = sorted({f"{c.name} {a.flags[0]}" for c in COMMANDS.values() for a in c.args
                       if a.options.get("type") in (int, float) and a.flags[0] not in RANGES})
    assert not unranged, f"numeric options without a range in cli.registry.RANGES: {unranged}"
    for argv, want in ((["sae", "train", "--steps", "-5"], "--steps: must be at least 1, got -5"),
                       (["sae", "explain", "x", "--n-features", "0"], "--n-features: must be at least 1, got 0"),
                       (["graph", "x", "--node-threshold", "1.5"], "must be above 0 and at most 1, got 1.5"),
                       (["sae", "train", "--lr", "0"], "--lr: must be above 0, got 0"),
                       (["transcoders", "train", "--width", "lots"], "--width: expected an integer, got 'lots'")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and want in capsys.readouterr().err, argv


def test_synthetic_world_configs_refuse_what_they_cannot_build():
    from mechscope.sae.synthetic import SynthConfig, SynthWorld, evaluate_on_world

    for bad, want in (({"zipf_exponent": 0.0}, "zipf_exponent must be > 0"),
                      ({"mutually_exclusive": -0.5}, r"mutually_exclusive is a share of parents, in \[0, 1\]"),
                      ({"branching": 0}, "branching must be >= 1"),
                      ({"std_magnitude": (0.5, -1.0)}, "std_magnitude")):
        with pytest.raises(InputError, match=want):
            SynthConfig(**bad)
    from mechscope.sae import SAE, SAEConfig

    world = SynthWorld.build(SynthConfig(num_features=16, hidden_dim=8, roots=2, depth=1, ortho_steps=0))
    with pytest.raises(InputError, match="n_samples and chunk must be at least 1, got 0"):
        evaluate_on_world(SAE(SAEConfig(d_in=8, d_sae=16, k=4)), world, n_samples=0)


# ---------------------------------------------------------------------------------------------- issue 36, section 2-3


def test_a_pickle_payload_is_refused_saying_it_would_run_code(tmp_path, env):
    """A stage file and a pytorch_model.bin holding a pickle payload: refused, nothing runs, the message says why."""
    import os

    from mechscope.core.files import read_torch

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"x": Payload()}, tmp_path / "stage.pt")
    with pytest.raises(InputError, match="would run code when loaded.*refuses it"):
        read_torch(tmp_path / "stage.pt", "a stored stage")
    m = tiny_hf("llama")
    m.save_pretrained(tmp_path / "model")
    (tmp_path / "model" / "model.safetensors").unlink()
    torch.save({**m.state_dict(), "x": Payload()}, tmp_path / "model" / "pytorch_model.bin")
    with pytest.raises(InputError, match="(?i)pytorch_model.bin .*would run code when loaded.*convert it to safetensors"):
        ms.load(str(tmp_path / "model"))
    assert not marker.exists()


def test_padded_logits_are_read_at_each_row_s_last_real_token(worded):
    """`logit_diff(model(["Hi", longer]))` without a mask: the logits carry the padding, so row 0 is read at its last
    real token (the value its own forward pass gives), never at a padding position; left padding too."""
    from mechscope import logit_diff

    short, longer = "t5 t6", "t5 t6 t7 t8 t9"
    alone = logit_diff(worded(short), 11, 12)
    for side in ("right", "left"):
        both = logit_diff(worded([short, longer], padding_side=side), 11, 12)
        assert torch.allclose(both[0], alone[0], atol=1e-4), side
        assert torch.allclose(both[1], logit_diff(worded(longer), 11, 12)[0], atol=1e-4), side


def test_positions_tokens_and_hooks_that_do_not_fit_are_named(worded):
    import warnings

    from mechscope import token_prob
    from mechscope.core.errors import InputTypeError

    with pytest.raises(InputError, match=r"pos_slice \[100\] is outside the prompt: it has 5 positions"):
        worded.run_with_cache("t5 t6 t7 t8", pos_slice=[100])
    with pytest.raises(InputError, match="one token id per prompt.*multi-token answer"):
        token_prob(worded("t5 t6"), worded.to_tokens("t5 t6", prepend_bos=False))
    with pytest.raises(InputTypeError, match="logit_lens: tokens must be str or Tensor, got NoneType"):
        ms.logit_lens(worded, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = worded.run_with_hooks("t5 t6", fwd_hooks=[("blocks.0.hook_resid_post", lambda a, h: a.double())])
    assert out.dtype == torch.float32
    assert any("returned torch.float64" in str(w.message) and "blocks.0.hook_resid_post" in str(w.message)
               for w in caught)


def test_every_public_function_of_graphs_and_circuits_checks_its_model_argument():
    """A string (or anything else) where a HookedModel belongs gets an error naming the argument, in every public
    function of mechscope.graphs and mechscope.circuits that takes a model, before any work."""
    import importlib
    import inspect
    import pkgutil

    import mechscope.circuits as c
    import mechscope.graphs as g
    from mechscope.core.errors import InputTypeError

    seen = 0
    for pkg in (g, c):
        for mi in pkgutil.iter_modules(pkg.__path__):
            mod = importlib.import_module(f"{pkg.__name__}.{mi.name}")
            for name, f in vars(mod).items():
                if not (inspect.isfunction(f) and not name.startswith("_") and f.__module__ == mod.__name__):
                    continue
                params = inspect.signature(f).parameters
                if not params or next(iter(params)) != "model":
                    continue
                args = ["gpt2"] + [None] * sum(1 for p in list(params.values())[1:] if p.default is p.empty
                                                and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
                with pytest.raises(InputTypeError, match="model must be (a mechscope )?HookedModel.*got str"):
                    f(*args)
                seen += 1
    assert seen >= 30


def test_task_rows_that_cannot_measure_anything_are_refused_by_line(tmp_path, worded):
    from mechscope.datasets import load_task

    same = "".join(json.dumps({"clean": f"t5 t6 t{10 + i}", "corrupted": f"t7 t6 t{10 + i}", "answer": " t9",
                               "wrong": " t9"}) + "\n" for i in range(3))
    (tmp_path / "same.jsonl").write_text(same)
    with pytest.raises(InputError, match=r"(?s)3 problem.*same.jsonl line 1: the wrong answer is the answer itself"):
        load_task(tmp_path / "same.jsonl", worded)
    moved = _rows(3) + json.dumps({"clean": "t5 t6 t40", "corrupted": "t5 t7 t40", "answer": " t9",
                                   "wrong": " t8"}) + "\n"
    (tmp_path / "moved.jsonl").write_text(moved)
    with pytest.raises(InputError, match=r"(?s)moved.jsonl line 4: the prompts differ at position\(s\) \[2\], but in 3 of "
                                         r"4 rows at \[1\]"):
        load_task(tmp_path / "moved.jsonl", worded)


def test_investigate_on_a_few_pairs_patches_and_marks_every_finding_not_enough_data(tmp_path, worded):
    from mechscope.datasets import load_task
    from mechscope.workflows import investigate

    (tmp_path / "few.jsonl").write_text(_rows(3))
    rep = investigate(worded, load_task(tmp_path / "few.jsonl", worded), tmp_path / "out", echo=False)
    assert rep.findings and not any(f.holds for f in rep.findings)
    assert all("not enough data" in f.text for f in rep.findings)
    titles = " ".join(s.title for s in rep.sections)
    assert "no split" in titles and "circuit, validated" not in titles
    assert "give at least 20 prompt pairs" in rep.sections[-1].text
    # one pair, as the README's --clean/--corrupted/--answer/--wrong make it: runs what one pair supports
    from mechscope.datasets import TaskDataset

    one = TaskDataset.from_texts(worded, ["t5 t6 t7"], ["t8 t6 t7"], [" t9"], [" t8"], name="one pair")
    rep = investigate(worded, one, tmp_path / "one", echo=False)
    assert (tmp_path / "one" / "report.html").is_file() and not any(f.holds for f in rep.findings)
