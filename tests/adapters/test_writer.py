"""Streaming writes and merges produce exactly the bytes write_safetensors writes for the same tensors."""

import hashlib

import pytest
import torch
from safetensors.torch import load_file

from chorus_mq.adapters import (
    MergeSource,
    StreamingWriter,
    layout_key,
    merge_safetensors,
    read_header,
    write_safetensors,
)
from chorus_mq.errors import ChecksumMismatch, InvalidAdapter

from ._util import P

torch.set_num_threads(1)
LIMIT = 1 << 20


def tensors(seed=0, mixed=True):
    g = torch.Generator().manual_seed(seed)
    out = {f"{P}layers.{i}.q.lora_{w}.weight": torch.randn(3, 5, generator=g) for i in range(4) for w in "AB"}
    out[P + "head.weight"] = torch.randn(7, generator=g)
    if mixed:
        out[P + "norm.bf16"] = torch.randn(5, generator=g).to(torch.bfloat16)
        out[P + "scale.f64"] = torch.randn(2, 2, generator=g).double()
    return out


def layout_of(ts):
    return sorted(((name, t.dtype, tuple(t.shape)) for name, t in ts.items()), key=layout_key)


def _chunks(data, start, size):
    for i in range(start, len(data), size):
        yield data[i : i + size]


def sources(paths, chunk=37):
    """What pull hands merge_safetensors: each file's header prefix, its data in chunks, its sha256."""
    out = []
    for path in paths:
        data = path.read_bytes()
        n = 8 + int.from_bytes(data[:8], "little")
        out.append(MergeSource(data[:n], _chunks(data, n, chunk), hashlib.sha256(data).hexdigest()))
    return out


def test_streaming_writer_matches_write_safetensors(tmp_path):
    ts = tensors()
    meta = {"format": "x", "k": "v"}
    expected = write_safetensors(tmp_path / "whole.safetensors", ts, meta)
    with StreamingWriter(tmp_path / "streamed.safetensors", layout_of(ts), meta) as writer:
        for name, _, _ in layout_of(ts):
            writer.write(name, ts[name].T.contiguous().T if ts[name].ndim == 2 else ts[name])
        sha = writer.close()
    data = (tmp_path / "streamed.safetensors").read_bytes()
    assert sha == expected == hashlib.sha256(data).hexdigest() and writer.close() == sha
    assert data == (tmp_path / "whole.safetensors").read_bytes()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left
    loaded = load_file(tmp_path / "streamed.safetensors")
    assert all(torch.equal(loaded[k], v) for k, v in ts.items())


def test_layout_order_is_widest_dtype_then_name(tmp_path):
    ts = tensors()
    write_safetensors(tmp_path / "w.safetensors", ts)
    header = read_header(tmp_path / "w.safetensors", max_header_bytes=LIMIT)
    order = [name for name, _ in sorted(header.tensors.items(), key=lambda kv: kv[1].begin)]
    assert order == [name for name, _, _ in layout_of(ts)]
    assert order[0] == P + "scale.f64" and order[-1] == P + "norm.bf16"


@pytest.mark.parametrize(
    "case, match",
    [
        ("wrong-name", "expected tensor .* next, got"),
        ("wrong-shape", "expected tensor .* next, got"),
        ("wrong-dtype", "expected tensor .* next, got"),
        ("too-many", "every tensor of the layout is written"),
        ("too-few", "is missing"),
    ],
)
def test_streaming_writer_refuses_and_leaves_nothing(tmp_path, case, match):
    ts = tensors(mixed=False)
    layout = layout_of(ts)
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"previous")
    writer = StreamingWriter(target, layout, {})
    first = layout[0][0]
    with pytest.raises(InvalidAdapter, match=match):
        if case == "wrong-name":
            writer.write(layout[1][0], ts[layout[1][0]])
        elif case == "wrong-shape":
            writer.write(first, ts[first][:2])
        elif case == "wrong-dtype":
            writer.write(first, ts[first].double())
        elif case == "too-many":
            for name, _, _ in layout:
                writer.write(name, ts[name])
            writer.write(first, ts[first])
        else:
            writer.write(first, ts[first])
            writer.close()
    writer.abort()
    assert target.read_bytes() == b"previous" and sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]


def test_streaming_writer_refuses_layouts_out_of_order(tmp_path):
    with pytest.raises(InvalidAdapter, match="files are written widest dtype first, then by name"):
        StreamingWriter(tmp_path / "x", [("b", torch.float32, (1,)), ("a", torch.float32, (1,))])
    with pytest.raises(InvalidAdapter, match="widest dtype first"):
        StreamingWriter(tmp_path / "x", [("a", torch.bfloat16, (1,)), ("b", torch.float32, (1,))])
    with pytest.raises(InvalidAdapter, match="'a'"):
        StreamingWriter(tmp_path / "x", [("a", torch.float32, (1,)), ("a", torch.float32, (1,))])
    with pytest.raises(InvalidAdapter, match="cannot be written"):
        StreamingWriter(tmp_path / "x", [("a", torch.int64, (1,))])
    with pytest.raises(InvalidAdapter, match="non-negative ints"):
        StreamingWriter(tmp_path / "x", [("a", torch.float32, (-1,))])
    assert list(tmp_path.iterdir()) == []


def test_an_exception_inside_the_with_block_leaves_nothing(tmp_path):
    ts = tensors(mixed=False)
    with pytest.raises(RuntimeError, match="math failed"), StreamingWriter(tmp_path / "o", layout_of(ts)) as w:
        w.write(layout_of(ts)[0][0], ts[layout_of(ts)[0][0]])
        raise RuntimeError("math failed")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("mixed", [False, True])
def test_merging_the_shards_gives_the_whole_file(tmp_path, mixed):
    ts = tensors(mixed=mixed)
    meta = {"format": "chorus-residual/1"}
    expected = write_safetensors(tmp_path / "whole.safetensors", ts, meta)
    names = [name for name, _, _ in layout_of(ts)]
    cuts = [names[:3], names[3:4], names[4:]]  # shards hold consecutive runs of the layout
    paths = []
    for k, part in enumerate(cuts):
        paths.append(tmp_path / f"shard-{k}.safetensors")
        write_safetensors(paths[-1], {n: ts[n] for n in part}, {"format": "chorus-shard/1"})
    sha = merge_safetensors(sources(paths), tmp_path / "merged.safetensors", meta)
    assert sha == expected
    assert (tmp_path / "merged.safetensors").read_bytes() == (tmp_path / "whole.safetensors").read_bytes()
    # plain tuples work as sources too
    assert merge_safetensors([tuple(s) for s in sources(paths, chunk=1 << 20)], tmp_path / "m2", meta) == expected


def _shards(tmp_path):
    ts = tensors(mixed=False)
    names = [name for name, _, _ in layout_of(ts)]
    paths = []
    for k, part in enumerate((names[:4], names[4:])):
        paths.append(tmp_path / f"s{k}.safetensors")
        write_safetensors(paths[-1], {n: ts[n] for n in part})
    return paths


def test_merge_refuses_a_corrupt_source_and_leaves_nothing(tmp_path):
    paths = _shards(tmp_path)
    out = tmp_path / "merged.safetensors"
    out.write_bytes(b"previous")
    srcs = sources(paths)
    head, chunks, sha = srcs[1]
    flipped = (bytes([c[0] ^ 1]) + c[1:] if i == 2 else c for i, c in enumerate(chunks))
    with pytest.raises(ChecksumMismatch, match="source 1 has sha256"):
        merge_safetensors([srcs[0], MergeSource(head, flipped, sha)], out)
    assert out.read_bytes() == b"previous" and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize(
    "change, match",
    [
        ("short", "ended 4 bytes short"),
        ("long", "more data than"),
        ("order", "comes after"),
        ("twice", "in more than one of the files"),
        ("bad-header", "header prefix is"),
    ],
)
def test_merge_refuses_inconsistent_sources(tmp_path, change, match):
    paths = _shards(tmp_path)
    srcs = sources(paths, chunk=1 << 20)
    if change == "short":
        srcs[1] = MergeSource(srcs[1].header, [bytes(next(iter(srcs[1].chunks)))[:-4]], srcs[1].sha256)
    elif change == "long":
        srcs[1] = MergeSource(srcs[1].header, [bytes(next(iter(srcs[1].chunks))) + b"\0" * 4], srcs[1].sha256)
    elif change == "order":
        srcs.reverse()
    elif change == "twice":
        srcs = [srcs[0], sources(paths[:1])[0]]
    else:
        srcs[0] = MergeSource(srcs[0].header[:-1], srcs[0].chunks, srcs[0].sha256)
    with pytest.raises(InvalidAdapter, match=match):
        merge_safetensors(srcs, tmp_path / "merged.safetensors")
    assert not (tmp_path / "merged.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
