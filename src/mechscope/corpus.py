"""Text corpora: the offline default (the Python standard library's docstrings), files, JSONL, HF datasets.

The default corpus is real English prose that exists on every machine with Python and that nobody
on this project wrote: the docstrings of the standard library, read with :mod:`ast` (nothing is
imported or executed), in a fixed order. Texts are split into train and held-out parts by a hash of
their source file, so evaluation never sees training text.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import math
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch

from .core.errors import InputError, UnknownNameError
from .core.files import read_text
from .core.model import HookedModel


def _held_out(key: str, fraction: float) -> bool:
    h = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)
    return h / 0xFFFFFFFF < fraction


def stdlib_docstrings(split: str = "train", held_out: float = 0.1, min_chars: int = 200) -> Iterator[str]:
    """Docstrings (modules, classes, functions) of the standard library, in sorted file order.

    ``split``: ``"train"``, ``"test"`` (about ``held_out`` of the files) or ``"all"``.
    """
    for _, _, tree in _stdlib_files(split, held_out):
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars:
                    yield doc


def _stdlib_files(split: str = "all", held_out: float = 0.1) -> Iterator[tuple[str, str, ast.Module]]:
    """The standard library's source files outside tests and site-packages, in sorted order, as (path relative to
    the library, source, parsed tree); files Python cannot parse are skipped."""
    if split not in ("train", "test", "all"):
        raise InputError(f"split must be 'train', 'test' or 'all', got {split!r}")
    for rel, path in _stdlib_paths():
        if split != "all" and _held_out(rel, held_out) != (split == "test"):
            continue
        try:
            src = path.read_text(encoding="utf-8")
            tree = ast.parse(src)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        yield rel, src, tree


@functools.lru_cache(maxsize=1)
def _stdlib_paths() -> tuple[tuple[str, Path], ...]:
    """The standard library's ``.py`` files outside tests and site-packages, sorted, as (path relative to the library,
    path): walked once a process (a walk takes about 0.3 s, and every default-corpus read starts with one)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = ((str(p.relative_to(root)), p) for p in sorted(root.rglob("*.py")))
    return tuple((rel, p) for rel, p in paths if "site-packages" not in rel and "test" not in rel.split("/")[0])


def stdlib_code(max_docs: int = 400, min_chars: int = 300) -> list[tuple[str, str]]:
    """Up to ``max_docs`` function definitions from the standard library's source, their docstrings removed, as
    (file, code): code to set against the docstrings (k-sparse probing's code-vs-prose task)."""
    out: list[tuple[str, str]] = []
    for rel, src, tree in _stdlib_files("all"):
        lines = _source_lines(src)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                seg = _source_segment(lines, node)
                doc = ast.get_docstring(node, clean=False)
                if doc:
                    seg = seg.replace(doc, "", 1)
                if len(seg) >= min_chars:
                    out.append((rel, seg))
        if len(out) >= max_docs:
            break
    return out[:max_docs]


_LINE = re.compile(r".*?(?:\r\n|\r|\n)|.+", re.S)


def _source_lines(src: str) -> list[str]:
    """``src``'s lines with their ends, split where the Python parser splits them (``\r\n``, ``\r``, ``\n``; not
    form feeds): what :func:`ast.get_source_segment` splits the whole source into on every call."""
    return _LINE.findall(src)


def _source_segment(lines: list[str], node: ast.AST) -> str:
    """:func:`ast.get_source_segment` of ``node`` (``""`` where it gives None) from the source's lines split once
    (:func:`_source_lines`); offsets are UTF-8 bytes, as the parser counts them."""
    if getattr(node, "end_lineno", None) is None or getattr(node, "end_col_offset", None) is None:
        return ""
    first, last = node.lineno - 1, node.end_lineno - 1
    if first == last:
        return lines[first].encode()[node.col_offset:node.end_col_offset].decode()
    return "".join([lines[first].encode()[node.col_offset:].decode(), *lines[first + 1:last],
                    lines[last].encode()[:node.end_col_offset].decode()])


def text_files(paths: Iterable[str | Path], split: str = "all", held_out: float = 0.1) -> Iterator[str]:
    """Plain-text files, one text per file (files are split into train/test by a hash of their path)."""
    for p in paths:
        p = Path(p)
        if split != "all" and _held_out(str(p), held_out) != (split == "test"):
            continue
        yield read_text(p, errors="replace")


def jsonl(path: str | Path, field: str = "text", split: str = "all", held_out: float = 0.1) -> Iterator[str]:
    """The ``field`` of each line of a JSON-lines file (lines are split by a hash of their number)."""
    with open(path, encoding="utf-8-sig") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            if split != "all" and _held_out(f"{path}:{i}", held_out) != (split == "test"):
                continue
            rec = json.loads(line)
            if field not in rec:
                raise UnknownNameError(f"{path}:{i + 1} has no field {field!r} (fields: {sorted(rec)})")
            yield str(rec[field])


def hf_dataset(name: str, split: str = "train", field: str = "text", **kwargs) -> Iterator[str]:
    """A Hugging Face ``datasets`` dataset by name or local path (needs the hub, or its cache)."""
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - optional dependency
        raise ImportError("pip install datasets to read Hugging Face datasets") from e
    ds = datasets.load_dataset(name, split=split, streaming=True, **kwargs)
    for rec in ds:
        yield str(rec[field])


MIN_UNITS = 20  # a text file with fewer paragraphs than this is split by line, then into pieces at spaces


def text_units(text: str) -> tuple[list[str], str]:
    """``(units, kind)``: the blank-line-separated paragraphs of ``text``; its lines when it has fewer than
    :data:`MIN_UNITS` paragraphs (a file with one sentence per line is one paragraph); and when it also has
    fewer lines, :data:`MIN_UNITS` pieces cut at spaces. ``kind`` names the unit (``"paragraph"``, ...)."""
    paras = [p.strip() for p in text.split("\n\n") if p.strip()]
    if len(paras) >= MIN_UNITS:
        return paras, "paragraph"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if len(lines) >= MIN_UNITS:
        return lines, "line"
    words = text.split()
    if len(words) <= 1:
        return paras, "paragraph"
    n = min(MIN_UNITS, len(words))
    bounds = [round(i * len(words) / n) for i in range(n + 1)]
    return [" ".join(words[a:b]) for a, b in zip(bounds, bounds[1:])], "piece"


def held_out_units(keys: list[str], fraction: float) -> set[int]:
    """Which of ``len(keys)`` units are held out: the ``ceil(fraction * n)`` with the smallest hash of their key,
    and never all of them. So both splits get text whenever there are two units or more, in the same
    proportion for every file, and the choice depends on the keys alone (not on the order of reading)."""
    n = len(keys)
    if n < 2:
        return set()
    k = min(n - 1, max(1, math.ceil(fraction * n)))
    rank = sorted(range(n), key=lambda i: hashlib.sha256(keys[i].encode()).hexdigest())
    return set(rank[:k])


@dataclass
class TextSplit:
    """One split of a text file: its texts (runs of consecutive units of that split) and what went where."""

    texts: list[str]
    kind: str
    n_units: int
    n_here: int
    chars: int
    split: str

    def describe(self, path: Path) -> str:
        unit = f"{self.kind}(s)"
        if self.split == "all" or self.n_units == 0:
            return f"{path} ({self.n_units} {unit}, {self.chars} characters)"
        if self.n_here == 0:
            other = "training" if self.split == "test" else "held-out"
            return f"{path}, {self.split} split: empty (all {self.n_units} {unit} of the file fell in the {other} split)"
        return f"{path}, {self.split} split: {self.n_here} of its {self.n_units} {unit} ({self.chars} characters)"


def split_text_file(path: str | Path, split: str = "all", held_out: float = 0.1) -> TextSplit:
    """The ``split`` (``"train"``, ``"test"`` or ``"all"``) of one text file's units (:func:`text_units`), held out by
    :func:`held_out_units`; consecutive units of the split are joined back as they were in the file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no such text file: {path}")
    if split not in ("train", "test", "all"):
        raise InputError(f"split must be 'train', 'test' or 'all', got {split!r}")
    units, kind = text_units(read_text(path, errors="replace"))
    test = held_out_units([f"{path.name}:{i}" for i in range(len(units))], held_out)
    keep = [split == "all" or ((i in test) == (split == "test")) for i in range(len(units))]
    joiner = {"paragraph": "\n\n", "line": "\n", "piece": " "}[kind]
    texts, run = [], []
    for unit, k in zip(units, keep):
        if k:
            run.append(unit)
        elif run:
            texts.append(joiner.join(run))
            run = []
    if run:
        texts.append(joiner.join(run))
    return TextSplit(texts, kind, len(units), sum(keep), sum(len(t) for t in texts), split)


def paragraphs(path: str | Path, split: str = "all", held_out: float = 0.1) -> Iterator[str]:
    """The texts of one split of a text file (:func:`split_text_file`)."""
    return iter(split_text_file(path, split, held_out).texts)


def from_spec(spec: str | None, split: str = "train") -> tuple[Iterator[str], str]:
    """``(texts, description)`` for a corpus named on the command line: ``None`` (the standard library's
    docstrings), a ``.jsonl`` file (its ``text`` field), a text file (its paragraphs), a folder (its ``.txt``
    files), or ``hf:<dataset>[:<split>]``. Train and held-out texts never overlap (split by a hash)."""
    if spec is None:
        return default_corpus(split), "the standard library's docstrings (the offline default)"
    if spec.startswith("hf:"):
        name, _, hf_split = spec[3:].partition(":")
        return hf_dataset(name, split=hf_split or "train"), f"the Hugging Face dataset {name} ({hf_split or 'train'})"
    path = Path(spec).expanduser()
    if path.is_dir():
        txt = sorted(path.rglob("*.txt"))
        if not txt:
            raise InputError(f"corpus folder {path} has no .txt files")
        return text_files(txt, split), f"{len(txt)} text files under {path}"
    if path.suffix == ".jsonl":
        if not path.is_file():
            raise InputError(f"no such JSON-lines file: {path}")
        return jsonl(path, split=split), f"the JSON-lines file {path} (field 'text')"
    if path.is_file():
        part = split_text_file(path, split)
        return iter(part.texts), part.describe(path)
    raise InputError(f"corpus {spec!r} is not a file, a folder, or hf:<dataset>[:<split>]")


def default_corpus(split: str = "train") -> Iterator[str]:
    """The offline default: :func:`stdlib_docstrings`."""
    return stdlib_docstrings(split)


def pack(model: HookedModel, texts: Iterable[str], seq_len: int, n_seqs: int | None = None, prepend_bos: bool | None = None,
         source: str = "the corpus") -> torch.Tensor:
    """Tokenize ``texts``, join them with EOS, and cut the stream into rows ``[n, seq_len]``.

    With BOS-using models each row starts with BOS (``seq_len`` includes it). Stops after ``n_seqs``.
    ``source`` names the texts in the error raised when they give less than one row.
    """
    tok = model.tokenizer
    bos = prepend_bos if prepend_bos is not None else model.cfg.default_prepend_bos
    body = seq_len - (1 if bos else 0)
    sep = tok.eos_token_id if tok.eos_token_id is not None else model.pad_token_id
    rows, buf, n_texts, n_tokens = [], [], 0, 0
    for text in texts:
        ids = tok(text, add_special_tokens=False).input_ids
        n_texts, n_tokens = n_texts + 1, n_tokens + len(ids)
        buf += ids + [sep]
        while len(buf) >= body:
            row, buf = buf[:body], buf[body:]
            rows.append(([tok.bos_token_id] if bos else []) + row)
            if n_seqs is not None and len(rows) >= n_seqs:
                return torch.tensor(rows, dtype=torch.long)
    if not rows:
        if n_tokens == 0:
            raise InputError(f"{source} holds no text: 0 tokens from {n_texts} text(s); give a file with text in it")
        raise InputError(f"{source} gave {n_tokens} tokens from {n_texts} text(s), fewer than one sequence of {seq_len} "
                         f"tokens; give more text or a shorter --seq-len")
    return torch.tensor(rows, dtype=torch.long)


def document_starts(model: HookedModel, texts: Iterable[str], seq_len: int, n_docs: int,
                    prepend_bos: bool | None = None, source: str = "the corpus") -> torch.Tensor:
    """The first ``seq_len`` tokens of each of up to ``n_docs`` documents, one row each ``[n, seq_len]`` (BOS first with
    BOS-using models): unlike :func:`pack`, every row starts where a document starts (what the activation-difference
    lens reads). Documents shorter than a row are skipped; a clear error when none is long enough."""
    tok = model.tokens.need_tokenizer()
    bos = prepend_bos if prepend_bos is not None else model.cfg.default_prepend_bos
    body = seq_len - (1 if bos else 0)
    rows, seen = [], 0
    for text in texts:
        seen += 1
        ids = tok(text, add_special_tokens=False).input_ids
        if len(ids) >= body:
            rows.append(([tok.bos_token_id] if bos else []) + ids[:body])
            if len(rows) >= n_docs:
                break
    if not rows:
        raise InputError(f"none of the {seen} documents of {source} has {body} tokens; give longer documents or a "
                         "shorter --seq-len")
    return torch.tensor(rows, dtype=torch.long)
