"""A client's side of SCAFFOLD: the correction reaches every local step, the client's variate is option II's,
survives restarts in its work dir, and follows the global adapter's basis; ``train`` runs it end to end."""

from __future__ import annotations

import pytest
import torch
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file

from chorus_mq.adapters import model_decl_from_adapter
from chorus_mq.aggregation.variates import gauge_rotation, transport
from chorus_mq.errors import ConfigError
from chorus_mq.names import CLIENT_VARIATE_FILE, VARIATE_FILE, LocalOptimizer, TaskType
from chorus_mq.state import FederationConfig
from chorus_mq.training.driver import train_federation
from chorus_mq.training.local_round import TrainConfig, train_local
from chorus_mq.training.model import exact_model
from chorus_mq.training.scaffold import ScaffoldRound, keep_variate, save_variate, trained_tensors

from .common import seq_cls_initial
from .test_local import DATA

LABELS = ("awful", "great", "okay")
STEPS, LR = 10, 1e-2


def _model(initial, tiny_bert_dir):
    return exact_model(initial, tiny_bert_dir, task=TaskType.SEQ_CLS, trainable=True, labels=LABELS)


def _train(model, tokenizer, correction=None):
    config = TrainConfig(steps=STEPS, batch_size=8, lr=LR, max_length=32, optimizer=LocalOptimizer.SGD)
    train_local(model, tokenizer, DATA, config, correction=correction)
    return {k: p.detach().clone() for k, p in trained_tensors(model).items()}


def test_every_local_step_is_corrected_and_the_clients_variate_is_its_own_gradient(tiny_bert_dir, tokenizer, tmp_path):
    initial = seq_cls_initial(tiny_bert_dir, tmp_path / "r0", LABELS)
    model = _model(initial, tiny_bert_dir)
    # the variate keys are the adapter file's: what the client uploads and the server publishes
    assert set(trained_tensors(model)) == set(get_peft_model_state_dict(model, save_embedding_layers=False))
    start = {k: p.detach().clone() for k, p in trained_tensors(model).items()}
    plain = _train(model, tokenizer)
    g = torch.Generator().manual_seed(0)
    drift = {k: 0.05 * torch.randn(x.shape, generator=g) for k, x in start.items()}

    zero = _train(_model(initial, tiny_bert_dir), tokenizer, {k: torch.zeros_like(x) for k, x in start.items()})
    assert all(torch.equal(zero[k], plain[k]) for k in plain)  # c = c_i: plain training, bit for bit

    corrected_model = _model(initial, tiny_bert_dir)
    rnd = ScaffoldRound(start, server=drift, own={k: torch.zeros_like(x) for k, x in start.items()})
    corrected = _train(corrected_model, tokenizer, rnd.correction())
    # each of the K steps moved every tensor by -lr (c - c_i) on top of SGD's step (to first order: the
    # gradients along the corrected path differ by O(K lr) of it)
    shift = torch.cat([(corrected[k] - plain[k] + STEPS * LR * drift[k]).flatten() for k in start])
    total = torch.cat([(STEPS * LR * drift[k]).flatten() for k in start])
    assert float(shift.norm()) < 0.05 * float(total.norm())
    # option II: c_i + Δc_i = c_i - c + (x - y)/(K lr) is the mean gradient of the round, correction or not
    ours = rnd.finish(corrected_model, STEPS * LR)
    mean_grad = {k: (start[k] - plain[k]) / (STEPS * LR) for k in start}
    err = torch.cat([(ours[k] - mean_grad[k]).flatten() for k in start])
    assert float(err.norm()) < 0.05 * float(torch.cat([v.flatten() for v in mean_grad.values()]).norm())
    with pytest.raises(ConfigError, match="correction"):
        train_local(model, tokenizer, DATA, TrainConfig(steps=1), correction={"nope": torch.zeros(1)})


def test_the_clients_variate_is_kept_newest_first_and_carried_into_a_new_basis(tiny_bert_dir, tmp_path):
    initial = seq_cls_initial(tiny_bert_dir, tmp_path / "r0", LABELS)
    model = _model(initial, tiny_bert_dir)
    start = {k: p.detach().clone() for k, p in trained_tensors(model).items()}
    g = torch.Generator().manual_seed(1)
    variate = {k: torch.randn(x.shape, generator=g) for k, x in start.items()}
    basis = {k: v for k, v in start.items() if k.endswith(".lora_A.weight")}
    own = tmp_path / CLIENT_VARIATE_FILE
    assert ScaffoldRound.begin(model, None, own).own_round is None  # none yet: zeros
    save_variate(tmp_path / "r2.safetensors", variate, basis, 2)
    save_variate(tmp_path / "r1.safetensors", {k: v + 1 for k, v in variate.items()}, basis, 1)
    assert keep_variate(tmp_path / "r2.safetensors", own)
    assert not keep_variate(tmp_path / "r1.safetensors", own)  # never an older round's over a newer one
    assert not keep_variate(tmp_path / "missing.safetensors", own)

    # the next global adapter is published in another basis (B Qᵀ, Q A): the variate follows it
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))
    with torch.no_grad():
        params = trained_tensors(model)
        for key in basis:
            b_key = key.replace(".lora_A.", ".lora_B.")
            params[key].copy_((q @ params[key].double()).float())
            params[b_key].copy_((params[b_key].double() @ q.T).float())
    rnd = ScaffoldRound.begin(model, tmp_path / "no-such-pull", own)
    assert rnd.own_round == 2
    for key in basis:
        b_key = key.replace(".lora_A.", ".lora_B.")
        want_a, want_b = transport(variate[key], variate[b_key], q)
        torch.testing.assert_close(rnd.own[key], want_a.float(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rnd.own[b_key], want_b.float(), rtol=1e-5, atol=1e-5)
    head = next(k for k in start if "classifier" in k)
    torch.testing.assert_close(rnd.own[head], variate[head])  # no basis: unchanged
    assert all(float(v.abs().max()) == 0 for v in rnd.server.values())  # no server variate pulled: zero


def test_simulate_refuses_mixed_ranks_with_scaffold():
    from chorus_mq.training.simulate_model import run_model_simulation

    with pytest.raises(ConfigError, match="one rank for every client"):
        run_model_simulation(ranks=[4, 8], scaffold=True, echo=None)


@pytest.fixture
def sdk(tmp_path):
    from chorus_mq.simulate_synthetic import embedded_sdk
    from chorus_mq.workers import runtime

    yield embedded_sdk(tmp_path / "deployment")
    runtime.install(None)


def test_train_keeps_the_clients_variate_across_a_restart_and_it_tracks_the_servers(sdk, tiny_bert_dir, tmp_path):
    """One client (weight 1, every round): its own variate, carried into the latest global basis, is the
    server's variate after every round, which only holds if the restart kept it."""
    initial = seq_cls_initial(tiny_bert_dir, tmp_path / "initial", LABELS)
    config = FederationConfig(
        name="fed", base_model="tiny-bert", quorum=1, task_type=TaskType.SEQ_CLS, labels=LABELS, scaffold=True
    )
    sdk.create_federation(config, model=model_decl_from_adapter(initial), initial_adapter=initial)
    sdk.secret = sdk.add_client("fed", "alice").secret
    assert sdk.status("fed").scaffold
    work = tmp_path / "alice"

    def run(rounds, **extra):
        options = {"steps_per_round": 5, "batch_size": 8, "lr": 1e-2, "max_length": 32, "json": True, **extra}
        return list(
            train_federation(
                sdk,
                federation="fed",
                client_id="alice",
                model_dir=tiny_bert_dir,
                data=DATA,
                workdir=work,
                rounds=rounds,
                timeout=60,
                poll=0.05,
                **options,
            )
        )

    with pytest.raises(ConfigError, match="SCAFFOLD"):
        run(1, lora_rank=2)
    for rounds in (1, 2):  # a restart between the rounds: a new session on the same work dir
        assert [rec.round for rec in run(rounds)] == [rounds]
        server_dir = tmp_path / f"server-{rounds}"
        sdk.pull("fed", server_dir, rounds)
        server = load_file(server_dir / VARIATE_FILE)
        adapter = load_file(server_dir / "adapter_model.safetensors")
        own = load_file(work / CLIENT_VARIATE_FILE)
        for key, c in server.items():
            if key.endswith(".lora_A.weight"):
                b_key = key.replace(".lora_A.", ".lora_B.")
                basis = own[key.removesuffix(".lora_A.weight") + ".lora_A.basis"]
                a_part, b_part = transport(own[key], own[b_key], gauge_rotation(adapter[key], basis))
                torch.testing.assert_close(a_part.float(), c, rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(b_part.float(), server[b_key], rtol=1e-4, atol=1e-5)
            elif ".lora_B." not in key:
                torch.testing.assert_close(own[key], c, rtol=1e-4, atol=1e-5)
        assert any(float(c.abs().max()) > 0 for c in server.values())
    records = sdk.state.deltas("fed", 2)
    assert records["alice"].lr_sum == pytest.approx(5 * 1e-2)
