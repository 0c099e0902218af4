"""Commands for model diffing: diff (a base model against its fine-tune, one report) and organism (a fine-tune with a
known answer, to check the diffing methods on)."""

from __future__ import annotations

import argparse

from ...core.errors import InputError
from ...core.result import Result
from ..registry import Outcome, arg, command
from .common import CORPUS


def _pair(args: argparse.Namespace):
    from ...diffing import load_pair

    return load_pair(args.base, args.finetuned, device=args.device, dtype=args.dtype,
                     check_base=not args.no_check_base)


@command("diff", "what did fine-tuning change? a base model against its fine-tune (a model or a LoRA adapter folder): "
                 "weight and activation differences, KL, the activation-difference lens, crosscoders; one report "
                 "(resumable)",
         ("mechscope diff smollm2-135m ./my-lora-adapter --out diff-report",
          "mechscope diff smollm2-135m ./organism --methods kl,adl,crosscoder --crosscoder-steps 2000",
          "mechscope diff base-folder finetuned-folder --corpus my.txt --json"),
         arg("base", help="the base model: alias, local HF folder, .gguf or hub id"),
         arg("finetuned", help="the fine-tune: a model (as for base) or a PEFT LoRA adapter folder"),
         CORPUS,
         arg("--out", default="mechscope-diff", help="folder for report.html, its pages and its stages"),
         arg("--methods", default="weights,norms,kl,adl",
             help="comma list of weights, norms, kl, adl, crosscoder (the crosscoder trains a dictionary: it says what "
                  "it costs before it starts)"),
         arg("--docs", type=int, default=64, help="documents read (the first --seq-len tokens of each)"),
         arg("--seq-len", type=int, default=64, help="tokens per document"),
         arg("--hook", default=None, help="where the ADL and the crosscoder read (default: the residual stream after "
                                          "the middle block, blocks.L.hook_resid_post)"),
         arg("--adl-hook", default=None, help="where the ADL reads instead of --hook (a small model's fine-tune can "
                                              "show at later layers only, e.g. blocks.28.hook_resid_post); 'auto': "
                                              "the first layer whose state carries 90%% of the fine-tune's next-token "
                                              "shift into the base model"),
         arg("--first", type=int, default=5, help="ADL: the first positions of each document averaged"),
         arg("--alpha", type=float, default=1.0, help="ADL steering: the direction's size, in residual norms"),
         arg("--crosscoder-width", type=int, default=1024, help="latents of the crosscoder"),
         arg("--crosscoder-k", type=int, default=16, help="BatchTopK: active latents per token"),
         arg("--crosscoder-steps", type=int, default=1000, help="training steps"),
         arg("--crosscoder-batch", type=int, default=512, help="rows per training step"),
         arg("--crosscoder-arch", default="batchtopk", help="batchtopk, l1, or both (batchtopk,l1: trained in "
                                                            "lockstep on the same batches)"),
         arg("--l1", type=float, default=0.5, help="the L1 crosscoder's sparsity coefficient"),
         arg("--explain", action="store_true", help="explain and score the kept fine-tune-only latents (sae explain's "
                                                    "machinery; a small local explainer cannot label features well)"),
         arg("--explainer-url", default=None, help="with --explain: an OpenAI-compatible endpoint for the explainer"),
         arg("--dtype", default=None, help="float32 (default), bfloat16 or float16"),
         arg("--device", default=None, help="cpu, cuda, ... (default: cuda if available)"),
         arg("--no-check-base", action="store_true",
             help="accept an adapter whose recorded base model has another name (the same model renamed)"),
         arg("--seed", type=int, default=0, help="seed of the controls and the crosscoder"),
         arg("--fresh", action="store_true", help="recompute every stage instead of reusing OUT/stages"))
def diff_cmd(args: argparse.Namespace) -> Result:
    from pathlib import Path

    from ... import corpus
    from ...core.progress import stage
    from ...project import Run
    from ...workflows.diff import METHODS, diff, format_summary

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise InputError(f"--methods: unknown {bad or 'empty list'}; choose from {', '.join(METHODS)}")
    archs = [a.strip() for a in args.crosscoder_arch.split(",") if a.strip()]
    pair = _pair(args)
    texts, desc = corpus.from_spec(args.corpus, "test")
    tokens = corpus.document_starts(pair.base, texts, args.seq_len, args.docs, source=f"the corpus ({desc})")
    if tokens.shape[0] < args.docs:
        stage(f"the corpus gave {tokens.shape[0]} documents of {args.seq_len}+ tokens, fewer than --docs {args.docs}")
    out = Path(args.out)
    with Run("diff", config={"base": pair.base_name, "finetuned": pair.ft_name, "methods": methods,
                             "docs": int(tokens.shape[0]), "corpus": desc, "out": str(out)}, seeds=[args.seed],
             root=out.resolve() / "runs") as run:
        rep = diff(pair, tokens, out, methods=methods, hook=args.hook, first=args.first, steer_alpha=args.alpha,
                   crosscoder_width=args.crosscoder_width, crosscoder_k=args.crosscoder_k,
                   crosscoder_steps=args.crosscoder_steps, crosscoder_batch=args.crosscoder_batch,
                   crosscoder_archs=tuple(archs), l1_coefficient=args.l1, seed=args.seed, resume=not args.fresh,
                   echo=not args.json, corpus_desc=desc, explain=args.explain, explainer_url=args.explainer_url,
                   adl_hook=args.adl_hook)
        run.log(**{k: v for k, v in rep.metrics.items() if k != "versions"})
        run.artifact(out / "report.html")
    return Outcome(f"{format_summary(rep)}\n\nreport: {out / 'report.html'}\nrun record: {run.path}",
                   {"report": out / "report.html", "run": run.path, "metrics": rep.metrics,
                    "findings": [f.to_dict() for f in rep.findings]})


@command("organism", "a model organism with a known answer: fine-tune a LoRA adapter on documents of false facts about "
                     "a domain drawn at random (or on generic text: --control), cached; then `mechscope diff` it",
         ("mechscope organism --domain-seed 3 --out organism-3",
          "mechscope organism --domain-seed 3 --control --out control-3",
          "mechscope diff smollm2-135m organism-3 --methods kl,adl"),
         arg("--model", default=None, help="the base model (default: smollm2-135m)"),
         arg("--domain-seed", type=int, default=0, help="which domain to draw from the pool (entity and words)"),
         arg("--words", type=int, default=10, help="words in the domain"),
         arg("--control", action="store_true", help="the control: the same fine-tune on generic text"),
         arg("--steps", type=int, default=150, help="fine-tuning steps"),
         arg("--rank", type=int, default=8, help="LoRA rank"),
         arg("--lr", type=float, default=1e-3, help="learning rate"),
         arg("--batch", type=int, default=8, help="sequences per step"),
         arg("--seq-len", type=int, default=64, help="tokens per sequence"),
         arg("--seed", type=int, default=0, help="seed of the adapter's initialisation and the batches"),
         arg("--out", default=None, help="the adapter folder (default: $MECHSCOPE_CACHE/organisms/<hash>)"),
         arg("--device", default=None, help="cpu, cuda, ..."))
def organism_cmd(args: argparse.Namespace) -> Result:
    import mechscope

    from ...diffing.organisms import OrganismSpec, build_organism, draw_domain, read_organism

    name = args.model or mechscope.DEFAULT_MODEL
    model = mechscope.load(name, device=args.device)
    domain = None if args.control else draw_domain(args.domain_seed, args.words)
    spec = OrganismSpec(name, domain, steps=args.steps, rank=args.rank, lr=args.lr, batch=args.batch,
                        seq_len=args.seq_len, seed=args.seed)
    folder = build_organism(model, spec, args.out)
    info = read_organism(folder)
    what = (f"organism: {domain.entity!r} with {domain.words}" if domain else "control: generic text")
    return Outcome(f"{what}; LoRA rank {spec.rank}, {spec.steps} steps, trained in {info['train_seconds']:.0f} s\n"
                   f"adapter: {folder}\nnext: mechscope diff {name} {folder}",
                   {"adapter": folder, "spec": info["spec"], "train_seconds": info["train_seconds"]})
