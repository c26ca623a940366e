"""The package layout the driver relies on, counting imports inside functions too: role packages (actors/,
learner/, retrieval_service/, qa/) import nothing from the driver (cluster/); actors/ and learner/ do not import
each other (the weight transfer they share is weight_transfer/, which imports no project code); no module cycle."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("actors", "learner", "retrieval_service", "qa", "cluster", "weight_transfer")
ROLES = ("actors", "learner", "retrieval_service", "qa")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Project module -> project modules it imports anywhere in its body."""
    modules = {module_name(p): p for package in PACKAGES for p in (REPO / package).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets.add(node.module)
                targets.update(f"{node.module}.{alias.name}" for alias in node.names)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def package_arrows(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    """(importing package, imported package) for every cross-package import."""
    return {(a.split(".")[0], b.split(".")[0]) for a, targets in graph.items() for b in targets
            if a.split(".")[0] != b.split(".")[0]}


def test_role_packages_import_no_driver_code_and_not_each_other() -> None:
    arrows = package_arrows(import_graph())
    assert {(role, "cluster") for role in ROLES} & arrows == set()
    assert {("actors", "learner"), ("learner", "actors")} & arrows == set()
    assert {a for a in arrows if a[0] == "weight_transfer"} == set()


def test_no_module_import_cycle() -> None:
    graph = import_graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycle = stack[stack.index(target):] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


if __name__ == "__main__":
    for source, target in sorted(package_arrows(import_graph())):
        print(f"{source} -> {target}")
