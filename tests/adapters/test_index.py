"""The delta index: spans, digests, resolved scalings and norms; ranged reads that check every byte."""

import hashlib
import json
import math

import pytest
import torch

from chorus_mq.adapters import (
    DeltaFile,
    DeltaIndex,
    LocalAdapter,
    LoraSpec,
    TensorSpan,
    build_index,
    extra_from_bytes,
    fetch_ranges,
    module_from_bytes,
    slice_span,
    tensors_from_bytes,
    write_delta,
)
from chorus_mq.errors import ChecksumMismatch, InvalidAdapter, UpdateTooLarge
from chorus_mq.factors import MAX_CONDITIONING, conditioning, update_norm

from ._util import P, Q, V, delta_bytes, entry, lora_tensors, peft_config, raw_file, write

torch.set_num_threads(1)
LIMIT = 1 << 20
UP = P + "model.layers.0.mlp.up_proj"
HEAD = P + "lm_head.weight"
SPEC = LoraSpec(
    r=4,
    lora_alpha=8,
    target_modules=("q_proj", "up_proj", "v_proj"),
    modules_to_save=("lm_head",),
    rank_pattern={"up_proj": 2},
    alpha_pattern={"v_proj": 3},
)


def adapter():
    t = lora_tensors() | lora_tensors(modules=[UP], r=2, d_out=64, seed=1, dtype=torch.bfloat16)
    t[HEAD] = torch.randn(64, 32, generator=torch.Generator().manual_seed(2))
    return LocalAdapter(spec=SPEC, tensors=t)


@pytest.fixture
def delta_path(tmp_path):
    write_delta(adapter(), tmp_path / "d.safetensors")
    return tmp_path / "d.safetensors"


def read_span(path, span):
    with open(path, "rb") as f:
        f.seek(span.begin)
        return f.read(span.end - span.begin)


def test_index_records_spans_digests_scalings_and_norms(delta_path):
    data = delta_path.read_bytes()
    with DeltaFile.open(delta_path, max_header_bytes=LIMIT) as delta:
        index = build_index(delta)
        assert index.sha256 == hashlib.sha256(data).hexdigest() and index.size == len(data)
        assert list(index.modules) == [UP, Q, V] and list(index.extras) == [HEAD]
        for module, e in index.modules.items():
            A, B = delta.factors(module)
            raw_a, raw_b = read_span(delta_path, e.a), read_span(delta_path, e.b)
            assert hashlib.sha256(raw_a + raw_b).hexdigest() == e.sha256
            assert e.rank == A.shape[0] and e.scaling == SPEC.scaling(module, A.shape[0])
            dense = e.scaling * B.double() @ A.double()
            assert math.isclose(e.norm, float(torch.linalg.norm(dense)), rel_tol=1e-9)
            got_a, got_b = module_from_bytes(e, raw_a, raw_b)
            assert torch.equal(got_a, A) and torch.equal(got_b, B) and got_b.dtype == B.dtype
        assert index.modules[UP].scaling == 8 / 2 and index.modules[V].scaling == 3 / 4
        assert index.modules[UP].a.dtype == "BF16" and index.modules[Q].a.shape == (4, 32)
        raw = read_span(delta_path, index.extras[HEAD].span)
        assert torch.equal(extra_from_bytes(index.extras[HEAD], raw), delta.extra(HEAD))


def test_json_round_trip_is_exact_and_deterministic(delta_path):
    with DeltaFile.open(delta_path, max_header_bytes=LIMIT) as delta:
        index = build_index(delta)
    raw = index.to_json()
    back = DeltaIndex.from_json(raw)
    assert back == index and back.to_json() == raw
    with DeltaFile.open(delta_path, max_header_bytes=LIMIT) as delta:
        assert build_index(delta).to_json() == raw


def _doc(delta_path):
    with DeltaFile.open(delta_path, max_header_bytes=LIMIT) as delta:
        return json.loads(build_index(delta).to_json())


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda d: d.update(format="chorus-index/0"), "format is 'chorus-index/0'"),
        (lambda d: d.update(extra=1), "expected exactly the fields"),
        (lambda d: d.update(sha256="ABC"), "sha256 must be 64 lowercase hex"),
        (lambda d: d.update(size=-1), "size must be a non-negative integer"),
        (lambda d: d.update(size=True), "size must be a non-negative integer"),
        (lambda d: d["modules"][Q].update(rank=3), "are not a rank-3 pair"),
        (lambda d: d["modules"][Q].update(norm=-1.0), "norm must be a finite non-negative"),
        (lambda d: d["modules"][Q].update(scaling=0), "scaling must be a finite positive"),
        (lambda d: d["modules"][Q]["a"].update(end=d["modules"][Q]["a"]["end"] + 4), "does not hold a F32"),
        (lambda d: d["modules"][Q]["a"].update(dtype="I64"), "dtype 'I64' is not one of"),
        (lambda d: d["modules"][Q]["b"].update(begin=d["size"] + 8, end=d["size"] + 520), "inside"),
        (lambda d: d["extras"][HEAD].pop("sha256"), "expected exactly the fields"),
        (lambda d: d.update(modules=[]), "modules must be an object"),
        # the fields the parser checks without building a message first still get theirs
        (lambda d: d["modules"][Q]["a"].update(begin=-4), "module '[^']+' a begin must be a non-negative integer"),
        (lambda d: d["modules"][Q]["b"].update(end=1.5), "module '[^']+' b end must be a non-negative integer"),
        (lambda d: d["modules"][Q]["a"]["shape"].__setitem__(0, True), "a shape must be a non-negative integer"),
        (lambda d: d["modules"][Q]["b"]["shape"].__setitem__(1, -2), "b shape must be a non-negative integer"),
        (lambda d: d["modules"][Q].update(rank="4"), "rank must be a non-negative integer, got '4'"),
    ],
)
def test_from_json_is_strict(delta_path, edit, match):
    doc = _doc(delta_path)
    edit(doc)
    with pytest.raises(InvalidAdapter, match=match):
        DeltaIndex.from_json(json.dumps(doc).encode())
    with pytest.raises(InvalidAdapter, match="NaN is not valid JSON"):
        DeltaIndex.from_json(json.dumps(_doc(delta_path)).replace('"norm":', '"norm": NaN, "x":', 1))


def test_bytes_are_checked_before_tensors_are_built(delta_path):
    with DeltaFile.open(delta_path, max_header_bytes=LIMIT) as delta:
        index = build_index(delta)
    e = index.modules[Q]
    raw_a, raw_b = bytearray(read_span(delta_path, e.a)), read_span(delta_path, e.b)
    tampered = bytearray(raw_a)
    tampered[5] ^= 1
    with pytest.raises(ChecksumMismatch, match="indexed at ingest"):
        module_from_bytes(e, tampered, raw_b)
    with pytest.raises(InvalidAdapter, match="lora_B: got 8 bytes"):
        module_from_bytes(e, raw_a, raw_b[:8])
    with pytest.raises(ChecksumMismatch):
        extra_from_bytes(index.extras[HEAD], bytes(index.extras[HEAD].span.nbytes))
    # writable buffers are used in place; read-only bytes are copied, never aliased
    A, B = module_from_bytes(e, raw_a, raw_b)
    A.zero_()
    assert not any(raw_a) and raw_b == read_span(delta_path, e.b)
    B.zero_()
    assert raw_b == read_span(delta_path, e.b)


def test_tensors_from_bytes_checks_shape_and_dtype():
    span = TensorSpan(begin=100, end=124, dtype="F32", shape=(2, 3))
    t = tensors_from_bytes(span, torch.arange(6, dtype=torch.float32).numpy().tobytes())
    assert t.shape == (2, 3) and t[1, 2] == 5
    with pytest.raises(InvalidAdapter, match="got 20 bytes"):
        tensors_from_bytes(span, bytes(20))
    with pytest.raises(InvalidAdapter, match="not one of"):
        tensors_from_bytes(TensorSpan(0, 8, "I64", (1,)), bytes(8))
    assert tensors_from_bytes(TensorSpan(0, 0, "F16", (0, 4)), b"").shape == (0, 4)


def test_fetch_ranges_merge_adjacent_spans(delta_path):
    with DeltaFile.open(delta_path, max_header_bytes=LIMIT) as delta:
        index = build_index(delta)
    q, v = index.modules[Q], index.modules[V]
    assert q.a.end == q.b.begin and q.b.end == v.a.begin  # the layout write_delta produces
    assert fetch_ranges(index, [V, Q]) == [(q.a.begin, v.b.end)]
    up, head = index.modules[UP], index.extras[HEAD]
    ranges = fetch_ranges(index, [UP, Q, HEAD])
    # lm_head sorts right before Q's factors (one read); the bf16 UP sits after every fp32 tensor
    assert ranges == [(head.span.begin, q.b.end), (up.a.begin, up.b.end)]
    assert sum(e - b for b, e in ranges) == up.a.nbytes + up.b.nbytes + q.a.nbytes + q.b.nbytes + head.span.nbytes
    data = delta_path.read_bytes()
    blocks = [(b, data[b:e]) for b, e in ranges]
    got = module_from_bytes(up, slice_span(blocks, up.a), slice_span(blocks, up.b))
    assert got[0].dtype == torch.bfloat16 and got[0].shape == (2, 32)
    with pytest.raises(InvalidAdapter, match="were not fetched"):
        slice_span(blocks, v.a)
    with pytest.raises(InvalidAdapter, match="neither a module nor an extra"):
        fetch_ranges(index, [P + "nope"])


def test_a_file_in_another_order_indexes_the_same(tmp_path, delta_path):
    """A client may lay tensors out in any order: every A first, then every B."""
    t = lora_tensors()
    names = [f"{Q}.lora_A.weight", f"{V}.lora_A.weight", f"{Q}.lora_B.weight", f"{V}.lora_B.weight"]
    header, data, offset = {"__metadata__": {"adapter_config": json.dumps(peft_config())}}, b"", 0
    for name in names:
        raw = t[name].numpy().tobytes()
        header[name] = entry(list(t[name].shape), begin=offset)
        data, offset = data + raw, offset + len(raw)
    odd = write(tmp_path / "odd.safetensors", raw_file(header, data))
    plain = write(tmp_path / "plain.safetensors", delta_bytes(t, peft_config()))
    with DeltaFile.open(odd, max_header_bytes=LIMIT) as a, DeltaFile.open(plain, max_header_bytes=LIMIT) as b:
        ia, ib = build_index(a), build_index(b)
    assert ia.sha256 == hashlib.sha256(odd.read_bytes()).hexdigest()
    for m in (Q, V):
        assert (ia.modules[m].sha256, ia.modules[m].norm, ia.modules[m].scaling) == (
            ib.modules[m].sha256,
            ib.modules[m].norm,
            ib.modules[m].scaling,
        )
    assert fetch_ranges(ia, [Q]) == [
        (ia.modules[Q].a.begin, ia.modules[Q].a.end),
        (ia.modules[Q].b.begin, ia.modules[Q].b.end),
    ]


@pytest.mark.parametrize(
    "tensors, config, match",
    [
        (
            lora_tensors()
            | {f"{Q}.lora_A.weight": torch.full((4, 32), 1e20), f"{Q}.lora_B.weight": torch.full((32, 4), 1e20)},
            peft_config(),
            "not finite in float32",
        ),
        (lora_tensors(), peft_config(alpha=1e300), "scaling 2.5e\\+299 is beyond float32; lower lora_alpha"),
        (lora_tensors(), peft_config(alpha=1e38), "not finite in float32"),
        (
            lora_tensors(dtype=torch.float64)
            | {
                f"{Q}.lora_A.weight": torch.full((4, 32), 1e39, dtype=torch.float64),
                f"{Q}.lora_B.weight": torch.full((32, 4), 1e-50, dtype=torch.float64),
            },
            peft_config(),
            "beyond the float32 range",
        ),
        (
            lora_tensors(dtype=torch.float64)
            | {f"{Q}.lora_A.weight": torch.full((4, 32), 1e-200, dtype=torch.float64)},
            peft_config(alpha=1e100),
            "scaling 2.5e\\+99 is beyond float32",
        ),
    ],
)
def test_updates_float32_cannot_hold_are_refused(tmp_path, tensors, config, match):
    path = write(tmp_path / "d.safetensors", delta_bytes(tensors, config))
    with DeltaFile.open(path, max_header_bytes=LIMIT) as delta, pytest.raises(UpdateTooLarge, match=match):
        build_index(delta)


def test_non_finite_values_are_refused_while_indexing(tmp_path):
    t = lora_tensors()
    t[f"{V}.lora_B.weight"][3, 1] = float("nan")
    path = write(tmp_path / "d.safetensors", delta_bytes(t, peft_config()))
    with (
        DeltaFile.open(path, max_header_bytes=LIMIT) as delta,
        pytest.raises(InvalidAdapter, match=f"module '{V}' lora_B contains 1 NaN and 0 Inf"),
    ):
        build_index(delta)


# -- factor conditioning (issue 15 finding 1): cancelling factors are refused, honest ones never are ------------


def _kaiming_a(r: int, d_in: int, gen: torch.Generator) -> torch.Tensor:
    """PEFT's LoRA A init: Kaiming-uniform with a = sqrt(5), i.e. uniform(-1/sqrt(d_in), 1/sqrt(d_in))."""
    return (torch.rand(r, d_in, generator=gen) * 2 - 1) / math.sqrt(d_in)


def _trained(d_out: int, d_in: int, r: int, steps: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT init (B = 0) then SGD on both factors against a low-rank gradient of W, as training moves them."""
    gen = torch.Generator().manual_seed(seed)
    a, b = _kaiming_a(r, d_in, gen), torch.zeros(d_out, r)
    u, v = torch.randn(d_out, 32, generator=gen), torch.randn(32, d_in, generator=gen)  # G = u @ v
    lr = 1e-3 / math.sqrt(d_out * d_in)
    for _ in range(steps):
        b, a = b - lr * u @ (v @ a.mT), a - lr * (b.mT @ u) @ v
    return a, b


@pytest.mark.parametrize(
    ("d_out", "d_in", "r"),
    [(16, 12, 4), (64, 64, 16), (32, 8, 64), (768, 768, 8), (3072, 3072, 64), (8192, 3072, 64), (3072, 8192, 16)],
)
@pytest.mark.parametrize("steps", [0, 1, 50])
def test_honest_factors_are_far_below_the_conditioning_bound(d_out, d_in, r, steps):
    a, b = _trained(d_out, d_in, r, steps)
    kappa = conditioning(a, b, update_norm(a, b))
    # a fresh LoRA (B = 0) is exactly zero: nothing to cancel; trained factors sit near sqrt(r)
    assert kappa == 1.0 if steps == 0 else kappa < MAX_CONDITIONING / 1e4


def test_rebalanced_factors_keep_their_conditioning_and_are_indexed(tmp_path):
    t = lora_tensors()
    a, b = t[f"{Q}.lora_A.weight"], t[f"{Q}.lora_B.weight"]
    t[f"{Q}.lora_A.weight"], t[f"{Q}.lora_B.weight"] = a * 1e-18, b * 1e18  # kappa is scale invariant
    path = write(tmp_path / "d.safetensors", delta_bytes(t, peft_config()))
    with DeltaFile.open(path, max_header_bytes=LIMIT) as delta:
        index = build_index(delta)
    assert index.modules[Q].norm == pytest.approx(update_norm(a, b, 2.0), rel=1e-5)


def test_factors_that_cancel_each_other_are_refused(tmp_path):
    t = lora_tensors()
    gen = torch.Generator().manual_seed(3)
    b, a = torch.randn(32, 1, generator=gen) * 1e6, torch.randn(1, 32, generator=gen) * 1e6
    # B = [b, b, b, b'], A = [a; -a; a'; a''] with tiny a', a'': a product of norm ~1 out of factors of 1e12
    t[f"{Q}.lora_B.weight"] = torch.cat([b, b, torch.randn(32, 2, generator=gen)], 1)
    t[f"{Q}.lora_A.weight"] = torch.cat([a, -a, torch.randn(2, 32, generator=gen) * 1e-3], 0)
    path = write(tmp_path / "d.safetensors", delta_bytes(t, peft_config()))
    with (
        DeltaFile.open(path, max_header_bytes=LIMIT) as delta,
        pytest.raises(InvalidAdapter, match=f"module '{Q}': the factors cancel each other"),
    ):
        build_index(delta)
