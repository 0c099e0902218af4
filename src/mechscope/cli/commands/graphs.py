"""Commands for attribution graphs: graph."""

from __future__ import annotations

import argparse

from ...analysis.viz import esc, page
from ...core.errors import InputError
from ...core.files import atomic_write
from ...core.result import Result
from ..registry import Outcome, arg, command
from .common import CORPUS, MODEL, TRANSCODERS, _corpus, _load


def _replacement(args: argparse.Namespace, model: object) -> tuple:
    """The replacement ``--transcoders`` names (a folder, hf://, a published name; default: the model's cached
    transcoders), loaded against ``model``; and where it came from."""
    from ...sae import transcoder_cache
    from ...sae.replacement import load_replacement

    spec = args.transcoders or None
    rep = load_replacement(spec, model, revision=args.revision, variant=args.variant, input_hook=args.input_hook,
                           output_hook=args.output_hook)
    return rep, spec or transcoder_cache(model.cfg.model_name)


def _scan(args: argparse.Namespace, model: object) -> str:
    """The scan id a graph JSON names: a published set's repository (as circuit-tracer writes it), else mechscope's."""
    from ...sae.replacement import releases

    spec = str(args.transcoders or "")
    if spec in releases():
        spec = releases()[spec]["uri"]
    if spec.startswith("hf://"):
        return spec[len("hf://"):]
    return f"mechscope-{model.cfg.model_name}"


@command("graph", "the attribution graph of one prompt through transcoders (a frozen replacement model): nodes, "
         "edges, pruning, replacement and completeness scores, an edge certificate, and an interactive HTML page",
         ('mechscope graph "The capital of the state containing Dallas is" --html graph.html',
          'mechscope graph "When Mary and John went to the store, John gave a drink to" --transcoders tc '
          "--max-features 2048 --labels 64 --html ioi.html --save ioi.safetensors"),
         MODEL, arg("prompt", help="the prompt (its next-token logits are explained)"),
         TRANSCODERS,
         arg("--target", nargs="*", default=None, help="target tokens (text, e.g. ' Paris'; default: the most likely "
                                                       "ones holding 95%% of the probability, at most 10)"),
         arg("--max-features", type=int, default=7500, help="feature rows to compute, most influential first"),
         arg("--batch", type=int, default=128, help="target rows per backward pass"),
         arg("--node-threshold", type=float, default=0.8,
             help="pruning: keep the nodes that carry this fraction of the influence on the logits"),
         arg("--edge-threshold", type=float, default=0.98,
             help="pruning: keep the edges that carry this fraction of the influence"),
         arg("--certify", type=int, default=32, help="edges re-checked by perturbation (0: none)"),
         arg("--labels", type=int, default=0, help="label the pruned graph's features on this many corpus sequences"),
         arg("--label-top", type=int, default=150, help="how many of them (most influential first) get labels"),
         arg("--seq-len", type=int, default=64, help="tokens per labelling sequence"), CORPUS,
         arg("--html", default=None, help="write the interactive graph here"),
         arg("--save", default=None, help="write the graph here (.safetensors)"),
         arg("--json-graph", default=None, help="write the pruned graph here as the JSON Neuronpedia's graph viewer and "
                                                "circuit-tracer's server display"),
         arg("--scan", default=None, help="the transcoders' scan id written into --json-graph (default: a published "
                                          "set's repository, else mechscope-<model>)"),
         arg("--sink-errors", action="store_true", help="keep error nodes at the first (sink) position "
                                                         "(circuit-tracer zeroes them; so does mechscope by default)"),
         arg("--no-bos", action="store_true", help="do not put a BOS-like token in front of a prompt that lacks one"))
def graph_cmd(args: argparse.Namespace) -> Result:
    from ...core.progress import stage
    from ...core.work import WorkMeter
    from ...graphs import attribution_graph
    from ...graphs.graph import FEATURE, LOGIT
    from ...graphs.html import graph_html
    from ...graphs.labels import label_features
    model = _load(args)
    tcs, folder = _replacement(args, model)
    targets = [_graph_target(model, t) for t in args.target] if args.target else None
    stage(f"attribution graph through {tcs.describe()} from {folder}")
    with WorkMeter(model) as meter:
        g = attribution_graph(model, tcs, args.prompt, target_logits=targets, max_feature_nodes=args.max_features,
                              batch_size=args.batch, certify=args.certify, sink_errors=args.sink_errors,
                              prepend_bos=not args.no_bos)
    pruned = g.prune(args.node_threshold, args.edge_threshold)
    dashboards = {}
    if args.labels:
        toks, _ = _corpus(args, model, "train", args.labels, args.seq_len)
        kept = (pruned.keep & (g.kind == FEATURE)).nonzero(as_tuple=True)[0]
        dashboards = label_features(model, g, tcs, toks, g.top_features(args.label_top, among=kept))
    if args.save:
        g.save(args.save)
    if args.json_graph:
        g.to_json(args.json_graph, scan=args.scan or _scan(args, model), node_threshold=args.node_threshold,
                  edge_threshold=args.edge_threshold)
    if args.html:
        atomic_write(args.html, page(f"attribution graph: {args.prompt[:60]}",
                                     graph_html(pruned, dashboards) + f"<pre>{esc(g.summary())}\n"
                                     f"{esc(pruned.summary())}</pre>"))
    top = g.top_edges(10, into=int(g.nodes_of(LOGIT)[0]))
    lines = [g.summary(), pruned.summary(), f"strongest edges into {g.node_name(int(g.nodes_of(LOGIT)[0]))}:"]
    lines += [f"  {s:28s} {w:+.4f}" for s, _, w in top]
    lines.append(meter.log.summary())
    return Outcome("\n".join(lines), {**g.to_dict(), "pruned": pruned.to_dict(), "work": meter.log.to_dict(),
                                      "top_edges_into_first_logit": top, "transcoders": str(folder)})


def _graph_target(model, text: str) -> int:
    """A ``--target``'s token id; one of several tokens is refused saying what a graph explains and what to do."""
    ids = model.tokens.encode(text, prepend_bos=False)
    if len(ids) > 1:
        pieces = [model.to_string([i]) for i in ids]
        raise InputError(f"--target {text!r} is {len(ids)} tokens {pieces}: an attribution graph explains one "
                         f"next-token logit, so its targets are single tokens. Give the first token ({pieces[0]!r}), or, to "
                         f"explain a later one, put the tokens before it at the end of the prompt (prompt + "
                         f"{''.join(pieces[:-1])!r}, target {pieces[-1]!r}). Tasks score answers of several tokens "
                         "whole (mechscope patch/circuit/investigate --task-file)")
    return model.to_single_token(text)
