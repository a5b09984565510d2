"""A client's side of SCAFFOLD: the correction it trains with, and its own variate (docs/DESIGN.md section 1).

Each local step moves every trained tensor by ``-lr (c - c_i)`` after the optimizer's step (decoupled,
like the FedProx pull: with SGD it is Karimireddy et al.'s corrected gradient step; with AdamW the
variates are in the optimizer's update units, since option II measures them from the same steps).
``c`` is the server variate published with the round the client starts from (``variate.safetensors``
in its pulled directory; none: zero), ``c_i`` the client's own, kept in its work dir with the A
factors of the adapter it was measured against, and carried into each new start's basis by the
rotation the server uses. After the round, ``c_i + Δc_i = c_i - c + (x - y_i) / lr_sum``; the client
keeps it once the round completes with its update in it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chorus_mq.errors import ConfigError, InvalidAdapter
from chorus_mq.names import VARIATE_FILE

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

_FORMAT = "chorus-client-variate/1"
#: the suffix under which a client variate file keeps the start's A factors (its basis)
_BASIS = ".lora_A.basis"
_LORA_A = ".lora_A.weight"


def saved_key(name: str) -> str:
    """The adapter-file key of a PEFT parameter: ``...lora_A.default.weight`` -> ``...lora_A.weight``,
    ``...classifier.modules_to_save.default.weight`` -> ``...classifier.weight``."""
    for part in ("lora_A", "lora_B"):
        name = name.replace(f".{part}.default.", f".{part}.")
    return name.replace(".modules_to_save.default.", ".")


def trained_tensors(model: Any) -> dict[str, torch.Tensor]:
    """The model's trainable parameters by adapter-file key (what a client uploads and a variate holds)."""
    out = {saved_key(n): p for n, p in model.named_parameters() if p.requires_grad}
    if not out:
        raise ConfigError("the model has no trainable parameters (load the adapter with trainable=True)")
    return out


@dataclass(frozen=True)
class ScaffoldRound:
    """One round of a client's SCAFFOLD: its start ``x``, the server's ``c`` and its own ``c_i`` (x's basis)."""

    start: dict[str, torch.Tensor]
    server: dict[str, torch.Tensor]
    own: dict[str, torch.Tensor]
    #: the client variate's round (None: it had none yet)
    own_round: int | None = None

    @classmethod
    def begin(cls, model: Any, pulled_dir: Path | None, own_file: Path) -> ScaffoldRound:
        """Before training: read ``c`` from the pulled round and ``c_i`` from ``own_file`` (zeros when absent)."""
        import torch

        start = {k: p.detach().to(torch.float32).clone() for k, p in trained_tensors(model).items()}
        server = _server_variate(pulled_dir, start)
        own, own_round = _own_variate(own_file, start)
        return cls(start, server, own, own_round)

    def correction(self) -> dict[str, torch.Tensor]:
        """``c - c_i`` per trained tensor: each local step subtracts ``lr`` times it."""
        return {k: self.server[k] - self.own[k] for k in self.start}

    def finish(self, model: Any, lr_sum: float) -> dict[str, torch.Tensor]:
        """After training: the client's next variate ``c_i - c + (x - y) / lr_sum`` (float32, x's basis)."""
        from chorus_mq.aggregation.variates import client_variate

        trained = trained_tensors(model)
        return {
            k: client_variate(self.own[k], self.server[k], x, trained[k].detach(), lr_sum).float()
            for k, x in self.start.items()
        }

    def basis(self) -> dict[str, torch.Tensor]:
        """The start's A factors: the basis the variates of this round are expressed in."""
        return {k: v for k, v in self.start.items() if k.endswith(_LORA_A)}


def save_variate(path: Path, variate: Mapping[str, torch.Tensor], basis: Mapping[str, torch.Tensor], r: int) -> None:
    """Write a client variate (with the A factors of its basis) atomically."""
    from chorus_mq.adapters import write_safetensors

    tensors = {**variate, **{k.removesuffix(_LORA_A) + _BASIS: a for k, a in basis.items()}}
    tmp = path.with_name(f".{path.name}.tmp")
    write_safetensors(tmp, {k: t.contiguous() for k, t in tensors.items()}, {"format": _FORMAT, "round": str(r)})
    os.replace(tmp, path)


def keep_variate(pending: Path, own_file: Path) -> bool:
    """Make a completed round's variate the client's own (idempotent; never an older round's over a newer one)."""
    if not pending.is_file():
        return False
    if _round_of(own_file) is not None and _round_of(own_file) >= _round_of(pending):  # type: ignore[operator]
        return False
    tmp = own_file.with_name(f".{own_file.name}.tmp")
    tmp.write_bytes(pending.read_bytes())
    os.replace(tmp, own_file)
    return True


def _round_of(path: Path) -> int | None:
    from safetensors import safe_open

    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as handle:
        meta = handle.metadata() or {}
    return int(meta["round"]) if meta.get("format") == _FORMAT and "round" in meta else None


def _server_variate(pulled_dir: Path | None, start: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    import torch
    from safetensors.torch import load_file

    path = None if pulled_dir is None else pulled_dir / VARIATE_FILE
    if path is None or not path.is_file():
        return {k: torch.zeros_like(x) for k, x in start.items()}  # round 0: no variate yet
    tensors = load_file(str(path))
    out = {}
    for k, x in start.items():
        c = tensors.get(k)
        if c is None:
            out[k] = torch.zeros_like(x)
        elif c.shape != x.shape:
            raise InvalidAdapter(f"the server variate's {k!r} has shape {tuple(c.shape)}, the adapter {tuple(x.shape)}")
        else:
            out[k] = c.to(torch.float32)
    return out


def _own_variate(path: Path, start: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int | None]:
    """The client's variate carried into the start's basis; zeros when it has none (or one for other tensors)."""
    import torch
    from safetensors.torch import load_file

    from chorus_mq.aggregation.variates import gauge_rotation, transport

    zeros = {k: torch.zeros_like(x) for k, x in start.items()}
    r = _round_of(path)
    if r is None:
        return zeros, None
    stored = load_file(str(path))
    if any(k not in stored or stored[k].shape != x.shape for k, x in start.items()):
        log.warning("%s is the variate of another adapter (keys or shapes differ): starting from zero", path)
        return zeros, None
    out = {k: stored[k].to(torch.float32) for k in start}
    for key in start:
        if not key.endswith(_LORA_A):
            continue
        module = key.removesuffix(_LORA_A)
        basis = stored.get(module + _BASIS)
        b_key = f"{module}.lora_B.weight"
        if basis is None or b_key not in out:
            continue
        rotation = gauge_rotation(start[key], basis)
        a_part, b_part = transport(out[key], out[b_key], rotation)
        out[key], out[b_key] = a_part.float(), b_part.float()
    return out, r
