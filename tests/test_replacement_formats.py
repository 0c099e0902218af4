"""Published replacement models, offline: each layout circuit-tracer 0.5.0 reads written here in exactly that layout
(tensor names, shapes, orientation, dtype), put in a Hugging Face cache of the real layout where the hub path is the
point, and read with load_replacement. Each layout's maths is written out here, from the activations at the site
the files name (TransformerLens's unweighted ln2.hook_normalized computed from the residual stream by hand), and
compared with what mechscope predicts. Then mechscope's own files both ways, and every refusal."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import save, save_file

import mechscope as ms
from mechscope.core.errors import InputError, NotFoundError
from mechscope.core.hookpoints import act_name
from mechscope.graphs import attribution_graph
from mechscope.sae import CrossLayerTranscoder, load_replacement, load_sae, releases, save_replacement
from test_sae_hub import HubCache, hub  # noqa: F401 - the fixture
from tiny import random_clt, tiny_hf

F = 24
G = torch.Generator().manual_seed(0)


def rand(*shape, scale=0.3):
    return torch.randn(*shape, generator=G) * scale


def st(tensors):
    return save({k: v.contiguous() for k, v in tensors.items()})


def yaml_text(d):
    import yaml

    return yaml.safe_dump(d, sort_keys=False).encode()


def tokens():
    return torch.randint(3, 90, (2, 9), generator=torch.Generator().manual_seed(5))


def acts(model, hooks):
    """``{hook: [n, d]}`` at every position but the first, from one run."""
    _, cache = model.run_with_cache(tokens())
    return {h: cache[h][:, 1:].reshape(-1, model.cfg.d_model).float() for h in hooks}


def jump(pre, thr):
    return pre * (pre > thr)


def tl_unweighted(model, layer):
    """TransformerLens's ``ln2.hook_normalized`` (fold_ln=False): the residual before the MLP over its RMS, without the
    norm's gain, computed here from ``hook_resid_mid`` and the norm's epsilon."""
    x = acts(model, [act_name("resid_mid", layer)])[act_name("resid_mid", layer)]
    norm = model.ln2(layer).module
    eps = getattr(norm, "variance_epsilon", None) or norm.eps
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def predict(rep, model):
    """mechscope's prediction of each covered layer's MLP output from the model's own inputs: ``[n, L, d]``."""
    a = acts(model, list(dict.fromkeys(rep.cfg.input_hooks)))
    return rep(torch.stack([a[h] for h in rep.cfg.input_hooks], 1))


# ------------------------------------------------------------------------------------------------ circuit-tracer's CLT
def ct_clt_files(n, d, dtype=torch.float32, threshold=True):
    """circuit-tracer's CLT layout (``load_clt``): ``W_enc_{i}.safetensors`` with W_enc_i [F, d], b_enc_i, b_dec_i,
    threshold_i; ``W_dec_{i}.safetensors`` with W_dec_i [F, n - i, d]."""
    files, w = {}, []
    for i in range(n):
        t = {f"W_enc_{i}": rand(F, d), f"b_enc_{i}": rand(F, scale=0.1), f"b_dec_{i}": rand(d, scale=0.1)}
        if threshold:
            t[f"threshold_{i}"] = torch.rand(F, generator=G) * 0.2
        dec = rand(F, n - i, d)
        files[f"W_enc_{i}.safetensors"] = st({k: v.to(dtype) for k, v in t.items()})
        files[f"W_dec_{i}.safetensors"] = st({f"W_dec_{i}": dec.to(dtype)})
        w.append({**{k.rsplit("_", 1)[0]: v.to(dtype).float() for k, v in t.items()}, "W_dec": dec.to(dtype).float()})
    return files, w


def ct_clt_expected(w, xs):
    """circuit-tracer's CLT maths: a_i = JumpReLU(x_i W_enc_i^T + b_enc_i); y_t = sum_{i<=t} a_i W_dec_i[:, t-i] + b_dec_t."""
    n = len(w)
    a = [jump(xs[i] @ w[i]["W_enc"].T + w[i]["b_enc"], w[i]["threshold"]) if "threshold" in w[i]
         else torch.relu(xs[i] @ w[i]["W_enc"].T + w[i]["b_enc"]) for i in range(n)]
    return torch.stack([sum(a[i] @ w[i]["W_dec"][:, t - i] for i in range(t + 1)) + w[t]["b_dec"] for t in range(n)], 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_circuit_tracer_clt_from_the_hub_cache(hub, dtype):  # noqa: F811
    model = ms.HookedModel(tiny_hf("llama"))
    files, w = ct_clt_files(3, 32, dtype)
    files["config.yaml"] = yaml_text({"model_name": "tiny-llama", "model_kind": "cross_layer_transcoder",
                                      "feature_input_hook": "hook_resid_mid", "feature_output_hook": "hook_mlp_out"})
    hub.put("someone/clt-tiny", files)
    clt = load_replacement("hf://someone/clt-tiny", model)
    assert isinstance(clt, CrossLayerTranscoder) and clt.cfg.reach == 0 and clt.decoders is not None  # lazy
    assert clt.cfg.input_hooks == tuple(act_name("resid_mid", i) for i in range(3))
    assert clt.output_hook(2) == act_name("mlp_out", 2) and clt.cfg.architecture == "jumprelu"
    a = acts(model, clt.cfg.input_hooks)
    want = ct_clt_expected(w, [a[h] for h in clt.cfg.input_hooks])
    torch.testing.assert_close(predict(clt, model), want, rtol=0, atol=2e-5)
    eager = load_replacement("hf://someone/clt-tiny", model, lazy_decoder=False)
    assert eager.decoders is None and torch.equal(predict(eager, model), predict(clt, model))


def test_a_published_name_resolves_through_the_table_and_notes_another_model(hub):  # noqa: F811
    model = ms.HookedModel(tiny_hf("llama"), name="tiny-llama")
    files, w = ct_clt_files(3, 32, threshold=False)
    files["config.yaml"] = yaml_text({"model_name": "meta-llama/Llama-3.2-1B", "model_kind": "cross_layer_transcoder",
                                      "feature_input_hook": "hook_resid_mid", "feature_output_hook": "hook_mlp_out"})
    hub.put("mntss/clt-llama-3.2-1b-524k", files)
    clt = load_replacement("clt-llama-3.2-1b-524k", model)
    assert clt.cfg.architecture == "relu" and "Llama-3.2-1B" in clt.notes[0]
    a = acts(model, clt.cfg.input_hooks)
    torch.testing.assert_close(predict(clt, model), ct_clt_expected(w, [a[h] for h in clt.cfg.input_hooks]),
                               rtol=0, atol=2e-5)
    table = releases()
    assert {"clt-gemma-2-2b-426k", "clt-llama-3.2-1b-524k", "gemma-2-2b-transcoders", "llama-3.2-1b-transcoders",
            "qwen3-0.6b-transcoders-lowl0", "gemma-scope-2-270m-pt-transcoders"} <= set(table)
    assert all(r["uri"].startswith("hf://") and r["source"] and r["model"] for r in table.values())


# ------------------------------------------------------------------------------------------------ transcoder sets
def test_circuit_tracer_transcoder_set_with_skips_and_a_qwen3_style_relu_set(tmp_path):
    model = ms.HookedModel(tiny_hf("llama"))
    d = 32
    w = [{"W_enc": rand(F, d), "W_dec": rand(F, d), "b_enc": rand(F, scale=0.1), "b_dec": rand(d, scale=0.1),
          "activation_function.threshold": torch.rand(F, generator=G) * 0.2, "W_skip": rand(d, d, scale=0.05)}
         for _ in range(3)]
    folder = tmp_path / "set"
    folder.mkdir()
    for i, t in enumerate(w):  # circuit-tracer's SingleLayerTranscoder.to_safetensors layout
        save_file({k: v.contiguous() for k, v in t.items()}, str(folder / f"layer_{i}.safetensors"))
    (folder / "config.yaml").write_bytes(yaml_text({"model_name": "tiny", "model_kind": "transcoder_set",
                                                    "feature_input_hook": "mlp.hook_in",
                                                    "feature_output_hook": "mlp.hook_out"}))
    rep = load_replacement(folder, model)
    assert rep.cfg.reach == 1 and rep.cfg.skip and rep.cfg.input_hooks[1] == model.mlp_input(1)
    a = acts(model, rep.cfg.input_hooks)
    want = torch.stack([jump(a[h] @ t["W_enc"].T + t["b_enc"], t["activation_function.threshold"]) @ t["W_dec"]
                        + t["b_dec"] + a[h] @ t["W_skip"].T for h, t in zip(rep.cfg.input_hooks, w)], 1)
    torch.testing.assert_close(predict(rep, model), want, rtol=0, atol=2e-5)
    # the Qwen3 sets: ReLU, no skip, no config.yaml in some repositories (then the hooks are given)
    relu = tmp_path / "qwen"
    relu.mkdir()
    for i, t in enumerate(w):
        save_file({k: t[k].contiguous() for k in ("W_enc", "W_dec", "b_enc", "b_dec")}, str(relu / f"layer_{i}.safetensors"))
    with pytest.raises(InputError, match="does not say which hooks"):
        load_replacement(relu, model)
    rep = load_replacement(relu, model, input_hook="mlp.hook_in", output_hook="mlp.hook_out")
    want = torch.stack([torch.relu(a[h] @ t["W_enc"].T + t["b_enc"]) @ t["W_dec"] + t["b_dec"]
                        for h, t in zip(rep.cfg.input_hooks, w)], 1)
    assert rep.cfg.architecture == "relu" and not rep.cfg.skip
    torch.testing.assert_close(predict(rep, model), want, rtol=0, atol=2e-5)


def test_gemma_scope_transcoders_listed_by_a_config_read_the_unweighted_norm(hub):  # noqa: F811
    """mwhanna/gemma-scope-transcoders' layout: a config.yaml whose transcoders are hf:// URIs of params.npz files in
    google/gemma-scope-2b-pt-transcoders, reading TransformerLens's ln2.hook_normalized (before the norm's gain)."""
    model = ms.HookedModel(tiny_hf("gemma2"))
    d = 32
    w, uris, files = [], [], {}
    for i in range(3):
        t = {"W_enc": rand(d, F), "W_dec": rand(F, d), "b_enc": rand(F, scale=0.1), "b_dec": rand(d, scale=0.1),
             "threshold": torch.rand(F, generator=G) * 0.2}
        buf = io.BytesIO()
        np.savez(buf, **{k: v.numpy() for k, v in t.items()})
        path = f"layer_{i}/width_16k/average_l0_{50 + i}/params.npz"
        files[path] = buf.getvalue()
        uris.append(f"hf://google/gemma-scope-2b-pt-transcoders/{path}")
        w.append(t)
    hub.put("google/gemma-scope-2b-pt-transcoders", files)
    hub.put("mwhanna/gemma-scope-transcoders", {"config.yaml": yaml_text({
        "model_name": "google/gemma-2-2b", "model_kind": "transcoder_set", "feature_input_hook": "ln2.hook_normalized",
        "feature_output_hook": "hook_mlp_out", "transcoders": uris})})
    rep = load_replacement("gemma-2-2b-transcoders", model)
    assert rep.cfg.input_hooks[0] == model.mlp_input(0) and rep.cfg.output_hooks[2] == act_name("mlp_out", 2)
    want = torch.stack([jump(tl_unweighted(model, i) @ t["W_enc"] + t["b_enc"], t["threshold"]) @ t["W_dec"] + t["b_dec"]
                        for i, t in enumerate(w)], 1)
    torch.testing.assert_close(predict(rep, model), want, rtol=0, atol=1e-4)
    # one layer through load_sae: the release's name says it is a transcoder, and the model's gain is folded in
    one = load_sae("hf://google/gemma-scope-2b-pt-transcoders/layer_1/width_16k/average_l0_51", model)
    assert one.cfg.is_transcoder and one.cfg.hook_name == model.mlp_input(1)
    x = acts(model, [model.mlp_input(1)])[model.mlp_input(1)]
    torch.testing.assert_close(one(x), want[:, 1], rtol=0, atol=1e-4)
    with pytest.raises(InputError, match="pass the model"):
        load_sae("hf://google/gemma-scope-2b-pt-transcoders/layer_1/width_16k/average_l0_51")


def gs2_tensors(d, n_layers=None, layer=None, affine=True):
    """Gemma Scope 2's params.safetensors: w_enc [d, F], w_dec [F, d] (a CLT layer: [F, L, d], zero before its own
    layer), b_enc, b_dec, threshold, affine_skip_connection [d, d] (applied x A)."""
    t = {"w_enc": rand(d, F), "b_enc": rand(F, scale=0.1), "b_dec": rand(d, scale=0.1),
         "threshold": torch.rand(F, generator=G) * 0.2}
    if n_layers is None:
        t["w_dec"] = rand(F, d)
    else:
        t["w_dec"] = rand(F, n_layers, d)
        t["w_dec"][:, :layer] = 0
    if affine:
        t["affine_skip_connection"] = rand(d, d, scale=0.05)
    return t


def test_gemma_scope_2_transcoders_by_variant_with_their_config_json(hub):  # noqa: F811
    model = ms.HookedModel(tiny_hf("gemma3"))
    d = 32
    files, w = {}, []
    for i in range(3):
        for variant in ("width_16k_l0_small_affine", "width_16k_l0_big"):
            t = gs2_tensors(d, affine=variant.endswith("affine"))
            folder = f"transcoder_all/layer_{i}_{variant}"
            files[f"{folder}/params.safetensors"] = st(t)
            files[f"{folder}/config.json"] = json.dumps({  # the keys Gemma Scope 2 writes
                "hf_hook_point_in": f"model.layers.{i}.pre_feedforward_layernorm.output",
                "hf_hook_point_out": f"model.layers.{i}.post_feedforward_layernorm.output", "width": F,
                "model_name": "gemma-v3-270m-pt", "architecture": "jump_relu", "l0": 10,
                "affine_connection": variant.endswith("affine"), "type": "transcoder"}).encode()
            if variant.endswith("affine"):
                w.append(t)
    hub.put("google/gemma-scope-2-270m-pt", files)
    with pytest.raises(InputError, match="give the variant"):
        load_replacement("hf://google/gemma-scope-2-270m-pt/transcoder_all", model)
    rep = load_replacement("hf://google/gemma-scope-2-270m-pt/transcoder_all", model, variant="width_16k_l0_small_affine")
    assert rep.cfg.reach == 1 and rep.cfg.skip and rep.cfg.input_hooks[2] == model.mlp_input(2)
    a = acts(model, rep.cfg.input_hooks)
    want = torch.stack([jump(a[h] @ t["w_enc"] + t["b_enc"], t["threshold"]) @ t["w_dec"] + t["b_dec"]
                        + a[h] @ t["affine_skip_connection"] for h, t in zip(rep.cfg.input_hooks, w)], 1)
    torch.testing.assert_close(predict(rep, model), want, rtol=0, atol=2e-5)
    by_name = load_replacement("gemma-scope-2-270m-pt-transcoders", model)  # the table gives the variant
    assert torch.equal(predict(by_name, model), predict(rep, model))


def test_gemma_scope_2_clt_files_listed_by_a_config(hub):  # noqa: F811
    model = ms.HookedModel(tiny_hf("gemma3"))
    d, n = 32, 3
    w = [gs2_tensors(d, n, i) for i in range(n)]
    files = {f"clt/width_16k/params_layer_{i}.safetensors": st(t) for i, t in enumerate(w)}
    hub.put("google/gemma-scope-2-270m-pt", files)
    hub.put("someone/gemma-scope-2-270m-clt", {"config.yaml": yaml_text({
        "model_name": "google/gemma-3-270m", "model_kind": "cross_layer_transcoder",
        "feature_input_hook": "mlp.hook_in", "feature_output_hook": "hook_mlp_out",
        "transcoders": [f"hf://google/gemma-scope-2-270m-pt/clt/width_16k/params_layer_{i}.safetensors"
                        for i in range(n)]})})
    clt = load_replacement("hf://someone/gemma-scope-2-270m-clt", model)
    assert clt.cfg.reach == 0 and clt.decoders is not None
    a = acts(model, clt.cfg.input_hooks)
    xs = [a[h] for h in clt.cfg.input_hooks]
    act = [jump(xs[i] @ t["w_enc"] + t["b_enc"], t["threshold"]) for i, t in enumerate(w)]
    want = torch.stack([sum(act[i] @ w[i]["w_dec"][:, t] for i in range(t + 1)) + w[t]["b_dec"]
                        + xs[t] @ w[t]["affine_skip_connection"] for t in range(n)], 1)
    torch.testing.assert_close(predict(clt, model), want, rtol=0, atol=2e-5)


# ------------------------------------------------------------------------------------------------ mechscope's own files
def _trained_batchtopk(model):
    from mechscope.sae import TrainConfig, clt_config, train_clt

    toks = torch.randint(3, 90, (8, 10), generator=torch.Generator().manual_seed(2))
    return train_clt(model, toks, clt_config(model, 32, architecture="batchtopk", k=3, skip=True),
                     TrainConfig(steps=20, batch_size=24), progress=False).sae


@pytest.mark.parametrize("case", ["clt", "plt_skip", "tied", "reach2", "topk", "batchtopk"])
@pytest.mark.parametrize("layout", ["circuit_tracer", "gemma_scope_2"])
def test_saved_files_read_back_to_the_same_predictions(case, layout, tmp_path):
    model = ms.HookedModel(tiny_hf("gemma3" if layout == "gemma_scope_2" else "llama"))
    toks = tokens()[:1]
    if case == "batchtopk":
        clt = _trained_batchtopk(model)
    else:
        clt = random_clt(model, toks, architecture="topk" if case == "topk" else "jumprelu", tied=case == "tied",
                         reach={"plt_skip": 1, "reach2": 2}.get(case, 0), skip=case in ("plt_skip", "batchtopk"),
                         input="mlp_in" if layout == "gemma_scope_2" else "resid_mid")
        with torch.no_grad():  # scales, as a trained CLT has them: folded on save
            clt.input_scale.uniform_(0.5, 2.0, generator=G)
            clt.output_scale.uniform_(0.5, 2.0, generator=G)
    path = save_replacement(clt, tmp_path / "saved", layout=layout, model=model)
    back = load_replacement(path, model)
    torch.testing.assert_close(predict(back, model), predict(clt, model), rtol=1e-5, atol=1e-5)
    side = json.loads((path / "mechscope.json").read_text())
    assert side["config"]["reach"] == clt.cfg.reach and back.cfg.tied == clt.cfg.tied
    ct_ok = layout == "circuit_tracer" and case not in ("topk", "batchtopk")
    assert side["circuit_tracer_reads_it"] == ct_ok and (path / "config.yaml").exists() == ct_ok
    if case == "batchtopk":
        assert back.cfg.architecture == "jumprelu" and "skip" in " ".join(side["why_not"])
    if case == "topk":
        assert back.cfg.architecture == "topk" and back.cfg.k == clt.cfg.k


def test_mechscope_per_layer_transcoders_save_in_circuit_tracers_layout(tmp_path):
    from test_clt import _jumprelu_transcoders

    model = ms.HookedModel(tiny_hf("llama"))
    tcs = _jumprelu_transcoders(model)
    clt = CrossLayerTranscoder.from_transcoders(tcs)
    path = save_replacement(clt, tmp_path / "plt")
    assert sorted(p.name for p in path.iterdir()) == ["config.yaml", "layer_0.safetensors", "layer_1.safetensors",
                                                      "layer_2.safetensors", "mechscope.json"]
    from safetensors import safe_open

    with safe_open(str(path / "layer_1.safetensors"), "pt") as f:  # circuit-tracer's SingleLayerTranscoder names
        assert set(f.keys()) == {"W_enc", "W_dec", "b_enc", "b_dec", "activation_function.threshold", "W_skip"}
        assert f.get_slice("W_enc").get_shape() == [40, 32] and f.get_slice("W_skip").get_shape() == [32, 32]
    import yaml

    assert yaml.safe_load((path / "config.yaml").read_text()) == {
        "model_name": model.cfg.model_name, "model_kind": "transcoder_set", "feature_input_hook": "mlp.hook_in",
        "feature_output_hook": "hook_mlp_out"}
    x = torch.randn(5, 32)
    back = load_replacement(path, model)
    for layer, tc in enumerate(tcs):
        torch.testing.assert_close(back.encode(layer, x), tc.encode(x), rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------ refusals
def test_every_bad_replacement_is_refused_before_any_compute(tmp_path, hub):  # noqa: F811
    model = ms.HookedModel(tiny_hf("llama"))
    files, _ = ct_clt_files(3, 32)
    conf = {"model_name": "x", "model_kind": "cross_layer_transcoder", "feature_input_hook": "hook_resid_mid",
            "feature_output_hook": "hook_mlp_out"}

    def folder(name, drop=(), change=None, config=conf):
        f = tmp_path / name
        f.mkdir()
        for k, v in files.items():
            if k not in drop:
                (f / k).write_bytes(v)
        for k, v in (change or {}).items():
            (f / k).write_bytes(v)
        if config is not None:
            (f / "config.yaml").write_bytes(yaml_text(config))
        return f

    with pytest.raises(NotFoundError, match="lacks W_dec_1.safetensors"):
        load_replacement(folder("missing", drop=("W_dec_1.safetensors",)), model)
    two, _ = ct_clt_files(2, 32)  # a well-formed CLT of another model's depth
    short = tmp_path / "short"
    short.mkdir()
    for k, v in two.items():
        (short / k).write_bytes(v)
    (short / "config.yaml").write_bytes(yaml_text(conf))
    with pytest.raises(InputError, match=r"has 2 layers, but .* has 3"):
        load_replacement(short, model)
    with pytest.raises(InputError, match=r"W_dec_1 has shape \(24, 3, 32\); .* needs \[24, 2, 32\]"):
        load_replacement(folder("dec", change={"W_dec_1.safetensors": st({"W_dec_1": rand(F, 3, 32)})}), model)
    wide, _ = ct_clt_files(3, 40)
    with pytest.raises(InputError, match="reads width 40, but .* has d_model 32"):
        f = tmp_path / "wide"
        f.mkdir()
        for k, v in wide.items():
            (f / k).write_bytes(v)
        (f / "config.yaml").write_bytes(yaml_text(conf))
        load_replacement(f, model)
    with pytest.raises(KeyError, match="unknown transcoder hook 'blocks.hook_nowhere'"):
        load_replacement(folder("hook", config={**conf, "feature_input_hook": "blocks.hook_nowhere"}), model)
    with pytest.raises(InputError, match="post-MLP norm"):  # the MLP's own output is not a hook on Gemma 3
        gemma = ms.HookedModel(tiny_hf("gemma3"))
        load_replacement(folder("post", config={**conf, "feature_output_hook": "mlp.hook_out"}), gemma)
    buf = io.BytesIO()
    torch.save({"W_enc_0": torch.zeros(2, 2)}, buf)
    with pytest.raises(InputError, match="is a pickle .* would run code"):
        load_replacement(folder("pickle", change={"W_enc_0.safetensors": buf.getvalue()}), model)
    with pytest.raises(InputError, match="not a floating type"):
        load_replacement(folder("ok"), model, dtype=torch.int8)
    ints = {**files, "W_dec_0.safetensors": st({"W_dec_0": torch.zeros(F, 3, 32, dtype=torch.int32)})}
    g = tmp_path / "ints"
    g.mkdir()
    for k, v in ints.items():
        (g / k).write_bytes(v)
    (g / "config.yaml").write_bytes(yaml_text(conf))
    with pytest.raises(InputError, match="I32, not a floating type"):
        load_replacement(g, model)
    with pytest.raises(NotFoundError, match="not in the Hugging Face cache"):
        load_replacement("hf://nobody/absent-clt", model)
    with pytest.raises(KeyError, match="neither a folder nor a published replacement"):
        load_replacement("clt-gpt5-unknown", model)
    with pytest.raises(TypeError, match="needs the model"):
        load_replacement(folder("nomodel"))
    assert isinstance(load_replacement(folder("fine"), model), CrossLayerTranscoder)  # the control: good files load


def test_gemma_scope_folders_never_guess_their_site(tmp_path, hub):  # noqa: F811
    """Once a local Gemma Scope folder defaulted to resid_post whatever it held; the site now comes from the release's
    name and the layer folder, and a folder whose site cannot be known is refused."""
    t = {"W_enc": rand(32, F), "W_dec": rand(F, 32), "b_enc": rand(F), "b_dec": rand(32),
         "threshold": torch.rand(F, generator=G) * 0.2}
    buf = io.BytesIO()
    np.savez(buf, **{k: v.numpy() for k, v in t.items()})
    local = tmp_path / "my-saes" / "layer_2" / "width_16k" / "average_l0_50"
    local.mkdir(parents=True)
    (local / "params.npz").write_bytes(buf.getvalue())
    with pytest.raises(InputError, match="cannot tell which hook .* names no release"):
        load_sae(local)
    assert load_sae(local, hook="blocks.2.hook_mlp_out").cfg.hook_name == "blocks.2.hook_mlp_out"
    for repo, hook in (("google/gemma-scope-2b-pt-mlp", "blocks.2.hook_mlp_out"),
                       ("google/gemma-scope-2b-pt-att", "blocks.2.attn.hook_z"),
                       ("google/gemma-scope-2b-pt-res", "blocks.2.hook_resid_post")):
        hub.put(repo, {"layer_2/width_16k/average_l0_50/params.npz": buf.getvalue()})
        assert load_sae(f"hf://{repo}/layer_2/width_16k/average_l0_50").cfg.hook_name == hook
        cached = next((hub.root / f"models--{repo.replace('/', '--')}" / "snapshots").iterdir())
        assert load_sae(cached / "layer_2/width_16k/average_l0_50").cfg.hook_name == hook  # the local cache path too


def test_graph_cli_builds_a_neuronpedia_graph_from_a_published_name(hub, tmp_path, monkeypatch, capsys):  # noqa: F811
    from mechscope.cli import main
    from tiny import worded_llama

    model = worded_llama()
    files, _ = ct_clt_files(3, 32)
    files["config.yaml"] = yaml_text({"model_name": "meta-llama/Llama-3.2-1B", "model_kind": "cross_layer_transcoder",
                                      "feature_input_hook": "hook_resid_mid", "feature_output_hook": "hook_mlp_out"})
    hub.put("mntss/clt-llama-3.2-1b-524k", files)
    monkeypatch.setattr(ms, "load", lambda *a, **k: model)
    assert main(["graph", "t5 t6 t7 t8", "--transcoders", "clt-llama-3.2-1b-524k", "--json-graph",
                 str(tmp_path / "g.json"), "--quiet", "--json"]) == 0
    doc = json.loads((tmp_path / "g.json").read_text())
    assert doc["metadata"]["scan"] == "mntss/clt-llama-3.2-1b-524k" and doc["nodes"]
    out = json.loads(capsys.readouterr().out)
    assert "cross-layer transcoder" in out["stats"]["replacement"]


LAZY = textwrap.dedent('''
    import resource, sys, json, torch
    sys.path.insert(0, sys.argv[1])
    import mechscope as ms
    from mechscope.sae import load_replacement
    from mechscope.graphs import attribution_graph
    from tiny import tiny_hf, CONFIGS
    import transformers as T
    torch.manual_seed(0)
    model = ms.HookedModel(T.AutoModelForCausalLM.from_config(
        T.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=8, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)).eval())
    toks = torch.randint(3, 90, (1, 8), generator=torch.Generator().manual_seed(0))
    model(toks)
    def status(field):
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith(field)) * 1024
    data_bytes = lambda: status("VmData")
    base, rss0 = data_bytes(), status("VmRSS")
    cap = base + int(sys.argv[3])
    resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
    lazy = sys.argv[4] == "lazy"
    try:
        clt = load_replacement(sys.argv[2], model, lazy_decoder=lazy)
        g = attribution_graph(model, clt, toks, max_feature_nodes=200, progress=False, certify=8)
        print(json.dumps({"ok": True, "features": g.stats["active_features"], "worst": g.certificate["worst_rel"],
                          "peak_above_start": status("VmHWM") - rss0}))
    except MemoryError:
        print(json.dumps({"ok": False}))
''')


def test_lazy_decoders_keep_a_graph_below_the_clts_size_under_a_memory_cap(tmp_path):
    """A CLT whose decoders (302 MB on disk) do not fit under the cap: the graph runs with lazy decoders (only the
    active features' rows are read), and the control, reading the decoders whole, fails under the same cap."""
    n, d, Fw = 8, 32, 65536
    folder = tmp_path / "big"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(n):  # circuit-tracer's CLT layout; biases put ~0.1% of the features above their threshold
        save_file({f"W_enc_{i}": torch.randn(Fw, d, generator=g) * 0.2, f"b_enc_{i}": torch.randn(Fw, generator=g) * 0.3,
                   f"b_dec_{i}": torch.zeros(d), f"threshold_{i}": torch.full((Fw,), 0.9)},
                  str(folder / f"W_enc_{i}.safetensors"))
        save_file({f"W_dec_{i}": torch.randn(Fw, n - i, d, generator=g) * 0.05}, str(folder / f"W_dec_{i}.safetensors"))
    (folder / "config.yaml").write_bytes(yaml_text({"model_name": "big", "model_kind": "cross_layer_transcoder",
                                                    "feature_input_hook": "hook_resid_mid",
                                                    "feature_output_hook": "hook_mlp_out"}))
    dec_bytes = sum(p.stat().st_size for p in folder.glob("W_dec_*"))
    assert dec_bytes > 300e6
    cap = 200 * 2**20  # above the process before loading: room for the encoders (67 MB) and the graph, not the decoders

    def run(mode):
        r = subprocess.run([sys.executable, "-c", LAZY, str(__import__("pathlib").Path(__file__).parent), str(folder),
                            str(cap), mode], capture_output=True, text=True, env={**__import__("os").environ,
                                                                                  "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stderr[-2000:]
        return json.loads(r.stdout.strip().splitlines()[-1])

    lazy = run("lazy")
    assert lazy["ok"] and lazy["features"] > 20 and lazy["worst"] < 1e-4
    assert lazy["peak_above_start"] < dec_bytes / 2  # measured: 0.14 GB (the encoders, the graph) for 0.3 GB
    assert not run("eager")["ok"]  # the same files read whole do not fit


@pytest.mark.slow
@pytest.mark.parametrize("reach", [1, 0])
def test_a_gemma_3_270m_graph_on_gemma_scope_2_files_written_by_mechscope(gemma3, reach, tmp_path):
    """The shipped Gemma 3 270M (sandwich norms, sliding and global attention): random transcoders (reach 1) and a
    random CLT (reach 0) written by mechscope in Gemma Scope 2's layout, read back from that layout alone (the
    sidecar removed: hooks from each config.json's HF module points), give a graph whose edges are real
    perturbations."""
    from mechscope.graphs.attribute import graph_tokens

    model = gemma3
    toks, _ = graph_tokens(model, "The capital of France is")
    clt = random_clt(model, toks, d_sae=192, k=4, reach=reach, skip=True, input="mlp_in")
    path = save_replacement(clt, tmp_path / "gs2", layout="gemma_scope_2", model=model)
    conf = json.loads((path / ("params_layer_3.json" if reach == 0 else "layer_3/config.json")).read_text())
    assert conf["hf_hook_point_in"].endswith("pre_feedforward_layernorm.output")
    assert conf["hf_hook_point_out"].endswith("post_feedforward_layernorm.output")
    (path / "mechscope.json").unlink()
    rep = load_replacement(path, model)
    assert rep.cfg.reach == reach and rep.cfg.input_hooks == clt.cfg.input_hooks
    torch.testing.assert_close(predict(rep, model), predict(clt, model), rtol=1e-5, atol=1e-4)
    g = attribution_graph(model, rep, "The capital of France is", max_feature_nodes=256, progress=False, certify=32)
    assert g.stats["active_features"] > 100 and g.certificate["worst_rel"] < 1e-4, g.summary()
    assert 0 < g.scores()["replacement"] < 1


def test_estimate_sizes_a_graph_on_a_published_or_local_replacement(tmp_path, capsys):
    from mechscope.cli import main
    from mechscope.compute import estimate_replacement
    from mechscope.sae.replacement import release_sizes

    e = estimate_replacement("clt-gemma-2-2b-426k", **{k: release_sizes("clt-gemma-2-2b-426k")[k] for k in
                                                        ("kind", "n_layers", "d_model", "features_per_layer")})
    assert e.decoder_blocks == 26 * 27 // 2 and e.parts()["decoders on disk"] == 351 * 16384 * 2304 * 4
    assert e.parts()["encoders"] == 26 * 2304 * 16384 * 4 + 26 * (16384 + 2304) * 4
    assert main(["estimate", "--transcoders", "clt-gemma-2-2b-426k", "--seq-len", "64", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["replacement"]["parts_bytes"]["decoders on disk"] == 351 * 16384 * 2304 * 4
    assert out["n_params"] > 2e9  # the model the table names, sized offline
    files, _ = ct_clt_files(3, 32, torch.bfloat16)  # a local CLT: sized from its headers
    for k, v in files.items():
        (tmp_path / k).write_bytes(v)
    sizes = release_sizes(str(tmp_path))
    assert sizes == {"model": "", "kind": "cross_layer_transcoder", "n_layers": 3, "d_model": 32,
                     "features_per_layer": F, "dtype": "bfloat16"}
    unknown = estimate_replacement("x", "transcoder_set", 16, 2048, None)
    assert "not in mechscope's table" in unknown.summary()
