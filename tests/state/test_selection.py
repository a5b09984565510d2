"""Client sampling: the scripts draw K active clients per round from a secret seed, the Python rule agrees,
and a configuration whose sampled rounds could wait for ever is refused."""

from __future__ import annotations

import pytest

from chorus_mq.errors import ConfigError
from chorus_mq.state import ClientRegistry, EventLog, FederationConfig, FederationKeys, RoundState
from chorus_mq.state.selection import draw, next_selected_round, rank_key, selected_in

from .support import Decl, fake_with_sha1hex, make_state, record, sha_of

CLIENTS = [f"org-{i:02d}" for i in range(12)]
MANIFEST = sha_of("m")


#: what client sampling needs: a deadline that ends a round whose drawn clients stay away, and draws again
DEADLINE = {"round_timeout": 60, "expire_policy": "expire"}


def _sampled(redis, k=4, quorum=2, clients=CLIENTS, seed="pinned-seed", name="fed", **cfg) -> RoundState:
    """A federation whose clients are registered before round 1 is drawn (as ``train`` sees it from round 2)."""
    state = make_state(redis, name=name, quorum=quorum, clients_per_round=k, seed=seed, **{**DEADLINE, **cfg})
    registry = ClientRegistry(redis, name)
    for c in clients:
        registry.add(c)
    state.abort(name, 1, "clients registered: draw again", now=1000.0)
    return state


def _finish(state, r, clients, federation="fed"):
    for c in clients:
        reply = state.register(federation, r, record(c))
    assert reply.status == "fired"
    state.finalize(federation, r, reply.epoch, f"k{r}", MANIFEST)


@pytest.mark.services
def test_sha1hex_stand_in_agrees_with_redis(real_redis):
    fake, script = fake_with_sha1hex(), "return redis.sha1hex(ARGV[1])"
    for text in ("pinned-seed:2:org-01", "", "ü:1:a"):
        assert fake.eval(script, 0, text) == real_redis.eval(script, 0, text)
    assert real_redis.eval(script, 0, "s:3:c") == rank_key("s", 3, "c")


def test_each_round_draws_what_the_python_rule_draws(either_redis):
    state = _sampled(either_redis)
    drawn = []
    for r in range(2, 8):
        info = state.round("fed", r)
        want = draw("pinned-seed", r, CLIENTS, 4)
        assert info.selected == want and len(want) == 4
        drawn.append(want)
        _finish(state, r, want[:2])
    assert len(set(drawn)) > 1  # it changes from round to round
    opened = [e for e in EventLog(either_redis, "fed").read() if e.type == "round_opened" and e.round >= 2]
    assert [tuple(e.get("selected")) for e in opened[:6]] == drawn


def test_an_unselected_client_is_refused_and_told_when(either_redis):
    state = _sampled(either_redis)
    chosen = state.round("fed", 2).selected
    outsider = next(c for c in CLIENTS if c not in chosen)
    refused = state.register("fed", 2, record(outsider))
    assert refused.status == "not_selected"
    assert state.round("fed", 2).n == 0 and state.deltas("fed", 2) == {}
    nxt = state.next_selected_round("fed", outsider, after_round=2)
    assert nxt is not None and nxt > 2
    for r in range(2, nxt):
        assert outsider not in state.round("fed", r).selected
        _finish(state, r, state.round("fed", r).selected[:2])
    assert outsider in state.round("fed", nxt).selected
    assert state.register("fed", nxt, record(outsider)).status == "accepted"


def test_revoked_clients_are_never_drawn(either_redis):
    state = _sampled(either_redis, k=3)
    registry = ClientRegistry(either_redis, "fed")
    for c in CLIENTS[:9]:
        registry.revoke(c)
    _finish(state, 2, state.round("fed", 2).selected[:2])
    assert state.round("fed", 3).selected == tuple(CLIENTS[9:])
    assert state.next_selected_round("fed", CLIENTS[0], after_round=3) is None


def test_too_few_active_clients_leaves_the_round_open_to_all(either_redis):
    state = make_state(either_redis, quorum=2, clients_per_round=3, **DEADLINE)
    assert state.round("fed", 1).selected == ()  # drawn before anyone was registered
    registry = ClientRegistry(either_redis, "fed")
    registry.add("a")
    registry.add("b")
    assert state.register("fed", 1, record("a")).status == "accepted"
    assert state.next_selected_round("fed", "b", after_round=1) == 2
    assert state.next_selected_round("fed", "nobody", after_round=1) is None
    opened = [e for e in EventLog(either_redis, "fed").read() if e.type == "round_opened"]
    assert "selected" not in opened[0].fields


def test_an_unsampled_federation_never_refuses(either_redis):
    state = make_state(either_redis, quorum=2)
    ClientRegistry(either_redis, "fed").add("a")
    assert state.register("fed", 1, record("zed")).status == "accepted"
    assert state.round("fed", 1).selected == ()


def test_every_opening_script_draws(either_redis):
    state = _sampled(either_redis, k=4, quorum=4, round_timeout=10)  # round 2 via abort
    assert state.round("fed", 2).selected == draw("pinned-seed", 2, CLIENTS, 4)
    assert state.close("fed", 2, "deadline", now=5000.0).status == "expired"
    assert state.round("fed", 3).selected == draw("pinned-seed", 3, CLIENTS, 4)
    sel = state.round("fed", 3).selected
    for c in sel:
        fired = state.register("fed", 3, record(c), now=5001.0)
    assert state.fail("fed", 3, fired.epoch, "x", now=5002.0).status == "ok"
    assert state.round("fed", 4).selected == draw("pinned-seed", 4, CLIENTS, 4)


@pytest.mark.parametrize("k", [1, 3, 7])
def test_selected_in_agrees_with_draw(k):
    for r in range(1, 30):
        chosen = draw("seed", r, CLIENTS, k)
        assert [c for c in CLIENTS if selected_in("seed", r, c, CLIENTS, k)] == list(chosen)


def test_next_selected_round_is_the_first_draw_that_has_the_client():
    for client in CLIENTS:
        r = next_selected_round("seed", client, CLIENTS, 2, after_round=10)
        assert r is not None and r > 10
        assert client in draw("seed", r, CLIENTS, 2)
        assert all(client not in draw("seed", q, CLIENTS, 2) for q in range(11, r))


@pytest.mark.parametrize(
    ("cfg", "needs"),
    [
        ({"clients_per_round": 2}, "--round-timeout"),  # the finding: K 2, quorum 2, no deadline
        ({"clients_per_round": 3, "round_timeout": 60}, "--expire-policy expire"),  # extend waits on the same draw
        ({"clients_per_round": 3, "round_timeout": 60, "expire_policy": "extend", "min_quorum": 1}, "expire"),
    ],
)
def test_a_sampled_federation_that_could_wait_for_ever_is_refused(either_redis, cfg, needs):
    state = RoundState(either_redis)
    with pytest.raises(ConfigError, match=needs) as refused:
        state.create_federation(FederationConfig(name="fed", base_model="tiny", quorum=2, **cfg), Decl())
    assert "for ever" in str(refused.value)
    assert either_redis.keys("*") == []  # nothing written
    ok = FederationConfig(name="fed", base_model="tiny", quorum=2, **{**cfg, **DEADLINE})
    assert state.create_federation(ok, Decl()).status == "created"


def test_the_seed_is_secret_and_draws_differ_between_federations(either_redis):
    """Two federations with the same public parameters and clients draw differently: the seed is theirs alone."""
    feds = ("fed-a", "fed-b")
    state = _sampled(either_redis, k=3, name=feds[0], seed=None)
    _sampled(either_redis, k=3, name=feds[1], seed=None)
    seeds = {state.selection_seed(f) for f in feds}
    assert len(seeds) == 2 and all(len(s) == 32 for s in seeds)
    for f in feds:  # not among anything a client may read of its federation
        public = [*either_redis.hvals(FederationKeys(f).meta), *either_redis.hvals(FederationKeys(f).round(2))]
        assert not any(seed in value for seed in seeds for value in public)
    draws: dict[str, list[tuple[str, ...]]] = {f: [] for f in feds}
    for r in range(2, 12):  # ten draws of 3 in 12 each: equal by chance with probability 220**-10
        for f in feds:
            selected = state.round(f, r).selected
            assert selected == draw(state.selection_seed(f), r, CLIENTS, 3)
            draws[f].append(selected)
            _finish(state, r, selected[:2], federation=f)
    assert draws[feds[0]] != draws[feds[1]]
