"""The architecture, checked: no import cycles, no lower layer importing a higher one, and no
code outside a method's or format's own file that compares against its name."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "quantlab"

# The layers, lowest first (docs/ARCHITECTURE.md): a module may import its own layer and lower
# ones. Longest matching prefix wins.
LAYERS = {
    "quantlab.errors": 0,
    "quantlab.settings": 0,
    "quantlab.devices": 0,
    "quantlab.atomic": 0,
    "quantlab.fingerprint": 0,
    "quantlab.types": 0,
    "quantlab.primitives": 0,
    "quantlab.version": 0,
    "quantlab.net": 0,
    "quantlab.console": 0,
    "quantlab.models": 1,
    "quantlab.data": 1,
    "quantlab.methods": 2,
    "quantlab.kernels": 2,
    "quantlab.formats": 3,
    "quantlab.qlinear": 3,
    "quantlab.eval": 4,
    "quantlab.verify": 4,
    "quantlab.reference": 5,
    "quantlab.workbench": 5,
    "quantlab.fit": 5,  # sensitivity, allocation, build: beside the workbench (it uses the planner)
    "quantlab.fuzz": 6,
    "quantlab.doctor": 6,
    "quantlab.cli": 6,
    "quantlab.webapp": 6,
    "quantlab.__main__": 7,
    "quantlab": 7,  # the package itself: the public facade (quantlab.load)
}
NAMES = {0: "core", 1: "models/data", 2: "methods/kernels", 3: "formats", 4: "eval"}
NAMES |= {5: "workbench", 6: "cli/webapp", 7: "package facade"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every quantlab module ``name`` imports, at module level or inside functions."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("quantlab")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            if not base.startswith("quantlab"):
                continue
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                sub = f"{base}.{alias.name}"
                out.add(sub if sub in known else base)
    return {m for m in out if m in known and m != name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def _layer(module: str) -> int:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[best]


def test_every_module_has_a_layer():
    for name in _modules():
        assert _layer(name) is not None, name


def test_no_import_cycles():
    graph = _graph()
    # a package importing its own submodules (registration of the built-ins) and those
    # submodules importing a sibling is not a cycle; an edge back to the package would be
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_no_lower_layer_imports_a_higher_one():
    bad = []
    for name, deps in _graph().items():
        for dep in deps:
            if _layer(dep) > _layer(name):
                bad.append(f"{name} ({NAMES[_layer(name)]}) imports {dep} ({NAMES[_layer(dep)]})")
    assert not bad, "\n".join(sorted(bad))


def test_the_layer_check_sees_function_level_imports(tmp_path):
    """The parser must see ``import`` inside functions (lazy imports are still imports)."""
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from quantlab.workbench import pipeline\n")
    found = _imports("quantlab.methods.m", src, {"quantlab.workbench.pipeline"})
    assert found == {"quantlab.workbench.pipeline"}


# Where a method's or format's name may be compared: the files that register it, and the
# exceptions below (each with its reason).
ALLOWED = {
    # the reference toolkits' adapters translate quantlab's method names into each toolkit's API
    "quantlab/reference/__init__.py": {"gptq", "awq"},
    "quantlab/reference/gptqmodel_impl.py": {"gptq", "awq"},
    "quantlab/reference/llmcompressor_impl.py": {"gptq", "awq"},
    # the packed layouts (a format's byte layout, shared by GPTQ writers and the kernels)
    "quantlab/formats/layouts.py": {"gptq", "gptq_v2"},
    # kernel layouts are kernel capabilities (KernelSpec.layouts), named after the packings
    "quantlab/qlinear.py": {"gptq", "awq"},
    # perplexity protocols named after the papers' protocol (not the format)
    "quantlab/eval/perplexity.py": {"gptq"},
}


def _registered_names() -> dict[str, set[str]]:
    """Name -> the files that register it (method modules, format modules)."""
    from quantlab.formats import formats
    from quantlab.methods import get_method, method_names

    owners: dict[str, set[str]] = {}
    for m in method_names():
        spec = importlib.util.find_spec(get_method(m).quantize_block.__module__)
        owners.setdefault(m, set()).add(str(Path(spec.origin).relative_to(ROOT.parent)))
    for fmt in formats():
        spec = importlib.util.find_spec(type(fmt).__module__)
        for label in {fmt.name, *fmt.labels()}:
            owners.setdefault(label, set()).add(str(Path(spec.origin).relative_to(ROOT.parent)))
    return owners


def test_no_code_compares_a_method_or_format_name_outside_its_own_file():
    owners = _registered_names()
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = str(path.relative_to(ROOT.parent))
        tree = ast.parse(path.read_text(), rel)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Compare):
                continue
            values = [node.left, *node.comparators]
            consts = set()
            for v in values:
                if isinstance(v, ast.Constant) and isinstance(v.value, str):
                    consts.add(v.value)
                elif isinstance(v, ast.Tuple | ast.List | ast.Set):
                    consts |= {e.value for e in v.elts if isinstance(e, ast.Constant)}
            for name in consts & set(owners):
                if rel not in owners[name] and name not in ALLOWED.get(rel, set()):
                    bad.append(f"{rel}:{node.lineno} compares against {name!r}")
        for node in ast.walk(tree):  # startswith("gptq") and the like
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("startswith", "endswith")
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and node.args[0].value in owners
                and rel not in owners[node.args[0].value]
                and node.args[0].value not in ALLOWED.get(rel, set())
            ):
                bad.append(f"{rel}:{node.lineno} tests a prefix {node.args[0].value!r}")
    assert not bad, "\n".join(bad)
