"""The package's shape: the CLI layer on top, no import cycles, short evaluation functions."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "robustcaps"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _resolve(importer: str, node: ast.ImportFrom | ast.Import) -> list[str]:
    """The robustcaps modules an import statement loads (submodules named by ``from``)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in MODULES]
    base = importer if _is_package(importer) else importer.rpartition(".")[0]
    for _ in range(node.level - 1):
        base = base.rpartition(".")[0]
    target = ".".join(p for p in (base if node.level else "", node.module or "") if p)
    found = [target] if target in MODULES else []
    return found + [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES]


def _imports(name: str, *, top_level_only: bool) -> set[str]:
    tree = ast.parse(MODULES[name].read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out: set[str] = set()
    for node in nodes:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out.update(_resolve(name, node))
    return out


def _loads(importer: str, target: str) -> set[str]:
    """``target`` and the packages above it that ``importer`` is not already inside."""
    parts = target.split(".")
    chain = {".".join(parts[:i]) for i in range(2, len(parts) + 1)}
    return {m for m in chain if m in MODULES and not importer.startswith(m + ".")
            and m != importer}


def test_nothing_below_the_cli_imports_commands():
    offenders = []
    for name in MODULES:
        if name == "robustcaps.cli" or name.startswith("robustcaps.commands"):
            continue
        bad = [t for t in _imports(name, top_level_only=False)
               if t == "robustcaps.commands" or t.startswith("robustcaps.commands.")]
        offenders += [f"{name} -> {t}" for t in bad]
    assert not offenders


def test_no_import_cycles():
    """What runs at import time (module-level imports, and the packages they enter) forms
    no cycle; imports inside functions run later and may point back up."""
    graph = {name: set() for name in MODULES}
    for name in MODULES:
        for target in _imports(name, top_level_only=True):
            graph[name] |= _loads(name, target)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)
    assert graph["robustcaps.evaluation.run"]  # the walk saw real edges


@pytest.mark.parametrize("registry, users", [
    ("robustcaps.attacks.registry", ("robustcaps.attacks.native", "robustcaps.attacks.backends",
                                     "robustcaps.evaluation", "robustcaps.commands")),
    ("robustcaps.models.registry", ("robustcaps.models.capsnet", "robustcaps.models.cnn",
                                    "robustcaps.models.loading", "robustcaps.models.zoo")),
])
def test_registries_import_none_of_their_users(registry, users):
    imported = _imports(registry, top_level_only=False)
    assert not [m for m in imported if m.startswith(users)]


def test_evaluation_functions_are_short():
    long = []
    for path in sorted((PKG / "evaluation").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 60:
                    long.append(f"{path.name}:{node.name} ({n} lines)")
    assert not long


def test_evaluate_reads_as_the_pipeline():
    tree = ast.parse((PKG / "evaluation" / "run.py").read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "evaluate")
    assert fn.end_lineno - fn.lineno + 1 <= 40
