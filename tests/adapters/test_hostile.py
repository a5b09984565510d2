"""Hostile and malformed inputs: each must fail with a specific error class and message.

The first corpus goes through the client's and worker's full local check (``validate_local``:
header, keys, ranks, every tensor) or, for directories, through ``load_adapter``; the second
through the worker's ingest against the federation's declared model (``check_delta`` from the
header, then ``build_index`` over the data).
"""

import contextlib
import gzip
import json
import pickle
import tempfile
import time
from functools import partial
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from chorus_mq.adapters import (
    DeltaFile,
    LoraSpec,
    ModelDecl,
    build_index,
    check_delta,
    load_adapter,
    read_header,
    validate_local,
)
from chorus_mq.adapters.header import DEFAULT_MAX_HEADER_BYTES
from chorus_mq.errors import IncompatibleDelta, InvalidAdapter, LimitExceeded, TooLarge, UpdateTooLarge

from ._util import P, Q, V, bytes_read, delta_bytes, entry, lora_tensors, peft_config, raw_file, write

LIMIT = 1 << 20
CFG = peft_config()  # r=4, lora_alpha=8, q_proj/v_proj
GOOD = delta_bytes(lora_tensors(r=2, d_in=4, d_out=4), peft_config(r=2))


def delta(*, drop=(), config=CFG, **replace) -> bytes:
    """A delta with some tensors dropped or replaced (keyword keys: 'QA' = Q's lora_A, etc.)."""
    t = lora_tensors()
    names = {
        "QA": f"{Q}.lora_A.weight",
        "QB": f"{Q}.lora_B.weight",
        "VA": f"{V}.lora_A.weight",
        "VB": f"{V}.lora_B.weight",
    }
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
    pytest.param(
        raw_file('{"t": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}, "t": 1}', b"\0" * 4),
        E,
        "duplicate key 't'",
        id="duplicate-keys",
    ),
    pytest.param(raw_file('{"t": NaN}'), E, "NaN is not valid JSON", id="json-nan"),
    pytest.param(raw_file('{"t":' + "[" * 50_000 + "]" * 50_000 + "}"), E, "nested too deeply", id="deep-nesting"),
    pytest.param(
        raw_file('{"t": {"dtype": "F32", "shape": [' + "9" * 5000 + '], "data_offsets": [0, 4]}}'),
        E,
        "not valid JSON",
        id="5000-digit-dim",
    ),
    pytest.param(raw_file({"__metadata__": {"adapter_config": 1}}), E, "__metadata__ must map strings", id="meta-int"),
    pytest.param(raw_file({"__metadata__": ["a"]}), E, "__metadata__ must map strings", id="meta-list"),
    # --- tensor entries -----------------------------------------------------------------
    pytest.param(
        raw_file({"t": {"dtype": "F32", "shape": [1]}}),
        E,
        "exactly dtype, shape, data_offsets",
        id="entry-missing-offsets",
    ),
    pytest.param(raw_file({"t": entry([1]) | {"x": 1}}, b"\0" * 4), E, "exactly dtype", id="entry-extra-field"),
    pytest.param(raw_file({"t": [1, 2]}), E, "exactly dtype", id="entry-not-object"),
    *[
        pytest.param(one_tensor(entry([2], dtype=d, itemsize=1), b"\0\0"), E, f"has dtype '{d}'", id=f"dtype-{d}")
        for d in DTYPES
    ],
    pytest.param(
        one_tensor({"dtype": 4, "shape": [1], "data_offsets": [0, 4]}, b"\0" * 4), E, "has dtype 4", id="dtype-number"
    ),
    pytest.param(one_tensor(entry([-1], end=4), b"\0" * 4), E, "dimensions must be integers", id="negative-dim"),
    pytest.param(one_tensor(entry([1.0], end=4), b"\0" * 4), E, "dimensions must be integers", id="float-dim"),
    pytest.param(one_tensor(entry([True], end=4), b"\0" * 4), E, "dimensions must be integers", id="bool-dim"),
    pytest.param(one_tensor(entry([2**62, 0], end=0)), E, "dimensions must be integers", id="dim-2**62"),
    pytest.param(
        one_tensor(entry([2**31 - 1] * 4, end=4), b"\0" * 4), E, "bytes but data_offsets span 4", id="numel-overflow"
    ),
    pytest.param(one_tensor(entry([1] * 9), b"\0" * 4), E, "9 dimensions", id="ndim-9"),
    pytest.param(one_tensor(entry([2], begin=8), b"\0" * 8), E, "reach past the 8 bytes", id="offsets-out-of-range"),
    pytest.param(one_tensor(entry([1], begin=4, end=0), b"\0" * 4), E, "not 0 <= begin <= end", id="offsets-reversed"),
    pytest.param(one_tensor(entry([1], begin=-4, end=0), b"\0" * 4), E, "not 0 <= begin", id="offsets-negative"),
    pytest.param(
        one_tensor({"dtype": "F32", "shape": [1], "data_offsets": [0]}, b"\0" * 4),
        E,
        "must be [begin, end]",
        id="offsets-one-int",
    ),
    pytest.param(
        one_tensor({"dtype": "F32", "shape": [1], "data_offsets": [0.0, 4.0]}, b"\0" * 4),
        E,
        "must be [begin, end]",
        id="offsets-floats",
    ),
    pytest.param(
        one_tensor(entry([2], end=4), b"\0" * 4), E, "is 8 bytes but data_offsets span 4", id="offsets-vs-shape"
    ),
    pytest.param(raw_file({"a": entry([2]), "b": entry([2], begin=4)}, b"\0" * 12), E, "overlapping", id="overlap"),
    pytest.param(raw_file({"a": entry([1]), "b": entry([1], begin=8)}, b"\0" * 12), E, "gap of 4 bytes", id="gap"),
    # --- LoRA structure -----------------------------------------------------------------
    pytest.param(delta(QA=torch.tensor(1.0)), E, "expected a non-empty 2-D (rank, d_in)", id="0-dim-lora"),
    pytest.param(delta(QA=torch.ones(4, 32, 1)), E, "has shape [4, 32, 1]", id="3-d-lora"),
    pytest.param(delta(QB=torch.ones(32)), E, "lora_B has shape [32]", id="1-d-lora"),
    pytest.param(delta(QA=torch.ones(0, 32), QB=torch.ones(32, 0)), E, "non-empty", id="rank-0"),
    pytest.param(delta(QA=poisoned("A", float("nan"))), E, "lora_A contains 1 NaN", id="nan-in-A"),
    pytest.param(delta(VB=poisoned("B", float("-inf"))), E, "lora_B contains 0 NaN and 1 Inf", id="inf-in-B"),
    pytest.param(
        extra_key(P + "lm_head.weight", torch.tensor([[float("nan")]]), CFG | {"modules_to_save": ["lm_head"]}),
        E,
        "extra",
        id="nan-in-extra",
    ),
    pytest.param(delta(drop=["QB"]), E, "has lora_A but no lora_B", id="A-without-B"),
    pytest.param(delta(drop=["VA"]), E, "has lora_B but no lora_A", id="B-without-A"),
    pytest.param(delta(QB=torch.ones(32, 3)), E, "lora_A has 4 rows but lora_B has 3 columns", id="rank-A-vs-B"),
    pytest.param(config_case(r=8), E, "rank 4 in file but adapter_config says 8", id="rank-vs-config"),
    pytest.param(
        config_case(rank_pattern={"layers.0.self_attn.v_proj": 2}), E, "says 2 for module", id="rank-vs-rank-pattern"
    ),
    pytest.param(extra_key(P + "model.norm.weight"), E, "unexpected key", id="non-lora-key"),
    pytest.param(
        delta_bytes({k.removeprefix(P): v for k, v in lora_tensors().items()}, CFG),
        E,
        "silently ignore",
        id="no-base-model-prefix",
    ),
    pytest.param(extra_key(P + "model.embed_tokens.lora_embedding_A"), E, "embedding LoRA", id="embedding-lora"),
    pytest.param(extra_key(f"{Q}.lora_magnitude_vector.weight"), E, "DoRA", id="dora-key"),
    pytest.param(extra_key(P + "model.embed_tokens.base_layer.weight"), E, "base-model weights", id="base-layer"),
    pytest.param(extra_key(f"{Q}.lora_B.bias"), E, "LoRA biases", id="lora-bias-key"),
    pytest.param(extra_key(f"{Q}.lora_A.default.weight", torch.ones(4, 32)), E, "same key", id="normalised-dup"),
    pytest.param(extra_key(P + "x" * 400 + ".lora_A.weight"), E, "over the 400 limit", id="key-too-long"),
    pytest.param(delta_bytes({}, CFG), E, "no LoRA tensors", id="no-lora-tensors"),
    pytest.param(
        config_case(target_modules=[f"t{i}_proj" for i in range(50)]),
        E,
        "target_modules ('t0_proj', 't10_proj', 't11_proj', 't12_proj', 't13_proj', 't14_proj', 't15_proj', "
        "'t16_proj') (first 8 of 50)",
        id="long-target-list-in-message",
    ),
    pytest.param(
        config_case(target_modules=["k_proj"]),
        E,
        "not matched by adapter_config target_modules",
        id="target-modules-mismatch",
    ),
    pytest.param(delta_bytes(lora_tensors()), E, "no adapter_config", id="no-embedded-config"),
    pytest.param(
        delta_bytes(lora_tensors(), None, adapter_config="{r: 4}"),
        E,
        "adapter_config is not valid JSON",
        id="embedded-config-bad-json",
    ),
    # --- adapter_config values ----------------------------------------------------------
    pytest.param(config_case(r=0), E, "r must be a positive integer", id="r-zero"),
    pytest.param(config_case(r=-4), E, "r must be a positive integer", id="r-negative"),
    pytest.param(config_case(r=4.0), E, "r must be a positive integer", id="r-float"),
    pytest.param(config_case(r=True), E, "r must be a positive integer", id="r-bool"),
    pytest.param(config_case(lora_alpha=-8), E, "lora_alpha must be a positive", id="alpha-negative"),
    pytest.param(
        delta_bytes(lora_tensors(), None, adapter_config='{"r": 4, "lora_alpha": 1e400}'),
        E,
        "lora_alpha must be a positive finite",
        id="alpha-1e400",
    ),
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
    pytest.param(
        delta_bytes(lora_tensors(), None, adapter_config="[4]"), E, "must be a JSON object", id="config-not-object"
    ),
    # --- adapter directories ------------------------------------------------------------
    pytest.param(
        directory({"adapter_config.json": json.dumps(CFG).encode(), "adapter_model.bin": b"\x80\x04"}),
        E,
        "adapter_model.bin, a pickle",
        id="bin-adapter-dir",
    ),
    pytest.param(directory({"adapter_model.safetensors": GOOD}), E, "no adapter_config.json", id="dir-no-config"),
    pytest.param(
        directory({"adapter_config.json": b"{r: 4"}),
        E,
        "adapter_config.json is not valid JSON",
        id="dir-config-bad-json",
    ),
    pytest.param(
        directory({"adapter_config.json": b'{"r": 4, "r": 8}'}), E, "duplicate key 'r'", id="dir-config-duplicate"
    ),
    pytest.param(
        directory({"adapter_config.json": b'{"lora_alpha": NaN}'}),
        E,
        "NaN is not valid JSON",
        id="dir-config-alpha-nan",
    ),
    pytest.param(
        directory({"adapter_config.json": json.dumps(CFG).encode()}),
        E,
        "no adapter_model.safetensors",
        id="dir-no-weights",
    ),
    pytest.param(
        directory(
            {"adapter_config.json": json.dumps(CFG).encode(), "adapter_model.safetensors": pickle.dumps({"a": 1})}
        ),
        E,
        "pickle",
        id="dir-pickle-as-safetensors",
    ),
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
    with contextlib.suppress(InvalidAdapter):
        read_header(data, max_header_bytes=LIMIT)


HEADER_END = 8 + int.from_bytes(GOOD[:8], "little")
DIGITS = [i for i in range(8, HEADER_END) if GOOD[i : i + 1].isdigit()]


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_mutated_valid_file(data):
    buf = bytearray(GOOD)
    for _ in range(data.draw(st.integers(1, 3))):
        # digits (shapes, offsets, ranks) keep the JSON valid and reach the deeper checks
        pos = data.draw(
            st.sampled_from(DIGITS)
            | st.sampled_from(DIGITS)
            | st.integers(8, HEADER_END - 1)
            | st.integers(0, len(buf) - 1)
        )
        buf[pos] = data.draw(st.sampled_from(b"0123456789") | st.sampled_from(b'{}[]",:-.e ') | st.integers(0, 255))
    cut = data.draw(st.none() | st.none() | st.integers(0, len(buf)))
    with tempfile.TemporaryDirectory() as tmp:
        path = write(Path(tmp) / "d.safetensors", bytes(buf[:cut]))
        with contextlib.suppress(InvalidAdapter):
            validate_local(path, max_header_bytes=LIMIT)


# --- against the federation's declared model (issue 9) ------------------------------------------
#
# The worker's path: open (header only), check_delta (still header only), build_index (reads every
# tensor). Every file refused by check_delta below carries a NaN in its data: had any tensor been
# read before the check, the error would be the NaN one. Reads during check_delta are also counted.

HEAD = P + "lm_head.weight"
DECL = ModelDecl(modules={Q: (32, 32), V: (32, 32)})
WIDE_DECL = ModelDecl(modules={Q: (32, 32), V: (32, 32)} | {f"{P}extra.{i}.q_proj": (32, 32) for i in range(2000)})
DECL_HEAD = ModelDecl(modules={Q: (32, 32), V: (32, 32)}, extras={HEAD: (64, 32)})
MAX_PATTERNS = 1024
BIG_HEADER = 16 << 20  # lets the 100k-tensor header past the byte limit, to reach the tensor cap
SAVES = CFG | {"modules_to_save": ["lm_head"]}


def nan_tensors(modules=(Q, V), r=4, d_in=32, d_out=32, **extra) -> dict[str, torch.Tensor]:
    t = lora_tensors(modules=modules, r=r, d_in=d_in, d_out=d_out) | extra
    first = next(iter(t))
    t[first].view(-1)[0] = float("nan")
    return t


def many_tensors(n: int) -> bytes:
    header: dict = {"__metadata__": {"adapter_config": json.dumps(CFG)}}
    header |= {f"{P}m{i // 2}.lora_{'AB'[i % 2]}.weight": entry([1, 1], begin=4 * i) for i in range(n)}
    data = bytearray(4 * n)
    data[0:4] = b"\x00\x00\xc0\x7f"  # a float32 NaN
    return raw_file(header, bytes(data))


def patterns(n: int, *, key: str = "rank_pattern") -> bytes:
    # escaped layer paths that match no declared module, the way pattern_fit writes them
    return delta_bytes(nan_tensors(), CFG | {key: {rf"model\.layers\.{i}\.mlp\.gate_proj": 2 for i in range(n)}})


DECL_CASES = [
    pytest.param(
        lambda: many_tensors(100_000),
        DECL,
        LimitExceeded,
        "the delta has 100000 tensors; the federation's model needs at most 4",
        id="100k-tensor-header",
    ),
    pytest.param(
        lambda: patterns(2000),
        DECL,
        LimitExceeded,
        "rank_pattern has 2000 entries, over the limit of 64 (at most one per declared module, 2 here",
        id="2000-rank-pattern-keys",
    ),
    pytest.param(
        # counted before any is compiled: the invalid "(" among them would otherwise be the error
        lambda: delta_bytes(nan_tensors(), CFG | {"rank_pattern": {"(": 2} | {f"k{i}": 2 for i in range(100_000)}}),
        DECL,
        LimitExceeded,
        "rank_pattern has 100001 entries, over the limit of 64",
        id="100k-rank-pattern-keys-never-compiled",
    ),
    pytest.param(
        lambda: patterns(65),
        DECL,
        LimitExceeded,
        "rank_pattern has 65 entries, over the limit of 64",
        id="65-rank-pattern-keys-2-modules",
    ),
    pytest.param(
        lambda: patterns(1025, key="alpha_pattern"),
        WIDE_DECL,
        LimitExceeded,
        "alpha_pattern has 1025 entries, over the limit of 1024 (at most one per declared module, 2002 here",
        id="1025-alpha-pattern-keys-2002-modules",
    ),
    pytest.param(
        lambda: delta_bytes(nan_tensors(), CFG | {"target_modules": [f"t{i}" for i in range(2000)]}),
        DECL,
        LimitExceeded,
        "target_modules has 2000 entries, over the limit of 64",
        id="2000-target-modules",
    ),
    pytest.param(
        lambda: delta_bytes(nan_tensors(), CFG, junk="x" * 200_000),
        DECL,
        LimitExceeded,
        "need at most",
        id="header-padded-with-metadata",
    ),
    pytest.param(
        lambda: delta_bytes(
            nan_tensors(modules=(Q, P + "model.layers.0.self_attn.k_proj")),
            CFG | {"target_modules": ["q_proj", "k_proj"]},
        ),
        DECL,
        IncompatibleDelta,
        f"1 module(s) are not in the federation's declared model (2 modules): '{P}model.layers.0.self_attn.k_proj'",
        id="module-outside-declared-set",
    ),
    pytest.param(
        lambda: delta_bytes(nan_tensors(modules=(Q,), r=1, d_in=1, d_out=1), CFG | {"r": 1}),
        DECL,
        IncompatibleDelta,
        f"module '{Q}' is 1x1 (d_out x d_in) but the federation declares 32x32",
        id="1x1-q-proj",
    ),
    pytest.param(
        lambda: delta_bytes(nan_tensors(d_in=64, d_out=64), CFG),
        DECL,
        IncompatibleDelta,
        "is 64x64 (d_out x d_in) but the federation declares 32x32: an adapter for another base model?",
        id="other-base-model-shapes",
    ),
    pytest.param(
        lambda: delta_bytes(
            nan_tensors(modules=[P + "transformer.h.0.attn.c_attn"], d_out=96),
            CFG | {"target_modules": ["c_attn"], "fan_in_fan_out": True},
        ),
        DECL,
        IncompatibleDelta,
        "fan_in_fan_out=True but the federation's model has fan_in_fan_out=False",
        id="other-base-model-gpt2",
    ),
    pytest.param(
        lambda: delta_bytes(
            nan_tensors(modules=[P + "transformer.h.0.attn.c_attn"], d_out=96), CFG | {"target_modules": ["c_attn"]}
        ),
        DECL,
        IncompatibleDelta,
        "are not in the federation's declared model",
        id="other-base-model-names",
    ),
    pytest.param(
        lambda: delta_bytes(nan_tensors(d_out=16), CFG),
        ModelDecl(modules={Q: (16, 32), V: (32, 16)}),
        IncompatibleDelta,
        "(transposed: is fan_in_fan_out right?)",
        id="transposed-shape",
    ),
    pytest.param(
        lambda: delta_bytes(nan_tensors(modules=(Q,)) | {HEAD: torch.ones(64, 32)}, SAVES),
        DECL,
        IncompatibleDelta,
        f"extra tensor(s) '{HEAD}' are not declared by the federation",
        id="undeclared-extra",
    ),
    pytest.param(
        lambda: delta_bytes(nan_tensors(), SAVES),
        DECL_HEAD,
        IncompatibleDelta,
        f"the delta lacks the declared extra tensor(s) '{HEAD}'",
        id="missing-extra",
    ),
    pytest.param(
        lambda: delta_bytes(nan_tensors() | {HEAD: torch.ones(32, 32)}, SAVES),
        DECL_HEAD,
        IncompatibleDelta,
        f"extra '{HEAD}' has shape [32, 32] but the federation declares [64, 32]",
        id="extra-wrong-shape",
    ),
    pytest.param(
        lambda: delta_bytes(nan_tensors(r=32 + 1), CFG | {"r": 33}),
        DECL,
        LimitExceeded,
        "has rank 33, above min(d_out, d_in) = 32",
        id="rank-above-dims",
    ),
    pytest.param(
        lambda: delta_bytes(nan_tensors(), CFG | {"task_type": "SEQ_CLS"}),
        ModelDecl(modules=DECL.modules, task_type="causal-lm"),
        IncompatibleDelta,
        "task_type is 'SEQ_CLS'; the federation's is 'CAUSAL_LM'",
        id="other-task-type",
    ),
    pytest.param(
        lambda: delta_bytes(
            nan_tensors(modules=(Q, P + "bert." + Q.removeprefix(P))), CFG | {"target_modules": ["q_proj"]}
        ),
        DECL,
        IncompatibleDelta,
        "are both the declared",
        id="two-names-one-module",
    ),
    pytest.param(
        lambda: delta_bytes(nan_tensors(modules=(P + "bert." + Q.removeprefix(P), V)), CFG),
        DECL,
        IncompatibleDelta,
        "module names mix leading path components ['(none)', 'bert']",
        id="mixed-prefixes",
    ),
    pytest.param(
        lambda: delta_bytes(nan_tensors(), CFG | {"r": 8}),
        DECL,
        InvalidAdapter,
        "rank 4 in file but adapter_config says 8",
        id="rank-vs-config-after-declared-checks",
    ),
]


def holds_nan(path) -> bool:
    with safe_open(path, "pt") as f:
        return any(bool(torch.isnan(f.get_tensor(k)).any()) for k in f.keys())  # noqa: SIM118 (safe_open is not a dict)


@pytest.mark.parametrize("make, decl, cls, match", DECL_CASES)
def test_hostile_against_the_declared_model(make, decl, cls, match, tmp_path):
    path = write(tmp_path / "delta.safetensors", make())
    assert holds_nan(path)  # had the data been read first, the error would be the NaN one
    with DeltaFile.open(path, max_header_bytes=BIG_HEADER) as delta:
        before = bytes_read()
        with pytest.raises(InvalidAdapter) as info:
            check_delta(delta, decl, max_pattern_entries=MAX_PATTERNS)
        assert bytes_read() - before < 4096  # decided from the header already in memory
    assert type(info.value) is cls and match in str(info.value), str(info.value)[:500]
    assert len(str(info.value)) < 1000  # messages stay readable whatever the file holds


def test_2000_pattern_keys_fit_in_a_small_file():
    data = patterns(2000)
    assert 100_000 < len(data) < 140_000  # the 0.12 MB


def test_100k_tensors_are_over_the_default_header_limit(tmp_path):
    path = write(tmp_path / "delta.safetensors", many_tensors(100_000))
    with pytest.raises(TooLarge, match="over the 4194304-byte limit"):
        DeltaFile.open(path, max_header_bytes=DEFAULT_MAX_HEADER_BYTES)


@pytest.mark.parametrize(
    "make, match",
    [
        pytest.param(
            lambda: (
                lora_tensors()
                | {f"{Q}.lora_A.weight": torch.full((4, 32), 1e20), f"{Q}.lora_B.weight": torch.full((32, 4), 1e20)}
            ),
            f"module '{Q}': the update s*B@A is not finite in float32",
            id="factors-1e20",
        ),
    ],
)
def test_finite_factors_with_an_infinite_update(make, match, tmp_path):
    path = write(tmp_path / "delta.safetensors", delta_bytes(make(), CFG))
    with DeltaFile.open(path, max_header_bytes=LIMIT) as delta:
        check_delta(delta, DECL, max_pattern_entries=MAX_PATTERNS)  # well-formed, and it fits
        with pytest.raises(UpdateTooLarge) as info:
            build_index(delta)
    assert match in str(info.value)


def test_lora_alpha_1e300(tmp_path):
    path = write(tmp_path / "delta.safetensors", delta_bytes(lora_tensors(), CFG | {"lora_alpha": 1e300}))
    with DeltaFile.open(path, max_header_bytes=LIMIT) as delta:
        check_delta(delta, DECL, max_pattern_entries=MAX_PATTERNS)
        with pytest.raises(UpdateTooLarge, match=f"module '{Q}': scaling 2.5e\\+299 is beyond float32"):
            build_index(delta)


def test_honest_delta_passes_and_is_indexed(tmp_path):
    t = lora_tensors() | {HEAD: torch.ones(64, 32)}
    path = write(tmp_path / "delta.safetensors", delta_bytes(t, SAVES))
    with DeltaFile.open(path, max_header_bytes=LIMIT) as delta:
        check_delta(delta, DECL_HEAD, max_pattern_entries=MAX_PATTERNS)
        index = build_index(delta)
    assert list(index.modules) == [Q, V] and list(index.extras) == [HEAD]


def test_many_compiled_patterns_stay_cheap():
    """1,024 rank and alpha patterns over 200 modules: each pattern is compiled once per spec, not per match."""
    spec = LoraSpec(
        r=4,
        lora_alpha=8,
        rank_pattern={rf"model\.layers\.{i}\.mlp\.x_proj": 2 for i in range(1024)},
        alpha_pattern={rf"[a-z_.0-9]*zz{i}": 2 for i in range(1024)},
    )
    modules = [f"{P}model.layers.{i}.self_attn.q_proj" for i in range(200)]
    start = time.perf_counter()
    assert {spec.scaling(m, spec.rank_for(m)) for m in modules} == {2.0}
    # recompiling per match (the re cache holds 512) took ~25 s here; compiled once it is ~0.1 s
    assert time.perf_counter() - start < 5


def test_declared_corpus_is_large():
    assert len(DECL_CASES) >= 15 and len({c.id for c in DECL_CASES}) == len(DECL_CASES)


def test_the_tensor_cap_can_refuse_before_the_header_is_parsed(tmp_path):
    path = write(tmp_path / "delta.safetensors", many_tensors(30_000))  # under the 4 MiB header limit
    with pytest.raises(LimitExceeded, match="the header lists 30000 tensors, over the limit of 4 for this federation"):
        DeltaFile.open(path, max_header_bytes=DEFAULT_MAX_HEADER_BYTES, max_tensors=DECL.max_tensors)
    # the count is exact for what a real header holds: an honest file passes at its own size
    honest = write(tmp_path / "honest.safetensors", delta_bytes(lora_tensors(), CFG))
    with DeltaFile.open(honest, max_header_bytes=LIMIT, max_tensors=DECL.max_tensors) as delta:
        check_delta(delta, DECL, max_pattern_entries=MAX_PATTERNS)


def test_a_federation_rank_limit(tmp_path):
    path = write(tmp_path / "delta.safetensors", delta_bytes(lora_tensors(r=8), CFG | {"r": 8}))
    with DeltaFile.open(path, max_header_bytes=LIMIT) as delta:
        check_delta(delta, DECL, max_pattern_entries=MAX_PATTERNS, max_rank=8)
        with pytest.raises(LimitExceeded, match=f"module '{Q}' has rank 8, above the federation's limit of 4"):
            check_delta(delta, DECL, max_pattern_entries=MAX_PATTERNS, max_rank=4)
