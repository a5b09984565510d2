"""The client registry: names checked with a full match, the operator's weights, revocation."""

from __future__ import annotations

import threading

import pytest
import redis as redis_lib

from chorus_mq.errors import AuthError, ConfigError, Conflict, NotFound, StateCorrupt, UnknownFederation
from chorus_mq.ids import check_name
from chorus_mq.state import ClientInfo, ClientRegistry, FederationKeys

from .support import make_state, url_of


@pytest.fixture
def registry(any_redis):
    make_state(any_redis)
    return ClientRegistry(any_redis, "fed")


@pytest.mark.parametrize("name", ["alice\n", "alice\r", "a b", "", "..", "a..b", "-a", "a:b", "a*", "x" * 65, "ä"])
def test_bad_names_are_refused(registry, name):
    with pytest.raises(ConfigError):
        registry.add(name)
    with pytest.raises(ConfigError):
        check_name(name, "client id")
    assert registry.list() == []


def test_add_list_record_secret(registry):
    secret = registry.add("alice", weight=2.0)
    registry.add("bob", dataset_size=1000)
    assert len(secret) >= 40 and registry.secret("alice") == secret
    assert registry.secret("carol") is None
    alice = registry.record("alice")
    assert alice == ClientInfo("alice", alice.created_at, weight=2.0)
    assert [c.client_id for c in registry.list()] == ["alice", "bob"]
    assert registry.record("bob").dataset_size == 1000.0
    assert secret not in repr(registry.list())
    with pytest.raises(Conflict):
        registry.add("alice")
    with pytest.raises(NotFound):
        registry.record("carol")


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan"), True])
def test_weights_and_sizes_must_be_finite_and_positive(registry, bad):
    with pytest.raises(ConfigError):
        registry.add("alice", weight=bad)
    with pytest.raises(ConfigError):
        registry.add("alice", dataset_size=bad)
    registry.add("alice")
    with pytest.raises(ConfigError):
        registry.set("alice", weight=bad)
    assert registry.record("alice").weight is None


def test_set_changes_only_what_is_given(registry):
    registry.add("alice", weight=1.0, dataset_size=10.0)
    assert registry.set("alice", dataset_size=20.0) == ClientInfo(
        "alice", registry.record("alice").created_at, weight=1.0, dataset_size=20.0
    )
    registry.set("alice", weight=None)
    assert (registry.record("alice").weight, registry.record("alice").dataset_size) == (None, 20.0)
    with pytest.raises(NotFound):
        registry.set("carol", weight=1.0)


def test_revoke_keeps_the_record_and_refuses_the_secret(registry):
    registry.add("alice")
    registry.add("bob")
    first = registry.revoke("alice")
    assert first.revoked and first.revoked_at
    assert registry.revoke("alice").revoked_at == first.revoked_at  # twice: the first time stays
    with pytest.raises(AuthError):
        registry.secret("alice")
    assert registry.active() == ["bob"]
    assert [(c.client_id, c.revoked) for c in registry.list()] == [("alice", True), ("bob", False)]


def test_clients_need_a_federation(any_redis):
    with pytest.raises(UnknownFederation):
        ClientRegistry(any_redis, "nope").add("alice")


def test_a_corrupt_record_is_named(registry, any_redis):
    any_redis.hset(FederationKeys("fed").clients, "mallory", "not json")
    with pytest.raises(StateCorrupt, match="mallory"):
        registry.record("mallory")


def test_nonce_binds_once(registry):
    assert registry.claim_nonce("alice", "n1", "upload-1", 60) == "upload-1"
    assert registry.claim_nonce("alice", "n1", "upload-2", 60) == "upload-1"


@pytest.mark.services
def test_concurrent_updates_lose_nothing(real_redis):
    make_state(real_redis)
    ClientRegistry(real_redis, "fed").add("alice")

    def change(field, value):
        own = ClientRegistry(redis_lib.Redis.from_url(url_of(real_redis), decode_responses=True), "fed")
        for _ in range(20):
            own.set("alice", **{field: value})

    threads = [
        threading.Thread(target=change, args=("weight", 3.0)),
        threading.Thread(target=change, args=("dataset_size", 7.0)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    info = ClientRegistry(real_redis, "fed").record("alice")
    assert (info.weight, info.dataset_size) == (3.0, 7.0)
