"""kombu's Redis QoS, as the worker installs it: a failed ack never stops a channel consuming (issue 15).

Without the fix a delivery whose ack failed (Redis gone or the connection killed as the task ended)
kept counting against the prefetch limit: with prefetch 1 the worker never consumed again.
"""

from __future__ import annotations

import pytest
import redis as redis_lib
from kombu import Connection
from kombu import Queue as KombuQueue

from chorus_mq.workers.broker import install

pytestmark = pytest.mark.services


@pytest.mark.parametrize("how", ["ack", "reject"])
def test_a_delivery_whose_ack_failed_is_forgotten_so_consuming_goes_on(real_redis, redis_server, how):
    install()
    with Connection(redis_server.url, transport_options={"visibility_timeout": 5}) as conn:
        channel = conn.channel()
        channel.basic_qos(prefetch_size=0, prefetch_count=1, apply_global=False)
        queue = KombuQueue(f"chorus-test-{how}", channel=channel)
        queue.declare()
        conn.Producer(channel).publish({"n": 1}, routing_key=queue.name)
        message = queue.get(no_ack=False)
        assert message is not None and not channel.qos.can_consume()  # prefetch 1: one in flight
        redis_server.stop()
        try:
            with pytest.raises(redis_lib.ConnectionError):
                message.ack() if how == "ack" else message.reject()
        finally:
            redis_server.start()
        assert channel.qos.can_consume(), "the failed ack left the channel unable to consume"
        # the Redis-side copy is still unacked: it comes back after the visibility timeout
        assert real_redis.zcard("unacked_index") == 1
