"""The package's shape: one import direction without cycles, a public API, one result protocol, one CLI table."""

import ast
import dataclasses
import importlib
import json
import pkgutil
import re
from pathlib import Path

import pytest
import torch

import mechscope
from mechscope.core.result import Result
from tiny import V, tiny_hf

SRC = Path(mechscope.__file__).parent
ROOT = SRC.parents[1]
# the workflow order: a module may import from its own level or below, never above
LEVELS = {"core": 0, "loading": 1, "compute": 1, "corpus": 1, "sizes": 1, "batching": 1, "distributed": 1, "gitstate": 1,
          "analysis": 2, "datasets": 3, "techniques": 3, "circuits": 4, "sae": 4, "sweeps": 4, "project": 5,
          "workflows": 5, "graphs": 5, "diffing": 5, "cli": 6, "__main__": 6}


def _modules() -> dict[str, Path]:
    return {".".join(p.relative_to(SRC.parent).with_suffix("").parts).removesuffix(".__init__"): p
            for p in SRC.rglob("*.py")}


def _imports(name: str, path: Path) -> set[str]:
    """Every mechscope module ``name`` imports, at module level or inside functions."""
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("mechscope")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            if base.startswith("mechscope"):
                subs = {f"{base}.{a.name}" for a in node.names} & set(_modules())
                out |= subs or {base}
    mods = _modules()
    return {m for m in out if m in mods and m != name}


def _level(module: str) -> int | None:
    parts = module.split(".")
    return LEVELS.get(parts[1]) if len(parts) > 1 else None


def test_imports_flow_one_way_and_have_no_cycles():
    mods = _modules()
    graph = {m: _imports(m, p) for m, p in mods.items()}
    upward = [(m, t) for m, ts in graph.items() for t in ts
              if _level(m) is not None and _level(t) is not None and _level(t) > _level(m)]
    assert not upward, f"imports against the workflow order: {upward}"
    root_users = [m for m, ts in graph.items() if "mechscope" in ts and _level(m) is not None and _level(m) < 6]
    assert not root_users, f"only the CLI may import the package facade: {root_users}"
    assert all(_level(t) in (0, None) or t == "mechscope.core" for t in set().union(
        *(graph[m] for m in graph if m.startswith("mechscope.core")))), "core imports only core"
    state = {}

    def visit(m, stack):
        state[m] = 1
        for t in graph[m]:
            if t == "mechscope" or t.count(".") == 1 and t.endswith("__init__"):
                continue
            if state.get(t) == 1:
                raise AssertionError(f"import cycle: {' -> '.join(stack + [m, t])}")
            if not state.get(t):
                visit(t, stack + [m])
        state[m] = 2

    for m in graph:
        if m != "mechscope" and not state.get(m):
            visit(m, [])


def test_public_api_is_importable_and_documented():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    for name in mechscope.__all__:
        assert getattr(mechscope, name) is not None
        assert f"`{name}`" in doc, f"{name} is public but not listed in docs/architecture.md"
    for info in pkgutil.walk_packages(mechscope.__path__, "mechscope."):
        if info.name != "mechscope.__main__":
            importlib.import_module(info.name)


def test_no_technique_function_is_long():
    long = []
    for folder in ("techniques", "circuits"):
        for path in (SRC / folder).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno > 60:
                    long.append(f"{path.name}:{node.name} ({node.end_lineno - node.lineno} lines)")
    assert not long, long


def _all_results():
    for info in pkgutil.walk_packages(mechscope.__path__, "mechscope."):
        if info.name != "mechscope.__main__":
            importlib.import_module(info.name)
    seen, todo = [], list(Result.__subclasses__())
    while todo:
        c = todo.pop()
        seen.append(c)
        todo += c.__subclasses__()
    return seen


def test_every_result_follows_the_protocol():
    classes = _all_results()
    assert len(classes) >= 16
    for cls in classes:
        assert dataclasses.is_dataclass(cls), cls
        assert cls.summary is not Result.summary, f"{cls.__name__} has no summary()"
        assert "__repr__" not in cls.__dict__, f"{cls.__name__}: declare the dataclass with repr=False"


def test_results_print_serialise_and_render():
    from mechscope.techniques.ablation import ablate
    from mechscope.techniques.attribution import direct_logit_attribution
    from mechscope.techniques.patching import patch

    model = mechscope.HookedModel(tiny_hf("llama"))
    clean = torch.randint(0, V, (2, 6), generator=torch.Generator().manual_seed(0))
    corr = clean.clone()
    corr[:, 2] = (corr[:, 2] + 1) % V

    def metric(lg):
        return lg[:, -1, 3] - lg[:, -1, 5]

    results = [patch(model, clean, corr, metric, site="z"), direct_logit_attribution(model, clean, 3, 5),
               ablate(model, clean, metric, ["L1H0", "L0.mlp"]), mechscope.estimate_memory(model, available=2**34,
                                                                                          device="cpu")]
    for r in results:
        assert repr(r) == str(r) == r.summary()
        data = r.to_dict()
        json.dumps(data)  # JSON-ready, no tensors left
        assert r._repr_html_() == r.to_html() and "<pre>" in r.to_html()
    assert results[0].to_dict()["values"] == results[0].values.tolist()


def test_components_round_trip_and_validate():
    from mechscope import Component
    from mechscope.core.errors import InputError

    for s in ["L5H3", "L17.mlp", "L5G1.k", "L5H3.q", "L2.attn", "L3N100", "L4", "L5.mlp_in", "L5.attn_in", "embed",
              "logits"]:
        assert str(Component.parse(s)) == s
    assert Component.parse("L5H3").hook == "blocks.5.attn.hook_z"
    assert Component.parse("L4").expand() == [Component(4, "attn"), Component(4, "mlp")]
    for bad in ["L5X3", "H3", "L5N2.q", "L5G1.q", "L5.k"]:
        with pytest.raises(InputError):
            Component.parse(bad)
    model = mechscope.HookedModel(tiny_hf("llama"))
    with pytest.raises(InputError, match="head 9 out of range 0..3"):
        mechscope.parse_components(model, ["L1H9"])


def test_cli_commands_defined_once_and_options_are_checked(capsys, monkeypatch):
    from mechscope.cli import main
    from mechscope.cli.registry import COMMANDS

    assert {"env", "patch", "sae train", "sae eval"} <= set(COMMANDS)
    with pytest.raises(SystemExit):  # an option of another command is an error, not silently ignored
        main(["lens", "a prompt", "--site", "z"])
    with pytest.raises(SystemExit):
        main(["sae", "eval", "some/folder", "--text", "x"])

    def broken(args):
        raise RuntimeError("boom")

    monkeypatch.setitem(COMMANDS, "env", dataclasses.replace(COMMANDS["env"], handler=broken))
    assert main(["env"]) == 1
    assert "internal error" in capsys.readouterr().err
    with pytest.raises(RuntimeError):
        main(["env", "--debug"])


def test_public_functions_have_type_hints():
    missing = []
    for path in SRC.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            fns = [node] if isinstance(node, ast.FunctionDef) else \
                [n for n in node.body if isinstance(n, ast.FunctionDef)] if isinstance(node, ast.ClassDef) else []
            for f in fns:
                if f.name.startswith("_") or (isinstance(node, ast.ClassDef) and node.name.startswith("_")):
                    continue
                bare = [a.arg for a in f.args.args + f.args.kwonlyargs if a.annotation is None and a.arg not in
                        ("self", "cls")]
                if bare or (f.returns is None and f.name != "__init__"):
                    missing.append(f"{path.relative_to(SRC)}:{f.name} {bare}")
    assert not missing, missing


def test_bad_input_gets_mechscope_errors():
    """A few bad inputs the redesign now names clearly (the wider bad-input suite is issue #15)."""
    from mechscope.core.errors import InputError, InputTypeError
    from mechscope.loading import parse_dtype
    from mechscope.techniques.patching import patch

    with pytest.raises(InputError, match="unsupported dtype 'float33'"):
        parse_dtype("float33")
    assert parse_dtype("bf16") is torch.bfloat16
    model = mechscope.HookedModel(tiny_hf("llama"))
    with pytest.raises(InputTypeError, match="input must be text"):
        model(None)
    toks = torch.randint(0, V, (1, 5))
    with pytest.raises(InputError, match=r"heads \[42\] out of range: valid heads are 0..3"):
        patch(model, toks, toks.flip(1), lambda lg: lg[:, -1, 0], site="z", heads=[42])
    with pytest.raises(InputError, match=r"layers \[7\] out of range"):
        patch(model, toks, toks.flip(1), lambda lg: lg[:, -1, 0], layers=[7])


def test_hook_names_are_built_through_the_registry_outside_core():
    """Outside ``core/`` no hook name is written by hand (``f"blocks.{l}..."``): ``act_name``, ``block_name``,
    ``model.mlp_input`` and ``model.attn_input`` build them, so a family without a given hook cannot be hard-coded."""
    import re

    literal = re.compile(r"""f["']blocks\.\{""")
    found = [f"{p.relative_to(SRC)}:{i}" for p in SRC.rglob("*.py") if "core" not in p.relative_to(SRC).parts
             for i, line in enumerate(p.read_text().splitlines(), 1) if literal.search(line)]
    assert not found, f"hook names written by hand (use the registry): {found}"


def test_every_module_is_on_the_architecture_map():
    """Every module is drawn on docs/architecture.md's diagram (its name, as a word of the code block) or has a row
    in its table (``pkg/name.py``)."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    diagram = text.split("```")[1]
    missing = []
    for name in _modules():
        parts = name.split(".")[1:]
        if not parts or parts[-1] in ("__init__", "__main__"):
            continue
        path = "/".join(parts)
        if not (re.search(rf"(?<![\w.]){re.escape(parts[-1])}(?![\w])", diagram) or f"`{path}.py`" in text
                or f"`{path}/`" in text):
            missing.append(path)
    assert not missing, f"modules docs/architecture.md does not name: {missing}"
