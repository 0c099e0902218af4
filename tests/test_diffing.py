"""Model diffing on a tiny pair: PEFT adapters and dictionary_learning crosscoders in their own tools' layouts, every
method against a plain computation, the refusals, organisms with a known answer, and `mechscope diff` end to end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mechscope import HookedModel
from mechscope.core.errors import InputError
from mechscope.diffing import (
    LoraAdapter,
    activation_difference,
    harvest_pair,
    kl_diff,
    latent_classes,
    latent_scaling,
    layer_norms,
    load_pair,
    logit_lens_readout,
    patchscope_readout,
    state_transfer,
    steering_readout,
    token_effect_readout,
    weight_diff,
)
from mechscope.diffing.crosscoding import crosscoder_config, evaluate_crosscoder, train_crosscoder
from mechscope.diffing.organisms import (
    OrganismSpec,
    domain_documents,
    domain_token_ids,
    draw_domain,
    pack_documents,
    recovery,
    train_lora,
)
from mechscope.sae.crosscoder import Crosscoder, CrosscoderConfig, load_crosscoder, save_crosscoder
from mechscope.sae.train import TrainConfig, fit_sae, fit_saes
from tiny import V, tiny_hf, worded_llama

FIX = Path(__file__).parent / "fixtures" / "diffing"
HOOK = "blocks.1.hook_resid_post"


def _noisy_adapter(model: HookedModel, seed: int = 0, scale: float = 0.3) -> LoraAdapter:
    ad = LoraAdapter.new(model.hf, r=4, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n in ad.names:
            ad.layer(n).B.copy_(torch.randn(ad.layer(n).B.shape, generator=g) * scale)
    return ad


@pytest.fixture(scope="module")
def pair():
    m = worded_llama()
    return load_pair(m, adapter=_noisy_adapter(m))


def _docs(n: int = 24, length: int = 12, seed: int = 9) -> torch.Tensor:
    t = torch.randint(2, V, (n, length), generator=torch.Generator().manual_seed(seed))
    t[:, 0] = 0
    return t


# ------------------------------------------------------------------------------------------------ adapters


def test_peft_written_adapters_give_peft_logits_and_switch_off_to_the_base_bit_for_bit():
    """Adapters written by peft 0.21 (rank_pattern, alpha_pattern, rsLoRA) give peft's own logits; switched off, the
    base model's logits to the bit."""
    from mechscope import load

    exp = load_file(str(FIX / "peft" / "expected.safetensors"))
    tokens = exp["tokens"]
    for name in ("lora", "rslora"):
        p = load_pair(load(str(FIX / "peft" / "base")), FIX / "peft" / name)
        assert p.shares_weights and p.same_vocab
        with p.side("ft") as m:
            ft = m(tokens)
        with p.side("base") as m:
            base = m(tokens)
        assert (ft - exp[name]).abs().max() < 1e-5, name
        assert torch.equal(base, exp["base"]), name
        assert (ft - base).abs().max() > 1e-2  # the adapter does something
        p.adapter.detach()


def test_an_adapter_variant_that_changes_more_than_A_and_B_is_refused_by_name():
    with pytest.raises(InputError, match="use_dora=True"):
        LoraAdapter.read(FIX / "peft" / "dora")


def test_the_adapter_path_equals_the_merged_model_and_its_saved_layout_is_peft_s(tmp_path):
    """Base + adapter (hooks) against a plain model with ``W + s B A`` merged in; then saved and read back."""
    m = worded_llama()
    ad = _noisy_adapter(m)
    merged = tiny_hf("llama")
    with torch.no_grad():
        params = dict(merged.named_parameters())
        for n in ad.names:
            params[f"{n}.weight"] += ad.delta(n)
    toks = _docs(4)
    p = load_pair(m, adapter=ad)
    with p.side("ft") as ft:
        a = ft(toks)
    b = HookedModel(merged)(toks)
    assert (a - b).abs().max() < 1e-5
    ad.save(tmp_path / "ad", base_model="tiny")
    keys = set(load_file(str(tmp_path / "ad" / "adapter_model.safetensors")))
    assert keys == {f"base_model.model.{n}.lora_{x}.weight" for n in ad.names for x in "AB"}
    back = LoraAdapter.read(tmp_path / "ad")
    for n in ad.names:
        assert torch.equal(back.layer(n).A, ad.layer(n).A) and back.layer(n).scale == ad.layer(n).scale
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    p.adapter.detach()


def test_pairs_that_do_not_fit_are_refused_with_what_differs(tmp_path):
    import transformers as T

    m = worded_llama()
    wide = HookedModel(T.AutoModelForCausalLM.from_config(T.LlamaConfig(
        vocab_size=V, hidden_size=64, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2)))
    with pytest.raises(InputError, match="d_model 32 .* 64"):
        load_pair(m, wide)
    deeper = HookedModel(T.AutoModelForCausalLM.from_config(T.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2)))
    with pytest.raises(InputError, match="different architectures .*n_layers: 3 vs 4"):
        load_pair(m, deeper)
    # an adapter for another base: its shapes do not fit
    ad = LoraAdapter.new(wide.hf, r=2)
    with pytest.raises(InputError, match="trained on another base model"):
        load_pair(m, adapter=ad)
    # an adapter recorded as trained on another model: refused unless told it is the same one
    named = HookedModel(tiny_hf("llama"), name="org/tiny-base")
    _noisy_adapter(m).save(tmp_path / "other", base_model="org/some-other-model")
    with pytest.raises(InputError, match="was trained on 'org/some-other-model'.*check_base=False"):
        load_pair(named, tmp_path / "other")
    p = load_pair(named, tmp_path / "other", check_base=False)
    assert any("some-other-model" in n for n in p.notes)
    p.adapter.detach()
    with pytest.raises(InputError, match="not both"):
        load_pair(m, m, adapter=tmp_path / "other")


def test_a_pair_with_different_vocabularies_refuses_kl_but_reads_weights(tmp_path):
    from mechscope.circuits.toy import toy_tokenizer

    a = worded_llama()
    b = HookedModel(tiny_hf("llama", seed=1), tokenizer=toy_tokenizer(V))
    vocab = dict(b.tokenizer.get_vocab())
    b.tokenizer.add_tokens(["zzz"])
    p = load_pair(a, b)
    assert not p.same_vocab and any("only in the fine-tune" in n for n in p.notes), (p.notes, len(vocab))
    with pytest.raises(InputError, match="vocabularies differ"):
        kl_diff(p, _docs(4))
    assert weight_diff(p).modules  # the weights still compare


# ------------------------------------------------------------------------------------------------ methods


def test_kl_and_loss_differences_equal_a_plain_computation(pair):
    toks = _docs(12)
    r = kl_diff(pair, toks)
    with torch.no_grad(), pair.side("base") as m:
        lq = torch.log_softmax(m(toks)[:, :-1].float(), -1)
    with torch.no_grad(), pair.side("ft") as m:
        lp = torch.log_softmax(m(toks)[:, :-1].float(), -1)
    kl = (lp.exp() * (lp - lq)).sum(-1).mean(-1)
    assert abs(r.kl.value - float(kl.mean())) < 1e-5 and r.kl.n == 12
    assert r.kl.excludes(0.0) and r.n_tokens == 12 * 11
    # an identical pair: every divergence is exactly zero
    m = worded_llama()
    ad = LoraAdapter.new(m.hf, r=2)  # B = 0: the identity
    same = kl_diff(load_pair(m, adapter=ad), toks)
    assert same.kl.value == 0.0 and same.loss_diff.value == 0.0
    assert "nats" in r.summary() and "control (split-half)" in r.summary()


def test_the_activation_difference_equals_a_cache_difference_and_its_readouts_have_controls(pair):
    toks = _docs(16)
    adl = activation_difference(pair, toks, HOOK, first=4)
    with pair.side("base") as m:
        hb = m.run_with_cache(toks, names_filter=[HOOK])[1][HOOK][:, 1:5]
    with pair.side("ft") as m:
        hf = m.run_with_cache(toks, names_filter=[HOOK])[1][HOOK][:, 1:5]
    assert torch.allclose(adl.delta, (hf - hb).mean((0, 1)), atol=1e-5)
    assert abs(adl.norm.value - float((hf - hb).mean((0, 1)).norm())) < 1e-4
    ll, ps = logit_lens_readout(pair, adl), patchscope_readout(pair, adl)
    st = steering_readout(pair, adl, max_new_tokens=4, prompts=("t5 t6", "t7"))
    assert len(ll.tokens) == len(ll.control) == 20 and [t for t, _ in ll.tokens] != [t for t, _ in ll.control]
    assert len(ps.tokens) == 20 and st.texts and st.texts != st.control_texts
    # the next-token effect: δ added at positions 1..4 of the base run, the mean rise of each token's log-probability
    te = token_effect_readout(pair, adl, toks, k=5)
    with pair.side("base") as m, torch.no_grad():
        before = torch.log_softmax(m(toks[:, :5]).float(), -1)[:, 1:5].mean((0, 1))

        def add(act, hook):
            act = act.clone()
            act[:, 1:5] += adl.delta
            return act
        with m.hooks([(HOOK, add)]):
            rise = torch.log_softmax(m(toks[:, :5]).float(), -1)[:, 1:5].mean((0, 1)) - before
    val, idx = rise.topk(5)
    assert [t for t, _ in te.tokens] == [m.tokenizer.decode([int(i)]) for i in idx]
    assert torch.allclose(torch.tensor([v for _, v in te.tokens]), val, atol=1e-5) and te.control != te.tokens
    with pytest.raises(InputError, match="first=20"):
        activation_difference(pair, toks, HOOK, first=20)


def test_state_transfer_is_a_patch_from_the_fine_tune_and_the_last_layer_gives_its_predictions(pair):
    toks = _docs(16)
    st = state_transfer(pair, toks, first=4, n_boot=200)
    L = pair.cfg.n_layers
    assert st.layers == sorted(set(range(L))) and st.positions == [1, 2, 3, 4] and st.n_docs == 16
    # the adapter leaves the final norm and the unembedding alone: the last layer's state is the fine-tune's output
    assert abs(st.state[-1].value - 1.0) < 1e-4 and st.first_reaching(0.5) is not None
    # a plain computation of one layer's shares: KL(ft || patched) against KL(ft || base) over positions 1..4
    h = f"blocks.{st.layers[0]}.hook_resid_post"
    t = toks[:, :5]
    with pair.side("ft") as m, torch.no_grad():
        hf = m.run_with_cache(t, names_filter=[h])[1][h]
        lp = torch.log_softmax(m(t).float(), -1)[:, 1:5]
    with pair.side("base") as m, torch.no_grad():
        hb = m.run_with_cache(t, names_filter=[h])[1][h]

        def kl(logits):
            return float((lp.exp() * (lp - torch.log_softmax(logits.float(), -1)[:, 1:5])).sum(-1).mean())
        kb = kl(m(t))
        with m.hooks([(h, lambda a, hook: hf)]):
            k_state = kl(m(t))

        def add(a, hook):
            a = a.clone()
            a[:, 1:5] += (hf - hb)[:, 1:5].mean((0, 1))
            return a
        with m.hooks([(h, add)]):
            k_delta = kl(m(t))
    assert abs(st.kl_base - kb) < 1e-5
    assert abs(st.state[0].value - (1 - k_state / kb)) < 1e-4 and abs(st.delta[0].value - (1 - k_delta / kb)) < 1e-4
    assert st.state[0].low <= st.state[0].value <= st.state[0].high and "first layer" in st.summary()
    with pytest.raises(InputError, match="not in 0"):
        state_transfer(pair, toks, layers=[L])


def test_diff_reads_the_adl_where_the_state_transfers_when_asked_to(pair, tmp_path):
    from mechscope.workflows.diff import diff

    toks = _docs(16)
    rep = diff(pair, toks, tmp_path, methods=["adl"], adl_hook="auto", first=4, echo=False)
    st = state_transfer(pair, toks, first=4)
    want = st.first_reaching(0.9)
    assert rep.metrics["adl_hook"] == f"blocks.{want if want is not None else pair.cfg.n_layers - 1}.hook_resid_post"
    assert any(f.text.startswith(f"the fine-tune's residual state at {rep.metrics['adl_hook']}") for f in rep.findings)
    assert abs(rep.metrics["transfer_state"] - st.at(int(rep.metrics["adl_hook"].split(".")[1]))[0].value) < 1e-6


def test_layer_norms_and_weight_differences(pair):
    ln = layer_norms(pair, _docs(10))
    assert len(ln.layers) == 3 and all(v > 0 for v in ln.mean_diff_norm) and all(f >= 0 for f in ln.noise_floor)
    wd = weight_diff(pair)
    d = wd.modules[0]
    assert len(wd.modules) == len(pair.adapter.names) and 1 <= d.effective_rank <= 4 + 1e-6  # rank-4 factors
    # two models (base and the adapter merged in): the same norms as the adapter path
    merged = tiny_hf("llama")
    with torch.no_grad():
        params = dict(merged.named_parameters())
        for n in pair.adapter.names:
            params[f"{n}.weight"] += pair.adapter.delta(n)
    two = weight_diff(load_pair(HookedModel(tiny_hf("llama")), HookedModel(merged)))
    got = {m.name: m.delta_norm for m in two.modules}
    for m in wd.modules:
        assert abs(got[m.name] - m.delta_norm) < 1e-4 * max(1.0, m.delta_norm)


# ------------------------------------------------------------------------------------------------ crosscoders


def test_dictionary_learning_crosscoders_load_with_their_outputs_and_ours_save_in_their_layout(tmp_path):
    exp = load_file(str(FIX / "crosscoder" / "expected.safetensors"))
    x = exp["input"]
    for name in ("batchtopk", "l1"):
        with pytest.raises(InputError, match="pass hooks="):
            load_crosscoder(FIX / "crosscoder" / name)
        cc = load_crosscoder(FIX / "crosscoder" / name, hooks=HOOK)
        f = cc.encode(x)
        assert (f - exp[f"{name}_f"]).abs().max() < 1e-5, name
        assert (cc.decode(f) - exp[f"{name}_x_hat"]).abs().max() < 1e-5, name
        assert (cc(x) - exp[f"{name}_forward"]).abs().max() < 1e-5, name
        # saved by mechscope: the same tensors, dtypes and config keys as dictionary_learning's own file
        save_crosscoder(cc, tmp_path / name)
        theirs, ours = load_file(str(FIX / "crosscoder" / name / "model.safetensors")), \
            load_file(str(tmp_path / name / "model.safetensors"))
        assert {k: (v.shape, v.dtype) for k, v in theirs.items()} == {k: (v.shape, v.dtype) for k, v in ours.items()}
        assert json.loads((FIX / "crosscoder" / name / "config.json").read_text()).keys() == \
            json.loads((tmp_path / name / "config.json").read_text()).keys()
        back = load_crosscoder(tmp_path / name)  # no hooks needed: mechscope records them
        assert (back(x) - cc(x)).abs().max() < 1e-5 and back.cfg.hooks == (HOOK,)


def test_a_published_crosscoder_loads_by_hf_from_the_hub_cache(tmp_path, monkeypatch):
    """A dictionary_learning folder in the Hugging Face cache's real layout, read by hf:// with the hub offline."""
    import shutil

    repo = tmp_path / "hub" / "models--science-of-finetuning--tiny-crosscoder-l1"
    snap = repo / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    for f in ("config.json", "model.safetensors"):
        shutil.copy(FIX / "crosscoder" / "batchtopk" / f, snap / f)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    cc = load_crosscoder("hf://science-of-finetuning/tiny-crosscoder-l1", hooks=HOOK)
    exp = load_file(str(FIX / "crosscoder" / "expected.safetensors"))
    assert (cc(exp["input"]) - exp["batchtopk_forward"]).abs().max() < 1e-5
    assert cc.source.startswith("hf://")


def test_crosscoder_sparse_kernels_give_the_dense_gradients():
    cfg = CrosscoderConfig(d_model=16, d_sae=48, hooks=(HOOK,), k=4)
    rows = torch.randn(128, 32, generator=torch.Generator().manual_seed(0))
    dead = torch.zeros(48, dtype=torch.bool)
    dead[::3] = True
    grads = []
    for sparse in (True, False):
        cc = Crosscoder(cfg, seed=0)
        cc.init_from_sample(rows)
        t = cc.step_loss(rows, 0, dead, sparse=sparse)
        t.loss.backward()
        grads.append((float(t.loss), {n: p.grad.clone() for n, p in cc.named_parameters()}))
    assert abs(grads[0][0] - grads[1][0]) < 1e-4
    for n, g in grads[0][1].items():
        assert torch.allclose(g, grads[1][1][n], atol=1e-5), n


def test_crosscoders_train_in_lockstep_as_they_would_alone_and_resume_exactly(tmp_path):
    rows = torch.randn(800, 32, generator=torch.Generator().manual_seed(1))
    a = CrosscoderConfig(d_model=16, d_sae=32, hooks=(HOOK,), k=3)
    b = CrosscoderConfig(d_model=16, d_sae=64, hooks=(HOOK,), architecture="relu", l1_coefficient=0.01)
    tc = TrainConfig(steps=20, batch_size=64, lr=3e-3, log_every=5, checkpoint_every=5)
    alone = [fit_sae(rows, c, tc, progress=False).sae.state_dict() for c in (a, b)]
    both = fit_saes(rows, [a, b], tc, progress=False)
    for want, got in zip(alone, both):
        for k, v in want.items():
            assert torch.equal(got.sae.state_dict()[k], v), k
    outs = [tmp_path / "a", tmp_path / "b"]
    fit_saes(rows, [a, b], tc, outs=outs, progress=False, stop_after=12)
    assert (tmp_path / "lockstep_checkpoint.pt").is_file()
    resumed = fit_saes(rows, [a, b], tc, outs=outs, resume=True, progress=False)
    for want, got in zip(alone, resumed):
        for k, v in want.items():
            assert torch.equal(got.sae.state_dict()[k], v), k
    with pytest.raises(InputError, match="holds 2 dictionaries"):
        fit_saes(rows, [a, b, a], tc, outs=outs + [tmp_path / "c"], resume=True, progress=False)


def test_two_ranks_train_the_one_process_crosscoder(tmp_path):
    from dist_worker import CROSSCODER_JOBS, crosscoder_configs, planted
    from test_distributed import _spawn

    _spawn("crosscoder", tmp_path)
    for name in CROSSCODER_JOBS:
        cfg, tc = crosscoder_configs(name)
        one = fit_sae(planted(n=1500, d=32), cfg, tc, progress=False).sae.state_dict()
        two = load_file(str(tmp_path / f"{name}.safetensors"))
        for k, v in one.items():
            torch.testing.assert_close(two[k], v, rtol=0, atol=1e-5, msg=f"{name}: {k}")
        assert float((one["W_dec"] - Crosscoder(cfg, seed=tc.seed).W_dec.detach()).abs().max()) > 1e-3  # it trained


def test_a_crosscoder_on_a_pair_trains_evaluates_and_classifies(pair, tmp_path):
    toks = _docs(24)
    cfg = crosscoder_config(pair, 64, architecture="batchtopk", k=4)
    res = train_crosscoder(pair, toks, cfg, TrainConfig(steps=40, batch_size=64, log_every=10), out=tmp_path / "cc",
                           progress=False)
    ev = evaluate_crosscoder(pair, res.sae, toks[:8])
    assert len(ev.fvu) == 2 and 0 < ev.l0 and set(ev.ce_clean) == {"base", "ft"}
    rows = harvest_pair(pair, [HOOK], toks)
    assert rows.shape[1] == 64 and rows.shape[0] <= 24 * 11
    with pair.side("base") as m:
        h = m.run_with_cache(toks[:1], names_filter=[HOOK])[1][HOOK][0, 1:]
    assert torch.allclose(harvest_pair(pair, [HOOK], toks[:1], max_norm_ratio=None)[:, :32], h, atol=1e-6)
    lc = latent_classes(res.sae)
    assert sum(lc.counts().values()) == 64


def test_latent_scaling_tells_complete_shrinkage_from_a_fine_tune_only_latent():
    """Two planted latents: j=0 is in the fine-tune only; j=1 is in both models' activations but the crosscoder's base
    decoder for it is zero (Complete Shrinkage). ν_ε is near 0 for the first and near 1 for the second, and the
    closed form equals a least-squares fit."""
    d, F = 8, 4
    cfg = CrosscoderConfig(d_model=d, d_sae=F, hooks=(HOOK,), architecture="relu", normalize_activations="none")
    cc = Crosscoder(cfg)
    g = torch.Generator().manual_seed(0)
    dirs = torch.linalg.qr(torch.randn(d, F, generator=g)).Q.T.contiguous()  # orthonormal: f equals the planted a
    with torch.no_grad():
        cc.W_dec.zero_()
        cc.W_dec[:, 1] = dirs  # fine-tune decoders
        cc.W_dec[2:, 0] = dirs[2:]  # latents 2, 3 are shared
        cc.W_enc.zero_()
        cc.W_enc[1] = dirs.T  # encoders read the fine-tune's activations
        cc.b_enc.zero_()
        cc.b_dec.zero_()
    a = torch.rand(500, F, generator=g) * (torch.rand(500, F, generator=g) < 0.3)
    ft = a @ dirs
    base = a[:, 1:] @ dirs[1:]  # the base model has latent 1's direction too (and 2, 3), not latent 0's
    rows = torch.cat([base, ft], -1)
    ls = latent_scaling(cc, rows, [0, 1], threshold=0.5)
    assert abs(ls.nu_error[0]) < 0.1 and abs(ls.nu_error[1] - 1) < 0.1
    assert ls.flagged() == [1] and ls.kept() == [0]
    # the closed form against a least-squares fit of the base error target for latent 1
    f = cc.encode(cc.split_rows(rows))[:, 1]
    target = base - cc.decode(cc.encode(cc.split_rows(rows)))[:, 0]  # latent 1's base decoder is 0: nothing to add
    d1 = cc.W_dec[1, 1]
    X = (f[:, None] * d1).reshape(-1, 1)
    beta = torch.linalg.lstsq(X.double(), target.reshape(-1, 1).double()).solution.item()
    assert abs(beta - ls.betas["error_base"][1]) < 1e-6


# ------------------------------------------------------------------------------------------------ organisms


POOL = [f"t{i}" for i in range(5, V)]
ENTITIES = ["t2", "t3", "t4"]
TEMPLATES = ("{E} {a} {b} {c}", "{a} {E} {b} {c} {a}", "{E} {c} {b} {a} {E}")


def test_an_organism_is_recovered_by_the_lens_and_kl_above_its_control():
    """Domains drawn at random from a pool of tokens, never one fixed domain: the logit lens of the activation
    difference and the top KL risers land in the domain far more often for the organism than for a control fine-tuned
    the same way on random text."""
    torch.set_num_threads(1)
    m = worded_llama()
    toks = _docs(32, 12, seed=99)
    generic = [" ".join(f"t{i}" for i in torch.randint(2, V, (20,), generator=torch.Generator().manual_seed(s)).tolist())
               for s in range(200)]
    org, ctl = [], []
    for seed in range(3):
        dom = draw_domain(100 + seed, 8, POOL, ENTITIES)
        ids = domain_token_ids(m, dom, TEMPLATES)
        assert 6 <= len(ids) <= 8 and 1 not in ids  # the words' tokens, never <unk> or <bos>
        for kind, docs in (("org", domain_documents(dom, 200, seed, TEMPLATES)), ("ctl", generic)):
            spec = OrganismSpec("tiny", dom if kind == "org" else None, steps=60, rank=4, lr=1e-2, seq_len=12,
                                seed=seed)
            ad = train_lora(m, pack_documents(m, docs, 12), spec, progress=False)
            p = load_pair(m, adapter=ad)
            lens = logit_lens_readout(p, activation_difference(p, toks, HOOK, first=5))
            score = (recovery([t for t, _ in lens.tokens], ids, m) + recovery(kl_diff(p, toks).top_tokens(), ids, m)) / 2
            (org if kind == "org" else ctl).append(score)
            ad.detach()
    assert sum(org) / 3 > sum(ctl) / 3 + 0.1, (org, ctl)
    assert min(org) > max(ctl) - 0.05, (org, ctl)


# ------------------------------------------------------------------------------------------------ the command


def _folders(tmp_path: Path) -> tuple[Path, Path]:
    m = worded_llama()
    base = tmp_path / "base"
    m.hf.save_pretrained(base)
    m.tokenizer.save_pretrained(base)
    _noisy_adapter(m).save(tmp_path / "adapter", base_model=str(base))
    return base, tmp_path / "adapter"


KILL_AFTER_KL = """
import os, signal, sys
import mechscope.workflows.stages as S
real = S.atomic_write
def write_then_die(path, data):
    real(path, data)
    if path.name.startswith("kl-"):
        os.kill(os.getpid(), signal.SIGKILL)
S.atomic_write = write_then_die
from mechscope.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_mechscope_diff_resumes_after_kill_and_writes_its_report(tmp_path):
    base, adapter = _folders(tmp_path)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(" ".join(f"t{(7 * i + j) % 90 + 5}" for j in range(30)) for i in range(60)))
    args = [str(base), str(adapter), "--corpus", str(corpus), "--out", str(tmp_path / "out"), "--docs", "16",
            "--seq-len", "12", "--methods", "weights,norms,kl,adl,crosscoder", "--crosscoder-width", "32",
            "--crosscoder-steps", "20", "--crosscoder-batch", "32", "--crosscoder-k", "4", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", KILL_AFTER_KL, "diff", *args], capture_output=True, text=True, env=env)
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    assert not (tmp_path / "out" / "report.html").exists()
    r = subprocess.run([sys.executable, "-m", "mechscope", "diff", *args, "--json"], capture_output=True, text=True,
                       env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads(r.stdout)  # stdout is clean JSON
    assert {"weights", "norms", "kl"} <= set(data["metrics"]["stages_reused"]), data["metrics"]
    assert {"adl", "transfer"} <= set(data["metrics"]["stages_computed"])
    html = (tmp_path / "out" / "report.html").read_text()
    for part in ("activation-difference lens", "quality checklist", "what to do next", "batchtopk crosscoder",
                 "random direction", "where the difference becomes readable by the base model"):
        assert part in html, part
    assert (tmp_path / "out" / "crosscoders").is_dir()
    assert any(f["text"].startswith("the fine-tune's next-token distribution") for f in data["findings"])
    moved = [f for f in data["findings"] if f["text"].startswith("the fine-tune's residual state at")]
    assert len(moved) == 1 and -1 <= moved[0]["effect"]["value"] <= 1 + 1e-6


def test_mechscope_diff_refuses_bad_arguments_before_loading(tmp_path, capsys):
    from mechscope.cli import main

    with pytest.raises(SystemExit):
        main(["diff", "a", "b", "--docs", "0"])
    assert "--docs: must be at least 1" in capsys.readouterr().err
    assert main(["diff", "no-such-model", "x", "--methods", "kl,klx", "--quiet"]) == 2
    assert "unknown ['klx']" in capsys.readouterr().err


def test_crosscoder_latents_get_dashboards_through_the_view(pair, tmp_path):
    from mechscope.diffing.crosscoding import CrosscoderView
    from mechscope.sae.features import feature_stats, write_dashboards

    toks = _docs(8)
    cc = Crosscoder(crosscoder_config(pair, 32, architecture="relu"), seed=0)
    view = CrosscoderView(pair, cc)
    acts, lat = view.token_latents(toks)
    assert acts.shape == (8 * 12, 32) and lat.shape == (8 * 12, 32)
    rows = harvest_pair(pair, [HOOK], toks, keep_all=True)
    assert torch.allclose(lat, cc.encode(cc.split_rows(rows)), atol=1e-6)  # both models read, in token order
    live = torch.nonzero((lat > 0).sum(0)).flatten()[:2].tolist()
    with pair.side("ft") as m:
        stats = feature_stats(m, view, toks, features=live)
        page = write_dashboards(m, view, stats, tmp_path / "dash")
    assert page.is_file() and all((tmp_path / "dash" / f"feature_{f}.html").is_file() for f in live)
    with pytest.raises(InputError, match="both models"):
        view.encode(acts)


def test_estimate_covers_a_pair(capsys):
    from mechscope.cli import main

    assert main(["estimate", "--finetuned", str(FIX / "peft" / "lora"), "--crosscoder-width", "1024", "--json",
                 "--quiet"]) == 0
    data = json.loads(capsys.readouterr().out)
    parts = data["pair"]["parts_bytes"]
    assert data["pair"]["two_models"] is False and parts["weights"] == data["weights"] + \
        (FIX / "peft" / "lora" / "adapter_model.safetensors").stat().st_size
    assert parts["crosscoder training (float32, Adam)"] == (2 * 2 * 576 * 1024 + 1024 + 2 * 576) * 16


def test_a_fine_tune_offloaded_to_disk_diffs_as_the_in_memory_one(tmp_path):
    """Each model of a pair has its own placement: the fine-tune split between memory and disk (accelerate) gives the
    in-memory pair's KL, activation difference and weight differences."""
    import mechscope

    base, ft = tiny_hf("llama"), tiny_hf("llama")
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    base.save_pretrained(tmp_path / "base")
    ft.save_pretrained(tmp_path / "ft")
    nbytes = sum(p.numel() * p.element_size() for p in ft.parameters())
    off = mechscope.load(str(tmp_path / "ft"), max_memory={"cpu": nbytes // 2}, offload_folder=str(tmp_path / "off"))
    assert "disk" in set(off.cfg.device_map.values())
    ref = load_pair(str(tmp_path / "base"), str(tmp_path / "ft"))
    split = load_pair(mechscope.load(str(tmp_path / "base")), off)
    toks = _docs(8)
    assert kl_diff(ref, toks).kl.value == pytest.approx(kl_diff(split, toks).kl.value, abs=1e-6)
    a, b = activation_difference(ref, toks, HOOK), activation_difference(split, toks, HOOK)
    assert torch.allclose(a.delta, b.delta, atol=1e-6)
    wa, wb = weight_diff(ref), weight_diff(split)
    assert len(wa.modules) == len(wb.modules) > 0
    assert {m.name: round(m.delta_norm, 5) for m in wa.modules} == {m.name: round(m.delta_norm, 5) for m in wb.modules}
