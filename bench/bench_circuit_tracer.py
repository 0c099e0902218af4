"""Attribution graphs against circuit-tracer 0.5.0 (TransformerLens backend) on SmolLM2-135M: `make bench-ct`.

circuit-tracer lives in its own venv (bench/.venv-ct, with transformers 4.57 and TransformerLens 3.2; never a
mechscope dependency) and runs in a subprocess (bench/_ct_side.py) on the same weights, the same token ids and the
same transcoders, converted exactly to its layout (encoder, decoder, biases, skip connection, per-feature JumpReLU
thresholds; input hook ``mlp.hook_in`` = mechscope's ``ln2.hook_normalized``, output ``hook_mlp_out``).

1. The reference model is checked first: transformers 4.57's logits against mechscope's (its config is written
   out explicitly; 4.57 misreads transformers 5's ``rope_parameters``), then TransformerLens's against HF.
2. Both tools trace every active feature of the prompt; the bench prints the largest adjacency difference over
   all node pairs relative to the largest edge (goal <= 1e-4), the top-50 edge overlap, both tools' replacement
   and completeness scores (goal: within 1e-3), and both wall times.
3. Both tools again at circuit-tracer's default cap of 7,500 features: wall time and peak memory (RSS of the
   process) of mechscope's sparse graph against circuit-tracer's dense one, and the size of each file.
4. Graph JSON: circuit-tracer's own file (``create_graph_files``) and mechscope's ``to_json`` for the same graph
   have the same keys and value types, and circuit-tracer's file reads back into an ``AttributionGraph``.
5. A cross-layer transcoder (``--no-clt`` skips it, ``--clt-only`` runs it alone): mechscope's trained one from
   ``$MECHSCOPE_CACHE/transcoders/smollm2-135m-clt/clt`` (bench/bench_clt.py or `mechscope transcoders train --kind
   clt --out $MECHSCOPE_CACHE/transcoders/smollm2-135m-clt` puts it there) or a random JumpReLU one (BENCH_CLT_WIDTH
   features per layer, about BENCH_CLT_K per layer and token), written by mechscope in circuit-tracer's layout and read by
   circuit-tracer's own ``load_clt``; the same comparisons, time and peak memory of both, and the same files as a hub
   repository loaded by circuit-tracer's ``load_transcoder_from_hub`` (its ``config.yaml``) offline.

Transcoders: ``$MECHSCOPE_CACHE/transcoders/smollm2-135m`` when `mechscope transcoders train` has put JumpReLU or
BatchTopK ones there; else random JumpReLU transcoders (2,304 latents, skip, thresholds set so that about
BENCH_K features fire per token). TopK transcoders are refused: circuit-tracer's TopK keeps the k largest
pre-activations, negative ones included, while mechscope applies ReLU first.
Environment: BENCH_PROMPT, BENCH_K (default 24), BENCH_THREADS (default 2). Run nothing else beside it.
``--write-fixture`` also stores circuit-tracer's graph JSON (compact) as tests/fixtures/circuit_tracer_0_5/graph.json,
which tests/test_graphs.py checks mechscope's schema and reader against in CI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from _graph_run import run as graph_run

HERE = Path(__file__).parent
CT_PY = HERE / ".venv-ct" / "bin" / "python"
PROMPT = os.environ.get("BENCH_PROMPT", "Fact: the capital of the state containing Dallas is")
CAP = 7500
FIXTURE = HERE.parent / "tests" / "fixtures" / "circuit_tracer_0_5" / "graph.json"


def random_transcoders(model, tokens: torch.Tensor, k: int) -> list:
    """Random JumpReLU skip transcoders whose per-feature thresholds let about ``k`` features fire per token."""
    from mechscope.core.hookpoints import act_name
    from mechscope.sae import SAE, SAEConfig

    d = model.cfg.d_model
    seen = {}
    names = [model.mlp_input(i) for i in range(model.cfg.n_layers)]
    model.run_with_hooks(tokens, fwd_hooks=[(n, lambda a, h: seen.__setitem__(h.name, a[0].detach())) for n in names])
    out = []
    for i, name in enumerate(names):
        tc = SAE(SAEConfig(d_in=d, d_sae=4 * d, architecture="jumprelu", hook_name=name,
                           hook_name_out=act_name("mlp_out", i), skip=True), seed=i)
        with torch.no_grad():
            tc.W_skip.normal_(0, 0.02, generator=torch.Generator().manual_seed(i))
            pre = tc.pre_acts(seen[name].float())
            thr = pre.quantile(1 - k / tc.cfg.d_sae, dim=-1).mean().clamp_min(1e-3)
            tc.log_threshold.fill_(float(thr.log()))
        out.append(tc)
    return out


def to_circuit_tracer(tcs) -> dict[str, torch.Tensor]:
    """mechscope transcoders in circuit-tracer's SingleLayerTranscoder layout, through their public maths:
    ``W_enc [d_sae, d_in]`` (read directions), ``W_dec [d_sae, d_out]`` (write directions), ``b_dec`` (the decode of
    no features), ``W_skip [d_out, d_in]`` (circuit-tracer applies ``x @ W_skip.T``) and per-feature thresholds."""
    out = {}
    for layer, tc in enumerate(tcs):
        c = tc.cfg
        if c.architecture not in ("jumprelu", "batchtopk") or c.apply_b_dec_to_input:
            raise SystemExit(f"layer {layer}: a {c.architecture} transcoder with apply_b_dec_to_input="
                             f"{c.apply_b_dec_to_input} has no exact circuit-tracer form; use JumpReLU or BatchTopK")
        with torch.no_grad():
            f = torch.arange(c.d_sae)
            thr = tc.log_threshold.exp() if c.architecture == "jumprelu" else tc.threshold.clamp_min(0).expand(c.d_sae)
            p = f"layer{layer}."
            out.update({p + "W_enc": tc.read_directions(f).float(), p + "W_dec": tc.write_directions(f).float(),
                        p + "b_enc": tc.b_enc.float(), p + "b_dec": tc.decode(torch.zeros(c.d_sae)).float(),
                        p + "threshold": thr.float().contiguous()})
            if c.skip:
                out[p + "W_skip"] = tc.skip_term(torch.eye(c.d_in)).float().T.contiguous()
    return {k: v.contiguous() for k, v in out.items()}


@torch.no_grad()
def check_conversion(tcs, ct: dict, x: torch.Tensor) -> float:
    """The largest difference between mechscope's transcoder output and circuit-tracer's formula on ``x``."""
    worst = 0.0
    for layer, tc in enumerate(tcs):
        p = f"layer{layer}."
        pre = x @ ct[p + "W_enc"].T + ct[p + "b_enc"]
        acts = pre * (pre > ct[p + "threshold"])
        y = acts @ ct[p + "W_dec"] + ct[p + "b_dec"] + (x @ ct[p + "W_skip"].T if p + "W_skip" in ct else 0)
        ref = tc.decode(tc.encode(x)) + tc.skip_term(x)
        worst = max(worst, float((y - ref).abs().max()))
    return worst


def hf_folder() -> Path:
    """The HF folder mechscope converted SmolLM2's GGUF into (what circuit-tracer loads)."""
    from mechscope.loading import convert_gguf, resolve

    kind, src = resolve("smollm2-135m")
    return convert_gguf(Path(src), verbose=False) if kind == "gguf" else Path(src)


def node_keys(kind, layer, pos, index) -> list[tuple]:
    return list(zip(kind.tolist(), layer.tolist(), pos.tolist(), index.tolist()))


def compare(g, work: Path, tag: str = "") -> dict:
    """mechscope's graph against circuit-tracer's dense adjacency, node by node."""
    ct = load_file(str(work / f"ct_graph{tag}.safetensors"))
    A = ct["adjacency"]
    L, n = g.n_layers, g.prompt_tokens.numel()
    feats = ct["features"]
    n_f, n_l = feats.shape[0], ct["logit_ids"].numel()
    ct_keys = ([(0, *map(int, f)) for f in feats] + [(1, l_, p, -1) for l_ in range(L) for p in range(n)]
               + [(2, -1, p, int(t)) for p, t in enumerate(ct["tokens"])] + [(3, L, n - 1, int(t)) for t in ct["logit_ids"]])
    ms_keys = node_keys(g.kind, g.layer, g.pos, g.index)  # (kind, layer, pos, feature or token id)
    where = {key: i for i, key in enumerate(ct_keys)}
    missing = [k for k in ms_keys if k not in where]
    if missing:
        raise SystemExit(f"{len(missing)} mechscope nodes are not in circuit-tracer's graph, e.g. {missing[:3]}")
    perm = torch.tensor([where[k] for k in ms_keys])
    ct_on_ms = A[perm][:, perm]
    ours = g.adjacency.to_dense()
    scale = float(ct_on_ms.abs().max())
    diff = float((ours - ct_on_ms).abs().max())
    top = 50
    a_top = set(ours.flatten().abs().topk(top).indices.tolist())
    b_top = set(ct_on_ms.flatten().abs().topk(top).indices.tolist())
    x, y = ours.flatten(), ct_on_ms.flatten()
    nz = (x != 0) | (y != 0)
    corr = float(torch.corrcoef(torch.stack([x[nz].double(), y[nz].double()]))[0, 1])
    return {"nodes": len(ms_keys), "ct_nodes": A.shape[0], "max_rel_diff": diff / max(scale, 1e-30),
            "top50_overlap": len(a_top & b_top) / top, "corr": corr, "n_features": int((g.kind == 0).sum()),
            "ct_features": n_f, "logits": n_l}


def json_schema(doc: dict) -> dict:
    """Keys and value types of a graph JSON, by node kind."""
    def types(d):
        return {k: type(v).__name__ for k, v in d.items()}

    by_kind = {}
    for node in doc["nodes"]:
        by_kind.setdefault(node["feature_type"], types(node))
    return {"top": sorted(doc), "metadata": types(doc["metadata"]), "qParams": types(doc["qParams"]),
            "nodes": by_kind, "links": types(doc["links"][0]) if doc["links"] else {}}


def json_agreement(a: dict, b: dict) -> str:
    """Node ids, links, link weights and influences of two graph JSON documents, compared."""
    ia, ib = {n["node_id"]: n for n in a["nodes"]}, {n["node_id"]: n for n in b["nodes"]}
    la = {(lk["source"], lk["target"]): lk["weight"] for lk in a["links"]}
    lb = {(lk["source"], lk["target"]): lk["weight"] for lk in b["links"]}
    common = [k for k in la if k in lb]
    dw = max((abs(la[k] - lb[k]) for k in common), default=0.0) / max(max(map(abs, la.values()), default=1.0), 1e-30)
    di = max((abs(ia[k]["influence"] - ib[k]["influence"]) for k in ia if k in ib
              and ia[k]["influence"] is not None and ib[k]["influence"] is not None), default=0.0)
    return (f"same node ids: {set(ia) == set(ib)} ({len(set(ia) ^ set(ib))} differ); same links: {set(la) == set(lb)}; "
            f"largest link-weight difference {dw:.1e} of the largest link; largest influence difference {di:.1e}")


def run_ct(work: Path, cap: int, kind: str = "plt", env: dict | None = None) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env or {})}
    r = subprocess.run([str(CT_PY), str(HERE / "_ct_side.py"), str(work), str(cap), kind], env=env,
                       capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"circuit-tracer side failed:\n{r.stderr[-4000:]}")
    tag = "" if kind == "plt" else f"_{kind}"
    return json.loads((work / f"ct_result{tag}_{cap}.json").read_text())


def random_clt(model, tokens: torch.Tensor, d_sae: int, k: int):
    """A random JumpReLU CLT on every layer (encoders reading hook_resid_mid, as circuit-tracer's CLTs do) whose
    per-feature thresholds let about ``k`` features per layer fire on the prompt."""
    from mechscope.sae import CrossLayerTranscoder, clt_config

    cfg = clt_config(model, d_sae, architecture="jumprelu", normalize_activations="none")
    clt = CrossLayerTranscoder(cfg, seed=0)
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in set(cfg.input_hooks))
    with torch.no_grad():
        for s in range(cfg.n_layers):
            pre = clt.pre_acts_index(s, cache[cfg.input_hooks[s]][0].float())
            thr = pre.quantile(1 - k / d_sae, dim=-1).mean().clamp_min(1e-3)
            clt.log_threshold[s] = (thr * (1 + 0.1 * torch.rand(d_sae, generator=torch.Generator().manual_seed(s)))).log()
            clt.W_dec[s].mul_(0.5)
    return clt


def hub_cache(root: Path, repo: str, folder: Path) -> None:
    """``folder``'s files as a Hugging Face hub cache entry of ``repo`` (blobs, snapshots/<sha>, refs/main)."""
    import hashlib

    base = root / f"models--{repo.replace('/', '--')}"
    sha = hashlib.sha1(repo.encode()).hexdigest()
    for f in folder.iterdir():
        data = f.read_bytes()
        blob = base / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = base / "snapshots" / sha / f.name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(blob)
    (base / "refs").mkdir(parents=True, exist_ok=True)
    (base / "refs" / "main").write_text(sha)


def clt_parity(model, tokens: torch.Tensor, work: Path) -> None:
    """Section 5: a CLT, written by mechscope in circuit-tracer's layout, graphed by both tools on the same tokens."""
    from mechscope.graphs import AttributionGraph
    from mechscope.sae import load_replacement, save_replacement, transcoder_cache

    trained = Path(f"{transcoder_cache(model.cfg.model_name)}-clt") / "clt"
    if trained.is_dir():
        clt, where = load_replacement(trained, model), f"trained by mechscope ({trained})"
    else:
        k, width = int(os.environ.get("BENCH_CLT_K", 8)), int(os.environ.get("BENCH_CLT_WIDTH", 1152))
        clt, where = random_clt(model, tokens, width, k), f"random JumpReLU, {width} features per layer, about {k} " \
                                                        "per layer and token"
    path = save_replacement(clt, work / "ms_clt")
    side = json.loads((path / "mechscope.json").read_text())
    if not side["circuit_tracer_reads_it"]:
        raise SystemExit(f"circuit-tracer cannot read this CLT: {side['why_not']}")
    size = sum(f.stat().st_size for f in path.glob("W_dec_*")) / 2**30
    job = json.loads((work / "job.json").read_text())
    (work / "job.json").write_text(json.dumps({**job, "clt_input_hook": "hook_resid_mid",
                                               "hub_ref": "mechscope/clt-parity"}))
    print(f"\nCLT ({where}): {clt.cfg.n_layers} layers, decoders {size:.2f} GiB on disk (both tools read them lazily)")
    ct = run_ct(work, 0, "clt")
    ms_run = graph_run(work, 0, "ms_clt")
    g = AttributionGraph.load(work / "ms_graph_ms_clt_0.safetensors")
    cmp = compare(g, work, "_clt")
    sc = g.scores()
    print(f"  every active feature traced ({cmp['n_features']} in mechscope, {ct['n_active']} active in circuit-tracer's "
          f"load_clt on mechscope's files), {cmp['nodes']} nodes:")
    print(f"  adjacency: largest difference {cmp['max_rel_diff']:.1e} of the largest edge (goal <= 1e-4: "
          f"{'met' if cmp['max_rel_diff'] <= 1e-4 else 'NOT met'}); top-50 edges overlap {cmp['top50_overlap']:.2f}")
    for name in ("replacement", "completeness"):
        d = abs(sc[name] - ct[name])
        print(f"  {name} score: mechscope {sc[name]:.4f}, circuit-tracer {ct[name]:.4f} (|diff| {d:.1e}; goal <= 1e-3: "
              f"{'met' if d <= 1e-3 else 'NOT met'})")
    print(f"  wall time (2 threads): mechscope {ms_run['seconds']:.1f} s, circuit-tracer {ct['seconds']:.1f} s "
          f"(circuit-tracer's time / mechscope's: {ct['seconds'] / ms_run['seconds']:.2f}x); peak RSS of the whole "
          f"process: mechscope "
          f"{ms_run['peak_rss_gib']:.2f} GiB, circuit-tracer {ct['peak_rss_gib']:.2f} GiB "
          f"({'less' if ms_run['peak_rss_gib'] < ct['peak_rss_gib'] else 'NOT less'})")
    ct_cap, ms_cap = run_ct(work, CAP, "clt"), graph_run(work, CAP, "ms_clt")
    print(f"  cap {CAP:,} features: mechscope {ms_cap['seconds']:.1f} s / {ms_cap['peak_rss_gib']:.2f} GiB peak, "
          f"circuit-tracer {ct_cap['seconds']:.1f} s / {ct_cap['peak_rss_gib']:.2f} GiB "
          f"(circuit-tracer's time / mechscope's: {ct_cap['seconds'] / ms_cap['seconds']:.2f}x)")
    cache = work / "hf_cache"
    hub_cache(cache, "mechscope/clt-parity", path)
    hub = run_ct(work, 0, "hub", {"HF_HUB_CACHE": str(cache), "HF_HOME": str(work / "hf_home")})
    hub_cmp = compare(g, work, "_hub")
    print(f"  the same files as a hub repository, loaded by circuit-tracer's load_transcoder_from_hub (its config.yaml "
          f"read, offline): {hub['n_active']} active features; adjacency against mechscope's graph within "
          f"{hub_cmp['max_rel_diff']:.1e} of the largest edge; replacement score {hub['replacement']:.4f}")


def main() -> None:
    import mechscope as ms
    from mechscope.graphs import AttributionGraph
    from mechscope.graphs.attribute import graph_tokens
    from mechscope.sae import load_transcoders, save_sae, transcoder_cache

    if not CT_PY.exists():
        raise SystemExit("circuit-tracer's venv is missing: run `make bench-ct`")
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", 2)))
    model = ms.load("smollm2-135m")
    tokens, bos = graph_tokens(model, PROMPT)
    if "--clt-only" in sys.argv:  # section 5 alone
        work = Path(tempfile.mkdtemp(prefix="ct-parity-"))
        save_file({"logits": model(tokens)[0].float().detach().contiguous()}, str(work / "ms_logits.safetensors"))
        (work / "job.json").write_text(json.dumps({"tokens": tokens[0].tolist(), "model_folder": str(hf_folder()),
                                                   "skip": False, "batch_size": 128}))
        clt_parity(model, tokens, work)
        print(f"(files kept in {work})")
        return
    folder = transcoder_cache(model.cfg.model_name)
    if folder.is_dir() and all(t.cfg.architecture in ("jumprelu", "batchtopk") for t in load_transcoders(folder)):
        tcs, where = list(load_transcoders(folder, model)), f"trained ({folder})"
    else:
        k = int(os.environ.get("BENCH_K", 24))
        tcs, where = random_transcoders(model, tokens, k), f"random JumpReLU, about {k} features per token"
    work = Path(tempfile.mkdtemp(prefix="ct-parity-"))
    ct_weights = to_circuit_tracer(tcs)
    x = torch.randn(64, model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    print(f"prompt {PROMPT!r}: {tokens.shape[1]} tokens ({bos!r} put in front); transcoders: {len(tcs)} layers, {where}")
    print(f"conversion: circuit-tracer's formula on mechscope's converted weights vs mechscope's transcoders, "
          f"largest output difference {check_conversion(tcs, ct_weights, x):.1e} (64 random inputs)")
    save_file(ct_weights, str(work / "ct_transcoders.safetensors"))
    for tc in tcs:
        save_sae(tc, work / "ms_transcoders" / f"layer_{tc.cfg.hook_name_out.split('.')[1]}")
    save_file({"logits": model(tokens)[0].float().detach().contiguous()}, str(work / "ms_logits.safetensors"))
    (work / "job.json").write_text(json.dumps({"tokens": tokens[0].tolist(), "model_folder": str(hf_folder()),
                                               "skip": bool(tcs[0].cfg.skip), "batch_size": 128}))
    ct_all = run_ct(work, 0)
    print(f"reference model: transformers 4.57 vs mechscope logits, max |diff| {ct_all['hf_vs_mechscope_logits']:.1e}; "
          f"TransformerLens 3.2 vs transformers, {ct_all['transformerlens_vs_hf_logits']:.1e}")
    ms_all = graph_run(work, 0)
    g = AttributionGraph.load(work / "ms_graph_0.safetensors")
    cmp = compare(g, work)
    sc = g.scores()
    print(f"every active feature traced ({cmp['n_features']} in mechscope, {ct_all['n_active']} active in "
          f"circuit-tracer), {cmp['nodes']} nodes:")
    print(f"  adjacency: largest difference {cmp['max_rel_diff']:.1e} of the largest edge (goal <= 1e-4: "
          f"{'met' if cmp['max_rel_diff'] <= 1e-4 else 'NOT met'}); correlation over nonzero entries "
          f"{cmp['corr']:.9f}; top-50 edges overlap {cmp['top50_overlap']:.2f}")
    for name in ("replacement", "completeness"):
        d = abs(sc[name] - ct_all[name])
        print(f"  {name} score: mechscope {sc[name]:.4f}, circuit-tracer {ct_all[name]:.4f} (|diff| {d:.1e}; goal "
              f"<= 1e-3: {'met' if d <= 1e-3 else 'NOT met'}); mechscope's completeness over nodes with inputs "
              f"only: {sc['completeness_inputs']:.4f}" if name == "completeness" else
              f"  {name} score: mechscope {sc[name]:.4f}, circuit-tracer {ct_all[name]:.4f} (|diff| {d:.1e}; goal "
              f"<= 1e-3: {'met' if d <= 1e-3 else 'NOT met'})")
    print(f"  wall time (2 threads): mechscope {ms_all['seconds']:.1f} s, circuit-tracer {ct_all['seconds']:.1f} s "
          f"(circuit-tracer's time / mechscope's: {ct_all['seconds'] / ms_all['seconds']:.2f}x)")
    print(f"  peak RSS of the whole process: mechscope {ms_all['peak_rss_gib']:.2f} GiB (sparse, {ms_all['edges']:,} "
          f"edges), circuit-tracer {ct_all['peak_rss_gib']:.2f} GiB (dense); file: mechscope "
          f"{ms_all['file_bytes'] / 2**20:.0f} MiB, circuit-tracer .pt {ct_all['dense_file_bytes'] / 2**20:.0f} MiB")
    ct_cap, ms_cap = run_ct(work, CAP), graph_run(work, CAP)
    print(f"cap {CAP:,} features: mechscope {ms_cap['seconds']:.1f} s / {ms_cap['peak_rss_gib']:.2f} GiB peak, "
          f"circuit-tracer {ct_cap['seconds']:.1f} s / {ct_cap['peak_rss_gib']:.2f} GiB "
          f"(circuit-tracer's time / mechscope's: {ct_cap['seconds'] / ms_cap['seconds']:.2f}x)")
    ct_json = json.loads((work / "ct_json" / "ct-parity.json").read_text())
    ours = json.loads(g.to_json(work / "ms.json", scan="mechscope-parity").read_text())
    a, b = json_schema(ct_json), json_schema(ours)
    extra = set(b["metadata"]) - set(a["metadata"])
    b["metadata"] = {k: v for k, v in b["metadata"].items() if k not in extra}
    same = a == b
    print(f"graph JSON: circuit-tracer's file ({len(ct_json['nodes'])} nodes, {len(ct_json['links'])} links) and "
          f"mechscope's ({len(ours['nodes'])} nodes, {len(ours['links'])} links) have the same keys and types: {same} "
          f"(mechscope adds metadata {sorted(extra)}, which circuit-tracer's reader ignores)")
    if not same:
        print(json.dumps({"circuit-tracer": a, "mechscope": b}, indent=1))
    print(f"  contents: {json_agreement(ct_json, ours)}")
    if "--write-fixture" in sys.argv:  # the file tests/test_graphs.py reads circuit-tracer's schema from
        FIXTURE.parent.mkdir(parents=True, exist_ok=True)
        FIXTURE.write_text(json.dumps(ct_json, separators=(",", ":")))
    try:
        back = AttributionGraph.from_json(work / "ct_json" / "ct-parity.json")
        print(f"circuit-tracer's JSON read back: {back.n_nodes} nodes, {back.n_edges} edges; "
              f"pruned-graph replacement score {back.scores()['replacement']:.3f}")
    except Exception as e:  # a clash of circuit-tracer's ids is reported, not hidden
        print(f"circuit-tracer's JSON could not be read back: {e}")
    if "--no-clt" not in sys.argv:
        clt_parity(model, tokens, work)
    print(f"(files kept in {work})")


if __name__ == "__main__":
    main()
