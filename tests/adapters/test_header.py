import hashlib
import pickle

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from chorus_mq.adapters.header import DTYPES, read_header, sniff, strict_json, write_safetensors
from chorus_mq.errors import InvalidAdapter

from ._util import entry, raw_file

LIMIT = 1 << 20


def test_reads_what_safetensors_writes():
    tensors = {
        "a": torch.ones(2, 3),
        "b": torch.zeros(4, dtype=torch.bfloat16),
        "c": torch.ones(1, 1, dtype=torch.float64),
        "d": torch.ones(0, 5, dtype=torch.float16),
    }
    h = read_header(save(tensors, metadata={"k": "v"}), max_header_bytes=LIMIT)
    assert h.metadata == {"k": "v"}
    assert {k: (i.dtype, i.shape) for k, i in h.tensors.items()} == {
        "a": ("F32", (2, 3)),
        "b": ("BF16", (4,)),
        "c": ("F64", (1, 1)),
        "d": ("F16", (0, 5)),
    }
    assert h.data_len == sum(i.nbytes for i in h.tensors.values()) == 24 + 8 + 8


def test_header_without_tensors_is_valid():
    h = read_header(raw_file("{}"), max_header_bytes=LIMIT)
    assert h.tensors == {} and h.metadata == {} and h.data_len == 0


def test_reads_from_path_and_file_object(tmp_path):
    p = tmp_path / "x.safetensors"
    p.write_bytes(save({"a": torch.ones(2)}))
    assert read_header(p, max_header_bytes=LIMIT).tensors["a"].shape == (2,)
    with open(p, "rb") as f:
        assert read_header(f, max_header_bytes=LIMIT).tensors["a"].nbytes == 8


def test_writer_is_deterministic_and_readable(tmp_path):
    t = {"z": torch.randn(3, 2), "a": torch.randn(5).to(torch.bfloat16), "m": torch.randn(2, 2).double()}
    meta = {"format": "x", "adapter_config": "{}", "zz": "1", "aa": "2"}
    h1 = write_safetensors(tmp_path / "1.safetensors", t, meta)
    h2 = write_safetensors(tmp_path / "2.safetensors", dict(reversed(t.items())), dict(reversed(meta.items())))
    data = (tmp_path / "1.safetensors").read_bytes()
    assert h1 == h2 == hashlib.sha256(data).hexdigest()
    assert data == (tmp_path / "2.safetensors").read_bytes()
    loaded = load_file(tmp_path / "1.safetensors")
    assert all(torch.equal(loaded[k], v) for k, v in t.items())
    with safe_open(tmp_path / "1.safetensors", "pt") as f:
        assert f.metadata() == meta
    # every tensor starts aligned to its item size (widest dtype first, header padded to 8)
    h = read_header(data, max_header_bytes=LIMIT)
    assert (8 + h.header_len) % 8 == 0
    assert all(i.begin % DTYPES[i.dtype][0] == 0 for i in h.tensors.values())


def test_writer_refuses_non_float_and_leaves_no_temp(tmp_path):
    with pytest.raises(InvalidAdapter, match=r"dtype torch\.int64"):
        write_safetensors(tmp_path / "x.safetensors", {"a": torch.ones(2, dtype=torch.int64)}, {})
    assert list(tmp_path.iterdir()) == []


def test_writer_handles_non_contiguous(tmp_path):
    t = torch.randn(4, 3).T
    write_safetensors(tmp_path / "x.safetensors", {"t": t}, {})
    assert torch.equal(load_file(tmp_path / "x.safetensors")["t"], t)


@pytest.mark.parametrize(
    "data, kind",
    [
        (pickle.dumps({"a": 1}, protocol=2), "pickle"),
        (pickle.dumps({"a": 1}), "pickle"),
        (b"PK\x03\x04" + b"\0" * 40, "zip"),
        (b"\x1f\x8b\x08\0" + b"\0" * 20, "gzip"),
        (b"\x93NUMPY\x01\x00", "NumPy"),
        (b"\0" * 257 + b"ustar\x0000", "tar"),
    ],
)
def test_sniff_names_foreign_formats(data, kind):
    assert kind in sniff(data)


def test_sniff_does_not_misfire_on_real_safetensors():
    # a 640-byte header starts with 0x80 0x02, exactly like pickle protocol 2
    header = b'{"__metadata__":{"p":"' + b"x" * (640 - 25) + b'"}}'
    assert len(header) == 640
    data = raw_file(header)
    assert data[:2] == b"\x80\x02" and sniff(data) is not None
    assert read_header(data, max_header_bytes=LIMIT).metadata["p"].startswith("x")


def test_strict_json_rejects_constants_and_duplicates():
    assert strict_json(b'{"a": [1, 2.5]}', "x") == {"a": [1, 2.5]}
    with pytest.raises(InvalidAdapter, match="NaN is not valid JSON"):
        strict_json('{"a": NaN}', "x")
    with pytest.raises(InvalidAdapter, match="duplicate key 'a'"):
        strict_json('{"a": 1, "a": 2}', "x")


def test_zero_size_tensors_may_share_an_offset():
    header = {"a": entry([0, 4]), "b": entry([2], begin=0), "c": entry([0], begin=8)}
    h = read_header(raw_file(header, b"\0" * 8), max_header_bytes=LIMIT)
    assert h.tensors["c"].begin == 8
