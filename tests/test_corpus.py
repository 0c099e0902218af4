"""Text corpora: the train/held-out split of one text file, whatever its layout, and messages that say what went where."""

import json
import random
import subprocess
import sys

import pytest

from mechscope import corpus
from mechscope.core.errors import InputError
from tiny import V, tiny_hf, worded_llama


def _sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(f"t{rng.randrange(2, V)}" for _ in range(rng.randrange(6, 14))) + " t2" for _ in range(n)]


def _layouts(tmp_path, n: int = 600):
    """The same sentences as one sentence per line (one paragraph), and as paragraphs of 5 sentences."""
    s = _sentences(n)
    lines = tmp_path / "lines.txt"
    lines.write_text("\n".join(s) + "\n")
    paras = tmp_path / "paras.txt"
    paras.write_text("\n\n".join("\n".join(s[i:i + 5]) for i in range(0, n, 5)) + "\n")
    return lines, paras


@pytest.mark.parametrize("layout", ["lines", "paras"])
def test_both_splits_get_text_and_never_overlap(tmp_path, layout):
    path = dict(zip(("lines", "paras"), _layouts(tmp_path)))[layout]
    assert len(path.read_text()) > 20_000
    train, test = corpus.split_text_file(path, "train"), corpus.split_text_file(path, "test")
    assert train.kind == ("line" if layout == "lines" else "paragraph")  # one paragraph: split by line
    assert test.n_here >= 1 and train.n_here >= 1 and train.n_here + test.n_here == train.n_units
    assert test.n_here == pytest.approx(0.1 * train.n_units, abs=1)  # the held-out fraction, exactly up to rounding
    units = lambda part: {u for t in part.texts for u in t.split("\n") if u.strip()}  # noqa: E731
    assert not units(train) & units(test)
    assert units(train) | units(test) == {ln for ln in path.read_text().splitlines() if ln.strip()}
    model = worded_llama()
    for part, split in ((train, "train"), (test, "test")):
        toks = corpus.pack(model, iter(part.texts), 32)
        assert toks.shape[0] >= 2, split  # both sides give sequences


def test_a_file_of_few_lines_is_cut_into_pieces_and_split(tmp_path):
    path = tmp_path / "one.txt"
    path.write_text(" ".join(_sentences(40)))  # one long line
    train, test = corpus.split_text_file(path, "train"), corpus.split_text_file(path, "test")
    assert train.kind == "piece" and test.n_here >= 1 and train.n_here >= 1
    assert sorted(" ".join(train.texts + test.texts).split()) == sorted(path.read_text().split())


def test_messages_say_what_the_file_holds_and_where_it_went(tmp_path):
    model = worded_llama()
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    texts, desc = corpus.from_spec(str(empty), "train")
    assert "0 paragraph(s), 0 characters" in desc
    with pytest.raises(InputError, match=r"0 paragraph\(s\), 0 characters\)\) holds no text: 0 tokens"):
        corpus.pack(model, texts, 32, source=f"the corpus ({desc})")
    one = tmp_path / "one.txt"
    one.write_text("t5")
    _, desc = corpus.from_spec(str(one), "test")
    assert "all 1 paragraph(s) of the file fell in the training split" in desc
    short = tmp_path / "short.txt"
    short.write_text("\n".join(_sentences(30)))
    texts, desc = corpus.from_spec(str(short), "test")
    assert "test split: 3 of its 30 line(s)" in desc
    with pytest.raises(InputError, match=r"short.txt, test split: 3 of its 30 line\(s\).*gave \d+ tokens from 3 text"):
        corpus.pack(model, texts, 512, source=f"the corpus ({desc})")


def test_sae_train_on_a_one_paragraph_corpus(tmp_path):
    """The reported failure: ``sae train --corpus own.txt`` on one sentence per line and no blank lines."""
    from mechscope.circuits.toy import toy_tokenizer

    tiny_hf("llama").save_pretrained(tmp_path / "m")
    toy_tokenizer(V).save_pretrained(tmp_path / "m")
    lines, _ = _layouts(tmp_path, 1200)
    r = subprocess.run([sys.executable, "-m", "mechscope", "sae", "train", "--model", str(tmp_path / "m"), "--hook",
                        "blocks.1.hook_resid_post", "--width", "32", "--k", "4", "--steps", "5", "--batch", "32",
                        "--seqs", "16", "--seq-len", "32", "--eval-seqs", "4", "--corpus", str(lines), "--json",
                        "--quiet", "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert "train split" in out["corpus"] and out["corpus_tokens"] == 16 * 32
    # the harvest runs blocks 0 and 1 of the tiny model (it stops after the hook) for every token: its floor exactly
    stages = {w["name"]: w for w in out["work"]["stages"]}
    assert stages["harvest"]["token_layers"] == stages["harvest"]["floor"] == 16 * 32 * 2
    # the evaluation runs once the ranks' group is closed, in the same meter opened again: its passes counted
    assert stages["evaluation (no floor claimed)"]["token_layers"] > 0
    assert out["work"]["token_layers"] == sum(w["token_layers"] for w in stages.values())


def test_files_saved_by_excel_or_windows_editors_read_as_written(tmp_path):
    """Excel's "CSV UTF-8" starts with a byte-order mark and ends lines with CRLF: once refused on every row as 'no
    clean (fields: [..., '\\ufeffclean'])'. Task files (CSV and JSONL), corpora (text and JSONL) and JSON files read
    it as the text it is."""
    import json as js

    import torch

    from mechscope.core.files import read_json
    from mechscope.datasets import load_task

    model = worded_llama()
    rows = [("t5 t6 t7", "t5 t8 t7", " t9", " t10"), ("t11 t6 t7", "t11 t8 t7", " t12", " t13")]
    csv_text = "clean,corrupted,answer,wrong\r\n" + "".join(f"{a},{b},{c},{d}\r\n" for a, b, c, d in rows)
    (tmp_path / "excel.csv").write_bytes("\ufeff".encode() + csv_text.encode())
    (tmp_path / "plain.csv").write_text(csv_text.replace("\r\n", "\n"))
    excel, plain = load_task(tmp_path / "excel.csv", model), load_task(tmp_path / "plain.csv", model)
    assert len(excel) == 2 and torch.equal(excel.clean, plain.clean) and torch.equal(excel.answers, plain.answers)
    jl = "".join(js.dumps(dict(zip(("clean", "corrupted", "answer", "wrong"), r))) + "\r\n" for r in rows)
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + jl.encode())
    assert torch.equal(load_task(tmp_path / "bom.jsonl", model).corrupted, plain.corrupted)
    text = "\r\n\r\n".join(f"Paragraph {i} says something about t{i}." for i in range(30))
    (tmp_path / "win.txt").write_bytes(b"\xef\xbb\xbf" + text.encode())
    part = corpus.split_text_file(tmp_path / "win.txt", "all")
    assert part.n_units == 30 and part.kind == "paragraph"  # CRLF blank lines separate paragraphs
    assert part.texts[0].startswith("Paragraph 0") and not any("\r" in t for t in part.texts)
    (tmp_path / "c.jsonl").write_bytes(b"\xef\xbb\xbf" + b'{"text": "t5 t6"}\r\n{"text": "t7"}\r\n')
    assert list(corpus.jsonl(tmp_path / "c.jsonl")) == ["t5 t6", "t7"]
    (tmp_path / "e.json").write_bytes(b"\xef\xbb\xbf" + b'{"features": {}}\r\n')
    assert read_json(tmp_path / "e.json") == {"features": {}}


def test_stdlib_code_cuts_each_function_as_ast_does_with_the_file_split_once():
    """stdlib_code's segments equal ast.get_source_segment's (which splits the whole file again on every call: 29 of
    the 30 s k-sparse probing spent building its code corpus), on the standard library and on line ends, form feeds
    and non-ASCII text that offsets in UTF-8 bytes must get right."""
    import ast
    from itertools import islice

    from mechscope.corpus import _source_lines, _source_segment, _stdlib_files, stdlib_code

    n = 0
    for _, src, tree in islice(_stdlib_files("all"), 0, 400, 40):
        lines = _source_lines(src)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Expr, ast.Return)):
                assert _source_segment(lines, node) == (ast.get_source_segment(src, node) or ""), node.lineno
                n += 1
    assert n > 300
    for src in ("def f():\r\n    return 'é'\r\n\x0cdef g(): pass", "x = 1\rdef h(a,\r  b): return 'ü' + a\r",
                "def k():\n  return 'naïve'  # ünïcode"):
        lines = _source_lines(src)
        assert "".join(lines) == src
        for node in ast.walk(ast.parse(src)):
            assert _source_segment(lines, node) == (ast.get_source_segment(src, node) or ""), (src, node)
    code = stdlib_code(20)
    assert len(code) == 20 and all(c.lstrip().startswith(("def ", "async def ")) and len(c) >= 300 for _, c in code)
