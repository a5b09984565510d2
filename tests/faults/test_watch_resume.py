"""Fault 9: ``chorus-mq watch`` misses no event across a Redis restart and a subscriber restart.

A ``watch --json`` process follows the stream while Redis is restarted under it (it must
reconnect and continue from the last id it saw); then it is SIGKILLed, events happen while
no one watches, and a new ``watch --after <last id printed>`` picks up. Together the two
subscribers printed every event of the stream exactly once, in order.
"""

from __future__ import annotations

import json
import threading

from chorus_mq.names import EventType

from ..topology import wait_for
from .conftest import MARKS, federation, size_of, trials, upload, upload_all, wait_round
from .invariants import assert_exactly_once, read_events

pytestmark = MARKS


class Subscriber:
    """A ``chorus-mq watch --json`` process and the events it printed (read on a thread)."""

    def __init__(self, dep, fed: str, *args: str):
        self.proc = dep.popen_cli("watch", "--federation", fed, "--json", *args)
        self.events: list[dict] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.events.append(json.loads(line))

    def saw(self, predicate) -> bool:
        return any(predicate(e) for e in list(self.events))

    def finish(self, timeout: float = 30) -> list[dict]:
        self._reader.join(timeout)
        return self.events


@trials(2)
def test_watch_resumes_across_redis_and_subscriber_restarts(deployment, redis_server, delta_file, trial):
    fed = f"watch-{trial}"
    sdk = deployment.sdk()
    federation(sdk, fed, quorum=2)
    deployment.start_worker(wait=False)
    first = Subscriber(deployment, fed, "--from-start")
    accepted = upload_all(sdk, fed, range(2), delta_file)
    assert wait_round(deployment, fed, 1) == "complete"
    wait_for(
        lambda: first.saw(lambda e: e["type"] == EventType.ROUND_COMPLETE), 60, "the first subscriber to see round 1"
    )

    redis_server.restart(sig_kill=trial % 2 == 0)  # under the subscriber's blocking XREAD
    accepted.append(upload(sdk, fed, "c2", delta_file(2), size_of(2)))
    wait_for(lambda: first.saw(lambda e: e.get("client") == "c2"), 60, "the subscriber to reconnect and go on")

    deployment.kill(first.proc)  # the subscriber dies; events go on without anyone watching
    seen = first.finish()
    accepted.append(upload(sdk, fed, "c3", delta_file(3), size_of(3)))
    assert wait_round(deployment, fed, 2) == "complete"

    second = Subscriber(deployment, fed, "--after", seen[-1]["id"], "--until-round", "3", "--timeout", "120")
    accepted += upload_all(sdk, fed, (4, 5), delta_file)
    assert wait_round(deployment, fed, 3) == "complete"
    assert second.proc.wait(timeout=120) == 0, second.proc.stderr.read()
    resumed = second.finish()

    stream = read_events(sdk.redis, fed)
    end = next(i for i, e in enumerate(stream) if e["type"] == EventType.ROUND_COMPLETE and e["round"] == 3)
    stream = stream[: end + 1]  # --until-round 3 stops there (round 4's round_opened comes next)
    printed = seen + resumed
    assert [e["id"] for e in printed] == [e["id"] for e in stream], "a subscriber missed or repeated events"
    assert printed == stream
    assert any(e["type"] == EventType.ROUND_COMPLETE and e["round"] == 2 for e in resumed)  # happened while unwatched
    report = assert_exactly_once(deployment, fed, sizes={f"c{i}": size_of(i) for i in range(6)}, accepted=accepted)
    assert report.complete == {1: ["c0", "c1"], 2: ["c2", "c3"], 3: ["c4", "c5"]}
