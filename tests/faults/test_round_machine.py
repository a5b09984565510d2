"""Fault 7: the round scripts in random interleavings, on a real redis-server, against a Python model.

Hypothesis drives register (new, duplicate, conflicting, wrong shape, into the previous, the
current or a missing round), manual and deadline closes (fire, too few, extend, expire),
reclaims, finalize and fail under the current, a stale and a future epoch, the sweep
(``close_due_rounds``) and a fake clock. After every step the whole Redis state of the
federation (rounds, registered deltas, deadline and lease sets, meta, and the event stream)
must equal the model's, and each round has fired at most once and completed at most once.
"""

from __future__ import annotations

import collections
import os
import types

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine, initialize, invariant, precondition, rule, run_state_machine_as_test,
)

from chorus_mq.state import FederationConfig, FederationKeys, RoundState
from chorus_mq.workers.sweep import close_due_rounds

from .invariants import CLOSE_REASONS, read_events

pytestmark = pytest.mark.faults

FED = "fed"
LEASE = 100.0
ATTEMPTS = 3  # the sweep fails a round whose aggregation was reclaimed ATTEMPTS - 1 times
SHAPES = {"m.q": (8, 4), "m.v": (8, 4)}
BAD_SHAPES = {"m.q": (8, 5)}
EXAMPLES = int(os.environ.get("CHORUS_FAULT_EXAMPLES", "100"))
#: which round a rule acts on, relative to the current one (mostly the current one)
WHICH = st.sampled_from([0, 0, 0, -1, 1])
#: the epoch a finalize or fail claims, relative to the round's (mostly the current one)
SKEW = st.sampled_from([0, 0, 0, -1, 1])


class Round:
    def __init__(self, now: float, timeout: int, quorum: int, min_quorum: int):
        self.state, self.n, self.epoch = "open", 0, 0
        self.deadline = now + timeout if timeout else 0
        self.quorum, self.min_quorum = quorum, min_quorum or quorum
        self.lease_until: float | None = None
        self.shas: dict[str, str] = {}
        self.extensions = self.reclaims = 0


class RoundMachine(RuleBasedStateMachine):
    """The model: what each script must do, written from the scripts' contracts."""

    def __init__(self, redis):
        super().__init__()
        redis.flushall()
        self.redis = redis
        self.state = RoundState(redis, lease_s=int(LEASE))
        self.now = 1000.0
        self.rounds: dict[int, Round] = {}
        self.current = 0
        self.latest_complete = 0
        self.deadlines: dict[int, float] = {}
        self.leases: dict[int, float] = {}
        self.shapes: dict[str, tuple[int, int]] = {}
        self.events: collections.Counter = collections.Counter()
        self.uploads = 0

    # -- model helpers ---------------------------------------------------------------

    def _emit(self, r: int, type_: str) -> None:
        self.events[(r, type_)] += 1

    def _open(self, r: int) -> None:
        self.rounds[r] = Round(self.now, self.timeout, self.quorum, self.min_quorum)
        if self.timeout:
            self.deadlines[r] = self.now + self.timeout
        self.current = r
        self._emit(r, "round_opened")

    def _fire(self, r: int, reason: str) -> int:
        rnd = self.rounds[r]
        rnd.epoch += 1
        rnd.state, rnd.lease_until = "aggregating", self.now + LEASE
        self.deadlines.pop(r, None)
        self.leases[r] = rnd.lease_until
        self._emit(r, "round_aggregating")
        self.fired_reasons[r].append(reason)
        return rnd.epoch

    def _round(self, which: int) -> int:
        return max(1, self.current + which)

    # -- rules -------------------------------------------------------------------------

    @initialize(quorum=st.integers(1, 4), min_quorum=st.integers(0, 4), timeout=st.sampled_from([0, 60]),
                policy=st.sampled_from(["extend", "expire"]))
    def create(self, quorum, min_quorum, timeout, policy):
        self.quorum, self.min_quorum, self.timeout, self.policy = quorum, min(min_quorum, quorum), timeout, policy
        self.fired_reasons: dict[int, list[str]] = collections.defaultdict(list)
        self.state.create_federation(FederationConfig(name=FED, base_model="m", quorum=quorum,
                                                      min_quorum=self.min_quorum, round_timeout=timeout,
                                                      expire_policy=policy), now=self.now)
        self._emit(0, "federation_created")
        self._open(1)

    @rule(client=st.sampled_from("abcde"), sha=st.sampled_from(["1" * 64, "2" * 64]),
          which=WHICH, bad_shape=st.booleans())
    def register(self, client, sha, which, bad_shape):
        r = self._round(which)
        shapes = BAD_SHAPES if bad_shape else SHAPES
        self.uploads += 1
        got = self.state.register(FED, r, client=client, sha256=sha, record={"client_id": client},
                                  upload_id=f"u{self.uploads:06d}", shapes=shapes, now=self.now)
        rnd = self.rounds.get(r)
        if rnd is None:
            want = "no_round"
        elif client in rnd.shas:
            want = "duplicate" if rnd.shas[client] == sha else "conflict"
            if want == "duplicate":
                self._emit(r, "delta_accepted")
        elif rnd.state != "open":
            want = "closed"
        elif any(m in self.shapes and self.shapes[m] != s for m, s in shapes.items()):
            want = "shape_mismatch"
        else:
            for m, s in shapes.items():
                self.shapes.setdefault(m, s)
            rnd.shas[client] = sha
            rnd.n += 1
            self._emit(r, "delta_accepted")
            want = "accepted"
            if rnd.n >= rnd.quorum:
                want = "fired"
                assert got.epoch == self._fire(r, "quorum")
        assert got.status == want, (got, want)

    def _close(self, r: int, mode: str) -> str:
        rnd = self.rounds.get(r)
        if rnd is None or rnd.state != "open":
            self.deadlines.pop(r, None)
            return "noop"
        if mode == "deadline" and (rnd.deadline == 0 or rnd.deadline > self.now):
            return "not_due"
        if rnd.n >= rnd.min_quorum:
            self._fire(r, mode)
            return "fired"
        if mode == "manual":
            return "too_few"
        if self.policy == "expire":
            rnd.state = "expired"
            self.deadlines.pop(r, None)
            self._emit(r, "round_expired")
            self._open(r + 1)
            return "expired"
        rnd.deadline = self.now + self.timeout
        rnd.extensions += 1
        self.deadlines[r] = rnd.deadline
        self._emit(r, "round_extended")
        return "extended"

    @rule(mode=st.sampled_from(["manual", "deadline"]), which=WHICH)
    def close(self, mode, which):
        r = self._round(which)
        got = self.state.close(FED, r, mode, now=self.now)
        want = self._close(r, mode)
        assert got.status == want, (got, want)
        if want == "fired":
            assert got.epoch == self.rounds[r].epoch

    def _reclaim(self, r: int) -> str:
        rnd = self.rounds.get(r)
        if rnd is None or rnd.state != "aggregating":
            self.leases.pop(r, None)
            return "noop"
        if rnd.lease_until > self.now:
            return "not_due"
        rnd.epoch += 1
        rnd.lease_until = self.leases[r] = self.now + LEASE
        rnd.reclaims += 1
        self._emit(r, "round_aggregating")
        return "reclaimed"

    @rule(which=WHICH)
    def reclaim(self, which):
        r = self._round(which)
        got = self.state.reclaim(FED, r, now=self.now)
        want = self._reclaim(r)
        assert got.status == want, (got, want)
        if want == "reclaimed":
            assert got.epoch == self.rounds[r].epoch

    def _end(self, which: int, skew: int, complete: bool):
        r = self._round(which)
        rnd = self.rounds.get(r)
        epoch = max(0, (rnd.epoch if rnd else 0) + skew)
        if complete:
            got = self.state.finalize(FED, r, epoch, f"k{r}", {"manifest_sha256": "ab"}, now=self.now)
        else:
            got = self.state.fail(FED, r, epoch, "test", now=self.now)
        if complete and rnd is not None and rnd.state == "complete":
            want = "already"
        elif rnd is None or rnd.state != "aggregating":
            want = "bad_state"
        elif epoch != rnd.epoch:
            want = "stale"
        else:
            want = "ok"
            rnd.state = "complete" if complete else "failed"
            self.leases.pop(r, None)
            if complete:
                self.latest_complete = r
            self._emit(r, "round_complete" if complete else "round_failed")
            self._open(r + 1)
        assert got.status == want, (got, want, r, epoch)

    def _aggregating(self) -> bool:
        return bool(self.rounds) and self.rounds[self.current].state == "aggregating"

    @precondition(_aggregating)
    @rule(which=WHICH, skew=SKEW)
    def finalize(self, which, skew):
        self._end(which, skew, complete=True)

    @precondition(_aggregating)
    @rule(which=WHICH, skew=SKEW)
    def fail(self, which, skew):
        self._end(which, skew, complete=False)

    @rule(which=WHICH, skew=SKEW, complete=st.booleans())
    def end_whenever(self, which, skew, complete):
        """finalize or fail whatever the round's state: mostly bad_state, already or stale."""
        self._end(which, skew, complete)

    @rule(dt=st.sampled_from([0.5, 61.0, 101.0]))
    def tick(self, dt):
        self.now += dt

    @rule()
    def sweep(self):
        enqueued = []
        rt = types.SimpleNamespace(state=self.state, settings=types.SimpleNamespace(max_aggregation_attempts=ATTEMPTS))
        report = close_due_rounds(rt, lambda f, r, e: enqueued.append((r, e)), now=self.now)
        due = sorted(r for r, t in self.deadlines.items() if t <= self.now)
        stale = sorted(r for r, t in self.leases.items() if t <= self.now)
        want = collections.defaultdict(list)
        want_enqueued = []
        for r in due:
            status = self._close(r, "deadline")
            if status in ("fired", "extended", "expired"):
                want[status].append((FED, r))
            if status == "fired":
                want_enqueued.append((r, self.rounds[r].epoch))
        for r in stale:
            rnd = self.rounds.get(r)
            if rnd is not None and rnd.state == "aggregating" and rnd.reclaims + 1 >= ATTEMPTS:
                # an aggregation that keeps dying fails its round instead of looping forever
                rnd.state = "failed"
                self.leases.pop(r, None)
                self._emit(r, "round_failed")
                self._open(r + 1)
                want["failed"].append((FED, r))
                continue
            if self._reclaim(r) == "reclaimed":
                want["reclaimed"].append((FED, r))
                want_enqueued.append((r, self.rounds[r].epoch))
        assert {k: v for k, v in report.items() if v} == dict(want)
        assert enqueued == want_enqueued

    # -- the invariants ------------------------------------------------------------------

    @invariant()
    def redis_matches_model(self):
        if not self.rounds:
            return
        k = FederationKeys(FED)
        meta = self.redis.hgetall(k.meta)
        assert int(meta["current_round"]) == self.current
        assert int(meta["latest_complete"]) == self.latest_complete
        for r, rnd in self.rounds.items():
            h = self.redis.hgetall(k.round(r))
            assert (h["state"], int(h["n"]), int(h["epoch"])) == (rnd.state, rnd.n, rnd.epoch), (r, h)
            assert float(h["deadline"]) == pytest.approx(rnd.deadline)
            if rnd.lease_until is not None:
                assert float(h["lease_until"]) == pytest.approx(rnd.lease_until)
            assert int(h.get("extensions", 0)) == rnd.extensions and int(h.get("reclaims", 0)) == rnd.reclaims
            assert {f[4:]: v for f, v in h.items() if f.startswith("sha:")} == rnd.shas
            assert set(self.redis.hkeys(k.deltas(r))) == set(rnd.shas)
        assert not self.redis.exists(k.round(self.current + 1))
        assert _zset(self.redis, k.deadlines) == pytest.approx(self.deadlines)
        assert _zset(self.redis, k.leases) == pytest.approx(self.leases)
        assert self.redis.hgetall(k.shapes) == {m: f"{a},{b}" for m, (a, b) in self.shapes.items()}

        events = read_events(self.redis, FED)
        assert collections.Counter((e["round"], e["type"]) for e in events) == self.events
        # the properties the model exists for: only the current round is open or aggregating; each
        # round fired (closed) at most once and completed at most once, and only after firing
        live = [r for r, rnd in self.rounds.items() if rnd.state in ("open", "aggregating")]
        assert live == [self.current]
        for r, rnd in self.rounds.items():
            closes = [e for e in events if e["round"] == r and e["type"] == "round_aggregating"
                      and e.get("reason") in CLOSE_REASONS]
            assert len(closes) == (1 if rnd.state in ("aggregating", "complete", "failed") else 0)
            assert [e["reason"] for e in closes] == self.fired_reasons[r]
            assert self.events[(r, "round_complete")] == (rnd.state == "complete")


def _zset(redis, key) -> dict[int, float]:
    return {int(m): s for m, s in redis.zrange(key, 0, -1, withscores=True)}


def test_round_scripts_in_random_interleavings(real_redis):
    run_state_machine_as_test(
        lambda: RoundMachine(real_redis),
        settings=settings(max_examples=EXAMPLES, stateful_step_count=50, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]),
    )
