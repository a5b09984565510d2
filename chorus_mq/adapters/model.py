"""What a federation knows about its model, fixed at creation: the modules a delta may train, their
shapes, the task head every delta carries, and the weight layout.

Built from a local model directory (config.json and safetensors headers: no weight is loaded)
or from a reference PEFT adapter when the base model is not at hand.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ..errors import ConfigError, InvalidAdapter
from ..names import PEFT_TASK_TYPES, TaskType
from .delta import DeltaFile, delta_structure, infer_spec, open_adapter_header
from .fileformat import DTYPES, MAX_DIM, MAX_NDIM
from .header import Header, read_header, strict_json
from .spec import MAX_NAME_LEN, PEFT_PREFIX, LoraSpec, default_targets

#: model types whose linear layers are transformers' ``Conv1D``, which stores its weight (d_in, d_out)
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer"})
#: the headers of a base model's checkpoint are the operator's, not a client's: a looser bound
MODEL_MAX_HEADER_BYTES = 64 * 1024**2
_INDEX_FILE = "model.safetensors.index.json"
_SINGLE_FILE = "model.safetensors"
_WEIGHT = ".weight"
_FIELDS = {"modules", "extras", "fan_in_fan_out", "target_modules", "task_type"}


def _bad(msg: str) -> ConfigError:
    return ConfigError(f"model declaration: {msg}")


def _name(name: Any, what: str) -> str:
    if not isinstance(name, str) or not name.startswith(PEFT_PREFIX) or len(name) > MAX_NAME_LEN:
        raise _bad(f"{what} {name!r} must be a name starting with {PEFT_PREFIX!r}, at most {MAX_NAME_LEN} characters")
    return name


def _dims(value: Any, what: str, *, ndim: int | None, positive: bool) -> tuple[int, ...]:
    low = 1 if positive else 0
    ok = isinstance(value, (list, tuple)) and all(type(d) is int and low <= d <= MAX_DIM for d in value)
    if not ok or (ndim is not None and len(value) != ndim) or len(value) > MAX_NDIM:
        need = f"{ndim} integers" if ndim else f"at most {MAX_NDIM} integers"
        raise _bad(f"{what} has shape {value!r}; expected {need} in [{low}, {MAX_DIM}]")
    return tuple(value)


def _task_type(value: Any) -> str | None:
    """PEFT's task type string: ours (``seq-cls``) are translated, PEFT's (``SEQ_CLS``) kept."""
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise _bad(f"task_type must be a string or null, got {value!r}")
    return PEFT_TASK_TYPES[TaskType(value)] if value in TaskType.values() else value


@dataclass(frozen=True)
class ModelDecl:
    """A federation's model: PEFT module name -> (d_out, d_in) in ``B @ A`` layout, and the extras
    (modules_to_save tensors, by normalised key -> shape) every delta must carry."""

    modules: Mapping[str, tuple[int, int]]
    extras: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    fan_in_fan_out: bool = False
    #: informational; the module set is what is enforced
    target_modules: tuple[str, ...] = ()
    #: PEFT's task type (``SEQ_CLS``, ``CAUSAL_LM``); ours (``seq-cls``) are translated on construction
    task_type: str | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise once, at construction
        if not isinstance(self.modules, Mapping) or not self.modules:
            raise _bad("at least one module must be declared")
        modules = {
            _name(k, "module"): _dims(v, f"module {k!r}", ndim=2, positive=True) for k, v in self.modules.items()
        }
        if not isinstance(self.extras, Mapping):
            raise _bad(f"extras must map names to shapes, got {type(self.extras).__name__}")
        extras = {
            _name(k, "extra"): _dims(v, f"extra {k!r}", ndim=None, positive=False) for k, v in self.extras.items()
        }
        for key in extras:
            if key.endswith((".lora_A.weight", ".lora_B.weight")) or key in modules:
                raise _bad(f"extra {key!r} is a LoRA key or a module name; extras are modules_to_save tensors")
        if not isinstance(self.fan_in_fan_out, bool):
            raise _bad(f"fan_in_fan_out must be true or false, got {self.fan_in_fan_out!r}")
        targets = self.target_modules
        if isinstance(targets, str) or not all(isinstance(t, str) and t for t in targets):
            raise _bad(f"target_modules must be a list of module names, got {targets!r}")
        set_(self, "modules", MappingProxyType(dict(sorted(modules.items()))))
        set_(self, "extras", MappingProxyType(dict(sorted(extras.items()))))
        set_(self, "target_modules", tuple(sorted(set(targets))))
        set_(self, "task_type", _task_type(self.task_type))

    def __hash__(self) -> int:  # the mappings would make the generated hash raise
        return hash((tuple(self.modules.items()), tuple(self.extras.items()), self.fan_in_fan_out,
                     self.target_modules, self.task_type))  # fmt: skip

    @property
    def max_tensors(self) -> int:
        """The most tensors a delta for this model can need: A and B per module, and every extra."""
        return 2 * len(self.modules) + len(self.extras)

    def resolve(self, module: str) -> str | None:
        """The declared module a delta's ``module`` is: itself, or the name with one leading path
        component less (``bert.encoder...`` of a task model for the base's ``encoder...``); None if neither."""
        if module in self.modules:
            return module
        rest = module.removeprefix(PEFT_PREFIX)
        if rest != module and "." in rest:
            shorter = PEFT_PREFIX + rest.split(".", 1)[1]
            if shorter in self.modules:
                return shorter
        return None

    def to_json(self) -> bytes:
        """Deterministic JSON (sorted keys, no spaces)."""
        doc = {
            "modules": {k: list(v) for k, v in self.modules.items()},
            "extras": {k: list(v) for k, v in self.extras.items()},
            "fan_in_fan_out": self.fan_in_fan_out,
            "target_modules": list(self.target_modules),
            "task_type": self.task_type,
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes | str) -> ModelDecl:
        """Parse :meth:`to_json` output strictly (exactly its fields, checked types); ConfigError otherwise."""
        try:
            doc = strict_json(raw, "model declaration")
        except InvalidAdapter as exc:
            raise ConfigError(str(exc)) from None
        if not isinstance(doc, dict) or set(doc) != _FIELDS:
            got = sorted(doc) if isinstance(doc, dict) else type(doc).__name__
            raise _bad(f"expected exactly the fields {sorted(_FIELDS)}, got {got}")
        if not isinstance(doc["target_modules"], list):
            raise _bad(f"target_modules must be a list, got {doc['target_modules']!r}")
        return cls(
            modules=doc["modules"],
            extras=doc["extras"],
            fan_in_fan_out=doc["fan_in_fan_out"],
            target_modules=tuple(doc["target_modules"]),
            task_type=doc["task_type"],
        )


def _checkpoint_files(directory: Path) -> list[tuple[Path, list[str]]]:
    """The safetensors files of a model directory, each with the tensors its index says it holds."""
    index = directory / _INDEX_FILE
    if index.is_file():
        parsed = strict_json(index.read_bytes(), _INDEX_FILE)
        weight_map = parsed.get("weight_map") if isinstance(parsed, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise InvalidAdapter(f"{index}: weight_map must map tensor names to file names")
        files: dict[str, list[str]] = {}
        for tensor, file in weight_map.items():
            files.setdefault(file, []).append(tensor)
        out = []
        for file, tensors in sorted(files.items()):
            # names from the index must stay inside the directory
            if Path(file).name != file or file in (".", "..") or not file.endswith(".safetensors"):
                raise InvalidAdapter(f"{index}: {file!r} is not a safetensors file name in the model directory")
            if not (directory / file).is_file():
                raise InvalidAdapter(f"{index} names {file!r}, which is not in {directory}")
            out.append((directory / file, tensors))
        return out
    if (directory / _SINGLE_FILE).is_file():
        return [(directory / _SINGLE_FILE, [])]
    pickled = sorted(p.name for p in directory.glob("*.bin"))
    if pickled:
        raise InvalidAdapter(
            f"{directory} holds {', '.join(pickled)} (pickle) and no safetensors; only safetensors is read. "
            "Re-save the model with save_pretrained(dir, safe_serialization=True)"
        )
    raise ConfigError(f"{directory} has neither {_SINGLE_FILE} nor {_INDEX_FILE}: not a transformers model directory")


def _weights(header: Header) -> Iterable[tuple[str, tuple[int, int]]]:
    for name, info in header.tensors.items():
        if name.endswith(_WEIGHT) and info.dtype in DTYPES and len(info.shape) == 2 and 0 not in info.shape:
            yield name[: -len(_WEIGHT)], (info.shape[0], info.shape[1])


def model_decl_from_dir(
    path: str | os.PathLike[str],
    *,
    task_type: str | None = None,
    target_modules: Sequence[str] = (),
    extras: Mapping[str, tuple[int, ...]] | None = None,
    max_header_bytes: int = MODEL_MAX_HEADER_BYTES,
) -> ModelDecl:
    """Declare the model in a local transformers directory from config.json and safetensors headers only.

    Every 2-D floating ``X.weight`` becomes module ``base_model.model.X`` with (d_out, d_in);
    models of the GPT-2 family (``Conv1D``, weights stored (d_in, d_out)) are transposed and
    declared ``fan_in_fan_out``. ``target_modules`` narrows the set by peft's rule (a name
    matches itself or any dotted suffix). ``extras`` declares the task head (modules_to_save
    tensors) every delta must carry; a base checkpoint has none of its own.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise ConfigError(f"{directory} is not a directory; pass a local transformers model directory")
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"{directory} has no config.json: not a transformers model directory")
    config = strict_json(config_file.read_bytes(), "config.json")
    if not isinstance(config, dict):
        raise InvalidAdapter(f"{config_file} must hold a JSON object")
    conv1d = config.get("model_type") in CONV1D_MODEL_TYPES
    if isinstance(target_modules, str):
        raise ConfigError(f"target_modules must be a list of module names, got the string {target_modules!r}")
    wanted = LoraSpec(r=1, lora_alpha=1, target_modules=tuple(target_modules)) if target_modules else None
    modules: dict[str, tuple[int, int]] = {}
    for file, listed in _checkpoint_files(directory):
        header = read_header(file, max_header_bytes=max_header_bytes, any_dtype=True)
        missing = [t for t in listed if t not in header.tensors]
        if missing:
            raise InvalidAdapter(f"{_INDEX_FILE} puts {missing[0]!r} in {file.name}, whose header lacks it")
        for path_, (rows, cols) in _weights(header):
            module = PEFT_PREFIX + path_
            if module in modules:
                raise InvalidAdapter(f"weight {path_ + _WEIGHT!r} is in more than one file of {directory}")
            if wanted is None or wanted.targets(module):
                modules[module] = (cols, rows) if conv1d else (rows, cols)
    if not modules:
        which = f"matching target_modules {list(target_modules)}" if target_modules else "at all"
        raise ConfigError(f"{directory} has no 2-D floating weight {which}; nothing could be trained with LoRA")
    return ModelDecl(
        modules=modules,
        extras=dict(extras or {}),
        fan_in_fan_out=conv1d,
        target_modules=tuple(target_modules),
        task_type=task_type,
    )


def model_decl_from_adapter(
    path: str | os.PathLike[str], *, max_header_bytes: int = MODEL_MAX_HEADER_BYTES
) -> ModelDecl:
    """Declare the model a PEFT adapter (directory, delta or bare ``.safetensors``) was trained for.

    Modules and shapes come from its factors, target modules, task type and layout from its
    config, extras from its modules_to_save tensors. Headers only: no tensor is read.
    """
    file, header, found = open_adapter_header(Path(path), max_header_bytes)
    spec = found if found is not None else infer_spec(delta_structure(header, None).shapes, None, False, False)
    delta = DeltaFile(file, header, spec)
    delta.check_spec()
    shapes = delta.structure.shapes
    targets = spec.target_modules if isinstance(spec.target_modules, tuple) else default_targets(shapes)
    return ModelDecl(
        modules={m: (s.d_out, s.d_in) for m, s in shapes.items()},
        extras={key: header.tensors[raw].shape for key, raw in delta.structure.extras.items()},
        fan_in_fan_out=spec.fan_in_fan_out,
        target_modules=targets,
        task_type=spec.task_type,
    )
