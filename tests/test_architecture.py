"""Import boundaries (in the style of torchtune's): the layers of seecl only import downwards.

recipes/ and cli.py are entry points: nothing imports them. methods/ and evaluation/ sit above
see/ and serving/, which sit above the components (model/, data/, training, adapters, ...).
"""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "seecl"

# package or module of seecl -> what it must never import (prefixes of seecl module names)
FORBIDDEN = {
    "": ("seecl.cli", "seecl.recipes", "bench"),  # every component
    "seecl.model": ("seecl.see", "seecl.serving", "seecl.methods", "seecl.evaluation", "seecl.training"),
    "seecl.data": ("seecl.see", "seecl.serving", "seecl.methods", "seecl.evaluation", "seecl.training"),
    "seecl.see": ("seecl.methods", "seecl.evaluation"),
    "seecl.serving": ("seecl.methods", "seecl.evaluation", "seecl.training"),
    "seecl.training": ("seecl.see", "seecl.serving", "seecl.methods", "seecl.evaluation"),
    "seecl.methods": ("seecl.evaluation",),
}
ENTRY_POINTS = ("seecl.cli", "seecl.recipes")


def modules():
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        yield ".".join(p for p in parts if p != "__init__"), path


def imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("module, path", list(modules()), ids=lambda x: x if isinstance(x, str) else "")
def test_imports_only_go_downwards(module, path):
    if module.startswith(ENTRY_POINTS):
        return
    rules = [banned for owner, banned in FORBIDDEN.items() if module.startswith(owner)]
    bad = sorted(name for name in imported(path) for banned in rules for prefix in banned if name.startswith(prefix))
    assert not bad, f"{module} imports {bad}"


def test_every_source_file_stays_short():  # about 500 lines: one concept per file
    long = {str(path.relative_to(SRC)): n for _, path in modules() if (n := len(path.read_text().splitlines())) > 550}
    assert not long, f"split these files by concept: {long}"


def test_relative_imports_are_not_used():
    relative = [
        str(p.relative_to(SRC))
        for _, p in modules()
        if any(isinstance(n, ast.ImportFrom) and n.level for n in ast.walk(ast.parse(p.read_text())))
    ]
    assert not relative


def readme_tree() -> set[str]:
    """The paths of the README's file tree: one line per file, directories end in '/', two spaces a level."""
    text = (SRC.parents[1] / "README.md").read_text()
    block = text.split("## Files", 1)[1].split("```", 2)[1]
    paths, parents = set(), []
    for line in block.splitlines()[1:]:
        if not line.strip():
            continue
        depth = (len(line) - len(line.lstrip(" "))) // 2
        name = line.split()[0]
        parents = parents[:depth]
        paths.add("".join(parents) + name)
        if name.endswith("/"):
            parents.append(name)
    return paths


def test_the_readme_tree_names_every_file():  # a reader finds each file and what it owns
    root = SRC.parents[1]
    listed = readme_tree()
    files = [p for area in ("src", "bench", "tests", "docs") for p in (root / area).rglob("*") if p.is_file()]
    wanted = {
        str(p.relative_to(root)) for p in files if "__pycache__" not in p.parts and p.suffix in {".py", ".md", ".jsonl"}
    }
    assert sorted(wanted - listed) == []
    assert sorted(p for p in listed if not (root / p).exists()) == []
