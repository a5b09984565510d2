"""``chorus-mq simulate``: the main job, on embedded defaults and against a real Redis."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from chorus_mq.cli import main
from chorus_mq.simulate_synthetic import run_simulation


def test_compare_on_embedded_defaults():
    res = CliRunner().invoke(
        main, ["simulate", "--clients", "3", "--rounds", "2", "--compare", "--json"], catch_exceptions=False
    )
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    assert [(r["strategy"], r["round"]) for r in rows] == [
        ("fedavg", 1),
        ("fedavg", 2),
        ("fedex-lora", 1),
        ("fedex-lora", 2),
    ]
    for row in rows:
        assert row["clients"] == 3
        if row["strategy"] == "fedex-lora":
            assert row["exact_error"] < 1e-6 and row["residual_bytes"] > 0
        else:  # the baseline is inexact: that is the point of comparing
            assert row["exact_error"] > 0.1 and row["residual_bytes"] == 0
        assert row["adapter_error"] > 0.1


@pytest.mark.services
def test_against_real_redis_and_a_given_store(redis_server, tmp_path):
    rows = run_simulation(
        clients=2,
        rounds=2,
        strategies=["svd"],
        redis_url=redis_server.url,
        store_url=f"file://{tmp_path}/store",
        echo=None,
    )
    assert [r["exact_error"] < 1e-6 for r in rows] == [True, True]
    assert any(p.name == "manifest.json" for p in (tmp_path / "store").rglob("*"))
    assert redis_server.client().smembers("chorus:federations")


@pytest.mark.parametrize(("optimizer", "lr"), [("fedadam", 0.01), ("fedavgm", 0.5)])
def test_exactness_is_against_the_server_optimisers_step(optimizer, lr):
    rows = run_simulation(
        clients=3, rounds=3, strategies=["fedex-lora", "svd"], server_opt=optimizer, server_lr=lr, echo=None
    )
    assert len(rows) == 6
    for row in rows:
        assert row["exact_error"] < 1e-5, row  # adapter + residual is the documented step, round after round
        assert row["residual_bytes"] > 0


def test_a_server_optimiser_refuses_stack_before_anything_runs():
    res = CliRunner().invoke(main, ["simulate", "--strategies", "fedex-lora,stack", "--server-opt", "fedyogi"])
    assert res.exit_code == 2 and "cannot step --strategy stack" in res.output


@pytest.mark.parametrize(
    ("args", "says"),
    [
        # the flag reaches the model simulation's config: a strategy that needs factors in the clear is refused
        (["--model", "no-such-model", "--strategies", "ffa-lora,svd"], "svd needs each client's factors in the clear"),
        (["--strategies", "fedex-lora"], "give --model"),  # the synthetic simulation has no secure path
    ],
)
def test_secure_aggregation_is_refused_before_anything_runs_where_it_cannot(args, says):
    res = CliRunner().invoke(main, ["simulate", *args, "--secure-aggregation"])
    assert res.exit_code == 2 and says in res.output, res.output
