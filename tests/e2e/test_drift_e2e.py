"""Seeing drift over the real stack: clients declare label counts and report their evaluation of the global
model with their uploads, the workers refuse hostile reports clearly, and the round's manifest, `status` and
`rounds` show the histograms, the mean evaluation and each client's cosine to the aggregate (checked
against a float64 dense oracle of the clients' updates)."""

from __future__ import annotations

import json

import pytest
import torch

from chorus_mq.adapters import model_decl_from_dir
from chorus_mq.errors import InvalidReport, Rejected
from chorus_mq.messages import IngestMessage
from chorus_mq.state import FederationConfig
from chorus_mq.state.inbox import Inbox

from ..topology import wait_for
from .stack import manifest_of, put_raw
from .tinyllama import TARGETS, client_adapter, tiny_llama

pytestmark = [pytest.mark.e2e, pytest.mark.services]

F64 = torch.float64
SIZES = (100, 200, 300)
COUNTS = ({"neg": 80, "pos": 20}, {"neg": 50, "pos": 150}, {"neg": 150, "pos": 150})
EVALS = ({"round": 0, "loss": 0.9, "accuracy": 0.5, "examples": 40}, {"round": 0, "loss": 0.6, "examples": 60}, None)


def _dense_cosines(clients: list[dict], weights: list[float]) -> list[float]:
    total = sum(weights)
    vectors = [torch.cat([(s * B.to(F64) @ A.to(F64)).flatten() for A, B, s in c.values()]) for c in clients]
    aggregate = sum(w / total * v for w, v in zip(weights, vectors, strict=True))
    return [float(v @ aggregate / (v.norm() * aggregate.norm())) for v in vectors]


def test_label_counts_evaluations_and_cosines_reach_manifest_status_and_rounds(stack, tmp_path):
    base = tiny_llama()
    model_dir = tmp_path / "tiny-llama"
    base.save_pretrained(model_dir)
    config = FederationConfig(name="drift", base_model=str(model_dir), quorum=3, labels=("neg", "pos"))
    stack.operator().create_federation(config, model=model_decl_from_dir(model_dir, target_modules=TARGETS))
    creds = [stack.add_client("drift", f"client-{i}") for i in range(3)]
    sdks = [stack.client(c) for c in creds]
    clients = [client_adapter(base, tmp_path / f"c{i}", rank=4 + 2 * i, alpha=8, seed=i) for i in range(3)]

    # hostile reports: the SDK refuses them before sending; sent raw, the workers refuse them with a reason
    with pytest.raises(InvalidReport, match=r"does not declare \('maybe'\); its labels are neg, pos"):
        sdks[0].upload("drift", tmp_path / "c0", "client-0", label_counts={"neg": 3, "maybe": 1})
    sha = put_raw(sdks[0], "drift", "client-0", b"never fetched: the report is refused first")
    raw = IngestMessage(
        federation="drift", client_id="client-0", sha256=sha, size=42, round=1, label_counts={"maybe": 5}
    )
    with pytest.raises(Rejected) as refused:
        sdks[0].submit(raw, timeout=60)
    assert refused.value.code == "invalid_report" and "'maybe'" in str(refused.value)
    # a malformed histogram (a negative count) never parses: dropped and counted, nothing registered
    body = json.loads(raw.model_copy(update={"label_counts": {"neg": 1}}).signed(creds[0].secret).model_dump_json())
    body["label_counts"] = {"neg": -1}
    Inbox(stack.client_redis(creds[0]), "drift", "client-0").append(json.dumps(body))
    operator = stack.operator()
    wait_for(lambda: operator.status("drift").rejected.get("invalid_adapter", 0) >= 1, 60, "the malformed record")
    assert operator.round("drift", 1).n == 0

    for i, sdk in enumerate(sdks):
        res = sdk.upload(
            "drift",
            tmp_path / f"c{i}",
            f"client-{i}",
            dataset_size=SIZES[i],
            label_counts=COUNTS[i],
            global_eval=EVALS[i],
        )
        assert res.status in ("accepted", "fired")
    assert sdks[0].wait_round("drift", 1, timeout=120).state == "complete"

    manifest = manifest_of(operator, "drift", 1)
    entries = {c["client_id"]: c for c in manifest["clients"]}
    want = _dense_cosines(clients, list(SIZES))
    for i in range(3):
        entry = entries[f"client-{i}"]
        assert entry["label_counts"] == COUNTS[i]
        assert entry["cosine"] == pytest.approx(want[i], abs=2e-6)
        assert entry["global_eval"] == (None if EVALS[i] is None else {"accuracy": None, **EVALS[i]})
    assert len({round(c, 3) for c in want}) == 3  # distinct clients, distinct cosines
    # the example-weighted mean of the two reports; accuracy over the one report that has it
    assert manifest["global_eval"] == {
        "round": 0,
        "loss": pytest.approx((0.9 * 40 + 0.6 * 60) / 100),
        "accuracy": pytest.approx(0.5),
        "examples": 100,
        "clients": 2,
    }

    # a client's view: status (JSON and text) and rounds, under its own credentials
    status = json.loads(stack.cli("status", "-f", "drift", "--json", as_=creds[1]).stdout)
    (latest,) = [r for r in status["recent_rounds"] if r["round"] == 1]
    assert latest["label_counts"]["client-0"] == COUNTS[0]
    assert latest["cosine"]["client-2"] == pytest.approx(want[2], abs=2e-6)
    assert latest["global_eval"]["examples"] == 100 and status["warnings"] == []
    text = stack.cli("status", "-f", "drift", as_=creds[1]).stdout
    assert f"client-0  cosine {want[0]:+.3f}  labels 100: neg 80% pos 20%" in text
    assert "round 0's global model as 2 client(s) evaluated it: loss 0.7200, accuracy 0.5000 over 100 examples" in text
    rounds = stack.cli("rounds", "-f", "drift", as_=creds[2]).stdout
    assert f"client-1  cosine {want[1]:+.3f}  labels 200: neg 25% pos 75%  eval round 0: loss 0.6000 (60 ex)" in rounds
    assert (
        json.loads(stack.cli("rounds", "-f", "drift", "--json", "--detail", "0", as_=creds[2]).stdout)[0]["cosine"]
        is None
    )
