"""Cosines of client updates to the round's aggregate, from factors, against float64 dense oracles."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from agg_oracle import make_clients

from chorus_mq.aggregation import drift
from chorus_mq.aggregation.drift import AlignmentSums, combine, cosine, module_alignment
from chorus_mq.aggregation.updates import ClientUpdate
from chorus_mq.errors import AggregationError

F64 = torch.float64
#: module -> (d_out, d_in, ranks of the clients that sent it; None: that client did not)
MODULES = {"q": (24, 16, (4, 8, None)), "v": (12, 16, (2, None, 6)), "o": (16, 24, (3, 5, 7))}
WEIGHTS = (0.5, 0.2, 0.3)
CLIENTS = ("a", "b", "c")


def _round(seed: int = 0):
    """Per module: the clients that sent it, their updates (mixed ranks and scalings) and the absent weight."""
    out = {}
    for k, (name, (d_out, d_in, ranks)) in enumerate(MODULES.items()):
        holders = [c for c, r in zip(CLIENTS, ranks, strict=True) if r is not None]
        weights = [w for w, r in zip(WEIGHTS, ranks, strict=True) if r is not None]
        updates = make_clients(d_out, d_in, [r for r in ranks if r is not None], seed=seed + k, weights=weights)
        absent = sum(w for w, r in zip(WEIGHTS, ranks, strict=True) if r is None)
        out[name] = (holders, updates, absent)
    return out


def _dense_cosines(rnd) -> dict[str, float]:
    """The oracle: every update and the aggregate formed dense in float64, concatenated over modules."""
    vectors = {c: [] for c in CLIENTS}
    aggregate = []
    for holders, updates, absent in rnd.values():
        d_out, d_in = updates[0].B.shape[0], updates[0].A.shape[1]
        total = sum(u.weight for u in updates) + absent
        g = torch.zeros(d_out, d_in, dtype=F64)
        for c in CLIENTS:
            if c in holders:
                u = updates[holders.index(c)]
                dense = u.scaling * u.B.to(F64) @ u.A.to(F64)
                g += u.weight / total * dense
            else:
                dense = torch.zeros(d_out, d_in, dtype=F64)
            vectors[c].append(dense.flatten())
        aggregate.append(g.flatten())
    g = torch.cat(aggregate)
    return {c: float(torch.cat(v) @ g / (torch.cat(v).norm() * g.norm())) for c, v in vectors.items()}


def _sums(rnd, names=None) -> AlignmentSums:
    sums = AlignmentSums()
    for name in names or rnd:
        holders, updates, absent = rnd[name]
        sums.add(holders, module_alignment(updates, absent_weight=absent))
    return sums


def test_cosines_from_factors_equal_the_dense_float64_oracle():
    rnd = _round()
    got = _sums(rnd).cosines()
    want = _dense_cosines(rnd)
    assert set(got) == set(CLIENTS)
    for c in CLIENTS:
        assert got[c] == pytest.approx(want[c], abs=1e-12)
    assert len({round(v, 6) for v in want.values()}) == 3 and all(-1 < v < 1 for v in want.values())


def test_one_module_inner_products_and_norms_equal_dense():
    _holders, updates, _absent = _round(3)["o"]
    part = module_alignment(updates, absent_weight=0.25)
    dense = [u.scaling * u.B.to(F64) @ u.A.to(F64) for u in updates]
    total = sum(u.weight for u in updates) + 0.25
    g = sum(u.weight / total * d for u, d in zip(updates, dense, strict=True))
    for i, d in enumerate(dense):
        assert part.dots[i] == pytest.approx(float((d * g).sum()), rel=1e-12)
        assert part.norms2[i] == pytest.approx(float((d * d).sum()), rel=1e-12)
    assert part.aggregate2 == pytest.approx(float((g * g).sum()), rel=1e-12)


def test_shards_sum_to_the_whole_round_and_survive_json():
    rnd = _round(1)
    whole = _sums(rnd).cosines()
    first, second = _sums(rnd, ["q"]), _sums(rnd, ["v", "o"])
    merged = combine([AlignmentSums.from_dict(first.to_dict()), AlignmentSums.from_dict(second.to_dict())])
    for c in CLIENTS:
        assert merged.cosines()[c] == pytest.approx(whole[c], abs=1e-14)


def test_a_clients_factorisation_does_not_change_its_cosine():
    rnd = _round(2)
    holders, updates, absent = rnd["q"]
    rescaled = [dataclasses.replace(updates[0], A=updates[0].A / 1e3, B=updates[0].B * 1e3), *updates[1:]]
    again = {**rnd, "q": (holders, rescaled, absent)}
    for c, value in _sums(again).cosines().items():
        assert value == pytest.approx(_sums(rnd).cosines()[c], abs=1e-6)


def test_a_lone_client_points_along_the_aggregate_and_a_zero_update_has_no_direction():
    (u,) = make_clients(8, 6, [3], seed=5)
    sums = AlignmentSums()
    sums.add(["solo"], module_alignment([u]))
    assert sums.cosines()["solo"] == pytest.approx(1.0, abs=1e-12)
    zero = dataclasses.replace(u, B=torch.zeros_like(u.B))
    sums.add(["nil"], module_alignment([zero]))
    assert sums.cosines()["nil"] is None
    assert cosine(1.0, 0.0, 1.0) is None and cosine(math.nan, 1.0, 1.0) is None


def test_opposite_updates_have_negative_cosines():
    (u,) = make_clients(8, 6, [2], seed=7)
    flipped = dataclasses.replace(u, B=-u.B, weight=0.25)
    sums = AlignmentSums()
    sums.add(["up", "down"], module_alignment([u, flipped]))
    got = sums.cosines()
    assert got["up"] == pytest.approx(1.0, abs=1e-12) and got["down"] == pytest.approx(-1.0, abs=1e-12)


def test_bad_inputs_are_clear_errors():
    (u,) = make_clients(8, 6, [2], seed=7)
    with pytest.raises(AggregationError, match="no updates"):
        module_alignment([])
    with pytest.raises(AggregationError, match="weights"):
        module_alignment([dataclasses.replace(u, weight=0.0)])
    with pytest.raises(AggregationError, match="2 clients for 1 updates"):
        AlignmentSums().add(["a", "b"], module_alignment([u]))
    with pytest.raises(AggregationError, match="map clients"):
        AlignmentSums.from_dict({"dots": [1.0]})


@pytest.mark.parametrize("shared", ["A", "B"])
def test_a_shared_frozen_factor_takes_the_short_path_and_equals_the_dense_oracle(shared, monkeypatch):
    """ffa-lora (every A the same) and rolora's A rounds (every B the same): no Gram, the same numbers."""
    g = torch.Generator().manual_seed(7)
    d_out, d_in, r = 20, 12, 4
    frozen = torch.randn(r, d_in, generator=g) if shared == "A" else torch.randn(d_out, r, generator=g)
    updates = []
    for i, (weight, scaling) in enumerate([(0.5, 2.0), (0.2, 0.5), (0.3, 1.0)]):
        trained = torch.randn(d_out, r, generator=g) if shared == "A" else torch.randn(r, d_in, generator=g) * (i + 1)
        a, b = (frozen, trained) if shared == "A" else (trained, frozen)
        updates.append(ClientUpdate(A=a, B=b, scaling=scaling, weight=weight))
    absent = 0.25
    with monkeypatch.context() as m:  # the short path forms no Gram
        m.setattr(drift, "gram_matrix", lambda _updates: pytest.fail("the Gram was formed"))
        got = module_alignment(updates, absent_weight=absent)
    dense = [u.scaling * u.B.to(F64) @ u.A.to(F64) for u in updates]
    total = sum(u.weight for u in updates) + absent
    aggregate = sum(u.weight / total * x for u, x in zip(updates, dense, strict=True))
    want_dots = [float((x * aggregate).sum()) for x in dense]
    assert got.dots == pytest.approx(want_dots, rel=1e-12)
    assert got.norms2 == pytest.approx([float((x * x).sum()) for x in dense], rel=1e-12)
    assert got.aggregate2 == pytest.approx(float((aggregate * aggregate).sum()), rel=1e-12)
    # equal values in distinct tensors (each client's own copy) are shared all the same: the short path, same numbers
    copies = [dataclasses.replace(u, **{shared: frozen.clone()}) for u in updates]
    with monkeypatch.context() as m:
        m.setattr(drift, "gram_matrix", lambda _updates: pytest.fail("the Gram was formed"))
        assert module_alignment(copies, absent_weight=absent) == got
    # the same updates with the shared factor perturbed by one ulp in one client take the Gram path: same numbers
    bumped = [dataclasses.replace(updates[0], **{shared: torch.nextafter(frozen, frozen + 1)}), *updates[1:]]
    assert module_alignment(bumped, absent_weight=absent).dots == pytest.approx(want_dots, rel=1e-5)
