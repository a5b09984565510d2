"""policy_weights: the operator's weight policy and the cap no client's claim can exceed."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chorus_mq.aggregation import policy_weights
from chorus_mq.aggregation.weights import capped, client_claims, split_among_terms
from chorus_mq.errors import AggregationError, ConfigError
from chorus_mq.names import WeightPolicy


def test_dataset_sizes_are_normalised_below_the_cap():
    assert policy_weights({"a": 100.0, "b": 300.0, "c": 400.0}, WeightPolicy.DATASET_SIZE) == pytest.approx(
        {"a": 0.125, "b": 0.375, "c": 0.5}, rel=1e-12
    )
    # 0.6 is over the cap: clamped to 0.5, its excess spread over the others in proportion (1 : 3)
    got = policy_weights({"a": 100.0, "b": 300.0, "c": 600.0}, WeightPolicy.DATASET_SIZE)
    assert got == pytest.approx({"a": 0.125, "b": 0.375, "c": 0.5}, rel=1e-12)


def test_a_huge_claim_takes_at_most_half_of_a_round_of_three():
    """The issue: --dataset-size 1e12 took 0.9999999998 of the round."""
    got = policy_weights({"honest1": 1000.0, "honest2": 1000.0, "attacker": 1e12}, "dataset-size")
    assert got["attacker"] == 0.5
    assert got["honest1"] == got["honest2"] == pytest.approx(0.25)


def test_missing_claims_mean_uniform():
    got = policy_weights({"a": 10.0, "b": None, "c": 1e6}, WeightPolicy.DATASET_SIZE)
    assert got == pytest.approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3})
    assert policy_weights({"a": 1.0, "b": 1e9}, "uniform") == {"a": 0.5, "b": 0.5}


def test_registered_weights_replace_the_claims():
    got = policy_weights({"a": 1e9, "b": 1.0, "c": 1.0}, "registered", registered={"a": 1.0, "b": 2.0, "c": 1.0})
    assert got == pytest.approx({"a": 0.25, "b": 0.5, "c": 0.25})
    with pytest.raises(ConfigError, match="'c'"):
        policy_weights({"a": 1.0, "c": 1.0}, WeightPolicy.REGISTERED, registered={"a": 1.0})
    with pytest.raises(ConfigError, match="registered"):
        policy_weights({"a": 1.0}, WeightPolicy.REGISTERED)
    with pytest.raises(ConfigError, match="finite"):
        policy_weights({"a": 1.0}, WeightPolicy.REGISTERED, registered={"a": math.inf})


@pytest.mark.parametrize("claim", [math.inf, math.nan, 0.0, -5.0, "100", True])
def test_bad_claims_are_refused(claim):
    with pytest.raises(AggregationError, match="dataset size"):
        policy_weights({"a": 1.0, "b": claim}, WeightPolicy.UNIFORM)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"policy": "by-size"}, ConfigError),
        ({"cap": 0.0}, ConfigError),
        ({"cap": 1.5}, ConfigError),
        ({"cap": math.nan}, ConfigError),
        ({"claims": {}}, AggregationError),
    ],
)
def test_bad_options_are_refused(kwargs, error):
    args = {"claims": {"a": 1.0}, "policy": "uniform"} | kwargs
    with pytest.raises(error):
        policy_weights(args.pop("claims"), args.pop("policy"), **args)


def test_the_cap_never_goes_below_uniform():
    assert capped({"a": 9.0, "b": 1.0}, cap=0.1) == {"a": 0.5, "b": 0.5}
    assert capped({"a": 3.0}, cap=0.5) == {"a": 1.0}


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.floats(1e-3, 1e12, allow_nan=False, allow_infinity=False), min_size=1, max_size=30),
    cap=st.floats(0.01, 1.0),
)
def test_water_filling_properties(sizes, cap):
    claims = {f"c{i}": s for i, s in enumerate(sizes)}
    got = policy_weights(claims, WeightPolicy.DATASET_SIZE, cap=cap)
    limit = max(cap, 1 / len(sizes))
    assert list(got) == list(claims)
    assert math.fsum(got.values()) == pytest.approx(1.0, abs=1e-9)
    assert all(0 < w <= limit for w in got.values())
    for a, size_a in claims.items():  # the order of the claims is kept (ties may tie)
        for b, size_b in claims.items():
            if size_a > size_b:
                assert got[a] >= got[b]
    unclamped = [c for c in claims if got[c] < limit * (1 - 1e-9)]
    for a in unclamped:  # and those below the cap keep their proportions
        assert got[a] / got[unclamped[0]] == pytest.approx(claims[a] / claims[unclamped[0]], rel=1e-9)


def test_a_client_with_several_deltas_shares_its_weight_among_them() -> None:
    owners = {"a": "a", "a#2": "a", "a#3": "a", "b": "b"}
    split = split_among_terms({"a": 0.5, "b": 0.5}, owners)
    assert split == {"a": 0.5 / 3, "a#2": 0.5 / 3, "a#3": 0.5 / 3, "b": 0.5}
    assert math.isclose(sum(split.values()), 1.0)
    with pytest.raises(AggregationError, match=r"no weight for client\(s\) \['b'\]"):
        split_among_terms({"a": 1.0}, owners)
    assert client_claims({"a": 10.0, "a#2": 30.0, "b": 5.0}, {"a": "a", "a#2": "a", "b": "b"}) == {"a": 20.0, "b": 5.0}
    assert client_claims({"a": 10.0, "a#2": None}, {"a": "a", "a#2": "a"}) == {"a": None}
