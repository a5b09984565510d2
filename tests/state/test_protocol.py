"""The typed protocol: script replies, the federation config as a hash, and the stored records."""

from __future__ import annotations

import dataclasses
import json

import pytest

from chorus_mq.errors import ConfigError, StateCorrupt
from chorus_mq.names import (
    CloseReason,
    ExpirePolicy,
    MissingModules,
    RobustAggregate,
    RoundStatus,
    ScriptStatus,
    ServerOptimizer,
    SnapshotDtype,
    Strategy,
    TaskType,
    WeightPolicy,
)
from chorus_mq.state import DeltaRecord, FederationConfig, RoundInfo, SnapshotRecord
from chorus_mq.state.protocol import parse_reply

from .support import record, sha_of

#: a value for every field, off its default wherever validation allows (DP stays off: it excludes screening)
EVERY_FIELD = {
    "name": "fed",
    "base_model": "org/model",
    "quorum": 3,
    "strategy": Strategy.SVD,
    "min_quorum": 2,
    "round_timeout": 60,
    "expire_policy": ExpirePolicy.EXPIRE,
    "out_rank": 8,
    "clip_norm": 0.25,
    "screen_outliers": True,
    "outlier_z": 2.5,
    "robust_aggregate": RobustAggregate.TRIMMED,
    "trim": 1,
    "dp_noise_multiplier": 0.0,
    "dp_delta": 1e-6,
    "weights": WeightPolicy.REGISTERED,
    "max_client_weight": 0.3,
    "missing_modules": MissingModules.RENORMALISE,
    "max_update_norm": 123.456789,
    "relative_clip": 4.5,
    "clients_per_round": 5,
    "checkpoint_every": 0,
    "snapshot_dtype": SnapshotDtype.BFLOAT16,
    "task_type": TaskType.SEQ_CLS,
    "labels": ("neg", "pos", 'a,b "quoted"'),
    "fan_in_fan_out": True,
    "prox_mu": 0.01,
    "scaffold": True,
    "personal_heads": False,  # not with scaffold (below)
    "server_opt": ServerOptimizer.FEDADAM,
    "server_lr": 0.003,
    "server_momentum": 0.9,  # fedadam uses none: it must stay at its default
    "server_beta1": 0.8,
    "server_beta2": 0.95,
    "server_tau": 1e-4,
    # buffered settings apply to --mode buffered only (tests/state/test_buffered.py round-trips those)
    "mode": "sync",
    "max_staleness": 10,
    "staleness_weight": "poly:0.5",
    "max_per_client_per_flush": 1,
    # secure aggregation refuses screening and SCAFFOLD (set above); tests/secagg/test_wiring.py round-trips it on
    "secure_aggregation": False,
    "secagg_neighbours": 0,
    "secagg_threshold": 0,
    "secagg_phase_timeout": 300,
}


def test_every_config_field_round_trips_through_the_hash():
    assert set(EVERY_FIELD) == {f.name for f in dataclasses.fields(FederationConfig)}
    cfg = FederationConfig(**EVERY_FIELD)
    h = cfg.to_hash()
    assert all(isinstance(v, str) for v in h.values())
    assert (h["screen_outliers"], h["fan_in_fan_out"], h["task_type"], h["scaffold"]) == ("1", "1", "seq-cls", "1")
    back = FederationConfig.from_hash({**h, "current_round": "4", "latest_complete": "3"})
    assert back == cfg
    for f in dataclasses.fields(FederationConfig):
        assert type(getattr(back, f.name)) is type(getattr(cfg, f.name)), f.name
    assert FederationConfig.from_hash({**h, "screen_outliers": "0"}).screen_outliers is False
    # the one pair that excludes each other: the other side round-trips too
    heads = FederationConfig(**{**EVERY_FIELD, "scaffold": False, "personal_heads": True})
    assert FederationConfig.from_hash(heads.to_hash()) == heads
    with pytest.raises(ConfigError, match="do not combine"):
        FederationConfig(**{**EVERY_FIELD, "personal_heads": True})


def test_defaults_round_trip_and_missing_fields_take_defaults():
    cfg = FederationConfig(name="fed", base_model="m", quorum=1)
    assert FederationConfig.from_hash(cfg.to_hash()) == cfg
    assert (cfg.task_type, cfg.labels, cfg.weights, cfg.missing_modules) == (
        None,
        (),
        WeightPolicy.DATASET_SIZE,
        MissingModules.ZERO,
    )
    old = FederationConfig.from_hash({"name": "fed", "base_model": "m", "quorum": "2", "screen_outliers": "1"})
    assert (old.quorum, old.screen_outliers, old.max_update_norm) == (2, True, 1e4)


def test_enum_fields_accept_their_strings():
    cfg = FederationConfig(
        name="f", base_model="m", quorum=1, strategy="stack", weights="uniform", task_type="causal-lm"
    )
    assert (cfg.strategy, cfg.weights, cfg.task_type) == (Strategy.STACK, WeightPolicy.UNIFORM, TaskType.CAUSAL_LM)


@pytest.mark.parametrize(
    "bad",
    [
        {"quorum": 0},
        {"quorum": 2, "min_quorum": 3},
        {"quorum": 1, "strategy": "mean"},
        {"quorum": 1, "name": "../x"},
        {"quorum": 1, "name": "fed\n"},
        {"quorum": 1, "weights": "claimed"},
        {"quorum": 1, "missing_modules": "drop"},
        {"quorum": 1, "max_client_weight": 0.0},
        {"quorum": 1, "max_client_weight": 1.5},
        {"quorum": 1, "max_update_norm": 0.0},
        {"quorum": 1, "max_update_norm": float("inf")},
        {"quorum": 1, "max_update_norm": float("nan")},
        {"quorum": 1, "relative_clip": 0.5},
        {"quorum": 1, "clients_per_round": -1},
        {"quorum": 4, "clients_per_round": 3},
        {"quorum": 1, "checkpoint_every": -1},
        {"quorum": 1, "snapshot_dtype": "fp16"},
        {"quorum": 1, "task_type": "translation"},
        {"quorum": 1, "labels": ("a", "a")},
        {"quorum": 1, "labels": ("",)},
        {"quorum": 1, "clip_norm": float("inf")},
        {"quorum": 1, "trim": 1},
        {"quorum": 1, "dp_noise_multiplier": 1.0},
        {"quorum": 1, "dp_noise_multiplier": 1.0, "clip_norm": 1.0, "dp_delta": 1.0},
    ],
)
def test_config_validation(bad):
    kw = {"name": "fed", "base_model": "m"} | bad
    with pytest.raises(ConfigError):
        FederationConfig(**kw)


def test_a_corrupt_stored_config_is_state_corrupt():
    with pytest.raises(StateCorrupt, match="quorum"):
        FederationConfig.from_hash({"name": "fed", "base_model": "m", "quorum": "three"})
    with pytest.raises(StateCorrupt, match="screen_outliers"):
        FederationConfig.from_hash({"name": "fed", "base_model": "m", "quorum": "1", "screen_outliers": "maybe"})


def test_replies_are_parsed_once_into_typed_replies():
    reply = parse_reply("register_delta", ["fired", 3, 1, ""])
    assert (reply.status, reply.n, reply.epoch, reply.detail) == (ScriptStatus.FIRED, 3, 1, "")
    assert reply.status == "fired"  # a str enum
    assert parse_reply("x", [b"ok", 0, 0, b"1-0"]).detail == "1-0"
    for bad in (None, ["fired", 3, 1], ["fired", "3", 1, ""], ["sideways", 0, 0, ""], [1, 0, 0, ""]):
        with pytest.raises(StateCorrupt):
            parse_reply("x", bad)
    with pytest.raises(StateCorrupt, match="nothing was changed"):
        parse_reply("finalize", ["wrong_type", 0, 0, "chorus:{f}:leases is a string, not a zset"])


def test_round_info_types_every_field():
    h = {
        "state": "aggregating",
        "epoch": "2",
        "n": "3",
        "quorum": "3",
        "min_quorum": "0",
        "opened_at": "1000",
        "deadline": "1060.5",
        "selected": '["a", "b", "c"]',
        "closed_by": "deadline",
        "agg_started": "1061",
        "lease_until": "1161",
        "shards": "4",
        "extensions": "1",
        "reclaims": "1",
        "lease_extensions": "2",
        "sha:a": "1" * 64,
        "sha:b": "2" * 64,
        "evicted:z": "3" * 64,
    }
    info = RoundInfo.from_hash(5, h)
    assert info == RoundInfo(
        round=5,
        state=RoundStatus.AGGREGATING,
        epoch=2,
        n=3,
        quorum=3,
        opened_at=1000.0,
        deadline=1060.5,
        selected=("a", "b", "c"),
        closed_by=CloseReason.DEADLINE,
        agg_started=1061.0,
        lease_until=1161.0,
        shards=4,
        extensions=1,
        reclaims=1,
        lease_extensions=2,
        shas={"a": "1" * 64, "b": "2" * 64},
        evicted={"z": "3" * 64},
    )
    assert info.effective_min_quorum == 3 and not info.ended and info.clients == ["a", "b"]
    with pytest.raises(StateCorrupt):
        RoundInfo.from_hash(5, {"state": "sideways"})
    with pytest.raises(StateCorrupt):
        RoundInfo.from_hash(5, {"n": "1"})


def test_delta_record_round_trips_as_the_contract_json():
    rec = dataclasses.replace(
        record("alice", dataset_size=1000.0), ranks=(4, 8), rank=None, dp={"epsilon": 2.0}, lr_sum=0.25
    )
    body = json.loads(rec.to_json())
    assert set(body) == {
        "client_id",
        "sha256",
        "size",
        "dataset_size",
        "upload_id",
        "ts",
        "key",
        "index_key",
        "index_sha256",
        "modules",
        "present",
        "rank",
        "ranks",
        "bytes",
        "max_norm",
        "dp",
        "lr_sum",
        "label_counts",
        "global_eval",
        "base_version",
    }
    assert body["ranks"] == [4, 8] and body["dp"] == {"epsilon": 2.0} and body["lr_sum"] == 0.25
    assert DeltaRecord.from_json(rec.to_json()) == rec
    assert DeltaRecord.from_json(rec.to_json().encode()) == rec
    versioned = dataclasses.replace(rec, base_version=3)
    assert DeltaRecord.from_json(versioned.to_json()).base_version == 3
    for bad in (-1, True, 1.5):
        with pytest.raises(ConfigError, match="base version"):
            dataclasses.replace(rec, base_version=bad)


@pytest.mark.parametrize(
    "change",
    [
        {"client_id": "a\n"},
        {"sha256": "x" * 64},
        {"dataset_size": float("inf")},
        {"dataset_size": 0.0},
        {"lr_sum": 0.0},
        {"lr_sum": float("nan")},
        {"size": -1},
        {"present": "xyz"},
        {"upload_id": ""},
    ],
)
def test_delta_record_validation(change):
    with pytest.raises(ConfigError):
        dataclasses.replace(record("alice"), **change)


def test_malformed_stored_records_are_state_corrupt():
    for raw in ("not json", "[]", '{"client_id": "a"}', json.dumps({**json.loads(record("a").to_json()), "x": 1})):
        with pytest.raises(StateCorrupt):
            DeltaRecord.from_json(raw)
    with pytest.raises(StateCorrupt):
        SnapshotRecord.from_json('{"round": 1}')


def test_snapshot_record_round_trips():
    snap = SnapshotRecord(
        round=10, key="k", sha256=sha_of("s"), size=5, dtype="bfloat16", base=5, rounds=5, created_at=1.5, seconds=2.0
    )
    assert snap.dtype is SnapshotDtype.BFLOAT16
    assert SnapshotRecord.from_json(snap.to_json()) == snap
    with pytest.raises(ConfigError):
        SnapshotRecord(round=1, key="k", sha256=sha_of("s"), size=5, dtype="float16")
    with pytest.raises(ConfigError):
        SnapshotRecord(round=10, key="k", sha256=sha_of("s"), size=5, base=10)
