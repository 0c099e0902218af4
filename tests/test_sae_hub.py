"""Pretrained SAEs from the hub, offline: each published format written into a Hugging Face cache of the real
layout (blobs, snapshots/<sha>, refs/<revision>) and loaded with HF_HUB_OFFLINE=1 through the same code path an
online user takes. Each format's maths is written out independently here and compared."""

import hashlib
import io
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save

from mechscope import HookedModel
from mechscope.core.errors import InputError, NotFoundError
from mechscope.sae import load_sae
from mechscope.sae.hub import releases
from tiny import tiny_hf

D_IN, D_SAE = 32, 24
G = torch.Generator().manual_seed(0)
X = torch.randn(6, D_IN, generator=G)


class HubCache:
    """A Hugging Face hub cache in a temporary folder, in the layout huggingface_hub reads."""

    def __init__(self, root):
        self.root = root

    def put(self, repo: str, files: dict[str, bytes], revision: str = "main") -> str:
        folder = self.root / f"models--{repo.replace('/', '--')}"
        sha = hashlib.sha1(repr((repo, revision, sorted(files))).encode()).hexdigest()
        for rel, data in files.items():
            blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(data)
            link = folder / "snapshots" / sha / rel
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(blob)
        (folder / "refs").mkdir(parents=True, exist_ok=True)
        (folder / "refs" / revision).write_text(sha)
        return sha


@pytest.fixture
def hub(tmp_path, monkeypatch):
    import huggingface_hub.constants as C

    monkeypatch.setattr(C, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(C, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return HubCache(tmp_path / "hub")


def rand(*shape):
    return torch.randn(*shape, generator=G) * 0.3


def st(tensors):
    return save({k: v.contiguous() for k, v in tensors.items()})


def saelens_files(prefix, hook):
    w = {"W_enc": rand(D_IN, D_SAE), "W_dec": rand(D_SAE, D_IN), "b_enc": rand(D_SAE), "b_dec": rand(D_IN)}
    cfg = {"architecture": "standard", "d_in": D_IN, "d_sae": D_SAE, "apply_b_dec_to_input": True,
           "normalize_activations": "none", "metadata": {"hook_name": hook, "model_name": "gpt2"}}
    return {f"{prefix}/cfg.json": json.dumps(cfg).encode(), f"{prefix}/sae_weights.safetensors": st(w)}, w


def test_saelens_release_by_name(hub):
    files, w = saelens_files("blocks.8.hook_resid_pre", "blocks.8.hook_resid_pre")
    hub.put("jbloom/GPT2-Small-SAEs-Reformatted", files)
    sae = load_sae(release="gpt2-small-res-jb", sae_id="blocks.8.hook_resid_pre")
    f = torch.relu((X - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
    torch.testing.assert_close(sae(X), f @ w["W_dec"] + w["b_dec"])
    assert sae.cfg.hook_name == "blocks.8.hook_resid_pre"


def test_gemma_scope_canonical_release_and_hf_path(hub):
    w = {"W_enc": rand(D_IN, D_SAE), "W_dec": rand(D_SAE, D_IN), "b_enc": rand(D_SAE), "b_dec": rand(D_IN),
         "threshold": torch.rand(D_SAE, generator=G) * 0.2}
    buf = io.BytesIO()
    np.savez(buf, **{k: v.numpy() for k, v in w.items()})
    hub.put("google/gemma-scope-2b-pt-res", {"layer_3/width_16k/average_l0_59/params.npz": buf.getvalue()})
    canonical = load_sae(release="gemma-scope-2b-pt-res-canonical", sae_id="layer_3/width_16k/canonical")
    direct = load_sae("hf://google/gemma-scope-2b-pt-res/layer_3/width_16k/average_l0_59")
    pre = X @ w["W_enc"] + w["b_enc"]  # Gemma Scope does not subtract b_dec before encoding
    want = (pre * (pre > w["threshold"])) @ w["W_dec"] + w["b_dec"]
    for sae in (canonical, direct):
        torch.testing.assert_close(sae(X), want)
        assert sae.cfg.hook_name == "blocks.3.hook_resid_post" and sae.cfg.architecture == "jumprelu"


def test_llama_scope_release(hub):
    enc, dec = rand(D_SAE, D_IN), rand(D_IN, D_SAE)
    b_enc, b_dec = rand(D_SAE), rand(D_IN)
    norm = 7.0
    hp = {"d_model": D_IN, "d_sae": D_SAE, "hook_point_in": "blocks.5.hook_resid_post",
          "hook_point_out": "blocks.5.hook_resid_post", "jump_relu_threshold": 0.1,
          "dataset_average_activation_norm": {"in": norm, "out": norm}, "apply_decoder_bias_to_pre_encoder": False}
    hub.put("fnlp/Llama3_1-8B-Base-LXR-8x", {
        "Llama3_1-8B-Base-L5R-8x/hyperparams.json": json.dumps(hp).encode(),
        "Llama3_1-8B-Base-L5R-8x/checkpoints/final.safetensors": st({"encoder.weight": enc, "encoder.bias": b_enc,
                                                                     "decoder.weight": dec, "decoder.bias": b_dec})})
    sae = load_sae(release="llama_scope_lxr_8x", sae_id="l5r_8x")
    s = D_IN ** 0.5 / norm  # inputs scaled to norm sqrt(d_in); outputs scaled back
    pre = (X * s) @ enc.T + b_enc
    torch.testing.assert_close(sae(X), ((pre * (pre > 0.1)) @ dec.T + b_dec) / s, atol=1e-5, rtol=1e-5)
    assert sae.cfg.hook_name == "blocks.5.hook_resid_post"


def test_sparsify_release(hub):
    enc, W_dec, b_enc, b_dec = rand(D_SAE, D_IN), rand(D_SAE, D_IN), rand(D_SAE), rand(D_IN)
    cfg = {"d_in": D_IN, "num_latents": D_SAE, "k": 4, "normalize_decoder": True, "expansion_factor": 1}
    hub.put("EleutherAI/sae-llama-3-8b-32x", {"layers.7/cfg.json": json.dumps(cfg).encode(),
                                              "layers.7/sae.safetensors": st({"encoder.weight": enc,
                                                                              "encoder.bias": b_enc, "W_dec": W_dec,
                                                                              "b_dec": b_dec})})
    sae = load_sae(release="sae-llama-3-8b-32x", sae_id="layers.7")
    pre = torch.relu(X @ enc.T + b_enc)
    v, i = pre.topk(4, dim=-1)
    f = torch.zeros_like(pre).scatter(-1, i, v)
    torch.testing.assert_close(sae(X), f @ W_dec + b_dec)
    assert sae.cfg.hook_name == "blocks.7.hook_resid_post" and sae.cfg.k == 4


def test_dictionary_learning_release_reads_with_weights_only(hub):
    enc, dec, b_enc, b_dec = rand(D_SAE, D_IN), rand(D_IN, D_SAE), rand(D_SAE), rand(D_IN)
    buf = io.BytesIO()
    torch.save({"encoder.weight": enc, "encoder.bias": b_enc, "decoder.weight": dec, "bias": b_dec}, buf)
    conf = {"trainer": {"dict_class": "AutoEncoder", "activation_dim": D_IN, "dict_size": D_SAE, "layer": 11,
                        "lm_name": "meta-llama/Llama-3.1-8B-Instruct", "submodule_name": "resid_post_layer_11"}}
    hub.put("andyrdt/saes-llama-3.1-8b-instruct", {"resid_post_layer_11/trainer_1/ae.pt": buf.getvalue(),
                                                    "resid_post_layer_11/trainer_1/config.json": json.dumps(conf).encode()})
    sae = load_sae(release="llama-3.1-8b-instruct-andyrdt", sae_id="resid_post_layer_11_trainer_1")
    f = torch.relu((X - b_dec) @ enc.T + b_enc)
    torch.testing.assert_close(sae(X), f @ dec.T + b_dec)
    assert sae.cfg.hook_name == "blocks.11.hook_resid_post"


def test_revision_pins_and_offline_misses(hub):
    files_a, w_a = saelens_files("sae", "blocks.1.hook_resid_post")
    files_b, w_b = saelens_files("sae", "blocks.1.hook_resid_post")
    hub.put("me/saes", files_a, revision="main")
    hub.put("me/saes", files_b, revision="v2")
    a, b = load_sae("hf://me/saes/sae"), load_sae("hf://me/saes@v2/sae")
    assert torch.equal(a.W_enc, w_a["W_enc"]) and torch.equal(b.W_enc, w_b["W_enc"])
    assert torch.equal(load_sae("hf://me/saes/sae", revision="v2").W_enc, w_b["W_enc"])
    with pytest.raises(NotFoundError, match="not in the Hugging Face cache"):
        load_sae("hf://me/other-saes/sae")
    with pytest.raises(InputError, match="unknown SAE release 'nope'"):
        load_sae(release="nope", sae_id="x")
    with pytest.raises(InputError, match="has no SAE 'blocks.99.hook_resid_pre'"):
        load_sae(release="gpt2-small-res-jb", sae_id="blocks.99.hook_resid_pre")


def test_the_release_table_cites_its_sources():
    rel = releases()
    assert {"gpt2-small-res-jb", "gemma-scope-2b-pt-res-canonical", "llama_scope_lxr_8x", "sae-llama-3-8b-32x"} <= set(rel)
    for name, r in rel.items():
        assert r["source"] and r["repo_id"] and r["format"] and r["saes"], name
        assert all(s["hook"].startswith("blocks.") for s in r["saes"].values()), name


def test_damaged_and_unsafe_sae_files_get_clear_errors(tmp_path):
    files, w = saelens_files("s", "blocks.1.hook_resid_post")
    good = tmp_path / "good"
    good.mkdir()
    (good / "cfg.json").write_bytes(files["s/cfg.json"])
    (good / "sae_weights.safetensors").write_bytes(files["s/sae_weights.safetensors"])
    assert load_sae(good).cfg.d_in == D_IN
    trunc = tmp_path / "trunc"
    trunc.mkdir()
    (trunc / "cfg.json").write_bytes(files["s/cfg.json"])
    (trunc / "sae_weights.safetensors").write_bytes(files["s/sae_weights.safetensors"][:200])
    with pytest.raises(NotFoundError, match="sae_weights.safetensors is damaged or truncated"):
        load_sae(trunc)
    (trunc / "cfg.json").write_text("{not json")
    with pytest.raises(InputError, match="is not valid JSON"):
        load_sae(trunc)
    (trunc / "cfg.json").write_text(json.dumps({"architecture": "standard", "d_sae": 3}))
    with pytest.raises(InputError, match="has no 'd_in'"):
        load_sae(trunc)
    nan = tmp_path / "nan"
    nan.mkdir()
    (nan / "cfg.json").write_bytes(files["s/cfg.json"])
    bad = dict(w, W_dec=w["W_dec"].clone().index_fill_(0, torch.tensor([2]), float("nan")))
    (nan / "sae_weights.safetensors").write_bytes(st(bad))
    with pytest.raises(InputError, match="W_dec holds NaN"):
        load_sae(nan)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save({"encoder.weight": torch.zeros(2, 2), "obj": _Thing()}, pickled / "ae.pt")
    (pickled / "config.json").write_text(json.dumps({"trainer": {"dict_class": "AutoEncoder", "activation_dim": 2,
                                                                 "dict_size": 2, "layer": 0}}))
    with pytest.raises(InputError, match="would run code when loaded"):
        load_sae(pickled)
    with pytest.raises(NotFoundError, match="not an SAE folder in a format mechscope reads"):
        load_sae(tmp_path)


class _Thing:
    pass


def test_a_hub_sae_is_checked_against_the_model(hub):
    files, _ = saelens_files("sae", "blocks.1.hook_resid_post")
    hub.put("me/llama-saes", files)
    model = HookedModel(tiny_hf("llama"))  # d_model 32: fits
    assert load_sae("hf://me/llama-saes/sae", model).cfg.d_in == 32
    wide = HookedModel(tiny_hf("gpt2"))
    assert wide.cfg.d_model == 32
    files2, _ = saelens_files("sae", "blocks.1.mlp.hook_post")  # the MLP hidden layer is 48 wide, not 32
    hub.put("me/mlp-saes", files2)
    with pytest.raises(InputError, match="d_in=32"):
        load_sae("hf://me/mlp-saes/sae", model)
