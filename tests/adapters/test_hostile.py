"""Hostile and malformed inputs: each must fail with a specific error class and message.

Every case goes through the worker's full path (``validate_local``: header, keys, ranks,
every tensor) or, for directories, through ``load_adapter``.
"""

import gzip
import json
import pickle
import tempfile
from functools import partial
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chorus_mq.adapters import load_adapter, read_header, validate_local
from chorus_mq.errors import InvalidAdapter, TooLarge

from ._util import P, Q, V, delta_bytes, entry, lora_tensors, peft_config, raw_file, write

LIMIT = 1 << 20
CFG = peft_config()  # r=4, lora_alpha=8, q_proj/v_proj
GOOD = delta_bytes(lora_tensors(r=2, d_in=4, d_out=4), peft_config(r=2))


def delta(*, drop=(), config=CFG, **replace) -> bytes:
    """A delta with some tensors dropped or replaced (keyword keys: 'QA' = Q's lora_A, etc.)."""
    t = lora_tensors()
    names = {"QA": f"{Q}.lora_A.weight", "QB": f"{Q}.lora_B.weight", "VA": f"{V}.lora_A.weight",
             "VB": f"{V}.lora_B.weight"}
    for k in drop:
        del t[names[k]]
    for k, v in replace.items():
        t[names.get(k, k)] = v
    return delta_bytes(t, config)


def extra_key(key, tensor=None, config=CFG) -> bytes:
    return delta_bytes(lora_tensors() | {key: torch.ones(2, 2) if tensor is None else tensor}, config)


def poisoned(which, value):
    t = torch.randn(4, 32) if which == "A" else torch.randn(32, 4)
    t[1, 2] = value
    return t


def config_case(**changes) -> bytes:
    return delta(config=CFG | changes)


def directory(files: dict[str, bytes]):
    def make(tmp: Path) -> Path:
        d = tmp / "adapter"
        d.mkdir()
        for name, data in files.items():
            (d / name).write_bytes(data)
        return d
    return make


def one_tensor(e, data=b"") -> bytes:
    return raw_file({"t": e}, data)


E = InvalidAdapter
DTYPES = ["I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "I16", "I32", "I64", "U64", "C64", "F4"]
CASES = [
    # --- framing ------------------------------------------------------------------------
    pytest.param(b"", E, "empty file", id="empty-file"),
    pytest.param(b"\x10\0\0\0\0\0\0", E, "truncated file: 7 bytes", id="seven-bytes"),
    pytest.param(raw_file(b"", length=0) + b"{}", E, "header length is 0", id="length-zero"),
    pytest.param(raw_file("{}", length=2**40), TooLarge, "over the 1048576-byte limit", id="length-too-big"),
    pytest.param(raw_file("{}", length=100), E, "points past the end", id="length-beyond-file"),
    pytest.param(raw_file('{"t":{"dtype":"F32"}}', length=8), E, "not valid JSON", id="length-cuts-json"),
    pytest.param(raw_file("{}" + "x" * (LIMIT + 10)), TooLarge, "CHORUS_MAX_HEADER_BYTES", id="huge-header"),
    pytest.param(GOOD[:-5], E, "truncated", id="truncated-data"),
    pytest.param(GOOD + b"\0" * 8, E, "not described by the header", id="trailing-bytes"),
    # --- foreign formats ----------------------------------------------------------------
    pytest.param(pickle.dumps({"lora_A": [1.0]}), E, "pickle", id="pickle"),
    pytest.param(pickle.dumps({"x": 1}, protocol=2), E, "pickle", id="pickle-proto2"),
    pytest.param(b"PK\x03\x04\x14\0\0\0" + b"\0" * 64, E, "zip archive", id="torch-zip"),
    pytest.param(gzip.compress(GOOD), E, "gzip", id="gzip"),
    pytest.param(b"\x93NUMPY\x01\0v\0" + b" " * 64, E, "NumPy", id="npy"),
    # --- JSON ---------------------------------------------------------------------------
    pytest.param(raw_file('{"t": '), E, "not valid JSON", id="bad-json"),
    pytest.param(raw_file("[1, 2]"), E, "does not start with '{'", id="json-array"),
    pytest.param(raw_file(' {"t": 1}'), E, "does not start with '{'", id="leading-space"),
    pytest.param(raw_file(b'{"\xff\xfe": 1}'), E, "not valid UTF-8", id="non-utf8"),
    pytest.param(raw_file('{"t": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}, "t": 1}', b"\0" * 4),
                 E, "duplicate key 't'", id="duplicate-keys"),
    pytest.param(raw_file('{"t": NaN}'), E, "NaN is not valid JSON", id="json-nan"),
    pytest.param(raw_file('{"t":' + "[" * 50_000 + "]" * 50_000 + "}"), E, "nested too deeply", id="deep-nesting"),
    pytest.param(raw_file('{"t": {"dtype": "F32", "shape": [' + "9" * 5000 + '], "data_offsets": [0, 4]}}'),
                 E, "not valid JSON", id="5000-digit-dim"),
    pytest.param(raw_file({"__metadata__": {"adapter_config": 1}}), E, "__metadata__ must map strings", id="meta-int"),
    pytest.param(raw_file({"__metadata__": ["a"]}), E, "__metadata__ must map strings", id="meta-list"),
    # --- tensor entries -----------------------------------------------------------------
    pytest.param(raw_file({"t": {"dtype": "F32", "shape": [1]}}), E, "exactly dtype, shape, data_offsets",
                 id="entry-missing-offsets"),
    pytest.param(raw_file({"t": entry([1]) | {"x": 1}}, b"\0" * 4), E, "exactly dtype", id="entry-extra-field"),
    pytest.param(raw_file({"t": [1, 2]}), E, "exactly dtype", id="entry-not-object"),
    *[pytest.param(one_tensor(entry([2], dtype=d, itemsize=1), b"\0\0"), E, f"has dtype '{d}'", id=f"dtype-{d}")
      for d in DTYPES],
    pytest.param(one_tensor({"dtype": 4, "shape": [1], "data_offsets": [0, 4]}, b"\0" * 4), E, "has dtype 4",
                 id="dtype-number"),
    pytest.param(one_tensor(entry([-1], end=4), b"\0" * 4), E, "dimensions must be integers", id="negative-dim"),
    pytest.param(one_tensor(entry([1.0], end=4), b"\0" * 4), E, "dimensions must be integers", id="float-dim"),
    pytest.param(one_tensor(entry([True], end=4), b"\0" * 4), E, "dimensions must be integers", id="bool-dim"),
    pytest.param(one_tensor(entry([2**62, 0], end=0)), E, "dimensions must be integers", id="dim-2**62"),
    pytest.param(one_tensor(entry([2**31 - 1] * 4, end=4), b"\0" * 4), E, "bytes but data_offsets span 4",
                 id="numel-overflow"),
    pytest.param(one_tensor(entry([1] * 9), b"\0" * 4), E, "9 dimensions", id="ndim-9"),
    pytest.param(one_tensor(entry([2], begin=8), b"\0" * 8), E, "reach past the 8 bytes", id="offsets-out-of-range"),
    pytest.param(one_tensor(entry([1], begin=4, end=0), b"\0" * 4), E, "not 0 <= begin <= end", id="offsets-reversed"),
    pytest.param(one_tensor(entry([1], begin=-4, end=0), b"\0" * 4), E, "not 0 <= begin", id="offsets-negative"),
    pytest.param(one_tensor({"dtype": "F32", "shape": [1], "data_offsets": [0]}, b"\0" * 4), E,
                 "must be [begin, end]", id="offsets-one-int"),
    pytest.param(one_tensor({"dtype": "F32", "shape": [1], "data_offsets": [0.0, 4.0]}, b"\0" * 4), E,
                 "must be [begin, end]", id="offsets-floats"),
    pytest.param(one_tensor(entry([2], end=4), b"\0" * 4), E, "is 8 bytes but data_offsets span 4",
                 id="offsets-vs-shape"),
    pytest.param(raw_file({"a": entry([2]), "b": entry([2], begin=4)}, b"\0" * 12), E, "overlapping", id="overlap"),
    pytest.param(raw_file({"a": entry([1]), "b": entry([1], begin=8)}, b"\0" * 12), E, "gap of 4 bytes", id="gap"),
    # --- LoRA structure -----------------------------------------------------------------
    pytest.param(delta(QA=torch.tensor(1.0)), E, "expected a non-empty 2-D (rank, d_in)", id="0-dim-lora"),
    pytest.param(delta(QA=torch.ones(4, 32, 1)), E, "has shape [4, 32, 1]", id="3-d-lora"),
    pytest.param(delta(QB=torch.ones(32)), E, "lora_B has shape [32]", id="1-d-lora"),
    pytest.param(delta(QA=torch.ones(0, 32), QB=torch.ones(32, 0)), E, "non-empty", id="rank-0"),
    pytest.param(delta(QA=poisoned("A", float("nan"))), E, "lora_A contains 1 NaN", id="nan-in-A"),
    pytest.param(delta(VB=poisoned("B", float("-inf"))), E, "lora_B contains 0 NaN and 1 Inf", id="inf-in-B"),
    pytest.param(extra_key(P + "lm_head.weight", torch.tensor([[float("nan")]]),
                           CFG | {"modules_to_save": ["lm_head"]}), E, "extra", id="nan-in-extra"),
    pytest.param(delta(drop=["QB"]), E, "has lora_A but no lora_B", id="A-without-B"),
    pytest.param(delta(drop=["VA"]), E, "has lora_B but no lora_A", id="B-without-A"),
    pytest.param(delta(QB=torch.ones(32, 3)), E, "lora_A has 4 rows but lora_B has 3 columns", id="rank-A-vs-B"),
    pytest.param(config_case(r=8), E, "rank 4 in file but adapter_config says 8", id="rank-vs-config"),
    pytest.param(config_case(rank_pattern={"layers.0.self_attn.v_proj": 2}), E, "says 2 for module",
                 id="rank-vs-rank-pattern"),
    pytest.param(extra_key(P + "model.norm.weight"), E, "unexpected key", id="non-lora-key"),
    pytest.param(delta_bytes({k.removeprefix(P): v for k, v in lora_tensors().items()}, CFG), E, "silently ignore",
                 id="no-base-model-prefix"),
    pytest.param(extra_key(P + "model.embed_tokens.lora_embedding_A"), E, "embedding LoRA", id="embedding-lora"),
    pytest.param(extra_key(f"{Q}.lora_magnitude_vector.weight"), E, "DoRA", id="dora-key"),
    pytest.param(extra_key(P + "model.embed_tokens.base_layer.weight"), E, "base-model weights", id="base-layer"),
    pytest.param(extra_key(f"{Q}.lora_B.bias"), E, "LoRA biases", id="lora-bias-key"),
    pytest.param(extra_key(f"{Q}.lora_A.default.weight", torch.ones(4, 32)), E, "same key", id="normalised-dup"),
    pytest.param(extra_key(P + "x" * 400 + ".lora_A.weight"), E, "over the 400 limit", id="key-too-long"),
    pytest.param(delta_bytes({}, CFG), E, "no LoRA tensors", id="no-lora-tensors"),
    pytest.param(config_case(target_modules=["k_proj"]), E, "not matched by adapter_config target_modules",
                 id="target-modules-mismatch"),
    pytest.param(delta_bytes(lora_tensors()), E, "no adapter_config", id="no-embedded-config"),
    pytest.param(delta_bytes(lora_tensors(), None, adapter_config="{r: 4}"), E, "adapter_config is not valid JSON",
                 id="embedded-config-bad-json"),
    # --- adapter_config values ----------------------------------------------------------
    pytest.param(config_case(r=0), E, "r must be a positive integer", id="r-zero"),
    pytest.param(config_case(r=-4), E, "r must be a positive integer", id="r-negative"),
    pytest.param(config_case(r=4.0), E, "r must be a positive integer", id="r-float"),
    pytest.param(config_case(r=True), E, "r must be a positive integer", id="r-bool"),
    pytest.param(config_case(lora_alpha=-8), E, "lora_alpha must be a positive", id="alpha-negative"),
    pytest.param(delta_bytes(lora_tensors(), None, adapter_config='{"r": 4, "lora_alpha": 1e400}'), E,
                 "lora_alpha must be a positive finite", id="alpha-1e400"),
    pytest.param(config_case(lora_alpha=float("inf")), E, "Infinity is not valid JSON", id="alpha-infinity"),
    pytest.param(config_case(lora_alpha=10**40), E, "lora_alpha must be a positive", id="alpha-huge-int"),
    pytest.param(config_case(lora_alpha="8"), E, "lora_alpha must be a positive", id="alpha-string"),
    pytest.param(config_case(peft_type="IA3"), E, "only LoRA adapters", id="peft-type"),
    pytest.param(config_case(use_dora=True), E, "use_dora=true is not supported", id="use-dora"),
    pytest.param(config_case(bias="all"), E, "bias='all'", id="bias-all"),
    pytest.param(config_case(use_rslora="yes"), E, "use_rslora must be true or false", id="rslora-string"),
    pytest.param(config_case(target_modules=5), E, "target_modules must be a list", id="targets-number"),
    pytest.param(config_case(rank_pattern={"q_proj": 0}), E, "rank_pattern['q_proj'] must be", id="pattern-rank-0"),
    pytest.param(config_case(rank_pattern={"(": 2}), E, "not a valid regex", id="pattern-bad-regex"),
    pytest.param(config_case(alpha_pattern={"(a+)+": 2}), E, "too complex", id="pattern-redos"),
    pytest.param(delta_bytes(lora_tensors(), None, adapter_config="[4]"), E, "must be a JSON object",
                 id="config-not-object"),
    # --- adapter directories ------------------------------------------------------------
    pytest.param(directory({"adapter_config.json": json.dumps(CFG).encode(), "adapter_model.bin": b"\x80\x04"}),
                 E, "adapter_model.bin, a pickle", id="bin-adapter-dir"),
    pytest.param(directory({"adapter_model.safetensors": GOOD}), E, "no adapter_config.json", id="dir-no-config"),
    pytest.param(directory({"adapter_config.json": b"{r: 4"}), E, "adapter_config.json is not valid JSON",
                 id="dir-config-bad-json"),
    pytest.param(directory({"adapter_config.json": b'{"r": 4, "r": 8}'}), E, "duplicate key 'r'",
                 id="dir-config-duplicate"),
    pytest.param(directory({"adapter_config.json": b'{"lora_alpha": NaN}'}), E, "NaN is not valid JSON",
                 id="dir-config-alpha-nan"),
    pytest.param(directory({"adapter_config.json": json.dumps(CFG).encode()}), E, "no adapter_model.safetensors",
                 id="dir-no-weights"),
    pytest.param(directory({"adapter_config.json": json.dumps(CFG).encode(),
                            "adapter_model.safetensors": pickle.dumps({"a": 1})}), E, "pickle",
                 id="dir-pickle-as-safetensors"),
]


@pytest.mark.parametrize("make, cls, match", CASES)
def test_hostile(make, cls, match, tmp_path):
    target = make(tmp_path) if callable(make) else write(tmp_path / "delta.safetensors", make)
    check = load_adapter if target.is_dir() else partial(validate_local, max_header_bytes=LIMIT)
    with pytest.raises(InvalidAdapter) as info:
        check(target)
    assert type(info.value) is cls
    assert match in str(info.value)


def test_corpus_is_large():
    assert len(CASES) >= 45 and len({c.id for c in CASES}) == len(CASES)


def test_good_file_is_good(tmp_path):
    assert validate_local(write(tmp_path / "d.safetensors", GOOD)).ranks == {Q: 2, V: 2}


@settings(max_examples=300, deadline=None, database=None)
@given(st.binary(max_size=300))
def test_fuzz_arbitrary_bytes(data):
    try:
        read_header(data, max_header_bytes=LIMIT)
    except InvalidAdapter:
        pass


HEADER_END = 8 + int.from_bytes(GOOD[:8], "little")
DIGITS = [i for i in range(8, HEADER_END) if GOOD[i:i + 1].isdigit()]


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_mutated_valid_file(data):
    buf = bytearray(GOOD)
    for _ in range(data.draw(st.integers(1, 3))):
        # digits (shapes, offsets, ranks) keep the JSON valid and reach the deeper checks
        pos = data.draw(st.sampled_from(DIGITS) | st.sampled_from(DIGITS) | st.integers(8, HEADER_END - 1)
                        | st.integers(0, len(buf) - 1))
        buf[pos] = data.draw(st.sampled_from(b"0123456789") | st.sampled_from(b'{}[]",:-.e ') | st.integers(0, 255))
    cut = data.draw(st.none() | st.none() | st.integers(0, len(buf)))
    with tempfile.TemporaryDirectory() as tmp:
        path = write(Path(tmp) / "d.safetensors", bytes(buf[:cut]))
        try:
            validate_local(path, max_header_bytes=LIMIT)
        except InvalidAdapter:
            pass
