"""The package's architecture, checked from its source (docs/ARCHITECTURE.md draws it).

Every module of src/sigmatune belongs to a unit (a subpackage, or a top-level module), and every unit
to a layer of LAYERS. A module may import from its own unit and from units of lower layers: never from
a layer above, never from a peer in its own layer. Imports inside functions count too (a lazy import
is still a dependency). Also: no import cycle between modules, the optional dependencies of the
[serve] extra only in serving, no source file longer than MAX_LINES, Triton imported only by the fast
paths (ops/ and serving/ops/: core is the method in plain torch), and the kernel switch read only there.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "src" / "sigmatune"
PACKAGE = "sigmatune"
MAX_LINES = 400
LAYERS = [  # bottom first: the allowed order, written once
    ["version"],
    ["core"],  # the method on one layer, plain torch: config, update rules, SVD, the op, SpectralLinear
    ["ops"],  # the op's fast paths (Triton), registered as backends; the one kernel switch
    ["formats"],  # bytes on disk: atomic files, adapter files, basis cache, interop, checkpoints
    ["hub"],  # base models by name (the default model's alias, converted once from GGUF), registry files
    ["model"],  # SigmaModel: a whole model with adapters, and its files in and out
    ["training", "serving"],  # peers: neither imports the other
    ["commands"],  # what each `sigmatune` command does
    ["cli"],  # the table from command name to function
    ["__init__", "__main__"],  # the public API, and `python -m sigmatune`
]
EXTRAS = {"fastapi": "serving", "uvicorn": "serving", "starlette": "serving"}  # [serve]: only that unit
FAST_PATHS = ("sigmatune.ops", "sigmatune.serving.ops")  # the only packages that import triton
SWITCH_READS = ("switches.enabled(", "SIGMATUNE_DISABLE_KERNELS")  # what reads the kernel switch


@dataclass
class Module:
    name: str  # dotted, e.g. sigmatune.core.svd; a package is named by its __init__
    source: str
    is_package: bool


def read_tree(root: Path = SOURCE) -> dict[str, Module]:
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = [PACKAGE, *path.relative_to(root).with_suffix("").parts]
        is_package = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_package else parts)
        modules[name] = Module(name, path.read_text(encoding="utf-8"), is_package)
    return modules


def unit_of(name: str) -> str:
    """sigmatune.core.svd → core, sigmatune.cli → cli, sigmatune → __init__, sigmatune.__main__ → __main__."""
    parts = name.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def layer_of(unit: str) -> int | None:
    return next((i for i, units in enumerate(LAYERS) if unit in units), None)


def imports(module: Module, known: set[str]) -> tuple[set[str], set[str]]:
    """(modules of the package this one imports, top-level names of other packages it imports)."""
    inside, outside = set(), set()
    package = module.name if module.is_package else module.name.rpartition(".")[0]
    for node in ast.walk(ast.parse(module.source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                (inside if alias.name.split(".")[0] == PACKAGE else outside).add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                base = node.module or ""
                if base.split(".")[0] != PACKAGE:
                    outside.add(base)
                    continue
            else:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:  # `from . import layer` imports the module sigmatune.core.layer
                inside.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return inside, {name.split(".")[0] for name in outside}


def problems(modules: dict[str, Module]) -> list[str]:
    found, graph = [], {}
    known = set(modules)
    for name, module in modules.items():
        unit = unit_of(name)
        layer = layer_of(unit)
        if layer is None:
            found.append(f"{name}: its unit {unit!r} has no place in LAYERS (tests/test_architecture.py)")
            continue
        lines = len(module.source.splitlines())
        if lines > MAX_LINES:
            found.append(f"{name}: {lines} lines, more than {MAX_LINES}: split it")
        inside, outside = imports(module, known)
        graph[name] = {target for target in inside if target in known and target != name}
        for target in sorted(inside):
            other = unit_of(target)
            if other == unit or layer_of(other) is None:
                continue
            if layer_of(other) > layer:
                found.append(
                    f"{name} imports {target}: {unit} (layer {layer}) is below {other} (layer {layer_of(other)})"
                )
            elif layer_of(other) == layer:
                found.append(
                    f"{name} imports {target}: {unit} and {other} are peers and must not import each other"
                )
        fast = name.startswith(FAST_PATHS)
        if "triton" in outside and not fast:
            found.append(f"{name} imports triton: only the fast paths ({', '.join(FAST_PATHS)}) may")
        if any(read in module.source for read in SWITCH_READS) and not fast:
            found.append(f"{name} reads the kernel switch: only the fast paths ({', '.join(FAST_PATHS)}) may")
        for package in sorted(outside & set(EXTRAS)):
            if EXTRAS[package] != unit:
                found.append(
                    f"{name} imports {package}, an optional dependency that only {EXTRAS[package]} may use"
                )
    return found + [f"import cycle: {' → '.join(cycle)}" for cycle in cycles(graph)]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of two or more modules (Tarjan), each as a closed path through it."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [shortest_loop(group[0], set(group), graph) for group in groups]


def shortest_loop(start: str, group: set[str], graph: dict[str, set[str]]) -> list[str]:
    """The shortest path of imports from start back to start inside one strongly connected group."""
    parent, frontier = {start: None}, [start]
    while frontier:
        following = []
        for node in frontier:
            for target in sorted(graph[node] & group):
                if target == start:
                    path = [node]  # back from node to start, then turned around
                    while parent[path[-1]] is not None:
                        path.append(parent[path[-1]])
                    return [*reversed(path), start]
                if target not in parent:
                    parent[target] = node
                    following.append(target)
        frontier = following
    raise AssertionError(f"{start} is in no loop of {sorted(group)}")


# ---- the package as it is ------------------------------------------------------------------------------


def test_the_package_keeps_its_layers():
    modules = read_tree()
    assert {unit_of(name) for name in modules} >= {"core", "formats", "model", "training", "serving", "cli"}
    found = problems(modules)
    assert not found, "the architecture is broken:\n" + "\n".join(found)


# ---- the checks catch what they are for -----------------------------------------------------------------


MISTAKES = {  # a wrong line added to one module → exactly what the check must say
    "an import from a layer above": (
        "sigmatune.core.layer",
        "from ..serving.bank import AdapterBank",
        [
            "sigmatune.core.layer imports sigmatune.serving.bank: core (layer 1) is below serving (layer 6)",
            "import cycle: sigmatune.core.layer → sigmatune.serving.bank → sigmatune.formats.base_check → "
            "sigmatune.core.layer",  # serving.bank imports core.layer by way of formats.base_check
        ],
    ),
    "a lazy import from a layer above": (
        "sigmatune.formats.files",
        "def _later():\n    from ..model import sigma_model\n\n    return sigma_model",
        [
            "sigmatune.formats.files imports sigmatune.model.sigma_model: formats (layer 3) is below model (layer 5)",
            "import cycle: sigmatune.formats.adapter_file → sigmatune.formats.files → sigmatune.model.sigma_model"
            " → sigmatune.formats.adapter_file",
        ],
    ),
    "the public API imported from inside": (
        "sigmatune.training.loop",
        "import sigmatune",
        ["sigmatune.training.loop imports sigmatune: training (layer 6) is below __init__ (layer 9)"],
    ),
    "a peer's import": (
        "sigmatune.serving.engine",
        "from ..training.tokens import collate",
        [
            "sigmatune.serving.engine imports sigmatune.training.tokens: serving and training are peers and "
            "must not import each other"
        ],
    ),
    "a cycle inside a layer": (
        "sigmatune.core.transform",
        "from .layer import SpectralLinear",
        ["import cycle: sigmatune.core.layer → sigmatune.core.transform → sigmatune.core.layer"],
    ),
    "triton outside the fast paths": (
        "sigmatune.core.layer",
        "import triton",
        [
            "sigmatune.core.layer imports triton: only the fast paths (sigmatune.ops, sigmatune.serving.ops) may"
        ],
    ),
    "the kernel switch read outside the fast paths": (
        "sigmatune.serving.mixed",
        "ROWS = switches.enabled('rows')",
        [
            "sigmatune.serving.mixed reads the kernel switch: only the fast paths (sigmatune.ops, "
            "sigmatune.serving.ops) may"
        ],
    ),
    "a unit outside every layer": (
        "sigmatune.plugins.extra",
        "from ..core import config",
        ["sigmatune.plugins.extra: its unit 'plugins' has no place in LAYERS (tests/test_architecture.py)"],
    ),
    "the serve extra outside serving": (
        "sigmatune.model.exchange",
        "import fastapi",
        ["sigmatune.model.exchange imports fastapi, an optional dependency that only serving may use"],
    ),
    "a file too long": (
        "sigmatune.core.long",  # a new module: a blank first line, then MAX_LINES more
        "\n".join(f"VALUE_{i} = {i}" for i in range(MAX_LINES)),
        [f"sigmatune.core.long: {MAX_LINES + 1} lines, more than {MAX_LINES}: split it"],
    ),
}


@pytest.mark.parametrize("mistake", MISTAKES)
def test_each_mistake_is_caught(mistake):
    name, line, expected = MISTAKES[mistake]
    modules = read_tree()
    old = modules.get(name, Module(name, "", is_package=False))
    modules[name] = Module(name, f"{old.source}\n{line}\n", old.is_package)
    assert problems(modules) == expected
