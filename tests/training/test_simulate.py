"""``chorus-mq simulate --model minilm``: real training through the production path, at a small size."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import statistics

import pytest
from click.testing import CliRunner

from chorus_mq.names import BEST_ALONE, CENTRALISED
from chorus_mq.training.sim_report import Baselines, write_results
from chorus_mq.training.simulate_model import SimRow


@pytest.mark.e2e
def test_simulate_minilm_two_rounds_three_clients(tmp_path):
    from chorus_mq.cli import main

    out = tmp_path / "out"
    result = CliRunner().invoke(
        main,
        [
            "simulate",
            "--model",
            "minilm",
            "--rounds",
            "2",
            "--clients",
            "3",
            "--strategies",
            "fedex-lora,fedavg",
            "--ranks",
            "4,8",
            "--steps-per-round",
            "2",
            "--test-examples",
            "60",  # what is checked here is the path and its columns, not accuracy: a short evaluation
            "--centralised",
            "--alone",
            "--out",
            str(out),
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    assert "exact err" in result.output and "fedex-lora" in result.output
    assert "remainder    largest relative size" in result.output  # the legend explains every column
    rows = [SimRow(**row) for row in json.loads((out / "results.json").read_text())["rows"]]
    by = {(r.strategy, r.round): r for r in rows}
    assert set(by) - {(BEST_ALONE, 0), (BEST_ALONE, 2)} == {
        (s, r) for s in ("fedex-lora", "fedavg", CENTRALISED) for r in (0, 1, 2)
    }
    # the best client alone: the best of the three printed, each trained for every round's steps
    alone = [
        float(line.split("accuracy ")[1].split()[0]) for line in result.output.splitlines() if line.startswith("alone ")
    ]
    assert len(alone) == 3 and by[BEST_ALONE, 2].accuracy == pytest.approx(max(alone), abs=1e-3)
    for r in (1, 2):
        exact, avg = by["fedex-lora", r], by["fedavg", r]
        assert exact.clients == 3 and exact.bytes_up > 0 and exact.bytes_down > 0
        assert exact.exact_error is not None and exact.exact_error < 1e-4  # the pulled model is the exact average
        assert avg.exact_error is not None and avg.exact_error > 100 * exact.exact_error  # fedavg is not
        assert 0.0 <= exact.accuracy <= 1.0
    assert by["fedex-lora", 2].remainder > 0  # rank-4 clients train below the rank-8 global adapter
    with (out / "results.csv").open() as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    assert (out / "accuracy.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.e2e
def test_simulate_over_seeds_writes_mean_and_sd_and_the_rounds_cosines(tmp_path):
    from chorus_mq.cli import main

    out = tmp_path / "out"
    args = ["simulate", "--model", "minilm", "--seeds", "0,1", "--clients", "2", "--rounds", "1"]
    args += ["--strategies", "fedex-lora", "--steps-per-round", "1", "--test-examples", "40", "--out", str(out)]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "seed 0:" in result.output and "seed 1:" in result.output and "mean ± sd over 2 seeds:" in result.output
    assert result.output.count("Columns (per strategy and round)") == 1
    body = json.loads((out / "results.json").read_text())
    rows = [SimRow(**row) for row in body["rows"]]
    assert sorted((r.seed, r.round) for r in rows) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for r in rows:  # round 1: the clients' mean cosine to the aggregate, from the round's manifest
        assert (r.cosine is None) == (r.round == 0) and (r.cosine is None or -1 <= r.cosine <= 1)
    last = next(s for s in body["summary"] if s["round"] == 1)
    accuracies = [r.accuracy for r in rows if r.round == 1]
    assert last["seeds"] == 2 and last["accuracy_mean"] == pytest.approx(statistics.fmean(accuracies))
    assert last["accuracy_sd"] == pytest.approx(statistics.stdev(accuracies))
    assert [b["seed"] for b in body["baselines"]] == [0, 1] and all(
        b["chance_accuracy"] == 0.5 for b in body["baselines"]
    )
    assert body["config"]["seeds"] == [0, 1]
    assert (out / "accuracy.png").read_bytes()[:4] == b"\x89PNG" and (out / "summary.csv").exists()


def _rows(seeds):
    """Rows as simulate writes them: fedex-lora and centralised, rounds 0-2, an offset per seed."""
    return [
        SimRow(s, r, 1, 0.5 + 0.1 * r + 0.02 * seed, 0.7 - 0.05 * r - 0.01 * seed, cosine=0.3 + seed / 10, seed=seed)
        for seed in seeds
        for s in ("fedex-lora", CENTRALISED)
        for r in range(3)
    ]


def test_several_seeds_plot_and_write_mean_and_sd_with_the_chance_and_majority_lines(tmp_path):
    seeds = (0, 1, 2)
    baselines = [Baselines.of(seed, 2, [0, 0, 0, 1], [0, 1, 1, 1][: 3 + (seed == 0)]) for seed in seeds]
    drawn = write_results(tmp_path, {"seeds": list(seeds)}, _rows(seeds), baselines, title="t")

    assert (tmp_path / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    acc, loss = drawn["accuracy"], drawn["loss"]
    for panel, field, offset in ((acc, "accuracy", 0.02), (loss, "loss", -0.01)):
        for strategy in ("fedex-lora", CENTRALISED):
            series = panel[strategy]
            values = [
                [getattr(r, field) for r in _rows(seeds) if r.strategy == strategy and r.round == k] for k in range(3)
            ]
            assert series.x == (0.0, 1.0, 2.0)
            assert series.y == pytest.approx([statistics.fmean(v) for v in values])
            assert series.err == pytest.approx([statistics.stdev(v) for v in values])
            assert series.err == pytest.approx([abs(offset)] * 3)  # sd of offsets 0, 1, 2 times the step
    # chance: 1/2 and ln 2; majority: the training majority (0) scored on held-out labels; prior: its loss
    assert acc["chance accuracy"].y == pytest.approx((0.5, 0.5))
    majority = statistics.fmean([1 / 4, 1 / 3, 1 / 3])  # held-out [0, 1, 1, 1], [0, 1, 1], ...
    assert acc["majority class accuracy"].y == pytest.approx((majority, majority))
    assert loss["chance loss"].y == pytest.approx((math.log(2), math.log(2)))
    prior = [4 / 6, 2 / 6]  # add-one smoothed training frequencies of labels 0 and 1
    second = -(math.log(prior[0]) + 2 * math.log(prior[1])) / 3
    want = statistics.fmean([-(math.log(prior[0]) + 3 * math.log(prior[1])) / 4, second, second])
    assert loss["label prior loss"].y == pytest.approx((want, want))

    with (tmp_path / "summary.csv").open() as f:
        summary = list(csv.DictReader(f))
    assert len(summary) == 6 and {row["seeds"] for row in summary} == {"3"}
    first = next(r for r in summary if r["strategy"] == "fedex-lora" and r["round"] == "1")
    assert float(first["accuracy_mean"]) == pytest.approx(0.62) and float(first["accuracy_sd"]) == pytest.approx(0.02)
    assert float(first["cosine_mean"]) == pytest.approx(0.4)
    body = json.loads((tmp_path / "results.json").read_text())
    assert len(body["rows"]) == 18 and {r["seed"] for r in body["rows"]} == set(seeds)
    assert len(body["summary"]) == 6 and len(body["baselines"]) == 3
    with (tmp_path / "results.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 18


def test_one_seed_plots_its_values_without_error_bars(tmp_path):
    rows = [dataclasses.replace(r, personal_accuracy=0.9, personal_loss=0.3) if r.round else r for r in _rows([4])]
    drawn = write_results(tmp_path, {}, rows, [Baselines.of(4, 3, [2, 2, 1], [2, 0, 1])])
    series = drawn["accuracy"]["fedex-lora"]
    assert series.y == pytest.approx([0.58, 0.68, 0.78]) and series.err is None
    # --personal-heads: the clients' own models, where measured (rounds 1 and 2 here)
    own = drawn["accuracy"]["fedex-lora (own heads)"]
    assert own.x == (1.0, 2.0) and own.y == pytest.approx([0.9, 0.9]) and own.err is None
    assert drawn["loss"]["fedex-lora (own heads)"].y == pytest.approx([0.3, 0.3])
    assert drawn["accuracy"]["chance accuracy"].y == pytest.approx((1 / 3, 1 / 3))
    assert drawn["accuracy"]["majority class accuracy"].y == pytest.approx((1 / 3, 1 / 3))
    with (tmp_path / "summary.csv").open() as f:
        assert {row["accuracy_sd"] for row in csv.DictReader(f)} == {""}


def test_simulate_with_personal_heads_reports_each_clients_own_model(tiny_bert_dir, tmp_path):
    """Two clients with opposite label skews keep their own heads: the body stays the exact average, the published
    head stays round 0's, and each client's own model beats the published one on its own held-out examples."""
    import pyarrow as pa
    from pyarrow import csv as pa_csv

    from chorus_mq.training.simulate_model import run_model_simulation

    from .test_local import DATA, WORDS

    rows = []
    for copy in range(3):  # 144 rows: alice's org holds 3/4 of the "awful" reviews, bob's 3/4 of the others
        for i, (text, label) in enumerate(zip(DATA.texts, DATA.labels, strict=True)):
            group = "alice" if (label == 0) == (i % 4 != 0) else "bob"
            rows.append({"text": f"{text} #{copy}", "label": WORDS[label], "org": group})
    data = tmp_path / "orgs.csv"
    pa_csv.write_csv(pa.Table.from_pylist(rows), data)
    result = run_model_simulation(
        model=str(tiny_bert_dir),
        dataset=str(data),
        clients=2,
        rounds=2,
        partition="by:org",
        strategies=("fedex-lora",),
        steps_per_round=8,
        batch_size=8,
        lr=2e-2,
        max_length=32,
        test_examples=24,
        balance_labels="off",
        personal_heads=True,
        echo=None,
    )
    assert [r.round for r in result] == [0, 1, 2]
    for row in result:
        assert row.personal_accuracy is not None and row.personal_loss is not None
        if row.round:
            assert row.exact_error is not None and row.exact_error < 1e-4  # the oracle keeps round 0's head
    final = result[-1]
    assert final.personal_accuracy > final.accuracy + 0.2 and final.personal_accuracy > result[0].personal_accuracy


def test_simulate_runs_the_linear_strategies_exactly(tiny_bert_dir, tmp_path):
    """ffa-lora, rolora and fed-sb in ``simulate``: the pulled model is the exact average, with no remainder."""

    from chorus_mq.training.simulate_model import run_model_simulation

    from .test_local import data_csv

    data = data_csv(tmp_path / "data.csv")
    result = run_model_simulation(
        model=str(tiny_bert_dir),
        dataset=str(data),
        clients=2,
        rounds=2,
        strategies=("ffa-lora", "rolora", "fed-sb"),
        ranks=(4, 8),  # ignored: a frozen shared factor has the global adapter's rank
        steps_per_round=2,
        batch_size=8,
        lr=2e-2,
        max_length=32,
        test_examples=16,
        echo=None,
    )
    by = {(r.strategy, r.round): r for r in result}
    assert set(by) == {(s, r) for s in ("ffa-lora", "rolora", "fed-sb") for r in (0, 1, 2)}
    for s in ("ffa-lora", "rolora", "fed-sb"):
        for r in (1, 2):
            row = by[s, r]
            assert row.clients == 2 and row.bytes_down > 0 and row.remainder == 0
            assert row.exact_error is not None and row.exact_error < 1e-4
    # fed-sb uploads r x r per module (and the head): less than the d_out x r factor ffa-lora uploads
    assert by["fed-sb", 2].bytes_up < by["ffa-lora", 2].bytes_up


def _plain_and_secure(tiny_bert_dir, tmp_path, **options):
    """The same simulation run plain, then with ``--secure-aggregation`` (three clients, the tiny BERT); the rows
    of each, and the secure run's SDK (its Redis state outlives the run)."""
    from chorus_mq.sdk.combined import Sdk
    from chorus_mq.training.simulate_model import run_model_simulation
    from chorus_mq.workers import runtime

    from .test_local import data_csv

    data = data_csv(tmp_path / "data.csv")
    sdks: list[Sdk] = []

    def embedded(workdir):
        sdks.append(Sdk.embedded(workdir))
        return sdks[-1]

    runs = {}
    try:
        for secure in (False, True):
            runs[secure] = run_model_simulation(
                model=str(tiny_bert_dir),
                dataset=str(data),
                clients=3,
                steps_per_round=2,
                batch_size=8,
                lr=2e-2,
                max_length=32,
                test_examples=16,
                secure_aggregation=secure,
                sdk_factory=embedded,
                echo=None,
                **options,
            )
    finally:
        runtime.install(None)
    return runs[False], runs[True], sdks[1]


def test_simulate_with_secure_aggregation_matches_the_plain_federation(tiny_bert_dir, tmp_path):
    """``--secure-aggregation`` on ffa-lora: the same seed trains the same clients, and only the aggregation path
    differs (three clients upload through every phase together, the sweep opens them): the published model is
    the plain one's to within the fixed-point encoding, and exact against the float64 oracle."""

    from chorus_mq.names import SecAggPhase
    from chorus_mq.state.secagg import SecAggRounds

    plain, secure, sdk = _plain_and_secure(tiny_bert_dir, tmp_path, rounds=2, strategies=("ffa-lora",))
    assert [(r.round, r.clients) for r in secure] == [(0, 0), (1, 3), (2, 3)]
    for a, b in zip(plain[1:], secure[1:], strict=True):
        assert b.exact_error is not None and b.exact_error <= 1e-5  # the unmasked sum is the clients' average
        assert b.accuracy == a.accuracy and b.loss == pytest.approx(a.loss, abs=1e-5)
        assert b.cosine is None and a.cosine is not None  # no worker saw a client's update
        assert b.bytes_up > 0
    assert secure[-1].loss != secure[0].loss  # the clients trained: the two runs agree on something that moved
    # the rounds went through the protocol: each one's secure aggregation finished, with the whole cohort summed
    (federation,) = sdk.state.federations()
    for r in (1, 2):
        state = SecAggRounds(sdk.redis, federation).state(r)
        assert state is not None and state.phase is SecAggPhase.DONE and len(state.survivors) == 3


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"strategies": ("ffa-lora", "fedex-lora")}, "fedex-lora needs each client's factors in the clear"),
        ({"strategies": ("ffa-lora",), "clients": 2}, "at least 3 clients in every round"),
        ({"strategies": ("rolora",), "clients": 6, "fraction_fit": 0.3}, "at least 3 clients in every round"),
        ({"strategies": ("fed-sb",), "scaffold": True}, "--scaffold"),
    ],
)
def test_simulate_refuses_secure_aggregation_where_it_cannot_run_before_any_work(options, says, tmp_path):
    from chorus_mq.errors import ConfigError
    from chorus_mq.training.simulate_model import run_model_simulation

    with pytest.raises(ConfigError, match=says):
        # a model that does not exist: the refusal comes before anything is loaded
        run_model_simulation(model=str(tmp_path / "no-model"), secure_aggregation=True, echo=None, **options)


def test_simulate_steps_a_linear_strategys_trained_factor_under_a_server_optimiser(tiny_bert_dir, tmp_path):
    """fedadam on ffa-lora, rolora and fed-sb in ``simulate``: the pulled model is the oracle's step on the
    trained factor (rolora's third round steps B again from the state it kept while A trained)."""
    from chorus_mq.training.simulate_model import run_model_simulation

    from .test_local import data_csv

    data = data_csv(tmp_path / "data.csv")
    result = run_model_simulation(
        model=str(tiny_bert_dir),
        dataset=str(data),
        clients=2,
        rounds=3,
        strategies=("ffa-lora", "rolora", "fed-sb"),
        steps_per_round=2,
        batch_size=8,
        lr=2e-2,
        max_length=32,
        test_examples=16,
        server_opt="fedadam",
        server_lr=0.05,
        echo=None,
    )
    for row in result:
        if row.round:
            assert row.exact_error is not None and row.exact_error < 1e-4, row
    assert {r.strategy for r in result} == {"ffa-lora", "rolora", "fed-sb"} and len(result) == 12


def test_a_secure_round_steps_the_unmasked_average_under_a_server_optimiser(tiny_bert_dir, tmp_path):
    """``--secure-aggregation`` with fedadam on rolora, three rounds (B, A, then B from the state kept while A
    trained): the workers step the unmasked average, so the published model is the plain federation's to
    within the encoding and the float64 oracle's step (round 3's needs the state round 1 stored for B)."""
    plain, secure, _sdk = _plain_and_secure(
        tiny_bert_dir, tmp_path, rounds=3, strategies=("rolora",), server_opt="fedadam", server_lr=0.05
    )
    for a, b in zip(plain[1:], secure[1:], strict=True):
        assert b.exact_error is not None and b.exact_error <= 1e-5, b
        assert b.loss == pytest.approx(a.loss, abs=1e-4)
    assert secure[-1].loss != secure[0].loss
