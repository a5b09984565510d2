"""LoraSpec: the part of a PEFT ``adapter_config.json`` that decides what a delta means.

Pattern semantics follow peft 0.21 exactly: ``rank_pattern``/``alpha_pattern`` keys are
regexes matched with ``re.match(rf"(.*\\.)?({key})$", path)`` against the module path as
the base model names it (no ``base_model.model.`` prefix); the first matching key in
dict order wins, and a key is valid when that wrapped form compiles. Each key is compiled
once, when the spec is built. ``target_modules`` as a string is ``re.fullmatch``-ed; as a list, an
entry matches the path itself or any dotted suffix of it.

Patterns come from untrusted clients and Python's ``re`` has no timeout, so patterns
with a repeated group (``(a+)+``: exponential backtracking) or more than one (pattern
keys) or two (a ``target_modules`` regex) unbounded quantifiers are refused.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..errors import InvalidAdapter

PEFT_PREFIX = "base_model.model."
MAX_NAME_LEN = 400
_MAX_PATTERN_LEN = 1024
_MAX_INT = 2**31 - 1
_REPEATED_GROUP = re.compile(r"\)[*+{]")
_UNBOUNDED = re.compile(r"[*+]|\{\d*,\d*\}")
# peft writes many knobs we do not interpret; these would change what the keys mean
_UNSUPPORTED = {
    "use_dora": "DoRA magnitude vectors do not aggregate linearly",
    "lora_bias": "trained LoRA biases are not LoRA factors",
}


def module_path(module: str) -> str:
    """The module path inside the base model: ``module`` without PEFT's ``base_model.model.``."""
    return module.removeprefix(PEFT_PREFIX)


def _bad(msg: str) -> InvalidAdapter:
    return InvalidAdapter(f"adapter_config: {msg}")


def _check_regex(pattern: Any, what: str, max_repeats: int, *, peft_key: bool = False) -> re.Pattern[str]:
    """The compiled pattern (a pattern key: as peft wraps it, ``(.*\\.)?(key)$``), if it is simple enough."""
    if not isinstance(pattern, str) or not pattern or len(pattern) > _MAX_PATTERN_LEN:
        raise _bad(f"{what} {pattern!r} must be a non-empty string of at most {_MAX_PATTERN_LEN} characters")
    # bounds backtracking to about quadratic in the name length (peft wraps patterns in "(.*\.)?")
    if _REPEATED_GROUP.search(pattern) or len(_UNBOUNDED.findall(pattern)) > max_repeats:
        raise _bad(
            f"{what} {pattern!r} is too complex: repeated groups and more than {max_repeats} "
            "'*'/'+'/'{m,n}' are refused; list the module names instead"
        )
    try:
        # one compile per key: the wrapped form is what every lookup matches (re's cache holds 512
        # patterns, so thousands of keys would otherwise be recompiled on every lookup)
        return re.compile(rf"(.*\.)?({pattern})$" if peft_key else pattern)
    except re.error as exc:
        raise _bad(f"{what} {pattern!r} is not a valid regex: {exc}") from None


def _positive(value: Any, what: str, *, integer: bool) -> Any:
    # bounded ints: a 400-digit "integer" alpha would overflow float() later
    if type(value) is int:
        ok = 0 < value <= _MAX_INT
    else:
        ok = not integer and type(value) is float and math.isfinite(value) and value > 0
    if not ok:
        kind = "a positive integer" if integer else "a positive finite number"
        raise _bad(f"{what} must be {kind}, got {value!r}")
    return value


def _patterns(
    value: Any, what: str, *, integer: bool
) -> tuple[dict[str, Any], tuple[tuple[re.Pattern[str], Any], ...]]:
    """The checked pattern dict, and its keys compiled in order (first match wins) with their values."""
    if not isinstance(value, Mapping):
        raise _bad(f"{what} must be an object, got {type(value).__name__}")
    checked = {}
    matchers = []
    for key, v in value.items():
        compiled = _check_regex(key, f"{what} key", 1, peft_key=True)
        checked[key] = _positive(v, f"{what}[{key!r}]", integer=integer)
        matchers.append((compiled, checked[key]))
    return checked, tuple(matchers)


def _names(value: Any, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, (list, tuple, set, frozenset)) or not all(isinstance(v, str) and v for v in value):
        raise _bad(f"{what} must be a list of module names, got {value!r}")
    return tuple(sorted(set(value)))


def default_targets(modules: Iterable[str]) -> tuple[str, ...]:
    """target_modules for ``modules`` when no config says: each module's last path component."""
    return tuple(sorted({module_path(m).rsplit(".", 1)[-1] for m in modules}))


V = TypeVar("V", int, float)


def pattern_fit(values: Mapping[str, V]) -> tuple[V, dict[str, V]]:
    """Express per-module ``values`` peft's way: the most common one as the default, plus
    exact-path pattern keys for the modules that differ (ties pick the smaller value)."""
    counts = Counter(values.values())
    default = min(counts, key=lambda v: (-counts[v], v))
    return default, {re.escape(module_path(m)): v for m, v in sorted(values.items()) if v != default}


def _first_match(matchers: tuple[tuple[re.Pattern[str], V], ...], module: str, default: V) -> V:
    path = module_path(module)
    for pattern, value in matchers:
        if pattern.match(path):
            return value
    return default


@dataclass(frozen=True)
class LoraSpec:
    """A validated LoRA configuration; construct directly or with :meth:`from_peft_config`."""

    r: int
    lora_alpha: float
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    #: sorted names, or one regex string (peft's ``target_modules="..."`` form)
    target_modules: tuple[str, ...] | str = ()
    task_type: str | None = None
    base_model: str | None = None
    #: order matters (first match wins), so these stay dicts rather than sorted tuples
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    modules_to_save: tuple[str, ...] = ()
    # the pattern keys compiled once, in order (set on construction; not part of the value)
    _rank_matchers: tuple[tuple[re.Pattern[str], int], ...] = field(default=(), init=False, repr=False, compare=False)
    _alpha_matchers: tuple[tuple[re.Pattern[str], float], ...] = field(
        default=(), init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise in place once, at construction
        set_(self, "r", _positive(self.r, "r", integer=True))
        set_(self, "lora_alpha", _positive(self.lora_alpha, "lora_alpha", integer=False))
        for flag in ("use_rslora", "fan_in_fan_out"):
            if not isinstance(getattr(self, flag), bool):
                raise _bad(f"{flag} must be true or false, got {getattr(self, flag)!r}")
        targets = self.target_modules
        if isinstance(targets, str):
            _check_regex(targets, "target_modules", 2)
            set_(self, "target_modules", targets)
        else:
            set_(self, "target_modules", _names(targets, "target_modules"))
        for name in ("task_type", "base_model"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise _bad(f"{name} must be a string or null, got {getattr(self, name)!r}")
        rank_pattern, rank_matchers = _patterns(self.rank_pattern, "rank_pattern", integer=True)
        alpha_pattern, alpha_matchers = _patterns(self.alpha_pattern, "alpha_pattern", integer=False)
        set_(self, "rank_pattern", rank_pattern)
        set_(self, "alpha_pattern", alpha_pattern)
        set_(self, "_rank_matchers", rank_matchers)
        set_(self, "_alpha_matchers", alpha_matchers)
        set_(self, "modules_to_save", _names(self.modules_to_save, "modules_to_save"))

    def __hash__(self) -> int:  # the pattern dicts would make the generated hash raise
        values = (getattr(self, f.name) for f in dataclasses.fields(self) if f.compare)
        return hash(tuple(tuple(v.items()) if isinstance(v, Mapping) else v for v in values))

    @classmethod
    def from_peft_config(cls, d: Mapping[str, Any]) -> LoraSpec:
        """Build from a parsed ``adapter_config.json``; peft's defaults fill absent keys."""
        if not isinstance(d, Mapping):
            raise _bad(f"must be a JSON object, got {type(d).__name__}")
        if d.get("peft_type", "LORA") != "LORA":
            raise _bad(f"peft_type is {d['peft_type']!r}; only LoRA adapters are supported")
        for key, why in _UNSUPPORTED.items():
            if d.get(key):
                raise _bad(f"{key}=true is not supported ({why}); train a plain LoRA adapter")
        if d.get("bias", "none") != "none":
            raise _bad(f"bias={d['bias']!r} trains base-model biases, which are not LoRA factors; use bias='none'")
        saves: Any = d.get("modules_to_save")
        return cls(
            r=d.get("r", 8),
            lora_alpha=d.get("lora_alpha", 8),
            use_rslora=d.get("use_rslora", False),
            fan_in_fan_out=d.get("fan_in_fan_out", False),
            target_modules=d.get("target_modules") or (),
            task_type=d.get("task_type"),
            base_model=d.get("base_model_name_or_path"),
            rank_pattern=d.get("rank_pattern") or {},
            alpha_pattern=d.get("alpha_pattern") or {},
            modules_to_save=() if saves is None else saves,
        )

    def to_peft_config(self) -> dict[str, Any]:
        """A config dict that ``peft.LoraConfig``/``PeftModel.from_pretrained`` accept."""
        targets = self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)
        return {
            "peft_type": "LORA",
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "use_rslora": self.use_rslora,
            "fan_in_fan_out": self.fan_in_fan_out,
            "target_modules": targets,
            "task_type": self.task_type,
            "base_model_name_or_path": self.base_model,
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            "modules_to_save": list(self.modules_to_save) or None,
            "bias": "none",
            "lora_dropout": 0.0,
            "inference_mode": True,
        }

    def replace(self, **changes: Any) -> LoraSpec:
        return dataclasses.replace(self, **changes)

    def rank_for(self, module: str) -> int:
        """The rank peft gives ``module`` (``rank_pattern`` first match, else ``r``)."""
        return _first_match(self._rank_matchers, module, self.r)

    def alpha_for(self, module: str) -> float:
        """The lora_alpha peft gives ``module`` (``alpha_pattern`` first match, else ``lora_alpha``)."""
        return float(_first_match(self._alpha_matchers, module, self.lora_alpha))

    def scaling(self, module: str, r: int | None = None) -> float:
        """PEFT's scaling for ``module`` at rank ``r`` (default: :meth:`rank_for`): alpha/r or alpha/sqrt(r)."""
        r = self.rank_for(module) if r is None else r
        alpha = self.alpha_for(module)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def targets(self, module: str) -> bool:
        """Whether peft would put LoRA on ``module``; an empty target list means unknown, so yes."""
        path = module_path(module)
        if self.target_modules == "all-linear":  # peft expands it at load time; any module may match
            return True
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, path) is not None
        return not self.target_modules or any(path == t or path.endswith("." + t) for t in self.target_modules)

    def saves(self, path: str) -> bool:
        """Whether ``path`` (a module, or a parameter inside one) belongs to a ``modules_to_save`` module."""
        parts = module_path(path).split(".")
        # peft wraps every module whose name ends with an entry (plain suffix, no dot boundary)
        return any(".".join(parts[:i]).endswith(m) for m in self.modules_to_save for i in range(1, len(parts)))

    def incompatibilities(self, other: LoraSpec) -> list[str]:
        """Why deltas under ``self`` and ``other`` cannot be aggregated together (empty: they can).

        Ranks, alphas and rsLoRA may differ per client: each client's own scaling is applied
        before aggregation. The base model is compared by its last path component only,
        because clients save absolute local paths; a missing name on either side is unknown.
        """
        problems = []
        for name in ("task_type", "fan_in_fan_out", "target_modules", "modules_to_save"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                problems.append(f"{name} differs: {mine!r} vs {theirs!r}")
        mine, theirs = _base_name(self.base_model), _base_name(other.base_model)
        if mine and theirs and mine != theirs:
            problems.append(f"base model differs: {mine!r} vs {theirs!r}")
        return problems

    def compatible_with(self, other: LoraSpec) -> bool:
        return not self.incompatibilities(other)


def _base_name(path: str | None) -> str:
    return (path or "").replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]


def fit_spec(
    template: LoraSpec,
    ranks: Mapping[str, int],
    scalings: Mapping[str, float],
    targets: tuple[str, ...] | str | None = None,
) -> LoraSpec:
    """``template`` with per-module ranks and scalings expressed peft's way: the most common rank and alpha
    as defaults plus exact-path patterns (alpha = scaling · rank, rsLoRA off). ``targets`` default to the
    template's, or to the modules' last path components when it has none."""
    r, rank_pattern = pattern_fit(dict(ranks))
    alpha, alpha_pattern = pattern_fit({m: float(scalings[m]) * ranks[m] for m in ranks})
    chosen = targets if targets is not None else (template.target_modules or default_targets(ranks))
    return template.replace(
        r=r,
        lora_alpha=alpha,
        use_rslora=False,
        target_modules=chosen,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
    )
