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


def test_buffered_until_sync_time_runs_on_past_the_target_and_reports_staleness(tiny_bert_dir, tmp_path):
    """The same comparison stopped at the target and run on to the synchronous total time: the longer run starts
    with the shorter one's versions, ends by that time, and every flushed delta's staleness is from a manifest."""
    from chorus_mq.training.simulate_buffered import BufferedUntil, run_speed_comparison
    from chorus_mq.workers import runtime

    from .test_local import data_csv

    data = data_csv(tmp_path / "data.csv")
    sim = SimConfig(
        model=str(tiny_bert_dir),
        dataset=str(data),
        clients=3,
        rounds=2,
        strategies=("fedex-lora",),
        steps_per_round=4,
        batch_size=8,
        lr=5e-2,
        max_length=32,
        test_examples=16,
    )
    reports, said = {}, []
    try:
        for until in BufferedUntil:
            job = SpeedJob(sim, (1.0, 1.0, 3.0), buffer=2, until=until)
            reports[until] = run_speed_comparison(job, out_dir=tmp_path / until.value, echo=said.append)
    finally:
        runtime.install(None)
    short, full = reports[BufferedUntil.TARGET], reports[BufferedUntil.SYNC_TIME]
    horizon = full.sync.points[-1][0]
    # 2 rounds, each waiting for the speed-3 client
    assert horizon == sim.rounds * 3.0 * sim.steps_per_round and full.sync.contributions == 6
    assert full.sync.final == short.sync.final and full.target == short.target
    # the same run, on past where the target mode stopped (deterministic training: the same versions)
    assert full.buffered.points[: len(short.buffered.points)] == short.buffered.points
    assert len(full.buffered.points) > len(short.buffered.points) and full.buffered.points[-1][0] <= horizon
    assert full.buffered.contributions > short.buffered.contributions > 0
    assert full.buffered.contributions > full.sync.contributions  # the fast clients did not wait
    versions = full.buffered.points[-1][1]
    assert len(full.buffered.staleness) == 2 * versions  # K deltas per flush, each from its manifest
    assert max(full.buffered.staleness) >= 1  # the speed-3 client trained from an older version
    mean = full.buffered.mean_staleness
    assert mean == sum(full.buffered.staleness) / len(full.buffered.staleness)
    summary = [line for line in said if line.startswith(f"at the synchronous total time t={horizon:g}")]
    assert len(summary) == 1 and f"mean staleness {mean:.2f}" in summary[0]
    body = json.loads((tmp_path / "sync-time" / "buffered.json").read_text())
    assert body["job"]["until"] == "sync-time" and body["mean_staleness"] == mean
    with pytest.raises(ConfigError, match="--buffered-until must be one of target, sync-time"):
        SpeedJob(sim, (1.0, 1.0, 3.0), buffer=2, until="forever")  # type: ignore[arg-type]
