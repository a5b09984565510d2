"""The inbox record a client appends: strict parsing, signatures over every field that matters."""

from __future__ import annotations

import json
import re

import pytest

from chorus_mq.errors import InvalidAdapter, InvalidReport
from chorus_mq.messages import MAX_HISTOGRAM_LABELS, RECORD_FIELD, GlobalEval, IngestMessage

SHA = "ab" * 32


def _msg(**kw):
    return IngestMessage(federation="fed", client_id="alice", sha256=SHA, size=10, **kw)


def test_a_signature_covers_every_field_that_changes_the_meaning():
    signed = _msg(
        dataset_size=5.0, dp={"epsilon": 1.0, "delta": 1e-5, "noise_multiplier": 1.1, "sample_rate": 0.1, "steps": 10}
    ).signed("s3cret")
    assert signed.signature_valid("s3cret") and not signed.signature_valid("other")
    for change in (
        {"dataset_size": 6.0},
        {"round": 2},
        {"size": 11},
        {"client_id": "bob"},
        {"nonce": "n" * 16},
        {"ts": signed.ts + 1},
        {"sha256": "cd" * 32},
    ):
        assert not signed.model_copy(update=change).signature_valid("s3cret"), change
    tampered_dp = signed.model_copy(update={"dp": signed.dp.model_copy(update={"epsilon": 0.1})})
    assert not tampered_dp.signature_valid("s3cret")


def test_lr_sum_is_signed_when_sent_and_records_without_it_keep_their_signatures():
    plain = _msg(dataset_size=5.0).signed("k")
    assert b"lr_sum" not in plain.canonical()  # what clients that never send it signed
    assert plain.signature_valid("k")
    assert not plain.model_copy(update={"lr_sum": 0.1}).signature_valid("k")  # cannot be added on the way
    signed = _msg(lr_sum=0.1).signed("k")
    assert signed.signature_valid("k")
    assert not signed.model_copy(update={"lr_sum": 1e-9}).signature_valid("k")
    assert not signed.model_copy(update={"lr_sum": None}).signature_valid("k")
    with pytest.raises(InvalidAdapter, match="lr_sum"):
        IngestMessage.parse({**json.loads(signed.model_dump_json()), "lr_sum": "Infinity"})


def test_base_version_is_signed_when_sent_and_must_be_a_plain_int():
    plain = _msg().signed("k")
    assert b"base_version" not in plain.canonical() and plain.signature_valid("k")
    assert not plain.model_copy(update={"base_version": 0}).signature_valid("k")
    signed = _msg(base_version=3).signed("k")
    assert signed.signature_valid("k")
    assert not signed.model_copy(update={"base_version": 4}).signature_valid("k")  # a fresher claim on the way
    body = json.loads(signed.model_dump_json())
    for bad in (-1, True, 1.5, "3"):
        with pytest.raises(InvalidAdapter, match="base_version"):
            IngestMessage.parse({**body, "base_version": bad})


def test_a_record_round_trips_through_the_inbox_field():
    msg = _msg().signed("k")
    fields = msg.to_record()
    assert list(fields) == [RECORD_FIELD]
    back = IngestMessage.from_record(fields, max_bytes=16_384)
    assert back == msg and back.signature_valid("k")


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"m": "x" * 20_000}, "over the 16384-byte limit"),
        ({"m": "{not json"}, "not JSON"),
        ({"m": "{}", "task": "celery.accumulate"}, "single field"),
        ({"junk": "1"}, "single field"),
        ({"m": json.dumps({"federation": "fed", "client_id": "a", "sha256": SHA, "size": 1, "v": 1})}, "version"),
        (
            {"m": json.dumps({"federation": "fed", "client_id": "a", "sha256": SHA, "size": 1, "callbacks": []})},
            "callbacks",
        ),
        ({"m": json.dumps({"federation": "fed", "client_id": "a", "sha256": SHA, "size": -1})}, "size"),
        ({"m": json.dumps({"federation": "fed", "client_id": "a" * 65, "sha256": SHA, "size": 1})}, "client_id"),
        (
            {"m": f'{{"federation": "fed", "client_id": "a", "sha256": "{SHA}", "size": 1, "dataset_size": Infinity}}'},
            "dataset_size",
        ),
        (
            {"m": json.dumps({"federation": "fed", "client_id": "a", "sha256": SHA, "size": 1, "dataset_size": 0})},
            "dataset_size",
        ),
        ({"m": json.dumps({"federation": "fed", "client_id": "a", "sha256": "AB" * 32, "size": 1})}, "sha256"),
    ],
)
def test_malformed_records_are_refused_with_a_reason(fields, needle):
    with pytest.raises(InvalidAdapter, match=needle):
        IngestMessage.from_record(fields, max_bytes=16_384)


def test_the_object_key_is_not_the_clients_to_choose():
    assert "object_key" not in IngestMessage.model_fields
    with pytest.raises(InvalidAdapter, match="object_key"):
        IngestMessage.parse(
            {
                "federation": "fed",
                "client_id": "a",
                "sha256": SHA,
                "size": 1,
                "object_key": "fed/deltas/bob/x.safetensors",
            }
        )


# -- what a client reports beside its delta: label counts and its evaluation of the global model -------


def _report_record(**report) -> dict[str, str]:
    return {"m": json.dumps({"federation": "fed", "client_id": "a", "sha256": SHA, "size": 1, **report})}


def test_reports_are_signed_and_a_record_without_them_signs_as_before():
    plain = _msg(nonce="n" * 16, upload_id="u" * 16, ts=1.0)
    assert b"label_counts" not in plain.canonical() and b"global_eval" not in plain.canonical()
    signed = plain.model_copy(
        update={"label_counts": {"neg": 8, "pos": 2}, "global_eval": GlobalEval(round=1, loss=0.5, examples=10)}
    ).signed("k")
    assert signed.signature_valid("k")
    back = IngestMessage.from_record(signed.to_record(), max_bytes=16_384)
    assert back.label_counts == {"neg": 8, "pos": 2} and back.global_eval.loss == 0.5 and back.signature_valid("k")
    for change in (
        {"label_counts": {"neg": 9, "pos": 2}},
        {"label_counts": None},
        {"global_eval": GlobalEval(round=1, loss=0.4, examples=10)},
        {"global_eval": None},
    ):
        assert not signed.model_copy(update=change).signature_valid("k"), change


@pytest.mark.parametrize(
    ("report", "needle"),
    [
        ({"label_counts": {f"l{i}": 1 for i in range(MAX_HISTOGRAM_LABELS + 1)}}, "at most 1024 items"),
        ({"label_counts": {"neg": -1}}, "label_counts.neg: Input should be greater than or equal to 0"),
        ({"label_counts": {"neg": 1.5}}, "label_counts.neg: Input should be a valid integer"),
        ({"label_counts": {"neg": True}}, "label_counts.neg: Input should be a valid integer"),
        ({"label_counts": {"neg": "7"}}, "label_counts.neg: Input should be a valid integer"),
        ({"label_counts": {"neg": 10**13}}, "label_counts.neg: Input should be less than or equal to"),
        ({"label_counts": {"neg": {"deep": 1}}}, "label_counts.neg: Input should be a valid integer"),
        ({"label_counts": {"": 3}}, "label names must have 1 to 256 characters"),
        ({"label_counts": {"x" * 257: 3}}, "label names must have 1 to 256 characters"),
        ({"label_counts": [["neg", 1]]}, "label_counts: Input should be a valid dictionary"),
        ({"global_eval": {"round": 1, "loss": -0.1, "examples": 5}}, "global_eval.loss"),
        ({"global_eval": {"round": 1, "loss": 0.1, "accuracy": 1.5, "examples": 5}}, "global_eval.accuracy"),
        ({"global_eval": {"round": 1, "loss": 0.1, "examples": 0}}, "global_eval.examples"),
        ({"global_eval": {"round": -1, "loss": 0.1, "examples": 5}}, "global_eval.round"),
        ({"global_eval": {"round": 1, "loss": 0.1, "examples": 5, "task": "x"}}, "global_eval.task"),
    ],
)
def test_hostile_reports_are_refused_with_a_reason(report, needle):
    with pytest.raises(InvalidAdapter, match=re.escape(needle)):
        IngestMessage.from_record(_report_record(**report), max_bytes=1 << 20)


def test_a_histogram_too_big_for_a_record_is_refused_by_the_record_limit():
    counts = {f"label-{i:04d}-{'x' * 20}": i for i in range(MAX_HISTOGRAM_LABELS)}
    with pytest.raises(InvalidAdapter, match="over the 16384-byte limit"):
        IngestMessage.from_record(_report_record(label_counts=counts), max_bytes=16_384)


def test_reports_must_fit_the_federation():
    ok = _msg(label_counts={"neg": 3, "pos": 1}, global_eval={"round": 2, "loss": 0.7, "accuracy": 0.5, "examples": 4})
    ok.check_report(("neg", "pos"), 3, 1e9)
    ok.check_report((), None, 1e9)  # a federation without declared labels takes any names
    with pytest.raises(InvalidReport, match=r"names 1 label\(s\) federation 'fed' does not declare \('maybe'\)"):
        _msg(label_counts={"neg": 3, "maybe": 1}).check_report(("neg", "pos"), 3, 1e9)
    with pytest.raises(InvalidReport, match="add up to 4 examples, over the limit of 3"):
        ok.check_report(("neg", "pos"), 3, 3)
    with pytest.raises(InvalidReport, match="of round 2, but an upload to round 2 can only report an earlier"):
        ok.check_report(("neg", "pos"), 2, 1e9)
