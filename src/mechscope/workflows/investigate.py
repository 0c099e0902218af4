"""``investigate``: "find the circuit for behaviour X", from a task's clean/corrupted pairs to one report.

The seed workflow of circuit discovery, in stages, each kept on disk (:mod:`.stages`):

1. check the pairs: the clean and corrupted metric, the model's accuracy, the prompts it fails; a
   model that does not do the task stops here, with that finding, instead of yielding a circuit of noise;
2. residual-stream patching by layer x position;
3. the layers and positions where the information moves;
4. every head (attribution-patching screen, then exact patching) and every MLP, and EAP edges;
5. the circuit chosen from the faithfulness curve, validated on held-out prompts (faithfulness, knockout,
   random circuits of the same size, the curve of the patching, EAP and EAP-IG rankings), and chosen
   again on other random splits of the prompts;
6. the winning components: a head report for each top head on the task's own prompts, DLA, the SAE
   features at the key position (``sae=``), an attribution graph of one prompt (``transcoders=True``, or a
   replacement's spec: a folder, hf://, a published name);
7. what to do next, when a result is unclear.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import torch

from ..analysis import viz
from ..analysis.validation import Estimate, bootstrap_ci
from ..circuits.discovery import SCREEN_HEADS, CircuitResult, PairEffects, find_circuit, no_memo, replicate_split
from ..circuits.heads import detect_heads, head_report
from ..core import work
from ..core.components import Component
from ..core.files import atomic_write
from ..core.model import HookedModel
from ..core.progress import stage
from ..core.work import WorkLog, WorkMeter
from ..datasets import TaskDataset
from ..sae import SAE
from ..techniques.attribution import direct_logit_attribution
from ..techniques.inputs import batched_metric, stop_layer
from .report import Figures, Report, Section, estimates_table, fmt, reproducibility
from .stages import StageCache

#: ``MECHSCOPE_SHARE_PAIRS=0`` patches each split's heads and MLPs on its own (the path before per-pair sharing, for
#: bench/bench_circuit.py's baseline)
SHARE_PAIRS = os.environ.get("MECHSCOPE_SHARE_PAIRS", "1") != "0"
MIN_PROMPTS = 20  # each half of the split needs 10 prompts for a bootstrap CI
NOT_ENOUGH = " [not enough data: too few pairs for this to hold]"
GRAPH_PROMPT = "When Mary and John went to the store, John gave a drink to"


def check_pairs(model: HookedModel, data: TaskDataset, cache: StageCache | None = None) -> dict:
    """The task's metric on every clean and corrupted prompt, the accuracy, and the prompts the model fails.

    Accuracy counts the prompts whose clean metric is above 0 when the metric is a logit difference
    against wrong answers (0 is where the two answers tie), else above the same prompt's corrupted metric.
    ``does_task``: the paired clean - corrupted gap has a CI above 0 and the accuracy is at least 50%.
    """
    def run():
        return {"clean": batched_metric(model, data.clean, data.metric),
                "corrupted": batched_metric(model, data.corrupted, data.metric)}

    m = (cache or no_memo)("check", {}, run)
    clean, corr = (data.per_pair(m[k].float().flatten()) for k in ("clean", "corrupted"))  # one value a prompt pair
    ok = clean > 0 if data.wrong is not None else clean > corr
    gap = bootstrap_ci(clean - corr)
    acc = float(ok.float().mean())
    return {"clean": clean, "corrupted": corr, "gap": gap, "accuracy": acc,
            "failing": [i for i in range(len(clean)) if not ok[i]],
            "does_task": gap.excludes(0.0) and gap.value > 0 and acc >= 0.5,
            "rule": "clean metric > 0 (the answer beats the wrong answer)" if data.wrong is not None
            else "clean metric > the corrupted prompt's"}


def _check(rep: Report, model, data: TaskDataset, cache) -> bool:
    c = check_pairs(model, data, cache)
    n, clean, corr = data.n_pairs, c["clean"], c["corrupted"]
    lines = [data.summary(), f"metric: {data.metric_name} ({data.metric_unit}; {data.metric_direction})",
             f"clean prompts: mean {clean.mean():+.3f}; corrupted prompts: mean {corr.mean():+.3f} {data.metric_unit}",
             f"clean - corrupted (paired, {n} prompts): {c['gap']}",
             f"accuracy ({c['rule']}): {c['accuracy']:.0%} of {n} prompts"]
    if c["failing"]:
        lines.append(f"the model fails the behaviour on {len(c['failing'])} prompts (first 10 listed):")
        lines += [f"  #{i}: {data.texts[i]!r}: clean {clean[i]:+.2f}, corrupted {corr[i]:+.2f}" for i in c["failing"][:10]]
    few = n < MIN_PROMPTS
    if few:
        lines.append(f"only {n} prompt pair(s): too few to tell the clean from the corrupted behaviour with a "
                     f"confidence interval, or to choose a circuit on half of them and judge it on the other half "
                     f"(each half needs 10). mechscope runs what {n} pair(s) can support: this check and patching on "
                     f"all of them, with no circuit chosen and nothing held out; every finding below is marked as not "
                     f"enough data. Give at least {MIN_PROMPTS} pairs for the whole investigation")
    elif not c["does_task"]:
        lines.append("=> the model does NOT reliably do this task, so there is no behaviour to find a circuit for: "
                     "stopping here")
    sec = Section("does the model do the task?", "\n".join(lines), key="check")
    rep.add(sec)
    rep.find(f"the model tells the clean prompts from the corrupted ones ({data.metric_name}, clean - corrupted; "
             f"accuracy {c['accuracy']:.0%} of {n}){NOT_ENOUGH if few else ''}", c["gap"],
             "0: no difference between clean and corrupted", sec, holds=c["does_task"] and not few)
    rep.metrics.update(accuracy=c["accuracy"], clean_minus_corrupted=c["gap"].value, n_prompts=n,
                       n_failing=len(c["failing"]))
    rep.checklist.add("question", f"which components carry the behaviour of the task {data.name!r} "
                                  f"({data.metric_name})?", "#check")
    return c["does_task"]


def _patching_only(rep: Report, model, data: TaskDataset, out: Path, cache) -> None:
    """What a handful of pairs supports: residual patching and every head and MLP patched, on all of them (no split,
    no circuit, no held-out validation), each finding marked as resting on too little data."""
    from ..circuits.discovery import circuit_hooks, patch_components
    from ..techniques.inputs import prepare_task
    from ..techniques.patching import patch

    pair = prepare_task(model, data, circuit_hooks(model))
    resid = cache("resid-all", {}, lambda: patch(model, pair, site="resid_pre"))
    heads, mlps = cache("components-all", {}, lambda: patch_components(model, pair, 64))
    figs = Figures()
    resid.plot(out / "resid_patching.png")
    sec = Section(f"residual stream patching on all {data.n_pairs} pair(s) (no split)", resid.summary(8),
                  figs.heatmap(*resid.grid(), title="patching the residual stream (clean into corrupted), normalised"),
                  ["resid_patching.png"], key="resid")
    rep.add(sec)
    hv = heads.normalized()
    rep.add(Section("heads and MLPs (no split)", f"{heads.summary(8)}\n\n{mlps.summary(8)}",
                    figs.heatmap(hv, [f"L{layer}" for layer in range(hv.shape[0])],
                                 [f"H{h}" for h in range(hv.shape[1])],
                                 title="patching each head's output (z), normalised"), key="components"))
    top = hv.abs().flatten().argmax()
    layer, head = divmod(int(top), hv.shape[1])
    rep.find(f"head L{layer}H{head} has the largest patching effect on these {data.n_pairs} pair(s) (normalised)"
             f"{NOT_ENOUGH}", float(hv[layer, head]), "the other heads, on the same pairs", sec, holds=False)
    rep.checklist.add("technique", f"activation patching of the residual stream, heads and MLPs on {data.n_pairs} "
                                   "pair(s); no circuit chosen (too few pairs to hold any out)", "#components")


def _patching_sections(rep: Report, res: CircuitResult, out: Path, figs: Figures) -> None:
    """Steps 2-4: residual patching, where the information moves, heads and MLPs with their edges."""
    res.resid.plot(out / "resid_patching.png")
    rep.add(Section("residual stream patching (layer x position)", res.resid.summary(8),
                    figs.heatmap(*res.resid.grid(), title="patching the residual stream (clean into corrupted), "
                                                          "normalised: 1 = the clean behaviour"),
                    ["resid_patching.png"], key="resid"))
    lo, hi = res.layer_window
    labels = res.resid.axis_labels("pos")
    where = [labels[res.resid.labels["pos"].index(p)] if p in res.resid.labels["pos"] else str(p) for p in res.positions]
    rep.add(Section("where the information moves", f"the task information moves in layers {lo}..{hi}, at positions "
                    f"{', '.join(where) or 'none above 0.1 of the effect'} (normalised patching effect above 0.1)",
                    key="narrow"))
    res.heads.plot(out / "head_patching.png")
    hv = res.heads.normalized()
    screened = res.heads.stats.get("screened")
    text = (f"{res.heads.summary(8)}\n\n{res.mlps.summary(8)}"
            + (f"\n\nscreening: attribution patching ranked every head; {screened['patched']} of {screened['of']} "
               f"were then patched exactly (the rest count as no effect)" if screened else "")
            + "\n\nstrongest EAP edges into the circuit:\n"
            + "\n".join(f"  {u:>8} -> {v:<10} {s:+.3f}" for u, v, s in sorted(res.edges, key=lambda e: -abs(e[2]))[:12]))
    rep.add(Section("heads and MLPs, and the edges between them", text,
                    figs.heatmap(hv, [f"L{l}" for l in range(hv.shape[0])], [f"H{h}" for h in range(hv.shape[1])],
                                 title="patching each head's output (z), normalised"), ["head_patching.png"],
                    key="components"))
    rep.checklist.add("technique", "activation patching (residual stream, then each head and MLP, screened by "
                                   "attribution patching), edge attribution patching", "#components")
    rep.checklist.add("visualised", "interactive patching heatmaps with token-labelled positions", "#resid")


def _circuit_section(rep: Report, res: CircuitResult, out: Path) -> None:
    """Step 5: the chosen circuit and its held-out validation."""
    res.plot(out / "circuit.png")
    imgs = ["circuit.png"]
    for k in ("held_out_curve", "curve"):
        if k in res.extra:
            res.extra[k].plot(out / f"{k}.png")
            imgs.append(f"{k}.png")
    n_out = res.extra["n_held_out"]
    text = res.summary()
    curves = [c for c in (res.extra.get("held_out_curve"), res.extra.get("curve")) if c is not None]
    top = max((float(e.value) for c in curves for ests in getattr(c, "curves", {}).values() for e in ests),
              default=0.0)
    if top > 1.2:
        text += (f"\n\nthe faithfulness curve rises to {top:.2f}, above 1: once components that OPPOSE the behaviour "
                 "are ablated too, the metric exceeds the clean model's (they were pushing against the answer). This "
                 "is not an error; it is why the circuit is chosen as the smallest size reaching the target, and why "
                 "the opposing components are listed apart")
    sec = Section("the circuit, validated on held-out prompts", text, f"<pre>{viz.esc(res.verdict())}</pre>",
                  imgs, key="circuit")
    rep.add(sec)
    r = [e.value for e in res.random_faithfulness]
    rep.find(f"the {len(res.nodes)}-component circuit ({', '.join(res.nodes[:8])}{' ...' if len(res.nodes) > 8 else ''}"
             f") keeps this fraction of the behaviour on {n_out} held-out prompts (normalised faithfulness, "
             f"{res.mode} ablation)", res.faithfulness,
             f"{len(r)} random circuits of the same size: mean {sum(r) / max(1, len(r)):+.2f} (rank p = "
             f"{res.p_value:.3f}; with {len(r)} random circuits the smallest p possible is {1 / (len(r) + 1):.3f})"
             if r else "no random circuits drawn", sec,
             holds=bool(r) and res.p_value < 0.05 and res.faithfulness.low > 0)
    rep.find("ablating the circuit itself (knockout) changes the metric by", res.knockout,
             f"0: the whole model ({res.extra['metric']})", sec, holds=res.knockout.excludes(0.0))
    rep.checklist.add("causal", f"every component outside the circuit ablated ({res.mode}) on {n_out} held-out "
                                f"prompts: faithfulness {fmt(res.faithfulness)}; knockout {fmt(res.knockout)}",
                      "#circuit")
    rep.checklist.add("alternatives", f"{len(r)} random circuits of the same size; the EAP and EAP-IG rankings "
                                      "against exact patching on the faithfulness curve" if "curve" in res.extra
                      else f"{len(r)} random circuits of the same size", "#circuit")
    rep.checklist.add("edge_cases", f"circuit chosen on {res.extra['n_search']} prompts, judged on {n_out} others",
                      "#circuit")
    rep.metrics.update(circuit=res.nodes, faithfulness=res.faithfulness.value, faithfulness_ci=[
        res.faithfulness.low, res.faithfulness.high], rank_p=res.p_value, knockout=res.knockout.value,
        knockout_ci=[res.knockout.low, res.knockout.high], opposing=list(res.opposing),
        random_faithfulness_highest=max((e.high for e in res.random_faithfulness), default=None))  # top of any random CI
    if "curve" in res.extra:
        rep.metrics["cpr_cmd"] = res.extra["curve"].scores


def _splits(rep: Report, model, data, res: CircuitResult, opts: dict, cache, effects: PairEffects | None
            ) -> list[tuple[int, list[str], Estimate]]:
    """Step 5, again: the circuit chosen on other random splits, with its held-out faithfulness (the pairs that an
    earlier split patched are not patched again: ``effects``)."""
    rows = [(0, res.nodes, res.faithfulness)]
    for s in range(1, opts["split_seeds"]):
        stage(f"investigate: choosing the circuit again on split seed {s}")
        rows.append((s, *replicate_split(model, data, s, opts["target"], opts["ablation"], held_out=opts["held_out"],
                                         screen_heads=opts["screen_heads"], memo=cache, effects=effects)))
    if len(rows) == 1:
        return rows
    jac = [_overlap(res.nodes, n) for _, n, _ in rows]
    lines = [f"the circuit chosen on {len(rows)} random search/held-out splits of the {data.n_pairs} prompts:"]
    lines += [f"  split seed {s}: {len(n)} components, held-out faithfulness {f}, overlap with seed 0 (Jaccard) "
              f"{j:.2f}" for (s, n, f), j in zip(rows, jac)]
    shared = set.intersection(*(set(n) for _, n, _ in rows))
    lines.append(f"  in every split's circuit: {', '.join(sorted(shared, key=_order)) or 'nothing'}")
    if effects is not None:
        lines.append(f"  patching per prompt pair, shared by the splits: {effects.cells['patched']} (component, pair) "
                     f"cells patched, {effects.cells['reused']} read from an earlier split")
    spread = bootstrap_ci(torch.tensor([f.value for _, _, f in rows]))  # n = splits: fmt shows n, not a CI, below 10
    sec = Section("does the circuit depend on the split?", "\n".join(lines),
                  estimates_table([(f"split seed {s}: {len(n)} components", f) for s, n, f in rows],
                                  "held-out faithfulness"), key="splits")
    rep.add(sec)
    stable = min(jac[1:]) >= 0.5 and all(f.low > 0 for _, _, f in rows)
    rep.find(f"the circuit holds across {len(rows)} splits of the prompts (mean held-out faithfulness of "
             f"{', '.join(f'{f.value:.3f}' for _, _, f in rows)}; overlap with seed 0's circuit {min(jac[1:]):.2f} to "
             f"{max(jac[1:]):.2f})", spread,
             "each split's own circuit and held-out prompts", sec, holds=stable)
    rep.checklist.add("edge_cases", f"the circuit chosen again on {len(rows) - 1} other splits of the prompts",
                      "#splits")
    rep.metrics.update(split_faithfulness=[f.value for _, _, f in rows], split_jaccard=jac, split_shared=sorted(shared))
    return rows


def _overlap(a: list[str], b: list[str]) -> float:
    """The Jaccard overlap of two circuits: shared components over all of theirs."""
    return len(set(a) & set(b)) / max(1, len(set(a) | set(b)))


def _order(name: str) -> tuple:
    c = Component.parse(name)
    return c.layer, c.kind, c.index or 0


def _heads(res: CircuitResult) -> list[Component]:
    """The circuit's heads, in its order (strongest patching effect first)."""
    return [c for c in map(Component.parse, res.nodes) if c.kind == "head"]


def _heads_section(rep: Report, model, data, res: CircuitResult, out: Path, n_heads: int) -> None:
    """Step 6: a head report for each of the top circuit heads, on the task's own prompts."""
    heads = _heads(res)[:n_heads]
    if not heads:
        rep.add(Section("the circuit's heads", "the circuit has no heads", key="heads"))
        return
    det = detect_heads(model)
    reports = [head_report(model, h.layer, h.index, prompts=list(data.clean[:2]), ablation_seqs=0, detectors=det)
               for h in heads]
    summaries = [hr.summary() for hr in reports]
    links = []
    for h, hr, text in zip(heads, reports, summaries):
        path = hr.write(out / f"head_{h}.html")
        first = text.splitlines()[1] if len(text.splitlines()) > 1 else ""
        links.append(f"<li><a href='{viz.esc(path.name)}'>{viz.esc(str(h))}</a>: {viz.esc(first)}</li>")
    text = "\n\n".join(summaries)
    rep.add(Section(f"the circuit's top {len(heads)} heads", text + "\n\n(each head's task ablation is the circuit's "
                    "validation above; these reports show what the head reads and writes)",
                    f"<ul>{''.join(links)}</ul>", key="heads"))
    rep.metrics["head_reports"] = [str(h) for h in heads]


def _answer_position(data: TaskDataset) -> int | None:
    """The one answer position of every prompt (-1 for the last), or None when they differ (answers of several
    tokens: the prompt's last position, where their first token is read)."""
    if data.prompt_len is not None:
        return data.prompt_len - 1
    P = data.clean.shape[1]
    pos = {int(m.get("pos", P - 1)) % P for m in data.meta} if data.meta else {P - 1}
    return None if len(pos) > 1 else (-1 if pos == {P - 1} else pos.pop())


def _dla_section(rep: Report, model, data: TaskDataset, res: CircuitResult, out: Path) -> None:
    """Step 6: direct logit attribution of the task's answer, and the circuit heads' direct share of it."""
    pos = _answer_position(data)
    if data.answers is None or pos is None:
        rep.add(Section("direct logit attribution", "skipped: the prompts have different answer positions (DLA reads "
                        "one position)", key="task-dla"))
        return
    n = min(data.n_pairs, 32)
    first = data.pair_rows(n)
    dla = direct_logit_attribution(model, data.clean[first], data.answers[first],
                                   None if data.wrong is None else data.wrong[first], pos=pos)
    dla.plot(out / "task_dla.png")
    heads = _heads(res)
    direct = float(sum(dla.heads[h.layer, h.index] for h in heads)) if heads else 0.0
    first_only = ("\n(answers of several tokens: DLA reads their first tokens at the prompt's last position; the "
                  "task's metric scores them whole)" if data.prompt_len is not None else "")
    sec = Section("direct logit attribution of the answer", f"{dla.summary()}{first_only}\n\nthe circuit's {len(heads)} heads "
                  f"write {direct:+.3f} of {dla.target:+.3f} directly (the rest reaches the logits through later "
                  f"components, or comes from others)", "", ["task_dla.png"], key="task-dla")
    rep.add(sec)
    mean_head = float(dla.heads.sum()) / dla.heads.numel()
    rep.find(f"the circuit's heads write this much of the {dla.label} directly (DLA on {n} clean prompts)", direct,
             f"as many average heads: {mean_head * len(heads):+.3f}", sec, holds=abs(direct) > abs(mean_head * len(heads)))
    rep.metrics["dla_circuit_heads"] = direct


def _sae_section(rep: Report, model, data: TaskDataset, res: CircuitResult, sae) -> None:
    """Step 6 with an SAE: the features whose activation differs most between clean and corrupted prompts at the
    key position of the SAE's layer, against the typical feature active there."""
    hook = sae.cfg.hook_name
    m = re.search(r"blocks\.(\d+)\.", hook)
    rn = res.resid.normalized().abs()
    layer = min(int(m.group(1)), rn.shape[0] - 1) if m else rn.shape[0] - 1
    pos = int(res.resid.labels["pos"][int(rn[layer].argmax())])
    n = min(data.n_pairs, 32)
    first = data.pair_rows(n)
    with torch.no_grad():
        acts = [model.run_with_cache(t[first], names_filter=[hook], stop_at_layer=stop_layer(model, [hook]))[1][hook][:, pos]
                for t in (data.clean, data.corrupted)]
        fc, fx = (sae.encode(a.to(sae.W_enc.device, sae.W_enc.dtype)).float().cpu() for a in acts)
    diff = (fc - fx).mean(0)
    active = ((fc > 0) | (fx > 0)).float().mean(0)
    live = active > 0
    top = diff.abs().argsort(descending=True)[:10]
    typical = float(diff.abs()[live].median()) if live.any() else 0.0
    lines = [f"SAE on {hook}, at position {pos} (the largest residual patching effect at layer {layer}), {n} prompt "
             f"pairs: features by mean activation, clean - corrupted"]
    expl = getattr(sae, "explanations", {})
    lines += [f"  feature {int(i):>6}: {float(diff[i]):+.3f} (active on {float(active[i]):.0%} of the prompts)"
              + (f"  explanation: {expl[int(i)]!r}" if int(i) in expl else "") for i in top]
    lines.append(f"control: the median |clean - corrupted| over the {int(live.sum())} features active there: {typical:.3f}")
    sec = Section("SAE features at the key position", "\n".join(lines), key="sae-features")
    rep.add(sec)
    rep.find(f"SAE feature {int(top[0])} on {hook} differs most between clean and corrupted prompts (mean activation "
             f"difference at position {pos})", float(diff[top[0]]), f"the median feature active there: {typical:.3f}",
             sec, holds=abs(float(diff[top[0]])) > 3 * typical)
    rep.metrics["sae_top_features"] = [int(i) for i in top]


def _next_steps(rep: Report, data: TaskDataset, res: CircuitResult | None, splits, target: float,
                few: bool = False) -> None:
    """Step 7: what to do next, for each result that came out unclear."""
    todo = []
    if few:
        todo += [f"give at least {MIN_PROMPTS} prompt pairs (now {data.n_pairs}): a task file with one pair per line "
                 "(--task-file), or a built-in task with --n; then the circuit is chosen on half and judged on the "
                 "other half"]
    elif res is None:
        todo += ["the model does not do the task: check the answers and wrong answers (the failing prompts are listed), "
                 "try a larger model of the same family, or make the behaviour easier (shorter prompts, clearer "
                 "contrasts); a circuit found now would explain noise"]
    else:
        f = res.faithfulness
        if f.high - f.low > 0.3:
            todo.append(f"the faithfulness CI is wide ({f.low:.2f} to {f.high:.2f}): give more prompts (now "
                        f"{data.n_pairs}; the CI narrows about as 1/sqrt(n))")
        if not res.random_faithfulness or res.p_value >= 0.05:
            todo.append("the circuit is not clearly better than random circuits of its size: the behaviour may be "
                        "spread over many components; compare the rankings on the faithfulness curve, or try an edge "
                        "circuit (`mechscope circuit --edges`, or mechscope.edge_circuit)")
        if f.value < target:
            todo.append(f"the held-out faithfulness {f.value:.2f} is below the target {target}: try the other ablation "
                        "mode (--ablation mean|cf), more prompts, or a larger --target")
        if res.opposing:
            names = list(res.opposing)
            shown = ", ".join(names[:6]) + (f", and {len(names) - 6} more" if len(names) > 6 else "")
            todo.append(f"{len(names)} component(s) oppose the behaviour ({shown}): read them (`mechscope head L.H` "
                        "for a head) before calling the circuit complete")
        if len(splits) > 1 and min(_overlap(res.nodes, n) for _, n, _ in splits[1:]) < 0.5:
            todo.append("the circuit changes with the split of the prompts: trust only the components in every split's "
                        "circuit, and add prompts")
        if not todo:
            todo.append("nothing came out unclear. To go further: test the circuit on a new prompt template, read the "
                        "top heads' reports, and train or load an SAE at the key layer (--sae)")
    rep.add(Section("what to do next", "\n".join(f"- {t}" for t in todo), key="next"))


def investigate(model: HookedModel, data: TaskDataset, out: str | Path = "mechscope-investigation", target: float = 0.8,
                ablation: str = "cf", held_out: float = 0.5, split_seeds: int = 3, n_random: int = 20,
                screen_heads: int | None = SCREEN_HEADS, n_heads: int = 3, curve: bool = True, sae: SAE | None = None,
                transcoders: bool | str = False, resume: bool = True, echo: bool = True,
                report: Report | None = None) -> Report:
    """Investigate the behaviour in ``data`` (clean/corrupted pairs) end to end and write ``out/report.html``.

    The stages are in the module docstring. ``target``, ``ablation``, ``held_out``, ``n_random`` and
    ``screen_heads`` are :func:`~mechscope.circuits.discovery.find_circuit`'s; ``split_seeds`` random
    splits choose the circuit again; ``n_heads`` top heads get a head report; ``sae``: an SAE whose
    features at the key position are listed; ``transcoders``: an attribution graph of the first prompt
    from the cached transcoders (``True``) or the replacement a spec names (:func:`mechscope.sae.load_replacement`).
    Stages are stored under ``out/stages`` (``resume=False``: recompute).
    ``report``: add the sections to this report (the demo's) instead of a new one.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rep = report or Report(f"investigation of {data.name!r} in {model.cfg.model_name}", echo=echo)
    prefix, rep.prefix = rep.prefix, (f"{data.name}: " if report is not None else rep.prefix)
    cache = StageCache(out / "stages", model, data, enabled=resume)
    opts = dict(target=target, ablation=ablation, held_out=held_out, split_seeds=max(1, split_seeds),
                screen_heads=screen_heads)
    t0 = time.time()
    with WorkMeter(model) as meter:
        stage(f"investigate 1/5: checking the {data.n_pairs} pairs")
        res, splits = None, []
        with work.stage("checking the pairs"):
            does = _check(rep, model, data, cache)
        if data.n_pairs < MIN_PROMPTS:
            stage(f"investigate 2/5: {data.n_pairs} pair(s): patching only (no circuit is chosen from so few)")
            _patching_only(rep, model, data, out, cache)
        elif does:
            stage("investigate 2/5: patching, the circuit from the curve, its validation")
            effects = PairEffects(model, data) if SHARE_PAIRS else None  # each pair's patching, shared by the splits
            res = find_circuit(model, data, target=target, ablation=ablation, held_out=held_out, n_random=n_random,
                               screen_heads=screen_heads, curve=curve, memo=cache, effects=effects)
            _patching_sections(rep, res, out, Figures())
            _circuit_section(rep, res, out)
            stage(f"investigate 3/5: the circuit on {opts['split_seeds'] - 1} more splits")
            splits = _splits(rep, model, data, res, opts, cache, effects)
            stage("investigate 4/5: the winning components")
            with work.stage("reading the components"):
                _heads_section(rep, model, data, res, out, n_heads)
                _dla_section(rep, model, data, res, out)
            if sae is not None:
                _sae_section(rep, model, data, res, sae)
            if transcoders:
                graph_section(rep, model, out, data.texts[0], spec=None if transcoders is True else str(transcoders))
    stage("investigate 5/5: the report")
    if res is not None:  # a run that stopped at the check has nothing to account for
        _work_section(rep, meter.log)
    _next_steps(rep, data, res, splits, target, few=data.n_pairs < MIN_PROMPTS)
    rep.metrics.update(stages_reused=sorted(set(cache.hits)), stages_computed=sorted(set(cache.misses)),
                       investigate_seconds=round(time.time() - t0, 1))
    rep.prefix = prefix
    if report is None:
        reproducibility(rep, model, 0, data.n_pairs)
        rep.write(out)
    return rep


def _work_section(rep: Report, log: WorkLog) -> None:
    """What each stage ran against the floor its answer needs (:mod:`mechscope.core.work`)."""
    rep.add(Section("work per stage", log.summary() + "\n\nA stage read from the stage store shows no work. Floors: "
                    "the patching engine's live patches from their block and position on, each ablated set from its "
                    "first ablated block on, one forward per gradient pass, and each side's first clean and "
                    "corrupted run; anything above them is repeated work.", key="work"))
    rep.metrics["work"] = log.to_dict()


def graph_section(rep: Report, model: HookedModel, out: Path, prompt: str = GRAPH_PROMPT,
                  max_features: int = 2048, spec: str | None = None) -> None:
    """An attribution graph of ``prompt`` on the replacement ``spec`` names (a folder, hf://, a published name), or
    without one on the cached transcoders when every layer has one (else a pointer)."""
    from ..graphs import attribution_graph, intervene
    from ..graphs.html import graph_html
    from ..graphs.nodes import LOGIT
    from ..sae import load_transcoders, transcoder_cache
    from ..sae.replacement import load_replacement

    if spec is not None:
        tcs = load_replacement(spec, model)
    else:
        folder = transcoder_cache(model.cfg.model_name)
        tcs = load_transcoders(folder, model) if folder.is_dir() else []
        if len(tcs) != model.cfg.n_layers:
            rep.add(Section("attribution graph", f"no transcoders for every layer in {folder}: run `mechscope "
                            "transcoders train` once (about 30 min for SmolLM2 here), or name published ones with "
                            f"--transcoders, and an attribution graph of {prompt!r} appears here", key="graph"))
            return
    g = attribution_graph(model, tcs, prompt, max_feature_nodes=max_features, progress=False)
    pruned = g.prune()
    atomic_write(out / "graph.html", viz.page(f"attribution graph: {prompt}", graph_html(pruned)))
    iv = intervene(model, g, tcs, g.top_features(3).tolist(), scale=0.0)
    summary = g.summary()
    sec = Section("attribution graph", f"{summary}\n{pruned.summary()}\n\n{iv.summary()}",
                  f"<p><a href='graph.html'>the interactive graph</a> (a page beside this report)</p>"
                  f"<pre>{viz.esc(summary)}</pre>", key="graph")
    rep.add(sec)
    cert = g.certificate or {"worst_rel": float("nan"), "n": 0}
    rep.find(f"the attribution graph of {prompt!r} ({g.stats['replacement']}) is exact about its replacement model: "
             f"{cert['n']} edges re-checked by perturbation, worst relative error", cert["worst_rel"],
             "1e-4, the exactness bar", sec, holds=cert["worst_rel"] < 1e-4)
    target = g.token_labels[0]
    rep.find(f"removing the graph's 3 most influential features from the real model moves the {target!r} logit by "
             f"(predicted {iv.predicted_graph[0]:+.2f})", iv.measured[0], "0: no feature removed", sec,
             holds=(iv.measured[0] < 0) == (iv.predicted_graph[0] < 0))
    rep.metrics.update(graph_replacement_score=g.scores()["replacement"], graph_seconds=g.stats["seconds"],
                       graph_certificate_worst_rel=cert["worst_rel"], graph_logit=int(g.index[g.nodes_of(LOGIT)[0]]))
