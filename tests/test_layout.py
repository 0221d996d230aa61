"""The package's layout guards: imports point only down the layers, no circles, small modules.

Layers, low to high: data -> transforms -> networks -> metrics -> atlas -> engines -> inference
-> evaluation -> apps. Every import of a ``monai_mrngan`` module is read from the source (also the
ones inside functions), so a lazy import cannot hide an upward arrow or a circle.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "monai_mrngan"
LAYERS = ("data", "transforms", "networks", "metrics", "atlas", "engines", "inference", "evaluation", "apps")
MAX_LINES = 500


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))}


def _layer(module: str) -> int:
    """Index in LAYERS; the package root (``__init__``, ``__main__``) counts as apps."""
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else len(LAYERS) - 1


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The ``monai_mrngan`` modules that ``module`` imports anywhere in its source."""
    is_pkg = path.name == "__init__.py"
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                prefix = base[: len(base) - (node.level - 1)]
                target = ".".join(prefix + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [target] + [f"{target}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            # the longest known module the name starts with (``pkg.mod.func`` -> ``pkg.mod``)
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {m: _imports(m, p, known) for m, p in mods.items()}


def test_package_imports():
    importlib.import_module("monai_mrngan")
    for module in _modules():
        if not module.endswith("__main__"):
            importlib.import_module(module)


def test_every_module_lives_in_a_layer():
    stray = [m for m in _modules() if m.count(".") >= 1 and m.split(".")[1] not in LAYERS + ("__main__",)]
    assert not stray, f"modules outside the layers {LAYERS}: {stray}"


def test_imports_only_point_down():
    upward = []
    for module, targets in _graph().items():
        for target in targets:
            # a package's __init__ may re-export its own modules
            if _layer(target) > _layer(module):
                upward.append(f"{module} -> {target}")
    assert not upward, "imports from a higher layer into a lower one:\n" + "\n".join(sorted(upward))


def test_no_import_circles():
    graph = _graph()
    # packages import their own modules (re-exports); a module importing its package's __init__ is not a circle
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if module_is_parent(nxt, node):
                continue
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    def module_is_parent(pkg: str, module: str) -> bool:
        return module.startswith(pkg + ".")

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("module", sorted(_modules()))
def test_module_is_small(module):
    lines = len(_modules()[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{module}: {lines} lines (at most {MAX_LINES})"


def test_guard_sees_a_violation(tmp_path):
    """The walker resolves relative, absolute and lazy imports (so the guards above can fail)."""
    src = tmp_path / "monai_mrngan" / "networks" / "bad.py"
    src.parent.mkdir(parents=True)
    src.write_text("from ..inference import reconstruct\ndef f():\n    import monai_mrngan.apps.cli\n    from .gan import GeneralBrain\n")
    known = {"monai_mrngan.inference.reconstruct", "monai_mrngan.apps.cli", "monai_mrngan.networks.gan", "monai_mrngan.inference"}
    found = _imports("monai_mrngan.networks.bad", src, known)
    assert found == {"monai_mrngan.inference", "monai_mrngan.inference.reconstruct", "monai_mrngan.apps.cli", "monai_mrngan.networks.gan"}
    assert [t for t in found if _layer(t) > _layer("monai_mrngan.networks.bad")] != []
