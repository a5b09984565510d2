"""The secure round's published weights (workers/secure.py), over a real redis-server."""

from __future__ import annotations

import pytest

from chorus_mq.names import Strategy
from chorus_mq.state import FederationConfig
from chorus_mq.workers import runtime, secure

from ..deltas import declared, random_factors, write_adapter


def _secure(sdk, tmp_path, **options):
    config = FederationConfig(
        name="fed",
        base_model="m",
        quorum=3,
        strategy=Strategy.FFA_LORA,
        secure_aggregation=True,
        relative_clip=0.0,
        **options,
    )
    factors = random_factors(0)
    initial = write_adapter(tmp_path / "initial.safetensors", factors)  # round 0: the shared factors
    sdk.create_federation(config, model=declared(factors), initial_adapter=initial)
    sizes = {"big": 900.0, "a": 50.0, "b": 50.0}
    for client, size in sizes.items():
        sdk.add_client("fed", client, dataset_size=size)
    return sorted(sizes)


def test_weights_are_capped_over_the_cohort_as_a_plain_round_caps_its_clients(sdk, tmp_path):
    cohort = _secure(sdk, tmp_path)
    config = sdk.state.config("fed")
    weights = secure._weights(runtime.current(), "fed", config, cohort)
    # 900 of 1,000 examples: the default --max-client-weight 0.5 holds it to half, the rest shared in proportion
    assert weights == pytest.approx({"big": 0.5, "a": 0.25, "b": 0.25})


def test_a_cap_of_one_leaves_the_dataset_sizes_as_they_are(sdk, tmp_path):
    cohort = _secure(sdk, tmp_path, max_client_weight=1.0)
    weights = secure._weights(runtime.current(), "fed", sdk.state.config("fed"), cohort)
    assert weights == pytest.approx({"big": 0.9, "a": 0.05, "b": 0.05})
