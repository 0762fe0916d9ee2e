"""The import graph of the package: imports go one way (no circle), the library never reaches up into the CLI.

Parsed with ``ast`` from the source, so every import counts, also those deferred into functions
(which is where a circle hides: it works until someone moves the import to the top).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "mps_cli"
ROOT = Path(__file__).resolve().parents[1] / "src" / PACKAGE


def _module_name(path: Path) -> str:
    parts = [PACKAGE, *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _parse_modules() -> dict[str, tuple[Path, ast.Module]]:
    return {_module_name(p): (p, ast.parse(p.read_text(encoding="utf-8"), filename=str(p)))
            for p in sorted(ROOT.rglob("*.py"))}


MODULES = _parse_modules()


def _imported(module: str, path: Path, tree: ast.Module) -> set[str]:
    """Every module name ``module`` imports anywhere in its body (absolute, as written or resolved)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            names.add(prefix)
            # `from . import prepared` imports a module; `from .x import name` imports x (name is an attribute).
            names.update(f"{prefix}.{alias.name}" for alias in node.names)
    return names


def _internal(name: str) -> str | None:
    """The package module ``name`` refers to (itself or its enclosing module), or None if outside the package."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _graph() -> dict[str, set[str]]:
    graph = {}
    for module, (path, tree) in MODULES.items():
        targets = {_internal(n) for n in _imported(module, path, tree) if n.split(".")[0] == PACKAGE}
        # A module's own package `__init__` is run by Python anyway; importing it is no edge upward.
        graph[module] = {t for t in targets if t and t != module and not module.startswith(t + ".")}
    return graph


GRAPH = _graph()


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a path that ends where it starts, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_parser_sees_the_known_modules_and_edges():
    """Guards the test itself: a parser that found nothing would pass every rule below."""
    assert {"mps_cli.engine.scorer", "mps_cli.cli.app", "mps_cli.weights.reader", "mps_cli.server"} <= set(GRAPH)
    assert "mps_cli.errors" in GRAPH["mps_cli.engine.scorer"]          # from .errors import ...
    assert "mps_cli.weights.reader" in GRAPH["mps_cli.weights.checkpoint"]      # relative, module level
    assert "mps_cli.cli.app" in GRAPH["mps_cli.cli.scoring_cmds"]
    deferred = {t for m, ts in GRAPH.items() for t in ts if m.startswith("mps_cli.cli")}
    assert "mps_cli.engine.scorer" in deferred                         # the CLI loads the engine inside functions


def test_finds_a_cycle_when_there_is_one():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_package_has_no_import_circle():
    cycle = _find_cycle(GRAPH)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_library_never_imports_the_cli():
    # `python -m mps_cli` (__main__) is an entry point like the console script, not library.
    library = [m for m in MODULES if not m.startswith(f"{PACKAGE}.cli") and m != f"{PACKAGE}.__main__"]
    upward = {m: sorted(t for t in GRAPH[m] if t == f"{PACKAGE}.cli" or t.startswith(f"{PACKAGE}.cli."))
              for m in library}
    assert len(library) > 20
    assert not {m: ts for m, ts in upward.items() if ts}, "the library must not depend on the command line"


def test_nothing_imports_click_directly():
    """Typer wraps click; the code uses typer.Exit / typer.BadParameter so there is one CLI vocabulary."""
    clicks = {m: sorted(n for n in _imported(m, path, tree) if n.split(".")[0] == "click")
              for m, (path, tree) in MODULES.items()}
    assert not {m: ns for m, ns in clicks.items() if ns}


def test_every_line_the_cli_prints_goes_through_output():
    """cli/output.py is the one door: no other CLI module prints, touches sys.stdout/sys.stderr (but to ask
    isatty()), makes its own Rich console or spells the ``mps: KIND:`` prefix; the library's log lines carry
    no prefix of the CLI's."""
    found = []
    for module, (_, tree) in MODULES.items():
        in_cli = module.startswith(f"{PACKAGE}.cli") and module != f"{PACKAGE}.cli.output"
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("mps: "):
                found.append(f"{module}:{node.lineno}: {node.value[:40]!r}")
            if not in_cli:
                continue
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("print", "Console"):
                found.append(f"{module}:{node.lineno}: {node.func.id}()")
            if (isinstance(node, ast.Attribute) and node.attr in ("stdout", "stderr")
                    and isinstance(node.value, ast.Name) and node.value.id == "sys"):
                up = parents.get(node)
                if not (isinstance(up, ast.Attribute) and up.attr == "isatty"):
                    found.append(f"{module}:{node.lineno}: sys.{node.attr}")
    assert found == []
