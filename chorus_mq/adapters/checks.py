"""Does a delta fit its federation's declared model? Checked from the header alone, before any tensor is read.

The checks bound the work a file can cause before that work is done: tensors beyond what the
declared model can need and pattern lists longer than one entry per declared module are refused
before any pattern is compiled, header bytes beyond what the tensors and the adapter_config
account for next; then every module and extra is held to the declaration; only then are ranks
matched against the (compiled) patterns, on declared module names only.
"""

from __future__ import annotations

import json

from ..errors import IncompatibleDelta, LimitExceeded
from .delta import DeltaFile
from .model import ModelDecl
from .spec import PEFT_PREFIX

#: header bytes allowed beyond what the tensors and the adapter_config need (format, small metadata)
HEADER_BASE_BYTES = 64 * 1024
#: header bytes one tensor entry may take: a 400-character key, its dtype, shape and offsets, with room
HEADER_BYTES_PER_TENSOR = 1024
#: pattern and target lists may always have this many entries, however few modules are declared
PATTERN_FLOOR = 64
_EXAMPLES = 3


def _examples(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:_EXAMPLES])
    return shown + (f" and {len(names) - _EXAMPLES} more" if len(names) > _EXAMPLES else "")


def header_bound(delta: DeltaFile) -> int:
    """The largest header a delta with these tensors and this adapter_config needs."""
    # the embedded config is JSON inside a JSON string: escaping at most doubles it
    config = json.dumps(delta.spec.to_peft_config(), sort_keys=True)
    return HEADER_BASE_BYTES + HEADER_BYTES_PER_TENSOR * len(delta.header.tensors) + 2 * len(config)


def _list_sizes(delta: DeltaFile) -> dict[str, int]:
    """Entries in the adapter_config's pattern and name lists, counted before any is compiled."""
    config = delta.raw_config if delta.spec_override is None else delta.spec.to_peft_config()
    sizes: dict[str, int] = {}
    if isinstance(config, dict):
        for what in ("rank_pattern", "alpha_pattern", "target_modules", "modules_to_save"):
            value = config.get(what)
            if isinstance(value, (dict, list)):  # a regex string (target_modules) is one pattern
                sizes[what] = len(value)
    return sizes


def _check_work(delta: DeltaFile, decl: ModelDecl, max_pattern_entries: int) -> None:
    n = len(delta.header.tensors)
    cap = decl.max_tensors
    if n > cap:
        raise LimitExceeded(
            f"the delta has {n} tensors; the federation's model needs at most {cap} "
            f"(2 per declared module x {len(decl.modules)} + {len(decl.extras)} declared extras). "
            "Train only the declared modules, and keep modules_to_save as the federation declares it"
        )
    # a delta needs at most one pattern or target name per declared module (pattern_fit writes one
    # per module that differs); the floor keeps generic target lists working for small models
    per_module = min(max_pattern_entries, max(len(decl.modules), PATTERN_FLOOR))
    limits = {"rank_pattern": per_module, "alpha_pattern": per_module, "target_modules": per_module,
              "modules_to_save": max_pattern_entries}  # fmt: skip
    for what, count in _list_sizes(delta).items():
        if count > limits[what]:
            raise LimitExceeded(
                f"adapter_config {what} has {count} entries, over the limit of {limits[what]} (at most one per "
                f"declared module, {len(decl.modules)} here, and at most CHORUS_MAX_PATTERN_ENTRIES="
                f"{max_pattern_entries}); list fewer, broader patterns"
            )
    bound = header_bound(delta)
    if delta.header.header_len > bound:
        raise LimitExceeded(
            f"the safetensors header is {delta.header.header_len} bytes; {n} tensors and this adapter_config "
            f"need at most {bound}. Write deltas with write_delta() (no extra metadata)"
        )


def _check_modules(delta: DeltaFile, decl: ModelDecl, max_rank: int | None) -> None:
    shapes = delta.structure.shapes
    unknown = [m for m in shapes if decl.resolve(m) is None]
    if unknown:
        raise IncompatibleDelta(
            f"{len(unknown)} module(s) are not in the federation's declared model ({len(decl.modules)} modules): "
            f"{_examples(unknown)}. Train only the declared target modules of the federation's base model"
        )
    claimed: dict[str, str] = {}
    prefixes: set[str] = set()
    for module, shape in shapes.items():
        target = decl.resolve(module)
        assert target is not None  # every unknown module was refused above
        if target in claimed:
            raise IncompatibleDelta(f"modules {claimed[target]!r} and {module!r} are both the declared {target!r}")
        claimed[target] = module
        # the one extra leading component resolve() allows, "" when the name is the declared one
        prefixes.add("" if target == module else module.removeprefix(PEFT_PREFIX).split(".", 1)[0])
        d_out, d_in = decl.modules[target]
        if module in delta.structure.sandwich:
            pass  # Fed-SB's lora_R is (rank, rank): its frame, not the upload, has the module's shape
        elif (shape.d_out, shape.d_in) != (d_out, d_in):
            hint = " (transposed: is fan_in_fan_out right?)" if (shape.d_in, shape.d_out) == (d_out, d_in) else ""
            raise IncompatibleDelta(
                f"module {module!r} is {shape.d_out}x{shape.d_in} (d_out x d_in) but the federation declares "
                f"{d_out}x{d_in}{hint}: an adapter for another base model?"
            )
        if shape.r > min(d_out, d_in):
            raise LimitExceeded(
                f"module {module!r} has rank {shape.r}, above min(d_out, d_in) = {min(d_out, d_in)}: "
                "a larger rank adds nothing but work"
            )
        if max_rank is not None and shape.r > max_rank:
            raise LimitExceeded(f"module {module!r} has rank {shape.r}, above the federation's limit of {max_rank}")
    if len(prefixes) > 1:
        shown = sorted(p or "(none)" for p in prefixes)
        raise IncompatibleDelta(f"module names mix leading path components {shown}: name every module the same way")


def _check_extras(delta: DeltaFile, decl: ModelDecl) -> None:
    extras = delta.structure.extras
    undeclared = [key for key in extras if key not in decl.extras]
    if undeclared:
        raise IncompatibleDelta(
            f"extra tensor(s) {_examples(undeclared)} are not declared by the federation "
            f"(declared: {_examples(list(decl.extras)) or 'none'}); drop them from modules_to_save"
        )
    missing = [key for key in decl.extras if key not in extras]
    if missing:
        raise IncompatibleDelta(
            f"the delta lacks the declared extra tensor(s) {_examples(missing)} (the task head every "
            "delta carries); keep modules_to_save as the federation declares it"
        )
    for key, raw in extras.items():
        shape = delta.header.tensors[raw].shape
        if shape != decl.extras[key]:
            raise IncompatibleDelta(
                f"extra {key!r} has shape {list(shape)} but the federation declares {list(decl.extras[key])}"
            )


def check_delta(delta: DeltaFile, decl: ModelDecl, *, max_pattern_entries: int, max_rank: int | None = None) -> None:
    """Refuse a delta that does not fit ``decl`` or would cost work out of proportion to it.

    Raises LimitExceeded (more tensors than ``decl.max_tensors``; more rank_pattern,
    alpha_pattern or target_modules entries than declared modules (at least
    ``PATTERN_FLOOR``) or than ``max_pattern_entries``; more modules_to_save entries than
    ``max_pattern_entries``; a header over :func:`header_bound`; a rank above
    ``min(d_out, d_in)`` or ``max_rank``), IncompatibleDelta (modules outside the
    declared set, other shapes, another layout or task type, undeclared or missing extras) or
    InvalidAdapter (keys, pairs and ranks against the delta's own adapter_config). Reads no
    tensor data; the pattern matching runs last, on declared module names only.
    """
    _check_work(delta, decl, max_pattern_entries)
    spec = delta.spec
    if spec.fan_in_fan_out != decl.fan_in_fan_out:
        raise IncompatibleDelta(
            f"the delta has fan_in_fan_out={spec.fan_in_fan_out} but the federation's model has "
            f"fan_in_fan_out={decl.fan_in_fan_out} (GPT-2 style Conv1D layers need true, others false)"
        )
    if spec.task_type and decl.task_type and spec.task_type != decl.task_type:
        raise IncompatibleDelta(f"the delta's task_type is {spec.task_type!r}; the federation's is {decl.task_type!r}")
    _check_modules(delta, decl, max_rank)
    _check_extras(delta, decl)
    delta.check_spec()
