"""Import layering of the package: folders form layers, and imports only go down (or sideways without a circle).

Every module under `p2es_dist/` is parsed with `ast`; each `import` / `from ... import`, at module level or
inside a function, is an edge from the module's folder to the imported module's folder (`p2es_dist/models/
p2es/model.py` is in `models`, `p2es_dist/cli.py` is `cli`). Two rules:

(a) the folder graph has no cycle (not even between folders of the same layer);
(b) no folder imports a folder of a higher layer than its own.

`from p2es_dist import __version__` is no edge: Python runs the package's `__init__` before any submodule
anyway, and `__version__` is a constant there. Any other import of the package root counts as an import of
the top layer. Imports by string (`importlib.import_module`, as `cli` does for the job modules) are not seen.

A new folder must be added to `LAYERS` (the test says so), which is where its place gets decided.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = "p2es_dist"
ROOT = PACKAGE  # the package's own __init__.py: `load_pretrained` and `__version__`

# Bottom -> top. A folder may import its own layer (without a circle) and the layers below it.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("constants", "errors"),  # plain values and exception types
    ("config", "storage"),  # YAML configs; URIs, S3 and the embedded object store
    ("data",),  # records, shards, Ray Data loading
    ("models",),  # every model, the registry, checkpoints (models/checkpoint.py), GenerationOptions
    ("train", "export", "evaluate", "distill", "tune", "translate"),  # the stages
    ("bench", "jobs", "cli", ROOT),  # entry points and the public facade
)
LAYER_OF = {folder: index for index, layer in enumerate(LAYERS) for folder in layer}
NEUTRAL_ROOT_NAMES = {"__version__"}


def package_dir(base: Path | None = None) -> Path:
    return (base or Path(__file__).resolve().parents[1]) / PACKAGE


def module_name(path: Path, package: Path) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def folder_of(module: str) -> str:
    """`p2es_dist.models.p2es.model` -> `models`; `p2es_dist` -> the root."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ROOT


def imports_of(path: Path, package: Path) -> list[tuple[str, int]]:
    """(imported module, line) for every p2es_dist import in the file, wherever it appears."""
    module = module_name(path, package)
    is_package = path.name == "__init__.py"
    found: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == PACKAGE and {alias.name for alias in node.names} <= NEUTRAL_ROOT_NAMES:
                continue
            if target == PACKAGE:  # `from p2es_dist import models`: each name may be a subpackage
                found += [(f"{PACKAGE}.{alias.name}" if (package / alias.name).exists()
                           or (package / f"{alias.name}.py").exists() else PACKAGE, node.lineno)
                          for alias in node.names]
            else:
                found.append((target, node.lineno))
    return [(name, line) for name, line in found if name == PACKAGE or name.startswith(PACKAGE + ".")]


def folder_edges(package: Path) -> dict[tuple[str, str], list[str]]:
    """(from folder, to folder) -> ["file:line", ...] for every import across folders."""
    edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    for path in sorted(package.rglob("*.py")):
        source = folder_of(module_name(path, package))
        for target_module, line in imports_of(path, package):
            target = folder_of(target_module)
            if target != source:
                edges[source, target].append(f"{path.relative_to(package.parent)}:{line}")
    return dict(edges)


def circles(edges: dict[tuple[str, str], list[str]]) -> list[list[str]]:
    """The folder graph's strongly connected components with more than one folder (each a set of circles)."""
    graph: dict[str, set[str]] = defaultdict(set)
    for source, target in edges:
        graph[source].add(target)
        graph.setdefault(target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan; the graph is a dozen folders, recursion is fine
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def layering_problems(package: Path) -> list[str]:
    edges = folder_edges(package)
    problems = []
    folders = {folder_of(module_name(p, package)) for p in package.rglob("*.py")}
    for folder in sorted(folders - set(LAYER_OF)):
        problems.append(f"{PACKAGE}/{folder}: not in tests/test_layering.py LAYERS; give it a layer")
    for component in circles(edges):
        hops = [f"{a} -> {b} ({edges[a, b][0]})" for (a, b) in sorted(edges) if a in component and b in component]
        problems.append(f"import circle between folders {', '.join(component)}: " + "; ".join(hops))
    for (source, target), where in sorted(edges.items()):
        if source in LAYER_OF and target in LAYER_OF and LAYER_OF[target] > LAYER_OF[source]:
            problems.append(f"upward import {source} (layer {LAYER_OF[source]}) -> {target} "
                            f"(layer {LAYER_OF[target]}): {', '.join(where)}")
    return problems


def test_every_folder_has_a_layer_and_imports_only_go_down_without_cycles():
    problems = layering_problems(package_dir())
    assert not problems, "\n".join(problems)


def test_the_checker_sees_a_cycle_and_an_upward_import(tmp_path):
    package = tmp_path / PACKAGE
    for folder, text in {
        "models": "def f():\n    from p2es_dist.distill.student import Student\n",  # function-level counts
        "distill": "from p2es_dist.models import registry\n",
        "data": "from .. import models\n",  # relative, and upward
    }.items():
        (package / folder).mkdir(parents=True)
        (package / folder / "__init__.py").write_text(text)
    (package / "__init__.py").write_text("")
    problems = layering_problems(package)
    assert any(p.startswith("import circle") and "distill" in p and "models" in p for p in problems), problems
    assert any(p.startswith("upward import models") for p in problems), problems
    assert any(p.startswith("upward import data") for p in problems), problems
