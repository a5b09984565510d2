"""The pieces that wire secure aggregation into rounds: the config's refusals, the masked vector's layout, the
published round parameters, the masked-input object, and the fenced fire of a secure round."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from chorus_mq.errors import ConfigError, PeerMisbehaved
from chorus_mq.layout import masked_input_key
from chorus_mq.names import Factor
from chorus_mq.secagg.public import RoundPublic, graph_seed
from chorus_mq.secagg.stored import masked_bytes, parse_masked
from chorus_mq.secagg.vector import MaskedLayout
from chorus_mq.state import FederationConfig


def _cfg(**kw):
    base = {"name": "fed", "base_model": "m", "quorum": 3, "strategy": "ffa-lora", "relative_clip": 0.0}
    return FederationConfig(**{**base, "secure_aggregation": True, **kw})


def test_secure_config_round_trips_and_keeps_k_t_timeout():
    cfg = _cfg(secagg_neighbours=4, secagg_threshold=3, secagg_phase_timeout=30)
    again = FederationConfig.from_hash(cfg.to_hash())
    assert again == cfg and again.secure_aggregation and (again.secagg_neighbours, again.secagg_threshold) == (4, 3)
    assert _cfg(strategy="rolora").secure_aggregation and _cfg(strategy="fed-sb").secure_aggregation


@pytest.mark.parametrize("strategy", ["fedex-lora", "fedavg", "svd", "stack"])
def test_non_linear_strategies_are_refused(strategy):
    with pytest.raises(ConfigError, match=f"linear strategy \\(ffa-lora, rolora, fed-sb\\): {strategy} needs each"):
        _cfg(strategy=strategy)


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"screen_outliers": True}, "--screen-outliers / --robust-aggregate"),
        ({"robust_aggregate": "geomedian"}, "--robust-aggregate"),
        ({"relative_clip": 10.0}, "pass --relative-clip 0"),
        ({"mode": "buffered", "quorum": 3, "min_quorum": 1}, "--mode buffered"),
    ],
)
def test_what_needs_updates_in_the_clear_is_refused(options, says):
    with pytest.raises(ConfigError) as err:
        _cfg(**options)
    assert says in str(err.value)


def test_dp_with_secure_aggregation_clips_on_the_clients_and_needs_a_clip_norm():
    cfg = _cfg(clip_norm=0.5, dp_noise_multiplier=1.1)
    assert cfg.secure_aggregation and cfg.dp_noise_multiplier == 1.1
    with pytest.raises(ConfigError, match="needs --clip-norm"):
        _cfg(dp_noise_multiplier=1.1)
    # without secure aggregation the workers clip and noise instead (aggregation/dp_linear.py)
    FederationConfig(name="fed", base_model="m", quorum=3, strategy="ffa-lora", clip_norm=0.5, dp_noise_multiplier=1.1)
    layout = MaskedLayout((("x.lora_B.weight", (2, 2)),))
    pub = RoundPublic(
        ("a", "b", "c"), 2, 2, b"s" * 32, {"a": 0.5, "b": 0.25, "c": 0.25}, Factor.LORA_B, layout, 0, 0.5, 2.0
    )
    x = pub.client_input("a", np.array([3.0, 4.0, 0.0, 0.0]))  # norm 5, clipped to 0.5, times 0.5
    np.testing.assert_allclose(x, [0.15, 0.2, 0.0, 0.0], rtol=1e-6)
    assert pub.sigma() == pytest.approx(2.0 * 0.5 * 0.5)  # z * C * max w
    assert RoundPublic.from_dict(pub.to_dict()) == pub


def test_secagg_settings_need_secure_aggregation_and_a_threshold_above_half():
    with pytest.raises(ConfigError, match="--secagg-neighbours applies only with --secure-aggregation"):
        FederationConfig(name="fed", base_model="m", quorum=3, secagg_neighbours=4)
    with pytest.raises(ConfigError, match="above K/2"):
        _cfg(secagg_neighbours=4, secagg_threshold=2)
    with pytest.raises(ConfigError, match="at least 1 second"):
        _cfg(secagg_phase_timeout=0)


def test_layout_orders_modules_then_head_and_round_trips():
    modules = {"m.b": ((2, 5), (3, 2)), "m.a": ((2, 4), (6, 2))}
    layout = MaskedLayout.for_round(modules, {"head.weight": (3, 4)}, Factor.LORA_B)
    assert [k for k, _ in layout.entries] == ["m.a.lora_B.weight", "m.b.lora_B.weight", "head.weight"]
    assert layout.length == 12 + 6 + 12
    only_a = MaskedLayout.for_round(modules, {}, Factor.LORA_A)
    assert only_a.entries == (("m.a.lora_A.weight", (2, 4)), ("m.b.lora_A.weight", (2, 5)))
    # fed-sb: each module's r x r R (r: A's rows), never the frame's B or A
    only_r = MaskedLayout.for_round(modules, {"head.weight": (3, 4)}, Factor.LORA_R)
    assert only_r.entries == (("m.a.lora_R.weight", (2, 2)), ("m.b.lora_R.weight", (2, 2)), ("head.weight", (3, 4)))
    assert only_r.length == 4 + 4 + 12
    g = torch.Generator().manual_seed(0)
    tensors = {k: torch.randn(s, generator=g) for k, s in layout.entries}
    back = layout.unflatten(layout.flatten(tensors))
    assert all(np.array_equal(back[k], tensors[k].double().numpy()) for k in tensors)
    assert MaskedLayout.from_list(layout.to_list()) == layout
    with pytest.raises(ConfigError, match="shape"):
        layout.flatten({**tensors, "m.a.lora_B.weight": torch.zeros(4, 2)})
    with pytest.raises(ConfigError, match="does not hold"):
        layout.flatten({k: v for k, v in tensors.items() if k != "head.weight"})


def test_round_public_gives_every_party_the_same_params():
    cohort = ("a", "b", "c", "d")
    layout = MaskedLayout((("x.lora_B.weight", (4, 2)),))
    pub = RoundPublic(cohort, 3, 2, graph_seed("fed", 2, cohort), dict.fromkeys(cohort, 0.25), Factor.LORA_B, layout, 1)
    again = RoundPublic.from_dict(pub.to_dict())
    assert again == pub and again.params("fed", 2) == pub.params("fed", 2)
    assert again.params("fed", 2).length == 8
    assert graph_seed("fed", 2, cohort) != graph_seed("fed", 3, cohort)
    with pytest.raises(ConfigError, match="malformed"):
        RoundPublic.from_dict({**pub.to_dict(), "trainable": "lora_C"})


def test_masked_input_objects_are_checked_whole():
    v = np.arange(10, dtype=np.uint64)
    raw = masked_bytes(v)
    sha = hashlib.sha256(raw).hexdigest()
    assert np.array_equal(parse_masked("c", raw, sha, 10), v)
    with pytest.raises(PeerMisbehaved, match="sha256"):
        parse_masked("c", raw, "0" * 64, 10)
    with pytest.raises(PeerMisbehaved, match="uint64 of 11"):
        parse_masked("c", raw, sha, 11)
    from safetensors.numpy import save

    wrong = save({"masked": np.zeros(10, dtype=np.int64)})
    with pytest.raises(PeerMisbehaved, match="uint64"):
        parse_masked("c", wrong, hashlib.sha256(wrong).hexdigest(), 10)
    junk = b"\x00" * 20
    with pytest.raises(PeerMisbehaved, match="not safetensors"):
        parse_masked("c", junk, hashlib.sha256(junk).hexdigest(), 10)
    assert masked_input_key("fed", "c", 3, sha) == f"fed/deltas/c/secagg-000003-{sha}.safetensors"


def test_a_slice_of_a_masked_input_is_read_by_range_from_its_checked_header():
    from chorus_mq.errors import SecAggError
    from chorus_mq.secagg.stored import data_begin

    v = np.arange(1000, 1010, dtype=np.uint64)
    raw = masked_bytes(v)
    n = int.from_bytes(raw[:8], "little")
    begin = data_begin(raw[: 8 + n], 10)
    assert np.array_equal(np.frombuffer(raw[begin + 3 * 8 : begin + 7 * 8], dtype=np.uint64), v[3:7])
    with pytest.raises(SecAggError, match="uint64 of 11"):
        data_begin(raw[: 8 + n], 11)
    with pytest.raises(SecAggError, match="length field"):
        data_begin(raw[: 8 + n - 1], 10)
    from safetensors.numpy import save

    wrong = save({"masked": np.zeros(10, dtype=np.int64)})
    m = int.from_bytes(wrong[:8], "little")
    with pytest.raises(SecAggError, match="uint64"):
        data_begin(wrong[: 8 + m], 10)


def test_layout_spans_tile_the_vector_in_order():
    layout = MaskedLayout.for_round({"m1": ((2, 5), (3, 2)), "m0": ((2, 4), (6, 2))}, {"head": (3,)}, Factor.LORA_B)
    spans = layout.spans()
    assert list(spans) == ["m0.lora_B.weight", "m1.lora_B.weight", "head"]
    assert list(spans.values()) == [(0, 12), (12, 18), (18, 21)] and layout.length == 21
    v = np.arange(21.0)
    for key, value in layout.unflatten(v).items():
        lo, hi = spans[key]
        assert np.array_equal(value.reshape(-1), v[lo:hi])


def test_only_records_of_kind_secagg_take_the_secure_path():
    from chorus_mq.workers.secure import is_secagg

    assert is_secagg('{"kind": "secagg", "v": 1}')
    assert not is_secagg('{"label_counts": {"kind": 1}, "note": "secagg"}')  # the word alone is not the kind
    assert not is_secagg('{"kind": "secagg"')  # junk: the delta path drops it as malformed
    assert not is_secagg('["kind", "secagg"]')
