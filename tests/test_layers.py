"""The package's layering, checked from its source: every import of every module of ``chorus_mq`` (at module
level, inside functions and under ``TYPE_CHECKING``, relative or absolute) goes down a layer or stays inside
its own unit, and no modules import each other in a circle.

``LAYERS`` is the table, lowest first; ``docs/CONTRACTS.md`` draws the same picture. A *unit* is a module or a
package of ``chorus_mq`` (its longest prefix in the table: ``sdk.connection`` is its own unit, ``sdk.operator``
belongs to ``sdk``). A unit may import any unit of a lower layer, and itself; units of one layer are peers and
import neither each other (``adapters`` and ``aggregation`` know nothing of each other, nor do ``store`` and
``state``). ``TYPE_CHECKING`` imports count like any other: an annotation that names a module is a dependency
on it, and a cycle kept alive by annotations alone still couples the modules.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import chorus_mq

PACKAGE = Path(chorus_mq.__file__).resolve().parent
CONTRACTS = PACKAGE.parent / "docs" / "CONTRACTS.md"

#: each layer's units, lowest first (docs/CONTRACTS.md draws this picture)
LAYERS: tuple[tuple[str, ...], ...] = (
    ("", "errors", "names", "settings", "progress"),  # the package, errors, every name, settings, progress bars
    ("ids", "messages", "manifest", "strategy", "staleness", "factors"),  # records and rules; factor math
    ("layout",),  # object keys
    ("adapters", "aggregation"),  # files <-> factors; the aggregation math (peers)
    ("secagg",),  # the secure-aggregation protocol
    ("store", "state"),  # object storage; Redis state (peers)
    ("results", "gateway"),  # reading stored results; the clients' Redis proxy (peers)
    ("workers",),  # the fleet: pump, ingest, plan, shard, commit, compact, sweep; the in-process runner
    ("sdk.connection",),  # the SDK's connection: settings, Redis, store, credentials, clear service errors
    ("pulled", "federation", "secure_upload"),  # what the SDK drives, on state and store (peers)
    ("sdk",),  # the SDK by role: reader, operator, participant, both
    ("training",),  # client-side training; simulations with real models
    ("create_request",),  # a federation-create request resolved to its config, model and round 0
    ("client",),  # ChorusClient: both roles and the training entry points
    ("simulate_synthetic",),  # the synthetic simulation
    ("cli",),  # the command line
)


@dataclass(frozen=True)
class Import:
    """``source`` imports ``target`` (both dotted names below ``chorus_mq``; ``""`` is the package) at ``line``."""

    source: str
    target: str
    file: str
    line: int


# -- reading the imports ---------------------------------------------------------------------------------------


def module_names(root: Path = PACKAGE) -> dict[str, Path]:
    """Every module of the package by its dotted name below it (a package by its own name, ``""`` for the root)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports_of(source: str, module: str, *, is_package: bool, file: str, known: Iterable[str]) -> list[Import]:
    """Every import of a ``chorus_mq`` module in ``source`` (module ``module``), wherever it is in the file."""
    modules = set(known)

    def resolve(dotted: str) -> str | None:
        while dotted not in modules:
            if not dotted:
                return None
            dotted = dotted.rpartition(".")[0]
        return dotted

    package = module if is_package else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(source)):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [_below(a.name) for a in node.names if a.name == "chorus_mq" or a.name.startswith("chorus_mq.")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".") if package else []
                if node.level - 1 > len(parts):
                    raise ValueError(f"{file}:{node.lineno}: a relative import above the package")
                base = ".".join([*parts[: len(parts) - (node.level - 1)], *([node.module] if node.module else [])])
            elif node.module == "chorus_mq" or (node.module or "").startswith("chorus_mq."):
                base = _below(node.module or "")
            else:
                continue
            base = base.strip(".")
            # `from pkg import sub` imports the submodule; `from mod import name` the module
            subs = [f"{base}.{a.name}".strip(".") for a in node.names]
            targets = [sub if sub in modules else base for sub in subs]
        for target in targets:
            resolved = resolve(target)
            if resolved is not None and resolved != module:
                out.append(Import(module, resolved, file, node.lineno))
    return out


def _below(dotted: str) -> str:
    return dotted.removeprefix("chorus_mq").removeprefix(".")


def package_imports(root: Path = PACKAGE) -> list[Import]:
    modules = module_names(root)
    out = []
    for name, path in modules.items():
        rel = str(path.relative_to(root.parent))
        out += imports_of(path.read_text(), name, is_package=path.name == "__init__.py", file=rel, known=modules)
    return out


# -- the checks -------------------------------------------------------------------------------------------------


def unit_of(module: str, layers: Sequence[Sequence[str]] = LAYERS) -> str | None:
    """The table's longest unit that is ``module`` or a package holding it (None: the table misses it)."""
    units = [u for names in layers for u in names]
    holding = [u for u in units if u == module or (u and module.startswith(u + ".")) or (u == "" and module == "")]
    return max(holding, key=len) if holding else None


def layer_violations(imports: Iterable[Import], layers: Sequence[Sequence[str]] = LAYERS) -> list[str]:
    """One line per import that goes up a layer or sideways to a peer unit (``file:line: a -> b``)."""
    level = {u: i for i, names in enumerate(layers) for u in names}
    out = []
    for imp in imports:
        src, dst = unit_of(imp.source, layers), unit_of(imp.target, layers)
        if src is None or dst is None or src == dst:
            continue
        if level[dst] > level[src]:
            what = f"up from layer {level[src]} ({src or 'chorus_mq'}) to layer {level[dst]} ({dst or 'chorus_mq'})"
        elif level[dst] == level[src]:
            what = f"sideways between peers {src!r} and {dst!r} of layer {level[src]}"
        else:
            continue
        out.append(f"{imp.file}:{imp.line}: {_show(imp.source)} imports {_show(imp.target)}: {what}")
    return sorted(out)


def cycles(imports: Iterable[Import]) -> list[list[str]]:
    """Each circle of modules that import each other (one circle per strongly connected set, as a path)."""
    graph: dict[str, set[str]] = {}
    for imp in imports:
        graph.setdefault(imp.source, set()).add(imp.target)
        graph.setdefault(imp.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
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
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(_circle(graph, component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def _circle(graph: Mapping[str, set[str]], component: set[str]) -> list[str]:
    """A shortest path from the component's first module back to itself (the circle to report)."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    return [*paths[v], start]
                if w not in paths:
                    paths[w] = [*paths[v], w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError("a strongly connected component without a circle")


def _show(module: str) -> str:
    return f"chorus_mq.{module}" if module else "chorus_mq"


# -- the package --------------------------------------------------------------------------------------------------


def test_every_module_has_a_layer():
    units = [u for names in LAYERS for u in names]
    assert len(units) == len(set(units)), "a unit is in two layers"
    missing = sorted(m for m in module_names() if unit_of(m) is None)
    assert not missing, f"modules in no layer of tests/test_layers.py's LAYERS (add them): {missing}"


def test_no_import_goes_up_or_sideways():
    violations = layer_violations(package_imports())
    assert not violations, "imports against the layers:\n" + "\n".join(violations)


def test_no_modules_import_each_other_in_a_circle():
    found = cycles(package_imports())
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(map(_show, c)) for c in found)


def test_contracts_draws_the_same_layers():
    """docs/CONTRACTS.md's picture names the table's units, one layer a line, in the table's order."""
    block = re.search(r"```\n(.*?)```", CONTRACTS.read_text(), re.S)
    assert block, "CONTRACTS.md draws the layers in its first code block"
    drawn = [re.findall(r"[a-z_./]+", line.split("(")[0]) for line in block.group(1).splitlines() if line.strip()]
    table = [[u.replace(".", "/") for u in names if u] for names in LAYERS]
    assert [[u.rstrip("/") for u in line] for line in drawn] == table


# -- the checker itself ----------------------------------------------------------------------------------------------

_TOY = (("errors", "names"), ("state", "store"), ("cli",))


def test_the_checker_reads_lazy_relative_and_type_checking_imports():
    source = (
        "from typing import TYPE_CHECKING\n"
        "import chorus_mq.names\n"
        "from ..store import base\n"
        "if TYPE_CHECKING:\n"
        "    from chorus_mq.cli import main\n"
        "def f():\n"
        "    from .. import errors\n"
        "    from . import other\n"
    )
    known = {"", "names", "errors", "store", "store.base", "cli", "state", "state.rounds", "state.other"}
    found = imports_of(source, "state.rounds", is_package=False, file="state/rounds.py", known=known)
    assert [(i.target, i.line) for i in found] == [
        ("names", 2),
        ("store.base", 3),
        ("cli", 5),
        ("errors", 7),
        ("state.other", 8),
    ]


def test_the_checker_catches_a_planted_upward_import():
    imports = [
        Import("state.rounds", "errors", "state/rounds.py", 3),  # down: fine
        Import("state.rounds", "state.keys", "state/rounds.py", 4),  # inside the unit: fine
        Import("names", "cli.main", "names.py", 12),  # planted: up two layers
        Import("store.s3", "state.rounds", "store/s3.py", 7),  # planted: sideways between peers
    ]
    assert layer_violations(imports, _TOY) == [
        "names.py:12: chorus_mq.names imports chorus_mq.cli.main: up from layer 0 (names) to layer 2 (cli)",
        "store/s3.py:7: chorus_mq.store.s3 imports chorus_mq.state.rounds: sideways between peers 'store' and "
        "'state' of layer 1",
    ]
    assert unit_of("nowhere", _TOY) is None


def test_the_checker_catches_a_planted_cycle():
    imports = [
        Import("a", "b", "a.py", 1),
        Import("b", "c", "b.py", 1),
        Import("c", "a", "c.py", 9),  # planted: closes a -> b -> c -> a
        Import("c", "d", "c.py", 2),
        Import("d", "e", "d.py", 1),
    ]
    assert cycles(imports) == [["a", "b", "c", "a"]]
    assert cycles(imports[:2] + imports[3:]) == []
