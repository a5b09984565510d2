"""The CLI over a real redis-server: exit codes, one-line errors, status, watch resumption, history."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from chorus_mq.cli import main
from chorus_mq.pulled import LocalState

from .deltas import random_factors, write_adapter

pytestmark = pytest.mark.services


@pytest.fixture
def ref(tmp_path):
    """A reference adapter: it declares the model (module shapes) every delta must match."""
    return str(write_adapter(tmp_path / "reference.safetensors", random_factors(0)))


@pytest.fixture
def cli(real_redis, redis_server, tmp_path, make_sdk):
    make_sdk()  # tasks of this process run against this Redis and store
    env = {
        "CHORUS_REDIS_URL": redis_server.url,
        "CHORUS_STORE": f"file://{tmp_path}/store",
        "CHORUS_EAGER": "true",
        "CHORUS_SPOOL_DIR": str(tmp_path / "spool"),
    }

    def run(*args, code=0):
        res = CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)
        assert res.exit_code == code, res.output
        return res

    return run


def test_errors_are_one_line_with_specific_exit_codes(cli, tmp_path, ref):
    res = cli("status", "--federation", "nope", code=4)
    assert res.output.count("\n") == 1 and "no federation named 'nope'" in res.output
    cli("federation", "create", "fed", "--base-model", "m", "--quorum", "2", "--reference-adapter", ref)
    assert (
        "already exists"
        in cli(
            "federation", "create", "fed", "--base-model", "m", "--quorum", "3", "--reference-adapter", ref, code=5
        ).output
    )
    assert "no complete round" in cli("pull", "--federation", "fed", "--output", str(tmp_path / "o"), code=4).output
    assert (
        "Invalid value"
        in cli("federation", "create", "x", "--base-model", "m", "--quorum", "1", "--strategy", "mean", code=2).output
    )
    assert "declare" in cli("federation", "create", "x", "--base-model", "m", "--quorum", "1", code=2).output
    personal = ("federation", "create", "x", "--base-model", "m", "--quorum", "1", "--reference-adapter", ref)
    assert "needs a seq-cls federation" in cli(*personal, "--personal-heads", code=2).output
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    res = cli("upload", "--federation", "fed", "--adapter", str(bad), "--client-id", "c", code=3)
    assert res.output.startswith("error:") and "Traceback" not in res.output


def test_round_flow_status_history_and_manual_close(cli, tmp_path, ref):
    cli(
        "federation",
        "create",
        "fed",
        "--base-model",
        "m",
        "--quorum",
        "3",
        "--min-quorum",
        "2",
        "--reference-adapter",
        ref,
    )
    for i in range(2):
        out = cli(
            "upload",
            "--federation",
            "fed",
            "--adapter",
            str(write_adapter(tmp_path / f"c{i}.safetensors", random_factors(i))),
            "--client-id",
            f"c{i}",
        ).output
        assert out.startswith("accepted")
    status = json.loads(cli("status", "--federation", "fed", "--json").output)
    assert (status["current_round"], status["deltas"], status["quorum"], status["state"]) == (1, 2, 3, "open")
    assert "aggregating" in cli("round", "close", "--federation", "fed").output
    history = json.loads(cli("rounds", "--federation", "fed", "--json").output)
    assert history[0]["state"] == "complete" and history[0]["clients"] == ["c0", "c1"]
    assert history[1]["state"] == "open"
    table = cli("rounds", "--federation", "fed").output.splitlines()
    assert table[0].split() == ["round", "state", "deltas", "waited", "aggregated", "manifest"]
    first = table[1].split()
    assert first[:3] == ["1", "complete", "2"] and all(t.endswith("s") for t in first[3:5])
    assert history[0]["aggregation_started_at"] >= history[0]["opened_at"]
    assert "not open" in cli("round", "close", "--federation", "fed", "--round", "1", code=5).output


def test_watch_replays_and_resumes_after_an_id(cli, tmp_path, ref):
    cli("federation", "create", "fed", "--base-model", "m", "--quorum", "1", "--reference-adapter", ref)
    cli(
        "upload",
        "--federation",
        "fed",
        "--adapter",
        str(write_adapter(tmp_path / "a.safetensors", random_factors(0))),
        "--client-id",
        "a",
    )
    lines = cli("watch", "--federation", "fed", "--json", "--from-start", "--until-round", "1").output.splitlines()
    events = [json.loads(line) for line in lines]
    types = [e["type"] for e in events]
    assert types[-1] == "round_complete" and "delta_accepted" in types
    middle = events[2]["id"]
    resumed = cli("watch", "--federation", "fed", "--json", "--after", middle, "--until-round", "1").output
    assert [json.loads(line)["id"] for line in resumed.splitlines()] == [e["id"] for e in events[3:]]


def test_client_registry_commands(cli, ref):
    cli("federation", "create", "fed", "--base-model", "m", "--quorum", "1", "--reference-adapter", ref)
    secret = cli("client", "add", "alice", "--federation", "fed").output.strip().splitlines()[-1]
    assert len(secret) >= 40
    revoked = cli("client", "revoke", "alice", "--federation", "fed").output
    assert "it has no delta in the current round 1" in revoked
    assert "warning: 0 active clients for a quorum of 1 and no --round-timeout" in revoked  # it would wait
    assert cli("client", "list", "--federation", "fed").output.split() == ["alice", "revoked"]


def test_pull_keeps_increments_and_folds_them_on_request(cli, tmp_path):
    # 64x12 modules: two rounds' rank-4 residuals stay under the modules' dense size (else a pull folds them)
    ref = str(write_adapter(tmp_path / "reference.safetensors", random_factors(0, d_out=64)))
    cli("federation", "create", "fed", "--base-model", "m", "--quorum", "2", "--reference-adapter", ref)
    out = tmp_path / "pulled"
    for r in (1, 2):  # round 2's increment does not outweigh round 1's file: it stays an increment
        for c in ("c0", "c1"):  # two clients: a round's residual is not zero
            factors = random_factors(10 * r + int(c[1]), d_out=64)
            delta = write_adapter(tmp_path / f"{c}-{r}.safetensors", factors)
            cli("upload", "--federation", "fed", "--adapter", str(delta), "--client-id", c)
        assert f"round {r}" in cli("pull", "--federation", "fed", "--output", str(out)).output
    state = LocalState.load(out)
    assert state is not None and state.round == 2 and state.folded == 1 and state.increments == (2,)
    cli("pull", "--federation", "fed", "--output", str(out), "--fold")
    state = LocalState.load(out)
    assert state is not None and state.folded == 2 and state.increments == ()
    assert not list((out / "increments").glob("*.safetensors"))


def test_server_optimiser_options_are_published_and_stack_is_refused(cli, ref):
    base = ("federation", "create", "--base-model", "m", "--quorum", "1", "--reference-adapter", ref)
    res = cli(*base[:2], "adam", *base[2:], "--server-opt", "fedadam", "--server-lr", "0.01", "--server-tau", "1e-4")
    assert "server optimiser: fedadam (lr 0.01, beta1 0.9, beta2 0.99, tau 0.0001)" in res.output
    status = json.loads(cli("status", "--federation", "adam", "--json").output)
    assert status["server_opt"] == {"optimizer": "fedadam", "lr": 0.01, "beta1": 0.9, "beta2": 0.99, "tau": 1e-4}
    assert "server optimiser: fedadam (lr 0.01" in cli("status", "--federation", "adam").output
    refused = cli(*base[:2], "st", *base[2:], "--server-opt", "fedavgm", "--strategy", "stack", code=2).output
    assert refused.startswith("error:") and "cannot step --strategy stack" in refused
    assert "does not apply" in cli(*base[:2], "x", *base[2:], "--server-lr", "0.5", code=2).output
    # without --server-lr each optimiser takes its own step size (adaptive ones at 1, the old default, diverged)
    for name, optimizer, lr in (("yogi", "fedyogi", 0.01), ("avgm", "fedavgm", 1.0)):
        cli(*base[:2], name, *base[2:], "--server-opt", optimizer)
        assert json.loads(cli("status", "--federation", name, "--json").output)["server_opt"]["lr"] == lr
    assert "Invalid value" in cli(*base[:2], "y", *base[2:], "--server-opt", "sgd", code=2).output
    cli(*base[:2], "plain", *base[2:])
    assert json.loads(cli("status", "--federation", "plain", "--json").output)["server_opt"] == {}
    assert "server optimiser" not in cli("status", "--federation", "plain").output


def test_buffered_create_takes_several_deltas_per_client_and_sampling_with_a_flush_timeout(cli, ref):
    create = ("federation", "create", "b1", "--base-model", "m", "--mode", "buffered", "--buffer", "4")
    create = (*create, "--relative-clip", "0", "--reference-adapter", ref)
    refused = cli(*create, "--clients-per-round", "4", code=2).output
    assert "--clients-per-round 4 needs --flush-timeout SECONDS in a buffered federation" in refused
    assert (
        "quorum 4 can never be reached with 2 clients per round"
        in cli(*create, "--clients-per-round", "2", "--flush-timeout", "60", code=2).output
    )
    cli(*create, "--clients-per-round", "2", "--flush-timeout", "60", "--max-per-client-per-flush", "2")
    out = cli("status", "--federation", "b1", "--json").output
    assert json.loads(out)["buffered"]["max_per_client_per_flush"] == 2
