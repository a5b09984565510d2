"""``train``'s waits in a buffered federation, over redis-server: a client not drawn for the open buffer waits
for one that draws it, and one holding its allowance (--max-per-client-per-flush) in the open buffer waits
for that buffer to flush."""

from __future__ import annotations

import dataclasses
import threading
import time
from types import SimpleNamespace

import pytest

from chorus_mq.errors import Timeout
from chorus_mq.state import ClientRegistry
from chorus_mq.training.buffered_loop import (
    BufferedState,
    Contribution,
    _wait_for_own_buffers,
    _wait_until_drawn,
)

from ..state.support import make_state, record

pytestmark = pytest.mark.services

BUFFERED = {"mode": "buffered", "relative_clip": 0.0}
CLIENTS = [f"org-{i}" for i in range(4)]


def test_an_undrawn_client_waits_for_a_buffer_that_draws_it(real_redis):
    state = make_state(real_redis, quorum=2, clients_per_round=2, round_timeout=600, **BUFFERED)
    registry = ClientRegistry(real_redis, "fed")
    for c in CLIENTS:
        registry.add(c)
    state.abort("fed", 1, "clients registered: draw again")
    outsider = next(c for c in CLIENTS if c not in state.round("fed", 2).selected)
    sdk = SimpleNamespace(state=state)
    with pytest.raises(Timeout, match=f"no buffer of 'fed' drew client '{outsider}'"):
        _wait_until_drawn(sdk, "fed", outsider, timeout=0.3, poll=0.05)

    def flush_until_drawn() -> None:
        time.sleep(0.2)
        while outsider not in (info := state.round("fed", state.current_round("fed"))).selected:
            for c in info.selected:
                state.register("fed", info.round, dataclasses.replace(record(c, f"{info.round:064x}"), base_version=0))

    flusher = threading.Thread(target=flush_until_drawn)
    flusher.start()
    _wait_until_drawn(sdk, "fed", outsider, timeout=30, poll=0.05)
    flusher.join()
    assert outsider in state.round("fed", state.current_round("fed")).selected
    assert state.current_round("fed") > 2


def test_a_client_waits_only_once_it_holds_its_allowance(real_redis, tmp_path):
    state = make_state(real_redis, quorum=5, max_per_client_per_flush=2, **BUFFERED)
    sdk = SimpleNamespace(state=state)
    mine = BufferedState(tmp_path / "state.json", [Contribution(1, "a" * 64, 1, 0, "u1")])
    _wait_for_own_buffers(sdk, "fed", mine, 2, timeout=0.3, poll=0.05)  # one of two: no wait
    with pytest.raises(Timeout, match="buffer 1 of 'fed' did not flush"):
        _wait_for_own_buffers(sdk, "fed", mine, 1, timeout=0.3, poll=0.05)
    mine.contributions.append(Contribution(2, "b" * 64, 1, 0, "u2"))
    with pytest.raises(Timeout, match="buffer 1 of 'fed' did not flush"):
        _wait_for_own_buffers(sdk, "fed", mine, 2, timeout=0.3, poll=0.05)
    for c in ("p", "q", "r", "s", "t"):
        state.register("fed", 1, dataclasses.replace(record(c), base_version=0))
    _wait_for_own_buffers(sdk, "fed", mine, 2, timeout=0.3, poll=0.05)  # buffer 1 flushed
