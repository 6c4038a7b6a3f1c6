"""The import graph of campus_search: no cycles, and no layer importing one above it or the web framework.

Every ``import`` and ``from ... import`` in every module is read with :mod:`ast` -- at module level, in
functions (the "local import" that hides a cycle) and under ``TYPE_CHECKING`` alike -- so a dependency
cannot hide from the check by moving into a function. docs/architecture.md describes the layers.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "campus_search"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE

#: The layers, lowest first. A module belongs to the layer of the longest prefix listed here; it may
#: import modules of its own layer and of lower layers, never of a higher one. Each package's
#: ``__init__`` docstring says the same in words.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("base", (PACKAGE, "campus_search.config", "campus_search.errors", "campus_search.metrics",
              "campus_search.breaker")),
    ("security", ("campus_search.security", "campus_search.security.roles", "campus_search.security.jwks",
                  "campus_search.security.proxies", "campus_search.security.access")),
    ("storage", ("campus_search.storage", "campus_search.embedding")),
    ("components", ("campus_search.ingest", "campus_search.retrieval", "campus_search.audit")),
    ("services", ("campus_search.services", "campus_search.ops")),
    # the web layer: Flask, its extensions and the request's identity (security.auth reads bearer tokens
    # with flask-jwt-extended), the app factory and the command line that builds and serves it
    ("web", ("campus_search.api", "campus_search.security.auth", "campus_search.app", "campus_search.cli")),
)

#: Top-level distributions only the web layer may import.
WEB_FRAMEWORK = ("flask", "werkzeug")

#: The packages that own tables, and so hold the SQL that reads and writes them.
SQL_OWNERS = ("campus_search.storage", "campus_search.retrieval", "campus_search.ingest", "campus_search.audit")
_SQL = re.compile(r"^\s*(SELECT|INSERT\s+INTO|UPDATE|DELETE\s+FROM|WITH|CREATE|ALTER|DROP|TRUNCATE|COPY|"
                  r"SET\s+(LOCAL|SESSION|TRANSACTION))\b")

#: (importer, imported) pairs allowed against the layer order, each a module or a package (then every
#: module in it). Keep this tiny, and say why.
EXEMPT: frozenset[tuple[str, str]] = frozenset({
    # Settings validation checks ROLES_JSON, ROLE_MAPPING and TRUSTED_PROXIES at start-up with the very
    # parsers that later use them, so a bad setting fails the start rather than the first request.
    # Both modules import nothing from campus_search, so no cycle can pass through this edge.
    ("campus_search.config.validation", "campus_search.security.roles"),
    ("campus_search.config.validation", "campus_search.security.proxies"),
})


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # a campus_search module, or the top-level name of a third-party one
    line: int


def modules(root: Path = ROOT, package: str = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (packages by their ``__init__``)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, known: Mapping[str, Path], package: str = PACKAGE) -> list[Import]:
    """Every import in the module: campus_search modules resolved to the module imported (``from
    campus_search.x import y`` is module ``x.y`` when y is a module, else ``x``), others by top-level name."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    here = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[Import] = []

    def resolve(dotted: str) -> str:
        while dotted not in known and "." in dotted:
            dotted = dotted.rpartition(".")[0]
        return dotted

    def add(dotted: str, line: int) -> None:
        if dotted == package or dotted.startswith(package + "."):
            found.append(Import(name, resolve(dotted), line))
        else:
            found.append(Import(name, dotted.split(".")[0], line))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")[: len(here.split(".")) - node.level + 1]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            if source == package or source.startswith(package + "."):
                for alias in node.names:
                    full = f"{source}.{alias.name}"
                    add(full if full in known else source, node.lineno)
            else:
                add(source, node.lineno)
    return [i for i in found if i.target != name]


def graph(root: Path = ROOT, package: str = PACKAGE) -> dict[str, list[Import]]:
    known = modules(root, package)
    return {name: imports(name, path, known, package) for name, path in known.items()}


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def exempt(importer: str, imported: str) -> bool:
    return any(_within(importer, a) and _within(imported, b) for a, b in EXEMPT)


def layer_of(module: str) -> tuple[int, str]:
    best: tuple[int, int, str] | None = None  # (prefix length, rank, layer name)
    for rank, (layer, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[0]):
                best = (len(prefix), rank, layer)
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in tests/test_architecture.py")
    return best[1], best[2]


def cycles(edges: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """One cycle (as a path a -> b -> ... -> a) per strongly connected component of more than one node,
    found with Tarjan's algorithm (iterative, so a deep graph cannot exhaust the stack)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[set[str]] = []
    counter = 0
    succ = {node: sorted(set(targets)) for node, targets in edges.items()}
    for start in sorted(succ):
        if start in index:
            continue
        work = [(start, iter(succ.get(start, ())))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, it = work[-1]
            for nxt in it:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(succ.get(nxt, ()))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        components.append(component)
    return [_cycle_in(component, succ) for component in components]


def _cycle_in(component: set[str], succ: Mapping[str, list[str]]) -> list[str]:
    """A shortest cycle through the component's first node (breadth-first within the component)."""
    start = min(component)
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in succ.get(node, ()):
                if nxt not in component:
                    continue
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [*reversed(path), start]
                if nxt not in parent:
                    parent[nxt] = node
                    following.append(nxt)
        frontier = following
    raise AssertionError("a strongly connected component without a cycle")  # pragma: no cover


def cycle_problems(g: Mapping[str, list[Import]]) -> list[str]:
    edges = {name: [i.target for i in found if i.target in g] for name, found in g.items()}
    return ["import cycle: " + " -> ".join(c) for c in cycles(edges)]


def component(module: str) -> str:
    """The package a module belongs to (``campus_search.ingest``), or the top-level module itself."""
    return ".".join(module.split(".")[:2])


def component_cycle_problems(g: Mapping[str, list[Import]]) -> list[str]:
    """Cycles between packages (ingest -> retrieval -> ingest through different modules), which the
    module graph alone allows: each component must sit on the ones it uses, never beside them both ways."""
    edges: dict[str, set[str]] = {}
    for name, found in g.items():
        for imp in found:
            if imp.target in g and component(imp.target) != component(name) and not exempt(name, imp.target):
                edges.setdefault(component(name), set()).add(component(imp.target))
    return ["component cycle: " + " -> ".join(c) for c in cycles(edges)]


def layer_problems(g: Mapping[str, list[Import]]) -> list[str]:
    problems = []
    for name, found in sorted(g.items()):
        rank, layer = layer_of(name)
        for imp in found:
            if imp.target in g:
                their_rank, their_layer = layer_of(imp.target)
                if their_rank > rank and not exempt(name, imp.target):
                    problems.append(f"{name}:{imp.line} ({layer}) imports {imp.target} ({their_layer}), a higher layer")
            elif (imp.target in WEB_FRAMEWORK or imp.target.startswith("flask_")) and LAYERS[rank][0] != "web":
                problems.append(f"{name}:{imp.line} ({layer}) imports {imp.target}: only the web layer may")
    return problems


def sql_outside_its_owners(root: Path = ROOT, package: str = PACKAGE) -> list[str]:
    """Every string literal (an f-string by its first part) that starts like an SQL statement, in a
    module outside :data:`SQL_OWNERS`: such SQL belongs behind a function of the layer owning the table."""
    found = []
    for name, path in modules(root, package).items():
        if any(name == owner or name.startswith(owner + ".") for owner in SQL_OWNERS):
            continue
        # (ast.walk reaches an f-string's parts on their own too: its first part is a Constant like any other)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and _SQL.match(node.value):
                found.append(f"{name}:{node.lineno}: {node.value.strip()[:60]!r}")
    return found


def test_every_module_is_in_a_layer():
    for name in modules():
        layer_of(name)


def test_no_import_cycles():
    problems = cycle_problems(graph())
    assert not problems, "\n".join(problems)


def test_no_import_cycles_between_components():
    problems = component_cycle_problems(graph())
    assert not problems, "\n".join(problems)


def test_no_layer_imports_a_higher_one_or_the_web_framework():
    problems = layer_problems(graph())
    assert not problems, "\n".join(problems)


def test_exemptions_are_still_needed():
    """An exemption whose import is gone is removed, so the list cannot grow stale and hide a new edge."""
    edges = {(name, imp.target) for name, found in graph().items() for imp in found}
    unused = sorted((a, b) for a, b in EXEMPT if not any(_within(i, a) and _within(t, b) for i, t in edges))
    assert not unused, f"exemptions no longer needed: {unused}"


def test_sql_lives_in_the_layers_that_own_tables():
    found = sql_outside_its_owners()
    assert not found, "SQL outside storage/retrieval/ingest/audit:\n" + "\n".join(found)


# ---- the check itself, on planted packages: it must see what it is meant to see


def _plant(tmp_path: Path, files: Mapping[str, str]) -> Path:
    root = tmp_path / PACKAGE
    for rel, text in {"__init__.py": "", **files}.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        for parent in path.relative_to(root).parents:
            (root / parent / "__init__.py").touch()
        path.write_text(text)
    return root


def test_a_planted_cycle_through_a_function_local_import_is_reported(tmp_path):
    root = _plant(tmp_path, {
        "embedding/local.py": "from campus_search.embedding import remote\n",
        "embedding/remote.py": "def make():\n    from campus_search.embedding.local import X\n",
    })
    problems = cycle_problems(graph(root))
    assert problems == ["import cycle: campus_search.embedding.local -> campus_search.embedding.remote"
                        " -> campus_search.embedding.local"]


def test_a_planted_cycle_between_two_components_is_reported(tmp_path):
    root = _plant(tmp_path, {
        "ingest/pipeline.py": "from campus_search.retrieval.lexical import compact\n",
        "retrieval/lexical.py": "",
        "retrieval/params.py": "from campus_search.ingest.metadata import parse_datetime\n",
        "ingest/metadata.py": "",
    })
    assert cycle_problems(graph(root)) == []  # no module cycle: only the packages go round
    assert component_cycle_problems(graph(root)) == [
        "component cycle: campus_search.ingest -> campus_search.retrieval -> campus_search.ingest"]


def test_a_planted_relative_import_cycle_is_reported(tmp_path):
    root = _plant(tmp_path, {
        "ops/server.py": "from . import hooks\n",
        "ops/hooks.py": "from .server import announce\n",
    })
    assert cycle_problems(graph(root)) == [
        "import cycle: campus_search.ops.hooks -> campus_search.ops.server -> campus_search.ops.hooks"]


@pytest.mark.parametrize("line", ["from flask import g", "import werkzeug.exceptions", "import flask_limiter",
                                  "def f():\n    from flask import request"])
def test_a_planted_web_framework_import_below_the_web_layer_is_reported(tmp_path, line):
    root = _plant(tmp_path, {"audit/records.py": line + "\n"})
    problems = layer_problems(graph(root))
    assert len(problems) == 1 and "campus_search.audit.records" in problems[0], problems
    assert layer_problems(graph(_plant(tmp_path / "web", {"api/errors.py": line + "\n"}))) == []


def test_a_planted_import_of_a_higher_layer_is_reported(tmp_path):
    root = _plant(tmp_path, {
        "api/errors.py": "",
        "audit/records.py": "def respond():\n    from campus_search.api.errors import error_response\n",
        "storage/backup.py": "import campus_search.services\n",
        "services.py": "",
    })
    problems = layer_problems(graph(root))
    assert [p.split(" ")[0] for p in problems] == ["campus_search.audit.records:2", "campus_search.storage.backup:1"]


def test_cycles_finds_every_cycle_and_only_cycles():
    assert cycles({"a": ["b"], "b": ["c"], "c": []}) == []
    found = cycles({"a": ["b"], "b": ["a", "c"], "c": ["d"], "d": ["c"], "e": ["e"]})
    assert sorted(found) == [["a", "b", "a"], ["c", "d", "c"]]


def test_planted_sql_in_the_web_layer_is_reported(tmp_path):
    root = _plant(tmp_path, {
        "api/stats.py": 'def f(conn, w):\n    return conn.execute(f"SELECT count(*) FROM audit_log {w}")\n',
        "ops/health.py": 'PROBE = "SET LOCAL statement_timeout = 1"\nBANNER = "DELETE /api/x: delete a thing"\n',
        "storage/db.py": 'PING = "SELECT 1"\n',
    })
    assert [p.split(":")[0] for p in sql_outside_its_owners(root)] == ["campus_search.api.stats",
                                                                       "campus_search.ops.health"]
