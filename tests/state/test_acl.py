"""Redis users on a real redis-server loaded with deploy/redis/users.acl: each client user may append to
its own inbox and read its own federation's public state, and nothing else; revoke takes it away; sync
brings users back after a restart that lost them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import redis as redis_lib

from chorus_mq.state import (
    Acl,
    ClientRegistry,
    EventLog,
    FederationConfig,
    FederationKeys,
    Inbox,
    RoundState,
    SnapshotRecord,
    client_url,
    client_username,
)
from chorus_mq.state.functions import InboxLimits, load_functions, loaded
from chorus_mq.state.redis_keys import CLIENT_USER_PREFIX

from ..services import REDIS_CONF, RedisServer
from .support import Decl, make_state, record, sha_of

pytestmark = pytest.mark.services

ACL_FILE = Path(__file__).resolve().parents[2] / "deploy" / "redis" / "users.acl"
PASSWORDS = {"worker": "worker-dev-password", "operator": "operator-dev-password", "health": "health-dev-password"}
NoPermission = redis_lib.exceptions.NoPermissionError
K, OTHER = FederationKeys("fed"), FederationKeys("other")


@pytest.fixture
def acl_server(tmp_path):
    """A redis-server started with the shipped redis.conf and a copy of users.acl (so ACL SAVE may write it), as
    the operator."""
    acl = tmp_path / "users.acl"
    shutil.copy(ACL_FILE, acl)
    server = RedisServer(
        tmp_path / "redis",
        args=("--aclfile", str(acl)),
        username="operator",
        password=PASSWORDS["operator"],
        config=REDIS_CONF,
    ).start()
    yield server
    server.stop()


def _as(server: RedisServer, user: str, password: str, **kw) -> redis_lib.Redis:
    return redis_lib.Redis(port=server.port, username=user, password=password, decode_responses=True, **kw)


def _federations(server):
    """Two federations with a complete round, a plan, shards and a snapshot; alice is a client of ``fed``."""
    op = server.client()
    for name in ("fed", "other"):
        state = make_state(op, name=name, quorum=1)
        fired = state.register(name, 1, record("alice"))
        state.set_plan(name, 1, '{"clients": ["alice"]}')
        state.shard_done(name, 1, 0, 1, "{}", epoch=fired.epoch)
        state.finalize(name, 1, fired.epoch, f"{name}/rounds/000001/manifest.json", sha_of("m"))
        state.add_snapshot(name, SnapshotRecord(round=1, key="k", sha256=sha_of("s"), size=1))
        ClientRegistry(op, name).claim_nonce("alice", "nonce-1", "u", 60)
    secret = ClientRegistry(op, "fed").add("alice")
    ClientRegistry(op, "other").add("bob")
    Acl(op).grant("fed", "alice", secret)
    load_functions(op, InboxLimits())  # as a worker does at startup
    return op, secret


def test_the_shipped_users(acl_server):
    with pytest.raises(redis_lib.exceptions.AuthenticationError):  # default is off: every connection names a user
        redis_lib.Redis(port=acl_server.port).get("x")
    for password in ("", "nopass", "default"):
        with pytest.raises(redis_lib.exceptions.AuthenticationError):
            redis_lib.Redis(port=acl_server.port, username="default", password=password).ping()
    health = _as(acl_server, "health", PASSWORDS["health"])
    assert health.ping()
    with pytest.raises(NoPermission):
        health.get("x")
    worker = _as(acl_server, "worker", PASSWORDS["worker"])
    worker.hset("chorus:{fed}:meta", "quorum", 1)
    worker.lpush("chorus.ingest", "{}")
    for forbidden in (
        lambda: worker.execute_command("ACL", "SETUSER", "x", "on"),
        worker.flushall,
        lambda: worker.config_get("maxmemory"),
        lambda: worker.keys("*"),
    ):
        with pytest.raises(NoPermission):
            forbidden()
    operator = acl_server.client()
    assert operator.execute_command("ACL", "WHOAMI") == "operator"
    operator.execute_command("ACL", "SETUSER", "scratch", "on", ">pw")
    assert operator.execute_command("ACL", "GETUSER", "scratch")
    assert operator.execute_command("ACL", "DELUSER", "scratch") == 1
    assert Acl(operator).save() is True
    for forbidden in (operator.flushall, lambda: operator.config_get("maxmemory")):
        with pytest.raises(NoPermission):
            forbidden()
    assert "client" not in [line.split()[1] for line in operator.execute_command("ACL", "LIST")]


def test_script_effects_survive_a_restart(acl_server):
    """Redis replays the AOF as ``default`` and re-checks each script's MULTI/EXEC against it (redis#14541):
    a ``default`` user without permissions would silently drop every round transition on restart."""
    op = acl_server.client()
    state = make_state(op, quorum=1)
    fired = state.register("fed", 1, record("alice"))
    state.finalize("fed", 1, fired.epoch, "k", sha_of("m"))
    load_functions(op, InboxLimits())
    acl_server.restart(sig_kill=True)
    assert loaded(acl_server.client())  # the append function is in the AOF too: clients can append at once
    state = RoundState(acl_server.client())
    assert [(r.round, r.state) for r in state.rounds("fed")] == [(1, "complete"), (2, "open")]
    assert sorted(state.deltas("fed", 1)) == ["alice"]
    assert len(EventLog(acl_server.client(), "fed").read()) == 6


def test_a_client_user_can_do_what_it_needs(acl_server):
    _op, secret = _federations(acl_server)
    url = client_url(f"redis://worker:leaked@127.0.0.1:{acl_server.port}/0", "fed", "alice", secret)
    assert "worker" not in url and "client%3Afed%3Aalice:" in url
    for protocol in (2, 3):  # redis-py's handshake: AUTH or HELLO 3 AUTH, CLIENT SETINFO (ignored), SETNAME
        alice = redis_lib.Redis.from_url(url, decode_responses=True, protocol=protocol, client_name="alice")
        assert alice.ping()
        state = RoundState(alice)
        assert state.config("fed").quorum == 1
        assert state.round("fed", 1).state == "complete"
        assert [r.round for r in state.rounds("fed")] == [1, 2]
        assert sorted(state.deltas("fed", 1)) == ["alice"]
        assert state.plan("fed", 1) == '{"clients": ["alice"]}'
        assert state.shards("fed", 1) == {0: "{}"}
        assert list(state.snapshots("fed")) == [1]
        log = EventLog(alice, "fed")
        assert log.read()[0].type == "federation_created" and log.last_id() != "0-0"
        assert Inbox(alice, "fed", "alice").append('{"signed": "record"}')  # its own inbox
        alice.close()
    assert Inbox(acl_server.client(), "fed", "alice").length() == 2


def test_a_client_user_is_woken_by_its_live_channel_only(acl_server):
    _op, secret = _federations(acl_server)
    alice = redis_lib.Redis.from_url(client_url(acl_server.url, "fed", "alice", secret), decode_responses=True)
    pubsub = alice.pubsub()
    pubsub.subscribe(K.channel)
    assert pubsub.get_message(timeout=2)["type"] == "subscribe"
    EventLog(acl_server.client(), "fed").emit("round_opened", 2)
    message = pubsub.get_message(timeout=2)
    assert message and '"round_opened"' in message["data"]
    for channel in (OTHER.channel, "chorus.aggregate"):
        other = alice.pubsub()
        with pytest.raises(NoPermission):
            other.subscribe(channel)
            other.get_message(timeout=2)
    with pytest.raises(NoPermission):
        patterns = alice.pubsub()
        patterns.psubscribe("chorus:*")
        patterns.get_message(timeout=2)


def test_a_client_user_can_do_nothing_else(acl_server):
    op, secret = _federations(acl_server)
    alice = redis_lib.Redis.from_url(client_url(acl_server.url, "fed", "alice", secret), decode_responses=True)
    before = {key: op.type(key) for key in op.scan_iter()}
    attempts = {
        "xadd another federation's inbox": lambda: Inbox(alice, "other", "alice").append("{}"),
        "xadd another client's inbox": lambda: Inbox(alice, "fed", "bob").append("{}"),
        "xadd the federation-wide inbox": lambda: Inbox(alice, "fed").append("{}"),
        "xadd its own events": lambda: alice.xadd(K.events, {"data": "{}"}),
        "lpush the ingest queue": lambda: alice.lpush("chorus.ingest", "{}"),
        "lpush the aggregate queue": lambda: alice.lpush("chorus.aggregate", "{}"),
        "xadd a queue name": lambda: alice.xadd("chorus.ingest", {"m": "{}"}),
        "read the registry": lambda: alice.hgetall(K.clients),
        "read its own secret": lambda: alice.hget(K.clients, "alice"),
        "read server secrets": lambda: alice.hgetall(K.secrets),
        "read a nonce": lambda: alice.get(K.nonce("alice", "nonce-1")),
        "read its inbox": lambda: alice.xrange(K.client_inbox("alice")),
        "read its inbox as a group": lambda: alice.xreadgroup("chorus-ingest", "x", {K.client_inbox("alice"): ">"}),
        "trim its inbox": lambda: alice.xtrim(K.client_inbox("alice"), maxlen=0),
        "delete inbox entries": lambda: alice.xdel(K.client_inbox("alice"), "0-1"),
        "read another client's inbox": lambda: alice.xrange(K.client_inbox("bob")),
        "read another federation": lambda: alice.hgetall(OTHER.meta),
        "read another federation's rounds": lambda: alice.hgetall(OTHER.deltas(1)),
        "read another federation's events": lambda: alice.xrange(OTHER.events),
        "read the modules": lambda: alice.hgetall(K.modules),
        "read the extras": lambda: alice.hgetall(K.extras),
        "read the rejection counts": lambda: alice.hgetall(K.rejected),
        "read the deadlines": lambda: alice.zrange(K.deadlines, 0, -1),
        "read the leases": lambda: alice.zrange(K.leases, 0, -1),
        "read the federations": lambda: alice.smembers("chorus:federations"),
        "write round state": lambda: alice.hset(K.round(2), "state", "complete"),
        "write meta": lambda: alice.hset(K.meta, "quorum", 100),
        "delete events": lambda: alice.delete(K.events),
        "run a script": lambda: alice.eval("return 1", 0),
        "run a round script": lambda: RoundState(alice).register("fed", 2, record("alice")),
        "run a function": lambda: alice.fcall("f", 0),
        "append to another client's inbox through the function": lambda: alice.fcall(
            "chorus_inbox_append", 1, K.client_inbox("bob"), "{}"
        ),
        "append to another federation's inbox through the function": lambda: alice.fcall(
            "chorus_inbox_append", 1, OTHER.client_inbox("alice"), "{}"
        ),
        "load a function": lambda: alice.function_load("#!lua name=x\nredis.register_function('x', function() end)"),
        "replace the library": lambda: alice.function_load("#!lua name=chorus\n", replace=True),
        "delete the library": lambda: alice.function_delete("chorus"),
        "flush the functions": alice.function_flush,
        "select database 0": lambda: alice.execute_command("SELECT", 0),
        "select another database": lambda: alice.execute_command("SELECT", 7),
        "swap databases": lambda: alice.execute_command("SWAPDB", 0, 7),
        "move a key to another database": lambda: alice.execute_command("MOVE", K.client_inbox("alice"), 7),
        "list keys": lambda: alice.keys("*"),
        "scan": alice.scan,
        "flush": alice.flushall,
        "manage users": lambda: alice.execute_command("ACL", "SETUSER", "alice2", "on", "+@all"),
        "who am i": lambda: alice.execute_command("ACL", "WHOAMI"),
        "config": lambda: alice.config_get("*"),
        "kill clients": lambda: alice.execute_command("CLIENT", "KILL", "ID", "1"),
        "set any key": lambda: alice.set("x", "y"),
        "publish": lambda: alice.publish(K.channel, "forged"),
        "multi": lambda: alice.execute_command("MULTI"),
    }
    allowed = [name for name, attempt in attempts.items() if not _refused(attempt)]
    assert allowed == []
    with pytest.raises(redis_lib.ResponseError, match="CHORUS_USAGE"):  # naming no key writes nothing either
        alice.fcall("chorus_inbox_append", 0, "{}")
    # Redis runs the function's XLEN and XADD with alice's rights, so Redis alone lets her run them on her own
    # inbox (and on nothing else): the gateway refuses both (tests/test_gateway.py), so they are never reachable
    assert alice.xlen(K.client_inbox("alice")) == 0
    assert not _refused(lambda: alice.xadd(K.client_inbox("alice"), {"m": "{}"}))
    assert {key: op.type(key) for key in op.scan_iter()} == before
    assert op.hget(K.meta, "quorum") == "1"


def _refused(attempt) -> bool:
    try:
        attempt()
    except NoPermission:
        return True
    return False


def test_revoke_takes_it_all_away(acl_server):
    op, secret = _federations(acl_server)
    url = client_url(acl_server.url, "fed", "alice", secret)
    alice = redis_lib.Redis.from_url(url, decode_responses=True)
    assert alice.hget(K.meta, "quorum") == "1"
    assert Acl(op).revoke("fed", "alice") is True
    with pytest.raises((redis_lib.ConnectionError, redis_lib.AuthenticationError)):
        alice.hget(K.meta, "quorum")  # Redis drops the user's open connections
    with pytest.raises(redis_lib.AuthenticationError):
        redis_lib.Redis.from_url(url).ping()
    assert Acl(op).revoke("fed", "alice") is False
    assert Acl(op).users("fed") == []


def test_sync_restores_users_after_a_restart_that_lost_them(acl_server):
    op, alice_secret = _federations(acl_server)
    registry = ClientRegistry(op, "fed")
    bob_secret = registry.add("bob")
    registry.add("carol")
    registry.revoke("carol")
    acl = Acl(op)
    acl.grant("fed", "bob", bob_secret)
    acl.grant("fed", "ghost", "not-registered")
    acl_server.restart()  # users.acl was never saved: only the shipped users come back
    op = acl_server.client()
    assert Acl(op).users("fed") == []
    with pytest.raises(redis_lib.AuthenticationError):
        redis_lib.Redis.from_url(client_url(acl_server.url, "fed", "alice", alice_secret)).ping()
    Acl(op).grant("fed", "ghost", "not-registered")
    report = Acl(op).sync("fed")
    assert report.granted == (client_username("fed", "alice"), client_username("fed", "bob"))
    assert report.removed == (client_username("fed", "ghost"),)
    assert Acl(op).users("fed") == [client_username("fed", "alice"), client_username("fed", "bob")]
    for client, secret in (("alice", alice_secret), ("bob", bob_secret)):
        user = redis_lib.Redis.from_url(client_url(acl_server.url, "fed", client, secret), decode_responses=True)
        assert user.hget(K.meta, "quorum") == "1"


def test_saved_users_survive_a_restart(acl_server):
    op, secret = _federations(acl_server)
    assert Acl(op).save() is True
    acl_server.restart()
    alice = redis_lib.Redis.from_url(client_url(acl_server.url, "fed", "alice", secret), decode_responses=True)
    assert alice.hget(K.meta, "quorum") == "1"
    stored = (acl_server.workdir.parent / "users.acl").read_text()
    assert secret not in stored and client_username("fed", "alice") in stored  # Redis keeps only the sha256


def test_save_without_an_acl_file_reports_instead_of_failing(real_redis, caplog, monkeypatch):
    from chorus_mq.state import acl

    monkeypatch.setattr(acl, "_warned_no_file", False)  # the warning is once per process: earlier tests may have had it
    assert Acl(real_redis).save() is False
    assert "no ACL file" in caplog.text


def test_save_to_an_unwritable_acl_file_reports_instead_of_failing(tmp_path, caplog):
    acl_dir = tmp_path / "acl"
    acl_dir.mkdir()
    shutil.copy(ACL_FILE, acl_dir / "users.acl")
    server = RedisServer(
        tmp_path / "redis",
        args=("--aclfile", str(acl_dir / "users.acl")),
        username="operator",
        password=PASSWORDS["operator"],
    ).start()
    try:
        shutil.rmtree(acl_dir)  # Redis writes a temp file beside it: now it cannot
        op = server.client()
        make_state(op, quorum=1)
        Acl(op).grant("fed", "alice", "s3cret-value")
        assert Acl(op).save() is False
        assert "could not write its ACL file" in caplog.text
        assert Acl(op).users("fed") == [client_username("fed", "alice")]  # granted all the same
    finally:
        server.stop()


def test_usernames_never_collide():
    names = ["a", "a.b", "a-b", "a_b", "b", "ab", "client", "fed", "x" * 64]
    users = {client_username(f, c) for f in names for c in names}
    assert len(users) == len(names) ** 2
    assert not users & {"default", "worker", "operator", "health"}
    assert all(u.startswith(CLIENT_USER_PREFIX + ":") and u.count(":") == 2 for u in users)


def test_users_lists_only_this_federations_clients(acl_server):
    op = acl_server.client()
    for name in ("fed", "fed2", "other"):
        make_state(op, name=name, quorum=1)
        for i in range(3):
            Acl(op).grant(name, f"c{i}", f"secret-{name}-{i}")
    assert Acl(op).users("fed") == [client_username("fed", f"c{i}") for i in range(3)]


def test_a_client_cannot_read_the_selection_seed(acl_server, tmp_path):
    """The draw's seed is a secret: the Redis user `client add` makes reads meta and every round, never it."""
    from chorus_mq.client import ChorusClient
    from chorus_mq.settings import Settings

    op = acl_server.client()
    settings = Settings(redis_url=acl_server.url, store=f"file://{tmp_path}/store", client_acl="on")
    sdk = ChorusClient(settings, redis=op)
    cfg = FederationConfig(
        name="fed", base_model="tiny", quorum=2, clients_per_round=2, round_timeout=60, expire_policy="expire"
    )
    state = RoundState(op)
    state.create_federation(cfg, Decl())
    creds = {c: sdk.add_client("fed", c) for c in ("alice", "bob", "carol")}
    state.abort("fed", 1, "clients registered: draw again")
    seed = state.selection_seed("fed")
    assert len(seed) == 32
    alice = redis_lib.Redis.from_url(creds["alice"].redis_url, decode_responses=True)
    readable = [*alice.hgetall(K.meta).values(), *alice.hgetall(K.round(2)).values()]
    assert readable and not any(seed in value for value in readable)
    assert RoundState(alice).round("fed", 2).selected  # the opened round's draw is public
    for attempt in (lambda: alice.hget(K.secrets, "selection_seed"), lambda: alice.hgetall(K.secrets)):
        with pytest.raises(NoPermission):
            attempt()
