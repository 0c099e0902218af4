"""SAEBench-style evaluations beyond reconstruction: feature absorption and k-sparse probing, offline.

**Absorption** (Chanin et al. 2024, "A is for Absorption", arXiv 2409.14507; SAEBench, Karvonen et al. 2025):
single-token words from the tokenizer's vocabulary are put in a first-letter prompt
(``"{word} has the first letter:"`` after ten solved examples) and read at the word's position. Per letter a
logistic probe finds the "starts with L" direction; the SAE's main latents for that letter are the top-k
latents by class-mean difference, k grown while a k-sparse probe's F1 rises by more than 0.03. On held-out
words the probe calls positive, SAEBench's two scores are then computed word by word:

- absorption fraction ``= absorbed / (absorbed + main)``, where ``main`` is the main latents' projection on the
  probe and ``absorbed`` the largest three other latents' (cosine >= 0.1 with the probe), counted only when those
  carry >= 40 % of the activation's projection and the main latents fall short of it;
- full absorption: every main latent is silent, and the latent with the largest projection (cosine >= 0.025)
  carries >= 40 % of the activation's projection.

Each letter's score is its mean over the probe's true positives, the SAE's the mean over letters whose probe
reaches F1 >= 0.6.

A score of 0 means two different things. Absorption is the main latent's share of the letter direction
taken over by other latents; an SAE that has no latent along the letter direction at all (the main latents'
decoder cosine with the probe below 0.1, the threshold an absorbing latent must reach) has nothing to
absorb, and scores 0 by construction. Each letter therefore records its main latents' largest cosine with
the probe and their share of the probe projection, and the result warns when most letters have no aligned
main latent: there, 0 is not evidence that the SAE avoids absorption.

Differences from SAEBench: one shared set of in-context examples (so every prompt has the same length and one
batch), the main latents ranked by class-mean difference instead of an L1 probe, and a
capped vocabulary sample (``n_words``).

**k-sparse probing** (Gao et al. 2024; Kantamneni et al. 2025, sae-probes): binary token-level tasks built
from the standard library (its docstrings, the default corpus, and its code) and the tokenizer; a logistic
probe on the k latents with the largest class-mean difference (k = 1, 2, 5, 20) against a dense probe on the
activations themselves, and a control probe on Hewitt & Liang control labels. Train and test are split by
document.

Both repeat over data-order reseeds (the split and the sample) and report a t-interval over them.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from itertools import islice
from typing import TYPE_CHECKING, Sequence

import torch

from ..analysis.validation import Estimate, seed_interval
from ..core.errors import InputError
from ..core.model import HookedModel
from ..core.progress import bar, stage
from ..core.result import Result
from ..techniques.probing import control_labels, train_probe
from .data import harvest
from .model import SAE

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

LETTERS = "abcdefghijklmnopqrstuvwxyz"
#: SAEBench's thresholds (sae_bench.evals.absorption.feature_absorption)
F1_JUMP, MIN_PROBE_F1, MAX_K = 0.03, 0.6, 10
FULL_COS, FRACTION_COS, PROJ_SHARE, MAX_ABSORBERS = 0.025, 0.1, 0.4, 3
#: below this many letters with a working probe the absorption score is flagged (SAEBench's min_feats_for_eval)
MIN_LETTERS = 20
SPARSE_KS = (1, 2, 5, 20)


def _f1(pred: torch.Tensor, y: torch.Tensor) -> float:
    tp = float((pred & y).sum())
    fp, fn = float((pred & ~y).sum()), float((~pred & y).sum())
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def _binary_probe(X: torch.Tensor, y: torch.Tensor):
    return train_probe(X, y.long(), "logistic", l2=1e-3, max_iter=100)


def _decision(probe, X: torch.Tensor) -> torch.Tensor:
    """The binary probe's log-odds for the positive class ``[n]``."""
    d = probe.decision(X)
    return d[:, 1] - d[:, 0]


def one_vs_rest_probe(X: torch.Tensor, labels: torch.Tensor, classes: int, l2: float = 1e-3, max_iter: int = 100
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """One logistic probe per class, fit jointly (binary cross-entropy per class + L2, L-BFGS on standardised
    ``X`` ``[n, d]``), as SAEBench's first-letter probe. Returns the weight ``[d, C]`` in the activations' own
    units and the bias ``[C]``: the log-odds of class c are ``X @ W[:, c] + b[c]``."""
    X = X.detach().float()
    mean, std = X.mean(0), X.std(0).clamp(min=1e-6)
    Z = (X - mean) / std
    Y = torch.nn.functional.one_hot(labels.long(), classes).float()
    W = torch.zeros(Z.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(Z @ W + b, Y) * classes + l2 * (W ** 2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    W_act = W.detach() / std[:, None]  # in the activations' own units
    return W_act, b.detach() - mean @ W_act


def mean_difference_ranking(f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Latent ids by class-mean difference (positive minus negative), largest first (``f`` ``[n, d_sae]``)."""
    return (f[y].mean(0) - f[~y].mean(0)).argsort(descending=True)


# ---------------------------------------------------------------------------------------------- absorption


def single_token_words(tokenizer: "PreTrainedTokenizerBase") -> list[tuple[int, str]]:
    """Every single-token word ``" word"`` (a space, then 2+ ASCII letters) of the vocabulary, as (token id, word)."""
    out = []
    for tid in range(len(tokenizer)):
        s = tokenizer.decode([tid])
        if re.fullmatch(r" [A-Za-z]{2,}", s):
            out.append((tid, s))
    return out


def first_letter_words(tokenizer: "PreTrainedTokenizerBase", n_words: int, seed: int = 0,
                       vocab: list[tuple[int, str]] | None = None) -> list[tuple[int, str]]:
    """Up to ``n_words`` of :func:`single_token_words` (or of ``vocab``, when already listed), shuffled by ``seed``."""
    words = list(vocab) if vocab is not None else single_token_words(tokenizer)
    random.Random(seed).shuffle(words)
    return words[:n_words]


def absorption_scores(acts: torch.Tensor, f: torch.Tensor, W_dec: torch.Tensor, probe_dir: torch.Tensor,
                      main: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """SAEBench's per-word absorption fraction ``[n]`` and full-absorption flag ``[n]`` for activations ``acts``
    ``[n, d]`` with latents ``f`` ``[n, d_sae]``, a probe direction ``[d]`` and the letter's main latents.

    ``W_dec`` ``[d_sae, d]``: what one unit of each latent adds to the activation, in the activation's own units
    (:meth:`SAE.write_directions`). A latent's projection on the probe is ``f · (W_dec · p)``: SAEBench's
    ``f · cos`` when the rows are unit vectors, as in its SAEs, and in the same units as ``acts · p`` when an SAE
    normalises its input (otherwise the two sides of every ratio would be in different units)."""
    cos, along, act_proj = _probe_terms(acts, W_dec, probe_dir)
    proj = f * along  # [n, d_sae] each latent's projection on the probe, in the activation's units
    main_t = torch.tensor(main, dtype=torch.long)
    main_proj = proj[:, main_t].sum(1)
    others = torch.ones(f.shape[1], dtype=torch.bool)
    others[main_t] = False
    cand = torch.where(others & (cos >= FRACTION_COS) & (proj > 0), proj, torch.zeros(()))
    top = cand.topk(min(MAX_ABSORBERS, f.shape[1]), dim=1).values.sum(1)
    share = top / act_proj
    frac = torch.where(main_proj <= 0, torch.ones(()),
                       (torch.minimum(top, act_proj - main_proj) / (torch.minimum(top, act_proj - main_proj) + main_proj)
                        ).clamp(0, 1))
    frac = torch.where((main_proj >= act_proj) | (share < PROJ_SHARE), torch.zeros(()), frac)
    best = proj.argmax(1)
    full = ((f[:, main_t] < 1e-8).all(1) & (cos[best] >= FULL_COS) & (act_proj >= 0)
            & (proj.gather(1, best[:, None])[:, 0] / act_proj >= PROJ_SHARE))
    return frac, full


def main_alignment(acts: torch.Tensor, f: torch.Tensor, W_dec: torch.Tensor, probe_dir: torch.Tensor,
                   main: list[int]) -> tuple[float, float]:
    """Whether the main latents represent the letter at all: their largest decoder cosine with the probe, and the
    median over words of their projection's share of the activation's (``acts`` ``[n, d]``, ``f`` ``[n, d_sae]``)."""
    cos, along, act_proj = _probe_terms(acts, W_dec[main], probe_dir)
    share = (f[:, main] * along).sum(1) / act_proj
    return float(cos.max()), float(share.median())


def _probe_terms(acts: torch.Tensor, W_dec: torch.Tensor, probe_dir: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each decoder row's cosine with the probe ``[k]``, its projection on the unit probe ``[k]`` (activation units),
    and each activation's projection ``[n]``: what both absorption readings compare."""
    p = probe_dir / probe_dir.norm()
    W = W_dec.float()
    return torch.nn.functional.cosine_similarity(p[None], W, dim=-1), W @ p, acts.float() @ p


@dataclass(repr=False)
class AbsorptionResult(Result):
    """First-letter absorption: per reseed and per letter, with a t-interval over reseeds."""

    absorption_fraction: Estimate
    full_absorption: Estimate
    split_features: Estimate  # main latents per letter beyond the first, mean over letters
    per_letter: dict  # letter -> {"fraction", "full", "main", "probe_f1", "true_positives", "main_cos",
    #                               "main_share"} (first reseed)
    letters_used: int
    n_words: int
    reseeds: int
    probe_f1: float  # mean over letters, first reseed

    @property
    def aligned_letters(self) -> list[str]:
        """The letters (of those scored) whose main latents include one along the letter probe (cosine >= 0.1)."""
        return [L for L, v in self.per_letter.items() if v["probe_f1"] >= MIN_PROBE_F1 and v["main_cos"] >= FRACTION_COS]

    def warnings(self) -> list[str]:
        out = []
        scored = [v for v in self.per_letter.values() if v["probe_f1"] >= MIN_PROBE_F1]
        if scored and 2 * len(self.aligned_letters) < len(scored):
            cos = max(v["main_cos"] for v in scored)
            share = sorted(v["main_share"] for v in scored)[len(scored) // 2]
            out.append(f"on {len(scored) - len(self.aligned_letters)} of {len(scored)} letters no main latent points "
                       f"along the letter probe (largest cosine {cos:.3f}; an absorbing latent needs {FRACTION_COS}), "
                       f"and the main latents carry a median {share:.1%} of the probe projection: the SAE has no "
                       "first-letter latents to absorb, so a score near 0 here is not evidence that it avoids "
                       "absorption (train longer or wider, or evaluate a layer where letters are represented)")
        if self.letters_used < MIN_LETTERS:
            out.append(f"only {self.letters_used} letters have a probe with F1 >= {MIN_PROBE_F1} (SAEBench asks for "
                       f"{MIN_LETTERS}): the model may not represent first letters at this hook, or n_words "
                       f"({self.n_words}) is too small; the score rests on these letters alone")
        return out

    def summary(self) -> str:
        def iv(e: Estimate) -> str:
            return f"{e.value:.3f} [{e.low:.3f}, {e.high:.3f}]"

        lines = [f"absorption (first letter; {self.n_words} single-token words, {self.letters_used} letters with a "
                 f"probe F1 >= {MIN_PROBE_F1}; 95% t-interval over {self.reseeds} data-order reseeds):",
                 f"  mean absorption fraction (0 = none, 1 = the main latents' share taken over) "
                 f"{iv(self.absorption_fraction)}",
                 f"  full absorption rate (main latents silent, another latent carries the direction) "
                 f"{iv(self.full_absorption)}",
                 f"  split features (main latents per letter beyond the first) {iv(self.split_features)}; "
                 f"first-letter probe F1 {self.probe_f1:.3f}",
                 f"  letters with a main latent along the probe (decoder cosine >= {FRACTION_COS}): "
                 f"{len(self.aligned_letters)} of {sum(v['probe_f1'] >= MIN_PROBE_F1 for v in self.per_letter.values())}"]
        return "\n".join(lines + [f"  WARNING: {w}" for w in self.warnings()])


def _prompt_prefix(tokenizer, words: list[tuple[int, str]], n_icl: int = 10, seed: int = 0,
                   vocab: list[tuple[int, str]] | None = None) -> torch.Tensor:
    """``[P]`` the shared prompt prefix: BOS and ten solved examples ``{w} has the first letter: W`` drawn from words
    outside the list. Every prompt is this prefix, then its word, then `` has the first letter:``; causal attention
    makes the word position's activation independent of what follows it, so the suffix is never run."""
    rng = random.Random(seed)
    taken = set(words)
    pool = [w for w in first_letter_words(tokenizer, 10 * n_icl + len(words), seed + 1, vocab)
            if w not in taken][:10 * n_icl]
    icl = rng.sample(pool, min(n_icl, len(pool)))
    prefix = "".join(f"{w} has the first letter: {w.strip()[0].upper()}\n" for _, w in icl)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return torch.tensor(bos + tokenizer(prefix, add_special_tokens=False)["input_ids"])


@torch.no_grad()
def acts_after_prefix(model: HookedModel, hook: str, prefix: torch.Tensor, ids: torch.Tensor, batch: int = 512
                      ) -> torch.Tensor:
    """``[n, width]``: the activation at ``hook`` of each token of ``ids`` ``[n]`` placed right after ``prefix``
    ``[P]``. The prefix runs once; each token then runs alone on its keys and values (equal, to float rounding,
    to running every ``prefix + token`` row in full: :class:`~mechscope.techniques.shared_prefix.SharedPrefix`)."""
    from ..core.hookpoints import split_name
    from ..techniques.shared_prefix import SharedPrefix

    layer = split_name(hook)[0]
    stop = None if layer is None or layer + 1 >= model.cfg.n_layers else layer + 1
    shared, out = SharedPrefix(model, prefix, longest=prefix.numel() + 1), []
    for s in bar(range(0, ids.numel(), batch), desc="words after the prefix"):
        box: dict = {}
        with model.hooks([(hook, lambda a, h, box=box: box.__setitem__("a", a[:, -1].detach()))]):
            shared.run([[int(w)] for w in ids[s:s + batch]], stop_at_layer=stop)
        out.append(box["a"].float().cpu())
    return torch.cat(out)


@torch.no_grad()
def absorption(model: HookedModel, sae: SAE, n_words: int = 12000, reseeds: int = 3,
               seed: int = 0) -> AbsorptionResult:
    """First-letter absorption of ``sae`` at its hook (module docstring); ``reseeds`` re-split the words."""
    return absorption_many(model, [sae], n_words, reseeds, seed)[0]


@torch.no_grad()
def absorption_many(model: HookedModel, saes: Sequence[SAE], n_words: int = 12000, reseeds: int = 3,
                    seed: int = 0) -> list[AbsorptionResult]:
    """:func:`absorption` of each SAE of ``saes``, all at one hook (a sweep's widths or sparsities): the words'
    activations are read once for all of them (the model's part of the cost)."""
    if not saes:
        raise InputError("absorption_many needs at least one SAE; got none")
    hooks = {sae.cfg.hook_name for sae in saes}
    if len(hooks) != 1:
        raise InputError(f"absorption_many reads one hook for every SAE; these sit at {sorted(hooks)}: one call a hook")
    if any(sae.cfg.is_transcoder for sae in saes):
        raise InputError("absorption reads a residual-stream SAE's latents; this is a transcoder")
    if model.tokenizer is None:
        raise InputError("absorption needs the model's tokenizer (to find single-token words)")
    vocab = single_token_words(model.tokenizer)  # decoded once: the words and the solved examples come from it
    words = first_letter_words(model.tokenizer, n_words, seed, vocab)
    if len(words) < 260:
        raise InputError(f"the tokenizer has only {len(words)} single-token words; absorption needs 260+ (10 a letter)")
    prefix = _prompt_prefix(model.tokenizer, words, seed=seed, vocab=vocab)
    stage(f"absorption: {len(words)} first-letter prompts after a shared {prefix.numel()}-token prefix")
    acts = acts_after_prefix(model, hooks.pop(), prefix, torch.tensor([t for t, _ in words]))
    letter = torch.tensor([LETTERS.index(w.strip()[0].lower()) for _, w in words])
    out = []
    for sae in saes:
        f = sae.encode(acts)
        W = sae.write_directions(torch.arange(sae.cfg.d_sae)).detach()  # the activation's units, as ``acts``
        runs = [_absorption_run(acts, f, W, letter, s) for s in range(seed, seed + reseeds)]
        first = runs[0]
        out.append(AbsorptionResult(seed_interval([r["fraction"] for r in runs]),
                                    seed_interval([r["full"] for r in runs]), seed_interval([r["splits"] for r in runs]),
                                    first["per_letter"], first["letters_used"], len(words), reseeds, first["probe_f1"]))
    return out


def _absorption_run(acts: torch.Tensor, f: torch.Tensor, W_dec: torch.Tensor, letter: torch.Tensor, seed: int) -> dict:
    n = acts.shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    tr, te = perm[: int(0.8 * n)], perm[int(0.8 * n):]
    per, fracs, fulls, splits, f1s = {}, [], [], [], []
    a_tr, a_te, f_tr, f_te = acts[tr], acts[te], f[tr], f[te]
    W, b = one_vs_rest_probe(a_tr, letter[tr], len(LETTERS))
    scores_te = a_te @ W + b
    for li, L in enumerate(LETTERS):
        y = letter == li
        if int(y[tr].sum()) < 5 or int(y[te].sum()) < 2:
            continue
        score_te = scores_te[:, li]
        probe_f1 = _f1(score_te > 0, y[te])
        f1s.append(probe_f1)
        order = mean_difference_ranking(f_tr, y[tr])
        top_tr, top_te = f_tr[:, order[:MAX_K]], f_te[:, order[:MAX_K]]
        main, best = [], -100.0
        for k in range(1, MAX_K + 1):
            feats = order[:k]
            sp = _binary_probe(top_tr[:, :k], y[tr])
            k_f1 = _f1(_decision(sp, top_te[:, :k]) > 0, y[te])
            if k_f1 > best + F1_JUMP:
                best, main = k_f1, feats.tolist()
            else:
                break
        tp = te[y[te] & (score_te > 0)]  # the probe's true positives: where the direction is present
        if not tp.numel():
            continue
        frac, full = absorption_scores(acts[tp], f[tp], W_dec, W[:, li], main)
        cos, share = main_alignment(acts[tp], f[tp], W_dec, W[:, li], main)
        per[L] = {"fraction": float(frac.mean()), "full": float(full.float().mean()), "main": main,
                  "probe_f1": probe_f1, "true_positives": int(tp.numel()), "main_cos": cos, "main_share": share}
        if probe_f1 >= MIN_PROBE_F1:
            fracs.append(per[L]["fraction"])
            fulls.append(per[L]["full"])
            splits.append(len(main) - 1)
    def mean(v: list) -> float:
        return sum(v) / len(v) if v else float("nan")

    return {"fraction": mean(fracs), "full": mean(fulls), "splits": mean(splits), "per_letter": per,
            "letters_used": len(fracs), "probe_f1": mean(f1s)}


# ------------------------------------------------------------------------------------------ sparse probing


def _string_spans(code: str) -> list[tuple[int, int]]:
    """Character spans of string literals in ``code`` (Python's own tokenizer; unparsable tails ignored)."""
    import io
    import tokenize

    starts = [0]
    for line in code.splitlines(keepends=True):
        starts.append(starts[-1] + len(line))
    spans = []
    try:
        for t in tokenize.generate_tokens(io.StringIO(code).readline):
            if t.type == tokenize.STRING:
                spans.append((starts[t.start[0] - 1] + t.start[1], starts[t.end[0] - 1] + t.end[1]))
    except (tokenize.TokenError, IndentationError, SyntaxError):
        pass
    return spans


#: the probing tasks: name -> why it is there (docs/sae.md repeats this)
TASKS = {
    "code_vs_prose": "a token of standard-library code (docstrings removed) against one of its docstrings: a "
                     "document-level genre feature",
    "in_string": "inside a string literal, against elsewhere in the same code (Python's tokenizer marks the "
                 "literals): a long-range syntactic state",
    "capitalised": "a word token starting with a capital letter, against lower-case word tokens: orthography",
    "plural_s": "a whole lower-case word ending in -s (not -ss/-us/-is), against other whole lower-case words: "
                "morphology, with word-ness controlled",
    "digit": "a token containing a digit, against tokens without one: a token-identity feature (the easy baseline)",
}


def _token_labels(tokenizer, text: str, is_code: bool, seq_len: int) -> tuple[list[int], dict[str, list[int]]]:
    """Tokens of ``text`` (first ``seq_len``) and each task's label per token (1, 0, or -1: not part of the task)."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offs = enc["input_ids"][:seq_len], enc["offset_mapping"][:seq_len]
    spans = _string_spans(text) if is_code else []
    labels: dict[str, list[int]] = {t: [] for t in TASKS}
    for a, b in offs:
        s = text[a:b]
        word = s.strip()
        nxt = text[b:b + 1]
        whole = bool(re.fullmatch(r"[a-z]{3,}", word)) and (a == 0 or not text[a - 1].isalpha()) and not nxt.isalpha()
        labels["code_vs_prose"].append(int(is_code))
        labels["in_string"].append(int(any(x <= a and b <= y for x, y in spans)) if is_code else -1)
        labels["capitalised"].append(1 if re.fullmatch(r"[A-Z][a-z]+", word) else 0 if re.fullmatch(r"[a-z]+", word) else -1)
        labels["plural_s"].append((1 if word.endswith("s") and not word.endswith(("ss", "us", "is")) else 0) if whole else -1)
        labels["digit"].append(int(any(c.isdigit() for c in s)))
    return ids, labels


@dataclass(repr=False)
class ProbingResult(Result):
    """k-sparse probing: per task, test accuracy of a probe on the top-k latents, a dense probe, and a control."""

    tasks: dict  # task -> {"k=1": Estimate, ..., "dense": Estimate, "control": Estimate, "n_train", "n_test"}
    mean_sparse: dict  # "k=1" ... -> Estimate, mean over tasks
    mean_dense: Estimate
    reseeds: int
    n_docs: int
    why: dict = field(default_factory=lambda: dict(TASKS))

    def summary(self) -> str:
        ks = [f"k={k}" for k in SPARSE_KS]
        lines = [f"k-sparse probing (test accuracy, balanced classes, chance 0.5; {self.n_docs} documents split by "
                 f"document; 95% t-interval over {self.reseeds} data-order reseeds):",
                 "  " + f"{'task':<15}" + "".join(f"{k:>9}" for k in ks) + f"{'dense':>9}{'control':>9}  examples"]
        for t, r in self.tasks.items():
            lines.append("  " + f"{t:<15}" + "".join(f"{r[k].value:>9.3f}" for k in ks)
                         + f"{r['dense'].value:>9.3f}{r['control'].value:>9.3f}  {r['n_train']} train / {r['n_test']} test")
        lines.append("  " + f"{'mean':<15}" + "".join(f"{self.mean_sparse[k].value:>9.3f}" for k in ks)
                     + f"{self.mean_dense.value:>9.3f}")
        e = self.mean_sparse["k=1"]
        lines.append(f"  mean k=1 accuracy {e.value:.3f} [{e.low:.3f}, {e.high:.3f}] against dense "
                     f"{self.mean_dense.value:.3f}: the gap is how much one latent misses of what the activations hold; "
                     "the control column (Hewitt & Liang labels) is what memorising token identity alone reaches")
        return "\n".join(lines)


@torch.no_grad()
def sparse_probing(model: HookedModel, sae: SAE, n_docs: int = 240, seq_len: int = 64, per_class: int = 400,
                   reseeds: int = 3, batch_size: int | None = None, seed: int = 0) -> ProbingResult:
    """k-sparse probing of ``sae`` on the offline tasks in :data:`TASKS` (module docstring)."""
    from ..corpus import stdlib_code, stdlib_docstrings

    if model.tokenizer is None or not getattr(model.tokenizer, "is_fast", False):
        raise InputError("k-sparse probing needs the model's fast tokenizer (for character offsets)")
    prose = list(islice(stdlib_docstrings("all", min_chars=400), n_docs // 2))
    code = [c for _, c in stdlib_code(n_docs // 2)]
    docs = [(t, False) for t in prose] + [(c, True) for c in code]
    rows, labs = [], []
    for text, is_code in docs:
        ids, lab = _token_labels(model.tokenizer, text, is_code, seq_len)
        if len(ids) == seq_len:
            rows.append(ids)
            labs.append(lab)
    if len(rows) < 20:
        raise InputError(f"only {len(rows)} documents reach {seq_len} tokens; lower seq_len")
    toks = torch.tensor(rows)
    stage(f"k-sparse probing: {len(rows)} documents x {seq_len} tokens, {len(TASKS)} tasks")
    acts = harvest(model, sae.cfg.hook_name, toks, batch_size,
                   skip_first=0, max_norm_ratio=None).view(len(rows), seq_len, -1)
    f = sae.encode(acts.reshape(-1, acts.shape[-1])).view(len(rows), seq_len, -1)
    label = {t: torch.tensor([lab[t] for lab in labs]) for t in TASKS}  # [docs, seq]
    label = {t: torch.where(torch.arange(seq_len) == 0, torch.full((), -1), v) for t, v in label.items()}  # sink
    runs = [_probing_run(toks, acts, f, label, per_class, s) for s in range(seed, seed + reseeds)]
    names = [t for t in TASKS if all(t in r for r in runs)]  # a task too small in some reseed is left out
    runs = [{t: r[t] for t in names} for r in runs]
    tasks = {t: {k: seed_interval([r[t][k] for r in runs]) for k in runs[0][t] if not k.startswith("n_")}
             | {"n_train": runs[0][t]["n_train"], "n_test": runs[0][t]["n_test"]} for t in names}
    keys = [f"k={k}" for k in SPARSE_KS]
    mean_sparse = {k: seed_interval([sum(r[t][k] for t in r) / len(r) for r in runs]) for k in keys}
    mean_dense = seed_interval([sum(r[t]["dense"] for t in r) / len(r) for r in runs])
    return ProbingResult(tasks, mean_sparse, mean_dense, reseeds, len(rows))


def _probing_run(toks, acts, f, label, per_class: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    n_docs = toks.shape[0]
    test_doc = torch.zeros(n_docs, dtype=torch.bool)
    test_doc[torch.randperm(n_docs, generator=g)[: n_docs // 4]] = True
    out = {}
    for t, lab in label.items():
        pick = {}
        for split, docs in (("train", ~test_doc), ("test", test_doc)):
            idx = []
            for cls in (0, 1):
                where = ((lab == cls) & docs[:, None]).nonzero()
                cap = per_class if split == "train" else per_class // 2
                idx.append(where[torch.randperm(where.shape[0], generator=g)[:cap]])
            m = min(x.shape[0] for x in idx)
            pick[split] = torch.cat([x[:m] for x in idx]) if m else torch.zeros(0, 2, dtype=torch.long)
        if min(p.shape[0] for p in pick.values()) < 20:
            continue
        (tr, te) = pick["train"], pick["test"]
        ytr, yte = lab[tr[:, 0], tr[:, 1]].bool(), lab[te[:, 0], te[:, 1]].bool()
        Xtr, Xte = acts[tr[:, 0], tr[:, 1]], acts[te[:, 0], te[:, 1]]
        Ftr, Fte = f[tr[:, 0], tr[:, 1]], f[te[:, 0], te[:, 1]]
        order = mean_difference_ranking(Ftr, ytr)
        res = {}
        for k in SPARSE_KS:
            feats = order[:k]
            res[f"k={k}"] = float(((_decision(_binary_probe(Ftr[:, feats], ytr), Fte[:, feats]) > 0) == yte).float().mean())
        res["dense"] = float(((_decision(_binary_probe(Xtr, ytr), Xte) > 0) == yte).float().mean())
        both = control_labels(torch.cat([toks[tr[:, 0], tr[:, 1]], toks[te[:, 0], te[:, 1]]]),
                              torch.cat([ytr, yte]).long(), seed)  # one random label per token type
        ctl, ctl_te = both[: tr.shape[0]], both[tr.shape[0]:]
        res["control"] = float(((_decision(_binary_probe(Xtr, ctl.bool()), Xte) > 0) == ctl_te.bool()).float().mean())
        res["n_train"], res["n_test"] = int(tr.shape[0]), int(te.shape[0])
        out[t] = res
    return out
