"""What the commands share: the argument groups, loading the model, the corpus, the task, pictures."""

from __future__ import annotations

import argparse

from ...analysis.viz import page
from ...core.errors import InputError
from ...core.files import atomic_write
from ...core.model import HookedModel
from ...core.result import Result
from ..registry import arg

MODEL = (
    arg("--model", default=None, help="alias, local HF folder, .gguf file or hub id (default: smollm2-135m)"),
    arg("--dtype", default=None, help="float32 (default), bfloat16 or float16"),
    arg("--device", default=None, help="cpu, cuda, ... (default: cuda if available)"),
    arg("--trust-remote-code", action="store_true",
        help="run the Python code a model folder or hub repository ships (off: such a model is refused)"),
)
TASK = (
    arg("--task", choices=["ioi", "factual", "greater-than", "induction"], default=None,
        help="a built-in task (or --task-file, or --clean/--corrupted/--answer)"),
    arg("--task-file", default=None, help="your own task: a .jsonl or .csv with clean, corrupted, answer (and wrong, pos)"),
    arg("--n", type=int, default=8, help="prompts from the task generator"),
    arg("--seed", type=int, default=0, help="seed of the task generator, splits and random controls"),
    arg("--clean", default=None, help="one clean prompt (with --corrupted and --answer)"),
    arg("--corrupted", default=None, help="its corrupted prompt, of the same token length"),
    arg("--answer", default=None, help="the clean answer, e.g. ' Paris' (several tokens, e.g. ' New York', are "
                                       "scored whole: their log-probability, teacher-forced)"),
    arg("--wrong", default=None, help="the contrasting answer; the metric is the logit difference (several tokens: "
                                      "the log-probability difference; without it: the answer's logit)"),
    arg("--answer-tokens", choices=["all", "first"], default="all",
        help="answers of several tokens: score all their tokens (default) or only the first, as single-token "
             "answers are"),
)
PICTURES = (
    arg("--png", default=None, help="write a PNG picture here"),
    arg("--html", default=None, help="write an offline HTML page here"),
)
SITE = (
    arg("--site", default="resid_pre", help="resid_pre|resid_mid|resid_post|attn_out|mlp_out|z|q|k|v|pattern"),
    arg("--direction", default="denoise", choices=["denoise", "noise"],
        help="denoise: clean activations into the corrupted run; noise: the reverse"),
    arg("--per-position", action="store_true", help="head sites: one patch per position"),
)
CORPUS = arg("--corpus", default=None, help="your text: a .txt file (its paragraphs), a folder of .txt files, a .jsonl "
                                           "('text' field) or hf:<dataset>[:<split>] (default: the standard "
                                           "library's docstrings)")
TRANSCODERS = (
    arg("--transcoders", default=None, help="the replacement model: a folder (mechscope's transcoders or CLT, or "
                                            "circuit-tracer's layouts), hf://<org>/<repo>[@<rev>][/<folder>], or a "
                                            "published name (clt-gemma-2-2b-426k, ...; `mechscope info --replacements` "
                                            "lists them); default: $MECHSCOPE_CACHE/transcoders/<model>"),
    arg("--variant", default=None, help="which of several per-layer files to read (Gemma Scope 2: "
                                        "width_16k_l0_small_affine)"),
    arg("--revision", default=None, help="the hub revision of --transcoders"),
    arg("--input-hook", default=None, help="for files that do not say (no config.yaml): the TransformerLens name "
                                           "their encoders read (mlp.hook_in, hook_resid_mid, ln2.hook_normalized)"),
    arg("--output-hook", default=None, help="likewise, what their decoders write (hook_mlp_out)"),
)
SAE_MODEL = MODEL + (arg("path", nargs="?", default=None,
                         help="an SAE folder (SAELens, Gemma Scope, Llama Scope, sparsify or dictionary_learning), or "
                              "hf://<org>/<repo>[@<revision>]/<folder>"),
                     arg("--release", default=None, help="a known SAE release (with --sae-id), e.g. gpt2-small-res-jb"),
                     arg("--sae-id", default=None, help="the SAE within --release, e.g. blocks.8.hook_resid_pre"),
                     arg("--eval-seqs", type=int, default=16, help="held-out sequences"),
                     arg("--seq-len", type=int, default=128, help="tokens per sequence"), CORPUS)


def _load(args: argparse.Namespace):
    import mechscope  # through the package attribute, so that tests and users can substitute `mechscope.load`

    return mechscope.load(args.model or mechscope.DEFAULT_MODEL, device=args.device, dtype=args.dtype,
                          trust_remote_code=getattr(args, "trust_remote_code", False))


def _corpus(args: argparse.Namespace, model, split: str, n_seqs: int, seq_len: int) -> tuple:
    """Token rows ``[n, seq_len]`` from ``--corpus`` (its train or held-out split), and what they were: said on stderr
    and returned for the JSON output."""
    from ... import corpus
    from ...core.progress import stage

    texts, desc = corpus.from_spec(getattr(args, "corpus", None), split)
    toks = corpus.pack(model, texts, seq_len, n_seqs=n_seqs, source=f"the corpus ({desc})")
    if toks.shape[0] == 0:
        raise InputError(f"the corpus ({desc}, {split} split) gave no sequence of {seq_len} tokens; give more text "
                         f"or a shorter --seq-len")
    stage(f"corpus: {desc}, {split} split: {toks.shape[0]} sequences x {toks.shape[1]} = {toks.numel()} tokens")
    info = {"corpus": desc, "corpus_split": split, "corpus_tokens": int(toks.numel())}
    if toks.shape[0] < n_seqs:
        stage(f"the corpus's {split} split gives {toks.shape[0]} sequences of {seq_len} tokens, fewer than the {n_seqs} "
              f"asked: using {toks.shape[0]} (a larger --corpus gives more; a larger number asked cannot)")
        info["corpus_seqs_asked"] = n_seqs
    return toks, info


def _pictures(args: argparse.Namespace, res: Result, title: str) -> Result:
    """Write ``--png`` and ``--html`` where given; return ``res``."""
    if getattr(args, "png", None):
        res.plot(args.png)
    if getattr(args, "html", None):
        atomic_write(args.html, page(title, res.to_html()))
    return res


def _task(args: argparse.Namespace, model):
    """``(clean, corrupted, metric, dataset)`` from ``--task`` or from ``--clean/--corrupted/--answer/--wrong``."""
    from ... import datasets as D
    from ...analysis.metrics import logit_diff

    if getattr(args, "task_file", None):
        if args.task:
            raise InputError("give --task or --task-file, not both")
        ds = D.load_task(args.task_file, model, answer_tokens=args.answer_tokens)
        _say_answer_scoring(ds)
        return _task_inputs(model, ds)
    if args.task:
        makers = {"ioi": lambda: D.ioi(model, args.n, seed=args.seed), "factual": lambda: D.factual(model, args.n),
                  "greater-than": lambda: D.greater_than(model, args.n, seed=args.seed),
                  "induction": lambda: D.induction(model, args.n, seed=args.seed)}
        ds = makers[args.task]()
        return ds.clean, ds.corrupted, ds.metric, ds
    if not (args.clean and args.corrupted and args.answer):
        raise InputError("give --task, --task-file, or --clean, --corrupted and --answer (and usually --wrong)")
    check_answer_spaces(args, model)
    if any(len(model.tokens.encode(t, prepend_bos=False)) > 1 for t in (args.answer, args.wrong) if t):
        ds = D.TaskDataset.from_texts(model, [args.clean], [args.corrupted], [args.answer],
                                      None if args.wrong is None else [args.wrong], name="one pair",
                                      answer_tokens=args.answer_tokens)
        _say_answer_scoring(ds)
        return _task_inputs(model, ds)
    a = model.to_single_token(args.answer)
    b = model.to_single_token(args.wrong) if args.wrong else None

    def metric(logits):
        return logits[:, -1, a] if b is None else logit_diff(logits, a, b)

    return args.clean, args.corrupted, metric, None



def _task_inputs(model, ds) -> tuple:
    """``(clean, corrupted, metric, ds)`` of a dataset; for answers of several tokens ``(pair, None, None, ds)``: a
    prepared pair that tells patching and attribution to read the prompt positions only."""
    if ds.prompt_len is None:
        return ds.clean, ds.corrupted, ds.metric, ds
    from ...techniques.inputs import prepare_task

    return prepare_task(model, ds), None, None, ds


def _say_answer_scoring(ds) -> None:
    """Say on stderr how answers of several tokens are scored (whole, or --answer-tokens first)."""
    from ...core.progress import stage

    if ds.prompt_len is not None:
        stage(f"answers of several tokens: the metric is the {ds.metric_name} ({ds.metric_unit}); patching and "
              f"attribution read the {ds.prompt_len} prompt positions only (--answer-tokens first: the first token)")
    elif "--answer-tokens first" in ds.metric_name:
        stage(f"--answer-tokens first: the metric is the {ds.metric_name}")


def check_answer_spaces(args: argparse.Namespace, model: HookedModel) -> None:
    """Say so when ``--answer`` (or ``--wrong``) has no leading space after a prompt that ends in a word: the next
    token there is almost always the spaced one (``' Paris'``, not ``'Paris'``), a different token."""
    from ...core.progress import stage

    tok = model.tokenizer
    if tok is None or not args.clean or args.clean[-1:].isspace():
        return
    for flag, value in (("--answer", args.answer), ("--wrong", args.wrong)):
        if not value or value[:1].isspace():
            continue
        spaced = tok(" " + value, add_special_tokens=False).input_ids
        bare = tok(value, add_special_tokens=False).input_ids
        if len(spaced) == 1 and spaced != bare:
            stage(f"{flag} {value!r} has no leading space: after {args.clean.split()[-1]!r} the next token is usually "
                  f"{' ' + value!r}, a different token; write {flag} {' ' + value!r} if that is what you mean")


def _held_out(args, model) -> tuple:
    return _corpus(args, model, "test", args.eval_seqs, args.seq_len)


def _load_sae(args):
    from ...sae import load_sae

    model = _load(args)
    if args.release or args.sae_id:
        if args.path or not (args.release and args.sae_id):
            raise InputError("give an SAE folder or hf:// path, or --release with --sae-id")
        return model, load_sae(release=args.release, sae_id=args.sae_id, model=model)
    if not args.path:
        raise InputError("name the SAE: a folder, hf://<org>/<repo>/<folder>, or --release and --sae-id")
    return model, load_sae(args.path, model)

