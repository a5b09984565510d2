"""`chorus-mq client revoke` on the running stack: the revoked client's accepted delta leaves the open round
(the fenced evict transition, a ``delta_evicted`` event), the command says so, and the round completes
without it: the revoked client is neither in the manifest nor counted toward the quorum."""

from __future__ import annotations

import pytest

from chorus_mq.names import RoundStatus
from chorus_mq.state import FederationConfig

from ..deltas import declared, random_factors, write_adapter
from ..topology import wait_for
from .stack import events, manifest_of

pytestmark = [pytest.mark.e2e, pytest.mark.services]

MODULES = ("layers.0.q", "layers.0.v")


def test_revoke_evicts_the_clients_delta_from_the_open_round(stack, tmp_path):
    fed = "revoke-fed"
    op = stack.operator()
    op.create_federation(
        FederationConfig(name=fed, base_model="m", quorum=3), model=declared(random_factors(0, modules=MODULES))
    )
    creds = {c: stack.add_client(fed, c) for c in ("alice", "bob", "carol", "dave")}

    def upload(i: int, client: str):
        path = write_adapter(tmp_path / f"{client}.safetensors", random_factors(10 + i, modules=MODULES))
        res = stack.client(creds[client]).upload(fed, path, client, dataset_size=10, timeout=60)
        assert (res.status, res.round) == ("accepted", 1), res
        return res

    alice = upload(0, "alice")
    upload(1, "bob")
    assert op.state.round(fed, 1).n == 2

    out = stack.cli("client", "revoke", "alice", "--federation", fed).stdout
    assert "client alice revoked" in out and "warning" not in out  # three active clients, a quorum of 3
    assert f"its delta {alice.sha256[:12]} was evicted from open round 1 (1 deltas left" in out
    info = op.state.round(fed, 1)
    assert (info.state, info.n, sorted(info.shas), info.evicted) == (
        RoundStatus.OPEN,
        1,
        ["bob"],
        {"alice": alice.sha256},
    )
    assert sorted(op.state.deltas(fed, 1)) == ["bob"]
    evicted = [e for e in events(op, fed) if e["type"] == "delta_evicted"]
    assert [(e["client"], e["sha256"], e["round"]) for e in evicted] == [("alice", alice.sha256, 1)]
    assert "revoked" in evicted[0]["reason"]
    again = stack.cli("client", "revoke", "alice", "--federation", fed).stdout  # nothing left to evict
    assert "it has no delta in the current round 1" in again

    upload(2, "carol")
    assert op.state.round(fed, 1).state == RoundStatus.OPEN  # alice no longer counts toward the quorum
    upload(3, "dave")
    wait_for(lambda: op.state.round(fed, 1).state == RoundStatus.COMPLETE, 120, "round 1 to complete")
    assert [c["client_id"] for c in manifest_of(op, fed, 1)["clients"]] == ["bob", "carol", "dave"]
