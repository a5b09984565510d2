"""Delta files: PEFT LoRA safetensors <-> per-module factors, validated as untrusted input.

Key naming is peft's saved form, ``base_model.model.<module path>.lora_A.weight`` /
``.lora_B.weight``; the *module name* is the key prefix before ``.lora_A.weight`` (so it
keeps ``base_model.model.``, as ``residual.safetensors`` does). The in-memory form with
``.default.`` is normalised away. Embedding LoRA (``lora_embedding_A/B``) is refused:
its factors are stored transposed relative to every other layer and peft also saves the
full base embedding next to it, so it is not a delta; train embeddings via
``modules_to_save`` instead, whose tensors travel as *extras*.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError, safe_open

from ..errors import ConfigError, InvalidAdapter
from ..names import DELTA_FORMAT
from .header import DEFAULT_MAX_HEADER_BYTES, Header, read_header, strict_json
from .spec import MAX_NAME_LEN, PEFT_PREFIX, LoraSpec, default_targets, pattern_fit
from .writer import write_safetensors

_LORA_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<which>[ABR])\.weight")
_IN_MEMORY = re.compile(r"\.(lora_[AB]|modules_to_save)\.default\.")
# key fragments of things peft can save that are not LoRA deltas, with the fix
_REFUSED = (
    (
        ".lora_embedding_",
        "embedding LoRA (lora_embedding_A/B) is not supported; drop the embedding from "
        "target_modules or list it in modules_to_save",
    ),
    (".lora_magnitude_vector", "DoRA magnitude vectors are not supported; train plain LoRA"),
    (
        ".base_layer.",
        "base-model weights are in the adapter (save_embedding_layers?); save with save_embedding_layers=False",
    ),
    (".original_module.", "this is a model state dict, not a saved adapter; use PeftModel.save_pretrained"),
    (".lora_A.bias", "LoRA biases (lora_bias=True) are not supported"),
    (".lora_B.bias", "LoRA biases (lora_bias=True) are not supported"),
)


class ModuleShape(NamedTuple):
    r: int
    d_out: int
    d_in: int


def normalise_key(key: str) -> str:
    """peft's saved key name for ``key`` (drops the in-memory ``.default.`` adapter name)."""
    return _IN_MEMORY.sub(lambda m: "." if m.group(1) == "modules_to_save" else f".{m.group(1)}.", key)


def classify_key(key: str, spec: LoraSpec | None) -> tuple[str, str] | None:
    """(module, "A"|"B"|"R") for a LoRA key (R: Fed-SB's r x r matrix), None for a modules_to_save extra;
    raise for anything else."""
    if len(key) > MAX_NAME_LEN:
        raise InvalidAdapter(f"key {key[:60]!r}... is {len(key)} characters, over the {MAX_NAME_LEN} limit")
    if not key.startswith(PEFT_PREFIX):
        raise InvalidAdapter(
            f"key {key!r} lacks the {PEFT_PREFIX!r} prefix: peft would silently ignore it and the adapter "
            "would do nothing. Save adapters with PeftModel.save_pretrained()"
        )
    for fragment, why in _REFUSED:
        if fragment in key:
            raise InvalidAdapter(f"key {key!r}: {why}")
    m = _LORA_KEY.fullmatch(key)
    if m:
        return m["module"], m["which"]
    if spec is not None and spec.saves(key):
        return None
    raise InvalidAdapter(
        f"unexpected key {key!r}: neither lora_A/lora_B.weight nor a parameter of a modules_to_save module"
    )


def check_matrix(module: str, name: str, shape: tuple[int, ...], layout: str) -> None:
    if len(shape) != 2 or 0 in shape:
        raise InvalidAdapter(
            f"module {module!r}: {name} has shape {list(shape)}; expected a non-empty 2-D {layout} matrix"
        )


def check_pair(
    module: str, a: tuple[int, ...], b: tuple[int, ...], names: tuple[str, str] = ("lora_A", "lora_B")
) -> ModuleShape:
    """Shapes of a factor pair ``b @ a``: a is (rank, d_in), b is (d_out, rank), all non-empty."""
    check_matrix(module, names[0], a, "(rank, d_in)")
    check_matrix(module, names[1], b, "(d_out, rank)")
    if a[0] != b[1]:
        raise InvalidAdapter(
            f"rank mismatch in module {module!r}: {names[0]} has {a[0]} rows but {names[1]} has {b[1]} columns"
        )
    return ModuleShape(r=a[0], d_out=b[0], d_in=a[1])


def check_against_spec(module: str, r: int, spec: LoraSpec) -> None:
    """Refuse a module whose rank or name disagrees with ``spec`` (peft would load it wrongly or not at all)."""
    expected = spec.rank_for(module)
    if r != expected:
        raise InvalidAdapter(f"rank {r} in file but adapter_config says {expected} for module {module!r}")
    if not spec.targets(module):
        targets = spec.target_modules
        shown = repr(targets)
        if not isinstance(targets, str) and len(targets) > 8:  # a hostile list stays out of the message
            shown = f"{targets[:8]!r} (first 8 of {len(targets)})"
        raise InvalidAdapter(f"module {module!r} is not matched by adapter_config target_modules {shown}")


def check_module_name(module: str) -> None:
    """Refuse a module name peft would not load (same rules as keys in a delta)."""
    classify_key(f"{module}.lora_A.weight", None)


def check_finite(t: torch.Tensor, label: str) -> None:
    """Refuse NaN/Inf in ``t`` (``label`` names it in the error)."""
    bad = ~torch.isfinite(t)
    if bad.any():
        nan = int(torch.isnan(t).sum())
        raise InvalidAdapter(f"{label} contains {nan} NaN and {int(bad.sum()) - nan} Inf values")


def read_finite(handle: Any, raw_key: str, label: str) -> torch.Tensor:
    """One tensor from an open safetensors file, refusing NaN/Inf (``label`` names it in errors)."""
    try:
        t: torch.Tensor = handle.get_tensor(raw_key)
    except SafetensorError as exc:
        raise InvalidAdapter(f"{label}: cannot read tensor: {exc}") from None
    check_finite(t, label)
    return t


def open_safetensors(path: Path) -> Any:
    try:
        return safe_open(str(path), framework="pt")
    except SafetensorError as exc:
        raise InvalidAdapter(f"{path.name}: safetensors refused the file: {exc}") from None


@dataclass(frozen=True)
class DeltaStructure:
    """What a delta's keys say, before any spec check: LoRA pairs, their shapes, and extras."""

    modules: Mapping[str, tuple[str, str]]  # module -> (raw key of A, raw key of B), sorted by module
    extras: Mapping[str, str]  # normalised key -> raw key
    shapes: Mapping[str, ModuleShape]
    #: Fed-SB modules: they carry ``lora_R`` (r x r) alone, named twice in :attr:`modules` (as A and as B)
    #: and shaped ``(r, r, r)`` in :attr:`shapes`; a file holds only these or none of them
    sandwich: frozenset[str] = frozenset()


def delta_structure(header: Header, spec: LoraSpec | None) -> DeltaStructure:
    """Classify every key, pair the factors and check their shapes (no pattern matching: that is
    :func:`check_against_spec`, run once the module set is known to be reasonable)."""
    pairs: dict[str, dict[str, str]] = {}
    extras: dict[str, str] = {}
    seen: dict[str, str] = {}
    for raw in sorted(header.tensors):
        key = normalise_key(raw)
        if key in seen:
            raise InvalidAdapter(f"tensors {seen[key]!r} and {raw!r} are the same key {key!r}")
        seen[key] = raw
        kind = classify_key(key, spec)
        if kind is None:
            extras[key] = raw
        else:
            pairs.setdefault(kind[0], {})[kind[1]] = raw
    if not pairs:
        raise InvalidAdapter("no LoRA tensors in file (expected keys ending in .lora_A.weight / .lora_B.weight)")
    modules: dict[str, tuple[str, str]] = {}
    shapes: dict[str, ModuleShape] = {}
    sandwich = frozenset(m for m, ab in pairs.items() if "R" in ab)
    if sandwich and len(sandwich) != len(pairs):
        raise InvalidAdapter(
            "the file mixes lora_R modules with lora_A/lora_B ones; a Fed-SB upload carries lora_R only"
        )
    for module, ab in sorted(pairs.items()):
        if module in sandwich:
            if len(ab) != 1:
                raise InvalidAdapter(
                    f"module {module!r} has lora_R and lora_{'A' if 'A' in ab else 'B'}: a Fed-SB upload carries "
                    "lora_R only (B and A are the federation's published frame and are not uploaded)"
                )
            shape = tuple(header.tensors[ab["R"]].shape)
            if len(shape) != 2 or shape[0] != shape[1] or shape[0] == 0:
                raise InvalidAdapter(f"module {module!r}: lora_R has shape {list(shape)}; it is square (rank x rank)")
            shapes[module] = ModuleShape(r=shape[0], d_out=shape[0], d_in=shape[0])
            modules[module] = (ab["R"], ab["R"])
            continue
        for have, lack in (("A", "B"), ("B", "A")):
            if lack not in ab:
                raise InvalidAdapter(f"module {module!r} has lora_{have} but no lora_{lack}")
        shapes[module] = check_pair(module, header.tensors[ab["A"]].shape, header.tensors[ab["B"]].shape)
        modules[module] = (ab["A"], ab["B"])
    return DeltaStructure(modules=modules, extras=extras, shapes=shapes, sandwich=sandwich)


def embedded_spec(header: Header) -> LoraSpec | None:
    """The spec a file carries in its ``__metadata__`` (``write_delta`` puts it there), if any."""
    raw = header.metadata.get("adapter_config")
    return None if raw is None else LoraSpec.from_peft_config(strict_json(raw, "__metadata__ adapter_config"))


class DeltaFile:
    """An opened, header-validated delta on local disk.

    Nothing past the header is read on opening, and nothing is interpreted before it is
    needed, so a caller can bound the work a file may cause first: the embedded
    adapter_config becomes a :class:`LoraSpec` when :attr:`spec` is first read, the keys are
    classified when :attr:`structure` is, ranks and target modules are checked against the
    spec before any module is handed out (:meth:`check_spec`), and tensors load one at a time.
    """

    def __init__(self, path: Path, header: Header, spec: LoraSpec | None = None):
        self.path, self.header = path, header
        #: the spec given in place of the embedded adapter_config, if any
        self.spec_override = spec
        self._handle: Any = None
        self._spec_checked = False

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        max_header_bytes: int,
        spec: LoraSpec | None = None,
        max_tensors: int | None = None,
    ) -> DeltaFile:
        """Validate the header; ``spec`` overrides the file's embedded adapter_config (read when first needed).

        ``max_tensors`` (``ModelDecl.max_tensors``) refuses a header listing more tensors before parsing it.
        """
        path = Path(path)
        return cls(path, read_header(path, max_header_bytes=max_header_bytes, max_tensors=max_tensors), spec)

    @functools.cached_property
    def raw_config(self) -> Any:
        """The embedded adapter_config as parsed (strict) JSON, not yet validated; None if there is none."""
        raw = self.header.metadata.get("adapter_config")
        return None if raw is None else strict_json(raw, "__metadata__ adapter_config")

    @functools.cached_property
    def spec(self) -> LoraSpec:
        """The given spec, else the validated embedded adapter_config."""
        if self.spec_override is not None:
            return self.spec_override
        if self.raw_config is None:
            raise InvalidAdapter(
                f"{self.path.name} has no adapter_config in its metadata; upload a delta written by write_delta()"
            )
        return LoraSpec.from_peft_config(self.raw_config)

    @functools.cached_property
    def structure(self) -> DeltaStructure:
        """Keys, pairs and shapes (checked); ranks against the spec are not checked yet."""
        return delta_structure(self.header, self.spec)

    def check_spec(self) -> None:
        """Refuse modules whose rank or name disagrees with the spec (done once, before any module is read)."""
        if not self._spec_checked:
            for module, shape in self.structure.shapes.items():
                check_against_spec(module, shape.r, self.spec)
            self._spec_checked = True

    @property
    def modules(self) -> list[str]:
        self.check_spec()
        return list(self.structure.modules)

    @property
    def extras(self) -> list[str]:
        self.check_spec()
        return sorted(self.structure.extras)

    @property
    def shapes(self) -> dict[str, ModuleShape]:
        self.check_spec()
        return dict(self.structure.shapes)

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data in the file."""
        return self.header.data_len

    @property
    def dtypes(self) -> list[str]:
        return sorted({info.dtype for info in self.header.tensors.values()})

    def _open(self) -> Any:
        self.check_spec()
        if self._handle is None:
            self._handle = open_safetensors(self.path)
        return self._handle

    def factors(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` of ``module`` in the file's dtype, checked finite. A: (r, d_in), B: (d_out, r)."""
        handle = self._open()
        key_a, key_b = self.structure.modules[module]
        if module in self.structure.sandwich:  # Fed-SB's lora_R stands as both
            r = read_finite(handle, key_a, f"module {module!r} lora_R")
            return r, r
        return (
            read_finite(handle, key_a, f"module {module!r} lora_A"),
            read_finite(handle, key_b, f"module {module!r} lora_B"),
        )

    def extra(self, key: str) -> torch.Tensor:
        """A modules_to_save tensor by its normalised key, checked finite."""
        handle = self._open()
        return read_finite(handle, self.structure.extras[key], f"extra {key!r}")

    def close(self) -> None:
        if self._handle is not None:
            self._handle.__exit__(None, None, None)
            self._handle = None

    def __enter__(self) -> DeltaFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class LocalAdapter:
    """An adapter in memory: its spec and tensors under normalised peft key names."""

    spec: LoraSpec
    tensors: dict[str, torch.Tensor] = field(repr=False)


@dataclass(frozen=True)
class DeltaSummary:
    modules: tuple[str, ...]
    ranks: dict[str, int]
    dtypes: tuple[str, ...]
    nbytes: int
    extras: tuple[str, ...]


def infer_spec(
    shapes: Mapping[str, ModuleShape], lora_alpha: float | None, use_rslora: bool, fan_in_fan_out: bool
) -> LoraSpec:
    """The spec of a bare file: ranks from the shapes, targets from the names, alpha given or scaling 1."""
    ranks = {m: s.r for m, s in shapes.items()}
    r, rank_pattern = pattern_fit(ranks)
    # no alpha given: choose each module's alpha so that its scaling is exactly 1.0
    alphas = {
        m: lora_alpha if lora_alpha is not None else (math.sqrt(rm) if use_rslora else rm) for m, rm in ranks.items()
    }
    alpha, alpha_pattern = pattern_fit(alphas)
    return LoraSpec(
        r=r,
        lora_alpha=alpha,
        use_rslora=use_rslora,
        fan_in_fan_out=fan_in_fan_out,
        target_modules=default_targets(shapes),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
    )


def adapter_dir_files(directory: Path) -> tuple[Path, LoraSpec]:
    """The weights file and the spec of a PEFT adapter directory (refusing pickled weights)."""
    config = directory / "adapter_config.json"
    if not config.is_file():
        raise InvalidAdapter(f"{directory} has no adapter_config.json: not a PEFT adapter directory")
    spec = LoraSpec.from_peft_config(strict_json(config.read_bytes(), "adapter_config.json"))
    weights = directory / "adapter_model.safetensors"
    if not weights.is_file():
        if (directory / "adapter_model.bin").exists():
            raise InvalidAdapter(
                f"{directory} holds adapter_model.bin, a pickle; only safetensors is accepted. "
                "Re-save with PeftModel.save_pretrained(dir, safe_serialization=True)"
            )
        raise InvalidAdapter(f"{directory} has no adapter_model.safetensors")
    return weights, spec


def open_adapter_header(
    path: Path, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
) -> tuple[Path, Header, LoraSpec | None]:
    """The weights file, header and own config (None for a bare file without one) of an adapter path."""
    if path.is_dir():
        file, spec = adapter_dir_files(path)
        return file, read_header(file, max_header_bytes=max_header_bytes), spec
    header = read_header(path, max_header_bytes=max_header_bytes)
    return path, header, embedded_spec(header)


def load_adapter(
    path: str | os.PathLike[str],
    *,
    lora_alpha: float | None = None,
    use_rslora: bool = False,
    fan_in_fan_out: bool = False,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
) -> LocalAdapter:
    """Read and fully validate a PEFT adapter directory or a bare ``.safetensors`` with peft key names.

    A directory (or a file carrying an embedded adapter_config) is described by its own
    config, and the keyword arguments must stay at their defaults. For a bare file, r
    (and rank_pattern) come from the shapes, target_modules from the keys' last path
    component, and ``lora_alpha`` defaults to each module's rank: scaling 1.0.
    """
    path = Path(path)
    file, header, spec = open_adapter_header(path, max_header_bytes)
    if spec is None:
        spec = infer_spec(delta_structure(header, None).shapes, lora_alpha, use_rslora, fan_in_fan_out)
    elif lora_alpha is not None or use_rslora or fan_in_fan_out:
        raise ConfigError(
            f"{path} has its own adapter_config; lora_alpha/use_rslora/fan_in_fan_out "
            "apply only to bare .safetensors files"
        )
    with DeltaFile(file, header, spec) as delta:
        tensors: dict[str, torch.Tensor] = {}
        for module in delta.modules:
            if module in delta.structure.sandwich:  # Fed-SB: lora_R alone (read as both factors)
                tensors[f"{module}.lora_R.weight"] = delta.factors(module)[0]
                continue
            tensors[f"{module}.lora_A.weight"], tensors[f"{module}.lora_B.weight"] = delta.factors(module)
        for key in delta.extras:
            tensors[key] = delta.extra(key)
    return LocalAdapter(spec=spec, tensors=tensors)


def write_delta(adapter: LocalAdapter, path: str | os.PathLike[str]) -> str:
    """Write the normalised upload object (deterministic bytes); return its sha256 hex."""
    metadata = {"format": DELTA_FORMAT, "adapter_config": json.dumps(adapter.spec.to_peft_config(), sort_keys=True)}
    return write_safetensors(path, adapter.tensors, metadata)


def validate_local(
    path: str | os.PathLike[str], *, spec: LoraSpec | None = None, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
) -> DeltaSummary:
    """Run every check a worker runs on a delta file (header, keys, ranks, all values finite)."""
    with DeltaFile.open(path, max_header_bytes=max_header_bytes, spec=spec) as delta:
        for module in delta.modules:
            delta.factors(module)
        for key in delta.extras:
            delta.extra(key)
        return DeltaSummary(
            modules=tuple(delta.modules),
            ranks={m: s.r for m, s in delta.shapes.items()},
            dtypes=tuple(delta.dtypes),
            nbytes=delta.nbytes,
            extras=tuple(delta.extras),
        )
