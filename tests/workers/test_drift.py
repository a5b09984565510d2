"""Cosines to the aggregate through the worker path (eager): shards, missing modules, clipping, DP, the switch."""

from __future__ import annotations

import pytest
import torch

from ..deltas import make_federation, random_factors, write_adapter

pytestmark = pytest.mark.services

F64 = torch.float64
MODULES = ("layers.0.q", "layers.0.v", "layers.1.q", "layers.1.v")
#: client -> (modules it trains, dataset size); c2 leaves two modules out (a zero update under its weight)
CLIENTS = {"c0": (MODULES, 100), "c1": (MODULES, 300), "c2": (MODULES[:2], 200)}
SCALING = 2.0  # alpha 8 / rank 4


def _upload(sdk, tmp_path, federation: str = "fed", seed: int = 0) -> dict:
    factors = {}
    for i, (client, (modules, size)) in enumerate(CLIENTS.items()):
        mine = random_factors(seed + i, modules=modules)
        if client == "c1":  # a larger update, sign flipped, on one module
            mine[MODULES[0]] = (mine[MODULES[0]][0], -3 * mine[MODULES[0]][1])
        factors[client] = mine
        path = write_adapter(tmp_path / f"{federation}-{client}.safetensors", mine)
        sdk.upload(federation, path, client, dataset_size=size)
    return factors


def _dense(factors: dict) -> dict[str, float]:
    """float64 oracle: every update dense, zero blocks for modules a client did not send."""
    total = sum(size for _, size in CLIENTS.values())
    vectors = {}
    for client, mine in factors.items():
        blocks = []
        for m in MODULES:
            if m in mine:
                A, B = mine[m]
                blocks.append((SCALING * B.to(F64) @ A.to(F64)).flatten())
            else:
                blocks.append(torch.zeros(16 * 12, dtype=F64))
        vectors[client] = torch.cat(blocks)
    g = sum(CLIENTS[c][1] / total * v for c, v in vectors.items())
    return {c: float(v @ g / (v.norm() * g.norm())) for c, v in vectors.items()}


def _cosines(sdk, federation: str = "fed") -> dict[str, float | None]:
    return sdk.round(federation, 1, cosines=True).cosine


@pytest.mark.parametrize("shard_bytes", [1 << 30, 1])
def test_cosines_through_shards_equal_the_dense_oracle(make_sdk, tmp_path, shard_bytes):
    sdk = make_sdk(shard_bytes=shard_bytes)
    make_federation(sdk, "fed", quorum=3, factors=random_factors(0, modules=MODULES))
    want = _dense(_upload(sdk, tmp_path))
    got = _cosines(sdk)
    assert set(got) == set(CLIENTS)
    for client in CLIENTS:
        assert got[client] == pytest.approx(want[client], abs=2e-6)
    assert len({round(v, 2) for v in want.values()}) == 3  # three clients, three directions
    manifest = sdk.pull("fed", tmp_path / "pulled")
    assert len(manifest.shards) == (1 if shard_bytes > 1 else 4)


def test_no_cosines_when_switched_off(make_sdk, tmp_path):
    sdk = make_sdk(round_cosines=False)
    make_federation(sdk, "fed", quorum=3, factors=random_factors(0, modules=MODULES))
    _upload(sdk, tmp_path)
    assert _cosines(sdk) == dict.fromkeys(CLIENTS)
    complete = [e for e in sdk.watch("fed", from_start=True, until_round=1, timeout=5) if e.type == "round_complete"]
    assert "cosine" not in complete[0].fields


def test_no_cosines_under_server_side_dp(sdk, tmp_path):
    # a per-client statistic of the updates is not part of the release the noise protects
    make_federation(
        sdk, "fed", quorum=3, factors=random_factors(0, modules=MODULES), clip_norm=1.0, dp_noise_multiplier=1.0
    )
    _upload(sdk, tmp_path)
    assert _cosines(sdk) == dict.fromkeys(CLIENTS)


def test_a_record_over_the_inbox_limit_is_refused_before_it_is_sent(sdk, tmp_path):
    from chorus_mq.errors import TooLarge
    from chorus_mq.state.inbox import Inbox

    make_federation(sdk, "fed", quorum=1)  # no declared labels: any names, within the message's bounds
    counts = {f"label-{i:04d}-{'x' * 200}": i for i in range(100)}
    path = write_adapter(tmp_path / "a.safetensors", random_factors(0))
    with pytest.raises(TooLarge, match=r"bytes \(its label_counts name 100 labels\), over the 16384-byte limit"):
        sdk.upload("fed", path, "alice", label_counts=counts)
    assert Inbox(sdk.redis, "fed", None).length() == 0 and sdk.round("fed", 1).n == 0
