"""Automated interpretability, offline: explain a feature from its examples, then score the explanation with a
scorer model's log-probabilities, against controls that could show the same score.

After Bills et al. 2023 ("Language models can explain neurons in language models") and Paulo et al. 2024
("Automatically Interpreting Millions of Features in Large Language Models", arXiv 2410.13928), whose
detection and fuzzing scores this follows, with log-probabilities in place of sampled answers:

- **explain**: a feature's top-activating and randomly drawn firing contexts (its token marked ``<<like this>>``)
  go to an explainer: a local causal LM loaded by mechscope (greedy decoding), or any OpenAI-compatible
  chat endpoint (:class:`EndpointExplainer`, e.g. a vLLM or llama.cpp server);
- **detection**: on held-out contexts where the feature fires and contexts where it never does, the scorer
  reads ``log P(" Yes") - log P(" No")`` after asking whether the text matches the explanation; the score is
  the AUROC of that number for telling the two apart;
- **fuzzing**: in contexts where the feature fires, either a firing token or a silent one is marked; the
  AUROC for telling which from the same log-odds, now about the marked token.

Controls, on every run: each feature scored again with another feature's explanation (shuffled), and
random directions in activation space treated as features (explained and scored the same way). A feature's
score counts only over its shuffled control; the summary reports that difference with a bootstrap CI over
features, and the random directions' scores as the floor a meaningless "feature" reaches.

The scorer's log-odds depend on the text as well as on the explanation: with the constant explanation "text",
random directions' contexts reached a detection AUROC of 0.61 and SAE features' 0.42 (demo SAE, SmolLM2-135M),
so raw AUROCs of different context sets are not comparable. Two things keep that bias out: every context has
the same number of tokens (a short window near a document's start is silent more often), and the calibrated
AUROC scores each context by ``log-odds(explanation) - log-odds(shuffled explanation)``, in which what the text
alone makes the scorer answer cancels (contextual calibration, Zhao et al. 2021, arXiv 2102.09690, with
another explanation as the content-free input). Random directions get the same shuffled control.
"""

from __future__ import annotations

import json
import os
import random
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

from ..analysis.metrics import auroc
from ..analysis.validation import Estimate, bootstrap_ci
from ..core.errors import InputError
from ..core.model import HookedModel
from ..core.progress import stage
from ..core.result import Result
from ..techniques.shared_prefix import next_token_logprobs
from .model import SAE

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

EXPLAIN_PROMPT = ("Below are text snippets from a document collection. In each, the tokens where one hidden feature "
                  "of a language model is active are marked like <<this>>.\n\n{examples}\n\nIn at most six words, "
                  "what do the marked tokens have in common? Answer with the short description only.")
DETECT_PROMPT = "Text: {text}\nDoes this text contain {explanation}? Answer Yes or No."
FUZZ_PROMPT = "Text: {text}\nIs the token marked <<like this>> one of {explanation}? Answer Yes or No."


class Explainer(Protocol):
    """Turns prompts into short explanations (one answer per prompt)."""

    name: str

    def explain(self, prompts: list[str]) -> list[str]: ...


def _first_line(text: str) -> str:
    line = text.strip().split("\n")[0].strip().strip('"').strip()
    return line[:120] or "(no explanation)"


@dataclass
class LocalExplainer:
    """A causal LM loaded by mechscope, prompted through its chat template when it has one; greedy decoding."""

    model: HookedModel
    max_new_tokens: int = 10
    batch: int = 16

    @property
    def name(self) -> str:
        return f"local {self.model.cfg.model_name}"

    def explain(self, prompts: list[str]) -> list[str]:
        tok = self.model.tokenizer
        lead = "The marked tokens are"  # the answer's first words, so that a small model answers instead of chatting
        texts = [(tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                  if getattr(tok, "chat_template", None) else p + "\nAnswer: ") + lead for p in prompts]
        out = []
        for s in range(0, len(texts), self.batch):
            chunk = texts[s:s + self.batch]
            width = self.model.tokens.tokenize(chunk, prepend_bos=False, padding_side="left")[0].shape[1]
            toks = self.model.generate(chunk, max_new_tokens=self.max_new_tokens, prepend_bos=False, return_type="tokens")
            out += [_first_line(tok.decode(row[width:], skip_special_tokens=True)).rstrip(".") for row in toks]
        return out


@dataclass
class EndpointExplainer:
    """Any OpenAI-compatible chat endpoint (``url`` is the API base, e.g. ``http://127.0.0.1:8000/v1``); the key,
    if the server wants one, is read from the environment variable ``api_key_env``. Temperature 0."""

    url: str
    model: str = "default"
    api_key_env: str = "OPENAI_API_KEY"
    max_tokens: int = 24
    timeout: float = 60.0

    @property
    def name(self) -> str:
        return f"endpoint {self.url} ({self.model})"

    def explain(self, prompts: list[str]) -> list[str]:
        return [self._one(p) for p in prompts]

    def _one(self, prompt: str) -> str:
        body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": prompt}],
                           "temperature": 0, "max_tokens": self.max_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        if os.environ.get(self.api_key_env):
            headers["Authorization"] = f"Bearer {os.environ[self.api_key_env]}"
        req = urllib.request.Request(self.url.rstrip("/") + "/chat/completions", data=body, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                reply = json.loads(r.read().decode())
        except urllib.error.HTTPError as e:
            raise InputError(f"the explainer endpoint {self.url} answered HTTP {e.code}: "
                             f"{e.read().decode(errors='replace')[:200]}") from None
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            raise InputError(f"cannot reach the explainer endpoint {self.url} ({e}); give the API base of an "
                             "OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1") from None
        except json.JSONDecodeError:
            raise InputError(f"the explainer endpoint {self.url} did not answer JSON") from None
        try:
            return _first_line(reply["choices"][0]["message"]["content"])
        except (KeyError, IndexError, TypeError):
            raise InputError(f"the explainer endpoint {self.url} answered without choices[0].message.content: "
                             f"{str(reply)[:200]}") from None


# ------------------------------------------------------------------------------------------ contexts


@dataclass
class FeatureContexts:
    """What one feature is explained and scored on (all strings, tokens marked ``<<...>>`` where relevant)."""

    shown: list[str]  # for the explainer: top and random firing contexts, firing tokens marked
    detect_pos: list[str]  # held-out contexts ending just after a firing token
    detect_neg: list[str]  # contexts where the feature never fires
    fuzz_pos: list[str]  # held-out firing contexts with a firing token marked
    fuzz_neg: list[str]  # the same contexts with a silent token marked


def _pieces(tok, ids: list[int]) -> list[str]:
    return [tok.decode([i]) for i in ids]


def _text(pieces: list[str], marks: set[int] = frozenset()) -> str:
    return "".join(f"<<{p}>>" if i in marks else p for i, p in enumerate(pieces)).replace("\n", " ")


def feature_contexts(tok: "PreTrainedTokenizerBase", tokens: torch.Tensor, act: torch.Tensor, n_shown: int = 10, n_score: int = 4,
                     window: int = 12, seed: int = 0) -> FeatureContexts | None:
    """Contexts of one feature with activations ``act`` ``[n, pos]`` on ``tokens`` ``[n, pos]`` (position 0 is never
    used: the attention sink); None when it fires too rarely to score (fewer than ``n_shown // 2 + n_score`` times)."""
    rng = random.Random(seed)
    act = act.clone()
    act[:, 0] = 0
    fire = act > 0
    pos = fire.nonzero().tolist()
    if len(pos) < n_shown // 2 + n_score:
        return None
    order = sorted(pos, key=lambda bp: -float(act[bp[0], bp[1]]))
    top = order[: n_shown // 2]
    rest = [p for p in pos if p not in top]
    rng.shuffle(rest)
    shown_at, held = top + rest[: n_shown - len(top)], rest[n_shown - len(top):][: n_score]
    if len(held) < n_score:
        held = (held + rest)[:n_score]

    P = tokens.shape[1]

    def span(p: int) -> tuple[int, int]:
        """The ``window`` tokens ending two after ``p``, shifted to fit in ``1..P``: every context has the same
        length, so the scorer cannot tell firing from silent windows by how long they are."""
        lo = max(1, min(p - window + 3, P - window))
        return lo, min(P, lo + window)

    def ctx(b: int, p: int, mark_all: bool = False, mark: int | None = None) -> str:
        lo, hi = span(p)
        pieces = _pieces(tok, tokens[b, lo:hi].tolist())
        marks = {q - lo for q in range(lo, hi) if fire[b, q]} if mark_all else ({mark - lo} if mark is not None else set())
        return _text(pieces, marks)

    negs, tries = [], 0
    while len(negs) < n_score and tries < 50 * n_score:  # windows where the feature is silent throughout
        tries += 1
        b, p = rng.randrange(tokens.shape[0]), rng.randrange(1, P)
        lo, hi = span(p)
        if not fire[b, lo:hi].any():
            negs.append(ctx(b, p))
    fuzz_neg = []
    for b, p in held:
        lo, hi = span(p)
        silent = [q for q in range(lo, hi) if not fire[b, q]]
        if silent:
            fuzz_neg.append(ctx(b, p, mark=rng.choice(silent)))
    return FeatureContexts([ctx(b, p, mark_all=True) for b, p in shown_at], [ctx(b, p) for b, p in held], negs,
                           [ctx(b, p, mark=p) for b, p in held], fuzz_neg)


# -------------------------------------------------------------------------------------------- scoring


def yes_no_logodds(scorer: HookedModel, prompts: list[str], batch: int = 32) -> torch.Tensor:
    """``[n]``: ``log P(Yes) - log P(No)`` for the token after each prompt (one forward pass, no sampling). A model
    with a chat template reads each prompt as a user turn and answers as the assistant (``Yes``/``No``);
    otherwise the prompt is continued as text (`` Yes``/`` No``). The prompts' common beginning (the template and
    the instruction) runs once (:func:`~mechscope.techniques.shared_prefix.next_token_logprobs`)."""
    tok = scorer.tokenizer
    chat = bool(getattr(tok, "chat_template", None))
    if chat:
        prompts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                   for p in prompts]
    sp = "" if chat else " "
    yes, no = tok(sp + "Yes", add_special_tokens=False)["input_ids"][0], tok(sp + "No", add_special_tokens=False)["input_ids"][0]
    rows = [scorer.tokens.encode(p, False if chat else None) for p in prompts]
    lp = next_token_logprobs(scorer, rows, [yes, no], batch, desc="scoring explanations")
    return lp[:, 0] - lp[:, 1]


def _prompts(ctx: FeatureContexts, explanation: str) -> list[str]:
    return ([DETECT_PROMPT.format(explanation=explanation, text=t) for t in ctx.detect_pos + ctx.detect_neg]
            + [FUZZ_PROMPT.format(explanation=explanation, text=t) for t in ctx.fuzz_pos + ctx.fuzz_neg])


def _aurocs(ctx: FeatureContexts, s: torch.Tensor) -> tuple[float, float]:
    nd, npos, nf = len(ctx.detect_pos) + len(ctx.detect_neg), len(ctx.detect_pos), len(ctx.fuzz_pos)
    d = auroc(s[:npos], s[npos:nd]) if ctx.detect_pos and ctx.detect_neg else float("nan")
    f = auroc(s[nd:nd + nf], s[nd + nf:]) if ctx.fuzz_pos and ctx.fuzz_neg else float("nan")
    return d, f


def score_prompts(scorer: HookedModel, jobs: list[tuple[FeatureContexts, str]], batch: int = 32) -> list[torch.Tensor]:
    """The scorer's Yes/No log-odds on every prompt of each (contexts, explanation) in ``jobs``, one tensor a job in
    :func:`_prompts`' order. Every prompt of every job runs in one length-sorted stream of batches, so little is
    padding."""
    prompts = [_prompts(c, e) for c, e in jobs]
    flat = [p for ps in prompts for p in ps]
    order = sorted(range(len(flat)), key=lambda i: len(flat[i]))
    scores = torch.empty(len(flat))
    scores[order] = yes_no_logodds(scorer, [flat[i] for i in order], batch)
    return list(scores.split([len(ps) for ps in prompts]))


def score_explanations(scorer: HookedModel, jobs: list[tuple[FeatureContexts, str]], batch: int = 32
                       ) -> list[tuple[float, float]]:
    """(detection AUROC, fuzzing AUROC) for each (contexts, explanation) in ``jobs`` (nan where a side is empty)."""
    return [_aurocs(c, s) for (c, _), s in zip(jobs, score_prompts(scorer, jobs, batch))]


def score_explanation(scorer: HookedModel, ctx: FeatureContexts, explanation: str) -> tuple[float, float]:
    """(detection AUROC, fuzzing AUROC) of ``explanation`` on one feature's contexts."""
    return score_explanations(scorer, [(ctx, explanation)])[0]


@dataclass(repr=False)
class ExplainResult(Result):
    """Explanations with their detection and fuzzing scores, against shuffled and random-direction controls."""

    explanations: dict  # feature -> explanation
    detection: dict  # feature -> AUROC
    fuzzing: dict
    shuffled_detection: dict  # feature -> AUROC with another feature's explanation
    shuffled_fuzzing: dict
    random_explanations: dict  # random direction id -> explanation
    random_detection: dict
    random_fuzzing: dict
    over_shuffled_detection: Estimate  # mean over features of (score - shuffled), bootstrap CI over features
    over_shuffled_fuzzing: Estimate
    explainer: str
    scorer: str
    n_tokens: int
    seconds: float
    skipped: list = field(default_factory=list)  # features that fired too rarely to explain and score
    # calibrated: the AUROC of (log-odds with the explanation - log-odds with the shuffled one), per context
    calibrated_detection: dict = field(default_factory=dict)  # feature -> AUROC
    calibrated_fuzzing: dict = field(default_factory=dict)
    random_calibrated_detection: dict = field(default_factory=dict)  # random direction id -> AUROC
    random_calibrated_fuzzing: dict = field(default_factory=dict)

    def save(self, folder: "str | Path") -> Path:
        """Write ``folder/explanations.json`` (atomically), merged over what is there: ``load_sae`` then carries the
        explanations into dashboards, graph labels and the investigate report."""
        from ..core.files import atomic_write, read_json
        from .io import EXPLANATIONS

        path = Path(folder) / EXPLANATIONS
        old = read_json(path, "feature explanations").get("features", {}) if path.exists() else {}
        feats = {str(f): {"explanation": e, "detection_auroc": self.detection[f], "fuzzing_auroc": self.fuzzing[f],
                          "shuffled_detection_auroc": self.shuffled_detection[f],
                          "shuffled_fuzzing_auroc": self.shuffled_fuzzing[f],
                          "calibrated_detection_auroc": self.calibrated_detection.get(f, float("nan")),
                          "calibrated_fuzzing_auroc": self.calibrated_fuzzing.get(f, float("nan"))}
                 for f, e in self.explanations.items()}
        data = {"explainer": self.explainer, "scorer": self.scorer, "n_tokens": self.n_tokens,
                "over_shuffled_detection": self.over_shuffled_detection.to_dict(),
                "over_shuffled_fuzzing": self.over_shuffled_fuzzing.to_dict(),
                "random_directions": {k: {"explanation": e, "detection_auroc": self.random_detection[k],
                                          "fuzzing_auroc": self.random_fuzzing[k],
                                          "calibrated_detection_auroc": self.random_calibrated_detection.get(k),
                                          "calibrated_fuzzing_auroc": self.random_calibrated_fuzzing.get(k)}
                                      for k, e in self.random_explanations.items()},
                "features": {**old, **feats}}
        return atomic_write(path, json.dumps(data, indent=1, default=float))

    def summary(self) -> str:
        def mean(d: dict) -> float:
            v = [x for x in d.values() if x == x]
            return sum(v) / len(v) if v else float("nan")

        n = len(self.explanations)
        lines = [f"autointerp: {n} features explained by {self.explainer}, scored by {self.scorer}'s log-odds of "
                 f"Yes/No (no sampling) on {self.n_tokens} tokens in {self.seconds:.0f} s "
                 f"({self.seconds / max(1, n):.1f} s a feature, its controls included)",
                 f"  detection AUROC (held-out firing vs never-firing contexts; 0.5 = chance) mean "
                 f"{mean(self.detection):.3f}; with a shuffled explanation {mean(self.shuffled_detection):.3f}; "
                 f"random directions {mean(self.random_detection):.3f}",
                 f"  fuzzing AUROC (firing vs silent marked token in the same context) mean {mean(self.fuzzing):.3f}; "
                 f"shuffled {mean(self.shuffled_fuzzing):.3f}; random directions {mean(self.random_fuzzing):.3f}",
                 f"  score over its shuffled control (95% CI over {n} features): detection "
                 f"{self.over_shuffled_detection.summary()} ({self.over_shuffled_detection.verdict('no gain')}); "
                 f"fuzzing {self.over_shuffled_fuzzing.summary()} ({self.over_shuffled_fuzzing.verdict('no gain')})"]
        if self.calibrated_detection:
            cd, rcd = mean(self.calibrated_detection), mean(self.random_calibrated_detection)
            lines += [f"  calibrated AUROC (each context's log-odds minus its log-odds under the shuffled explanation, so "
                      f"what the text alone makes the scorer answer cancels): detection {cd:.3f}, fuzzing "
                      f"{mean(self.calibrated_fuzzing):.3f}; random directions {rcd:.3f} and "
                      f"{mean(self.random_calibrated_fuzzing):.3f} (0.5 = the explanation adds nothing)"]
            rd, fd = mean(self.random_detection), mean(self.detection)
            if rd > fd:
                lines.append(f"  note: the random directions' raw detection AUROC ({rd:.3f}) is above the features' "
                             f"({fd:.3f}). Raw AUROCs mix the explanation with the scorer's answer to the text alone: "
                             "a direction firing on one kind of text (here, random directions in activation space) "
                             "gets a Yes-bias whatever it is called. Read the calibrated figures and the gain over "
                             "the shuffled control, where that bias cancels")
        for f, e in list(self.explanations.items())[:12]:
            lines.append(f"    feature {f}: {e!r}  detection {self.detection[f]:.2f} (shuffled "
                         f"{self.shuffled_detection[f]:.2f}), fuzzing {self.fuzzing[f]:.2f}")
        if self.skipped:
            lines.append(f"  {len(self.skipped)} feature(s) fired too rarely on these tokens to explain and score: "
                         f"{self.skipped[:10]}")
        if self.explainer.startswith("local"):
            lines.append(f"  the explainer is a local model ({self.explainer}): a model as small as SmolLM2-135M cannot "
                         "label features (on the demo SAE, docs/sae.md, its explanations did not beat another "
                         "feature's: detection -0.018 [-0.063, +0.030] over 39 features); these figures check the "
                         "pipeline, not the features. For labels, use an endpoint (--explainer-url) with a capable model")
        if not self.over_shuffled_detection.excludes(0.0) and not self.over_shuffled_fuzzing.excludes(0.0):
            lines.append("  next: the explanations do not beat another feature's explanation, so they are not yet "
                         "evidence of what the features do; use a larger explainer (--explainer-url) or more tokens")
        return "\n".join(lines)


def explain_and_score(scorer: HookedModel, explainer: Explainer, contexts: dict, random_contexts: dict | None = None,
                      explanations: dict | None = None, seed: int = 0) -> ExplainResult:
    """Explain (unless ``explanations`` are given) and score each feature of ``contexts`` {feature: FeatureContexts},
    with the shuffled control and the random-direction features of ``random_contexts``."""
    t0 = time.time()
    feats = [f for f, c in contexts.items() if c is not None]
    skipped = [f for f, c in contexts.items() if c is None]
    if not feats:
        raise InputError("no feature fired often enough on these tokens to be explained; give more tokens")
    random_contexts = {k: c for k, c in (random_contexts or {}).items() if c is not None}
    def prompt(c: FeatureContexts) -> str:
        return EXPLAIN_PROMPT.format(examples="\n".join(f"{i + 1}. {t}" for i, t in enumerate(c.shown)))

    given = dict(explanations or {})
    todo = [f for f in feats if f not in given]
    if todo or random_contexts:
        stage(f"explaining {len(todo)} features and {len(random_contexts)} random directions with {explainer.name}")
        got = explainer.explain([prompt(contexts[f]) for f in todo] + [prompt(c) for c in random_contexts.values()])
        given.update(zip(todo, got[:len(todo)]))
        rand_expl = dict(zip(random_contexts, got[len(todo):]))
    else:
        rand_expl = {}
    shuffled = _shuffled(given, feats, seed)
    rkeys = list(random_contexts)
    rshuffled = _shuffled(rand_expl, rkeys, seed)
    jobs = ([(contexts[f], given[f]) for f in feats] + [(contexts[f], shuffled[f]) for f in feats]
            + [(random_contexts[k], rand_expl[k]) for k in rkeys] + [(random_contexts[k], rshuffled[k]) for k in rkeys])
    raw = score_prompts(scorer, jobs)
    n, r = len(feats), len(rkeys)
    own, shuf, rown, rshuf = raw[:n], raw[n:2 * n], raw[2 * n:2 * n + r], raw[2 * n + r:]
    got = [_aurocs(c, s) for c, s in zip([contexts[f] for f in feats] * 2, own + shuf)]
    cal = [_aurocs(contexts[f], a - b) for f, a, b in zip(feats, own, shuf)]
    rgot = [_aurocs(random_contexts[k], s) for k, s in zip(rkeys, rown)]
    rcal = [_aurocs(random_contexts[k], a - b) for k, a, b in zip(rkeys, rown, rshuf)]
    det, fuz = {f: g[0] for f, g in zip(feats, got)}, {f: g[1] for f, g in zip(feats, got)}
    sdet, sfuz = {f: g[0] for f, g in zip(feats, got[n:])}, {f: g[1] for f, g in zip(feats, got[n:])}
    rdet, rfuz = {k: g[0] for k, g in zip(rkeys, rgot)}, {k: g[1] for k, g in zip(rkeys, rgot)}

    def over(a: dict, b: dict) -> Estimate:
        v = [a[f] - b[f] for f in feats if a[f] == a[f] and b[f] == b[f]]
        return bootstrap_ci(v) if v else Estimate(float("nan"), float("nan"), float("nan"), 0.95, 0)

    return ExplainResult({f: given[f] for f in feats}, det, fuz, sdet, sfuz, rand_expl, rdet, rfuz,
                         over(det, sdet), over(fuz, sfuz), explainer.name, scorer.cfg.model_name, 0,
                         time.time() - t0, skipped, {f: c[0] for f, c in zip(feats, cal)},
                         {f: c[1] for f, c in zip(feats, cal)}, {k: c[0] for k, c in zip(rkeys, rcal)},
                         {k: c[1] for k, c in zip(rkeys, rcal)})


def _shuffled(explanations: dict, keys: list, seed: int) -> dict:
    """Each key's control explanation: another key's (a different text, where there is one), drawn by ``seed``."""
    rng = random.Random(seed)
    out = {}
    for f in keys:
        others = [g for g in keys if g != f and explanations[g] != explanations[f]] or [g for g in keys if g != f]
        out[f] = explanations[rng.choice(others)] if others else "(none)"
    return out


def _feature_acts(acts: torch.Tensor, latents: torch.Tensor, shape: tuple, features: list[int], n_random: int,
                  seed: int) -> tuple[dict, dict]:
    """Per-token activations ``[n, pos]`` of the chosen latents (columns of ``latents`` ``[n * pos, d_sae]``, the
    SAE's encoding of the hook's ``acts`` ``[n * pos, d]``), and of ``n_random`` random directions thresholded to
    fire as often as the median chosen latent (the control)."""
    n, P = shape
    f = latents[:, features]
    chosen = {feat: f[:, i].view(n, P) for i, feat in enumerate(features)}
    density = (f > 0).float().mean(0)
    target = float(density.median()) if density.numel() else 0.01
    g = torch.Generator().manual_seed(seed + 7)
    randoms = {}
    for r in range(n_random):
        d = torch.randn(acts.shape[1], generator=g)
        proj = acts @ (d / d.norm())
        thr = torch.quantile(proj[torch.randperm(proj.numel(), generator=g)[:100_000]], 1 - max(target, 1e-3))
        randoms[f"random-{r}"] = (proj - thr).clamp_min(0).view(n, P)
    return chosen, randoms


def explain_features(model: HookedModel, sae: SAE, tokens: torch.Tensor, features: list[int] | None = None,
                     n_features: int = 50, explainer: Explainer | None = None, explainer_url: str | None = None,
                     scorer: HookedModel | None = None, n_random: int = 10, explanations: dict | None = None,
                     seed: int = 0) -> ExplainResult:
    """Explain and score latents of ``sae`` on ``tokens`` ``[n, pos]`` (module docstring). ``features`` default to
    ``n_features`` sampled across density bands; the explainer defaults to ``model`` itself (or the endpoint at
    ``explainer_url``), the scorer to ``model``. A transcoder's latents are read from its input hook."""
    if model.tokenizer is None:
        raise InputError("autointerp needs the model's tokenizer")
    if explainer is None:
        explainer = EndpointExplainer(explainer_url) if explainer_url else LocalExplainer(model)
    scorer = scorer or model
    from .features import token_latents

    # [n*pos, d] and [n*pos, d_sae], once: they choose the features and give their activations
    acts, latents = token_latents(model, sae, tokens)
    if features is None:
        from .features import features_by_density

        keep = torch.ones(tokens.shape, dtype=torch.bool)
        keep[:, 0] = False  # the attention sink
        features = list(features_by_density((latents[keep.flatten()] > 0).float().mean(0), n_features, seed))
    bad = [f for f in features if not 0 <= int(f) < sae.cfg.d_sae]
    if bad:
        raise InputError(f"features must be in 0..{sae.cfg.d_sae - 1}; got {bad}")
    chosen, randoms = _feature_acts(acts, latents, tokens.shape, [int(f) for f in features], n_random, seed)
    tok = model.tokenizer
    contexts = {f: feature_contexts(tok, tokens, a, seed=seed + i) for i, (f, a) in enumerate(chosen.items())}
    rand_ctx = {k: feature_contexts(tok, tokens, a, seed=seed + 1000 + i) for i, (k, a) in enumerate(randoms.items())}
    res = explain_and_score(scorer, explainer, contexts, rand_ctx, explanations, seed)
    res.n_tokens = int(tokens.numel())
    return res
