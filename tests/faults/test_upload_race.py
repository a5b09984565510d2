"""Fault 5: 50 clients upload at once into a federation whose quorum is 10.

Exactly 10 are aggregated in round 1. Each of the other 40 is accounted for: accepted in a
later round, or told clearly that its round closed (``round N is closed ...``). The told
ones upload again once a round is open, until everyone is in; then 5 rounds hold exactly
10 clients each, and no upload was silently lost.
"""

from __future__ import annotations

import re
import threading

from chorus_mq.errors import Rejected

from ..topology import wait_for
from .conftest import MARKS, federation, in_threads, size_of, trials, upload, wait_round
from .invariants import assert_exactly_once

pytestmark = MARKS

CLIENTS, QUORUM = 50, 10


def _race(sdk, fed, clients, delta_file) -> tuple[dict, dict]:
    """Upload ``clients`` at once (a barrier releases every thread together); accepted and rejected."""
    accepted, rejected, errors = {}, {}, {}
    barrier = threading.Barrier(len(clients))

    def go(i):
        barrier.wait()
        try:
            accepted[i] = upload(sdk, fed, f"c{i}", delta_file(i), size_of(i), timeout=120)
        except Rejected as exc:
            rejected[i] = exc.reason
        except Exception as exc:  # reported below, with the client
            errors[i] = repr(exc)

    in_threads(go, [(i,) for i in clients])
    assert not errors, f"uploads without a verdict: {errors}"
    assert len(accepted) + len(rejected) == len(clients)
    return accepted, rejected


@trials(2)
def test_fifty_uploads_race_a_quorum_of_ten(deployment, delta_file, trial):
    fed = f"race-{trial}"
    sdk = deployment.sdk()
    sdk.store.exists("warm-up")  # one boto3 client for every thread
    federation(sdk, fed, quorum=QUORUM)
    workers = [deployment.start_worker(concurrency=1, wait=False) for _ in range(2)]
    deployment.wait_ready(*workers)

    accepted, rejected = _race(sdk, fed, list(range(CLIENTS)), delta_file)
    first = sorted(i for i, a in accepted.items() if a.round == 1)
    assert len(first) == QUORUM, f"round 1 accepted {len(first)}"
    assert wait_round(deployment, fed, 1) == "complete"
    for reason in rejected.values():  # aggregating, or (a message resolved to it just before) complete
        assert re.fullmatch(
            r"round \d+ is closed(: its quorum was reached and it is aggregating; upload to round "
            r"\d+ once round_complete is announced| \(state complete\); upload to the current round)",
            reason,
        ), reason
    assert all(a.round > 1 for i, a in accepted.items() if i not in first)

    waves = 0
    while rejected:  # the told clients try again, as the message says, once a round is open
        waves += 1
        assert waves <= CLIENTS, "the rejected clients never got in"
        wait_for(lambda: sdk.status(fed).state == "open", 60, "an open round")
        more, rejected = _race(sdk, fed, sorted(rejected), delta_file)
        accepted.update(more)

    rounds = CLIENTS // QUORUM
    for r in range(1, rounds + 1):
        assert wait_round(deployment, fed, r) == "complete"
    report = assert_exactly_once(
        deployment, fed, sizes={f"c{i}": size_of(i) for i in range(CLIENTS)}, accepted=list(accepted.values())
    )
    assert sorted(report.complete) == list(range(1, rounds + 1))
    assert all(len(clients) == QUORUM for clients in report.complete.values())
    assert sorted(c for clients in report.complete.values() for c in clients) == sorted(f"c{i}" for i in range(CLIENTS))
    assert report.pending in ({}, {rounds + 1: []})
