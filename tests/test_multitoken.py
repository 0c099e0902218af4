"""Answers of several tokens: scored whole (teacher-forced log-probabilities), checked against plain forward passes of
prompt + answer; patching and attribution read the prompt positions only; investigate, circuit and patch run on them."""

import json

import pytest
import torch

from mechscope import datasets as D
from mechscope.cli import main
from mechscope.core.errors import InputError
from mechscope.techniques.inputs import prepare
from mechscope.techniques.patching import patch
from tiny import worded_llama

CLEAN = ["t1 t2 t3 t4", "t5 t6 t7 t8", "t9 t10 t11 t12"]
CORR = ["t1 t2 t30 t4", "t5 t6 t31 t8", "t9 t10 t32 t12"]
ANSWERS = [" t40 t41 t42", " t43", " t44 t45"]
WRONG = [" t50 t51", " t52 t53 t54", " t55"]


@pytest.fixture(scope="module")
def model():
    return worded_llama()


def _logp(model, prompt: str, cont: str) -> float:
    """log p(cont | prompt) from one plain forward pass of prompt + cont."""
    p, c = model.to_tokens(prompt)[0], model.to_tokens(cont, prepend_bos=False)[0]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.cat([p, c])[None])[0].double(), -1)
    return float(sum(logp[len(p) - 1 + j, int(t)] for j, t in enumerate(c)))


def test_the_metric_equals_plain_forward_passes_of_prompt_and_answer(model):
    ds = D.TaskDataset.from_texts(model, CLEAN, CORR, ANSWERS, WRONG)
    assert ds.rows_per_pair == 2 and ds.n_pairs == 3 and len(ds) == 6 and ds.prompt_len == 5
    with torch.no_grad():
        rows = ds.metric(model(ds.clean))
    got = ds.per_pair(rows)
    want = torch.tensor([_logp(model, c, a) - _logp(model, c, w) for c, a, w in zip(CLEAN, ANSWERS, WRONG)],
                        dtype=torch.double)
    assert torch.allclose(got.double(), want, atol=1e-4), (got, want)
    assert abs(float(rows.mean()) - float(want.mean())) < 1e-4  # a mean over rows is the mean over pairs
    assert "teacher-forced" in ds.metric_name and ds.metric_unit == "nats"
    # without wrong answers: one row a pair, log p(answer)
    solo = D.TaskDataset.from_texts(model, CLEAN, CORR, ANSWERS)
    with torch.no_grad():
        got = solo.metric(model(solo.corrupted))
    want = torch.tensor([_logp(model, x, a) for x, a in zip(CORR, ANSWERS)], dtype=torch.double)
    assert solo.rows_per_pair == 1 and torch.allclose(got.double(), want, atol=1e-4)


def test_subsets_and_splits_keep_a_pairs_rows_together(model):
    ds = D.TaskDataset.from_texts(model, CLEAN * 4, CORR * 4, ANSWERS * 4, WRONG * 4)
    train, test = ds.split(0.5, seed=1)
    assert train.n_pairs + test.n_pairs == 12 and len(train) == 2 * train.n_pairs
    with torch.no_grad():
        whole = ds.per_pair(ds.metric(model(ds.clean)))
        part = test.per_pair(test.metric(model(test.clean)))
    picked = [m["pair"] for m in test.meta[::2]]  # the pairs it holds, by their index in the whole task
    assert [m["pair"] for m in test.meta[1::2]] == picked and [m["sign"] for m in test.meta] == [1, -1] * len(picked)
    assert torch.allclose(part, whole[picked], atol=1e-5)


def test_answer_tokens_first_is_todays_metric_and_says_so(model):
    ds = D.TaskDataset.from_texts(model, CLEAN, CORR, ANSWERS, WRONG, answer_tokens="first")
    assert ds.rows_per_pair == 1 and ds.prompt_len is None and "first token" in ds.metric_name
    with torch.no_grad():
        logits = model(ds.clean)
    first = [model.to_tokens(a, prepend_bos=False)[0, 0] for a in ANSWERS]
    wrong = [model.to_tokens(w, prepend_bos=False)[0, 0] for w in WRONG]
    want = torch.stack([logits[i, -1, a] - logits[i, -1, w] for i, (a, w) in enumerate(zip(first, wrong))])
    assert torch.allclose(ds.metric(logits), want, atol=1e-5)
    with pytest.raises(InputError, match="answer_tokens must be 'all'"):
        D.TaskDataset.from_texts(model, CLEAN, CORR, ANSWERS, WRONG, answer_tokens="last")


def test_rows_that_cannot_be_continuations_are_named(model):
    with pytest.raises(InputError, match=r"row 2: .*a list gives single-token alternatives"):
        D.TaskDataset.from_texts(model, CLEAN, CORR, [" t40", [" t41 t42", " t43"], " t44"], WRONG)
    with pytest.raises(InputError, match=r"row 1: answer position 2: an answer of several tokens continues the prompt"):
        D.TaskDataset.from_texts(model, CLEAN, CORR, ANSWERS, WRONG, positions=[2, -1, 4])
    with pytest.raises(InputError, match=r"row 1: the wrong answer is the answer itself"):
        D.TaskDataset.from_texts(model, CLEAN, CORR, ANSWERS, [" t40 t41 t42", " t52", " t55"])


def test_patching_reads_the_prompt_positions_only_and_matches_hooks(model):
    ds = D.TaskDataset.from_texts(model, CLEAN, CORR, ANSWERS, WRONG)
    pair = prepare(model, ds.clean, ds.corrupted, ds.metric, prompt_len=ds.prompt_len)
    resid = patch(model, pair, site="resid_pre")
    assert [int(p) for p in resid.labels["pos"]] == list(range(ds.prompt_len))
    # a whole-sequence patch of head outputs writes the prompt positions only: the same as hooks doing so by hand
    heads = patch(model, pair, site="z")
    _, clean_cache = model.run_with_cache(ds.clean, names_filter=["blocks.1.attn.hook_z"])
    P = ds.prompt_len

    def write(z, hook):
        z = z.clone()
        z[:, :P, 2] = clean_cache["blocks.1.attn.hook_z"][:, :P, 2]
        return z

    with torch.no_grad(), model.hooks([("blocks.1.attn.hook_z", write)]):
        want = float(ds.metric(model(ds.corrupted)).mean())
    assert abs(float(heads.values[1, 2]) - want) < 1e-4
    with torch.no_grad():
        clean_value = float(ds.metric(model(ds.clean)).mean())
    assert abs(float(resid.clean_value) - clean_value) < 1e-4


def _induction_task(toy, tmp_path, n: int = 24):
    """Induction with two-token answers: ``[BOS] A A[:-3]`` continues with ``A[-3] A[-2]``; the corrupted prompt
    ``[BOS] B A[:-3]`` has no earlier copy to follow; the wrong answer is ``B[-3] B[-2]``."""
    from mechscope.circuits.zoo import FIRST_TOKEN

    g = torch.Generator().manual_seed(5)
    V = toy.model.cfg.d_vocab
    a = torch.randint(FIRST_TOKEN, V, (n, 10), generator=g)
    b = torch.randint(FIRST_TOKEN, V, (n, 10), generator=g)
    words = lambda t: " ".join(toy.model.to_str_tokens(t))  # noqa: E731
    rows = [{"clean": words(torch.cat([a[i], a[i, :-3]])), "corrupted": words(torch.cat([b[i], a[i, :-3]])),
             "answer": " " + words(a[i, -3:-1]), "wrong": " " + words(b[i, -3:-1])} for i in range(n)]
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return task


def test_patch_circuit_and_investigate_run_on_answers_of_several_tokens(monkeypatch, capsys, toy, tmp_path):
    import mechscope

    monkeypatch.setattr(mechscope, "load", lambda *a, **k: toy.model)
    task = _induction_task(toy, tmp_path)
    ds = D.load_task(task, toy.model)
    assert ds.rows_per_pair == 2 and ds.prompt_len == 18  # BOS + 10 + 7
    assert main(["patch", "--task-file", str(task), "--json", "--quiet"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert len(res["labels"]["pos"]) == 18
    out = tmp_path / "rep"
    assert main(["investigate", "--task-file", str(task), "--out", str(out), "--n-random", "5", "--split-seeds", "2",
                 "--screen", "0", "--json", "--quiet"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["metrics"]["n_prompts"] == 24 and rep["metrics"]["accuracy"] > 0.9 and rep["metrics"]["circuit"]
    html = (out / "report.html").read_text()
    assert "teacher-forced" in html and "DLA reads their first tokens" in html
    assert main(["circuit", "--task-file", str(task), "--json", "--quiet", "--n-random", "5"]) == 0
    circ = json.loads(capsys.readouterr().out)
    assert circ["faithfulness"]["n"] == 12  # the held-out pairs, not their 24 rows
    # what does not score them whole says so
    assert main(["ablate", "--task-file", str(task), "L0H0", "--quiet"]) == 2
    assert "--answer-tokens first" in capsys.readouterr().err
    assert main(["ablate", "--task-file", str(task), "L0H0", "--quiet", "--answer-tokens", "first", "--n-random",
                 "0", "--json"]) == 0


def test_graph_targets_of_several_tokens_are_refused_saying_what_to_do(model):
    from mechscope.cli.commands.graphs import _graph_target

    with pytest.raises(InputError, match=r"explains one next-token logit.*first token \('t40'\)"):
        _graph_target(model, " t40 t41")
    assert _graph_target(model, " t40") == model.to_single_token(" t40")
