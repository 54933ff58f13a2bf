"""The project's structure rules, checked on the source itself (ast and tokenize, no imports run
except the CLI's own):

- every `fedvox` sub-command and sub-sub-command resolves to an importable module with
  `add_arguments` and `run`, and its `--help` works (a missed rename fails here, not in a user's
  terminal);
- no import cycle among fedvox's modules, and the layering: common imports neither client, server
  nor simulations; client and server never import each other nor simulations;
- no module over 400 lines, no function over 60 (the `def` line to its last line);
- no issue number and no date in a comment or docstring: they rot; docs/benchmarks.md keeps the
  measured figures and their dates.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import io
import re
import tokenize
from pathlib import Path

import pytest

from simulations import cli

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "client", "server", "simulations")
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def _sources() -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the four packages."""
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


SOURCES = _sources()


# -- the CLI wiring ----------------------------------------------------------------------------


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...]) -> list[tuple]:
    """(argv path, parser) of every sub-command under `parser`, depth first."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.append(((*path, name), sub))
                found += _commands(sub, (*path, name))
    return found


def _all_commands() -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    found = []
    for name in cli.SUBCOMMANDS:
        top = cli.build_parser(name)
        found += [(p, sp) for p, sp in _commands(top, ()) if p[0] == name]
    return found


def test_every_cli_command_resolves_and_has_help(capsys: pytest.CaptureFixture) -> None:
    commands = _all_commands()
    names = {path for path, _ in commands}
    assert {("bench", "speed"), ("audit", "node"), ("validate",)} <= names, names
    for path, parser in commands:
        for key, value in parser._defaults.items():
            if key.endswith("_module"):
                module = importlib.import_module(value)
                assert callable(getattr(module, "run", None)), (path, value)
                assert callable(getattr(module, "add_arguments", None)), (path, value)
        with pytest.raises(SystemExit) as done:
            cli.main([*path, "--help"])
        assert done.value.code == 0, path
        assert "usage: fedvox " + " ".join(path) in capsys.readouterr().out, path


def test_every_module_of_a_command_is_named_by_the_cli() -> None:
    """Each `_module` default names a module that exists (a renamed file breaks the wiring)."""
    named = {m for m, _ in cli.SUBCOMMANDS.values()}
    for _, parser in _all_commands():
        named |= {v for k, v in parser._defaults.items() if k.endswith("_module")}
    missing = sorted(m for m in named if m not in SOURCES)
    assert not missing, f"the CLI names modules that do not exist: {missing}"


# -- imports -----------------------------------------------------------------------------------


def _imports(name: str, path: Path) -> set[str]:
    """The fedvox modules `name` imports: every import statement, at module level, inside
    functions and under `if TYPE_CHECKING:` alike (a lazy import is still a dependency);
    `from pkg import x` counts pkg.x when that is a module, else pkg."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against the importing package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                out.add(full if full in SOURCES else base)
    return {m for m in out if m in SOURCES and m != name}


GRAPH = {name: _imports(name, path) for name, path in SOURCES.items()}


def _unresolved(path: Path) -> list[str]:
    """Absolute imports of a fedvox package that name no module of it, or a name its module
    does not bind (a missed rename that only fails when that function runs)."""
    missing = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names = [node.module]
            if node.module in SOURCES:
                bound = _bound_names(node.module)
                names += [
                    f"{node.module}.{a.name}"
                    for a in node.names
                    if a.name not in bound and a.name != "*"
                ]
        else:
            continue
        for name in names:
            if name.split(".")[0] in PACKAGES and name not in SOURCES:
                missing.append(f"{_rel(path)}:{node.lineno}: {name}")
    return missing


def _bound_names(module: str) -> set[str]:
    """The names a module binds at its top level (sub-modules are checked as modules)."""
    bound: set[str] = set()
    for node in ast.parse(SOURCES[module].read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            bound |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.If, ast.Try)):
            bound |= {
                n.name if hasattr(n, "name") else n.id
                for n in ast.walk(node)
                if isinstance(n, (ast.FunctionDef, ast.ClassDef))
                or (isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store))
            }
            bound |= {
                (a.asname or a.name).split(".")[0]
                for n in ast.walk(node)
                if isinstance(n, (ast.Import, ast.ImportFrom))
                for a in n.names
            }
    return bound


def test_every_import_of_a_fedvox_module_resolves() -> None:
    files = [*SOURCES.values(), *sorted((ROOT / "tests").glob("*.py"))]
    missing = [m for path in files for m in _unresolved(path)]
    assert not missing, missing


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle() -> None:
    assert len(GRAPH) > 100  # the walk found the project
    assert "common.progress" in GRAPH["simulations.cli"]  # an import inside main() counts
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles(GRAPH) == []


FORBIDDEN = {
    "common": ("client", "server", "simulations"),
    "server": ("client", "simulations"),
    "client": ("server", "simulations"),
}


def test_layering() -> None:
    broken = [
        f"{name} imports {target}"
        for name, targets in GRAPH.items()
        for target in sorted(targets)
        if target.split(".")[0] in FORBIDDEN.get(name.split(".")[0], ())
    ]
    assert not broken, broken


# -- sizes and comments ------------------------------------------------------------------------


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def test_module_and_function_sizes() -> None:
    too_long = []
    for path in SOURCES.values():
        text = path.read_text()
        lines = len(text.splitlines())
        if lines > MAX_MODULE_LINES:
            too_long.append(f"{_rel(path)}: {lines} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                span = node.end_lineno - node.lineno + 1
                if span > MAX_FUNCTION_LINES:
                    too_long.append(f"{_rel(path)}:{node.lineno} {node.name}: {span} lines")
    assert not too_long, too_long


ROT = re.compile(r"\b[Ii]ssues? #?\d+|\b(19|20)\d\d-[01]\d-[0-3]\d\b")


def _prose(text: str) -> list[tuple[int, str]]:
    """(line, text) of every comment and docstring."""
    found = [
        (tok.start[0], tok.string)
        for tok in tokenize.generate_tokens(io.StringIO(text).readline)
        if tok.type == tokenize.COMMENT
    ]
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            first = node.body[0] if node.body else None
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                if isinstance(first.value.value, str):
                    found.append((first.lineno, first.value.value))
    return found


def test_no_issue_numbers_or_dates_in_comments() -> None:
    assert ROT.search("see issue 15") and ROT.search("measured 2026-12-07")
    rotting = [
        f"{_rel(path)}:{line}: {ROT.search(text).group(0)!r}"
        for path in SOURCES.values()
        for line, text in _prose(path.read_text())
        if ROT.search(text)
    ]
    assert not rotting, rotting
