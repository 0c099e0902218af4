"""SAEs: the four architectures learn a planted dictionary; resume is exact; SAELens format round trips."""

import json

import pytest
import torch
from safetensors.torch import save_file

from mechscope import HookedModel
from mechscope.sae import (
    SAE,
    SAEConfig,
    SAETrainingError,
    TrainConfig,
    check_fits,
    evaluate_sae,
    harvest,
    load_sae,
    save_sae,
    splice_hook,
    train_sae,
)
from tiny import V, tiny_hf


def planted(n=4000, d=16, atoms=48, active=3, seed=0):
    """Activations that are sparse sums of unit directions (a known dictionary), scaled up."""
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(atoms, d, generator=g)
    D /= D.norm(dim=-1, keepdim=True)
    idx = torch.stack([torch.randperm(atoms, generator=g)[:active] for _ in range(n)])
    coef = torch.rand(n, active, generator=g) * 3 + 0.5
    x = (coef[..., None] * D[idx]).sum(1)
    return 7.0 * x + 2.0  # an offset and a scale, as real activations have


@pytest.mark.parametrize("arch", ["relu", "topk", "batchtopk", "jumprelu", "matryoshka"])
def test_architectures_learn(arch, tmp_path):
    acts = planted()
    cfg = SAEConfig(d_in=16, d_sae=64, architecture=arch, k=3, l1_coefficient=0.3, l0_coefficient=0.05,
                    normalize_activations="expected_average_only_in", jumprelu_init_threshold=0.05,
                    jumprelu_bandwidth=0.05)
    sae = train_sae(acts, cfg, TrainConfig(steps=600, batch_size=256, lr=3e-3, log_every=100,
                                           checkpoint_every=1000, dead_window=20_000), out=tmp_path, progress=False)
    x = acts[:500]
    f = sae.encode(x)
    ev = 1 - (x - sae.decode(f)).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert ev > 0.7, (arch, float(ev))
    l0 = float((f > 0).sum(-1).float().mean())
    assert l0 < 20, (arch, l0)
    if arch == "topk":
        assert l0 <= 3
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(64), atol=1e-5, rtol=0)
    log = [json.loads(l) for l in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [100, 200, 300, 400, 500, 600]
    assert {"l0", "mse", "explained_variance", "dead", "dense", "log10_density_hist"} <= set(log[0])
    if arch == "jumprelu":
        assert abs(log[-1]["l0"] - log[0]["l0"]) > 0.5, "the JumpReLU thresholds did not move L0"
    if arch in ("batchtopk", "matryoshka"):
        assert float(sae.threshold) > 0  # inference uses the learned threshold


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
@pytest.mark.parametrize("with_dead", [False, True])
def test_sparse_kernels_match_dense_gradients(arch, with_dead):
    torch.manual_seed(0)
    cfg = SAEConfig(d_in=24, d_sae=96, architecture=arch, k=5, k_aux=12,
                    normalize_activations="expected_average_only_in")
    x = planted(n=200, d=24)
    grads, outs = [], []
    for sparse in (False, True):
        sae = SAE(cfg, seed=3)
        sae.fit_input_scale(x)
        sae.init_b_dec(x, "mean")
        with torch.no_grad():  # break the W_enc = W_dec^T symmetry so that the test sees both paths
            sae.W_enc.add_(0.1 * torch.randn(sae.W_enc.shape, generator=torch.Generator().manual_seed(1)))
        dead = (torch.arange(96) % 3 == 0) if with_dead else None
        out = sae.training_loss(x, dead_mask=dead, sparse=sparse)
        out["loss"].backward()
        grads.append({n: p.grad.clone() for n, p in sae.named_parameters()})
        outs.append(out)
    d, s = outs
    torch.testing.assert_close(s["loss"], d["loss"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s["recon"], d["recon"], rtol=1e-5, atol=1e-4)
    assert torch.equal(s["fires"], d["fires"]) and float(s["l0"]) == pytest.approx(float(d["l0"]))
    assert ("aux" in s) == with_dead
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-5, msg=name)
        assert grads[0][name].abs().sum() > 0, name  # every parameter gets a gradient, in both paths


def test_sparse_and_dense_training_agree(tmp_path):
    acts = planted(n=2000)
    cfg = SAEConfig(d_in=16, d_sae=48, architecture="topk", k=3)
    saes = [train_sae(acts, cfg, TrainConfig(steps=60, batch_size=128, lr=1e-3, sparse=sp, dead_window=2000),
                      progress=False) for sp in (False, True)]
    for name, p in saes[0].state_dict().items():
        torch.testing.assert_close(saes[1].state_dict()[name], p, rtol=1e-3, atol=1e-4, msg=name)


def test_resume_after_interruption_is_exact(tmp_path):
    acts = planted(n=2000)
    cfg = SAEConfig(d_in=16, d_sae=32, architecture="topk", k=3)
    tc = TrainConfig(steps=120, batch_size=64, lr=1e-3, log_every=10, checkpoint_every=20)
    full = train_sae(acts, cfg, tc, out=tmp_path / "a", progress=False)
    stop = int(torch.randint(21, 119, (1,), generator=torch.Generator().manual_seed(7)))
    train_sae(acts, cfg, tc, out=tmp_path / "b", progress=False, stop_after=stop)  # "killed" at a random step
    resumed = train_sae(acts, cfg, tc, out=tmp_path / "b", resume=True, progress=False)
    for name, p in full.state_dict().items():
        assert torch.equal(p, resumed.state_dict()[name]), name
    steps = [json.loads(l)["step"] for l in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(10, 121, 10))


def test_resume_refuses_changed_settings_and_survives_a_torn_log(tmp_path):
    from mechscope.core.errors import InputError

    acts = planted(n=1000)
    cfg = SAEConfig(d_in=16, d_sae=32, architecture="topk", k=3)
    tc = TrainConfig(steps=60, batch_size=64, lr=1e-3, log_every=10, checkpoint_every=20)
    train_sae(acts, cfg, tc, out=tmp_path, progress=False, stop_after=40)
    with pytest.raises(InputError, match=r"train\.lr: checkpoint 0\.001, now 0\.01"):
        train_sae(acts, cfg, TrainConfig(**{**tc.__dict__, "lr": 1e-2}), out=tmp_path, resume=True, progress=False)
    with pytest.raises(InputError, match=r"sae\.d_sae: checkpoint 32, now 64"):
        train_sae(acts, SAEConfig(d_in=16, d_sae=64, architecture="topk", k=3), tc, out=tmp_path, resume=True,
                  progress=False)
    log = tmp_path / "log.jsonl"
    log.write_text(log.read_text() + '{"step": 50, "lo')  # killed while writing a line
    (tmp_path / "checkpoint.pt.k3j9.tmp").write_bytes(b"torn")  # killed while writing a checkpoint
    with pytest.warns(UserWarning, match="torn last line"):  # more steps may be asked for on resume
        train_sae(acts, cfg, TrainConfig(**{**tc.__dict__, "steps": 80}), out=tmp_path, resume=True, progress=False)
    assert [json.loads(ln)["step"] for ln in log.read_text().splitlines()] == list(range(10, 81, 10))
    assert not list(tmp_path.glob("*.tmp"))
    (tmp_path / "checkpoint.pt").write_bytes(b"\x80\x02 not a checkpoint")
    with pytest.raises(FileNotFoundError, match="checkpoint.pt is damaged"):
        train_sae(acts, cfg, tc, out=tmp_path, resume=True, progress=False)


def test_nan_stops_and_keeps_checkpoint(tmp_path):
    acts = planted(n=1000)
    cfg = SAEConfig(d_in=16, d_sae=32, architecture="relu")
    tc = TrainConfig(steps=50, batch_size=64, checkpoint_every=10, log_every=10)
    train_sae(acts, cfg, tc, out=tmp_path, progress=False, stop_after=20)
    before = (tmp_path / "checkpoint.pt").read_bytes()
    bad = acts.clone()
    bad[:] = float("nan")
    with pytest.raises(SAETrainingError, match="non-finite loss"):
        train_sae(bad, cfg, tc, out=tmp_path, resume=True, progress=False)
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


@pytest.mark.parametrize("arch", ["relu", "topk", "batchtopk", "jumprelu", "matryoshka"])
def test_saelens_round_trip_reconstructs_raw_activations(arch, tmp_path):
    acts = planted(n=1500)
    cfg = SAEConfig(d_in=16, d_sae=32, architecture=arch, k=4, hook_name="blocks.1.hook_resid_post",
                    normalize_activations="expected_average_only_in")
    sae = train_sae(acts, cfg, TrainConfig(steps=60, batch_size=128), progress=False)
    assert float(sae.input_scale) != 1.0
    path = save_sae(sae, tmp_path / "sae", log10_density=torch.zeros(32))
    raw = json.loads((path / "cfg.json").read_text())
    assert raw["normalize_activations"] == "none" and raw["metadata"]["hook_name"] == "blocks.1.hook_resid_post"
    assert raw["architecture"] == {"relu": "standard", "topk": "topk", "batchtopk": "jumprelu", "jumprelu": "jumprelu",
                                   "matryoshka": "jumprelu"}[arch]
    again = load_sae(path)
    x = acts[:200]
    torch.testing.assert_close(again(x), sae(x), atol=1e-4, rtol=1e-4)
    assert (path / "sparsity.safetensors").exists() and not list(tmp_path.glob("*.tmp-*"))


def test_loads_a_folder_written_from_the_spec(tmp_path):
    """Built by hand from SAELens's format description, independently of save_sae."""
    g = torch.Generator().manual_seed(0)
    d_in, d_sae = 32, 20
    w = {"W_enc": torch.randn(d_in, d_sae, generator=g), "W_dec": torch.randn(d_sae, d_in, generator=g),
         "b_enc": torch.randn(d_sae, generator=g), "b_dec": torch.randn(d_in, generator=g),
         "threshold": torch.rand(d_sae, generator=g)}
    (tmp_path / "cfg.json").write_text(json.dumps({
        "architecture": "jumprelu", "d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
        "metadata": {"hook_name": "blocks.2.hook_resid_post", "model_name": "tiny", "sae_lens_version": "6.54.0"}}))
    save_file(w, str(tmp_path / "sae_weights.safetensors"))
    sae = load_sae(tmp_path)
    x = torch.randn(5, d_in, generator=g)
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    f = torch.relu(pre) * (pre > w["threshold"])
    torch.testing.assert_close(sae.encode(x), f)
    torch.testing.assert_close(sae(x), f @ w["W_dec"] + w["b_dec"])
    model = HookedModel(tiny_hf("llama"))
    check_fits(sae, model)
    sae.cfg.hook_name = "blocks.2.mlp.hook_post"
    with pytest.raises(ValueError, match="d_in=32"):
        check_fits(sae, model)
    sae.cfg.hook_name = "blocks.2.hook_resid_pots"
    with pytest.raises(KeyError, match="Did you mean"):
        check_fits(sae, model)
    (tmp_path / "cfg.json").write_text(json.dumps({"architecture": "gated", "d_in": 1, "d_sae": 1}))
    with pytest.raises(ValueError, match="unsupported SAE architecture"):
        load_sae(tmp_path)


def test_harvest_drops_massive_activations():
    model = HookedModel(tiny_hf("llama"))
    toks = torch.randint(0, V, (4, 9))

    def massive(act, hook):  # position 3 of sequence 1 becomes a 1000x-norm "sink"
        act[1, 3] *= 1000.0
        return act

    with model.hooks([("blocks.1.hook_resid_post", massive)]):
        kept = harvest(model, "blocks.1.hook_resid_post", toks, batch_size=4)
        every = harvest(model, "blocks.1.hook_resid_post", toks, batch_size=4, max_norm_ratio=None)
    assert every.shape[0] == 4 * 8 and kept.shape[0] == 4 * 8 - 1
    dropped = 1 * 8 + 2  # row of (sequence 1, position 3) after the first position is skipped
    torch.testing.assert_close(kept, torch.cat([every[:dropped], every[dropped + 1:]]))


def test_harvest_stops_early_and_splicing():
    model = HookedModel(tiny_hf("llama"))
    toks = torch.randint(0, V, (4, 9))
    ran = []
    h = model.parts.layers[2].register_forward_hook(lambda *a: ran.append(1))
    acts = harvest(model, "blocks.1.hook_resid_post", toks, batch_size=2)
    h.remove()
    assert not ran, "blocks above the hook ran"
    _, cache = model.run_with_cache(toks, names_filter="blocks.1.hook_resid_post")
    torch.testing.assert_close(acts, cache["resid_post", 1][:, 1:].reshape(-1, 32))  # first position skipped
    cfg = SAEConfig(d_in=32, d_sae=64, architecture="topk", k=8, hook_name="blocks.1.hook_resid_post")
    sae = train_sae(acts, cfg, TrainConfig(steps=50, batch_size=32), progress=False)
    with torch.no_grad():
        same = model.run_with_hooks(toks, fwd_hooks=[("blocks.1.hook_resid_post", splice_hook(sae, True))])
    torch.testing.assert_close(same, model(toks).detach(), atol=1e-4, rtol=1e-4)
    ev = evaluate_sae(model, sae, toks)
    import math

    assert all(math.isfinite(v) for v in (ev.ce_clean, ev.ce_sae, ev.ce_zero, ev.explained_variance))
    assert 0 <= ev.dead_fraction <= 1 and "recovered" in ev.summary() and ev.l0 <= 8
    assert 0 < ev.l2_ratio < 2 and "shrinkage" in ev.summary() and ev.token_ci["l0"].low <= ev.l0 <= ev.token_ci["l0"].high


def test_evaluate_sae_reads_its_activations_from_the_ce_pass(monkeypatch):
    """evaluate_sae runs no harvest of its own: the unhooked CE run gives the rows, equal to harvest's."""
    from mechscope.analysis.metrics import explained_variance
    from mechscope.core.errors import InputError
    from mechscope.core.model import lm_loss
    from mechscope.sae import evaluate as E

    model = HookedModel(tiny_hf("llama"))
    toks = torch.randint(0, V, (10, 9), generator=torch.Generator().manual_seed(3))
    a, b = "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"
    for cfg in (SAEConfig(d_in=32, d_sae=64, architecture="topk", k=8, hook_name="blocks.1.hook_resid_post"),
                SAEConfig(d_in=32, d_sae=64, architecture="topk", k=8, hook_name=a, hook_name_out=b)):
        sae = SAE(cfg, seed=2)
        blocks = []
        hs = [blk.register_forward_hook(lambda *x, _i=i: blocks.append(_i)) for i, blk in enumerate(model.parts.layers)]
        ev = evaluate_sae(model, sae, toks)
        for h in hs:
            h.remove()
        assert blocks.count(0) == 1  # blocks below the SAE ran once: no harvest pass beside the CE's
        if cfg.is_transcoder:
            x, acts = harvest(model, a, toks, max_norm_ratio=None), harvest(model, b, toks, max_norm_ratio=None)
            recon = sae(x).detach()
        else:
            acts = harvest(model, cfg.hook_name, toks, max_norm_ratio=None)
            recon = sae.decode(sae.encode(acts)).detach()
        assert ev.explained_variance == pytest.approx(float(explained_variance(acts, recon)), abs=1e-6)
        assert ev.n_tokens == acts.shape[0] == 10 * 8
        with torch.no_grad():
            clean = lm_loss(model(toks), toks, per_token=True).mean()
        assert ev.ce_clean == pytest.approx(float(clean), abs=1e-5)
    with pytest.raises(InputError, match="unhooked run"):
        E._ce_per_sequence(model, toks, [[(a, lambda x, h: x)]], None, E.BatchState(), record=[a])


def test_features_dashboards_search_and_interventions(tmp_path):
    import re

    from mechscope.sae.features import ablate_features_hook, feature_stats, logit_effects, steer_hook, write_dashboards

    model = HookedModel(tiny_hf("llama"))

    class Tok:  # token ids as strings, with HTML-hostile pieces
        bos_token_id = None

        def decode(self, ids):
            return "".join("<b>" if int(i) == 3 else f"t{int(i)}" for i in ids)

    model.tokenizer = Tok()
    toks = torch.randint(0, V, (12, 10), generator=torch.Generator().manual_seed(0))
    toks[:, 4] = 3
    acts = harvest(model, "blocks.1.hook_resid_post", toks, skip_first=0)
    sae = train_sae(acts, SAEConfig(d_in=32, d_sae=48, architecture="topk", k=4, hook_name="blocks.1.hook_resid_post"),
                    TrainConfig(steps=40, batch_size=32), progress=False)
    stats = feature_stats(model, sae, toks, n_top=5, batch_size=4)
    f = sae.encode(harvest(model, "blocks.1.hook_resid_post", toks))  # the tokens the stats read: no sink, no outlier
    assert stats.n_tokens == f.shape[0] < toks.numel()
    torch.testing.assert_close(stats.density, (f > 0).float().mean(0))  # streamed = all at once
    torch.testing.assert_close(stats.max_act, f.amax(0))
    i = next(iter(stats.top))
    assert abs(stats.top[i][0].activation - float(f[:, i].max().detach())) < 1e-5
    assert len(stats.top[i]) <= 5 and all(len(x.tokens) <= 11 for x in stats.top[i])
    top, bot = logit_effects(model, sae, i, k=3)
    assert len(top) == 3 and top[0][1] >= bot[0][1]
    index = write_dashboards(model, sae, stats, tmp_path / "dash")
    page = (tmp_path / "dash" / f"feature_{i}.html").read_text()
    assert "&lt;b&gt;" in page  # the hostile token (in every window) is escaped...
    assert not re.findall(r"<b>(?![0-9.+-]+</b>)", page)  # ...and every real <b> holds an activation value
    assert "<script" not in page and index.name == "index.html" and f"feature_{i}.html" in index.read_text()
    # ablating every feature leaves only the error term; steering adds the decoder row
    got = {}

    def grab(a, h):
        got["x"] = a.detach()

    with model.hooks([("blocks.1.hook_resid_post", ablate_features_hook(sae, range(48))),
                      ("blocks.1.hook_resid_post", grab)]):
        model(toks[:2])
    _, cache = model.run_with_cache(toks[:2], names_filter="blocks.1.hook_resid_post")
    x = cache["resid_post", 1]
    torch.testing.assert_close(got["x"], x - (sae(x) - sae.b_dec / sae.input_scale), atol=1e-4, rtol=1e-4)
    with model.hooks([("blocks.1.hook_resid_post", steer_hook(sae, i, 3.0)), ("blocks.1.hook_resid_post", grab)]):
        model(toks[:2])
    torch.testing.assert_close(got["x"], x + 3.0 * sae.W_dec[i].detach() / sae.input_scale)


def test_disk_shards_are_atomic_and_resumable(tmp_path):
    from mechscope.sae import harvest_to_disk, load_shards

    model = HookedModel(tiny_hf("llama"))
    toks = torch.randint(0, V, (10, 6), generator=torch.Generator().manual_seed(1))
    folder = harvest_to_disk(model, "blocks.0.hook_resid_post", toks[:6], tmp_path / "acts", seqs_per_shard=4)
    (folder / "shard_00009.safetensors").write_bytes(b"half a shard")  # a crash leftover, not in the manifest
    harvest_to_disk(model, "blocks.0.hook_resid_post", toks, folder, seqs_per_shard=4)  # resumes at row 6
    acts = load_shards(folder)
    torch.testing.assert_close(acts, harvest(model, "blocks.0.hook_resid_post", toks))
    with pytest.raises(ValueError, match="holds activations"):
        harvest_to_disk(model, "blocks.1.hook_resid_post", toks, folder)
    shard = folder / "shard_00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:40])  # truncated on disk
    with pytest.raises(FileNotFoundError, match="shard_00001.safetensors is damaged or truncated"):
        load_shards(folder)


def test_shuffle_buffer_mixes_and_keeps_every_row():
    from mechscope.sae import shuffled_batches

    chunks = [torch.full((10, 1), float(i)) for i in range(10)]
    batches = list(shuffled_batches(chunks, batch_size=5, buffer_size=40))
    rows = torch.cat(batches).flatten()
    assert sorted(rows.tolist()) == sorted(torch.cat(chunks).flatten().tolist())
    assert len(set(batches[0].flatten().tolist())) > 1  # a batch mixes chunks


def test_resampling_revives_dead_latents_and_sweep():
    from mechscope.sae import resample_dead, train_sae_sweep

    acts = planted(n=2000)
    cfg = SAEConfig(d_in=16, d_sae=32, architecture="relu", l1_coefficient=1.0)
    sae = SAE(cfg)
    sae.fit_input_scale(acts)
    opt = torch.optim.Adam(sae.parameters())
    with torch.no_grad():
        sae.b_enc[:8] = -1e3  # eight latents that can never fire
    dead = torch.zeros(32, dtype=torch.bool)
    dead[:8] = True
    assert not (sae.encode(acts[:256])[:, :8] > 0).any()
    assert resample_dead(sae, acts[:256], dead, opt) == 8
    assert (sae.encode(acts[:256])[:, :8] > 0).any()
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(32), atol=1e-5, rtol=0)
    a, b = train_sae_sweep(acts, [cfg, SAEConfig(d_in=16, d_sae=32, architecture="topk", k=3)],
                           TrainConfig(steps=20, batch_size=64), progress=False)
    assert a.cfg.architecture == "relu" and b.cfg.architecture == "topk"


@pytest.mark.slow
def test_feature_search_and_steering_during_generate(smollm):
    from mechscope.sae.features import separating_features, steer_hook, top_features

    hook = "blocks.10.hook_resid_post"
    from mechscope import corpus

    acts = harvest(smollm, hook, corpus.pack(smollm, corpus.default_corpus("train"), 64, n_seqs=16))
    sae = train_sae(acts, SAEConfig(d_in=576, d_sae=1152, architecture="topk", k=16, hook_name=hook,
                                    normalize_activations="expected_average_only_in"),
                    TrainConfig(steps=60, batch_size=256, lr=1e-3), progress=False)
    feats = top_features(smollm, sae, "The capital of France is", k=5)
    assert len(feats) == 5 and feats[0][1] >= feats[-1][1] > 0
    sep = separating_features(smollm, sae, ["def f(x):\n    return x", "import os\nprint(1)"],
                              ["The cat sat on the mat.", "She went to the market."], k=5)
    assert len(sep) == 5 and abs(sep[0][1]) >= abs(sep[-1][1])
    plain = smollm.generate("The capital of France is", max_new_tokens=5)
    steered = smollm.generate("The capital of France is", max_new_tokens=5,
                              fwd_hooks=[(hook, steer_hook(sae, sep[0][0], 200.0))])
    assert steered != plain and not smollm.manager._entries


def test_harvest_many_equals_one_hook_at_a_time():
    from mechscope.sae import harvest_many

    model = HookedModel(tiny_hf("llama"))
    toks = torch.randint(0, V, (5, 8), generator=torch.Generator().manual_seed(2))
    hooks = ["blocks.0.hook_resid_post", "blocks.2.hook_mlp_out", "blocks.1.attn.hook_z"]
    got = harvest_many(model, hooks, toks)
    for h in hooks:
        assert torch.equal(got[h], harvest(model, h, toks)), h


def test_many_saes_in_lockstep_equal_each_trained_alone():
    from mechscope.sae import SAE, train_many

    model = HookedModel(tiny_hf("llama"))
    toks = torch.randint(0, V, (24, 12), generator=torch.Generator().manual_seed(4))
    cfgs = [SAEConfig(d_in=32, d_sae=64, architecture="topk", k=4, hook_name="blocks.0.hook_resid_post"),
            SAEConfig(d_in=32, d_sae=96, architecture="batchtopk", k=2, hook_name="blocks.2.hook_resid_post"),
            SAEConfig(d_in=32, d_sae=48, architecture="jumprelu", hook_name="blocks.0.hook_resid_post")]
    tc = TrainConfig(steps=12, batch_size=32, lr=1e-3)
    together = train_many(model, toks, cfgs, tc, seqs_per_chunk=6, progress=False)
    for i, c in enumerate(cfgs):  # adding SAEs to a run changes none of them
        alone = train_many(model, toks, [c], tc, seqs_per_chunk=6, progress=False)[0]
        assert together[i].steps == alone.steps == 12 and together[i].tokens_seen == 12 * 32
        for k, v in alone.sae.state_dict().items():
            assert torch.equal(v, together[i].sae.state_dict()[k]), (i, k)
    assert not torch.equal(together[0].sae.W_dec, SAE(cfgs[0]).W_dec)  # they trained
    with pytest.raises(ValueError, match="d_in=16 but blocks.0.hook_resid_post of this model has width 32"):
        train_many(model, toks, [SAEConfig(d_in=16, d_sae=8, k=2, hook_name="blocks.0.hook_resid_post")], tc)
