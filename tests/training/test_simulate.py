"""``chorus-mq simulate --model minilm``: real training through the production path, at a small size."""

from __future__ import annotations

import csv
import json

import pytest
from click.testing import CliRunner

from chorus_mq.names import BEST_ALONE, CENTRALISED
from chorus_mq.training.simulate import SimRow, plot_accuracy


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


def test_the_plot_draws_every_strategy(tmp_path):
    rows = [SimRow(s, r, 1, 0.5 + 0.1 * r, 0.7) for s in ("fedex-lora", CENTRALISED) for r in range(3)]
    plot_accuracy(rows, tmp_path / "p.png", title="t")
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_simulate_with_personal_heads_reports_each_clients_own_model(tiny_bert_dir, tmp_path):
    """Two clients with opposite label skews keep their own heads: the body stays the exact average, the published
    head stays round 0's, and each client's own model beats the published one on its own held-out examples."""
    import pyarrow as pa
    from pyarrow import csv as pa_csv

    from chorus_mq.training.simulate import run_model_simulation

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
