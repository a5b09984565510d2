"""Buffered federations in the round scripts: a buffer fires at K and the next opens in the same
transition, a delta lands in one flush only, stale and unversioned deltas are refused."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import redis as redis_lib

from chorus_mq.errors import ConfigError
from chorus_mq.state import ClientRegistry, FederationConfig, RoundState
from chorus_mq.state.events import EventLog
from chorus_mq.state.selection import draw, redraw_label

from .support import make_state, record, url_of

MANIFEST_SHA = "ab" * 32
BUFFERED = {"mode": "buffered", "relative_clip": 0.0, "max_staleness": 2}


def _rec(client: str, base: int | None = 0, sha: str | None = None):
    return dataclasses.replace(record(client, sha), base_version=base)


def test_a_full_buffer_fires_and_the_next_opens_at_once(either_redis):
    state = make_state(either_redis, quorum=2, **BUFFERED)
    assert state.register("fed", 1, _rec("a")).status == "accepted"
    fired = state.register("fed", 1, _rec("b"))
    assert fired.status == "fired"
    assert state.round("fed", 1).state == "aggregating"
    assert state.round("fed", 2).state == "open" and state.current_round("fed") == 2
    # the same client uploads again at once: into buffer 2, while flush 1 aggregates
    assert state.register("fed", 2, _rec("a", sha="c" * 64)).status == "accepted"
    assert state.register("fed", 2, _rec("c")).status == "fired"
    assert state.round("fed", 3).state == "open"
    # flush 1 commits after buffer 2 fired: round 2 stays as it is (aggregating), 3 stays open
    assert state.finalize("fed", 1, fired.epoch, "k", MANIFEST_SHA).status == "ok"
    assert state.round("fed", 2).state == "aggregating" and state.round("fed", 3).n == 0
    assert state.latest_complete("fed") == 1 and state.current_round("fed") == 3
    opened = [e.round for e in EventLog(either_redis, "fed").read() if e.type == "round_opened"]
    assert opened == [1, 2, 3]


def test_a_delta_never_lands_in_two_buffers(either_redis):
    state = make_state(either_redis, quorum=2, **BUFFERED)
    state.register("fed", 1, _rec("a"))
    state.register("fed", 1, _rec("b"))
    again = state.register("fed", 2, _rec("a"))  # the very bytes re-sent after buffer 1 fired
    assert (again.status, again.detail) == ("duplicate", "round 1")
    assert state.round("fed", 2).n == 0 and state.deltas("fed", 2) == {}
    # a different delta of a client already in the open buffer: the per-flush allowance (1)
    state.register("fed", 2, _rec("c"))
    assert state.register("fed", 2, _rec("c", sha="d" * 64)).status == "conflict"


def test_stale_future_and_missing_base_versions_are_refused(either_redis):
    state = make_state(either_redis, quorum=1, **BUFFERED)
    for r in (1, 2, 3):
        fired = state.register("fed", r, _rec(f"c{r}", base=r - 1))
        assert fired.status == "fired"
        assert state.finalize("fed", r, fired.epoch, f"k{r}", MANIFEST_SHA).status == "ok"
    assert state.latest_complete("fed") == 3
    stale = state.register("fed", 4, _rec("x", base=0))
    assert (stale.status, stale.detail) == ("stale", "3")
    future = state.register("fed", 4, _rec("x", base=4))
    assert (future.status, future.detail) == ("future_base", "3")
    assert state.register("fed", 4, _rec("x", base=None)).status == "no_base"
    assert state.round("fed", 4).n == 0
    assert state.register("fed", 4, _rec("x", base=1)).status == "fired"  # exactly max_staleness behind


def test_a_flush_timeout_fires_with_min_buffer_and_opens_the_next(either_redis):
    state = make_state(either_redis, quorum=5, min_quorum=2, round_timeout=10, **BUFFERED)
    state.register("fed", 1, _rec("a"), now=1001.0)
    assert state.close("fed", 1, "deadline", now=1011.0).status == "extended"  # 1 < min-buffer 2
    state.register("fed", 1, _rec("b"), now=1012.0)
    assert state.close("fed", 1, "deadline", now=1015.0).status == "not_due"
    assert state.close("fed", 1, "deadline", now=1030.0).status == "fired"
    assert state.round("fed", 1).state == "aggregating" and state.round("fed", 2).state == "open"
    assert state.current_round("fed") == 2


def test_sync_rounds_ignore_base_versions(either_redis):
    state = make_state(either_redis, quorum=1)
    assert state.register("fed", 1, _rec("a", base=None)).status == "fired"
    assert state.current_round("fed") == 1  # round 2 opens at commit, as before
    assert not state.redis.exists(state.keys("fed").round(2)) and not state.redis.exists(state.keys("fed").ledger)


def test_a_client_holds_up_to_its_allowance_in_one_buffer(either_redis):
    state = make_state(either_redis, quorum=5, **{**BUFFERED, "max_per_client_per_flush": 3})
    for k, base in ((1, 0), (2, 0), (3, 0)):
        assert state.register("fed", 1, _rec("a", base=base, sha=f"{k:064x}")).status == "accepted"
    assert set(state.deltas("fed", 1)) == {"a", "a#2", "a#3"}
    assert {rec.sha256 for rec in state.deltas("fed", 1).values()} == {f"{k:064x}" for k in (1, 2, 3)}
    info = state.round("fed", 1)
    assert info.n == 3 and info.clients == ["a"] and info.shas_of("a") == [f"{k:064x}" for k in (1, 2, 3)]
    # the same bytes again are a no-op, whichever term holds them; a fourth delta is over the allowance
    again = state.register("fed", 1, _rec("a", sha=f"{2:064x}"))
    assert (again.status, again.n) == ("duplicate", 3)
    over = state.register("fed", 1, _rec("a", sha=f"{4:064x}"))
    assert (over.status, over.detail) == ("conflict", f"{3:064x}")
    assert state.round("fed", 1).n == 3 and len(state.deltas("fed", 1)) == 3
    assert state.register("fed", 1, _rec("b")).status == "accepted"
    assert state.register("fed", 1, _rec("b", sha=f"{5:064x}")).status == "fired"
    # the next buffer gives the client its allowance afresh; a delta of the fired buffer stays a duplicate there
    assert state.register("fed", 2, _rec("a", sha=f"{4:064x}")).status == "accepted"
    assert (state.register("fed", 2, _rec("a", sha=f"{1:064x}")).detail) == "round 1"
    assert set(state.deltas("fed", 2)) == {"a"}


def test_eviction_takes_every_delta_of_the_client(either_redis):
    state = make_state(either_redis, quorum=5, **{**BUFFERED, "max_per_client_per_flush": 2})
    state.register("fed", 1, _rec("a", sha=f"{1:064x}"))
    state.register("fed", 1, _rec("b"))
    state.register("fed", 1, _rec("a", sha=f"{2:064x}"))
    out = state.evict("fed", 1, "a", "test")
    assert (out.status, out.n, out.detail) == ("evicted", 1, f"{1:064x},{2:064x}")
    assert set(state.deltas("fed", 1)) == {"b"} and state.round("fed", 1).clients == ["b"]
    assert state.register("fed", 1, _rec("a", sha=f"{2:064x}")).status == "evicted"
    assert state.register("fed", 1, _rec("a", sha=f"{3:064x}")).status == "accepted"


@pytest.mark.services
def test_racing_deltas_of_one_client_never_exceed_its_allowance(real_redis):
    """30 different deltas of one client race into one open buffer: exactly its allowance (3) is taken."""
    state = make_state(real_redis, quorum=50, **{**BUFFERED, "max_per_client_per_flush": 3})
    statuses: list[str] = []
    lock = threading.Lock()

    def go(i: int) -> None:
        own = RoundState(redis_lib.Redis.from_url(url_of(real_redis), decode_responses=True), lease_s=100)
        res = own.register("fed", 1, _rec("a", sha=f"{i:064x}"))
        with lock:
            statuses.append(res.status)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses.count("accepted") == 3 and statuses.count("conflict") == 27
    assert state.round("fed", 1).n == 3 and set(state.deltas("fed", 1)) == {"a", "a#2", "a#3"}


@pytest.mark.services
@pytest.mark.parametrize("allowance", [1, 2])
def test_two_buffers_of_racing_uploads_lose_nothing_and_share_nothing(real_redis, allowance):
    """60 deltas race into K = 10 buffers, each retrying into the current buffer when its own fired: every
    delta is in exactly one buffer, every full buffer has exactly K. With an allowance of 2, 30 clients send
    two deltas each (both may land in one buffer)."""
    state = make_state(real_redis, quorum=10, **{**BUFFERED, "max_per_client_per_flush": allowance})
    statuses: list[str] = []
    lock = threading.Lock()

    def go(i: int) -> None:
        own = RoundState(redis_lib.Redis.from_url(url_of(real_redis), decode_responses=True), lease_s=100)
        rec = _rec(f"c{i // allowance}", sha=f"{i:064x}")
        for _ in range(20):
            r = own.current_round("fed")
            res = own.register("fed", r, rec)
            if res.status != "closed":
                break
        # a re-send of the same bytes anywhere later is a duplicate
        again = own.register("fed", own.current_round("fed"), rec)
        with lock:
            statuses.extend([res.status, again.status])

    threads = [threading.Thread(target=go, args=(i,)) for i in range(60)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    owners: dict[str, int] = {}
    for r in range(1, state.current_round("fed") + 1):
        for rec in state.deltas("fed", r).values():
            assert rec.sha256 not in owners, f"{rec.sha256} in rounds {owners[rec.sha256]} and {r}"
            owners[rec.sha256] = r
            assert rec.client_id == f"c{int(rec.sha256, 16) // allowance}"
    assert sorted(owners) == sorted(f"{i:064x}" for i in range(60))
    assert statuses.count("fired") == 6 and statuses.count("duplicate") == 60
    for r in range(1, 7):
        assert state.round("fed", r).state == "aggregating" and state.round("fed", r).n == 10
    assert state.round("fed", 7).state == "open" and state.round("fed", 7).n == 0


SAMPLED = [f"org-{i}" for i in range(6)]


def test_a_sampled_buffered_federation_draws_each_buffer_and_redraws_a_short_one(either_redis):
    """--clients-per-round 3 of 6: each buffer is drawn as it opens (the sync rule, per round number); an
    undrawn client's delta is not_selected; a buffer its flush timeout finds short of --min-buffer keeps its
    deltas and is drawn again under 'r.e'."""
    state = make_state(
        either_redis, quorum=3, min_quorum=2, round_timeout=10, clients_per_round=3, seed="pinned", **BUFFERED
    )
    registry = ClientRegistry(either_redis, "fed")
    for c in SAMPLED:
        registry.add(c)
    state.abort("fed", 1, "clients registered: draw again", now=1000.0)  # buffer 2 drawn from all six
    drawn = []
    for r in (2, 3, 4):
        chosen = state.round("fed", r).selected
        assert chosen == draw("pinned", r, SAMPLED, 3)
        drawn.append(chosen)
        outsider = next(c for c in SAMPLED if c not in chosen)
        assert state.register("fed", r, _rec(outsider), now=1001.0).status == "not_selected"
        for c in chosen:
            reply = state.register("fed", r, _rec(c, sha=f"{r:032x}{SAMPLED.index(c):032x}"), now=1001.0)
        assert reply.status == "fired" and state.round("fed", r).n == 3
    assert len(set(drawn)) > 1  # drawn again per buffer
    # buffer 5: one delta by the flush timeout (min-buffer 2): kept, and the buffer drawn again
    first = state.round("fed", 5).selected
    assert state.register("fed", 5, _rec(first[0], sha="e" * 64), now=1002.0).status == "accepted"
    assert state.close("fed", 5, "deadline", now=1020.0).status == "extended"
    again = state.round("fed", 5)
    assert again.selected == draw("pinned", redraw_label(5, 1), SAMPLED, 3) != first
    assert again.n == 1 and again.state == "open" and set(state.deltas("fed", 5)) == {first[0]}
    newcomer = next(c for c in again.selected if c not in first)
    assert state.register("fed", 5, _rec(newcomer, sha="f" * 64), now=1021.0).status == "accepted"
    extended = [e for e in EventLog(either_redis, "fed").read() if e.type == "round_extended"]
    assert tuple(extended[-1].get("selected")) == again.selected


def test_a_sampled_buffered_federation_needs_a_flush_timeout(either_redis):
    with pytest.raises(ConfigError, match="needs --flush-timeout SECONDS in a buffered federation"):
        make_state(either_redis, quorum=2, clients_per_round=3, **BUFFERED)
    with pytest.raises(ConfigError, match="quorum 7 can never be reached with 3 clients per round sending up to 2"):
        FederationConfig(
            name="f", base_model="m", quorum=7, clients_per_round=3, max_per_client_per_flush=2, **BUFFERED
        )
    FederationConfig(name="f", base_model="m", quorum=6, clients_per_round=3, max_per_client_per_flush=2, **BUFFERED)


def test_buffered_config_refuses_what_it_does_not_build():
    base = {"name": "f", "base_model": "m", "quorum": 2, **BUFFERED}
    FederationConfig(**base)
    for strategy in ("svd", "ffa-lora", "fed-sb"):
        FederationConfig(**base, strategy=strategy)
    for strategy in ("fedex-lora", "svd", "ffa-lora", "fed-sb"):  # server-side DP per flush: each delta clipped
        FederationConfig(**base, strategy=strategy, dp_noise_multiplier=1.0, clip_norm=1.0)
    for strategy in ("fedex-lora", "svd", "ffa-lora", "fed-sb"):  # norm bounds on each delta's own update
        FederationConfig(**{**base, "relative_clip": 10.0}, strategy=strategy, clip_norm=1.0)
    for bad, match in (
        ({"strategy": "fedavg"}, "fedex-lora, svd, ffa-lora, fed-sb; fedavg is not supported: fedavg has no"),
        ({"strategy": "stack"}, "stack is not supported: stack's clients train from a truncation"),
        ({"strategy": "rolora"}, "rolora is not supported: rolora alternates the trained factor every version"),
        ({"scaffold": True}, "--scaffold"),
        ({"server_opt": "fedadam"}, "not built for --mode buffered"),
        ({"screen_outliers": True}, "--screen-outliers"),
        ({"robust_aggregate": "geomedian"}, "--robust-aggregate"),
        ({"max_per_client_per_flush": 0}, "at least 1"),
        ({"expire_policy": "expire", "round_timeout": 5}, "--expire-policy expire"),
        ({"staleness_weight": "poly"}, "poly:A"),
        ({"max_staleness": -1}, "--max-staleness"),
    ):
        with pytest.raises(ConfigError, match=match):
            FederationConfig(**{**base, **bad})
    with pytest.raises(ConfigError, match="applies only to --mode buffered"):
        FederationConfig(name="f", base_model="m", quorum=2, max_staleness=3)
    cfg = FederationConfig(**base, server_lr=0.5, staleness_weight="hinge:10,4")
    assert FederationConfig.from_hash(cfg.to_hash()) == cfg
    with pytest.raises(ConfigError, match="--base-version"):
        cfg.check_upload(None, None)
    with pytest.raises(ConfigError, match="not a round"):
        cfg.check_upload(3, 2)
    cfg.check_upload(None, 0)
