"""A client's pulled directory: the round's adapter, its increment, and the folded base correction.

Clients move increments, not history: a directory that holds round r' of a federation is brought
to round r by downloading the residuals of rounds r'+1..r only and folding them into its fp32
correction; a new directory starts from the latest compacted snapshot <= r plus the increments
after it. Every object is checked against the hashes the round's manifest lists (the manifest
itself against the hash Redis recorded at commit). Files are streamed module by module and each
is written once.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ChecksumMismatch, ConfigError, NotFound
from .factors import Residual
from .manifest import FrameRef, Manifest, ObjectRef
from .names import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    CUMULATIVE_FILE,
    EXACT_ADAPTER_DIR,
    FED_SB_FILE,
    INCREMENTS_DIR,
    LOCAL_FORMAT,
    LOCAL_STATE_FILE,
    MANIFEST_FILE,
    RESIDUAL_ADAPTER_DIR,
    RESIDUAL_FILE,
    RESIDUAL_FORMAT,
    VARIATE_FILE,
    VARIATE_FORMAT,
    Factor,
)
from .progress import byte_bar
from .results import complete_rounds, fetch_manifest, merge_objects, sum_residual_files, write_empty_residual
from .strategy import strategy_spec

if TYPE_CHECKING:
    from .state import RoundState
    from .store import Store


@dataclass(frozen=True)
class LocalState:
    """``state.json``: which federation and round a pulled directory holds, and how its correction is kept.

    The correction is ``cumulative_residual.safetensors`` (every round <= ``folded``) plus one file per
    later round in ``increments/``. Increments are folded into the cumulative file once they outweigh it,
    so each round's residual is rewritten a bounded number of times: a pull's cost stays flat; and once
    the files would hold more than the dense size of their modules, so the disk they take stays within it
    (:func:`should_fold`).
    """

    federation: str
    round: int
    folded: int
    increments: tuple[int, ...]
    manifest_sha256: str
    #: linear strategies: factor -> the identity (``FrameRef.identity``) of the objects the held adapter's tensors
    #: of that factor came from, so a round that refers to those objects for a frozen factor is served from the
    #: held file; empty: none known
    frames: dict[str, str] = field(default_factory=dict)
    #: the sha256 of the published file as this pull wrote it: the held factors are used only while it holds
    #: those very bytes (an edited file is fetched again)
    published_sha256: str = ""

    @classmethod
    def load(cls, out: Path) -> LocalState | None:
        path = out / LOCAL_STATE_FILE
        if not path.is_file() or not (out / CUMULATIVE_FILE).is_file():
            return None
        try:
            d = json.loads(path.read_text())
            if d.get("format") != LOCAL_FORMAT:
                return None
            state = cls(
                federation=str(d["federation"]),
                round=int(d["round"]),
                folded=int(d["folded"]),
                increments=tuple(int(r) for r in d["increments"]),
                manifest_sha256=str(d["manifest_sha256"]),
                frames=_frames(d),
                published_sha256=str(d.get("published_sha256", "")),
            )
        except (ValueError, KeyError, TypeError):
            return None
        if not all(increment_path(out, r).is_file() for r in state.increments):
            return None  # a directory someone edited: start over rather than fold something wrong
        return state

    def save(self, out: Path) -> None:
        body = {
            "format": LOCAL_FORMAT,
            "federation": self.federation,
            "round": self.round,
            "folded": self.folded,
            "increments": list(self.increments),
            "manifest_sha256": self.manifest_sha256,
        }
        if self.frames:
            body["frames"] = dict(sorted(self.frames.items()))
            body["published_sha256"] = self.published_sha256
        _atomic_write(out / LOCAL_STATE_FILE, json.dumps(body, indent=2, sort_keys=True).encode())


def increment_path(out: Path, r: int) -> Path:
    return out / INCREMENTS_DIR / f"{r:06d}.safetensors"


def correction_files(out: Path) -> list[Path]:
    """The files whose sum is the base correction of a pulled directory (cumulative first)."""
    state = LocalState.load(out)
    parts = [out / CUMULATIVE_FILE]
    if state is not None:
        parts += [increment_path(out, r) for r in state.increments]
    return parts


def iter_correction(out: Path) -> Iterator[tuple[str, Residual]]:
    """``(module, Σ residuals)`` of a pulled directory's base correction, one module in memory at a time
    (exact: concatenated factors while smaller than dense, else a float64 dense sum)."""
    from .adapters import ResidualReader
    from .aggregation import sum_residuals

    readers = [ResidualReader(p, check_values=False) for p in correction_files(out)]  # verified by hash
    try:
        for module in sorted({m for r in readers for m in r.modules}):
            total = sum_residuals([r.get(module) for r in readers if module in r.modules])
            if total is not None:
                yield module, total
    finally:
        for r in readers:
            r.close()


def pull(
    state: RoundState,
    store: Store,
    federation: str,
    out: Path,
    round_: int | None,
    *,
    since: int | None = None,
    exact_adapter: bool = False,
    residual_adapter: bool = False,
    fold: bool = False,
    progress: bool = False,
) -> Manifest:
    """Bring ``out`` to round ``round_`` of ``federation`` from ``state`` and ``store`` (see
    :meth:`chorus_mq.sdk.participant.ParticipantSdk.pull`)."""
    target = round_ if round_ is not None else state.latest_complete(federation)
    if target is None:
        raise NotFound(f"federation {federation!r} has no complete round yet")
    manifest, manifest_sha = fetch_manifest(state, store, federation, target)
    out.mkdir(parents=True, exist_ok=True)
    held = LocalState.load(out)
    _check_since(out, held, federation, since, target)
    asked = (federation, target, manifest_sha)
    if not (exact_adapter or residual_adapter) and _holds_already(out, held, asked, manifest, fold=fold):
        return manifest  # this directory holds exactly this round already (a second pull downloads nothing)
    folded, increments, start = _correction_start(state, store, federation, target, out, held)
    fetch = _Fetch.plan(state, store, federation, out, held, manifest, (start, target), progress)
    for r in fetch.rounds:  # each increment the correction lacks, its own file
        if _merge_into(store, fetch.residuals[r], increment_path(out, r), RESIDUAL_FORMAT, fetch.bar):
            increments.append(r)
    published_sha = _write_round(store, out, fetch, manifest, target, increments)
    local = LocalState(federation, target, folded, tuple(increments), manifest_sha, fetch.frames, published_sha)
    _fold(out, local, fold=fold).save(out)
    if exact_adapter or residual_adapter:
        _extra_adapters(out, exact_adapter=exact_adapter, residual_adapter=residual_adapter)
    return manifest


def _check_since(out: Path, held: LocalState | None, federation: str, since: int | None, target: int) -> None:
    """``--since``: ``out`` must hold that round of ``federation``, and it must not be after ``target``."""
    if since is None:
        return
    if held is None or held.federation != federation or held.round != since:
        have = "nothing" if held is None else f"round {held.round} of {held.federation!r}"
        raise ConfigError(f"--since {since}: {out} holds {have}; pull without --since to start over")
    if since > target:
        raise ConfigError(f"--since {since} is after the round asked for ({target})")


def _holds_already(
    out: Path, held: LocalState | None, round_: tuple[str, int, str], manifest: Manifest, *, fold: bool
) -> bool:
    """Whether ``out`` holds exactly ``round_`` (federation, round, manifest sha256) with all its files, and
    a fold asked for has nothing to fold."""
    return (
        held is not None
        and (held.federation, held.round, held.manifest_sha256) == round_
        and all((out / name).is_file() for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG, RESIDUAL_FILE, MANIFEST_FILE))
        and (not _sandwich(manifest.strategy) or (out / FED_SB_FILE).is_file())
        and not (fold and held.increments)
    )


def _correction_start(
    state: RoundState, store: Store, federation: str, target: int, out: Path, held: LocalState | None
) -> tuple[int, list[int], int]:
    """Where ``out``'s correction starts: the round folded into its cumulative file, the increments after it, and
    the round they reach; the held ones, or for a new directory the latest snapshot <= ``target``."""
    (out / INCREMENTS_DIR).mkdir(exist_ok=True)
    if held is not None and held.federation == federation and held.round <= target:
        return held.folded, list(held.increments), held.round
    # a new directory (or another federation's): the latest snapshot <= target, written once into place
    shutil.rmtree(out / INCREMENTS_DIR, ignore_errors=True)
    (out / INCREMENTS_DIR).mkdir()
    snapshot = _latest_snapshot(state, federation, target)
    if snapshot is not None:
        store.download(snapshot.key, out / CUMULATIVE_FILE, expected_sha256=snapshot.sha256)
        folded = snapshot.round
    else:
        write_empty_residual(out / CUMULATIVE_FILE)
        folded = 0
    return folded, [], folded


@dataclass(frozen=True)
class _Fetch:
    """What a pull downloads beyond the held directory."""

    rounds: list[int]  # the complete rounds whose residuals the correction lacks, oldest first
    residuals: dict[int, list[ObjectRef]]
    #: the published adapter's file (Fed-SB: its frame and R, kept as they are; the PEFT adapter is built from them)
    published: Path
    frames: dict[str, str]  # linear strategies: ``LocalState.frames`` of the round
    #: the round refers to its frozen factors and ``published`` holds them from those very objects: fetch the
    #: trained factor and the head only
    held_frame: bool
    #: the factors no round since the held one trained (a linear strategy's frozen ones): served from the held file
    unchanged: tuple[Factor, ...]
    bar: Callable[[int], object] | None

    @classmethod
    def plan(
        cls,
        state: RoundState,
        store: Store,
        federation: str,
        out: Path,
        held: LocalState | None,
        manifest: Manifest,
        span: tuple[int, int],
        progress: bool,
    ) -> _Fetch:
        """The increments in ``span`` (after, up to the target) and the round's own objects; a progress bar over
        their bytes."""
        start, target = span
        rounds = complete_rounds(state, federation, start, target)
        manifests = {r: manifest if r == target else fetch_manifest(state, store, federation, r)[0] for r in rounds}
        residuals = {r: [s.residual for s in m.shards if s.residual is not None] for r, m in manifests.items()}
        published = out / (FED_SB_FILE if _sandwich(manifest.strategy) else ADAPTER_WEIGHTS)
        frames = _sources(manifest)
        held_frame = (
            manifest.frame is not None
            and held is not None
            and held.federation == federation
            and published.is_file()
            and all(held.frames.get(f) == manifest.frame.identity for f in manifest.frame.factors)
            and held.published_sha256 == _file_sha256(published)
        )
        fetch_frame = () if manifest.frame is None or held_frame else manifest.frame.shards
        total = sum(ref.size for refs in residuals.values() for ref in refs) + sum(
            s.adapter.size + (s.variate.size if s.variate is not None else 0) for s in (*manifest.shards, *fetch_frame)
        )
        unchanged = _unchanged_factors(manifest.strategy, held, federation, target, out)
        bar = byte_bar(progress, total, f"pull round {target}")
        return cls(rounds, residuals, published, frames, held_frame, unchanged, bar)


def _write_round(
    store: Store,
    out: Path,
    fetch: _Fetch,
    manifest: Manifest,
    target: int,
    increments: list[int],
) -> str:
    """The round's own files, each written once: its residual, its adapter (Fed-SB: and the published tensors),
    SCAFFOLD's variate, the adapter config and the manifest. The published file's sha256 where a linear
    strategy keeps it ("" otherwise)."""
    if target in increments:
        _link(increment_path(out, target), out / RESIDUAL_FILE)
    elif not _merge_into(
        store,
        [s.residual for s in manifest.shards if s.residual is not None],
        out / RESIDUAL_FILE,
        RESIDUAL_FORMAT,
        fetch.bar,
    ):
        write_empty_residual(out / RESIDUAL_FILE)
    published_sha = _write_published(store, manifest, fetch)
    if fetch.frames and not published_sha:
        published_sha = _file_sha256(fetch.published)
    if _sandwich(manifest.strategy):
        write_fed_sb_peft(fetch.published, out / ADAPTER_WEIGHTS)
    # SCAFFOLD: the round's server variate, next to the adapter it belongs to (none: no stale one either)
    variates = [s.variate for s in manifest.shards if s.variate is not None]
    if not _merge_into(store, variates, out / VARIATE_FILE, VARIATE_FORMAT, fetch.bar):
        (out / VARIATE_FILE).unlink(missing_ok=True)
    _atomic_write(out / ADAPTER_CONFIG, (json.dumps(manifest.adapter_config, indent=2, sort_keys=True) + "\n").encode())
    _atomic_write(out / MANIFEST_FILE, manifest.to_json())
    return published_sha


def _write_published(store: Store, manifest: Manifest, fetch: _Fetch) -> str:
    """The round's published adapter file; its sha256 where it refers to its frozen factors ("" otherwise)."""
    adapters = [s.adapter for s in manifest.shards]
    published, bar = fetch.published, fetch.bar
    if manifest.frame is not None:  # the round stored what it trained; its frozen factors lie in earlier objects
        try:
            return _framed_file(store, adapters, manifest.frame, published, bar, held_frame=fetch.held_frame)
        except ChecksumMismatch:
            if not fetch.held_frame:
                raise
            # the held file lacks a module of the frame: fetch the frame after all
            return _framed_file(store, adapters, manifest.frame, published, bar, held_frame=False)
    if not fetch.unchanged:
        _merge_into(store, adapters, published, "pt", bar)
        return ""
    try:  # a linear strategy's frozen factor has not changed since the held round: fetch the rest only
        with _HeldFactors(published, fetch.unchanged) as held_factors:
            _merge_into(store, adapters, published, "pt", bar, reuse=held_factors.get)
    except ChecksumMismatch:  # the held copy is not the published one after all: fetch everything
        _merge_into(store, adapters, published, "pt", bar)
    return ""


def _fold(out: Path, local: LocalState, *, fold: bool) -> LocalState:
    """``local`` after folding its increments into the cumulative file, where asked or due (:func:`should_fold`)."""
    increments = [increment_path(out, r) for r in local.increments]
    if not increments or not (fold or should_fold(out / CUMULATIVE_FILE, increments)):
        return local
    folded_path = out / f".{CUMULATIVE_FILE}.folding"
    sum_residual_files([out / CUMULATIVE_FILE, *increments], folded_path)
    os.replace(folded_path, out / CUMULATIVE_FILE)
    for path in increments:
        path.unlink()
    return dataclasses.replace(local, folded=max(local.folded, local.increments[-1]), increments=())


def should_fold(cumulative: Path, increments: list[Path]) -> bool:
    """Whether a pull folds its increments into the cumulative file: once they outweigh it (each round's
    residual is then rewritten a bounded number of times), or once the files hold more tensor bytes than
    their modules take as dense fp32 matrices. Folding stores each module in the smaller of its summed
    factors and its dense form, so between pulls the correction never takes more than that dense size."""
    pending = sum(p.stat().st_size for p in increments)
    if pending > cumulative.stat().st_size:
        return True
    parts = [cumulative, *increments]
    return sum(_tensor_bytes(p) for p in parts) > dense_bytes(parts)


def dense_bytes(parts: list[Path]) -> int:
    """The bytes of the residual files' modules as dense fp32 matrices (their union; headers only are read)."""
    from .adapters import ResidualReader

    shapes: dict[str, tuple[int, int]] = {}
    for path in parts:
        with ResidualReader(path, check_values=False) as reader:  # verified by hash when written
            shapes.update((m, reader.shape(m)) for m in reader.modules)
    return sum(4 * d_out * d_in for d_out, d_in in shapes.values())


def _tensor_bytes(path: Path) -> int:
    """A safetensors file's tensor data: its size less the 8-byte length and the header."""
    with path.open("rb") as f:
        return path.stat().st_size - 8 - int.from_bytes(f.read(8), "little")


def _merge_into(
    store: Store,
    refs: list[ObjectRef],
    path: Path,
    fmt: str,
    progress: Callable[[int], object] | None = None,
    *,
    reuse: Callable[[str, int], bytes | None] | None = None,
) -> bool:
    """Merge the objects into ``path`` (via a temp file beside it); False when there are none."""
    tmp = path.with_name(f".{path.name}.part")
    if not merge_objects(store, refs, tmp, {"format": fmt}, progress, reuse=reuse):
        return False
    os.replace(tmp, path)
    return True


def _unchanged_factors(
    strategy: str, held: LocalState | None, federation: str, target: int, out: Path
) -> tuple[Factor, ...]:
    """The factors no round after the held one up to ``target`` trained (a linear strategy's frozen ones),
    when ``out`` holds an earlier round of this federation; () otherwise."""
    try:
        spec = strategy_spec(strategy)
    except ValueError:
        return ()
    if not spec.frozen_shared or held is None or held.federation != federation or held.round >= target:
        return ()
    if not (out / (FED_SB_FILE if spec.sandwich else ADAPTER_WEIGHTS)).is_file():
        return ()
    trained = {spec.trainable(r) for r in range(held.round + 1, target + 1)}
    return tuple(f for f in Factor if f not in trained)


def _sandwich(strategy: str) -> bool:
    try:
        return strategy_spec(strategy).sandwich
    except ValueError:
        return False


def _framed_file(
    store: Store,
    adapters: list[ObjectRef],
    frame: FrameRef,
    path: Path,
    progress: Callable[[int], object] | None,
    *,
    held_frame: bool,
) -> str:
    """``path`` (the adapter, Fed-SB's ``fed_sb.safetensors``) for a round that refers to its frozen factors: the
    round's objects (the trained factor and the head) and every module's frozen factors from the frame's objects,
    or from ``path`` itself when it already holds them (``held_frame``: a continuing client fetches the trained
    factor and the head only). Written once; returns its sha256."""
    from safetensors import safe_open

    from .adapters import StreamingWriter, layout_key

    suffixes = tuple(f".{f}.weight" for f in Factor)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".framed-") as tmp:
        own = Path(tmp) / "round.safetensors"
        merge_objects(store, adapters, own, {"format": "pt"}, progress)
        source = path
        if not held_frame:
            source = Path(tmp) / "frame.safetensors"
            merge_objects(store, [s.adapter for s in frame.shards], source, {"format": "pt"}, progress)
        with safe_open(str(own), "pt") as mine, safe_open(str(source), "pt") as framed:
            names = list(mine.keys())
            modules = sorted({k.rsplit(".lora_", 1)[0] for k in names if k.endswith(suffixes)})
            wanted = {f"{m}.{part}.weight": framed for m in modules for part in frame.factors}
            missing = sorted(set(wanted) - set(framed.keys()))
            if missing:
                raise ChecksumMismatch(f"the round's frame holds no {missing[0]!r}")
            handles = dict.fromkeys(names, mine) | wanted
            layout = sorted(
                ((k, h.get_slice(k).get_dtype(), h.get_slice(k).get_shape()) for k, h in handles.items()),
                key=layout_key,
            )
            writer = StreamingWriter(Path(tmp) / "framed.safetensors", layout, {"format": "pt"})
            for key, _dtype, _shape in layout:
                writer.write(key, handles[key].get_tensor(key))
            digest = writer.close()
        os.replace(Path(tmp) / "framed.safetensors", path)
    return digest


def _sources(manifest: Manifest) -> dict[str, str]:
    """A linear strategy's round: factor -> the identity of the objects its published tensors lie in (its own, or
    the frame's); empty for the other strategies."""
    try:
        if not strategy_spec(manifest.strategy).frozen_shared:
            return {}
    except ValueError:
        return {}
    return {str(f): manifest.frame_source((f,)).identity for f in (Factor.LORA_A, Factor.LORA_B)}


def _file_sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _frames(d: dict[str, Any]) -> dict[str, str]:
    """``state.json``'s sources; a Fed-SB directory pulled before other strategies referred to their frozen
    factors names its frame (both factors) as ``frame``; older ones name none."""
    if "frames" in d:
        return {str(k): str(v) for k, v in dict(d["frames"]).items()}
    frame = str(d.get("frame", ""))
    return {str(f): frame for f in (Factor.LORA_A, Factor.LORA_B)} if frame else {}


def write_fed_sb_peft(published: Path, out: Path) -> None:
    """The standard PEFT adapter of a Fed-SB round's published tensors: per module ``lora_A = A`` and
    ``lora_B = B @ R`` (float64 product, one rounding), the head as it is; written atomically."""
    from safetensors.torch import load_file, save_file

    from .aggregation.sandwich import check_r, peft_factors

    tensors = load_file(str(published))  # verified against the manifest's hashes when merged
    peft = {}
    for key, tensor in tensors.items():
        if key.endswith(".lora_R.weight"):
            continue
        if key.endswith(".lora_B.weight"):
            module = key.removesuffix(".lora_B.weight")
            r = check_r(module, tensors[f"{module}.lora_R.weight"], int(tensor.shape[1]))
            peft[f"{module}.lora_A.weight"], peft[key] = peft_factors(tensor, r, tensors[f"{module}.lora_A.weight"])
        elif not key.endswith(".lora_A.weight"):
            peft[key] = tensor
    tmp = out.with_name(f".{out.name}.part")
    save_file(peft, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out)


class _HeldFactors:
    """The raw float32 bytes of the held adapter's tensors of some factors (what the published ones must equal)."""

    def __init__(self, path: Path, factors: tuple[Factor, ...]):
        self.path, self.suffixes = path, tuple(f".{f}.weight" for f in factors)
        self._file: Any = None

    def __enter__(self) -> _HeldFactors:
        from safetensors import safe_open

        self._file = safe_open(str(self.path), framework="pt")
        self._names = set(self._file.keys())
        return self

    def __exit__(self, *exc: object) -> None:
        self._file = None

    def get(self, name: str, nbytes: int) -> bytes | None:
        import torch

        if not name.endswith(self.suffixes) or name not in self._names:
            return None
        tensor = self._file.get_tensor(name)
        if tensor.dtype != torch.float32 or tensor.numel() * 4 != nbytes:
            return None
        raw: bytes = tensor.contiguous().numpy().tobytes()
        return raw


def _link(src: Path, dst: Path) -> None:
    """``dst`` names the same bytes as ``src`` (a hard link; a copy where links are not possible)."""
    tmp = dst.with_name(f".{dst.name}.link")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


@dataclass(frozen=True)
class _Snapshot:
    round: int
    key: str
    sha256: str


def _latest_snapshot(state: RoundState, federation: str, target: int) -> _Snapshot | None:
    best = None
    for r, rec in state.snapshots(federation).items():
        if r <= target and (best is None or r > best.round):
            best = _Snapshot(r, rec.key, rec.sha256)
    return best


def _extra_adapters(out: Path, *, exact_adapter: bool, residual_adapter: bool) -> None:
    """Outputs that factorise dense residuals (expensive): built only on request."""
    from .adapters import LoraSpec, write_exact_adapter, write_residual_adapter

    cumulative = dict(iter_correction(out))
    if residual_adapter:
        shutil.rmtree(out / RESIDUAL_ADAPTER_DIR, ignore_errors=True)
        if cumulative:
            spec = LoraSpec.from_peft_config(json.loads((out / ADAPTER_CONFIG).read_text()))
            write_residual_adapter(out / RESIDUAL_ADAPTER_DIR, cumulative, spec)
    if exact_adapter:
        shutil.rmtree(out / EXACT_ADAPTER_DIR, ignore_errors=True)
        write_exact_adapter(out / EXACT_ADAPTER_DIR, out, cumulative)


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
