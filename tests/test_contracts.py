"""docs/CONTRACTS.md against the code: its Redis key table, its object layout and every public name it
documents (with the keyword parameters it shows), so a rename, a new key or a removed function that the
document does not follow fails here instead of misleading its readers."""

from __future__ import annotations

import builtins
import collections.abc
import dataclasses
import importlib
import importlib.util
import inspect
import pkgutil
import re
import typing
from pathlib import Path
from types import ModuleType

import pytest

import chorus_mq
from chorus_mq import layout
from chorus_mq.manifest import Manifest
from chorus_mq.messages import IngestMessage
from chorus_mq.pulled import LocalState
from chorus_mq.state.records import DeltaRecord
from chorus_mq.state.redis_keys import FEDERATIONS, FederationKeys
from chorus_mq.workers.plan import Plan
from chorus_mq.workers.shard import ShardResult

CONTRACTS = Path(__file__).resolve().parents[1] / "docs" / "CONTRACTS.md"
#: sample values the code's keys are built from, and the placeholders CONTRACTS writes for them
FED, CLIENT, NONCE, SHA, ROUND, SHARD = "FEDX", "CLIENTX", "NONCEX", "ab" * 32, 424242, 777
PHASE = "PHASEX"
#: names that are not keys: an ACL glob
NOT_KEYS = {"round_pattern", "secagg_to_pattern"}


def _sections() -> dict[str, str]:
    """``## title`` -> its text."""
    parts = re.split(r"^## (.+)$", CONTRACTS.read_text(), flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def _section(prefix: str) -> str:
    return next(text for title, text in _sections().items() if title.startswith(prefix))


# -- Redis keys --------------------------------------------------------------------------------------


def _documented_keys() -> set[str]:
    keys = set()
    for line in _section("state").splitlines():
        if not line.startswith("| `chorus:"):
            continue
        cell = line.split("|")[1]
        first, *more = re.findall(r"`([^`]+)`", cell)
        keys.add(first)
        keys.update(first.rsplit(":", 1)[0] + suffix for suffix in more)  # `a:b` / `:c` is a:b and a:c
    return keys


def _code_keys() -> set[str]:
    k = FederationKeys(FED)
    samples = {"client": CLIENT, "nonce": NONCE, "sha256": SHA, "r": ROUND, "phase": PHASE}
    keys = {FEDERATIONS}
    for name, member in vars(FederationKeys).items():
        if name.startswith("_") or name in NOT_KEYS:
            continue
        if isinstance(member, property):
            keys.add(getattr(k, name))
        elif inspect.isfunction(member):
            params = list(inspect.signature(member).parameters)[1:]
            keys.add(member(k, *(samples[p] for p in params)))
            if "None" in str(inspect.signature(member).parameters.get("client", "")):  # the federation-wide form
                keys.add(member(k, *(None if p == "client" else samples[p] for p in params)))
    return {
        key.replace(f"{{{FED}}}", "{F}")
        .replace(CLIENT, "{C}")
        .replace(NONCE, "{N}")
        .replace(SHA, "{sha}")
        .replace(str(ROUND), "{r}")
        .replace(PHASE, "{phase}")
        for key in keys
    }


def test_the_redis_key_table_lists_every_key_the_code_builds():
    documented, code = _documented_keys(), _code_keys()
    assert not code - documented, f"redis_keys.py builds keys CONTRACTS.md does not list: {sorted(code - documented)}"
    assert not documented - code, f"CONTRACTS.md lists keys redis_keys.py does not build: {sorted(documented - code)}"


def test_the_object_layout_lists_every_key_layout_builds():
    block = re.search(r"Objects \(`layout.py`.*?```\n(.*?)```", CONTRACTS.read_text(), re.S)
    assert block is not None
    documented = {
        re.sub(r"shard-<k:03d>-[a-z-]+-<sha16>", "shard-<k:03d>-<part>-<sha16>", line.split()[0])
        for line in block.group(1).splitlines()
        if line.startswith("<F>/")
    }
    samples = {"federation": FED, "client": CLIENT, "sha256": SHA, "round_": ROUND, "shard": SHARD, "part": "adapter"}
    code = set()
    for name, fn in vars(layout).items():
        if name.endswith("_key") and inspect.isfunction(fn):
            key = fn(*(samples[p] for p in inspect.signature(fn).parameters))
            code.add(
                key.replace(FED, "<F>")
                .replace(CLIENT, "<C>")
                .replace(SHA, "<sha>")
                .replace(SHA[:16], "<sha16>")
                .replace(f"{ROUND:06d}", "<r:06d>")
                .replace(f"shard-{SHARD:03d}-adapter-", "shard-<k:03d>-<part>-")
            )
    assert documented == code


# -- public names ----------------------------------------------------------------------------------

_CALL = re.compile(r"(?<![\w.])(\.?[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)\(")
_DOTTED = re.compile(r"(?<![\w.])([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)(?![\w(])")
_CAMEL = re.compile(r"(?<![\w.])([A-Z]\w*[a-z]\w*)(?![\w.(])")
_METHOD = re.compile(r"(?:^|\s)\.([A-Za-z_]\w*)")
_FILE = re.compile(r"\.(py|lua|json|safetensors|md|toml)\b")


def _modules_of(title: str) -> list[ModuleType]:
    """The modules a section documents: the paths in its title (a package: all its modules), or its words."""
    names = [p.removesuffix(".py").replace("/", ".").rstrip(".") for p in re.findall(r"`(chorus_mq/[\w/.]*)`", title)]
    if not names:
        names = [f"chorus_mq.{w}" for w in re.findall(r"[a-z_]+", title) if importlib.util.find_spec(f"chorus_mq.{w}")]
    out = []
    for name in names:
        module = importlib.import_module(name)
        out.append(module)
        if hasattr(module, "__path__"):
            out += [importlib.import_module(m.name) for m in pkgutil.walk_packages(module.__path__, f"{name}.")]
    return out


def _attr(obj: object, name: str) -> object:
    if isinstance(obj, type):
        if dataclasses.is_dataclass(obj) and name in {f.name for f in dataclasses.fields(obj)}:
            return dataclasses.MISSING  # a field without a class-level default
        if name in getattr(obj, "model_fields", {}):  # pydantic
            return dataclasses.MISSING
    return getattr(obj, name)


def _path(root: object, dotted: str) -> object:
    for part in dotted.split("."):
        if isinstance(root, ModuleType) and hasattr(root, "__path__") and not hasattr(root, part):
            submodule = f"{root.__name__}.{part}"
            if importlib.util.find_spec(submodule) is not None:
                importlib.import_module(submodule)  # a submodule not imported yet
        root = _attr(root, part)
    return root


class _Resolver:
    def __init__(self, modules: list[ModuleType]):
        self.modules = [*modules, importlib.import_module("chorus_mq.names"), importlib.import_module("chorus_mq")]
        own = tuple(m.__name__ for m in modules)
        self.classes = [
            c
            for m in modules
            for n, c in vars(m).items()
            if isinstance(c, type) and not n.startswith("_") and c.__module__.startswith(own)
        ]
        self.packages = [
            "chorus_mq",
            *(f"chorus_mq.{m.name}" for m in pkgutil.iter_modules(chorus_mq.__path__) if m.ispkg),
        ]

    def resolve(self, name: str, owner: object | None = None) -> object:
        """What ``name`` (``a.b``, ``.method``) names: on ``owner``, in the section's modules, a module of the
        package, or a public class of the section; AttributeError when nothing has it."""
        name = name.lstrip(".")
        head, _, rest = name.partition(".")
        roots: list[object] = [owner] if owner is not None else []
        roots += self.modules
        for parent in self.packages:
            if importlib.util.find_spec(f"{parent}.{head}") is not None:
                roots.append(importlib.import_module(f"{parent}.{head}"))
                break
        roots += self.classes
        for root in roots:
            try:
                if isinstance(root, ModuleType) and root.__name__.endswith(f".{head}") and rest:
                    return _path(root, rest)
                return _path(root, name)
            except AttributeError:
                continue
        raise AttributeError(name)


def _strip(line: str) -> str:
    """A code line without its comment and string literals."""
    return re.sub(r"\"[^\"]*\"|'[^']*'", '""', line.split("#", 1)[0])


def _args(line: str, start: int) -> str | None:
    """The text between the parenthesis at ``start`` and its match on the same line."""
    depth = 0
    for i in range(start, len(line)):
        depth += {"(": 1, "[": 1, "{": 1, ")": -1, "]": -1, "}": -1}.get(line[i], 0)
        if depth == 0:
            return line[start + 1 : i]
    return None


def _split(args: str) -> list[str]:
    pieces, depth, cur = [], 0, ""
    for ch in args:
        depth += {"(": 1, "[": 1, "{": 1, ")": -1, "]": -1, "}": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            pieces.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return [p for p in [*pieces, cur.strip()] if p]


def _check_call(where: str, obj: object, args: str, *, complete: bool = False) -> list[str]:
    """The documented parameters against ``obj``'s signature: no more of them than it takes (with
    ``complete``, exactly as many), and every one written with a name (``x=``, ``x:`` or after ``*``) is one of
    its parameters."""
    pieces = _split(args)
    if "..." in pieces or not callable(obj):
        return []
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return []
    params = [p for n, p in sig.parameters.items() if n not in ("self", "cls")]
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return []
    names = {p.name for p in params}
    errors, keyword = [], False
    for piece in pieces:
        if piece in ("*", "/"):
            keyword = keyword or piece == "*"
            continue
        m = re.match(r"\*{0,2}([A-Za-z_]\w*)\s*([:=]?)", piece)
        if m and (keyword or m.group(2)) and m.group(1) not in names:
            errors.append(f"{where}: {m.group(1)!r} is not a parameter of {obj!r} ({', '.join(names)})")
    positional = [p for p in pieces if p not in ("*", "/")]
    if not any(p.kind is p.VAR_POSITIONAL for p in params) and len(positional) > len(params):
        errors.append(f"{where}: {len(positional)} parameters documented, {obj!r} takes {len(params)}")
    elif complete and len(positional) < len(params):
        errors.append(f"{where}: {len(positional)} parameters documented, {obj!r} takes {len(params)}: {sig}")
    return errors


def _skip(name: str) -> bool:
    head = name.lstrip(".").split(".")[0]
    if len(head) == 1:
        return True  # a placeholder: F, C, r
    return any(hasattr(m, head) for m in (builtins, typing, collections.abc)) or head in ("torch", "NaN")


def _check_code(title: str, code: str, resolver: _Resolver) -> list[str]:
    errors: list[str] = []
    owner: object | None = None
    for raw in code.splitlines():
        line = _strip(raw)
        if not line.strip() or line.lstrip().startswith("@"):
            continue
        line = re.sub(r"^(\s*)(class|def) ", r"\1", line)
        line = re.sub(r"^\s*[\w/]+\.py:", " ", line)  # `store/policy.py: a ; b`: names of that module
        indented = raw[:1].isspace()
        head = None
        names = [(m.group(1), m.end() - 1) for m in _CALL.finditer(line)]
        names += [(m.group(1), None) for m in _DOTTED.finditer(line) if not _FILE.search(m.group(0))]
        names += [(m.group(1), None) for m in _CAMEL.finditer(line)]
        names += [(f".{m.group(1)}", None) for m in _METHOD.finditer(line)]
        # bare lowercase names listed alone between ';' or ',' (``fail ; reclaim``)
        for item in _split(line.replace(";", ",")):
            if re.fullmatch(r"\.?[a-z_]\w*", item):
                names.append((item, None))
        for name, paren in sorted(names, key=lambda n: line.find(n[0].lstrip("."))):
            if _skip(name):
                continue
            scope = owner if (indented or name.startswith(".")) else None
            if name.startswith(".") and not indented and head is not None:
                scope = head
            try:
                obj = resolver.resolve(name, scope)
            except AttributeError:
                errors.append(f"{title}: {name!r} ({raw.strip()!r}) is not in the code")
                continue
            first = head is None and not name.startswith(".")
            if first:
                head = obj
            if paren is not None:
                args = _args(line, paren)
                if args is not None:
                    # a class that heads a line is the layer's handle: its constructor is documented in full
                    complete = first and not indented and isinstance(obj, type)
                    errors += _check_call(f"{title}: {name}", obj, args, complete=complete)
        if not indented:
            owner = head if isinstance(head, type) else None
    return errors


def _check_prose(title: str, text: str, resolver: _Resolver) -> list[str]:
    errors = []
    for token in re.findall(r"`([^`\n]+)`", text):
        m = re.fullmatch(r"([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)(\(.*\))?", token)
        if not m or _FILE.search(token) or _skip(m.group(1)):
            continue
        name = m.group(1)
        if not (m.group(2) or "." in name or re.search(r"[A-Z]", name)):
            continue  # a plain lowercase word: a field, a code, a value
        try:
            obj = resolver.resolve(name)
        except AttributeError:
            errors.append(f"{title}: `{token}` is not in the code")
            continue
        if m.group(2):
            errors += _check_call(f"{title}: {name}", obj, m.group(2)[1:-1])
    return errors


def _documented_sections() -> list[str]:
    return [title for title in _sections() if _modules_of(title)]


@pytest.mark.parametrize("title", _documented_sections(), ids=lambda title: title.split(" ")[0].strip(","))
def test_every_name_a_section_documents_is_in_its_modules(title):
    text = _sections()[title]
    resolver = _Resolver(_modules_of(title))
    code = "\n".join(re.findall(r"```python\n(.*?)```", text, re.S))
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    errors = _check_code(title, code, resolver) + _check_prose(title, prose, resolver)
    assert not errors, "\n".join(errors)


def test_the_checker_catches_a_stale_name():
    """The check above can fail: a name, a keyword and a surplus parameter that the code lacks."""
    resolver = _Resolver(_modules_of("state `chorus_mq/state/`"))
    assert _check_code("t", "RoundState(redis, *, maxlen, lease_s)\n  current_round(F)", resolver) == []
    assert _check_code("t", "EventLog(redis, F, maxlen, scripts, extra)", resolver)
    assert _check_code("t", "RoundState(redis, *, maxlen, lease)", resolver)
    assert _check_code("t", "RoundState(redis)\n  no_such_method(F)", resolver)
    assert _check_prose("t", "`NoSuchThing`, `state.rounds.no_such`", resolver)


# -- stored formats --------------------------------------------------------------------------------

#: how CONTRACTS introduces a stored format's field list -> the type that writes it, and the fields the
#: introduction itself names (a format string, a version)
FORMATS = {
    "Delta record (JSON), written by ingest:": (DeltaRecord, set()),
    "Plan (JSON, set once by the first round task):": (Plan, set()),
    "Shard result:": (ShardResult, set()),
    "`Manifest` (`chorus-round/2`):": (Manifest, {"format"}),
    "`IngestMessage` (v2):": (IngestMessage, {"v"}),
    "`state.json` (`chorus-local/1`):": (LocalState, set()),
}


def _fields(cls: type) -> set[str]:
    if dataclasses.is_dataclass(cls):
        return {f.name for f in dataclasses.fields(cls)}
    return set(cls.model_fields)


def _named(span: str) -> set[str]:
    """The field names of a documented list: ``a, b (note), c {x, y}, d | e, f: T | None`` -> a b c d e f."""
    flat = span
    while True:
        shorter = re.sub(r"\([^()]*\)|\[[^\[\]]*\]|\{[^{}]*\}", "", flat)
        if shorter == flat:
            break
        flat = shorter
    names = set()
    for piece in flat.split(","):
        for alternative in piece.split(":")[0].split("|"):
            word = re.match(r"\s*([a-z_][a-z0-9_]*)\b", alternative)  # ``shards over items)``: shards
            if word and word.group(1) not in ("null", "none"):  # ``x | null``: a value, not a field
                names.add(word.group(1))
    return names


@pytest.mark.parametrize("intro", FORMATS)
def test_each_stored_format_lists_the_fields_its_type_writes(intro):
    text = re.sub(r"\s+", " ", CONTRACTS.read_text())
    m = re.search(re.escape(intro) + r" `([^`]+)`", text)
    assert m is not None, f"CONTRACTS.md no longer introduces a format with {intro!r}"
    cls, implicit = FORMATS[intro]
    assert _named(m.group(1)) == _fields(cls) - implicit
    for nested, args in re.findall(r"([A-Z]\w+)\(([^()]*)\)", m.group(1)):  # ClientEntry(...) inside
        assert _named(args) == _fields(getattr(importlib.import_module(cls.__module__), nested)), nested
