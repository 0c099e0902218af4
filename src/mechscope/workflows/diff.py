"""``mechscope diff``: what did fine-tuning change? A base model and its fine-tune, read side by side, in one report.

Stages, each kept on disk under ``out/stages`` (a killed run resumes; a rerun with other settings recomputes only
what they change), the cheap methods first:

1. the pair: its checks, and what each method will cost;
2. ``weights``: ``||ΔW||`` and effective rank per matrix (exact; no control needed);
3. ``norms``: per-layer activation-difference norms, each beside its split-half noise floor;
4. ``kl``: per-token KL and loss differences, the contexts and tokens that moved, with the split-half control;
5. ``adl``: the activation-difference lens at one layer (logit lens, Patchscope, steering, next-token effect), each
   beside a random direction of the same norm, and where the difference becomes readable: the fine-tune's residual
   state at 8 layers written into the base model, the share of its next-token shift each reproduces;
6. ``crosscoder`` (optional; it says what it costs before it starts): a BatchTopK crosscoder (and an L1 one to
   compare, ``crosscoder_archs``) trained on paired activations, its reconstruction of each model, latent classes,
   Latent Scaling of the fine-tune-only latents with shared latents as the control, their dashboards;
7. the report: findings with their controls, the quality checklist, and what to do next.

With a model organism (an adapter folder holding ``organism.json``, :mod:`mechscope.diffing.organisms`), every
method's output is also scored against the organism's known domain (:func:`~mechscope.diffing.organisms.recovery`).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..analysis import viz
from ..analysis.validation import Estimate
from ..core.errors import InputError
from ..core.hookpoints import act_name, split_name
from ..core.progress import stage
from ..diffing import adl as A
from ..diffing import crosscoding as C
from ..diffing import kl as KL
from ..diffing import weights as W
from ..diffing.organisms import Domain, domain_token_ids, read_organism, recovery, text_recovery
from ..diffing.pair import ModelPair, fingerprint
from .report import Report, Section, fmt
from .stages import StageCache, register_storable

METHODS = ("weights", "norms", "kl", "adl", "crosscoder")
DEFAULT_METHODS = ("weights", "norms", "kl", "adl")
ARCHS = {"batchtopk": "batchtopk", "l1": "relu"}
MIN_DOCS = 10
#: ``adl_hook="auto"`` reads the ADL at the first layer whose state carries this share of the fine-tune's shift: on
#: the SmolLM2 organisms the middle layers carry half of it, but the generic half, and no domain word (docs/diffing.md)
AUTO_SHARE = 0.9

register_storable(KL.KLDiff, KL.Context, Estimate, A.ActivationDifference, A.Readout, A.LayerNorms, A.StateTransfer,
                  W.WeightDiff, W.ModuleDelta, C.CrosscoderEval, C.LatentScaling)


def _organism_domain(pair: ModelPair) -> Domain | None:
    """The known domain of an organism adapter (None for any other fine-tune)."""
    src = pair.adapter.source if pair.adapter is not None else ""
    if src and (Path(src) / "organism.json").is_file():
        return read_organism(src)["domain"]
    return None


def _crosscoder_cost(pair: ModelPair, width: int, tokens: int, steps: int, batch: int, n_archs: int) -> str:
    """What the crosscoder stage will cost, said before it starts: the rows' memory, and the training time from one
    timed encoder matmul of a batch (a step costs about three of them on CPU: encoder forward, and its backward)."""
    d, S = pair.cfg.d_model, 2
    x, w = torch.randn(batch, S * d), torch.randn(S * d, width)
    t0 = time.perf_counter()
    for _ in range(3):
        x @ w
    per = (time.perf_counter() - t0) / 3
    est = 3 * per * steps * n_archs
    return (f"crosscoder: {tokens} tokens of paired rows ({tokens * S * d * 4 / 2**30:.2f} GiB), then {steps} steps of "
            f"{batch} rows for {n_archs} crosscoder(s) of {width} latents: about {est / 60:.1f} min of training here "
            "(from a timed matmul), plus one forward pass of each model per batch of sequences")


def diff(pair: ModelPair, tokens: torch.Tensor, out: "str | Path" = "mechscope-diff",
         methods: "tuple[str, ...] | list[str]" = DEFAULT_METHODS,
         held_out: torch.Tensor | None = None, hook: str | None = None, first: int = 5, steer_alpha: float = 1.0,
         crosscoder_width: int = 1024, crosscoder_k: int = 16, crosscoder_steps: int = 1000,
         crosscoder_batch: int = 512, crosscoder_archs: "tuple[str, ...]" = ("batchtopk",), l1_coefficient: float = 0.5,
         n_dashboards: int = 10, seed: int = 0, resume: bool = True, echo: bool = True,
         corpus_desc: str = "the corpus", crosscoder_tokens: torch.Tensor | None = None,
         domain: Domain | None = None, explain: bool = False, explainer_url: str | None = None,
         adl_hook: str | None = None) -> Report:
    """Diff ``pair`` on ``tokens [n_docs, pos]`` (one document start per row) and write ``out/report.html``; the
    stages are in the module docstring. ``crosscoder_tokens``: what the crosscoder trains on (default: the first half
    of ``tokens``); ``held_out``: what it is evaluated and read on (default: the second half). ``hook``: where the ADL
    and the crosscoder read (default: the residual stream after the middle block); ``adl_hook``: where the ADL reads
    instead (a small model's domain shows at later layers, docs/diffing.md); ``"auto"``: the first layer whose
    residual state, patched from the fine-tune into the base model, reproduces 90 % of its next-token shift
    (:func:`~mechscope.diffing.adl.state_transfer`; no knowledge of the domain is used). ``domain``: score every method's
    output against this known domain (default: the organism's own, when the fine-tune is an organism adapter; a
    control fine-tune is scored against its organism's). ``explain``: explain and score the kept fine-tune-only latents
    with ``sae explain``'s machinery (the explainer at ``explainer_url``, else the fine-tune itself, which a small model
    cannot do well). ``resume=False`` recomputes every stage."""
    methods = list(methods)
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise InputError(f"unknown diffing method(s) {bad}; the methods are {', '.join(METHODS)}")
    bad = [a for a in crosscoder_archs if a not in ARCHS]
    if bad:
        raise InputError(f"unknown crosscoder architecture(s) {bad}; choose from {', '.join(ARCHS)}")
    if tokens.dim() != 2 or tokens.shape[0] == 0:
        raise InputError(f"tokens must be [documents, pos] with at least one document, got {tuple(tokens.shape)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    hook = hook or C.default_hooks(pair)[0]
    adl_hook = adl_hook or hook
    if adl_hook == "auto" and not pair.same_vocab:
        raise InputError("adl_hook='auto' reads where the fine-tune's state carries its next-token shift, which compares "
                         "next-token distributions: it needs one vocabulary; name a hook instead")
    rep = Report(f"what fine-tuning changed: {pair.base_name} -> {pair.ft_name}", echo=echo)
    keys = {"pair": fingerprint(pair), "tokens": _tokens_key(tokens)}
    keys.update({k: _tokens_key(t) for k, t in (("crosscoder_tokens", crosscoder_tokens), ("held_out", held_out))
                 if t is not None})
    cache = StageCache(out / "stages", base=keys, enabled=resume)
    domain = domain or _organism_domain(pair)
    ids = domain_token_ids(pair.base, domain) if domain is not None and pair.tokenizer is not None else None
    scores: dict[str, float] = {}
    t0 = time.time()
    clock = _Clock()
    n = tokens.shape[0]
    stage(f"diff 1/{len(methods) + 2}: the pair")
    lines = [pair.summary(), f"corpus: {corpus_desc}: {n} documents, the first {tokens.shape[1]} tokens of each"]
    if n < MIN_DOCS:
        lines.append(f"only {n} documents: every interval below rests on too few to be evidence; give {MIN_DOCS}+")
    if domain is not None:
        lines.append(f"a model organism with a known answer: {domain.entity!r} and the words {domain.words}; every "
                     "method is scored on how much of its output lands in that domain")
    if "crosscoder" in methods:
        lines.append(_crosscoder_cost(pair, crosscoder_width, int(tokens.numel()), crosscoder_steps, crosscoder_batch,
                                      len(crosscoder_archs)))
    rep.add(Section("the pair", "\n".join(lines), key="pair"))
    rep.checklist.add("question", f"what did fine-tuning change from {pair.base_name or 'the base model'} to "
                                  f"{pair.ft_name or 'its fine-tune'}?", "#pair")
    rep.checklist.add("technique", f"model diffing: {', '.join(methods)}", "#pair")
    if "weights" in methods:
        clock("weights")
        stage("diff: weight differences")
        wd = cache("weights", {}, lambda: W.weight_diff(pair))
        sec = Section("where the weights changed", wd.summary(), key="weights")
        rep.add(sec)
        if wd.modules:
            top = wd.modules[0]
            rep.find(f"the largest relative weight change is in {top.name} (||ΔW|| / ||W||, exact)", top.relative,
                     "0: an unchanged matrix", sec, holds=top.relative > 0)
        rep.metrics["weights_changed"] = len(wd.modules)
    ln = None
    if "norms" in methods:
        clock("norms")
        stage("diff: per-layer activation differences")
        ln = cache("norms", {}, lambda: A.layer_norms(pair, tokens))
        sec = Section("where the activations changed", ln.summary(), key="norms")
        rep.add(sec)
        i = max(range(len(ln.layers)), key=lambda j: ln.relative_token_diff[j])
        rep.find(f"the residual stream after layer {ln.layers[i]} changed most: mean ||h_ft - h_base|| / ||h_base|| "
                 f"per token", ln.relative_token_diff[i], f"noise floor of ||mean difference|| there: "
                 f"{ln.noise_floor[i]:.3g} (the mean difference itself: {ln.mean_diff_norm[i]:.3g})", sec,
                 holds=ln.mean_diff_norm[i] > 3 * ln.noise_floor[i])
        rep.metrics["layer_relative_diff"] = ln.relative_token_diff
        rep.checklist.add("alternatives", "per-layer differences beside a split-half noise floor", "#norms")
    kld = None
    if "kl" in methods:
        clock("kl")
        stage("diff: next-token distributions")
        if pair.same_vocab:
            kld = cache("kl", {}, lambda: KL.kl_diff(pair, tokens))
            sec = Section("where the next-token distributions differ", kld.summary(), kld.to_html(), key="kl")
            rep.add(sec)
            rep.find("the fine-tune's next-token distribution differs from the base model's on this corpus (mean KL, "
                     "nats per token, interval over documents)", kld.kl, "0: identical predictions", sec,
                     holds=kld.kl.excludes(0.0))
            rep.find(f"the tokens whose probability rose most come back on the other half of the documents (of the "
                     f"top {kld.split_k})", float(kld.split_overlap), f"chance: {kld.chance_overlap:.2f}", sec,
                     holds=kld.split_overlap > max(3 * kld.chance_overlap, 2))
            rep.checklist.add("edge_cases", f"split-half reproducibility of the top token shifts over {n} documents",
                              "#kl")
            rep.checklist.add("visualised", "the per-document KL histogram", "#kl")
            rep.metrics.update(kl=kld.kl.value, loss_diff=kld.loss_diff.value, kl_split_overlap=kld.split_overlap)
            if ids is not None:
                scores["kl"] = recovery([t for t, _ in kld.moved_up[:20]], ids, pair.base)
        else:
            rep.add(Section("where the next-token distributions differ", "skipped: the two vocabularies differ ("
                            + "; ".join(pair.notes) + "), so the distributions cannot be compared token by token",
                            key="kl"))
    adl = None
    if "adl" in methods:
        clock("adl")
        stage("diff: the activation-difference lens")

        transfer = _transfer(pair, tokens, cache, first, seed, adl_hook) if pair.same_vocab else None
        if adl_hook == "auto":
            at = transfer.first_reaching(AUTO_SHARE)
            adl_hook = act_name("resid_post", at if at is not None else pair.cfg.n_layers - 1)

        def run_adl():
            a = A.activation_difference(pair, tokens, adl_hook, first)
            if pair.same_vocab:
                a.readouts = [A.logit_lens_readout(pair, a, seed=seed), A.patchscope_readout(pair, a, seed=seed)]
            a.readouts.append(A.steering_readout(pair, a, alpha=steer_alpha, seed=seed))
            a.readouts.append(A.token_effect_readout(pair, a, tokens, seed=seed))
            return a
        adl = cache("adl", {"hook": adl_hook, "first": first, "alpha": steer_alpha, "seed": seed, "readouts": 4},
                    run_adl)
        sec = Section("the activation-difference lens", adl.summary(), key="adl")
        rep.add(sec)
        floor = _floor_at(ln, adl_hook)
        rep.find(f"the mean activation difference at {adl_hook} on the first {first} tokens of each document (its norm)",
                 adl.norm, f"the norm of half the difference of two halves' means: {floor:.3g}" if floor == floor else
                 "a random direction of the same norm, in each readout", sec,
                 holds=adl.norm.informative and (floor != floor or adl.norm.low > 3 * floor))
        rep.checklist.add("alternatives", "each ADL readout beside a random direction of the same norm", "#adl")
        rep.checklist.add("causal", f"steering the base model with the difference (α = {steer_alpha:g} x the residual "
                                    "norm) against a random direction", "#adl")
        if transfer is not None:
            _transfer_section(rep, transfer, adl)
        if ids is not None:
            for r in adl.readouts:
                key = {"logit lens of δ": "adl_logit_lens", "Patchscope of δ (base model)": "adl_patchscope",
                       "next-token effect of δ (base model; rise in log-probability)": "adl_token_effect"}.get(r.method)
                if key:
                    scores[key] = recovery([t for t, _ in r.tokens], ids, pair.base)
                    scores[key + "_control"] = recovery([t for t, _ in r.control], ids, pair.base)
                elif r.texts:
                    scores["adl_steering"] = text_recovery(r.texts, ids, pair.base)
                    scores["adl_steering_control"] = text_recovery(r.control_texts, ids, pair.base)
    if "crosscoder" in methods:
        clock("crosscoder")
        _crosscoder_stage(rep, pair, tokens, crosscoder_tokens, held_out, out, hook, crosscoder_width, crosscoder_k,
                          crosscoder_steps, crosscoder_batch, crosscoder_archs, l1_coefficient, n_dashboards, seed,
                          resume, cache, ids, scores, explain, explainer_url)
    if domain is not None:
        text = "\n".join(f"  {k}: {v:.2f}" for k, v in scores.items())
        rep.add(Section("recovery of the organism's known domain", "the share of each method's top outputs that are "
                        f"domain tokens ({len(ids or [])} token ids from {domain.words}):\n{text}", key="recovery"))
        rep.metrics["recovery"] = scores
    clock("report")
    _next_steps(rep, pair, kld, adl, methods)
    rep.metrics.update(stage_seconds=clock.done(), stages_reused=sorted(set(cache.hits)),
                       stages_computed=sorted(set(cache.misses)),
                       diff_seconds=round(time.time() - t0, 1), n_docs=n, methods=methods)
    from .report import reproducibility

    reproducibility(rep, pair.base, seed, n)
    rep.write(out)
    return rep


class _Clock:
    """Seconds per stage: each call starts a stage and ends the one before."""

    def __init__(self):
        self.t, self.name, self.seconds = time.perf_counter(), "pair", {}

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[self.name] = round(self.seconds.get(self.name, 0.0) + now - self.t, 2)
        self.t, self.name = now, name

    def done(self) -> dict:
        self("")
        return {k: v for k, v in self.seconds.items() if k}


def _tokens_key(tokens: torch.Tensor) -> str:
    import hashlib

    h = hashlib.sha256(str(tuple(tokens.shape)).encode())
    h.update(tokens.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _transfer(pair: ModelPair, tokens: torch.Tensor, cache: StageCache, first: int, seed: int,
              adl_hook: str) -> "A.StateTransfer":
    """:func:`~mechscope.diffing.adl.state_transfer` at its default layers and the ADL's own, a stage."""
    layers = A.transfer_layers(pair.cfg.n_layers, _resid_layer(adl_hook))
    return cache("transfer", {"layers": layers, "first": first, "seed": seed},
                 lambda: A.state_transfer(pair, tokens, layers, first, seed=seed))


def _transfer_section(rep: Report, st: "A.StateTransfer", adl: "A.ActivationDifference") -> None:
    """Where the fine-tune's difference becomes readable by the base model, with a finding on the ADL's layer."""
    sec = Section("where the difference becomes readable by the base model", st.summary(), key="transfer")
    rep.add(sec)
    rep.metrics.update(transfer_first_half=st.first_reaching(0.5), transfer_first_most=st.first_reaching(AUTO_SHARE))
    layer = _resid_layer(adl.hook)
    if layer is None or st.at(layer) is None:
        return
    state, delta = st.at(layer)
    rep.find(f"the fine-tune's residual state at {adl.hook}, written into the base model, reproduces this share of its "
             f"next-token shift (1 - KL(ft || patched) / KL(ft || base); δ alone: {fmt(delta)})", state,
             f"0: the base model's predictions; the last layer's state: {st.state[-1].value:.2f}", sec,
             holds=state.low > 0.5)
    rep.metrics.update(transfer_state=state.value, transfer_delta=delta.value, adl_hook=adl.hook)
    rep.checklist.add("alternatives", "the ADL layer's state patched into the base model, an upper bound on any "
                                      "readout of δ through it", "#transfer")


def _floor_at(ln: "A.LayerNorms | None", hook: str) -> float:
    """The per-layer noise floor at ``hook`` when the norms stage ran (NaN otherwise)."""
    layer = _resid_layer(hook)
    if ln is None or layer is None or layer >= len(ln.noise_floor):
        return float("nan")
    return ln.noise_floor[layer]


def _resid_layer(hook: str) -> int | None:
    """The layer of a ``blocks.L.hook_resid_post`` name (None for any other hook)."""
    layer, suffix = split_name(hook)
    return layer if suffix == "hook_resid_post" else None


def _crosscoder_stage(rep: Report, pair: ModelPair, tokens: torch.Tensor, train_toks, held_out, out: Path, hook: str,
                      width: int,
                      k: int, steps: int, batch: int, archs, l1: float, n_dash: int, seed: int, resume: bool,
                      cache: StageCache, ids, scores: dict, explain: bool = False,
                      explainer_url: str | None = None) -> None:
    from ..sae.crosscoder import load_crosscoder, save_crosscoder
    from ..sae.features import feature_stats, write_dashboards
    from ..sae.train import TrainConfig

    stage("diff: crosscoder(s) on paired activations")
    n = tokens.shape[0]
    if train_toks is None:
        train_toks = tokens[: max(1, n // 2)]
    test_toks = held_out if held_out is not None else tokens[max(1, n // 2):] if n > 1 else tokens
    cfgs = [C.crosscoder_config(pair, width, [hook], architecture=ARCHS[a], k=min(k, width), l1_coefficient=l1)
            for a in archs]
    key = cache.path("crosscoder", {"hook": hook, "width": width, "k": k, "steps": steps, "batch": batch,
                                    "archs": list(archs), "l1": l1, "seed": seed}).stem
    folders = [out / "crosscoders" / key / a for a in archs]
    if all((f / "model.safetensors").is_file() for f in folders) and resume:
        ccs = [load_crosscoder(f) for f in folders]
        cache.hits.append("crosscoder")
    else:
        train = TrainConfig(steps=steps, batch_size=batch, lr=1e-3, seed=seed, log_every=max(1, steps // 20),
                            checkpoint_every=max(1, steps // 10))
        res = C.train_crosscoder(pair, train_toks, cfgs, train, out=[out / "crosscoders" / key / f"train-{a}"
                                                                     for a in archs], resume=resume)
        ccs = [r.sae for r in res]
        for cc, f in zip(ccs, folders):
            save_crosscoder(cc, f)
        cache.misses.append("crosscoder")
    rows = C.harvest_pair(pair, [hook], test_toks)
    for arch, cc, folder in zip(archs, ccs, folders):
        ev = cache(f"crosscoder-eval-{arch}", {"key": key}, lambda cc=cc: C.evaluate_crosscoder(pair, cc, test_toks))
        x = cc.split_rows(rows.to(cc.W_enc.device))
        fires = (cc.encode(x) > 0).sum(0).cpu()
        lc = C.latent_classes(cc, fires, rows.shape[0])
        ft_only, shared = lc.latents("ft_only"), lc.latents("shared")
        g = torch.Generator().manual_seed(seed)
        base_ctrl = [shared[i] for i in torch.randperm(len(shared), generator=g)[:max(len(ft_only), 20)].tolist()]
        ls = cache(f"latent-scaling-{arch}", {"key": key}, lambda cc=cc, ft_only=ft_only, base_ctrl=base_ctrl:
                   C.latent_scaling(cc, rows, ft_only, baseline=base_ctrl))
        text = f"{cc!r}\nsaved in dictionary_learning's layout: {folder}\n\n{ev.summary()}\n\n{lc.summary()}\n\n" \
               f"{ls.summary()}"
        dash = ""
        kept = ls.kept()[:n_dash]
        if kept:
            view = C.CrosscoderView(pair, cc)
            with pair.side("ft") as m:
                if explain:
                    from ..sae.autointerp import explain_features

                    ex = explain_features(m, view, test_toks, features=kept, explainer_url=explainer_url, seed=seed)
                    view.explanations = dict(ex.explanations)
                    text += f"\n\nautointerp of the kept latents:\n{ex.summary()}"
                stats = feature_stats(m, view, test_toks, features=kept, batch_size=8)
                page = write_dashboards(m, view, stats, out / f"dashboards-{arch}",
                                        source="the held-out documents")
            dash = f"<p><a href='{viz.esc(page.parent.name)}/index.html'>dashboards of {len(kept)} kept fine-tune-only " \
                   "latents</a></p>"
            if ids is not None:
                top_docs = [e for f in kept for e in stats.top.get(f, [])[:5]]
                scores[f"crosscoder_{arch}"] = _example_recovery(top_docs, ids, pair.base)
        sec = Section(f"{arch} crosscoder at {hook}", text, dash + lc.to_html(), key=f"crosscoder-{arch}")
        rep.checklist.add("visualised", f"the {arch} crosscoder's relative-decoder-norm histogram"
                          + (" and the kept latents' dashboards" if kept else ""), f"#crosscoder-{arch}")
        rep.add(sec)
        rep.find(f"{arch} crosscoder: fine-tune-only latents (relative decoder norm > {C.FT_ONLY}) that Latent Scaling "
                 "keeps (ν_ε and ν_r at most 0.5)", float(len(ls.kept())),
                 f"{len(ls.flagged())} flagged as artifacts; shared latents' median ν_ε "
                 f"{C._median(ls.baseline.nu_error) if ls.baseline else float('nan'):.2f}", sec,
                 holds=bool(ls.kept()))
        rep.metrics[f"crosscoder_{arch}"] = {"fvu": ev.fvu, "l0": ev.l0, "classes": lc.counts(),
                                             "flagged": len(ls.flagged()), "kept": len(ls.kept()),
                                             "kept_latents": ls.kept(), "flagged_latents": ls.flagged()}
        rep.checklist.add("edge_cases", f"{arch} crosscoder: {len(ls.flagged())} of {len(ls.latents)} fine-tune-only "
                                        f"latents flagged by Latent Scaling, {len(ls.kept())} kept, on "
                                        f"{rows.shape[0]} held-out tokens", f"#crosscoder-{arch}")
    rep.checklist.add("alternatives", "Latent Scaling of the fine-tune-only latents, with shared latents as the "
                                      "control" + (" and an L1 crosscoder beside the BatchTopK one" if len(archs) > 1
                                                   else ""), f"#crosscoder-{archs[0]}")


def _example_recovery(examples, ids: set[int], model) -> float:
    """The share of top-activation examples whose firing token is a domain token."""
    tok = model.tokens.need_tokenizer()
    hits = []
    for e in examples:
        t = e.tokens[e.center] if 0 <= e.center < len(e.tokens) else ""
        got = tok(t, add_special_tokens=False).input_ids
        hits.append(len(got) == 1 and got[0] in ids)
    return sum(hits) / len(hits) if hits else float("nan")


def _next_steps(rep: Report, pair: ModelPair, kld, adl, methods) -> None:
    todo = []
    if kld is not None:
        words = [t for t, e in kld.moved_up[:5] if e.excludes(0.0)]
        if words and kld.split_overlap > max(3 * kld.chance_overlap, 2):
            todo.append(f"the fine-tune raised {words} reproducibly: write a task file whose answers are these tokens "
                        "and run `mechscope investigate` on both models to find the components that changed")
        elif not kld.kl.excludes(0.0):
            todo.append("the next-token distributions do not differ clearly on this corpus: try text closer to the "
                        "fine-tuning data, or more documents")
    most = rep.metrics.get("transfer_first_most")
    if adl is not None and "transfer_state" in rep.metrics and rep.metrics["transfer_state"] < AUTO_SHARE:
        where = (f"from layer {most} on: rerun with --adl-hook auto ({act_name('resid_post', most)})"
                 if most is not None else "at no layer before the unembedding")
        todo.append(f"the fine-tune's state at {adl.hook} carries {rep.metrics['transfer_state']:.2f} of its next-token "
                    f"shift into the base model, so the ADL's readouts there cannot show what it adds later (on "
                    f"narrow organisms the domain comes last); it carries {AUTO_SHARE:.0%} {where}")
    if adl is not None and not adl.norm.informative:
        todo.append(f"the activation difference rests on {adl.n_docs} documents: give at least {MIN_DOCS}")
    if "crosscoder" not in methods:
        todo.append("add --methods crosscoder to find latents the fine-tune added (it says what it costs first); "
                    "then steer the base model with a kept fine-tune-only latent's decoder to test it")
    else:
        kept = [k for k, v in rep.metrics.items() if k.startswith("crosscoder_") and isinstance(v, dict) and v["kept"]]
        if kept:
            todo.append("steer the base model with a kept fine-tune-only latent's fine-tune decoder (mechscope's "
                        "steering_hook) and read the text it makes, to test what the latent does")
        else:
            todo.append("no fine-tune-only latent survives Latent Scaling: train longer or wider, or read the "
                        "activation-difference lens, which needs no dictionary")
    if not todo:
        todo.append("nothing came out unclear")
    rep.add(Section("what to do next", "\n".join(f"- {t}" for t in todo), key="next"))


def format_summary(rep: Report) -> str:
    """One line per finding (the CLI's output)."""
    return "\n".join(f"- {f.text}: {fmt(f.effect)} ({f.baseline}){'' if f.holds else ' [does not hold]'}"
                     for f in rep.findings)
