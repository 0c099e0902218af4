"""Attribution graphs: the frozen replacement model is exact at the prompt and linear around it; every edge
equals a real perturbation; scores, pruning, the feature budget, files, the picture and bad input."""

from __future__ import annotations

import json

import pytest
import torch

import mechscope as ms
from mechscope.core.errors import InputError
from mechscope.core.linearize import record_frozen
from mechscope.graphs import AttributionGraph, ReplacementModel, attribution_graph
from mechscope.graphs.attribute import RowEngine, active_features
from mechscope.graphs.graph import EMBEDDING, ERROR, FEATURE, LOGIT
from mechscope.graphs.validate import intervene, perturb_sources
from mechscope.sae import SAE, SAEConfig
from tiny import tiny_hf, worded_llama


def transcoders(model, d_sae=48, k=4, skip=True, layers=None, seed=0):
    """Random transcoders (moderate scales: unit decoder rows, a small skip) for every layer or ``layers``."""
    out = []
    for layer in range(model.cfg.n_layers) if layers is None else layers:
        tc = SAE(SAEConfig(d_in=model.cfg.d_model, d_sae=d_sae, architecture="topk", k=k,
                           hook_name=model.mlp_input(layer), hook_name_out=f"blocks.{layer}.hook_mlp_out",
                           skip=skip), seed=seed + layer)
        with torch.no_grad():
            tc.b_enc.fill_(0.05)
            if skip:
                tc.W_skip.normal_(0, 0.05, generator=torch.Generator().manual_seed(seed + layer))
        out.append(tc)
    return out


def prompt(n=7, seed=0):
    return torch.randint(3, 90, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "gemma3", "olmo2", "cohere"])
def test_frozen_model_is_exact_at_the_prompt_and_linear_around_it(arch):
    model = ms.HookedModel(tiny_hf(arch))
    toks = prompt()
    mlp = {}
    names = [f"blocks.{layer}.hook_mlp_out" for layer in range(model.cfg.n_layers)]
    with record_frozen(model) as frozen:
        clean = model.run_with_hooks(toks, fwd_hooks=[(n, lambda a, h: mlp.__setitem__(h.name, a.detach()))
                                                      for n in names])
    with frozen.applied():
        assert torch.equal(model(toks), clean)

    def run(delta):  # MLPs held at their clean outputs: what remains must be linear in the embedding
        with frozen.applied(), model.hooks([("hook_embed", lambda a, h: a + delta)]
                                           + [(n, lambda a, h: mlp[h.name].expand_as(a)) for n in names]):
            return model(toks)

    d = torch.randn(1, toks.shape[1], model.cfg.d_model, generator=torch.Generator().manual_seed(1)) * 0.3
    one, two, zero = run(d), run(2 * d), run(0 * d)
    assert torch.equal(zero, clean)
    assert (one - zero).abs().max() > 1e-2  # the perturbation does move the logits ...
    torch.testing.assert_close(two - zero, 2 * (one - zero), rtol=0, atol=2e-5)  # ... linearly


def test_the_real_nonlinear_model_is_not_linear():  # the check above can fail: without freezing it does
    model = ms.HookedModel(tiny_hf("llama"))
    toks = prompt()
    d = torch.randn(1, toks.shape[1], model.cfg.d_model, generator=torch.Generator().manual_seed(1)) * 0.3
    runs = [model.run_with_hooks(toks, fwd_hooks=[("hook_embed", lambda a, h, c=c: a + c * d)]) for c in (0, 1, 2)]
    assert ((runs[2] - runs[0]) - 2 * (runs[1] - runs[0])).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ["llama", "gpt_neox", "gpt2"])
def test_every_edge_equals_a_real_perturbation_and_targets_are_their_edges_plus_biases(arch):
    model = ms.HookedModel(tiny_hf(arch))
    tcs = transcoders(model, layers=[0, 2]) if arch == "gpt2" else transcoders(model)  # gpt2: layer 1 all error
    g = attribution_graph(model, tcs, prompt(), max_feature_nodes=10_000, batch_size=16, progress=False, certify=0)
    rm = ReplacementModel(model, tcs, prompt())
    assert torch.equal(rm.run(1)[1], rm.logits)  # the replacement model's output is the model's, bit for bit
    idx, val = g.adjacency.indices(), g.adjacency.values()
    assert val.numel() > 200 and set(g.kind[idx[1]].tolist()) == {FEATURE, ERROR, EMBEDDING}
    edges = [(int(t), int(s)) for t, s in idx.T]
    measured = torch.cat([perturb_sources(rm, g, edges[i:i + 256]) for i in range(0, len(edges), 256)])
    scale = float(val.abs().max())
    assert float((measured + val).abs().max()) <= 1e-4 * max(1.0, scale), "an edge differs from its perturbation"
    # a target's value = its incoming edges + the constant left when every source is removed
    targets = torch.unique(idx[0])
    run, _ = rm.run(1)
    zero, _ = rm.run(1, rm.without_sources())
    from mechscope.graphs.validate import _read_targets

    t = targets.tolist()
    rows = torch.zeros(len(t), dtype=torch.long)
    value, const = _read_targets(rm, g, run, t, rows), _read_targets(rm, g, zero, t, rows)
    incoming = torch.zeros(g.n_nodes).index_add_(0, idx[0], val)[targets]
    torch.testing.assert_close(value, const + incoming, rtol=0, atol=1e-4 * max(1.0, scale))


def test_graph_stats_budget_scores_and_pruning():
    model = ms.HookedModel(tiny_hf("llama"))
    tcs = transcoders(model)
    full = attribution_graph(model, tcs, prompt(), max_feature_nodes=10_000, batch_size=32, progress=False)
    assert full.stats["dropped_features"] == 0 and full.stats["dropped_influence"] == 0
    assert full.certificate["n"] > 10 and full.certificate["worst_rel"] < 1e-5
    n_active = full.stats["active_features"]
    assert n_active == len(full.nodes_of(FEATURE)) == 3 * 6 * 4  # 3 layers x 6 positions after the first x k=4
    capped = attribution_graph(model, tcs, prompt(), max_feature_nodes=20, batch_size=8, progress=False)
    assert capped.stats["dropped_features"] == n_active - 20 and len(capped.nodes_of(FEATURE)) == 20
    assert 0 < capped.stats["dropped_influence"] < 1
    # the cap keeps the most influential features: their influence in the full graph beats the rest's
    inf = full.influence()
    key = {(int(full.layer[i]), int(full.pos[i]), int(full.index[i])): float(inf[i]) for i in full.nodes_of(FEATURE)}
    kept = [key[(int(capped.layer[i]), int(capped.pos[i]), int(capped.index[i]))] for i in capped.nodes_of(FEATURE)]
    assert sum(kept) / 20 > sum(key.values()) / n_active
    sc = full.scores()
    assert 0 < sc["replacement"] < 1 and 0 < sc["completeness"] < 1
    pruned = full.prune(0.8, 0.98)
    assert pruned.keep[full.nodes_of(LOGIT)].all() and pruned.keep[full.nodes_of(EMBEDDING)].all()
    n_kept = int((pruned.keep & (full.kind == FEATURE)).sum())
    assert 0 < n_kept < n_active and 0 < int(pruned.edges.sum()) < full.n_edges
    r, c, _ = pruned.kept_entries()
    assert pruned.keep[r].all() and pruned.keep[c].all()  # no kept edge touches a dropped node
    assert full.scores(pruned.keep)["completeness"] <= sc["completeness"] + 1e-6  # dropping features cannot add
    everything = full.prune(1.0, 1.0)
    assert int((everything.keep & (full.kind == FEATURE)).sum()) >= n_kept
    assert full.n_edges > 0 and "replacement score" in full.summary() and "edge certificate" in full.summary()
    d = full.to_dict()
    assert d["n_nodes"] == full.n_nodes and json.dumps(d)


def test_targets_default_to_the_probability_mass_and_can_be_chosen():
    model = ms.HookedModel(tiny_hf("llama"))
    tcs = transcoders(model)
    g = attribution_graph(model, tcs, prompt(), max_feature_nodes=0, progress=False, prob_mass=0.05, max_logits=10)
    with torch.no_grad():
        probs = torch.softmax(model(prompt())[0, -1], -1).sort(descending=True).values
    n = int((probs.cumsum(0) < 0.05).sum()) + 1
    assert len(g.nodes_of(LOGIT)) == min(n, 10) and g.logit_probs[0] == pytest.approx(float(probs[0]))
    mine = attribution_graph(model, tcs, prompt(), target_logits=[5, 7], max_feature_nodes=0, progress=False)
    assert g.index[g.nodes_of(LOGIT)].tolist() != [5, 7] and mine.index[mine.nodes_of(LOGIT)].tolist() == [5, 7]


def test_save_and_load_round_trip(tmp_path):
    model = ms.HookedModel(tiny_hf("llama"))
    g = attribution_graph(model, transcoders(model), prompt(), progress=False)
    back = AttributionGraph.load(g.save(tmp_path / "g.safetensors"))
    assert torch.equal(back.adjacency.to_dense(), g.adjacency.to_dense()) and back.summary() == g.summary()
    (tmp_path / "bad.safetensors").write_bytes(b"not a graph")
    with pytest.raises(FileNotFoundError, match="damaged"):
        AttributionGraph.load(tmp_path / "bad.safetensors")


def test_intervening_in_the_real_model():
    model = ms.HookedModel(tiny_hf("llama"))
    tcs = transcoders(model)
    for tc in tcs:  # small writes: the real final norm then stays near its frozen scale
        with torch.no_grad():
            tc.W_dec.mul_(0.01)
    g = attribution_graph(model, tcs, prompt(), progress=False)
    last = [int(i) for i in g.nodes_of(FEATURE) if int(g.layer[i]) == 2 and int(g.pos[i]) == 6][:3]
    assert len(last) == 3  # the last layer at the last position: only the final norm lies between them and the logits
    none = intervene(model, g, tcs, last, scale=1.0)
    assert max(map(abs, none.measured)) == 0
    res = intervene(model, g, tcs, last, scale=0.0)
    measured, predicted = torch.tensor(res.measured), torch.tensor(res.predicted_graph)
    assert measured.abs().max() > 1e-2
    torch.testing.assert_close(predicted, torch.tensor(res.predicted_direct))  # no feature lies in between
    assert torch.corrcoef(torch.stack([measured, predicted]))[0, 1] > 0.9 and "measured" in res.summary()


def test_bad_input_is_named():
    model = ms.HookedModel(tiny_hf("llama"))
    tcs = transcoders(model)
    sae = SAE(SAEConfig(d_in=32, d_sae=16, k=4, hook_name="blocks.0.hook_resid_post"))
    with pytest.raises(InputError, match="not a transcoder"):
        attribution_graph(model, [sae], prompt(), progress=False)
    with pytest.raises(InputError, match="one prompt"):
        attribution_graph(model, tcs, torch.randint(3, 90, (2, 5)), progress=False)
    with pytest.raises(InputError, match="target_logits"):
        attribution_graph(model, tcs, prompt(), target_logits=[10_000], progress=False)
    with pytest.raises(InputError, match="two transcoders"):
        attribution_graph(model, [tcs[0], tcs[0]], prompt(), progress=False)
    g = attribution_graph(model, tcs, prompt(), progress=False)
    with pytest.raises(InputError, match="node_threshold"):
        g.prune(node_threshold=0)
    with pytest.raises(InputError, match="feature nodes"):
        intervene(model, g, tcs, [int(g.nodes_of(LOGIT)[0])])


def test_rows_come_from_batched_backward_passes():
    model = ms.HookedModel(tiny_hf("llama"))
    rm = ReplacementModel(model, transcoders(model), prompt())
    eng = RowEngine(rm, active_features(rm))
    feats = eng.src.feats[-6:]
    targets = [("feature", int(a), int(b), int(c)) for a, b, c in feats] + [("logit", -1, -1, 5)]
    together = eng.rows(targets)
    alone = torch.cat([eng.rows([t]) for t in targets])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6 * float(alone.abs().max()))  # float rounding
    torch.testing.assert_close(eng._rows(targets), alone, rtol=1e-5, atol=1e-6 * float(alone.abs().max()))


def test_rows_of_mixed_depth_run_in_groups_of_least_cost(monkeypatch):
    import itertools

    from mechscope.graphs import attribute as A

    def cost(groups, depths, P):
        return sum(A.CALL_COST + max(depths[i] for i in g) * (A.BLOCK_COST + len(g) * P) for g in groups)

    rng = torch.Generator().manual_seed(0)
    for trial in range(30):
        depths = torch.randint(1, 7, (int(torch.randint(1, 12, (1,), generator=rng)),), generator=rng).tolist()
        P = [1, 10, 200][trial % 3]
        groups = A.depth_groups(depths, P)
        assert sorted(i for g in groups for i in g) == list(range(len(depths)))
        levels = sorted(set(depths))  # every split of the sorted depth levels into runs: none is cheaper
        for cuts in itertools.product([0, 1], repeat=len(levels) - 1):
            runs, cur = [], [levels[0]]
            for lv, c in zip(levels[1:], cuts):
                if c:
                    runs.append(cur)
                    cur = []
                cur.append(lv)
            split = [[i for i, d in enumerate(depths) if d in r] for r in runs + [cur]]
            assert cost(groups, depths, P) <= cost(split, depths, P) + 1e-9
    assert len(A.depth_groups([1] * 50 + [30] * 50, 10)) == 2 and len(A.depth_groups([29, 30], 10)) == 1
    monkeypatch.setattr(A, "CALL_COST", 0)  # free calls: every depth is a group of its own, the floor
    model = ms.HookedModel(tiny_hf("llama"))
    rm = ReplacementModel(model, transcoders(model), prompt())
    eng = RowEngine(rm, active_features(rm))
    targets = [("feature", int(a), int(b), int(c)) for a, b, c in eng.src.feats] + [("logit", -1, -1, 5)]
    from mechscope.core.work import WorkMeter

    with WorkMeter(model) as meter:
        split = eng.rows(targets)
    assert meter.backward == meter.backward_floor and len({eng.depth(t) for t in targets}) > 1
    one = eng._rows(targets)
    torch.testing.assert_close(split, one, rtol=1e-5, atol=1e-6 * float(one.abs().max()))


def test_a_graph_meters_its_passes_and_its_backward_rows():
    from mechscope.core.work import WorkMeter

    model = ms.HookedModel(tiny_hf("llama"))
    L, toks, tcs = model.cfg.n_layers, prompt(), transcoders(model)
    logs = {}
    for batch in (1, 64):
        with WorkMeter(model) as meter:
            g = attribution_graph(model, tcs, toks, batch_size=batch, certify=8, progress=False)
        logs[batch] = {s.name: s for s in meter.log.stages}
    one, many, P = logs[1], logs[64], len(g.token_strs)
    assert one["graph: the real model's clean pass"].token_layers == P * L  # one pass each, the floor
    assert one["graph: the replacement model's forward"].ratio == 1.0
    rows = one["graph: rows (batched backward passes)"]
    # one row a batch: each runs back from its own target only, so the backward work is its floor
    assert rows.backward == rows.backward_floor > 0 and rows.token_layers == 0
    n_rows = len(g.nodes_of(LOGIT)) + g.stats["feature_nodes"]
    assert P * n_rows <= rows.backward_floor <= P * n_rows * L
    wide = many["graph: rows (batched backward passes)"]
    assert wide.backward_floor == rows.backward_floor and wide.backward >= wide.backward_floor
    cert = one["graph: edge certificate"]
    assert cert.floor == g.certificate["n"] * P * L and cert.token_layers == cert.floor + P * L  # + the base run
    text = meter.log.summary()
    assert "backward" in text and "graph: edge certificate" in text
    d = meter.log.to_dict()
    assert any("backward_ratio" in s for s in d["stages"]) and d["backward"] == wide.backward


def test_the_picture_is_offline_escaped_and_interactive(tmp_path):
    from mechscope.graphs.html import graph_html

    model = ms.HookedModel(tiny_hf("llama"))
    g = attribution_graph(model, transcoders(model), prompt(), progress=False)
    g.token_strs[3] = "<script>alert(1)</script>"
    g.labels[int(g.nodes_of(FEATURE)[0])] = "</script><b>x</b>"
    pruned = g.prune()
    out = graph_html(pruned, {int(g.nodes_of(FEATURE)[0]): "<i>dash</i>"})
    assert "<script>alert(1)" not in out and "&lt;script&gt;alert(1)" in out
    assert "</script><b>" not in out  # the label travels inside the JSON with '</' escaped
    assert "http://" not in out and "https://" not in out  # nothing is fetched
    n_marks = out.count("class='ms-node'")
    r, c, _ = pruned.kept_entries()
    touched = torch.zeros(g.n_nodes, dtype=torch.bool)
    touched[r] = touched[c] = True
    shown = int((pruned.keep & (g.kind == FEATURE) & touched).sum())
    assert n_marks >= shown + len(g.nodes_of(LOGIT)) and out.count("<line ") == min(800, int(pruned.edges.sum()))
    assert "ms-graph-data" in out and "addEventListener('click'" in out


def test_cli_graph_writes_html_and_json(tmp_path, monkeypatch, capsys):
    from mechscope.cli import main
    from mechscope.sae import save_sae

    model = worded_llama()
    for tc in transcoders(model):
        save_sae(tc, tmp_path / "tc" / f"layer_{tc.cfg.hook_name_out.split('.')[1]}")
    monkeypatch.setattr(ms, "load", lambda *a, **k: model)
    args = ["graph", "t5 t6 t7 t8 t9", "--transcoders", str(tmp_path / "tc"), "--html", str(tmp_path / "g.html"),
            "--save", str(tmp_path / "g.safetensors"), "--target", " t9", " t8", "--quiet", "--json",
            "--json-graph", str(tmp_path / "np.json"), "--scan", "toy-tc"]
    assert main(args) == 0
    np_doc = json.loads((tmp_path / "np.json").read_text())
    assert np_doc["metadata"]["scan"] == "toy-tc" and np_doc["links"]
    out, err = capsys.readouterr()
    d = json.loads(out)
    assert d["n_nodes"] > 10 and d["pruned"]["features_kept"] > 0 and d["certificate"]["worst_rel"] < 1e-5
    assert [t.strip() for t in d["token_labels"]] == ["t9", "t8"] and err == ""
    assert {s["name"] for s in d["work"]["stages"]} >= {"graph: rows (batched backward passes)"}
    assert "ms-graph" in (tmp_path / "g.html").read_text()
    assert AttributionGraph.load(tmp_path / "g.safetensors").n_nodes == d["n_nodes"]
    assert main(["graph", "t5 t6", "--transcoders", str(tmp_path / "none"), "--quiet"]) == 2
    assert "no transcoder folder" in capsys.readouterr().err
    assert main(["graph", "t5 t6", "--transcoders", str(tmp_path / "tc"), "--target", " t9 t8", "--quiet"]) == 2
    assert "single tokens" in capsys.readouterr().err


@pytest.mark.slow
def test_graph_on_the_default_model_is_exact(smollm):
    """SmolLM2 with random transcoders on every layer (exactness does not depend on training): the replacement
    model returns the model's logits bit for bit, and sampled edges equal perturbations to 1e-4."""
    tcs = transcoders(smollm, d_sae=512, k=16)
    text = "The capital of the state containing Dallas is"
    g = attribution_graph(smollm, tcs, text, max_feature_nodes=256, batch_size=128, certify=64, progress=False)
    # SmolLM2's tokenizer adds no BOS: one is put in front, so every word of the prompt has features
    assert g.prompt_tokens[0] == smollm.tokenizer.bos_token_id and g.stats["prepended_bos"] == "<|im_start|>"
    assert g.stats["active_features"] == 30 * len(smollm.to_tokens(text)[0]) * 16  # the BOS position left out
    assert g.certificate["n"] == 64 and g.certificate["worst_abs"] < 1e-4, g.certificate["worst_abs"]
    rm = ReplacementModel(smollm, tcs, g.prompt_tokens[None])
    assert torch.equal(rm.run(1)[1], rm.logits)  # bit for bit against the pattern-recording pass ...
    plain = smollm(g.prompt_tokens[None])
    assert 0 <= float((plain - rm.logits).abs().max()) < 1e-3  # ... and to float rounding against plain SDPA
    # the BOS changes what this chat model predicts here (" Texas" without it): the graph explains the model's
    # own top token on the tokens it was given
    assert g.token_labels[0] == smollm.to_str_tokens(plain[0, -1].argmax()[None])[0] == " the"


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt2"])
def test_qk_attribution_splits_the_score_exactly(arch):
    from mechscope.graphs.qk import qk_attribution

    model = ms.HookedModel(tiny_hf(arch))
    toks = prompt()
    tcs = transcoders(model)
    for tc in tcs:  # writes on the residual stream's own scale (random ones are far larger: parts cancel by 1e4)
        with torch.no_grad():
            tc.W_dec.mul_(0.01)
    rm = ReplacementModel(model, tcs, toks)
    scores = {}
    with torch.no_grad():
        model.run_with_hooks(toks, fwd_hooks=[("blocks.2.attn.hook_attn_scores",
                                               lambda a, h: scores.__setitem__("s", a.detach()))])
    res = qk_attribution(rm, 2, 1, q_pos=6, k_pos=3)
    assert res.score == pytest.approx(float(scores["s"][0, 1, 6, 3]), abs=1e-5)  # the model's own score
    # Q_0 and K_0 equal the query and key with every source removed: the split is linear. The bound is fp32
    # rounding of the largest part (Qwen3's q/k norms leave pairs of transcoder errors near +-4e3 that cancel)
    largest = max(abs(v) for _, v in res.query_side + res.key_side + [(None, p[-1]) for p in res.pairs])
    assert res.check < max(1e-4, 1e-6 * largest), (res.check, largest)
    assert len(res.query_side) == 10 and len(res.pairs) == 10 and "query side" in res.summary()
    assert any(n.startswith("L") for n, _ in res.query_side + res.key_side)
    with pytest.raises(InputError, match="k_pos <= q_pos"):
        qk_attribution(rm, 2, 1, q_pos=2, k_pos=3)


def test_faithfulness_curve_of_a_graph(tmp_path):
    from mechscope.graphs import graph_curve

    model = ms.HookedModel(tiny_hf("llama"))
    tcs = transcoders(model)
    for tc in tcs:
        with torch.no_grad():
            tc.W_dec.mul_(0.01)
    g = attribution_graph(model, tcs, prompt(), progress=False)
    cv = graph_curve(model, g, tcs, n_random=2)
    n = len(g.nodes_of(FEATURE))
    assert cv.sizes[-1] == n and set(cv.curves) == {"influence", "activation"}
    for c in cv.curves.values():  # every feature kept: nothing removed, exactly 1
        assert c[-1].value == pytest.approx(1.0)
    assert cv.random[-1] == pytest.approx(1.0) and len(set(round(e.value, 6) for e in cv.curves["influence"])) > 2
    sc = cv.scores
    assert 0 <= sc["random"]["cmd"] and "CPR" in cv.summary() and cv.plot(tmp_path / "c.png").stat().st_size > 1000


def test_the_demo_adds_a_graph_when_transcoders_are_cached(tmp_path, monkeypatch):
    from mechscope.sae import save_sae, transcoder_cache
    from mechscope.workflows import Report
    from mechscope.workflows.investigate import graph_section

    model = worded_llama()
    monkeypatch.setenv("MECHSCOPE_CACHE", str(tmp_path / "cache"))
    rep = Report("t", echo=False)
    graph_section(rep, model, tmp_path, prompt="t5 t6 t7 t8 t9")  # nothing cached yet: a pointer, no graph
    assert "transcoders train" in rep.sections[0].text and not rep.findings
    for tc in transcoders(model):
        save_sae(tc, transcoder_cache(model.cfg.model_name) / f"layer_{tc.cfg.hook_name_out.split('.')[1]}")
    rep = Report("t", echo=False)
    graph_section(rep, model, tmp_path, prompt="t5 t6 t7 t8 t9")
    assert (tmp_path / "graph.html").stat().st_size > 1000 and len(rep.findings) == 2
    assert rep.findings[0].holds and rep.metrics["graph_certificate_worst_rel"] < 1e-4


def test_sparse_influence_equals_the_dense_series_and_tolerance_drops_small_edges():
    from mechscope.graphs.html import _top_per_group

    model = ms.HookedModel(tiny_hf("llama"))
    tcs = transcoders(model)
    g = attribution_graph(model, tcs, prompt(), progress=False)
    a = g.adjacency.to_dense().abs()
    a = a / a.sum(1, keepdim=True).clamp_min(1e-30)
    _w, dense, cur = g.logit_weights(), torch.zeros(g.n_nodes), g.logit_weights()
    for _ in range(g.n_layers + 2):
        cur = cur @ a
        dense += cur
    torch.testing.assert_close(g.influence(), dense, rtol=1e-5, atol=1e-7)
    assert g.stats["edge_weight_dropped"] == 0
    thin = attribution_graph(model, tcs, prompt(), edge_tolerance=0.2, progress=False)
    assert thin.n_edges < g.n_edges and 0 < thin.stats["edge_weight_dropped"] < 0.5
    assert thin.certificate["worst_rel"] < 1e-5  # the edges kept are still exact
    keys, strength = torch.tensor([2, 1, 2, 2, 1]), torch.tensor([0.1, 0.5, 0.9, 0.3, 0.7])
    assert _top_per_group(keys, strength, 2).tolist() == [4, 1, 2, 3]  # key 1: 0.7, 0.5; key 2: 0.9, 0.3


def _dense_ct_scores(g):
    """circuit-tracer 0.5's ``compute_graph_scores``, written out densely (its formulas, not mechscope's code)."""
    a = g.adjacency.to_dense().abs()
    a = a / a.sum(1, keepdim=True).clamp(min=1e-10)
    w = g.logit_weights()
    cur, inf = w @ a, torch.zeros(g.n_nodes)
    while cur.any():
        inf, cur = inf + cur, cur @ a
    err, tok = g.kind == ERROR, g.kind == EMBEDDING
    replacement = inf[tok].sum() / (inf[tok].sum() + inf[err].sum())
    out = inf + w
    return float(replacement), float(((1 - a[:, err].sum(-1)) * out).sum() / out.sum())


def test_scores_follow_circuit_tracer_and_the_sink_errors_are_zeroed_by_default():
    model = ms.HookedModel(tiny_hf("llama"))
    tcs = transcoders(model)
    g = attribution_graph(model, tcs, prompt(), progress=False, certify=0)
    rep, comp = _dense_ct_scores(g)
    sc = g.scores()
    assert sc["replacement"] == pytest.approx(rep, rel=1e-4) and sc["completeness"] == pytest.approx(comp, rel=1e-4)
    assert sc["completeness_inputs"] < sc["completeness"]  # nodes without inputs count as complete only in the first
    r, c, _ = g.entries()
    at_sink = (g.kind[c.long()] == ERROR) & (g.pos[c.long()] == 0)
    assert not at_sink.any() and g.stats["sink_errors"] is False
    kept = attribution_graph(model, tcs, prompt(), progress=False, certify=16, sink_errors=True)
    r, c, _ = kept.entries()
    assert ((kept.kind[c.long()] == ERROR) & (kept.pos[c.long()] == 0)).any()
    assert kept.scores()["replacement"] < sc["replacement"]  # the sink's errors take influence from the embeddings
    assert kept.certificate["worst_rel"] < 1e-5 and "sink_errors=True" in kept.summary()


def test_edges_are_stored_once_sorted_and_in_int32():
    model = ms.HookedModel(tiny_hf("llama"))
    g = attribution_graph(model, transcoders(model), prompt(), progress=False, certify=0)
    t, s, w = g.entries()
    assert t.dtype == s.dtype == torch.int32 and w.dtype == torch.float32 and (w != 0).all()
    key = t.long() * g.n_nodes + s.long()
    assert (key[1:] > key[:-1]).all()  # sorted by target then source, no duplicates
    dense = g.adjacency.to_dense()
    assert int((dense != 0).sum()) == g.n_edges and torch.equal(dense[t.long(), s.long()], w)
    shuffled = torch.randperm(g.n_edges, generator=torch.Generator().manual_seed(0))
    again = AttributionGraph(g.prompt_tokens, g.token_strs, g.kind, g.layer, g.pos, g.index, g.value, t[shuffled],
                             s[shuffled], w[shuffled], g.logit_probs, g.stats, g.n_layers, g.token_labels)
    assert torch.equal(again.entries()[2], w) and again.scores() == g.scores()


def test_a_bos_like_token_is_put_in_front_when_the_prompt_has_none():
    from mechscope.graphs.attribute import graph_tokens

    model = worded_llama()
    with_bos, added = graph_tokens(model, "t5 t6 t7")
    assert added is None and with_bos[0, 0] in model.tokenizer.all_special_ids  # the toy tokenizer adds one itself
    bare = with_bos[:, 1:]
    toks, added = graph_tokens(model, bare)
    assert added == "<bos>" and torch.equal(toks, with_bos)  # BOS id 0 counts (circuit-tracer's filter would skip it)
    assert torch.equal(graph_tokens(model, bare, prepend_bos=False)[0], bare)
    g = attribution_graph(model, transcoders(model), bare, progress=False, certify=0)
    assert g.prompt_tokens.numel() == bare.shape[1] + 1 and "put in front" in g.summary()
    with pytest.raises(InputError, match=r"\[1, pos\]"):
        graph_tokens(model, torch.zeros(2, 3, dtype=torch.long))


CT_NODE_KEYS = {"node_id": str, "feature": int, "layer": str, "ctx_idx": int, "feature_type": str, "token_prob": float,
                "is_target_logit": bool, "run_idx": int, "reverse_ctx_idx": int, "jsNodeId": str, "clerp": str,
                "influence": (float, type(None)), "activation": (float, type(None))}  # circuit-tracer 0.5's Node


def test_graph_json_has_circuit_tracers_schema_and_reads_back(tmp_path):
    model = worded_llama()
    g = attribution_graph(model, transcoders(model), "t5 t6 t7 t8 t9 t10", progress=False, certify=0)
    g.labels[int(g.top_features(1)[0])] = "fires on <t9> & friends"
    path = g.to_json(tmp_path / "g.json", scan="toy-scan")
    doc = json.loads(path.read_text())
    assert set(doc) == {"metadata", "qParams", "nodes", "links"}
    assert set(doc["metadata"]) == {"slug", "scan", "transcoder_list", "prompt_tokens", "prompt", "node_threshold",
                                    "schema_version", "mechscope"} and doc["metadata"]["slug"] == "g"
    for node in doc["nodes"]:
        assert set(node) == set(CT_NODE_KEYS) and all(isinstance(node[k], t) for k, t in CT_NODE_KEYS.items())
    assert {n["feature_type"] for n in doc["nodes"]} >= {"cross layer transcoder", "embedding", "logit"}
    assert sum(n["is_target_logit"] for n in doc["nodes"]) == 1
    pruned = g.prune()
    assert len(doc["links"]) == int(pruned.edges.sum())
    back = AttributionGraph.from_json(path)
    assert back.n_edges == len(doc["links"]) and back.n_layers == g.n_layers and back.token_strs == g.token_strs
    assert torch.equal(back.prompt_tokens, g.prompt_tokens)
    assert sorted(back.edge_weight.tolist()) == sorted(pruned.kept_entries()[2].tolist())
    assert "fires on <t9> & friends" in back.labels.values() and "read from" in back.summary()
    torch.testing.assert_close(back.logit_probs, g.logit_probs)
    back.prune()  # the viewer and checks run on a graph read back
    # the scores of the graph read back are the pruned graph's, as drawn (they moved before the totals were written)
    for name, value in pruned.scores().items():
        assert abs(back.scores()[name] - value) < 1e-6, name
    assert back.stats["scores_of"].startswith("the pruned graph as drawn")
    assert pruned.scores()["replacement"] < g.scores()["replacement"] + 1e-6  # dropping cannot explain more
    bare = json.loads(path.read_text())
    del bare["metadata"]["mechscope"]  # a file written by circuit-tracer has no totals: the drawn edges alone
    (tmp_path / "bare.json").write_text(json.dumps(bare))
    plain = AttributionGraph.from_json(tmp_path / "bare.json")
    assert plain.stats["scores_of"].startswith("the drawn edges alone")
    assert plain.scores()["replacement"] >= back.scores()["replacement"] - 1e-6
    doc["nodes"][0]["feature_type"] = "attention head"
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(InputError, match="unknown feature_type 'attention head'"):
        AttributionGraph.from_json(tmp_path / "bad.json")
    doc["nodes"][0]["feature_type"] = "cross layer transcoder"
    doc["nodes"][0]["node_id"] = "L3_F7"
    (tmp_path / "bad_id.json").write_text(json.dumps(doc))
    with pytest.raises(InputError, match="not circuit-tracer's form"):
        AttributionGraph.from_json(tmp_path / "bad_id.json")
    (tmp_path / "none.json").write_text("[1, 2]")
    with pytest.raises(InputError, match="needs 'metadata'"):
        AttributionGraph.from_json(tmp_path / "none.json")


def _dense_ct_prune(g, node_threshold, edge_threshold):
    """circuit-tracer 0.5's ``prune_graph``, written out densely (its formulas, not mechscope's code)."""
    def norm(m):
        m = m.abs()
        return m / m.sum(1, keepdim=True).clamp(min=1e-10)

    def infl(m, w):
        cur, out = w @ m, torch.zeros(m.shape[0])
        while cur.any():
            out, cur = out + cur, cur @ m
        return out

    def thr(s, t):
        v = s.sort(descending=True).values
        cum = v.cumsum(0) / v.sum()
        return v[min(int(torch.searchsorted(cum, t)), len(cum) - 1)]

    A, w = g.adjacency.to_dense(), g.logit_weights()
    inf = infl(norm(A), w)
    node = inf >= thr(inf, node_threshold)
    node |= (g.kind == EMBEDDING) | (g.kind == LOGIT)
    P = A.clone()
    P[~node] = 0
    P[:, ~node] = 0
    sc = norm(P) * (infl(norm(P), w) + w)[:, None]
    edge = (sc >= thr(sc.flatten(), edge_threshold)) & (A != 0)
    sends, feat = (g.kind == FEATURE) | (g.kind == ERROR), g.kind == FEATURE
    old = None
    while old is None or not torch.equal(old, node):
        old = node.clone()
        edge[~node] = False
        edge[:, ~node] = False
        node = node & (~sends | edge.any(0)) & (~feat | edge.any(1))
    return node, edge


@pytest.mark.parametrize("thresholds", [(0.8, 0.98), (0.5, 0.9)])
def test_pruning_is_circuit_tracers_rule(thresholds):
    model = ms.HookedModel(tiny_hf("llama"))
    g = attribution_graph(model, transcoders(model), prompt(), progress=False, certify=0)
    node, edge = _dense_ct_prune(g, *thresholds)
    pg = g.prune(*thresholds)
    r, c, _ = g.entries()
    assert torch.equal(pg.keep, node) and torch.equal(pg.edges, edge[r.long(), c.long()])
    assert not pg.keep[g.kind == ERROR].all()  # error nodes can be pruned, unlike the earlier rule
    old = g.prune(*thresholds, features_only=True)
    assert old.keep[g.kind == ERROR].all() and not torch.equal(old.keep, pg.keep)
    touched = torch.zeros(g.n_nodes, dtype=torch.bool)  # the earlier rule drops only features with no kept edge
    touched[r[old.edges].long()] = True
    touched[c[old.edges].long()] = True
    assert touched[old.keep & (g.kind == FEATURE)].all()


CT_FIXTURE = __import__("pathlib").Path(__file__).parent / "fixtures" / "circuit_tracer_0_5" / "graph.json"


def test_circuit_tracer_0_5s_own_graph_json_reads_back_and_has_our_schema(tmp_path):
    doc = json.loads(CT_FIXTURE.read_text())  # written by circuit-tracer 0.5.0 (bench/bench_circuit_tracer.py)
    g = AttributionGraph.from_json(CT_FIXTURE)
    assert g.n_nodes == len(doc["nodes"]) and g.n_edges == len(doc["links"]) > 1000
    assert g.n_layers == 30 and g.token_strs[0] == "<|im_start|>" and (g.prompt_tokens >= 0).all()
    kinds = {n["feature_type"] for n in doc["nodes"]}
    assert all((g.kind == k).any() for k in range(4)) and len(kinds) == 4
    weights = sorted(lk["weight"] for lk in doc["links"])
    torch.testing.assert_close(g.edge_weight.sort().values, torch.tensor(weights))
    assert 0 < g.scores()["replacement"] < 1 and g.prune().keep.any()
    # mechscope's file has circuit-tracer's keys, and for each kind of node its value types
    model = worded_llama()
    ours = json.loads(attribution_graph(model, transcoders(model), "t5 t6 t7 t8", progress=False,
                                        certify=0).to_json(tmp_path / "m.json").read_text())

    def types(nodes):
        return {n["feature_type"]: {k: type(v).__name__ for k, v in n.items()} for n in nodes}

    assert set(ours) == set(doc) and set(ours["metadata"]) == set(doc["metadata"]) | {"mechscope"}
    assert set(ours["qParams"]) == set(doc["qParams"]) and set(ours["links"][0]) == set(doc["links"][0])
    theirs = types(doc["nodes"])
    for kind, t in types(ours["nodes"]).items():
        assert t == theirs[kind], kind


def test_feature_labels_lead_with_an_autointerp_explanation():
    """label_features: a feature with an explanation (sae explain, read by load_sae) is labelled by it, then its
    top tokens; the others by their top tokens alone."""
    from mechscope.graphs.labels import label_features

    model = worded_llama()
    tcs = transcoders(model)
    g = attribution_graph(model, tcs, prompt(), max_feature_nodes=12, batch_size=16, progress=False, certify=0)
    feats = g.nodes_of(FEATURE)[:4]
    n0 = int(feats[0])
    tc = next(t for t in tcs if int(t.cfg.hook_name_out.split(".")[1]) == int(g.layer[n0]))
    tc.explanations = {int(g.index[n0]): "the word after a name"}
    label_features(model, g, tcs, torch.randint(5, 90, (8, 12)), nodes=feats, progress=False)
    assert g.labels[n0].startswith("the word after a name [")
    assert all(not g.labels[int(n)].startswith("the word after") for n in feats[1:] if int(g.index[n]) != int(g.index[n0])
               or int(g.layer[n]) != int(g.layer[n0]))


def test_mean_path_length_counts_edges_from_the_embeddings():
    """On a chain embedding -> feature -> logit the length is 2; adding a direct embedding -> logit edge of the same
    normalised weight makes it 1.5; a model with no features gives 1 (every path a direct edge)."""
    kind = torch.tensor([FEATURE, EMBEDDING, LOGIT])
    layer = torch.tensor([0, -1, 1])

    def graph(tgt, src, w):
        return AttributionGraph(torch.tensor([5]), ["x"], kind, layer, torch.zeros(3, dtype=torch.long),
                                torch.tensor([0, 5, 7]), torch.tensor([1.0, 1.0, 1.0]), torch.tensor(tgt),
                                torch.tensor(src), torch.tensor(w), torch.tensor([1.0]), {}, 1, ["y"])

    assert graph([0, 2], [1, 0], [1.0, 1.0]).mean_path_length() == pytest.approx(2.0)
    assert graph([0, 2, 2], [1, 0, 1], [1.0, 1.0, 1.0]).mean_path_length() == pytest.approx(1.5)
    model = ms.HookedModel(tiny_hf("llama"))
    g = attribution_graph(model, [], prompt(), progress=False, certify=0)
    assert g.mean_path_length() == pytest.approx(1.0)
    full = attribution_graph(model, transcoders(model), prompt(), progress=False, certify=0)
    assert 1.0 < full.mean_path_length() < model.cfg.n_layers + 2


def test_a_graph_json_with_a_bad_link_is_refused_naming_the_file_and_the_link(tmp_path):
    """A link without a weight once raised KeyError: weight, and a file with every link reversed was accepted and
    failed later inside summary()."""
    model = worded_llama()
    path = attribution_graph(model, transcoders(model), "t5 t6 t7 t8", progress=False, certify=0).to_json(
        tmp_path / "g.json")
    doc = json.loads(path.read_text())
    assert AttributionGraph.from_json(path).summary()  # the control: the file as written reads back

    def write(name, change):
        d = json.loads(json.dumps(doc))
        change(d)
        (tmp_path / name).write_text(json.dumps(d))
        return tmp_path / name

    no_weight = write("w.json", lambda d: d["links"][3].pop("weight"))
    with pytest.raises(InputError, match=r"w.json: link 3 .* needs source, target and weight"):
        AttributionGraph.from_json(no_weight)
    text_weight = write("t.json", lambda d: d["links"][0].update(weight="big"))
    with pytest.raises(InputError, match=r"link 0 .* has weight 'big'"):
        AttributionGraph.from_json(text_weight)

    def reverse(d):
        for lk in d["links"]:
            lk["source"], lk["target"] = lk["target"], lk["source"]

    with pytest.raises(InputError, match=r"r.json: link 0 runs from .*source and target swapped"):
        AttributionGraph.from_json(write("r.json", reverse))
