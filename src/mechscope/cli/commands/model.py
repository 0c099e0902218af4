"""Commands for the model and the machine: env, info, estimate, check."""

from __future__ import annotations

import argparse

from ...core.result import Result
from ..registry import Outcome, arg, command
from .common import MODEL, _load


@command("env", "the device, its memory and dtype support", ("mechscope env", "mechscope env --json"))
def env_cmd(args: argparse.Namespace) -> Result:
    from ...compute import env

    return env()


@command("info", "the model card: architecture, sizes, hook names; or the published replacement models mechscope "
         "knows by name", ("mechscope info", "mechscope info --model ./my-hf-folder --hooks",
                           "mechscope info --replacements"), MODEL,
         arg("--hooks", action="store_true", help="list the hook points"),
         arg("--replacements", action="store_true", help="list the published transcoder sets and CLTs (no model is "
                                                         "loaded)"))
def info_cmd(args: argparse.Namespace) -> Result:
    from ...core.hookpoints import table

    if args.replacements:
        from ...sae.replacement import releases

        rel = releases()
        lines = ["published replacement models (load_replacement(NAME, model), --transcoders NAME; the files must be in "
                 "the Hugging Face cache or the hub reachable):"]
        for name, r in sorted(rel.items()):
            feats = f"{r['features_per_layer']:,}" if r["features_per_layer"] else "?"
            lines.append(f"  {name:36s} {r['kind']:23s} {r['model']:26s} {r['n_layers']:3d} layers x {feats} features  "
                         f"{r['uri']}")
        return Outcome("\n".join(lines), {"replacements": rel})
    from ...loading import ALIASES, DEFAULT_MODEL

    model = _load(args)
    d = {**model.cfg.to_dict(), "n_hook_points": len(model.hook_names)}
    text = [repr(model)]
    alias = ALIASES.get(args.model or DEFAULT_MODEL)
    if alias is not None:
        d["source"] = (f"{alias.description}, from the {alias.package} package, dequantised to {model.cfg.dtype} on "
                       "load: its numbers are the quantised model's, not the original weights'")
        text.append(f"source: {d['source']}")
    text += ["", "config:"] + [f"  {k:20} {v}" for k, v in d.items() if k not in ("extra", "source")]
    if args.hooks:
        d["hook_names"] = model.hook_names
        per = [n.split(".", 2)[2] for n in model.hook_names if n.startswith("blocks.0.")]
        text += ["", "hook points (per block L):"] + [f"  blocks.L.{p}" for p in per]
        text += ["top level:"] + [f"  {n}" for n in model.hook_names if not n.startswith("blocks.")]
        text += ["", "meaning and shape (every family; see docs/hooks.md):", table()]
    return Outcome("\n".join(text), d)


@command("estimate", "memory needed for a run before loading (offline for well-known hub ids), and which GPUs fit it",
         ("mechscope estimate --batch 8 --seq-len 512 --cache all",
          "mechscope estimate --model meta-llama/Llama-3.1-8B --dtype bfloat16 --seq-len 1024 --sae-width 65536",
          "mechscope estimate --model gemma3-270m --sae-width 16384"), MODEL,
         arg("--batch", type=int, default=1, help="sequences per forward pass"),
         arg("--seq-len", type=int, default=128, help="tokens per sequence"),
         arg("--cache", default=None, help="'all' or a comma list of hook names to cache"),
         arg("--sae-width", type=int, default=None, help="also estimate training an SAE of this many latents"),
         arg("--patch-rows", type=int, default=64, help="patched prompts per pass, for the GPU table's patching row"),
         arg("--transcoders", default=None, help="also estimate an attribution graph on this replacement model, with "
                                                 "--seq-len tokens: a published name (its sizes from mechscope's table; "
                                                 "`mechscope info --replacements` lists them), a folder or a cached "
                                                 "hf:// one (sizes from its files' headers)"),
         arg("--l0", type=int, default=32, help="--transcoders: active features per layer and token assumed"),
         arg("--finetuned", default=None, help="also estimate diffing the model against this fine-tune: a model (two "
                                              "copies of the weights) or a PEFT adapter folder (one copy plus the "
                                              "adapter)"),
         arg("--crosscoder-width", type=int, default=None, help="--finetuned: also a crosscoder of this many latents"),
         arg("--crosscoder-tokens", type=int, default=65536, help="--finetuned: the crosscoder's training tokens"))
def estimate_cmd(args: argparse.Namespace) -> Result:
    from ...compute import config_for, estimate_memory, estimate_replacement, gpu_fit
    from ...loading import DEFAULT_MODEL

    cache = args.cache if args.cache in (None, "all") else args.cache.split(",")
    model_name = args.model
    if args.transcoders and not model_name:
        from ...sae.replacement import release_sizes

        model_name = release_sizes(args.transcoders)["model"] or None
    config = config_for(model_name or DEFAULT_MODEL)
    est = estimate_memory(config, dtype=args.dtype or "float32", batch=args.batch, seq_len=args.seq_len,
                          cache_names=cache, sae_width=args.sae_width)
    fit = gpu_fit(config, seq_len=args.seq_len, batch=max(1, args.batch), sae_width=args.sae_width,
                  patch_rows=args.patch_rows)
    text, data = f"{est.summary()}\n\n{fit.summary()}", {**est.to_dict(), "gpus": fit.to_dict()}
    if args.transcoders:
        from ...sae.replacement import release_sizes

        r = release_sizes(args.transcoders)
        rep = estimate_replacement(args.transcoders, r["kind"], r["n_layers"], r["d_model"], r["features_per_layer"],
                                   seq_len=args.seq_len, l0_per_layer=args.l0, model_bytes=est.weights,
                                   disk_bytes_per_value=2 if r.get("dtype") in ("bfloat16", "float16") else 4)
        text += f"\n\nattribution graph on {rep.summary()}"
        data["replacement"] = rep.to_dict()
    if args.finetuned:
        from pathlib import Path

        from ...compute import estimate_pair
        from ...diffing.lora import WEIGHTS, is_adapter_folder

        adapter = is_adapter_folder(args.finetuned)
        pe = estimate_pair(config, adapter_bytes=(Path(args.finetuned) / WEIGHTS).stat().st_size if adapter and
                           (Path(args.finetuned) / WEIGHTS).is_file() else 0, two_models=not adapter,
                           dtype=args.dtype or "float32", batch=max(1, args.batch), seq_len=args.seq_len,
                           crosscoder_width=args.crosscoder_width or 0, crosscoder_tokens=args.crosscoder_tokens)
        text += f"\n\ndiffing against {args.finetuned}: {pe.summary()}"
        data["pair"] = pe.to_dict()
    return Outcome(text, data)



@command("check", "the identity suite on a loaded model: exact hooks, residual identities, live hook points",
         ("mechscope check", "mechscope check --model ./my-hf-folder --no-interventions --json"), MODEL,
         arg("--no-interventions", action="store_true", help="skip editing every hook point (faster)"))
def check_cmd(args: argparse.Namespace) -> Result:
    from ...core.check import check

    return check(_load(args), interventions=not args.no_interventions, progress=True)

