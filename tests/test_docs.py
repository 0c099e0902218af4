"""Every python code block in the README and docs/ runs (slow tier: it uses the default model)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))


def blocks(path):
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


@pytest.mark.slow
@pytest.mark.parametrize("path", [p for p in FILES if blocks(p)], ids=lambda p: p.name)
def test_code_blocks_run(path, smollm, monkeypatch):
    import torch

    import mechscope

    monkeypatch.setattr(mechscope, "load", lambda *a, **k: smollm)  # reuse the session's model
    ns = {"torch": torch}
    for code in blocks(path):
        exec(compile(code, str(path), "exec"), ns)
