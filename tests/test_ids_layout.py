"""Names users choose end up in keys and paths: full-match validation, and the object layout built on it."""

from __future__ import annotations

import pytest

from chorus_mq import layout
from chorus_mq.errors import ConfigError
from chorus_mq.ids import check_name

SHA = "0123456789abcdef" * 4


@pytest.mark.parametrize("good", ["a", "hospital-a", "Bank_2", "x.y", "a" * 64, "9lives"])
def test_safe_names_pass(good):
    assert check_name(good, "client id") == good


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "-a",
        ".a",
        "a..b",
        "a/b",
        "a\\b",
        "alice\n",
        "alice\r",
        "a b",
        "a" * 65,
        "a\x00",
        "ünïcode",
        "a:b",
        "a*",
        "a{b}",
    ],
)
def test_unsafe_names_are_refused_with_the_rule(bad):
    with pytest.raises(ConfigError, match="letters, digits"):
        check_name(bad, "client id")


def test_every_key_is_under_its_federation_and_clients_write_only_their_prefix():
    assert layout.delta_key("fed", "alice", SHA) == f"fed/deltas/alice/{SHA}.safetensors"
    assert layout.delta_key("fed", "alice", SHA).startswith(layout.client_prefix("fed", "alice"))
    worker_written = [
        layout.accepted_key("fed", "alice", SHA),
        layout.index_key("fed", "alice", SHA),
        layout.manifest_key("fed", 3),
        layout.shard_key("fed", 3, 1, "adapter", SHA),
        layout.snapshot_key("fed", 10, SHA),
    ]
    for key in worker_written:
        assert key.startswith(layout.federation_prefix("fed"))
        assert not key.startswith(layout.client_prefix("fed", "alice"))
    assert layout.manifest_key("fed", 3).startswith(layout.rounds_prefix("fed"))
    assert layout.snapshot_key("fed", 10, SHA).startswith(layout.snapshots_prefix("fed"))
    residual = layout.shard_key("fed", 3, 1, "residual", SHA)
    assert residual == f"fed/rounds/000003/shard-001-residual-{SHA[:16]}.safetensors"


@pytest.mark.parametrize(
    "call",
    [
        lambda: layout.delta_key("../x", "alice", SHA),
        lambda: layout.delta_key("fed", "a/b", SHA),
        lambda: layout.accepted_key("fed", "alice\n", SHA),
    ],
)
def test_bad_names_never_reach_a_key(call):
    with pytest.raises(ConfigError):
        call()


@pytest.mark.parametrize("sha", ["", "AB" * 32, "g" * 64, SHA[:-1]])
def test_bad_hashes_never_reach_a_key(sha):
    with pytest.raises(ValueError, match="64 lowercase hex"):
        layout.delta_key("fed", "alice", sha)
    with pytest.raises(ValueError):
        layout.shard_key("fed", 1, 0, "adapter", sha)


def test_shard_parts_are_named():
    with pytest.raises(ValueError, match="adapter, residual, variate, opt-state"):
        layout.shard_key("fed", 1, 0, "manifest", SHA)
    assert layout.shard_key("fed", 1, 0, "opt-state", SHA).endswith(f"shard-000-opt-state-{SHA[:16]}.safetensors")
    key = layout.shard_key("fed", 1, 0, "variate", SHA)
    assert key == f"fed/rounds/000001/shard-000-variate-{SHA[:16]}.safetensors"
