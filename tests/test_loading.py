"""Loading from local folders and the error messages for bad names."""

import json

import pytest
import torch

import mechscope
from mechscope.core.families import UnsupportedArchitectureError
from tiny import tiny_hf


def test_local_hf_folder_roundtrip(tmp_path):
    hf = tiny_hf("gpt2")
    hf.save_pretrained(tmp_path / "m")
    model = mechscope.load(str(tmp_path / "m"), device="cpu")
    toks = torch.randint(0, 97, (1, 5))
    with torch.no_grad():
        assert torch.equal(model(toks), hf(input_ids=toks).logits)
    assert model.tokenizer is None
    with pytest.raises(ValueError, match="no tokenizer"):
        model.to_tokens("hi")


def test_missing_path_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        mechscope.load(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        mechscope.load("./missing-model.gguf")


def test_unknown_alias_lists_known(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError) as e:
        mechscope.load("smollm-9000")
    assert "smollm2-135m" in str(e.value) and "gemma3-270m" in str(e.value)


def test_unsupported_architecture_names_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 10}))
    with pytest.raises(UnsupportedArchitectureError) as e:
        mechscope.load(str(tmp_path))
    assert "llama" in str(e.value) and "gpt2" in str(e.value)


def test_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        mechscope.load(str(tmp_path))


def test_gguf_conversion_is_atomic(tmp_path, monkeypatch):
    """An interrupted conversion leaves no folder that looks complete."""
    from mechscope import loading

    monkeypatch.setenv("MECHSCOPE_CACHE", str(tmp_path))
    fake = tmp_path / "broken.gguf"
    fake.write_bytes(b"GGUF" + b"\0" * 100)
    with pytest.raises(Exception):
        loading.convert_gguf(fake, verbose=False)
    target = loading.converted_gguf_dir(fake)
    assert not target.exists()
    assert not list(target.parent.glob("*.tmp-*"))


def test_device_map_passes_through(tmp_path, monkeypatch):
    import transformers

    hf = tiny_hf("llama")
    hf.save_pretrained(tmp_path / "m")
    seen = {}
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    model = mechscope.load(str(tmp_path / "m"), device_map={"": "cpu"})
    assert seen["device_map"] == {"": "cpu"}
    toks = torch.randint(0, 97, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(model(toks), hf(input_ids=toks).logits)


def test_remote_code_is_refused_unless_trusted_and_never_prompted(tmp_path, monkeypatch):
    """A folder whose config asks for its own Python code: refused with a mechscope error naming trust_remote_code,
    without asking on stdin and without running the code; with trust_remote_code=True the code runs."""
    from mechscope.core.errors import InputError

    marker = tmp_path / "ran"
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({
        "model_type": "evilnet", "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilLM"}}))
    (tmp_path / "m" / "evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
        "from transformers import PretrainedConfig\nclass EvilConfig(PretrainedConfig):\n    model_type = 'evilnet'\n")
    monkeypatch.setattr("builtins.input", lambda *a: pytest.fail("prompted for remote code"))
    with pytest.raises(InputError, match="trust_remote_code=True") as e:
        mechscope.load(str(tmp_path / "m"))
    assert "own Python code" in str(e.value) and not marker.exists()
    with pytest.raises(Exception):  # noqa: B017 - the code ran; the toy config is no loadable model
        mechscope.load(str(tmp_path / "m"), trust_remote_code=True)
    assert marker.exists()
