"""Fault 7: the round scripts in random interleavings, on a real redis-server, against a Python model.

Hypothesis drives register (new, duplicate, conflicting, evicted, unselected, into the previous,
the current or a missing round), manual and deadline closes (fire, too few, extend, expire),
reclaims, lease renewals (current, stale and future epoch) and extensions, finalize and fail
under the current, a stale and a future epoch, operator evictions and aborts, shard results
(single calls, and several finishers racing on every shard of a round), the sweep (due rounds
closed, expired leases reclaimed, or failed after too many attempts), clients registered and
revoked (which changes the next rounds' draws), and a fake clock. After every step the whole
Redis state of the federation (rounds with their selection and shards, registered deltas,
deadline and lease sets, meta, and the event stream) must equal the model's; each round fired
at most once and ended at most once, and every completed shard set had exactly one "last".
"""

from __future__ import annotations

import collections
import itertools
import json
import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis as redis_lib
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from chorus_mq.errors import ConfigError, Conflict, NotFound
from chorus_mq.names import CloseReason, EventType
from chorus_mq.state import ClientRegistry, DeltaRecord, EventLog, FederationConfig, FederationKeys, RoundState
from chorus_mq.state.selection import draw

pytestmark = [pytest.mark.faults, pytest.mark.services]

FED = "fed"
SEED = "machine-seed"
LEASE = 100.0
ATTEMPTS = 3  # the sweep fails a round whose aggregation was reclaimed ATTEMPTS - 1 times
MODULES = {"base_model.model.q": (8, 4), "base_model.model.v": (8, 4)}
EXAMPLES = int(os.environ.get("CHORUS_FAULT_EXAMPLES", "100"))
CLIENTS = "abcdef"
SHAS = ["1" * 64, "2" * 64]
#: which round a rule acts on, relative to the current one (mostly the current one)
WHICH = st.sampled_from([0, 0, 0, -1, 1])
#: the epoch a finalize, fail or renewal claims, relative to the round's (mostly the current one)
SKEW = st.sampled_from([0, 0, 0, -1, 1])
#: how far behind the model's clock a worker renewing a lease may be (a renewal never shortens a lease)
LAG = st.sampled_from([0.0, 0.0, 0.0, 50.0])
MANIFEST_SHA = "ab" * 32
CLOSES = frozenset(CloseReason.values())


class Decl:
    modules = MODULES
    extras: dict[str, tuple[int, ...]] = {}  # noqa: RUF012 (read-only)


def _record(client: str, sha: str, upload: int) -> DeltaRecord:
    return DeltaRecord(
        client_id=client,
        sha256=sha,
        size=1,
        upload_id=f"u{upload:06d}",
        key=f"k/{client}/{sha}",
        index_key=f"i/{client}/{sha}",
        index_sha256="0" * 64,
    )


class Round:
    def __init__(self, now: float, timeout: int, quorum: int, min_quorum: int, selected: tuple[str, ...]):
        self.state, self.n, self.epoch = "open", 0, 0
        self.deadline = now + timeout if timeout else 0
        self.quorum, self.min_quorum = quorum, min_quorum or quorum
        self.selected = selected
        self.lease_until: float | None = None
        self.shas: dict[str, str] = {}
        self.evicted: dict[str, str] = {}
        self.extensions = self.reclaims = self.lease_extensions = self.resends = 0
        self.resend_mark: str | None = None
        self.shard_total = 0
        self.shards: dict[int, str] = {}


class RoundMachine(RuleBasedStateMachine):
    """The model: what each script must do, written from the scripts' contracts."""

    def __init__(self, redis, url: str, finishers: list[RoundState]):
        super().__init__()
        redis.flushall()
        self.redis = redis
        self.url = url
        self.finishers = finishers
        self.state = RoundState(redis, lease_s=int(LEASE))
        self.registry = ClientRegistry(redis, FED)
        self.now = 1000.0
        self.rounds: dict[int, Round] = {}
        self.current = 0
        self.latest_complete: int | None = None  # no initial adapter: no round 0, nothing complete yet
        self.deadlines: dict[int, float] = {}
        self.leases: dict[int, float] = {}
        self.clients: dict[str, bool] = {}  # registered client -> revoked
        self.events: collections.Counter = collections.Counter()
        self.fired_reasons: dict[int, list[str]] = collections.defaultdict(list)
        self.uploads = itertools.count()
        self.shard_calls = itertools.count()

    # -- model helpers ---------------------------------------------------------------

    def _emit(self, r: int, type_: str) -> None:
        self.events[(r, type_)] += 1

    def _active(self) -> list[str]:
        return [c for c, revoked in self.clients.items() if not revoked]

    def _open(self, r: int) -> None:
        selected = draw(SEED, r, self._active(), self.k)
        self.rounds[r] = Round(self.now, self.timeout, self.quorum, self.min_quorum, selected)
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

    def _end(self, r: int, state: str, event: str) -> None:
        self.rounds[r].state = state
        self.leases.pop(r, None)
        self.deadlines.pop(r, None)
        self._emit(r, event)
        self._open(r + 1)

    def _round(self, which: int) -> int:
        return max(1, self.current + which)

    def _aggregating(self) -> bool:
        return bool(self.rounds) and self.rounds[self.current].state == "aggregating"

    # -- federation and clients ----------------------------------------------------------

    @initialize(
        quorum=st.integers(1, 4),
        min_quorum=st.integers(0, 4),
        timeout=st.sampled_from([0, 60]),
        policy=st.sampled_from(["extend", "expire"]),
        k=st.sampled_from([0, 0, 2, 3]),
        initial=st.sets(st.sampled_from(CLIENTS), max_size=5),
    )
    def create(self, quorum, min_quorum, timeout, policy, k, initial):
        self.k = k
        self.quorum = min(quorum, k) if k else quorum
        public = {"name": FED, "base_model": "m", "quorum": self.quorum, "clients_per_round": k}
        if k and (not timeout or policy != "expire"):
            # a sampled round could wait on its drawn clients for ever: refused, and nothing is written
            with pytest.raises(ConfigError, match="clients-per-round"):
                self.state.create_federation(
                    FederationConfig(**public, round_timeout=timeout, expire_policy=policy), Decl(), seed=SEED
                )
            assert not self.state.federations()
            timeout, policy = 60, "expire"
        self.min_quorum, self.timeout, self.policy = min(min_quorum, self.quorum), timeout, policy
        cfg = FederationConfig(**public, min_quorum=self.min_quorum, round_timeout=timeout, expire_policy=policy)
        assert self.state.create_federation(cfg, Decl(), seed=SEED, now=self.now).status == "created"
        self._emit(0, "federation_created")
        self._open(1)  # drawn before anyone is registered: open to all
        for client in sorted(initial):
            self.registry.add(client)
            self.clients[client] = False

    @rule(client=st.sampled_from(CLIENTS))
    def add_client(self, client):
        if client in self.clients:
            with pytest.raises(Conflict):
                self.registry.add(client)
        else:
            self.registry.add(client)
            self.clients[client] = False

    @rule(client=st.sampled_from(CLIENTS))
    def revoke_client(self, client):
        if client not in self.clients:
            with pytest.raises(NotFound):
                self.registry.revoke(client)
        else:
            assert self.registry.revoke(client).revoked
            self.clients[client] = True

    # -- deltas --------------------------------------------------------------------------

    @rule(client=st.sampled_from(CLIENTS), sha=st.sampled_from(SHAS), which=WHICH)
    def register(self, client, sha, which):
        r = self._round(which)
        got = self.state.register(FED, r, _record(client, sha, next(self.uploads)), now=self.now)
        rnd = self.rounds.get(r)
        if rnd is None:
            want = "no_round"
        elif client in rnd.shas:
            want = "duplicate" if rnd.shas[client] == sha else "conflict"
            if want == "duplicate":
                self._emit(r, "delta_accepted")
        elif rnd.evicted.get(client) == sha:
            want = "evicted"
        elif rnd.state != "open":
            want = "closed"
        elif rnd.selected and client not in rnd.selected:
            want = "not_selected"
        else:
            rnd.shas[client] = sha
            rnd.n += 1
            self._emit(r, "delta_accepted")
            want = "accepted"
            if rnd.n >= rnd.quorum:
                want = "fired"
                assert got.epoch == self._fire(r, "quorum")
        assert got.status == want, (got, want)

    @rule(client=st.sampled_from(CLIENTS), which=WHICH)
    def evict(self, client, which):
        r = self._round(which)
        got = self.state.evict(FED, r, client, "operator", now=self.now)
        rnd = self.rounds.get(r)
        if rnd is None:
            want = "no_round"
        elif rnd.state != "open":
            want = "closed"
        elif client not in rnd.shas:
            want = "noop"
        else:
            rnd.evicted[client] = rnd.shas.pop(client)
            rnd.n -= 1
            self._emit(r, "delta_evicted")
            want = "evicted"
            assert (got.n, got.detail) == (rnd.n, rnd.evicted[client])
        assert got.status == want, (got, want)

    # -- closing ---------------------------------------------------------------------------

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

    @rule(which=WHICH)
    def abort(self, which):
        r = self._round(which)
        got = self.state.abort(FED, r, "operator", now=self.now)
        rnd = self.rounds.get(r)
        if rnd is None:
            want = "no_round"
        elif rnd.state not in ("open", "aggregating"):
            want = "bad_state"
        else:
            rnd.epoch += 1
            want = "aborted"
            assert got.epoch == rnd.epoch
            self._end(r, "aborted", "round_aborted")
        assert got.status == want, (got, want)

    # -- leases ------------------------------------------------------------------------------

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

    def _redispatch(self, r: int) -> str:
        rnd = self.rounds.get(r)
        if rnd is None or rnd.state != "aggregating":
            self.leases.pop(r, None)
            return "noop"
        if rnd.lease_until > self.now:
            return "not_due"
        mark = f"{rnd.epoch}:{len(rnd.shards)}"  # progress: shards recorded (no plan is set here)
        if rnd.resend_mark == mark:
            return "stuck"
        rnd.resend_mark, rnd.resends = mark, rnd.resends + 1
        rnd.lease_until = self.leases[r] = self.now + LEASE
        return "resend"

    @rule(which=WHICH)
    def redispatch(self, which):
        r = self._round(which)
        got = self.state.redispatch(FED, r, now=self.now)
        want = self._redispatch(r)
        assert got.status == want, (got, want)
        if want in ("resend", "stuck"):
            assert got.epoch == self.rounds[r].epoch  # a re-send never changes the epoch

    def _push_lease(self, rnd: Round, r: int, now: float) -> None:
        rnd.lease_until = max(rnd.lease_until or 0.0, now + LEASE)
        self.leases[r] = rnd.lease_until

    @rule(which=WHICH, skew=SKEW, lag=LAG)
    def renew(self, which, skew, lag):
        r = self._round(which)
        rnd = self.rounds.get(r)
        epoch = max(0, (rnd.epoch if rnd else 0) + skew)
        got = self.state.renew(FED, r, epoch, now=self.now - lag)
        want = rnd is not None and rnd.state == "aggregating" and epoch == rnd.epoch
        if want:
            self._push_lease(rnd, r, self.now - lag)
        assert got is want

    @rule(which=WHICH, lag=LAG)
    def extend_lease(self, which, lag):
        r = self._round(which)
        got = self.state.extend_lease(FED, r, now=self.now - lag)
        rnd = self.rounds.get(r)
        if rnd is None or rnd.state != "aggregating":
            self.leases.pop(r, None)
            want = "noop"
        else:
            self._push_lease(rnd, r, self.now - lag)
            rnd.lease_extensions += 1
            want = "extended"
            assert got.epoch == rnd.epoch
        assert got.status == want, (got, want)

    # -- shards ------------------------------------------------------------------------------

    def _shard(self, r: int, k: int, total: int) -> tuple[str, bool]:
        """What one shard_done call must answer: (status, whether it is the last)."""
        rnd = self.rounds.get(r)
        if rnd is None or rnd.state != "aggregating":
            return "stale", False
        if rnd.shard_total and rnd.shard_total != total:
            return "conflict", False
        if k in rnd.shards:
            return "duplicate", False
        rnd.shard_total = total
        self._emit(r, "shard_done")
        return "recorded", len(rnd.shards) + 1 == total

    @rule(which=WHICH, k=st.integers(0, 2), total=st.sampled_from([2, 3, 3]), behind=st.sampled_from([0, 0, 0, 1]))
    def shard_done(self, which, k, total, behind):
        r = self._round(which)
        if k >= total:
            return
        result = json.dumps({"k": k, "call": next(self.shard_calls)})
        rnd = self.rounds.get(r)
        epoch = (rnd.epoch if rnd else 0) - behind  # behind: a run the sweep reclaimed
        got = self.state.shard_done(FED, r, k, total, result, epoch=epoch, now=self.now)
        if behind and rnd is not None and rnd.state == "aggregating":
            assert (got.status, got.detail, got.epoch) == ("stale", "epoch", rnd.epoch), got  # ignored
            return
        want, last = self._shard(r, k, total)
        if want == "recorded":
            self.rounds[r].shards[k] = result
        assert (got.status, got.detail == "last") == (want, last), (got, want, last)

    @precondition(_aggregating)
    @rule(total=st.sampled_from([1, 3, 5]), finishers=st.integers(2, 4))
    def shards_race(self, total, finishers):
        """Several workers finish (and redeliver) every shard of the round at once: one of them is last."""
        r = self.current
        rnd = self.rounds[r]

        def finish(i: int) -> list[tuple[int, str, str]]:
            out = []
            for k in [*range(i % total, total), *range(i % total)]:  # each its own order
                reply = self.finishers[i].shard_done(
                    FED, r, k, total, json.dumps({"k": k}), epoch=rnd.epoch, now=self.now
                )
                out.append((k, reply.status, reply.detail))
            return out

        with ThreadPoolExecutor(finishers) as pool:
            replies = [reply for batch in pool.map(finish, range(finishers)) for reply in batch]
        if rnd.shard_total and rnd.shard_total != total:
            assert {status for _, status, _ in replies} == {"conflict"}
            return
        missing = set(range(total)) - set(rnd.shards)
        recorded = sorted(k for k, status, _ in replies if status == "recorded")
        assert recorded == sorted(missing)
        assert sum(detail == "last" for _, _, detail in replies) == (1 if missing else 0)
        assert {status for _, status, _ in replies} <= {"recorded", "duplicate"}
        rnd.shard_total = total
        for k in missing:
            rnd.shards[k] = json.dumps({"k": k})
            self._emit(r, "shard_done")

    # -- ending --------------------------------------------------------------------------------

    def _finish(self, which: int, skew: int, complete: bool):
        r = self._round(which)
        rnd = self.rounds.get(r)
        epoch = max(0, (rnd.epoch if rnd else 0) + skew)
        if complete:
            got = self.state.finalize(FED, r, epoch, f"k{r}", MANIFEST_SHA, now=self.now)
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
            if complete:
                self.latest_complete = r
            self._end(r, "complete" if complete else "failed", "round_complete" if complete else "round_failed")
        assert got.status == want, (got, want, r, epoch)

    @precondition(_aggregating)
    @rule(which=WHICH, skew=SKEW)
    def finalize(self, which, skew):
        self._finish(which, skew, complete=True)

    @precondition(_aggregating)
    @rule(which=WHICH, skew=SKEW)
    def fail(self, which, skew):
        self._finish(which, skew, complete=False)

    @rule(which=WHICH, skew=SKEW, complete=st.booleans())
    def end_whenever(self, which, skew, complete):
        """finalize or fail whatever the round's state: mostly bad_state, already or stale."""
        self._finish(which, skew, complete)

    # -- time and the sweep --------------------------------------------------------------------

    @rule(dt=st.sampled_from([0.5, 61.0, 101.0]))
    def tick(self, dt):
        self.now += dt

    @precondition(_aggregating)
    @rule(progress=st.lists(st.booleans(), min_size=1, max_size=3))
    def lost_message(self, progress):
        """The aggregating round's task message was lost: nobody renews its lease, and the sweep re-sends;
        each re-sent shard that records is progress, and a re-send without progress is stuck (checked
        against the model by the redispatch rule)."""
        rnd = self.rounds[self.current]
        for recorded in [*progress, False]:
            if rnd.state != "aggregating":
                return
            self.now = max(self.now, rnd.lease_until + 0.5)
            self.redispatch(0)
            total = rnd.shard_total or 3
            missing = [k for k in range(total) if k not in rnd.shards]
            if recorded and missing:
                self.shard_done(0, missing[0], total, 0)

    @rule()
    def sweep(self):
        """What the sweep does with ``due``: close what is due; for an expired lease re-send under the same
        epoch, and only when a re-send made no progress reclaim (or, after too many tries, fail)."""
        due, stale = self.state.due(FED, now=self.now)
        assert due == sorted(r for r, t in self.deadlines.items() if t <= self.now)
        assert stale == sorted(r for r, t in self.leases.items() if t <= self.now)
        for r in due:
            assert self.state.close(FED, r, "deadline", now=self.now).status == self._close(r, "deadline")
        for r in stale:
            info = self.state.round(FED, r)
            rnd = self.rounds[r]
            if info.state == "aggregating":
                again = self.state.redispatch(FED, r, now=self.now)
                assert again.status == self._redispatch(r), again
                if again.status != "stuck":
                    continue
            if info.state == "aggregating" and info.reclaims + 1 >= ATTEMPTS:
                assert self.state.fail(FED, r, info.epoch, "gave up", now=self.now).status == "ok"
                self._end(r, "failed", "round_failed")
                continue
            assert rnd.state == info.state
            assert self.state.reclaim(FED, r, now=self.now).status == self._reclaim(r)

    # -- the invariants ------------------------------------------------------------------

    @invariant()
    def redis_matches_model(self):
        if not self.rounds:
            return
        k = FederationKeys(FED)
        assert self.state.current_round(FED) == self.current
        assert self.state.latest_complete(FED) == self.latest_complete
        for r, rnd in self.rounds.items():
            info = self.state.round(FED, r)
            assert (info.state, info.n, info.epoch) == (rnd.state, rnd.n, rnd.epoch), (r, info)
            assert info.deadline == pytest.approx(rnd.deadline)
            if rnd.lease_until is not None:
                assert info.lease_until == pytest.approx(rnd.lease_until)
            assert (info.extensions, info.reclaims, info.lease_extensions, info.resends) == (
                rnd.extensions,
                rnd.reclaims,
                rnd.lease_extensions,
                rnd.resends,
            )
            assert dict(info.shas) == rnd.shas and dict(info.evicted) == rnd.evicted
            assert info.selected == rnd.selected
            assert set(self.state.deltas(FED, r)) == set(rnd.shas)
            assert (info.shards, self.state.shards(FED, r)) == (rnd.shard_total, rnd.shards)
        assert not self.redis.exists(k.round(self.current + 1))
        assert _zset(self.redis, k.deadlines) == pytest.approx(self.deadlines)
        assert _zset(self.redis, k.leases) == pytest.approx(self.leases)
        assert sorted(c.client_id for c in self.registry.list() if c.revoked) == sorted(
            c for c, revoked in self.clients.items() if revoked
        )

        events = EventLog(self.redis, FED).read(count=100_000)
        assert collections.Counter((e.round, e.type.value) for e in events) == self.events
        # the properties the model exists for: only the current round is open or aggregating; each
        # round fired (closed) at most once and ended at most once, and only after firing or by an abort
        live = [r for r, rnd in self.rounds.items() if rnd.state in ("open", "aggregating")]
        assert live == [self.current]
        for r, rnd in self.rounds.items():
            closes = [
                e
                for e in events
                if e.round == r and e.type == EventType.ROUND_AGGREGATING and e.get("reason") in CLOSES
            ]
            assert [e.get("reason") for e in closes] == self.fired_reasons[r]
            assert len(closes) <= 1
            if rnd.state in ("complete", "failed"):
                assert len(closes) == 1
            ends = [e for e in events if e.round == r and e.terminal]
            assert len(ends) == (rnd.state not in ("open", "aggregating"))
            opened = [e for e in events if e.round == r and e.type == EventType.ROUND_OPENED]
            assert [tuple(e.get("selected", ())) for e in opened] == [rnd.selected]


def _zset(redis, key) -> dict[int, float]:
    return {int(m): s for m, s in redis.zrange(key, 0, -1, withscores=True)}


def test_round_scripts_in_random_interleavings(redis_server, real_redis):
    finishers = [
        RoundState(redis_lib.Redis.from_url(redis_server.url, decode_responses=True), lease_s=int(LEASE))
        for _ in range(4)
    ]
    run_state_machine_as_test(
        lambda: RoundMachine(real_redis, redis_server.url, finishers),
        settings=settings(
            max_examples=EXAMPLES,
            stateful_step_count=50,
            deadline=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        ),
    )
