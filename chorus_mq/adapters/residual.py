"""``residual.safetensors`` <-> :class:`chorus_mq.factors.Residual`, and folding residuals into a base model.

A residual is a weight-space matrix in peft's ``B @ A`` layout (d_out x d_in), already
scaled; the file holds per module either ``M.residual`` (dense) or ``M.residual_left``
(d_out x k) and ``M.residual_right`` (k x d_in). A module whose residual is zero is absent.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import torch

from ..errors import IncompatibleDelta, InvalidAdapter
from ..factors import Residual
from ..names import RESIDUAL_FORMAT
from .delta import check_finite, check_matrix, check_module_name, check_pair
from .fileformat import DTYPES
from .header import DEFAULT_MAX_HEADER_BYTES, Header, read_header
from .spec import module_path
from .writer import write_safetensors

_DENSE, _LEFT, _RIGHT = ".residual", ".residual_left", ".residual_right"
_SUFFIXES = (_LEFT, _RIGHT, _DENSE)  # longest first: suffix stripping


def checked_residual(module: str, value: object) -> Residual | None:
    """``value`` as a Residual to write for ``module`` (None: exactly zero); InvalidAdapter for anything else."""
    if value is None:
        return None
    if not isinstance(value, Residual):
        raise InvalidAdapter(
            f"residual for module {module!r} must be a chorus_mq.factors.Residual or None, got {type(value).__name__}"
        )
    check_module_name(module)
    if value.dense is not None:
        check_matrix(module, "residual", tuple(value.dense.shape), "(d_out, d_in)")
        return value
    if value.rank == 0:  # an empty product is exactly zero: nothing to store
        return None
    return value


def write_residual(path: str | os.PathLike[str], residuals: Mapping[str, Residual | None]) -> str:
    """Write ``residual.safetensors`` (fp32, ``M.residual`` or ``M.residual_left/right``); return sha256 hex."""
    tensors: dict[str, torch.Tensor] = {}
    for name, value in sorted(residuals.items()):
        res = checked_residual(name, value)
        if res is None:
            continue
        if res.dense is not None:
            tensors[name + _DENSE] = res.dense
        else:
            assert res.left is not None and res.right is not None  # a factored Residual has both
            tensors[name + _LEFT], tensors[name + _RIGHT] = res.left, res.right
    return write_safetensors(path, tensors, {"format": RESIDUAL_FORMAT})


def _plan(path: Path, header: Header) -> dict[str, dict[str, str]]:
    """module -> {suffix: key}, every name and shape checked from the header alone."""
    if header.metadata.get("format") != RESIDUAL_FORMAT:
        raise InvalidAdapter(f"{path.name} is not a residual file (metadata format must be {RESIDUAL_FORMAT!r})")
    grouped: dict[str, dict[str, str]] = {}
    for key in header.tensors:
        suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            raise InvalidAdapter(
                f"unexpected key {key!r} in residual file (expected M.residual or M.residual_left/right)"
            )
        grouped.setdefault(key[: -len(suffix)], {})[suffix] = key
    for module, keys in grouped.items():
        if set(keys) not in ({_DENSE}, {_LEFT, _RIGHT}):
            raise InvalidAdapter(
                f"module {module!r}: residual needs either .residual or both _left and _right, got {sorted(keys)}"
            )
        check_module_name(module)
        shape = {s: header.tensors[k].shape for s, k in keys.items()}
        if _DENSE in shape:
            check_matrix(module, "residual", shape[_DENSE], "(d_out, d_in)")
        else:
            check_pair(module, shape[_RIGHT], shape[_LEFT], ("residual_right", "residual_left"))
    return dict(sorted(grouped.items()))


class ResidualReader:
    """A residual file opened for reading by module: every name and shape is checked on opening,
    each module's values are read (and checked finite) only when asked for."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
        check_values: bool = True,
    ):
        #: check every value finite as it is read; a caller reading files it verified against a trusted
        #: hash (a round's result objects, its own folds) may skip that pass over the data
        self.check_values = check_values
        self.path = Path(path)
        self.header = read_header(self.path, max_header_bytes=max_header_bytes)
        self._plan = _plan(self.path, self.header)
        self._handle: Any = None

    @property
    def modules(self) -> list[str]:
        """The modules with a (non-zero) residual, in name order."""
        return list(self._plan)

    def _shapes(self, module: str) -> dict[str, tuple[int, ...]]:
        return {s: self.header.tensors[k].shape for s, k in self._plan[module].items()}

    def shape(self, module: str) -> tuple[int, int]:
        """``(d_out, d_in)`` of ``module``'s residual."""
        shapes = self._shapes(module)
        if _DENSE in shapes:
            return shapes[_DENSE][0], shapes[_DENSE][1]
        return shapes[_LEFT][0], shapes[_RIGHT][1]

    def form(self, module: str) -> tuple[Literal["dense", "factored"], int]:
        """``("dense", 0)`` or ``("factored", k)``: how ``module``'s residual is stored."""
        shapes = self._shapes(module)
        return ("dense", 0) if _DENSE in shapes else ("factored", shapes[_LEFT][1])

    def get(self, module: str) -> Residual:
        """``module``'s residual (float32), checked finite.

        Read with ``pread`` into fresh buffers, not through a memory map: a pass over a large file
        then keeps about one module resident, not every page it touched.
        """
        if self._handle is None:
            self._handle = os.open(self.path, os.O_RDONLY)
        loaded = {s: self._read(k) for s, k in self._plan[module].items()}
        if _DENSE in loaded:
            return Residual(dense=loaded[_DENSE])
        return Residual(left=loaded[_LEFT], right=loaded[_RIGHT])

    def _read(self, key: str) -> torch.Tensor:
        info = self.header.tensors[key]
        start = 8 + self.header.header_len + info.begin
        buffer = bytearray(info.end - info.begin)
        view = memoryview(buffer)
        done = 0
        while done < len(buffer):  # pread may return less than asked
            got = os.preadv(self._handle, [view[done:]], start + done)
            if got <= 0:
                raise InvalidAdapter(f"{self.path.name}: tensor {key!r} is cut short (file changed while read?)")
            done += got
        dtype = DTYPES[info.dtype][1]
        tensor = (
            torch.frombuffer(buffer, dtype=dtype).reshape(info.shape)
            if buffer
            else torch.empty(info.shape, dtype=dtype)
        )
        if self.check_values:
            check_finite(tensor, f"residual {key!r}")
        return tensor

    def close(self) -> None:
        if self._handle is not None:
            os.close(self._handle)
            self._handle = None

    def __enter__(self) -> ResidualReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def iter_residual(
    path: str | os.PathLike[str], *, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
) -> Iterator[tuple[str, Residual]]:
    """``(module, Residual)`` of a residual file, one module in memory at a time, in name order.

    Names and shapes are all checked before this returns; values are checked finite as they are read.
    """
    return _modules(ResidualReader(path, max_header_bytes=max_header_bytes))


def _modules(reader: ResidualReader) -> Iterator[tuple[str, Residual]]:
    with reader:
        for module in reader.modules:
            yield module, reader.get(module)


def read_residual(
    path: str | os.PathLike[str], *, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
) -> dict[str, Residual]:
    """Read and validate a residual file: module -> Residual (fp32, finite)."""
    return dict(iter_residual(path, max_header_bytes=max_header_bytes))


def fold_into_state_dict(
    state_dict: Mapping[str, torch.Tensor], residuals: Mapping[str, Residual | None], *, fan_in_fan_out: bool
) -> dict[str, torch.Tensor]:
    """Base state dict + residuals, as a new fp32 state dict (``<module path>.weight`` += residual).

    Each residual goes through :meth:`Residual.fold_into`, which adds the transpose for
    ``fan_in_fan_out`` (GPT-2 ``Conv1D`` stores its weight d_in x d_out). Floating tensors
    come back fp32 (untouched fp32 tensors are shared, not copied). Do not cast the result to
    bf16/fp16: a folded residual loses about 11% (bf16) / 1.4% (fp16) of itself to rounding.
    """
    out = {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}
    for name, value in sorted(residuals.items()):
        res = checked_residual(name, value)
        if res is None:
            continue
        key = f"{module_path(name)}.weight"
        if key not in out:
            raise IncompatibleDelta(
                f"residual for module {name!r} has no base weight {key!r} in the state dict "
                "(different base model?); refusing to drop it"
            )
        d_out, d_in = res.shape
        fits = (d_in, d_out) if fan_in_fan_out else (d_out, d_in)
        if tuple(out[key].shape) != fits:
            raise IncompatibleDelta(
                f"residual for {key!r} is {d_out}x{d_in} (d_out x d_in) but the weight is "
                f"{list(out[key].shape)} (fan_in_fan_out={fan_in_fan_out} right?)"
            )
        out[key] = res.fold_into(out[key], fan_in_fan_out=fan_in_fan_out)
    return out
