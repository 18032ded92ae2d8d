"""The package's import graph, read from the source with `ast`: no import circle, and imports run downward.

Layers, top to bottom: the public API (`datadream_hf/__init__.py`) and the `datadream-hf` command (`cli.py`); the
tiny world and its tooling (`tiny_world/`); the three stages (`adapt/`, `generate/`, `classify/`), which talk to each
other only through files; the shared modules (every other module of the package). Every import counts, wherever it
stands: at the top of a module, inside a function, or under `if TYPE_CHECKING:`.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "datadream_hf"
STAGES = ("adapt", "generate", "classify")
TOOLING = ("tiny_world",)
ENTRY_POINTS = ("datadream_hf", "datadream_hf.cli")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(name: str, path: Path) -> set[str]:
    """The package's modules that `name` imports (a package's `__init__` when a name is not a module of its own)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            # `from . import hub` imports the module `hub`; `from .data import labels_of` imports `data`.
            targets = [
                f"{module}.{alias.name}" if f"{module}.{alias.name}" in MODULES else module for alias in node.names
            ]
        else:
            continue
        found.update(t for t in targets if t == "datadream_hf" or t.startswith("datadream_hf."))
    return found - {name}


GRAPH = {name: imported_modules(name, path) for name, path in MODULES.items()}


def layer(name: str) -> tuple[int, str]:
    """(height, group): entry points 3, tooling 2, a stage 1 (group: the stage), shared 0."""
    if name in ENTRY_POINTS:
        return 3, "entry"
    top = name.split(".")[1]
    if top in TOOLING:
        return 2, top
    if top in STAGES:
        return 1, top
    return 0, "shared"


def test_the_graph_is_read():
    assert {"datadream_hf.adapt.train", "datadream_hf.run_folder"} <= set(MODULES)
    assert "datadream_hf.run_folder" in GRAPH["datadream_hf.adapt.train"]
    assert "datadream_hf.hub" in GRAPH["datadream_hf.adapt.outputs"]  # `from .. import hub`


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []

    def visit(node):
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
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_find_cycles_finds_a_circle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    assert find_cycles(GRAPH) == []


def test_imports_run_downward_and_stages_do_not_import_each_other():
    wrong = []
    for source, targets in sorted(GRAPH.items()):
        (height, group) = layer(source)
        for target in sorted(targets):
            target_height, target_group = layer(target)
            if target in ENTRY_POINTS:
                wrong.append(f"{source} imports the entry point {target}")
            elif target_height > height:
                wrong.append(f"{source} ({group}) imports {target} ({target_group}), a layer above it")
            elif height == target_height == 1 and group != target_group:
                wrong.append(f"stage {group} imports stage {target_group}: {source} -> {target}")
    assert not wrong, "\n".join(wrong)
