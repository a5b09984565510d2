"""SCAFFOLD over real services: redis-server, moto S3 and a worker subprocess; a federation created by the CLI
with ``--scaffold``; three label-skewed clients running ``train`` through the SDK, one of them restarted
between the rounds. The published server variate is the float64 oracle's, from the stored round objects;
the restarted client's own variate is option II's over both rounds."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load, load_file

from chorus_mq.aggregation.variates import gauge_rotation, transport
from chorus_mq.names import ADAPTER_WEIGHTS, CLIENT_VARIATE_FILE, VARIATE_FILE
from chorus_mq.training.data import Examples

from ..variate_oracle import items, server_step
from .clients import create_federation, run_clients, train
from .test_local import WORDS

pytestmark = [pytest.mark.e2e, pytest.mark.services]

LABELS = ("awful", "great", "okay")
ROUNDS = 2


def _skewed(owner: int) -> Examples:
    """24 texts, 20 of them of label ``owner``: each client mostly sees one class."""
    labels = [owner] * 20 + [(owner + 1) % 3] * 2 + [(owner + 2) % 3] * 2
    texts = [f"the film was {WORDS[y]} {'really ' * (i % 4)}overall, client {owner}" for i, y in enumerate(labels)]
    return Examples(tuple(texts), tuple(labels))


def test_skewed_clients_with_a_restart_publish_the_oracles_variate(deployment, tiny_bert_dir, tmp_path):
    torch.set_num_threads(1)
    deployment.start_worker(concurrency=1)
    create_federation(deployment, "sc", tiny_bert_dir, LABELS, "--scaffold", quorum=3)
    operator = deployment.sdk()
    assert operator.status("sc").scaffold
    assert "local training: SCAFFOLD control variates" in deployment.cli("status", "-f", "sc").stdout
    secrets = {f"c{i}": operator.add_client("sc", f"c{i}").secret for i in range(3)}

    def run(client: str) -> None:
        sessions = (1, ROUNDS) if client == "c0" else (ROUNDS,)  # c0 stops after round 1, and a new session on
        for rounds in sessions:  # the same work dir takes part in round 2
            train(
                deployment, "sc", client, secrets[client], model_dir=tiny_bert_dir, data=_skewed(int(client[1])),
                workdir=tmp_path / client, rounds=rounds, steps_per_round=4, batch_size=8, lr=1e-2, max_length=32,
            )  # fmt: skip

    run_clients(run, secrets, timeout=900)
    assert [operator.round("sc", r).clients for r in range(1, ROUNDS + 1)] == [("c0", "c1", "c2")] * ROUNDS

    pulled = {}
    for r in range(ROUNDS + 1):
        operator.pull("sc", tmp_path / f"global-{r}", r)
        pulled[r] = tmp_path / f"global-{r}"
    adapters = {r: load_file(pulled[r] / ADAPTER_WEIGHTS) for r in pulled}
    assert not (pulled[0] / VARIATE_FILE).exists()  # round 0: the start, no variate yet
    server: dict[str, torch.Tensor] = {}
    uploads: dict[int, list[dict[str, torch.Tensor]]] = {}
    lr_sums = [4 * 1e-2] * 3
    for r in range(1, ROUNDS + 1):
        records = operator.state.deltas("sc", r)
        assert [records[c].lr_sum for c in ("c0", "c1", "c2")] == pytest.approx(lr_sums)
        uploads[r] = [load(operator.store.get_bytes(records[c].key)) for c in ("c0", "c1", "c2")]
        manifest = operator.pull("sc", pulled[r], r)
        weights = [{e.client_id: e.weight for e in manifest.clients}[c] for c in ("c0", "c1", "c2")]
        want = server_step(adapters[r - 1], server, uploads[r], lr_sums, weights, adapters[r])
        got = load_file(pulled[r] / VARIATE_FILE)
        assert set(got) == set(want) == set(adapters[r])
        for key in want:
            torch.testing.assert_close(got[key].double(), want[key], rtol=1e-4, atol=1e-5)
        assert manifest.variate_clipped == {}  # honest clients: nobody is clipped
        server = got

    # c0's own variate: option II after round 1 (round 0's basis), carried into round 1's, plus round 2's
    own = load_file(tmp_path / "c0" / CLIENT_VARIATE_FILE)
    x0, x1 = adapters[0], adapters[1]
    first = {k: (x0[k].double() - uploads[1][0][k].double()) / lr_sums[0] for k in x0}
    for keys in items(x0):
        if len(keys) == 2:
            first[keys[0]], first[keys[1]] = transport(
                first[keys[0]], first[keys[1]], gauge_rotation(x1[keys[0]], x0[keys[0]])
            )
    c1 = load_file(pulled[1] / VARIATE_FILE)
    for key in x1:
        want = first[key] - c1[key].double() + (x1[key].double() - uploads[2][0][key].double()) / lr_sums[0]
        torch.testing.assert_close(own[key].double(), want, rtol=1e-4, atol=1e-4)
