"""SAEs written by SAELens 6.54 itself (tests/fixtures/saelens_6_54, made by bench/bench_saelens_roundtrip.py with
SAELens's own ``save_model``) load in mechscope with SAELens's own outputs; the other direction (SAELens reading
mechscope's files) runs in that bench, which needs SAELens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mechscope.core.errors import InputError
from mechscope.sae import load_sae, save_sae

FIXTURES = Path(__file__).parent / "fixtures" / "saelens_6_54"
LOADABLE = ["standard", "standard_no_b_dec_in", "topk", "topk_rescaled", "batchtopk", "jumprelu",
            "jumprelu_expected_average", "transcoder", "skip_transcoder", "jumprelu_transcoder",
            "jumprelu_skip_transcoder", "matryoshka_batchtopk"]


def outputs(sae, x):
    with torch.no_grad():
        f = sae.encode(x)
        return {"encode": f, "decode": sae.decode(f), "forward": sae(x)}


def test_saelens_6_54_fixtures_are_what_saelens_wrote():
    assert (FIXTURES / "VERSION").read_text().startswith("6.54")
    assert {p.name for p in FIXTURES.iterdir() if p.is_dir()} == set(LOADABLE) | {"jumprelu_layer_norm"}
    assert json.loads((FIXTURES / "batchtopk" / "cfg.json").read_text())["architecture"] == "jumprelu"


@pytest.mark.parametrize("name", LOADABLE)
def test_saelens_6_54_saved_sae_loads_with_saelens_outputs(name):
    ref = load_file(str(FIXTURES / name / "expected.safetensors"))
    sae = load_sae(FIXTURES / name)
    got = outputs(sae, ref["x"])
    for k in got:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-5, msg=f"{name}: {k} differs from SAELens's")
    assert (ref["encode"] > 0).any() and (ref["encode"] == 0).any()  # the check sees active and inactive latents
    if "transcoder" in name:
        assert sae.cfg.hook_name_out == "blocks.1.hook_mlp_out" and sae.cfg.skip == ("skip" in name)


def test_saelens_6_54_fields_that_mean_something_else_are_followed(tmp_path):
    # rescale_acts_by_decoder_norm: folded, so mechscope's decoder rows are unit norm and outputs still match
    sae = load_sae(FIXTURES / "topk_rescaled")
    raw = load_file(str(FIXTURES / "topk_rescaled" / "sae_weights.safetensors"))
    assert not torch.allclose(raw["W_dec"].norm(dim=-1), torch.ones(48), atol=1e-3)
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(48))
    # without the fold the activations would differ: the field matters on this fixture
    plain = load_sae(FIXTURES / "topk")
    assert not torch.allclose(raw["W_dec"], load_file(str(FIXTURES / "topk" / "sae_weights.safetensors"))["W_dec"])
    assert plain.cfg.architecture == sae.cfg.architecture == "topk"
    # decoder norms are not folded on load (SAELens's load_from_disk default)
    std = load_sae(FIXTURES / "standard")
    torch.testing.assert_close(std.W_dec, load_file(str(FIXTURES / "standard" / "sae_weights.safetensors"))["W_dec"])
    assert not load_sae(FIXTURES / "standard_no_b_dec_in").cfg.apply_b_dec_to_input
    # a Matryoshka BatchTopK SAE saved for inference keeps its prefix sizes in the metadata: they are read
    assert load_sae(FIXTURES / "matryoshka_batchtopk").cfg.matryoshka_widths == (12, 24, 48)
    # a run-time normalisation is refused by name, with what is valid
    with pytest.raises(InputError, match="normalize_activations='layer_norm'.*valid: 'none'"):
        load_sae(FIXTURES / "jumprelu_layer_norm")


def test_saelens_6_54_a_skip_transcoder_saved_by_mechscope_has_saelens_layout(tmp_path):
    sae = load_sae(FIXTURES / "jumprelu_skip_transcoder")
    save_sae(sae, tmp_path / "again")
    cfg = json.loads((tmp_path / "again" / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu_skip_transcoder" and cfg["d_out"] == 16
    assert cfg["metadata"]["hook_name_out"] == "blocks.1.hook_mlp_out" and cfg["apply_b_dec_to_input"] is False
    w, orig = (load_file(str(p / "sae_weights.safetensors")) for p in (tmp_path / "again", FIXTURES / "jumprelu_skip_transcoder"))
    torch.testing.assert_close(w["W_skip"], orig["W_skip"])  # [d_out, d_in], as SAELens holds it
    ref = load_file(str(FIXTURES / "jumprelu_skip_transcoder" / "expected.safetensors"))
    torch.testing.assert_close(outputs(load_sae(tmp_path / "again"), ref["x"])["forward"], ref["forward"], rtol=0, atol=1e-5)
