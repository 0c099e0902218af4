"""Task datasets: clean/corrupted prompt pairs of equal token length, with answers and a metric.

Every generator takes the model (for its tokenizer) and a seed, keeps only words that are single
tokens for that tokenizer, and returns a :class:`TaskDataset` whose ``metric(logits)`` gives one
value per prompt (positive = the clean behaviour).

- :func:`ioi`: indirect object identification (Wang et al. 2022), ABBA and BABA templates.
- :func:`factual`: capital-city recall; optionally only the pairs the model gets right.
- :func:`induction`: repeated random tokens (Olsson et al. 2022).
- :func:`greater_than`: "from the year 17YY to the year 17.." (Hanna et al. 2023).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from .analysis import metrics as M
from .core.errors import InputError
from .core.files import path_then_model, read_text
from .core.model import HookedModel
from .core.result import Result

NAMES = ["Mary", "John", "Tom", "James", "Anna", "Paul", "Sarah", "David", "Emma", "Mark", "Laura", "Peter",
         "Alice", "Kevin", "Lisa", "Daniel", "Jessica", "Michael", "Kate", "Robert", "Jane", "George", "Amy",
         "Steven", "Rachel", "Richard", "Susan", "Brian", "Karen", "Eric", "Linda", "Adam", "Helen", "Jack",
         "Nancy", "Frank", "Emily", "Scott", "Julia", "Victoria"]
PLACES = ["store", "park", "school", "office", "station", "beach", "market", "hospital", "library", "garden",
          "restaurant", "museum", "church", "river", "house", "bank"]
OBJECTS = ["drink", "ball", "book", "bottle", "gift", "letter", "ring", "kiss", "key", "phone", "bag", "flower",
           "pen", "ticket", "coin", "basket"]
IOI_TEMPLATES = [
    "When {A} and {B} went to the {PLACE}, {B} gave a {OBJECT} to",
    "When {A} and {B} went to the {PLACE}, {B} handed a {OBJECT} to",
    "After {A} and {B} went to the {PLACE}, {B} gave a {OBJECT} to",
    "While {A} and {B} were at the {PLACE}, {B} gave a {OBJECT} to",
    "Then, {A} and {B} went to the {PLACE}. {B} gave a {OBJECT} to",
    "Friends {A} and {B} found a {OBJECT} at the {PLACE}. {B} gave it to",
]
CAPITALS = [("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
            ("Japan", "Tokyo"), ("Russia", "Moscow"), ("Egypt", "Cairo"), ("England", "London"),
            ("China", "Beijing"), ("Greece", "Athens"), ("Poland", "Warsaw"), ("Austria", "Vienna"),
            ("Canada", "Ottawa"), ("Ireland", "Dublin"), ("Portugal", "Lisbon"), ("Norway", "Oslo"),
            ("Sweden", "Stockholm"), ("Denmark", "Copenhagen"), ("Hungary", "Budapest"), ("Thailand", "Bangkok"),
            ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Cuba", "Havana"), ("Turkey", "Ankara"),
            ("Australia", "Canberra"), ("Finland", "Helsinki"), ("Belgium", "Brussels"), ("Scotland", "Edinburgh")]
FACT_TEMPLATES = ["The capital of {S} is", "{S}'s capital city is", "The capital city of {S} is"]


@dataclass(repr=False)
class TaskDataset(Result):
    """Clean/corrupted pairs ``[n, pos]`` of equal token length, answers, and a per-prompt metric."""

    name: str
    clean: torch.Tensor
    corrupted: torch.Tensor
    answers: torch.Tensor | None
    wrong: torch.Tensor | None
    texts: list[str]
    corrupted_texts: list[str]
    meta: list[dict] = field(default_factory=list)
    metric_fn: Callable | None = None
    seed: int = 0
    #: (what the metric is, its unit, which way is the behaviour): printed with every number it produces
    metric_label: tuple[str, str, str] = ("logit difference (answer - wrong answer) at the answer position", "logits",
                                          "higher = more of the clean behaviour")
    #: rows of ``clean``/``corrupted`` per prompt pair: 2 when multi-token answers are scored against multi-token
    #: wrong answers (row ``2i`` continues pair ``i`` with its answer, row ``2i + 1`` with its wrong answer), else 1
    rows_per_pair: int = 1
    #: the prompt's token count when answer continuations are appended after it (patching reads only these
    #: positions); None when the rows are the prompts themselves
    prompt_len: int | None = None

    def __len__(self) -> int:
        """Rows, as every technique sees them (``clean.shape[0]``); :attr:`n_pairs` counts prompt pairs."""
        return self.clean.shape[0]

    @property
    def n_pairs(self) -> int:
        """Prompt pairs: the data every estimate rests on (rows / :attr:`rows_per_pair`)."""
        return self.clean.shape[0] // self.rows_per_pair

    def per_pair(self, values: torch.Tensor) -> torch.Tensor:
        """Per-row values ``[rows, ...]`` as per-pair ones ``[n_pairs, ...]``: the mean of each pair's rows. With two
        rows a pair, each row holds twice its part of ``log p(answer) - log p(wrong)``, so the mean is the pair's
        value and a mean over rows equals the mean over pairs."""
        if self.rows_per_pair == 1:
            return values
        return values.reshape(self.n_pairs, self.rows_per_pair, *values.shape[1:]).mean(1)

    def pair_rows(self, n: int | None = None) -> slice:
        """The first row of each of the first ``n`` pairs (all: None): one row a pair, its prompt's."""
        n = self.n_pairs if n is None else min(n, self.n_pairs)
        return slice(0, n * self.rows_per_pair, self.rows_per_pair)

    @property
    def positions(self) -> list[int] | None:
        """The prompt positions patching reads (None: all of them)."""
        return None if self.prompt_len is None else list(range(self.prompt_len))

    @property
    def metric_name(self) -> str:
        return self.metric_label[0]

    @property
    def metric_unit(self) -> str:
        return self.metric_label[1]

    @property
    def metric_direction(self) -> str:
        return self.metric_label[2]

    def metric(self, logits: torch.Tensor) -> torch.Tensor:
        """One value per prompt; positive means the clean behaviour (e.g. IO logit above S)."""
        if self.metric_fn is not None:
            return self.metric_fn(self, logits)
        return M.logit_diff(logits, self.answers.to(logits.device), self.wrong.to(logits.device))

    def subset(self, idx: Sequence[int] | torch.Tensor) -> TaskDataset:
        """The prompt pairs ``idx`` (with all their rows)."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        r = self.rows_per_pair
        rows = (idx[:, None] * r + torch.arange(r)).flatten() if r > 1 else idx
        pick = lambda xs: [xs[int(i)] for i in rows]  # noqa: E731
        return TaskDataset(self.name, self.clean[rows], self.corrupted[rows],
                           None if self.answers is None else self.answers[rows],
                           None if self.wrong is None else self.wrong[rows],
                           pick(self.texts), pick(self.corrupted_texts), pick(self.meta) if self.meta else [],
                           self.metric_fn, self.seed, self.metric_label, self.rows_per_pair, self.prompt_len)

    def split(self, held_out: float = 0.5, seed: int | None = None) -> tuple[TaskDataset, TaskDataset]:
        """A random (train, held-out) split of the pairs; use the held-out part to confirm what the train part found."""
        search, held = self.split_pairs(held_out, seed)
        return self.subset(search), self.subset(held)

    def split_pairs(self, held_out: float = 0.5, seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The pair indices of :meth:`split`'s two parts, ``(search [n - k], held out [k])``."""
        if not 0 < held_out < 1:
            raise InputError(f"held_out must be a fraction in (0, 1), got {held_out}")
        n = self.n_pairs
        g = torch.Generator().manual_seed(self.seed if seed is None else seed)
        perm = torch.randperm(n, generator=g)
        k = max(1, min(n - 1, round(n * held_out)))
        return perm[k:], perm[:k]

    def summary(self) -> str:
        P = self.prompt_len or self.clean.shape[1]
        cont = (f"; answers of several tokens are scored teacher-forced after the prompt ({self.rows_per_pair} "
                "row(s) a pair)" if self.prompt_len else "")
        return (f"{self.name}: {self.n_pairs} pairs of {P} tokens{cont}\n"
                f"  clean:     {self.texts[0]!r}\n  corrupted: {self.corrupted_texts[0]!r}")

    _skip_in_dict = ("metric_fn",)

    @classmethod
    def from_texts(cls, model: HookedModel, clean: Sequence[str], corrupted: Sequence[str],
                   answers: Sequence[str | Sequence[str]], wrong: Sequence[str | Sequence[str]] | None = None,
                   name: str = "task", positions: Sequence[int] | None = None,
                   answer_tokens: str = "all") -> "TaskDataset":
        """A dataset of your own prompts: ``clean[i]``/``corrupted[i]`` pairs with their answers.

        ``answers[i]`` is a string or a list of single-token strings (several correct answers); ``wrong[i]``
        (optional) likewise. With single-token answers the metric is ``mean logit(answers) - mean logit(wrong)``
        at the answer position, or without ``wrong`` the log of the answers' total probability; ``positions[i]``
        is the answer position (default: the last token).

        An answer of several tokens (``" New York"``) is scored whole: ``log p(answer | prompt) - log p(wrong |
        prompt)``, each the sum of its tokens' log-probabilities teacher-forced after the prompt (MIB's
        continuation scoring; Mueller et al. 2025). Each pair then has a row continuing with its answer and, with
        wrong answers, a second continuing with its wrong one (:attr:`rows_per_pair`); patching reads the prompt
        positions only (:attr:`positions`). ``answer_tokens="first"`` scores the first token of each answer
        instead, as single-token answers are, and says so in the metric's name.

        All prompts must tokenize to one length, each pair alike: an error lists the pairs that do not, with
        their tokens.
        """
        return _from_rows(model, [dict(clean=c, corrupted=x, answer=a, wrong=None if wrong is None else wrong[i],
                                       pos=None if positions is None else positions[i])
                                  for i, (c, x, a) in enumerate(zip(clean, corrupted, answers))], name,
                          n_given=(len(clean), len(corrupted), len(answers)), answer_tokens=answer_tokens)


def _single(model, words: list[str], space: bool = True) -> list[str]:
    """The words that are one token (with a leading space when ``space``)."""
    out, tok = [], model.tokens.need_tokenizer()
    for w in words:
        ids = tok((" " if space else "") + w, add_special_tokens=False).input_ids
        if len(ids) == 1:
            out.append(w)
    return out


def _encode(model, texts: list[str]) -> torch.Tensor:
    toks, mask = model.tokenize(texts)
    if not bool(mask.all()):
        raise InputError("internal: prompts of unequal length")  # pragma: no cover
    return toks


def _modal_length(model, texts: list[str]) -> list[int]:
    lens = [len(model.to_tokens(t)[0]) for t in texts]
    mode = max(set(lens), key=lens.count)
    return [i for i, n in enumerate(lens) if n == mode]


def ioi(model: HookedModel, n: int = 32, seed: int = 0, corruption: str = "s2_flip",
        templates: Sequence[str] | None = None) -> TaskDataset:
    """Indirect object identification: "When A and B went to the X, B gave a Y to" -> " A".

    ABBA and BABA orders alternate. ``corruption``: ``"s2_flip"`` (the second mention of the
    subject becomes the indirect object, so the answer flips) or ``"abc"`` (three different names:
    no name is repeated). Answers are the IO name, wrong answers the S name.
    """
    if corruption not in ("s2_flip", "abc"):
        raise InputError(f"corruption must be 's2_flip' or 'abc', got {corruption!r}")
    names, places, objects = _single(model, NAMES), _single(model, PLACES), _single(model, OBJECTS)
    if len(names) < 3 or not places or not objects:
        raise InputError(f"too few single-token names/places/objects for this tokenizer ({len(names)} names)")
    rng = random.Random(seed)
    templates = templates or IOI_TEMPLATES
    rows = []
    for i in range(n * 3):
        t = templates[i % len(templates)]
        io, s, c = rng.sample(names, 3)
        place, obj = rng.choice(places), rng.choice(objects)
        order = "ABBA" if i % 2 == 0 else "BABA"
        first, second = (io, s) if order == "ABBA" else (s, io)
        text = t.replace("{A}", first, 1).replace("{B}", second, 1).replace("{B}", s).format(PLACE=place, OBJECT=obj)
        if corruption == "s2_flip":
            bad = t.replace("{A}", first, 1).replace("{B}", second, 1).replace("{B}", io).format(PLACE=place, OBJECT=obj)
        else:
            a2, b2 = rng.sample([x for x in names if x not in (io, s, c)], 2)
            bad = t.replace("{A}", a2, 1).replace("{B}", b2, 1).replace("{B}", c).format(PLACE=place, OBJECT=obj)
        rows.append(dict(text=text, bad=bad, io=io, s=s, order=order, template=t))
    keep = _modal_length(model, [r["text"] for r in rows])[:n]
    rows = [rows[i] for i in keep]
    tok = lambda w: model.to_single_token(" " + w)  # noqa: E731
    return TaskDataset(
        name=f"ioi ({corruption})",
        clean=_encode(model, [r["text"] for r in rows]),
        corrupted=_encode(model, [r["bad"] for r in rows]),
        answers=torch.tensor([tok(r["io"]) for r in rows]),
        wrong=torch.tensor([tok(r["s"]) for r in rows]),
        texts=[r["text"] for r in rows], corrupted_texts=[r["bad"] for r in rows],
        meta=[{k: r[k] for k in ("io", "s", "order", "template")} for r in rows], seed=seed,
    )


@torch.no_grad()
def factual(model: HookedModel, n: int | None = None, seed: int = 0, verify: bool = True,
            template: str | None = None) -> TaskDataset:
    """Capital-city recall: "The capital of France is" -> " Paris"; corrupted: another country.

    With ``verify`` only the countries whose capital the model ranks first are kept (so the clean
    run does the task). The wrong answer is the corrupted country's capital.
    """
    template = template or FACT_TEMPLATES[0]
    pairs = [(c, a) for c, a in CAPITALS if _single(model, [c]) and _single(model, [a])]
    if template.startswith("{S}"):
        pairs = [(c, a) for c, a in pairs if _single(model, [c], space=False)]
    if verify:
        texts = [template.format(S=c) for c, _ in pairs]
        toks = _encode(model, texts)
        top = model(toks)[:, -1].argmax(-1)
        pairs = [p for p, t in zip(pairs, top.tolist()) if t == model.to_single_token(" " + p[1])]
    if len(pairs) < 2:
        raise InputError(f"fewer than two capital pairs work for this model/tokenizer ({len(pairs)})")
    rng = random.Random(seed)
    rng.shuffle(pairs)
    if n is not None:
        pairs = pairs[:n]
    others = pairs[1:] + pairs[:1]  # each corrupted subject is another (verified) country
    texts = [template.format(S=c) for c, _ in pairs]
    bad = [template.format(S=c) for c, _ in others]
    return TaskDataset(
        name="factual recall (capitals)", clean=_encode(model, texts), corrupted=_encode(model, bad),
        answers=torch.tensor([model.to_single_token(" " + a) for _, a in pairs]),
        wrong=torch.tensor([model.to_single_token(" " + a) for _, a in others]),
        texts=texts, corrupted_texts=bad, meta=[{"subject": c, "answer": a} for c, a in pairs], seed=seed,
    )


def induction(model: HookedModel, n: int = 16, length: int = 20, seed: int = 0, bos: bool | None = None) -> TaskDataset:
    """Random tokens repeated twice: ``[BOS] A A``; corrupted: ``[BOS] A B`` with B fresh random tokens.

    The metric is minus the loss on the second half (higher = better induction).
    """
    V = model.cfg.d_vocab
    g = torch.Generator().manual_seed(seed)
    lo, hi = min(100, V // 4), V - 1
    a = torch.randint(lo, hi, (n, length), generator=g)
    b = torch.randint(lo, hi, (n, length), generator=g)
    clean, bad = torch.cat([a, a], 1), torch.cat([a, b], 1)
    use_bos = model.cfg.default_prepend_bos if bos is None else bos
    if use_bos and model.tokenizer is not None and model.tokenizer.bos_token_id is not None:
        col = torch.full((n, 1), model.tokenizer.bos_token_id)
        clean, bad = torch.cat([col, clean], 1), torch.cat([col, bad], 1)

    def metric(ds, logits):
        return -M.induction_loss(logits, ds.clean.to(logits.device), length)

    texts = [f"<{length} random tokens, repeated>"] * n
    return TaskDataset("induction (repeated random tokens)", clean, bad, None, None, texts,
                       [f"<{length} random tokens, then {length} others>"] * n, metric_fn=metric, seed=seed,
                       metric_label=("minus the next-token loss on the repeated half", "nats per token",
                                     "higher = better induction"))


def greater_than(model: HookedModel, n: int = 32, seed: int = 0, century: int = 17) -> TaskDataset:
    """"The war lasted from the year 17YY to the year 17" -> a year after YY (Hanna et al. 2023).

    The corrupted prompt uses YY = 01, so every continuation is "greater". The metric is the
    probability of continuations greater than YY minus that of smaller ones: over two-digit tokens
    when the tokenizer has them (GPT-2), else over the tens digit (digit-split tokenizers).
    """
    rng = random.Random(seed)
    c = str(century)
    tok = model.tokens.need_tokenizer()
    two = len(tok(c + "32", add_special_tokens=False).input_ids) == 2
    yys = [rng.randint(2, 98) for _ in range(n)]
    texts = [f"The war lasted from the year {c}{y:02d} to the year {c}" for y in yys]
    bad = [f"The war lasted from the year {c}01 to the year {c}" for _ in yys]
    if two:
        cand = {y: tok(f"{c}{y:02d}", add_special_tokens=False).input_ids[-1] for y in range(100)}
    else:
        cand = {d: model.to_single_token(str(d)) for d in range(10)}

    def metric(ds, logits):
        p = torch.softmax(logits[:, -1].float(), -1)
        out = []
        for i, yy in enumerate(ds.meta):
            ref = yy["yy"] if two else yy["yy"] // 10
            ids_gt = [t for k, t in cand.items() if k > ref]
            ids_lt = [t for k, t in cand.items() if k < ref]
            out.append(p[i, ids_gt].sum() - p[i, ids_lt].sum())
        return torch.stack(out)

    return TaskDataset("greater-than (years)", _encode(model, texts), _encode(model, bad), None, None, texts, bad,
                       meta=[{"yy": y} for y in yys], metric_fn=metric, seed=seed,
                       metric_label=("p(later year) - p(earlier year)", "probability", "higher = the clean behaviour"))


def _answer_ids(model: HookedModel, value, where: str, what: str, problems: list[str]) -> list[list[int]]:
    """A row's answer (or wrong answer) as its alternatives, each a list of token ids: a string is one alternative
    (one token, or several: a continuation), a list of strings is several single-token alternatives."""
    if isinstance(value, str):
        ids = model.tokens.encode(value, prepend_bos=False)
        if not ids:
            problems.append(f"{where}: {what} {value!r} gives no tokens")
            return []
        return [ids]
    if not (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
        problems.append(f"{where}: {what} must be a string (one token or several) or a list of single-token "
                        f"alternatives, got {value!r}")
        return []
    out = []
    for v in value:
        ids = model.tokens.encode(v, prepend_bos=False)
        if len(ids) == 1:
            out.append(ids)
        else:
            problems.append(f"{where}: {what} {v!r} is {len(ids)} tokens {[model.to_string([i]) for i in ids]}: a "
                            "list gives single-token alternatives; give an answer of several tokens as one string "
                            "(and one per row)")
    return out


def _position_problems(rows: list[dict], toks: list[tuple[torch.Tensor, torch.Tensor]]) -> list[str]:
    """Rows whose clean and corrupted prompts do not differ at all, or differ at positions where most rows do not:
    patching reads one position across every row, so such rows would mix unrelated tokens into each effect."""
    diffs = [tuple(torch.nonzero(c != x).flatten().tolist()) for c, x in toks]
    out = [f"{_where(rows[i], i)}: the clean and corrupted prompts are the same tokens (nothing to patch)"
           for i, d in enumerate(diffs) if not d]
    kinds = [d for d in diffs if d]
    if not kinds:
        return out
    counts = {d: kinds.count(d) for d in set(kinds)}
    common = max(counts, key=counts.get)
    # a row that differs at only some of the common positions (a random corruption that drew the clean token) is fine
    odd = [i for i, d in enumerate(diffs) if d and not set(d) <= set(common)]
    if odd and len(kinds) > 1:
        out += [f"{_where(rows[i], i)}: the prompts differ at position(s) {list(diffs[i])}, but in {counts[common]} of "
                f"{len(kinds)} rows at {list(common)}: patching reads each position across every row, so effects would "
                "mix different tokens; reword the row, or split the rows into one task per position"
                for i in odd[:20]]
    return out


def _where(row: dict, i: int) -> str:
    """Where a row came from, 1-based: ``my.jsonl line 7`` for a file, ``row 7`` for lists given in Python."""
    return row.get("_where") or f"row {i + 1}"


def _problems_error(problems: list[str], what: str) -> InputError:
    shown = problems[:20]
    more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
    return InputError(f"{len(problems)} problem(s) in {what}:\n  " + "\n  ".join(shown) + more)


def _padded(lists: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged id lists as ``[n, k]`` ids and a mask."""
    k = max(len(x) for x in lists)
    ids = torch.tensor([x + [x[0]] * (k - len(x)) for x in lists])
    mask = torch.tensor([[1.0] * len(x) + [0.0] * (k - len(x)) for x in lists])
    return ids, mask


_OWN_LABEL_WRONG = ("logit difference (mean answer logit - mean wrong-answer logit) at the answer position", "logits",
                    "higher = more of the clean behaviour")
_OWN_LABEL_LOGP = ("log-probability of the answer(s) at the answer position", "nats",
                   "higher = more of the clean behaviour")


def _own_metric(ds: TaskDataset, logits: torch.Tensor) -> torch.Tensor:
    """``mean logit(answers) - mean logit(wrong)`` at each prompt's answer position (or log p(answers)).

    The answers, wrong answers and positions live in each row's ``meta``, so subsets and splits keep them.
    """
    dev = logits.device
    rows = torch.arange(logits.shape[0], device=dev)
    pos = torch.tensor([m["pos"] for m in ds.meta], device=dev)
    at = logits[rows, pos].float()  # [n, d_vocab]
    ids, mask = (t.to(dev) for t in _padded([m["answers"] for m in ds.meta]))
    if ds.meta[0]["wrong"] is None:
        logp = torch.log_softmax(at, -1).gather(1, ids)
        return torch.logsumexp(logp.masked_fill(mask == 0, float("-inf")), -1)
    wid, wmask = (t.to(dev) for t in _padded([m["wrong"] for m in ds.meta]))
    return (at.gather(1, ids) * mask).sum(-1) / mask.sum(-1) - (at.gather(1, wid) * wmask).sum(-1) / wmask.sum(-1)


def _lengths_error(bad: list[tuple[str, list[str], list[str]]]) -> InputError:
    lines = [f"  {w}: clean {len(c)} tokens {c}\n      corrupted {len(x)} tokens {x}" for w, c, x in bad[:20]]
    more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
    return InputError("clean and corrupted prompts must tokenize to the same length (patching reads fixed positions); "
                      f"{len(bad)} pair(s) do not:\n" + "\n".join(lines) + more + "\nFix: choose corrupted words "
                      "that are one token each like the clean ones (check with model.to_str_tokens), or pad the "
                      "shorter prompt with a neutral word.")


def _from_rows(model: HookedModel, rows: list[dict], name: str, n_given: tuple[int, ...] | None = None,
               answer_tokens: str = "all") -> TaskDataset:
    """A dataset from row dicts; every bad row is reported at once, by its 1-based line or row number."""
    if n_given is not None and len(set(n_given)) != 1:
        raise InputError(f"clean, corrupted and answers must have one entry per pair; got {n_given[0]}, {n_given[1]} "
                         f"and {n_given[2]}")
    if not rows:
        raise InputError("a task needs at least one row")
    problems = [f"{_where(r, i)}: {key!r} must be a non-empty string, got {r.get(key)!r}"
                for i, r in enumerate(rows) for key in ("clean", "corrupted")
                if not isinstance(r.get(key), str) or not r[key]]
    if problems:
        raise _problems_error(problems, name)
    toks = [(model.to_tokens(r["clean"])[0], model.to_tokens(r["corrupted"])[0]) for r in rows]
    bad = [(_where(rows[i], i), model.to_str_tokens(c), model.to_str_tokens(x))
           for i, (c, x) in enumerate(toks) if len(c) != len(x)]
    if bad:
        raise _lengths_error(bad)
    lengths = sorted({len(c) for c, _ in toks})
    if len(lengths) > 1:
        counts = {n: sum(len(c) == n for c, _ in toks) for n in lengths}
        mode = max(counts, key=counts.get)
        odd = [_where(rows[i], i) for i, (c, _) in enumerate(toks) if len(c) != mode]
        raise InputError(f"every pair must have the same token length (the pairs run as one batch); lengths "
                         f"{counts} (tokens: count); not {mode} tokens: {', '.join(odd[:20])}"
                         f"{' ...' if len(odd) > 20 else ''}. Split the rows by length into separate tasks, or "
                         "reword them")
    answers = [_answer_ids(model, r["answer"], _where(r, i), "answer", problems) for i, r in enumerate(rows)]
    has_wrong = [r.get("wrong") not in (None, "", []) for r in rows]
    if any(has_wrong) and not all(has_wrong):
        problems += [f"{_where(r, i)}: no wrong answer (give one for every row or for none)"
                     for i, (r, w) in enumerate(zip(rows, has_wrong)) if not w]
    wrong = ([_answer_ids(model, r["wrong"], _where(r, i), "wrong", problems) for i, r in enumerate(rows)]
             if all(has_wrong) else None)
    if answer_tokens not in ("all", "first"):
        raise InputError(f"answer_tokens must be 'all' (score every token of an answer) or 'first', got {answer_tokens!r}")
    multi = any(len(alt) > 1 for alts in answers + (wrong or []) for alt in alts)
    first_mode = answer_tokens == "first" and multi
    if first_mode:  # today's metric on answers of several tokens: their first token only
        answers = [[alt[:1] for alt in a] for a in answers]
        wrong = None if wrong is None else [[alt[:1] for alt in w] for w in wrong]
        multi = False
    if wrong is not None:
        same = [(i, a[0]) for i, (a, w) in enumerate(zip(answers, wrong)) if a and w and any(x in w for x in a)]
        problems += [f"{_where(rows[i], i)}: the wrong answer is the answer itself "
                     f"({model.to_string(ids)!r}), so the metric is 0 on this prompt "
                     "whatever the model does (a copy-paste slip?)" for i, ids in same]
    problems += _position_problems(rows, toks)
    P = lengths[0]
    problems += [f"{_where(r, i)}: answer position {r['pos']} is out of range: the prompts are {P} tokens, so a "
                 f"position is in -{P}..{P - 1}" for i, r in enumerate(rows)
                 if r.get("pos") is not None and not -P <= int(r["pos"]) < P]
    if multi:
        problems += _continuation_problems(rows, answers, wrong, P)
    if problems:
        raise _problems_error(problems, name)
    if multi:
        return _continuation_task(model, rows, toks, answers, wrong, name)
    answers = [[alt[0] for alt in a] for a in answers]
    wrong = None if wrong is None else [[alt[0] for alt in w] for w in wrong]
    meta = [{"answers": a, "wrong": None if wrong is None else wrong[i],
             "pos": P - 1 if r.get("pos") is None else int(r["pos"]) % P} for i, (a, r) in enumerate(zip(answers, rows))]
    dev = model.device
    first = torch.tensor([a[0] for a in answers], device=dev)
    label = _OWN_LABEL_WRONG if wrong else _OWN_LABEL_LOGP
    if first_mode:
        label = (label[0] + ", first token of each answer only (--answer-tokens first)",) + label[1:]
    return TaskDataset(name, torch.stack([c for c, _ in toks]).to(dev), torch.stack([x for _, x in toks]).to(dev),
                       first, torch.tensor([w[0] for w in wrong], device=dev) if wrong else None,
                       [r["clean"] for r in rows], [r["corrupted"] for r in rows], meta, _own_metric,
                       metric_label=label)


def _continuation_problems(rows: list[dict], answers: list, wrong: list | None, P: int) -> list[str]:
    """What answers of several tokens cannot have: alternatives (one answer, one wrong answer a row) and an answer
    position other than the last prompt token (the answer continues the prompt)."""
    out = [f"{_where(r, i)}: with answers of several tokens, each row has one answer and at most one wrong answer "
           "(lists of alternatives are for single-token answers); give one string"
           for i, r in enumerate(rows) if len(answers[i]) > 1 or (wrong is not None and len(wrong[i]) > 1)]
    out += [f"{_where(r, i)}: answer position {r['pos']}: an answer of several tokens continues the prompt, so it "
            "is read after the last token; drop pos" for i, r in enumerate(rows)
            if r.get("pos") is not None and int(r["pos"]) % P != P - 1]
    return out


_CONT_LABEL_WRONG = ("log-probability of the answer minus that of the wrong answer, every token teacher-forced after "
                     "the prompt", "nats", "higher = more of the clean behaviour")
_CONT_LABEL_LOGP = ("log-probability of the answer, every token teacher-forced after the prompt", "nats",
                    "higher = more of the clean behaviour")


def _continuation_task(model: HookedModel, rows: list[dict], toks: list, answers: list, wrong: list | None,
                       name: str) -> TaskDataset:
    """A task whose answers have several tokens: each prompt continues with its answer (and, in a second row, its
    wrong answer), teacher-forced, right-padded to one length; patching reads the prompt positions only."""
    P = len(toks[0][0])
    conts = [[a[0]] + ([w[0]] if wrong is not None else []) for a, w in zip(answers, wrong or [None] * len(rows))]
    r = len(conts[0])
    K = max(len(c) for cs in conts for c in cs)
    pad = int(conts[0][0][-1])  # never read: positions after a row's continuation do not reach its metric
    clean, corrupted, meta, texts, ctexts = [], [], [], [], []
    for i, (row, (c, x), cs) in enumerate(zip(rows, toks, conts)):
        for j, cont in enumerate(cs):
            tail = torch.tensor(cont[:-1] + [pad] * (K - len(cont)), dtype=c.dtype)
            clean.append(torch.cat([c.cpu(), tail]))
            corrupted.append(torch.cat([x.cpu(), tail]))
            meta.append({"cont": cont, "sign": 1 if j == 0 else -1, "pos": P - 1, "pair": i,
                         "answers": [answers[i][0][0]], "wrong": None if wrong is None else [wrong[i][0][0]]})
            said = model.to_string(cont)
            texts.append(row["clean"] + said)
            ctexts.append(row["corrupted"] + said)
    dev = model.device
    first = torch.tensor([m["answers"][0] for m in meta], device=dev)
    second = torch.tensor([m["wrong"][0] for m in meta], device=dev) if wrong is not None else None
    return TaskDataset(name, torch.stack(clean).to(dev), torch.stack(corrupted).to(dev), first, second, texts, ctexts,
                       meta, _continuation_metric, metric_label=_CONT_LABEL_WRONG if wrong else _CONT_LABEL_LOGP,
                       rows_per_pair=r, prompt_len=P)


def _continuation_metric(ds: TaskDataset, logits: torch.Tensor) -> torch.Tensor:
    """Each row's ``rows_per_pair * sign * sum_j log p(cont_j | prompt, cont_<j)`` from the logits at the prompt's
    last position and the continuation's (teacher forcing); a pair's value, the mean of its rows, is
    ``log p(answer) - log p(wrong)`` ([rows])."""
    dev = logits.device
    P = ds.prompt_len
    K = max(len(m["cont"]) for m in ds.meta)
    ids, mask = (t.to(dev) for t in _padded([m["cont"] for m in ds.meta]))
    logp = torch.log_softmax(logits[:, P - 1:P - 1 + K].float(), -1)  # [rows, K, d_vocab]
    got = logp.gather(-1, ids[:, :, None])[..., 0]
    sign = torch.tensor([m["sign"] * ds.rows_per_pair for m in ds.meta], device=dev, dtype=got.dtype)
    return (got * mask).sum(-1) * sign


def load_task(path: str | Path, model: HookedModel, name: str | None = None, answer_tokens: str = "all") -> TaskDataset:
    """Your task from a ``.jsonl`` or ``.csv`` file: one row per pair, with ``clean``, ``corrupted``, ``answer`` and
    optionally ``wrong`` and ``pos`` (the answer position). Several answers: a JSON list in JSONL, or
    ``"a|b"`` in CSV. Answers of several tokens are scored whole (``answer_tokens="first"``: their first token).
    See :meth:`TaskDataset.from_texts`.

    Path first, then the model, like every mechscope loader (``load_sae(path, model)``). The old order
    ``load_task(model, path)`` still works, with a ``DeprecationWarning``, until mechscope 1.0."""
    import csv
    import json

    path, model = path_then_model(path, model, "load_task")
    p = Path(path)
    if not p.is_file():
        raise InputError(f"no such task file: {p}")
    rows: list[dict] = []
    problems: list[str] = []
    if p.suffix == ".jsonl":
        for i, line in enumerate(read_text(p).splitlines()):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    problems.append(f"{p.name} line {i + 1}: not valid JSON ({e})")
                    continue
                if not isinstance(row, dict):
                    problems.append(f"{p.name} line {i + 1}: a row is a JSON object, got {type(row).__name__}")
                    continue
                rows.append({**row, "_where": f"{p.name} line {i + 1}"})
    elif p.suffix == ".csv":
        with open(p, newline="", encoding="utf-8-sig") as f:  # Excel's "CSV UTF-8": a byte-order mark, CRLF
            reader = csv.DictReader(f)
            for r in reader:
                rows.append({**{k: (v.split("|") if k in ("answer", "wrong") and v and "|" in v else v or None)
                                for k, v in r.items()}, "_where": f"{p.name} line {reader.line_num}"})
    else:
        raise InputError(f"task files are .jsonl or .csv, got {p.name}")
    for r in rows:
        missing = [k for k in ("clean", "corrupted", "answer") if not r.get(k)]
        if missing:
            problems.append(f"{r['_where']}: no {', '.join(missing)} (fields: {sorted(k for k in r if k != '_where')}"
                            "); each row needs clean, corrupted and answer (wrong and pos are optional)")
    if problems:
        raise _problems_error(problems, str(p))
    return _from_rows(model, rows, name or p.stem, answer_tokens=answer_tokens)
