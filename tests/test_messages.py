"""The inbox record a client appends: strict parsing, signatures over every field that matters."""

from __future__ import annotations

import json

import pytest

from chorus_mq.errors import InvalidAdapter
from chorus_mq.messages import RECORD_FIELD, IngestMessage

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
