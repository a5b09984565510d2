"""What ``status`` and ``rounds`` show of a round is keyed by client: a buffered client's several deltas in one
flush (registered under the terms ``c``, ``c#2``, ...) are one client, never its internal term names."""

from __future__ import annotations

import pytest

from chorus_mq.cli.drift import round_lines
from chorus_mq.manifest import ClientEntry, Manifest
from chorus_mq.names import RoundStatus
from chorus_mq.sdk.summaries import RoundSummary, client_cosines, per_client
from chorus_mq.state.records import DeltaRecord, RoundInfo


def _record(client: str, sha: str, label_counts: dict[str, int] | None = None) -> DeltaRecord:
    return DeltaRecord(
        client_id=client,
        sha256=sha * 64,
        size=1,
        upload_id="u",
        key="k",
        index_key="i",
        index_sha256="0" * 64,
        label_counts=label_counts,
    )


def test_per_client_takes_each_clients_latest_term_in_name_order():
    terms = {"b": 1, "a#10": 10, "a": 1, "a#2": 2, "c#3": 3, "c": 1}
    assert per_client(terms) == {"a": 10, "b": 1, "c": 3}  # a#10 is after a#2 although it sorts before it


def _manifest(entries: list[tuple[str, float, float | None]]) -> Manifest:
    clients = tuple(ClientEntry(c, f"{i:064x}", 1.0, w, cosine=cos) for i, (c, w, cos) in enumerate(entries))
    return Manifest("f", 1, 1, "fedex-lora", "m", {}, clients, ())


def test_a_client_with_several_deltas_gets_their_weighted_mean_cosine():
    manifest = _manifest([("c0", 0.2, 0.5), ("c0", 0.6, 0.9), ("c1", 0.2, -0.1), ("c2", 0.0, None)])
    cosines = client_cosines(manifest)
    assert cosines["c0"] == pytest.approx((0.2 * 0.5 + 0.6 * 0.9) / 0.8, rel=1e-12)
    assert cosines["c1"] == pytest.approx(-0.1) and cosines["c2"] is None
    assert set(cosines) == {"c0", "c1", "c2"}


def test_a_buffer_with_two_deltas_of_one_client_shows_the_client_once():
    records = {
        "c0": _record("c0", "a", {"neg": 3}),
        "c0#2": _record("c0", "b", {"neg": 5, "pos": 1}),
        "c1": _record("c1", "c", {"pos": 2}),
    }
    info = RoundInfo(round=2, state=RoundStatus.COMPLETE, n=3)
    summary = RoundSummary.of(info, records, _manifest([("c0", 0.25, 0.4), ("c0", 0.25, 0.8), ("c1", 0.5, 0.1)]))
    assert summary.clients == ("c0", "c1") and summary.n == 3
    assert summary.deltas_per_client == {"c0": 2}
    assert summary.label_counts == {"c0": {"neg": 5, "pos": 1}, "c1": {"pos": 2}}  # c0's latest declaration
    assert summary.cosine == pytest.approx({"c0": 0.6, "c1": 0.1})
    lines = round_lines(summary)
    assert not any("#" in line for line in lines)
    assert [line.split()[0] for line in lines[1:]] == ["c0", "c1"]
    assert "(2 deltas: mean cosine, latest declarations)" in lines[1] and "deltas:" not in lines[2]


def test_a_synchronous_round_has_no_per_client_delta_counts():
    info = RoundInfo(round=1, state=RoundStatus.OPEN, n=2)
    summary = RoundSummary.of(info, {"a": _record("a", "a"), "b": _record("b", "b")})
    assert summary.clients == ("a", "b") and summary.deltas_per_client == {} and summary.cosine is None
