"""A real pretrained model and real data through the real ingest/aggregate path: MiniLM (BERT)
sentiment LoRA clients trained on Rotten Tomatoes shards, aggregated exactly, checked through PEFT."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from chorus_mq.adapters import model_decl_from_adapter
from chorus_mq.client import ChorusClient
from chorus_mq.manifest import Manifest
from chorus_mq.settings import Settings
from chorus_mq.state import FederationConfig
from chorus_mq.store import open_store
from chorus_mq.workers import runtime

from .. import realdata as rd

pytestmark = [pytest.mark.e2e, pytest.mark.services]

SIZES = (200, 250, 300)  # dataset sizes: unequal weights (ranks and alphas are mixed by rd.train_clients)
N_TEST, N_PROBE = 400, 64  # accuracy on the held-out set; logit comparisons on its first N_PROBE


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Base model, data split, three locally trained clients and the float64 centralised oracle."""
    base = rd.base_model(seed=0)
    split = rd.split(list(SIZES), N_TEST, seed=0)
    clients = rd.train_clients(base, split.clients, tmp_path_factory.mktemp("clients"), seed=10)
    probe = rd.Examples(split.test.texts[:N_PROBE], split.test.labels[:N_PROBE])
    exact = rd.exact_model(base, clients, list(SIZES))
    return {
        "base": base,
        "split": split,
        "clients": clients,
        "probe": probe,
        "exact": exact,
        "want": rd.logits(exact, probe),
    }


def federate(sdk: ChorusClient, strategy: str, clients: list[rd.Trained], out: Path, **pull_options) -> Manifest:
    """One round over the real ingest path (quorum = every client); pull it into ``out``.

    The federation declares its model from a reference adapter (client 0's saved adapter: the
    modules, their shapes and the classifier head every delta must carry), as
    ``federation create --reference-adapter`` does.
    """
    name = f"minilm-{strategy}"
    config = FederationConfig(name=name, base_model="all-MiniLM-L6-v2", quorum=len(clients), strategy=strategy)
    sdk.create_federation(config, model=model_decl_from_adapter(clients[0].path))
    assert rd.upload_round(sdk, name, clients, list(SIZES)) == ["accepted", "accepted", "accepted"]
    return sdk.pull(name, out, **pull_options)


@pytest.fixture(scope="module")
def pulled(world, redis_server, tmp_path_factory) -> dict[str, tuple[Manifest, Path]]:
    """The same three uploads aggregated by fedex-lora (pulled with both optional adapters) and by fedavg,
    through the real tasks run in this process (a private redis-server, a file:// store)."""
    root = tmp_path_factory.mktemp("federate")
    redis = redis_server.client()
    redis.flushall()
    settings = Settings(
        redis_url=redis_server.url,
        store=f"file://{root}/store",
        eager=True,
        spool_dir=str(root / "spool"),
        allow_unsigned=True,
        client_acl="off",
    )
    rt = runtime.Runtime(settings, redis, open_store(settings.store, settings))
    runtime.install(rt)
    try:
        sdk = ChorusClient(settings, redis=redis, store=rt.store)
        out = {
            "fedex-lora": (
                federate(
                    sdk, "fedex-lora", world["clients"], root / "fedex-lora", exact_adapter=True, residual_adapter=True
                ),
                root / "fedex-lora",
            ),
            "fedavg": (federate(sdk, "fedavg", world["clients"], root / "fedavg"), root / "fedavg"),
        }
    finally:
        runtime.install(None)
        redis.close()
    return out


def with_residual_adapter(base, pulled_dir: Path):
    """``residual_adapter/`` first, then the global adapter, both active.

    With a task head this order matters: peft adds the head to the modules_to_save of every
    adapter loaded into a SEQ_CLS model, and the residual adapter (task-less) has no head;
    loaded first into a plain PeftModel it needs none, and the global adapter brings the head.
    """
    from peft import PeftModel

    model = PeftModel.from_pretrained(
        copy.deepcopy(base), str(pulled_dir / "residual_adapter"), adapter_name="residual"
    )
    model.load_adapter(str(pulled_dir), adapter_name="global")
    model.base_model.set_adapter(["global", "residual"])
    return model.eval()


def test_fedex_round_on_minilm_is_exact_through_peft(world, pulled):
    """(a) the pulled adapter acts through PEFT; (b) with the cumulative residual folded in, it is exact."""
    from peft import PeftModel

    base, probe, want = world["base"], world["probe"], world["want"]
    manifest, pulled_dir = pulled["fedex-lora"]
    assert [c.client_id for c in manifest.clients] == ["client-0", "client-1", "client-2"]
    # every claim is under the 0.5 cap, so the weights are the dataset sizes' shares
    assert [c.weight for c in manifest.clients] == pytest.approx([s / sum(SIZES) for s in SIZES])

    # (a) the pulled adapter loads and acts: on the LoRA modules, not only through the head
    adapter_only = PeftModel.from_pretrained(copy.deepcopy(base), str(pulled_dir)).eval()
    head_only = copy.deepcopy(base)
    head_only.get_submodule(rd.HEAD).load_state_dict(world["exact"].get_submodule(rd.HEAD).state_dict())
    assert rd.max_error(rd.logits(adapter_only, probe), rd.logits(head_only, probe)) > 1e-2
    # the residual matters: mixed ranks and alphas make the averaged factors alone inexact
    assert rd.max_error(rd.logits(adapter_only, probe), want) > 1e-2

    # (b) base + cumulative residual + global adapter == base + Σ wᵢ sᵢ Bᵢ Aᵢ with the averaged head
    torch.testing.assert_close(rd.logits(rd.global_model(base, pulled_dir), probe), want, rtol=1e-4, atol=1e-4)


def test_residual_adapter_makes_the_global_adapter_exact(world, pulled):
    """(c) base weights untouched: ``residual_adapter/`` and the global adapter, both active, are exact."""
    model = with_residual_adapter(world["base"], pulled["fedex-lora"][1])
    torch.testing.assert_close(rd.logits(model, world["probe"]), world["want"], rtol=1e-4, atol=1e-4)
    model.base_model.set_adapter("global")  # and it is the residual adapter that closes the gap
    assert rd.max_error(rd.logits(model, world["probe"]), world["want"]) > 1e-2


def test_exact_adapter_alone_is_exact_with_the_head(world, pulled):
    """``exact_adapter/``: one adapter (global + cumulative residual, with the head), loaded the plain way."""
    from peft import PeftModel

    exact_dir = pulled["fedex-lora"][1] / "exact_adapter"
    model = PeftModel.from_pretrained(copy.deepcopy(world["base"]), str(exact_dir)).eval()
    torch.testing.assert_close(rd.logits(model, world["probe"]), world["want"], rtol=1e-4, atol=1e-4)


def test_fedex_global_model_learned_the_task(world, pulled):
    """(d) the aggregated model classifies held-out reviews well above chance and above the base."""
    test = world["split"].test
    accuracy = rd.accuracy(rd.global_model(world["base"], pulled["fedex-lora"][1]), test)
    assert accuracy > 0.6
    assert accuracy > rd.accuracy(world["base"], test) + 0.1


def test_fedavg_over_the_same_uploads_is_measurably_inexact(world, pulled):
    """(e) fedavg's global model misses the centralised update by orders of magnitude more than fedex's."""
    errors = {}
    for strategy in ("fedavg", "fedex-lora"):
        manifest, pulled_dir = pulled[strategy]
        assert manifest.strategy == strategy
        errors[strategy] = rd.max_error(
            rd.logits(rd.global_model(world["base"], pulled_dir), world["probe"]), world["want"]
        )
    assert errors["fedex-lora"] < 1e-4
    assert errors["fedavg"] > 1e-2 and errors["fedavg"] > 1000 * errors["fedex-lora"], errors
