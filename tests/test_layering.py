"""The import graph of `spectral_diffusion` runs downward only and has no loop (docs/architecture.md, "Layers").

Every `import` / `from ... import` is read with `ast`, those inside functions included. Importing
`spectral_diffusion.a.b` also runs the package `spectral_diffusion.a` (its `__init__`), so that is an edge too.
Run as a script to print the graph's violations: `python tests/test_layering.py`.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = "spectral_diffusion"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

# Lowest first. A module may import modules of its own layer or a lower one, never a higher one.
# Names are relative to the package; a name covers its submodules ("adapters" = the adapters package).
LAYERS: tuple[tuple[str, ...], ...] = (
    ("", "errors", "atomic", "progress"),  # "" is the package root (version, lazy public API)
    ("bands", "tokenizer", "single_file", "regional", "prompts"),
    ("svd_cache",),
    ("adapters",),
    ("fingerprint", "models", "concept_file", "sidecar", "tokens", "export", "band_registry"),
    ("fusion", "compose", "loras", "generation", "pipeline"),
    ("training",),
    ("testing",),
    ("ui",),
    ("toyworld",),
    ("cli", "__main__"),
)


def module_names() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name)."""
    names = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def _imported(module: str, path: Path, known: set[str]) -> Iterator[str]:
    """The package modules that `module` names in an import statement anywhere in its source."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the importing module's package
                anchor = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, *([base] if base else [])])
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known)


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules its import statements run, parent packages included (not its own)."""
    modules = module_names()
    known = set(modules)
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        own_parents = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)}
        edges = set()
        for target in _imported(module, path, known):
            if target != PACKAGE and not target.startswith(PACKAGE + "."):
                continue
            parts = target.split(".")
            edges |= {".".join(parts[:i]) for i in range(2, len(parts) + 1)} - own_parents
            if target == PACKAGE:  # an explicit import of the package root
                edges.add(PACKAGE)
        graph[module] = {e for e in edges if e in known and e != module}
    return graph


def layer_of(module: str) -> int:
    """Index in `LAYERS` of the longest name that covers `module`; KeyError when none does."""
    relative = module.removeprefix(PACKAGE).removeprefix(".")
    best = None
    for index, names in enumerate(LAYERS):
        for name in names:
            covers = relative == name or (name and relative.startswith(name + "."))
            if covers and (best is None or len(name) > best[0]):
                best = (len(name), index)
    if best is None:
        raise KeyError(module)
    return best[1]


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """`importer -> imported` for every import from a lower layer into a higher one."""
    return [
        f"{module} (layer {layer_of(module)}) -> {target} (layer {layer_of(target)})"
        for module, targets in sorted(graph.items())
        for target in sorted(targets)
        if layer_of(target) > layer_of(module)
    ]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One path for each import loop found by a depth-first search (empty when the graph is acyclic)."""
    found, state = [], dict.fromkeys(graph, 0)  # 0 unseen, 1 on the current path, 2 done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state[target] == 1:
                found.append([*path[path.index(target):], target])
            elif state[target] == 0:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if state[module] == 0:
            visit(module, [module])
    return found


def test_every_module_has_a_layer() -> None:
    unplaced = []
    for module in module_names():
        try:
            layer_of(module)
        except KeyError:
            unplaced.append(module)
    assert not unplaced, f"add these modules to LAYERS in tests/test_layering.py: {unplaced}"


def test_no_import_runs_upward() -> None:
    assert upward_imports(import_graph()) == []


def test_no_import_loop() -> None:
    assert cycles(import_graph()) == []


def test_the_product_never_imports_the_toy_world() -> None:
    graph = import_graph()
    toy = f"{PACKAGE}.toyworld"
    users = sorted(
        module
        for module, targets in graph.items()
        if not module.startswith((toy, f"{PACKAGE}.cli"))
        and any(t == toy or t.startswith(toy + ".") for t in targets)
    )
    assert users == []


def test_the_checker_sees_imports_inside_functions_and_parent_packages() -> None:
    graph = import_graph()
    # cli.train imports the trainer inside its command function only
    assert f"{PACKAGE}.training.trainer" in graph[f"{PACKAGE}.cli.train"]
    # importing adapters.layers runs the adapters package first
    assert f"{PACKAGE}.adapters" in graph[f"{PACKAGE}.fingerprint"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


if __name__ == "__main__":
    graph = import_graph()
    problems = upward_imports(graph) + [" -> ".join(loop) for loop in cycles(graph)]
    print("\n".join(problems) or f"{len(graph)} modules: no upward import, no loop")
