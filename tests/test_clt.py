"""Cross-layer transcoders: the sparse training path against the dense one, per-layer transcoders as a reach-1 CLT
against the plain TranscoderSet path, CLT graphs whose every edge is a real perturbation, interventions and QK
through a CLT, training that learns and resumes bit for bit, evaluation, and bad input."""

from __future__ import annotations

import pytest
import torch

import mechscope as ms
from dist_worker import CLT_JOBS, clt_configs, planted_clt_rows
from mechscope.core.errors import InputError
from mechscope.core.hookpoints import act_name
from mechscope.graphs import ReplacementModel, attribution_graph, intervene, qk_attribution
from mechscope.graphs.graph import EMBEDDING, ERROR, FEATURE
from mechscope.graphs.validate import _read_targets, graph_curve, perturb_sources
from mechscope.sae import (
    SAE,
    CLTConfig,
    CrossLayerTranscoder,
    SAEConfig,
    TrainConfig,
    TranscoderSet,
    clt_config,
    evaluate_clt,
    fit_sae,
    train_clt,
)
from mechscope.sae.evaluate import clt_hooks
from tiny import random_clt, tiny_hf, worded_llama


def prompt(n=7, seed=0):
    return torch.randint(3, 90, (1, n), generator=torch.Generator().manual_seed(seed))


def toy_cfg(arch="topk", tied=False, skip=True, reach=0, n=4, d=16, F=32):
    return CLTConfig(d_model=d, d_sae=F, layers=tuple(range(n)), input_hooks=tuple(act_name("resid_mid", i) for i in range(n)),
                     output_hooks=tuple(act_name("mlp_out", i) for i in range(n)), architecture=arch, k=4, tied=tied,
                     skip=skip, reach=reach, jumprelu_bandwidth=0.5)


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu"])
@pytest.mark.parametrize("tied", [False, True])
def test_the_sparse_kernels_equal_the_dense_maths(arch, tied):
    """Loss, firing counts and every gradient (the JumpReLU thresholds' straight-through ones and AuxK's included) of
    the sparse path equal the dense computation of the same formula."""
    a, b = CrossLayerTranscoder(toy_cfg(arch, tied), seed=1), CrossLayerTranscoder(toy_cfg(arch, tied), seed=1)
    rows = torch.randn(64, 2 * 4 * 16, generator=torch.Generator().manual_seed(2))
    a.init_from_sample(rows)
    with torch.no_grad():
        for w in a.W_skip:
            w.normal_(0, 0.1)
    b.load_state_dict(a.state_dict())
    dead = torch.zeros(4 * 32, dtype=torch.bool)
    dead[::3] = True
    ta, tb = a.step_loss(rows, 0, dead, sparse=True), b.step_loss(rows, 0, dead, sparse=False)
    ta.loss.backward()
    tb.loss.backward()
    assert float(ta.loss.detach()) == pytest.approx(float(tb.loss.detach()), rel=1e-6) and torch.equal(ta.fires, tb.fires)
    assert (ta.aux is not None) == (arch != "jumprelu") and (ta.l0_penalty is not None) == (arch == "jumprelu")
    moved = 0
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=0, atol=2e-5, msg=name)
        moved += int(pa.grad.abs().sum() > 0)
    assert moved >= 5  # encoders, decoders, biases and skips all receive gradients
    if arch == "jumprelu":
        assert float(a.log_threshold.grad.abs().sum()) > 0  # the straight-through estimator reaches the thresholds


def test_a_decoder_reaches_only_its_targets():
    """reach 0: layer s writes layers s..L-1; reach 2: s and s+1; tied: one decoder block per source."""
    full, two, tied = (CrossLayerTranscoder(toy_cfg(reach=r, tied=t)) for r, t in ((0, False), (2, False), (0, True)))
    assert [w.shape[1] for w in full.W_dec] == [4, 3, 2, 1] and full.cfg.decoder_blocks() == 10
    assert [w.shape[1] for w in two.W_dec] == [2, 2, 2, 1] and two.targets(1) == [1, 2]
    assert [w.shape[1] for w in tied.W_dec] == [1, 1, 1, 1] and tied.cfg.decoder_blocks() == 4
    assert tied.decoder_rows(0, torch.tensor([3])).shape == (1, 4, 16)
    x = torch.randn(5, 4, 16)
    for clt in (full, two):  # a feature of layer 0 moves layer 3's prediction only with the reach to get there
        with torch.no_grad():
            clt.W_enc[0].zero_()
            clt.b_enc[0].fill_(5.0)
        y = clt(x)
        with torch.no_grad():
            clt.W_dec[0][:, -1] += 1.0
        assert bool((clt(x)[:, 3] != y[:, 3]).any()) == (clt.cfg.reach == 0)


def _jumprelu_transcoders(model, seed=0, F=40):
    """Per-layer JumpReLU skip transcoders with scales (as trained ones have) and thresholds that let features fire."""
    _, cache = model.run_with_cache(prompt())
    out = []
    for layer in range(model.cfg.n_layers):
        tc = SAE(SAEConfig(d_in=model.cfg.d_model, d_sae=F, architecture="jumprelu", hook_name=model.mlp_input(layer),
                           hook_name_out=act_name("mlp_out", layer), skip=True), seed=seed + layer)
        with torch.no_grad():
            tc.input_scale.fill_(1.7)
            tc.output_scale.fill_(0.6)
            tc.W_skip.normal_(0, 0.05, generator=torch.Generator().manual_seed(layer))
            tc.b_dec.normal_(0, 0.1, generator=torch.Generator().manual_seed(layer + 9))
            pre = tc.pre_acts(cache[model.mlp_input(layer)][0].float())
            tc.log_threshold.copy_(pre.quantile(0.85, dim=0).clamp_min(1e-3).log())
        out.append(tc)
    return out


def test_per_layer_transcoders_as_a_reach_one_clt_give_the_same_graph():
    """The plain path (a TranscoderSet of SAEs) and the same transcoders as one reach-1 CLT: same predictions, and
    the same attribution graph, edge for edge."""
    model = ms.HookedModel(tiny_hf("llama"))
    tcs = _jumprelu_transcoders(model)
    clt = CrossLayerTranscoder.from_transcoders(tcs)
    x = torch.randn(6, model.cfg.d_model)
    for layer, tc in enumerate(tcs):
        torch.testing.assert_close(clt.encode(layer, x), tc.encode(x), rtol=0, atol=1e-6)
        torch.testing.assert_close(clt.write_directions(layer, torch.arange(3))[:, 0] @ torch.ones(32),
                                   tc.write_directions(torch.arange(3)) @ torch.ones(32), rtol=0, atol=1e-5)
    plain = attribution_graph(model, TranscoderSet(model, tcs), prompt(), max_feature_nodes=10_000, progress=False,
                              certify=0)
    as_clt = attribution_graph(model, clt, prompt(), max_feature_nodes=10_000, progress=False, certify=0)
    assert plain.stats["active_features"] == as_clt.stats["active_features"] > 20
    assert torch.equal(plain.kind, as_clt.kind) and torch.equal(plain.index, as_clt.index)
    A, B = plain.adjacency.to_dense(), as_clt.adjacency.to_dense()
    assert float((A - B).abs().max()) <= 1e-5 * float(A.abs().max())
    for name, v in plain.scores().items():
        assert as_clt.scores()[name] == pytest.approx(v, abs=1e-6)
    with pytest.raises(InputError, match="differ in activation or width"):
        CrossLayerTranscoder.from_transcoders(tcs[:1] + [SAE(SAEConfig(d_in=32, d_sae=40, architecture="topk", k=3,
                                                                       hook_name=model.mlp_input(1),
                                                                       hook_name_out=act_name("mlp_out", 1)))])


@pytest.mark.parametrize("arch", ["llama", "gpt_neox", "gemma3"])
def test_every_clt_edge_equals_a_real_perturbation(arch):
    """A CLT feature writes into every later MLP output; each edge, summed over those writes, is the change of its
    target when the source is removed from the frozen replacement model, and each target is its incoming edges plus
    the constant left with every source removed."""
    model = ms.HookedModel(tiny_hf(arch))
    toks = prompt()
    clt = random_clt(model, toks, skip=arch == "llama", input="mlp_in" if arch == "gpt_neox" else "resid_mid")
    g = attribution_graph(model, clt, toks, max_feature_nodes=10_000, batch_size=16, progress=False, certify=0)
    rm = ReplacementModel(model, clt, toks)
    assert torch.equal(rm.run(1)[1], rm.logits)
    idx, val = g.adjacency.indices(), g.adjacency.values()
    assert val.numel() > 300 and set(g.kind[idx[1]].tolist()) == {FEATURE, ERROR, EMBEDDING}
    cross = [(int(t), int(s)) for t, s in idx.T if g.kind[s] == FEATURE and g.kind[t] == FEATURE
             and int(g.layer[t]) > int(g.layer[s]) + 0]
    assert cross  # features feeding later features: paths through later layers' MLP outputs
    edges = [(int(t), int(s)) for t, s in idx.T]
    measured = torch.cat([perturb_sources(rm, g, edges[i:i + 256]) for i in range(0, len(edges), 256)])
    scale = float(val.abs().max())
    assert float((measured + val).abs().max()) <= 1e-4 * max(1.0, scale)
    targets = torch.unique(idx[0]).tolist()
    run, _ = rm.run(1)
    zero, _ = rm.run(1, rm.without_sources())
    rows = torch.zeros(len(targets), dtype=torch.long)
    value, const = _read_targets(rm, g, run, targets, rows), _read_targets(rm, g, zero, targets, rows)
    incoming = torch.zeros(g.n_nodes).index_add_(0, idx[0], val)[torch.tensor(targets)]
    torch.testing.assert_close(value, const + incoming, rtol=0, atol=1e-4 * max(1.0, scale))
    # the errors are what the CLT misses: the MLP output less its prediction from the clean inputs
    _, cache = model.run_with_cache(toks.to(model.device))
    x = torch.stack([cache[h][0] for h in clt.cfg.input_hooks], 1).float()
    pred = clt(x)
    for st in rm.layers:
        want = cache[act_name("mlp_out", st.layer)][0].float() - pred[:, st.layer]
        torch.testing.assert_close(st.error[1:].float(), want[1:], rtol=0, atol=1e-5)


def test_interventions_qk_labels_and_the_curve_work_through_a_clt():
    model = worded_llama()
    toks = prompt()
    clt = random_clt(model, toks)
    n_params = len(list(clt.parameters()))
    g = attribution_graph(model, clt, toks, max_feature_nodes=10_000, progress=False, certify=32)
    assert g.certificate["worst_rel"] < 1e-5 and "cross-layer transcoder" in g.stats["replacement"]
    assert len(list(clt.parameters())) == n_params and not any("hf" in k for k in clt.state_dict())  # no model inside
    top = g.top_features(2).tolist()
    iv = intervene(model, g, clt, top, scale=0.0)
    assert len(iv.measured) == len(g.token_labels) and any(abs(m) > 1e-6 for m in iv.measured)
    curve = graph_curve(model, g, clt, sizes=[1, 4], n_random=1)
    assert curve.summary()
    rm = ReplacementModel(model, clt, toks)
    qk = qk_attribution(rm, 1, 0, q_pos=5, k_pos=2)
    assert qk.check < 1e-4 and abs(sum(v for _, v in qk.query_side) + qk.bias_term) > 0
    from mechscope.graphs.labels import label_features

    dashboards = label_features(model, g, clt, torch.randint(3, 90, (4, 12)), g.top_features(3), progress=False)
    assert len(dashboards) == 3 and all("logit effect" in h for h in dashboards.values())


def _cfg(arch="batchtopk", **kw):
    return CLTConfig(d_model=16, d_sae=48, layers=(0, 1, 2), input_hooks=tuple(act_name("resid_mid", i) for i in range(3)),
                     output_hooks=tuple(act_name("mlp_out", i) for i in range(3)), architecture=arch, k=4,
                     normalize_activations="expected_average_only_in", **kw)


@pytest.mark.parametrize("arch", ["batchtopk", "jumprelu", "topk"])
def test_training_learns_the_planted_map_and_a_clt_beats_per_layer_there(arch, tmp_path):
    rows = planted_clt_rows()
    tc = TrainConfig(steps=300, batch_size=128, lr=3e-3, log_every=100, checkpoint_every=100)
    clt = fit_sae(rows, _cfg(arch, l0_coefficient=1e-3), tc, out=tmp_path / "clt", progress=False)
    plt = fit_sae(rows, _cfg(arch, reach=1, l0_coefficient=1e-3), tc, out=tmp_path / "plt", progress=False)
    first, last = clt.history[0], clt.history[-1]
    assert last["explained_variance"] > max(0.5, first["explained_variance"] + 0.1)
    assert 2 <= last["l0"] <= 60
    # the teacher writes every layer from every earlier one: a per-layer set cannot, a CLT can
    assert last["explained_variance"] > plt.history[-1]["explained_variance"] + 0.05
    if arch == "batchtopk":
        assert bool((clt.sae.threshold > 0).all())  # a learned inference threshold per layer
    assert (tmp_path / "clt" / "checkpoint.pt").exists() and "CLT (" in clt.summary()


def test_a_resumed_run_is_bit_identical_to_an_uninterrupted_one(tmp_path):
    rows = planted_clt_rows(n=800)
    tc = TrainConfig(steps=30, batch_size=64, lr=3e-3, log_every=10, checkpoint_every=10)
    whole = fit_sae(rows, _cfg(), tc, progress=False).sae.state_dict()
    fit_sae(rows, _cfg(), tc, out=tmp_path / "r", progress=False, stop_after=17)  # interrupted after step 17
    resumed = fit_sae(rows, _cfg(), tc, out=tmp_path / "r", resume=True, progress=False).sae.state_dict()
    for k, v in whole.items():
        assert torch.equal(resumed[k], v), k
    with pytest.raises(InputError, match="differ from the checkpoint"):
        fit_sae(rows, _cfg(reach=1), tc, out=tmp_path / "r", resume=True, progress=False)


KILL = """
import os, signal, sys, torch
sys.path.insert(0, sys.argv[1])
torch.set_num_threads(1)
import mechscope.sae.train as T
from dist_worker import clt_configs, planted_clt_rows
real = T.atomic_write
def write_then_die(path, data):
    real(path, data)
    if path.name == "checkpoint.pt" and T.torch.load(path, weights_only=True)["step"] == 10:
        os.kill(os.getpid(), signal.SIGKILL)
T.atomic_write = write_then_die
cfg, tc = clt_configs("clt_batchtopk")
T.fit_sae(planted_clt_rows(n=600), cfg, tc.__class__(**{**tc.__dict__, "steps": 20, "checkpoint_every": 5, "log_every": 5}),
          out=sys.argv[2], progress=False)
"""


def test_killed_with_sigkill_and_resumed_it_ends_bit_identical(tmp_path):
    """A process killed by SIGKILL right after its step-10 checkpoint, resumed by another: the CLT equals an
    uninterrupted run's bit for bit."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    r = subprocess.run([sys.executable, "-c", KILL, str(Path(__file__).parent), str(tmp_path / "run")],
                       capture_output=True, text=True, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    torch.set_num_threads(1)
    cfg, tc = clt_configs("clt_batchtopk")
    tc = tc.__class__(**{**tc.__dict__, "steps": 20, "checkpoint_every": 5, "log_every": 5})
    resumed = fit_sae(planted_clt_rows(n=600), cfg, tc, out=tmp_path / "run", resume=True, progress=False)
    whole = fit_sae(planted_clt_rows(n=600), cfg, tc, progress=False)
    for k, v in whole.sae.state_dict().items():
        assert torch.equal(resumed.sae.state_dict()[k], v), k
    steps = [int(__import__("json").loads(ln)["step"]) for ln in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert steps == [5, 10, 15, 20]


def test_two_ranks_train_the_one_process_clt(tmp_path):
    from safetensors.torch import load_file

    from test_distributed import _spawn

    _spawn("clt", tmp_path)
    for name in CLT_JOBS:
        cfg, tc = clt_configs(name)
        one = fit_sae(planted_clt_rows(), cfg, tc, progress=False).sae.state_dict()
        two = load_file(str(tmp_path / f"{name}.safetensors"))
        for k, v in one.items():
            torch.testing.assert_close(two[k], v, rtol=0, atol=1e-5, msg=f"{name}: {k}")
        start = fit_sae(planted_clt_rows(), cfg, tc.__class__(**{**tc.__dict__, "steps": 0}), progress=False)
        assert float((one["W_dec.0"] - start.sae.state_dict()["W_dec.0"]).abs().max()) > 1e-3  # training moved it


def test_train_clt_on_a_model_harvests_every_layer_in_one_pass_and_evaluates(monkeypatch):
    import mechscope.sae.data as data

    model = ms.HookedModel(tiny_hf("llama"))
    toks = torch.randint(3, 90, (12, 10), generator=torch.Generator().manual_seed(1))
    passes = []
    real = data._harvest
    monkeypatch.setattr(data, "_harvest", lambda *a, **k: passes.append(a[2].shape[0]) or real(*a, **k))
    cfg = clt_config(model, 64, architecture="batchtopk", k=4)
    res = train_clt(model, toks, cfg, TrainConfig(steps=60, batch_size=32, lr=3e-3, partitions=3), progress=False)
    assert passes == [12]  # one harvest of all 12 sequences for the 3 partitions, every layer at once
    ev = evaluate_clt(model, res.sae, toks[:4])
    assert len(ev.nmse) == 3 and all(0 <= n < 1.5 for n in ev.nmse) and sum(ev.l0) > 3
    assert ev.ce_zero != ev.ce_clean and "NMSE" in ev.summary() and ev.to_dict()["mean_nmse"] == ev.mean_nmse
    # the closed-loop hooks put the CLT's prediction in place of every MLP
    x_seen = {}
    hooks = clt_hooks(res.sae)
    with model.hooks(hooks + [(cfg.output_hooks[2], lambda a, h: x_seen.setdefault("y", a))]):
        model(toks[:1])
    assert "y" in x_seen
    with pytest.raises(InputError, match="a CLT covers increasing"):
        clt_config(model, 8, layers=[2, 1])
    with pytest.raises(InputError, match="layers must be in 0..2"):
        clt_config(model, 8, layers=[5])


def test_clt_bad_input_is_named():
    model = ms.HookedModel(tiny_hf("llama"))
    with pytest.raises(InputError, match="k must be in 1..d_sae"):
        _cfg("topk").__class__(**{**_cfg("topk").to_dict(), "k": 0})
    with pytest.raises(InputError, match="architecture must be one of"):
        _cfg("gated")
    wide = CrossLayerTranscoder(toy_cfg(d=24, n=3))
    with pytest.raises(InputError, match="d_model=24 but .* has width 32"):
        attribution_graph(model, wide, prompt(), progress=False)
    with pytest.raises(TypeError, match="transcoders must be"):
        attribution_graph(model, "The capital of France is", prompt(), progress=False)
    with pytest.raises(TypeError, match="swapped"):
        attribution_graph(model, "t5 t6", TranscoderSet(model, []), progress=False)


def test_transcoders_train_kind_clt_cli_saves_circuit_tracers_layout_and_graphs_on_it(tmp_path, capsys, monkeypatch):
    import json

    from mechscope.cli import main
    from mechscope.sae import load_replacement

    model = worded_llama()
    monkeypatch.setattr(ms, "load", lambda *a, **k: model)
    args = ["transcoders", "train", "--kind", "clt", "--width", "48", "--k", "3", "--steps", "12", "--batch", "32",
            "--seqs", "12", "--seq-len", "10", "--eval-seqs", "2", "--out", str(tmp_path / "c"), "--json", "--quiet"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kind"] == "clt" and len(out["nmse"]) == 3 and out["circuit_tracer_reads_it"]
    assert (tmp_path / "c" / "clt" / "config.yaml").exists() and (tmp_path / "c" / "train" / "checkpoint.pt").exists()
    clt = load_replacement(tmp_path / "c" / "clt", model)
    assert clt.cfg.architecture == "jumprelu" and clt.cfg.reach == 0  # BatchTopK saved as its thresholds
    assert main(args + ["--resume", "--steps", "16"]) == 0  # continues from step 12
    assert json.loads(capsys.readouterr().out)["training"]["steps"] == 16
    assert main(["graph", "t5 t6 t7 t8", "--transcoders", str(tmp_path / "c" / "clt"), "--html",
                 str(tmp_path / "g.html"), "--quiet", "--json"]) == 0
    assert "cross-layer transcoder" in json.loads(capsys.readouterr().out)["stats"]["replacement"]
    assert "ms-graph" in (tmp_path / "g.html").read_text()
    assert main(args[:4] + ["--arch", "matryoshka", "--out", str(tmp_path / "x")]) == 2
    assert "matryoshka is for per-layer" in capsys.readouterr().err
    assert main(["transcoders", "train", "--reach", "2", "--out", str(tmp_path / "y")]) == 2
    assert "are for --kind clt" in capsys.readouterr().err
