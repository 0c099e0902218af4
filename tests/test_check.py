"""mechscope.check on every family, the family inferred for an unknown model type, and clear refusals."""

import json
import warnings

import pytest
import torch

import mechscope
from mechscope import HookedModel
from mechscope.core import families
from mechscope.core.check import check
from mechscope.core.families import UnsupportedArchitectureError
from mechscope.core.infer import family_source, infer_family
from tiny import ARCHS, tiny_hf


@pytest.mark.parametrize("arch", ARCHS)
def test_check_passes_on_every_family(arch):
    try:
        hf = tiny_hf(arch, "eager")
    except (ValueError, ImportError) as e:
        pytest.skip(str(e))
    rep = check(HookedModel(hf), interventions=arch in ("llama", "gpt2", "gemma3", "mixtral", "qwen2_moe", "falcon"))
    assert rep.ok, rep.summary()
    assert {"resid_mid == resid_pre + attn_out", "padded batch == one prompt at a time"} <= {i.name for i in rep.identities}


def test_check_finds_a_dead_hook_and_a_broken_identity():
    model = HookedModel(tiny_hf("llama", "eager"))
    handle = model.add_hook("blocks.1.hook_resid_post", lambda a, h: a)  # harmless
    blocked = model.add_hook("blocks.2.hook_resid_pre", lambda a, h: a.detach().clone())  # freezes what enters L2
    try:
        rep = check(model)
    finally:
        handle.remove()
        blocked.remove()
    assert rep.ok  # identity edits change nothing; a real break is needed:
    model.hf.model.layers[1].mlp.down_proj.register_forward_hook(lambda m, a, out: out * 0)
    rep = check(model)
    assert not rep.ok and any("blocks.1.mlp" in n for n in rep.dead), rep.summary()  # editing the MLP does nothing
    assert "FAIL" in rep.summary() and "NO effect" in rep.summary()


def _hidden(monkeypatch, model_type):
    by_type = dict(families._BY_TYPE)
    by_type.pop(model_type)
    monkeypatch.setattr(families, "_BY_TYPE", by_type)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt2"])
def test_a_family_hidden_from_the_table_is_inferred_and_passes(arch, monkeypatch, tmp_path):
    hf = tiny_hf(arch, "eager")
    known = families.family_for(hf.config)
    _hidden(monkeypatch, hf.config.model_type)
    fam = infer_family(hf, hf.config.model_type)
    for field in ("layers", "embed", "unembed", "attn", "mlp", "ln1", "ln2", "o", "mlp_out", "norm"):
        assert getattr(fam, field) == getattr(known, field), field
    assert family_source(fam).startswith(f"Family('{hf.config.model_type}'")
    hf.save_pretrained(tmp_path / "m")
    with pytest.warns(UserWarning, match="inferred from the module tree and passes the identity suite"):
        model = mechscope.load(str(tmp_path / "m"), attn_implementation="eager")
    assert model.inferred and check(model).ok
    with torch.no_grad():
        assert torch.equal(model(torch.arange(3, 12)[None]), hf(input_ids=torch.arange(3, 12)[None]).logits)


def test_an_inferred_row_that_fails_the_check_is_refused(monkeypatch, tmp_path):
    hf = tiny_hf("gemma", "eager")  # Gemma's norm multiplies by (1 + w): the name says RMSNorm, the numbers say otherwise
    _hidden(monkeypatch, "gemma")
    hf.save_pretrained(tmp_path / "m")
    with pytest.raises(UnsupportedArchitectureError, match="fails mechscope's identity suite"):
        mechscope.load(str(tmp_path / "m"), attn_implementation="eager")


def test_mamba_and_t5_get_clear_errors(tmp_path):
    import transformers as T

    for cfg, match in ((T.MambaConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2),
                        r"found no attention module \(a child whose class is named \*Attention\); no MLP"),
                       (T.T5Config(vocab_size=97, d_model=32, num_layers=2, num_heads=4, d_kv=8, d_ff=48),
                        "not a causal language model")):
        folder = tmp_path / cfg.model_type
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(cfg.to_dict()))
        with pytest.raises(UnsupportedArchitectureError, match=match):
            mechscope.load(str(folder))


def test_supported_model_types():
    types = mechscope.supported_model_types()
    assert len(types) >= 50
    required = {"olmo", "olmo2", "olmo3", "smollm3", "gptj", "falcon", "stablelm", "phi", "cohere", "granite", "mixtral",
                "olmoe", "qwen2_moe", "qwen3_moe", "gpt_oss"}
    assert required <= set(types), required - set(types)
    tested = {tiny_hf_type(a) for a in ARCHS}
    assert set(types) - {"gemma3"} <= tested, set(types) - tested  # every type has a tiny configuration


def tiny_hf_type(arch):
    from tiny import CONFIGS

    return CONFIGS[arch]().model_type


def test_cli_check(capsys, monkeypatch):
    from mechscope.cli import main

    model = HookedModel(tiny_hf("qwen2_moe", "eager"))
    monkeypatch.setattr(mechscope, "load", lambda *a, **k: model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["check", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n_hooks"] == len(model.hook_names) and not out["dead"] and all(i["error"] <= i["tolerance"]
                                                                               for i in out["identities"])


def test_docs_list_every_supported_type():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "hooks.md").read_text()
    missing = [t for t in mechscope.supported_model_types() if f"`{t}`" not in doc]
    assert not missing, f"docs/hooks.md does not list {missing}"


def test_untested_torch_or_transformers_is_named_once():
    import warnings

    from mechscope.core import versions

    assert versions.untested({"torch": "2.13.0+cpu", "transformers": "5.25.0"}) == []
    assert versions.untested({"torch": "2.16.1", "transformers": "5.30.0"}) == [
        "torch 2.16.1 (tested: 2.13 to 2.15)", "transformers 5.30.0 (tested: 5.24 to 5.25)"]
    assert versions.untested({"transformers": "5.23.0"}) == ["transformers 5.23.0 (tested: 5.24 to 5.25)"]
    versions._WARNED = False
    import torch
    real = torch.__version__
    try:
        torch.__version__ = "2.99.0"
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            versions.warn_if_untested()
            versions.warn_if_untested()  # once per process
        msgs = [str(x.message) for x in w if issubclass(x.category, versions.UntestedVersionWarning)]
        assert len(msgs) == 1 and "torch 2.99.0" in msgs[0] and "mechscope check" in msgs[0]
    finally:
        torch.__version__ = real


def test_error_templates_read_as_english():
    """Error messages are assembled from pieces; proofread the joins: no doubled articles, no 'no an ...'."""
    import re
    from pathlib import Path

    bad = re.compile(r"\b(?:[Nn]o|[Aa]n?|[Tt]he) (?:a|an|the) |\b([a-z]{3,}) \1\b")
    src = Path(mechscope.__file__).parent
    found = []
    for p in src.rglob("*.py"):
        for i, line in enumerate(p.read_text().splitlines(), 1):
            for lit in re.findall(r'"([^"]*)"', line):
                if bad.search(lit):
                    found.append(f"{p.relative_to(src)}:{i}: {lit}")
    assert not found, found
    try:
        import transformers as T

        from mechscope.core.infer import infer_family
        from mechscope.core.parts import meta_model

        infer_family(meta_model(T.MambaConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2)), "mamba")
    except UnsupportedArchitectureError as e:
        assert not bad.search(str(e).split("Supported")[0]), str(e)
