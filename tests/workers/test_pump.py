"""The inbox pump against a real redis-server and the real Celery broker queue (issue 15: findings 2, 5, 6).

Junk, forgeries and stale records die in the pump: nothing reaches the ingest queue. What passes is
queued and stays pending until its verdict; a client's queued tasks are bounded however much it sends,
and its rate budget drops the rest, counted.
"""

from __future__ import annotations

import hashlib
import time

import pytest

from chorus_mq.adapters import ModelDecl
from chorus_mq.messages import IngestMessage
from chorus_mq.names import Queue
from chorus_mq.settings import Settings
from chorus_mq.state import ClientRegistry, Inbox
from chorus_mq.store import open_store
from chorus_mq.workers import runtime
from chorus_mq.workers.app import get_dispatcher
from chorus_mq.workers.ingest import max_delta_size
from chorus_mq.workers.pump import InboxPump

from ..deltas import make_federation

pytestmark = pytest.mark.services


@pytest.fixture
def pump(real_redis, redis_server, tmp_path):
    """A pump queueing real Celery messages on the redis-server broker (no worker consumes them)."""
    settings = Settings(
        redis_url=redis_server.url,
        store=f"file://{tmp_path}/store",
        allow_unsigned=False,
        client_acl="off",
        inbox_claim_idle_s=3600,
    )
    rt = runtime.Runtime(settings, real_redis, open_store(settings.store, settings))
    from chorus_mq.client import ChorusClient

    make_federation(ChorusClient(settings, redis=real_redis), "fed", quorum=2)
    secret = ClientRegistry(real_redis, "fed").add("alice")
    yield InboxPump(rt, get_dispatcher(settings), consumer="test"), secret
    real_redis.delete(Queue.INGEST.value)


def _record(secret: str | None, n: int, **fields) -> str:
    msg = IngestMessage(
        federation="fed", client_id="alice", sha256=hashlib.sha256(str(n).encode()).hexdigest(), size=100, **fields
    )
    return (msg.signed(secret) if secret else msg).model_dump_json()


def _steps(pump: InboxPump, n: int = 5) -> None:
    for _ in range(n):
        pump.step(block_ms=0)


def test_junk_forgeries_and_stale_records_never_reach_the_ingest_queue(pump, real_redis):
    pump, secret = pump
    inbox = Inbox(real_redis, "fed", "alice")
    inbox.ensure_group()
    real_redis.xadd(inbox.key, {"m": b"\xff"})
    real_redis.xadd(inbox.key, {"m": "{}", "task": "chorus.round"})
    inbox.append("not json")
    inbox.append(_record(None, 1))  # unsigned
    inbox.append(_record("not-alice's-secret", 2))
    inbox.append(_record(secret, 3, ts=time.time() - 3600))  # stale
    _steps(pump)
    assert real_redis.llen(Queue.INGEST.value) == 0
    assert (inbox.length(), inbox.pending()) == (0, 0)
    assert pump.rt.state.rejected("fed") == {"malformed": 2, "invalid_adapter": 1, "unauthenticated": 2}

    inbox.append(_record(secret, 4))
    _steps(pump)
    assert real_redis.llen(Queue.INGEST.value) == 1
    assert (inbox.length(), inbox.pending()) == (1, 1)  # pending until a verdict is stored


def test_a_clients_queued_tasks_and_rate_are_bounded(pump, real_redis):
    pump, secret = pump
    settings = pump.rt.settings
    inbox = Inbox(real_redis, "fed", "alice")
    inbox.ensure_group()
    with real_redis.pipeline(transaction=False) as pipe:
        for n in range(200):
            pipe.xadd(inbox.key, {"m": _record(secret, n)})
        pipe.execute()
    _steps(pump, 20)
    queued = real_redis.llen(Queue.INGEST.value)
    assert queued == inbox.pending() < 2 * settings.inbox_max_in_flight
    # nothing judged them (no worker): the rest waits in the inbox, unread, for a verdict to free a place
    assert inbox.length() == 200 and queued == settings.inbox_max_in_flight

    # a flood beyond the budget is dropped and counted, in bulk
    pending = inbox.pending()
    real_redis.delete(inbox.key)
    inbox.ensure_group()
    with real_redis.pipeline(transaction=False) as pipe:
        for _ in range(2000):
            pipe.xadd(inbox.key, {"m": b"\xfe junk"})
        pipe.execute()
    _steps(pump, 40)
    counted = pump.rt.state.rejected("fed")
    assert counted["malformed"] + counted["rate_limited"] == 2000, counted
    assert 0 < counted["malformed"] <= settings.inbox_burst - pending + 5, counted  # the budget left, and its refill
    assert inbox.length() == 0


def test_the_object_cap_follows_the_declared_model():
    settings = Settings()
    small = ModelDecl(modules={"base_model.model.q": (16, 12)})
    assert max_delta_size(small, settings) == 8 + settings.max_header_bytes + 8 * settings.max_rank * (16 + 12)
    wide = ModelDecl(modules={f"base_model.model.l{i}": (8192, 8192) for i in range(400)})
    assert max_delta_size(wide, settings) == settings.max_delta_bytes  # never above the global cap
