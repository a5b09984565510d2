"""The buffered-vs-synchronous comparison's own parts: its job's checks, the time to a target, its files."""

from __future__ import annotations

import json

import pytest

from chorus_mq.errors import ConfigError
from chorus_mq.training.simulate_buffered import Curve, SpeedJob, SpeedReport, write_speed_results
from chorus_mq.training.simulate_model import SimConfig


def test_a_job_needs_one_positive_speed_per_client_and_a_buffer_that_fits():
    sim = SimConfig(clients=3)
    assert SpeedJob(sim, (1.0, 2.0, 4.0), buffer=2).buffer == 2
    for speeds, buffer, match in (
        ((1.0, 2.0), 2, "names 2 clients"),
        ((1.0, 0.0, 2.0), 2, "positive"),
        ((1.0, 1.0, 1.0), 4, "--buffer"),
    ):
        with pytest.raises(ConfigError, match=match):
            SpeedJob(sim, speeds, buffer=buffer)
    with pytest.raises(ConfigError, match="one strategy"):
        SpeedJob(SimConfig(clients=1, strategies=("fedex-lora", "svd")), (1.0,), buffer=1)


def test_time_to_counts_trained_versions_only():
    curve = Curve("buffered", [(0.0, 0, 0.6, 1.0), (3.0, 1, 0.55, 1.0), (5.0, 2, 0.7, 0.9), (9.0, 3, 0.8, 0.8)])
    assert curve.time_to(0.6) == 5.0  # version 0 (the initial model) does not count
    assert curve.time_to(0.8) == 9.0 and curve.time_to(0.9) is None
    report = SpeedReport(Curve("sync"), curve, 0.7, 20.0, 5.0)
    assert report.ratio == 0.25
    assert SpeedReport(Curve("sync"), curve, 0.9, 20.0, None).ratio is None


def test_results_are_a_json_and_a_png(tmp_path):
    sync = Curve("sync", [(0.0, 0, 0.5, 1.0), (10.0, 1, 0.7, 0.8)], contributions=3)
    buffered = Curve("buffered", [(0.0, 0, 0.5, 1.0), (2.0, 1, 0.6, 0.9), (4.0, 2, 0.72, 0.7)], contributions=6)
    job = SpeedJob(SimConfig(clients=3), (1.0, 2.0, 5.0), buffer=2)
    write_speed_results(tmp_path, job, SpeedReport(sync, buffered, 0.7, 10.0, 4.0))
    body = json.loads((tmp_path / "buffered.json").read_text())
    assert body["ratio"] == 0.4 and body["job"]["speeds"] == [1.0, 2.0, 5.0]
    assert body["buffered"]["points"][-1] == [4.0, 2, 0.72, 0.7]
    assert (tmp_path / "buffered.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_cli_refuses_a_buffered_simulation_without_a_model_or_speeds():
    from click.testing import CliRunner

    from chorus_mq.cli import main

    no_model = CliRunner().invoke(main, ["simulate", "--mode", "buffered", "--client-speeds", "1,2"])
    assert no_model.exit_code != 0 and "--model" in no_model.output
    no_speeds = CliRunner().invoke(main, ["simulate", "--model", "minilm", "--mode", "buffered"])
    assert no_speeds.exit_code != 0 and "--client-speeds" in no_speeds.output
