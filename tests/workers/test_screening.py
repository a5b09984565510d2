"""Robust screening and differential privacy, applied by the worker to real uploads."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from chorus_mq.aggregation import ClientUpdate, aggregate_module
from chorus_mq.aggregation.dp import PrivacyAccountant, aggregate_sensitivity, dp_release, noise_generator

from ..deltas import make_federation, random_factors, write_adapter

Q = "layers.0.q"


def _upload_all(sdk, tmp_path, clients):
    for i, f in enumerate(clients):
        sdk.upload("fed", write_adapter(tmp_path / f"c{i}.safetensors", f), f"c{i}")
    out = tmp_path / "out"
    manifest = sdk.pull("fed", out)
    return manifest, load_file(out / "adapter_model.safetensors")


@pytest.mark.parametrize("n", [5, 10])
def test_planted_attacker_is_excluded(sdk, tmp_path, n):
    make_federation(sdk, "fed", quorum=n, screen_outliers=True)
    honest = [random_factors(i) for i in range(n - 1)]
    attacker = random_factors(99, scale=100.0)
    manifest, adapter = _upload_all(sdk, tmp_path, [*honest, attacker])
    assert list(manifest.excluded) == [f"c{n - 1}"]
    assert manifest.clients[-1].weight == 0.0
    want = aggregate_module([ClientUpdate(A, B, 2.0, 1.0) for A, B in (f[Q] for f in honest)], "fedex-lora")
    torch.testing.assert_close(adapter[f"base_model.model.{Q}.lora_B.weight"], want.B)


def test_nan_cannot_switch_defences_off(sdk, tmp_path):
    """Non-finite deltas are refused by the client and, if sent anyway, by the worker at ingest;
    the round then screens and completes with the rest."""
    import hashlib

    from chorus_mq.errors import InvalidAdapter, Rejected
    from chorus_mq.layout import delta_key
    from chorus_mq.messages import IngestMessage

    make_federation(sdk, "fed", quorum=5, screen_outliers=True)
    bad = random_factors(1)
    bad[Q][1][0, 0] = float("nan")
    path = write_adapter(tmp_path / "nan.safetensors", bad)
    with pytest.raises(InvalidAdapter, match="NaN"):
        sdk.upload("fed", path, "mallory")
    data = path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    sdk.store.put_bytes(delta_key("fed", "mallory", sha), data)
    with pytest.raises(Rejected, match="NaN"):
        sdk.submit(IngestMessage(federation="fed", client_id="mallory", sha256=sha, size=len(data)), timeout=10)
    manifest, _ = _upload_all(sdk, tmp_path, [random_factors(i) for i in range(4)] + [random_factors(9, scale=100.0)])
    assert list(manifest.excluded) == ["c4"]


def test_clipping_bounds_the_update_linearly(sdk, tmp_path):
    make_federation(sdk, "fed", quorum=3, clip_norm=5.0)
    clients = [random_factors(i) for i in range(2)] + [random_factors(7, scale=50.0)]
    manifest, _ = _upload_all(sdk, tmp_path, clients)
    assert any(key.startswith("c2|") for key in manifest.clipped)
    assert all(0 < f < 1 for f in manifest.clipped.values())


def test_dp_ffa_noise_has_the_calibrated_std():
    A = torch.linalg.qr(torch.randn(64, 4, dtype=torch.float64))[0].T.float()  # shared frozen A, orthonormal rows
    updates = [ClientUpdate(A, torch.randn(256, 4), 1.0, 1.0) for _ in range(10)]
    res = dp_release(
        updates, quorum=10, clip_norm=2.0, noise_multiplier=3.0, generator=noise_generator("k", "fed", 1, Q)
    )
    exact = sum(u.B for u in updates) / 10
    noise = res.B - exact
    sigma = 3.0 * aggregate_sensitivity(2.0, [0.1] * 10)
    assert res.residual is None and torch.equal(res.A, A)
    assert noise.std().item() == pytest.approx(sigma, rel=0.1)
    again = dp_release(
        updates, quorum=10, clip_norm=2.0, noise_multiplier=3.0, generator=noise_generator("k", "fed", 1, Q)
    )
    assert torch.equal(again.B, res.B)  # a re-run releases identical noise, never a fresh sample


def test_dp_dense_release_is_noised_aggregate():
    updates = [ClientUpdate(torch.randn(4, 48), torch.randn(32, 4), 0.5, 1.0) for _ in range(4)]
    res = dp_release(
        updates, quorum=5, clip_norm=1.0, noise_multiplier=2.0, generator=noise_generator("k", "fed", 1, Q)
    )
    released = res.B.double() @ res.A.double() + res.residual.to_dense().double()
    exact = sum(0.5 * u.B.double() @ u.A.double() for u in updates) / 5
    noise = released - exact
    assert noise.std().item() == pytest.approx(2.0 * 1.0 / 5, rel=0.15)


def test_dp_federation_reports_privacy_spent(sdk, tmp_path):
    make_federation(sdk, "fed", quorum=2, clip_norm=1.0, dp_noise_multiplier=2.0)
    for r in (1, 2):
        for i in range(2):
            sdk.upload("fed", write_adapter(tmp_path / f"r{r}c{i}.safetensors", random_factors(10 * r + i)), f"c{i}")
    sdk.pull("fed", tmp_path / "o")
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["dp"]["noise_multiplier"] == 2.0
    privacy = sdk.status("fed").privacy
    acc = PrivacyAccountant()
    acc.spend(2.0, rounds=2)
    assert privacy["c0"]["rounds"] == 2
    assert privacy["c0"]["epsilon"] == pytest.approx(acc.epsilon(1e-5))


def test_dp_config_needs_clip_and_data_independent_weights(sdk):
    from chorus_mq.errors import ConfigError

    with pytest.raises(ConfigError, match="clip"):
        make_federation(sdk, "f1", quorum=2, dp_noise_multiplier=1.0)
    with pytest.raises(ConfigError, match="data-independent"):
        make_federation(sdk, "f2", quorum=2, dp_noise_multiplier=1.0, clip_norm=1.0, screen_outliers=True)
