"""``train_federation`` against the in-process SDK (embedded Redis, file:// store, eager Celery tasks).

One client per federation (quorum 1), so a round completes on its upload: the loop, the work dir,
restarts, client-side DP and evaluation are exercised without other processes.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from opacus.accountants import RDPAccountant

from chorus_mq.adapters import model_decl_from_adapter
from chorus_mq.errors import ConfigError
from chorus_mq.names import PRIVACY_FILE, TRAIN_STATE_FILE, TaskType
from chorus_mq.state import FederationConfig
from chorus_mq.training.data import Examples
from chorus_mq.training.dp import DPConfig
from chorus_mq.training.driver import train_federation

from .common import seq_cls_initial
from .test_local import DATA, WORDS

LABELS = ("awful", "great", "okay")
EVAL = Examples(tuple(f"honestly {WORDS[i % 3]}" for i in range(12)), tuple(i % 3 for i in range(12)))


@pytest.fixture
def sdk(tmp_path):
    from chorus_mq.simulate_synthetic import embedded_sdk
    from chorus_mq.workers import runtime

    yield embedded_sdk(tmp_path / "deployment")
    runtime.install(None)


@pytest.fixture
def federation(sdk, tiny_bert_dir, tmp_path):
    """A seq-cls federation with round 0 built from a seed, and one registered client."""
    initial = seq_cls_initial(tiny_bert_dir, tmp_path / "initial", LABELS)
    config = FederationConfig(name="fed", base_model="tiny-bert", quorum=1, task_type=TaskType.SEQ_CLS, labels=LABELS)
    sdk.create_federation(config, model=model_decl_from_adapter(initial), initial_adapter=initial)
    return "fed", sdk.add_client("fed", "alice").secret


def _run(sdk, federation, model_dir, workdir, **options):
    name, secret = federation
    sdk.secret = secret
    options = {"steps_per_round": 10, "batch_size": 8, "lr": 1e-2, "max_length": 32, "json": True, **options}
    return list(
        train_federation(
            sdk,
            federation=name,
            client_id="alice",
            model_dir=model_dir,
            data=DATA,
            workdir=workdir,
            timeout=60,
            poll=0.05,
            **options,
        )
    )


def test_rounds_run_end_to_end_and_a_restart_resumes_without_recounting(sdk, federation, tiny_bert_dir, tmp_path):
    work = tmp_path / "alice"
    records = _run(sdk, federation, tiny_bert_dir, work, rounds=2, eval_data=EVAL)
    assert [r.round for r in records] == [1, 2] and [r.start_round for r in records] == [0, 1]
    assert all(r.state == "complete" and r.upload in ("accepted", "fired") for r in records)
    assert all(r.upload_bytes > 0 and r.steps == 10 and r.examples == len(DATA) for r in records)
    assert records[-1].eval_accuracy is not None and records[-1].eval_loss is not None
    assert json.loads((work / TRAIN_STATE_FILE).read_text())["done"] == [1, 2]
    # every upload declared the client's label counts; round 2's also its evaluation of round 1's global model
    first, second = sdk.round("fed", 1), sdk.round("fed", 2, cosines=True)
    assert first.label_counts == second.label_counts == {"alice": {"awful": 16, "great": 16, "okay": 16}}
    assert first.evals == {} and first.global_eval is None
    assert second.evals["alice"] == {
        "round": 1,
        "loss": pytest.approx(records[0].eval_loss),
        "accuracy": pytest.approx(records[0].eval_accuracy),
        "examples": len(EVAL),
    }
    assert (second.global_eval.round, second.global_eval.examples, second.global_eval.clients) == (1, len(EVAL), 1)
    assert second.global_eval.loss == pytest.approx(records[0].eval_loss)
    assert second.cosine == {"alice": 1.0}  # a lone client is its round's aggregate
    # the same work dir with the same --rounds has nothing left to do ...
    assert _run(sdk, federation, tiny_bert_dir, work, rounds=2) == []
    # ... and with one more round it takes part in round 3 only
    assert [r.round for r in _run(sdk, federation, tiny_bert_dir, work, rounds=3)] == [3]
    assert [(sdk.round("fed", r).n, sdk.round("fed", r).clients) for r in (1, 2, 3)] == [(1, ("alice",))] * 3


def test_a_round_trained_before_a_crash_is_uploaded_as_is(sdk, federation, tiny_bert_dir, tmp_path):
    """Killed after training (adapter kept in the work dir, nothing uploaded): the restart uploads those bytes."""
    work = tmp_path / "alice"
    _run(sdk, federation, tiny_bert_dir, work, rounds=1)
    # round 2's adapter, as a process that died before uploading would have left it (here: round 1's bytes)
    shutil.copytree(work / "rounds" / "000001", work / "rounds" / "000002")
    trained = json.loads((work / "rounds" / "000002" / "trained.json").read_text())
    (work / "rounds" / "000002" / "trained.json").write_text(json.dumps({**trained, "round": 2, "start_round": 1}))
    [record] = _run(sdk, federation, tiny_bert_dir, work, rounds=2)
    assert record.round == 2 and record.start_round == 1
    first, second = (sdk.pull("fed", tmp_path / f"check{r}", r).clients for r in (1, 2))
    assert second[0].sha256 == first[0].sha256  # not retrained: the very same delta went up


def test_client_side_dp_reports_the_accountants_epsilon(sdk, federation, tiny_bert_dir, tmp_path):
    work = tmp_path / "alice"
    dp = DPConfig(epsilon=4.0, delta=1e-5, clip=1.0)
    records = _run(sdk, federation, tiny_bert_dir, work, rounds=2, dp=dp, dp_seed=0)
    ledger = json.loads((work / PRIVACY_FILE).read_text())
    q = 8 / len(DATA)
    acc = RDPAccountant()
    acc.history = [(ledger["noise_multiplier"], q, 10)]
    assert records[0].epsilon == pytest.approx(acc.get_epsilon(1e-5))
    acc.history = [(ledger["noise_multiplier"], q, 20)]
    assert records[1].epsilon == pytest.approx(acc.get_epsilon(1e-5)) and records[1].epsilon <= 4.0 * 1.02
    assert ledger["released"] == {"1": 10, "2": 10}
    reported = sdk.status("fed").client_dp["alice"]
    assert sdk.round("fed", 1).label_counts == {}  # DP-SGD does not cover label counts: not sent by default
    assert reported["epsilon"] == pytest.approx(records[1].epsilon) and reported["steps"] == 20
    with pytest.raises(ConfigError, match="over its budget"):
        _run(sdk, federation, tiny_bert_dir, work, rounds=3, dp=dp, dp_seed=0)


def test_a_work_dir_belongs_to_one_client(sdk, federation, tiny_bert_dir, tmp_path):
    work = tmp_path / "alice"
    _run(sdk, federation, tiny_bert_dir, work, rounds=1)
    name, _secret = federation
    with pytest.raises(ConfigError, match="belongs to client 'alice'"):
        list(train_federation(sdk, federation=name, client_id="bob", model_dir=tiny_bert_dir, data=DATA, workdir=work))


def test_the_task_and_labels_come_from_the_federation(sdk, federation, tiny_bert_dir, tmp_path):
    name, _secret = federation
    with pytest.raises(ConfigError, match="differs from the federation's task"):
        list(
            train_federation(
                sdk,
                federation=name,
                client_id="alice",
                model_dir=tiny_bert_dir,
                data=DATA,
                workdir=tmp_path / "w",
                task="causal-lm",
            )
        )
    bad = Examples(("x", "y"), None)
    with pytest.raises((ConfigError, ValueError)):
        list(
            train_federation(
                sdk,
                federation=name,
                client_id="alice",
                model_dir=tiny_bert_dir,
                data=bad,
                workdir=tmp_path / "w2",
                steps_per_round=1,
            )
        )
    assert torch.get_num_threads() == 1
