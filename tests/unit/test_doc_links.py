"""docs/architecture.md's line links cannot drift: every [`Name`](../path.py#LN) must point at the line where
`Name` (a function, method or class; dotted for a method) is defined. `python -m tests.unit.test_doc_links --fix`
rewrites the links to the current lines."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "architecture.md"
LINK = re.compile(r"\[`(?P<name>[A-Za-z_][\w.]*)`\]\(\.\./(?P<path>[\w/]+\.py)#L(?P<line>\d+)\)")


def definitions(path: Path) -> dict[str, int]:
    """Qualified name -> line of every function and class in a module (methods as Class.method)."""
    found: dict[str, int] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                name = prefix + child.name
                line = min([child.lineno, *(d.lineno for d in child.decorator_list)])
                found[name] = line
                visit(child, name + ".")

    visit(ast.parse(path.read_text()), "")
    return found


def check(text: str) -> tuple[list[str], str]:
    """(problems, text with every link pointing at its definition's current line)."""
    problems: list[str] = []
    cache: dict[str, dict[str, int]] = {}

    def fix(match: re.Match) -> str:
        name, path, line = match["name"], match["path"], int(match["line"])
        if not (REPO / path).is_file():
            problems.append(f"{path} does not exist (link to {name})")
            return match[0]
        lines = cache.setdefault(path, definitions(REPO / path))
        if name not in lines:
            problems.append(f"{name} is not defined in {path}")
            return match[0]
        if lines[name] != line:
            problems.append(f"{name} is at {path}:{lines[name]}, the link says {line}")
        return f"[`{name}`](../{path}#L{lines[name]})"

    return problems, LINK.sub(fix, text)


def test_architecture_links_point_at_their_definitions() -> None:
    text = DOC.read_text()
    assert len(LINK.findall(text)) >= 15, "the walk-through links each hop of the step"
    problems, _ = check(text)
    assert not problems, "run `python -m tests.unit.test_doc_links --fix`:\n" + "\n".join(problems)
    # no other kind of line link survives unchecked
    assert not re.search(r"\.py#L\d+", LINK.sub("", text)), "a line link not of the form [`Name`](../path.py#LN)"


if __name__ == "__main__":
    if "--fix" in sys.argv:
        problems, fixed = check(DOC.read_text())
        DOC.write_text(fixed)
        print("\n".join(problems) or "links already current")
