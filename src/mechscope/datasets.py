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
from typing import Callable, Sequence

import torch

from .analysis import metrics as M
from .core.errors import InputError
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

    def __len__(self) -> int:
        return self.clean.shape[0]

    def metric(self, logits: torch.Tensor) -> torch.Tensor:
        """One value per prompt; positive means the clean behaviour (e.g. IO logit above S)."""
        if self.metric_fn is not None:
            return self.metric_fn(self, logits)
        return M.logit_diff(logits, self.answers.to(logits.device), self.wrong.to(logits.device))

    def subset(self, idx: Sequence[int] | torch.Tensor) -> TaskDataset:
        idx = torch.as_tensor(idx, dtype=torch.long)
        pick = lambda xs: [xs[int(i)] for i in idx]  # noqa: E731
        return TaskDataset(self.name, self.clean[idx], self.corrupted[idx],
                           None if self.answers is None else self.answers[idx],
                           None if self.wrong is None else self.wrong[idx],
                           pick(self.texts), pick(self.corrupted_texts), pick(self.meta) if self.meta else [],
                           self.metric_fn, self.seed)

    def split(self, held_out: float = 0.5, seed: int | None = None) -> tuple[TaskDataset, TaskDataset]:
        """A random (train, held-out) split; use the held-out part to confirm what the train part found."""
        if not 0 < held_out < 1:
            raise InputError(f"held_out must be a fraction in (0, 1), got {held_out}")
        n = len(self)
        g = torch.Generator().manual_seed(self.seed if seed is None else seed)
        perm = torch.randperm(n, generator=g)
        k = max(1, min(n - 1, round(n * held_out)))
        return self.subset(perm[k:]), self.subset(perm[:k])

    def summary(self) -> str:
        return (f"{self.name}: {len(self)} pairs of {self.clean.shape[1]} tokens\n"
                f"  clean:     {self.texts[0]!r}\n  corrupted: {self.corrupted_texts[0]!r}")

    _skip_in_dict = ("metric_fn",)


def _single(model, words: list[str], space: bool = True) -> list[str]:
    """The words that are one token (with a leading space when ``space``)."""
    out = []
    for w in words:
        ids = model.tokenizer((" " if space else "") + w, add_special_tokens=False).input_ids
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
                       [f"<{length} random tokens, then {length} others>"] * n, metric_fn=metric, seed=seed)


def greater_than(model: HookedModel, n: int = 32, seed: int = 0, century: int = 17) -> TaskDataset:
    """"The war lasted from the year 17YY to the year 17" -> a year after YY (Hanna et al. 2023).

    The corrupted prompt uses YY = 01, so every continuation is "greater". The metric is the
    probability of continuations greater than YY minus that of smaller ones: over two-digit tokens
    when the tokenizer has them (GPT-2), else over the tens digit (digit-split tokenizers).
    """
    rng = random.Random(seed)
    c = str(century)
    two = len(model.tokenizer(c + "32", add_special_tokens=False).input_ids) == 2
    yys = [rng.randint(2, 98) for _ in range(n)]
    texts = [f"The war lasted from the year {c}{y:02d} to the year {c}" for y in yys]
    bad = [f"The war lasted from the year {c}01 to the year {c}" for _ in yys]
    if two:
        cand = {y: model.tokenizer(f"{c}{y:02d}", add_special_tokens=False).input_ids[-1] for y in range(100)}
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
                       meta=[{"yy": y} for y in yys], metric_fn=metric, seed=seed)
