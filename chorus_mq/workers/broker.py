"""A fix to kombu's Redis transport that the worker installs before it consumes (kombu 5.7).

kombu's Redis ``QoS.ack`` first removes the message from its unacked index in Redis, then
forgets the delivery locally. When that Redis call fails (the connection was killed or Redis
restarted just as a task finished), the local forget never runs: the delivery keeps counting
against the prefetch limit, so with ``worker_prefetch_multiplier=1`` the channel can never
consume again, its BRPOP stays paused, and the worker never even notices that its connection is
gone. Seen here: ``CLIENT KILL`` right after an ingest task succeeded left a worker idle for good
with tasks waiting in its queue.

The fixed ``ack`` (and ``reject``) always forget the delivery locally. The Redis-side copy stays in
the unacked index and comes back after the visibility timeout: a second run of an idempotent
task, never a lost consumer.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.transport import virtual

_MARK = "_chorus_forgets_on_failure"


def install() -> None:
    """Patch kombu's Redis QoS once per process (idempotent)."""
    qos = kombu_redis.QoS
    if getattr(qos, _MARK, False):
        return
    redis_ack, redis_reject = qos.ack, qos.reject

    def ack(self: Any, delivery_tag: Any) -> None:
        try:
            redis_ack(self, delivery_tag)  # type: ignore[no-untyped-call]
        finally:
            virtual.QoS.ack(self, delivery_tag)  # type: ignore[no-untyped-call]  # forget it whatever Redis said

    def reject(self: Any, delivery_tag: Any, requeue: bool = False) -> None:
        try:
            redis_reject(self, delivery_tag, requeue=requeue)  # type: ignore[no-untyped-call]
        finally:
            virtual.QoS.ack(self, delivery_tag)  # type: ignore[no-untyped-call]

    qos.ack = ack  # type: ignore[method-assign]
    qos.reject = reject  # type: ignore[method-assign]
    setattr(qos, _MARK, True)
