"""The package's structure: no import circles, the demo imported by nothing, layers as ARCHITECTURE.md states.

Every import in ``cp_dtensor/`` and the oracle (``reference/``, installed as ``cp_dtensor.reference``)
is read from the source, function-level ones included. Imports under ``if TYPE_CHECKING:`` never run,
so they may close no circle, but they still count for the layering: a type is a dependency too.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest
import tomllib
import work_limits

REPO = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {"cp_dtensor": REPO / "cp_dtensor", "cp_dtensor.reference": REPO / "reference"}


def _modules() -> dict[str, Path]:
    """Module name -> source file, for the package and the oracle mapped into it."""
    found = {}
    for prefix, root in PACKAGE_DIRS.items():
        for path in sorted(root.rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([prefix, *parts])] = path
    return found


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _target(name: str) -> str | None:
    """The module ``name`` resolves to: itself, or the package that defines it; None outside the package."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> list[tuple[str, bool]]:
    """``(imported module, runtime)`` for every import in ``module``; ``runtime`` False under TYPE_CHECKING."""
    tree = ast.parse(MODULES[module].read_text())
    is_package = MODULES[module].name == "__init__.py"
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, runtime: bool) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.body:
                visit(child, False)
            for child in node.orelse:
                visit(child, runtime)
            return
        if isinstance(node, ast.Import):
            found.extend((alias.name, runtime) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package that holds this module
                anchor = module.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                full = f"{base}.{alias.name}"
                found.append((full if full in MODULES else base, runtime))
        for child in ast.iter_child_nodes(node):
            visit(child, runtime)

    visit(tree, True)
    return [(target, runtime) for name, runtime in found if (target := _target(name)) and target != module]


GRAPH = {module: _imports(module) for module in MODULES}


def _layer_order() -> list[str]:
    """The layers, bottom first, from the fenced ``layers`` block of ARCHITECTURE.md."""
    text = (REPO / "ARCHITECTURE.md").read_text()
    block = re.search(r"```text layers\n(.*?)```", text, re.S)
    assert block, "ARCHITECTURE.md states the layers in a ```text layers block"
    return [line.split()[0] for line in block.group(1).splitlines() if line.strip()]


LAYERS = _layer_order()


def _layer(module: str) -> str:
    """The layer of a module: its first sub-package (``cp_dtensor.attention.ring`` -> ``attention``)."""
    if module == "cp_dtensor":
        return "face"
    return module.split(".")[1]


def test_every_module_belongs_to_a_stated_layer():
    unknown = sorted({_layer(m) for m in MODULES} - set(LAYERS))
    assert not unknown, f"layers missing from ARCHITECTURE.md: {unknown}"


def test_no_import_circle():
    runtime = {m: sorted({t for t, at_runtime in edges if at_runtime}) for m, edges in GRAPH.items()}
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    circles = []

    def visit(module: str, stack: list[str]) -> None:
        state[module] = 1
        for target in runtime[module]:
            if state.get(target) == 1:
                circles.append(stack[stack.index(target) :] + [target])
            elif target not in state:
                visit(target, [*stack, target])
        state[module] = 2

    for module in sorted(runtime):
        if module not in state:
            visit(module, [module])
    assert not circles, "import circles:\n" + "\n".join(" -> ".join(c) for c in circles)


def test_imports_go_down_the_layers_only():
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    upward = [
        f"{module} ({_layer(module)}) imports {target} ({_layer(target)})"
        for module, edges in GRAPH.items()
        for target, _ in edges
        if rank[_layer(target)] > rank[_layer(module)]
    ]
    assert not upward, "imports against the layering of ARCHITECTURE.md:\n" + "\n".join(upward)


def test_nothing_outside_training_imports_the_demo():
    offenders = [
        f"{module} imports {target}"
        for module, edges in GRAPH.items()
        for target, _ in edges
        if _layer(target) == "training" and _layer(module) != "training"
    ]
    assert not offenders, offenders


def test_the_oracle_imports_nothing_of_the_production_package():
    offenders = [
        f"{module} imports {target}"
        for module, edges in GRAPH.items()
        if _layer(module) == "reference"
        for target, _ in edges
        if _layer(target) != "reference"
    ]
    assert not offenders, offenders


def test_importing_the_library_does_not_load_the_demo():
    code = "import sys, cp_dtensor; print(sorted(m for m in sys.modules if m.startswith('cp_dtensor.training')))"
    out = work_limits.run([sys.executable, "-c", code], cpu_s=60, cwd=REPO / "docs")  # work, not wall time
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_the_wheel_lists_every_package_folder():
    declared = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {m for m, path in MODULES.items() if path.name == "__init__.py"}
    assert declared == folders, {"declared, no folder": declared - folders, "folder, not declared": folders - declared}


@pytest.mark.parametrize("layer", ["positions", "local", "comm"])
def test_the_lowest_layers_never_import_torch_distributed_tensor_or_the_group(layer):
    # Math apart from communication: positions and local never talk to other ranks; comm moves bytes
    # but knows nothing of meshes or DTensors.
    offenders = [
        f"{module} imports {target}"
        for module, edges in GRAPH.items()
        if _layer(module) == layer
        for target, _ in edges
        if _layer(target) in ("mesh", "attention")
    ]
    assert not offenders, offenders
