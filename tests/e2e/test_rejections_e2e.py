"""Bad deltas reach a real worker (bypassing local validation): each gets a specific reason as a
``delta_rejected`` event, nothing else changes, and the round completes with the good deltas."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from chorus_mq.adapters import LoraSpec, write_safetensors
from chorus_mq.client import ChorusClient
from chorus_mq.errors import Rejected, UnknownFederation
from chorus_mq.layout import delta_key
from chorus_mq.messages import IngestMessage
from chorus_mq.settings import Settings

pytestmark = pytest.mark.e2e

MOD = "base_model.model.layers.0.q"
SPEC = LoraSpec(r=4, lora_alpha=8, target_modules=("q",))


def _delta(tmp_path, name, tensors, spec=SPEC) -> bytes:
    path = tmp_path / f"{name}.safetensors"
    meta = {"format": "chorus-delta/1", "adapter_config": json.dumps(spec.to_peft_config())}
    write_safetensors(path, tensors, meta)
    return path.read_bytes()


def _good(seed=0, r=4, d_out=16, d_in=8):
    g = torch.Generator().manual_seed(seed)
    return {f"{MOD}.lora_A.weight": torch.randn(r, d_in, generator=g),
            f"{MOD}.lora_B.weight": torch.randn(d_out, r, generator=g)}


def _submit(sdk: ChorusClient, client: str, data: bytes, *, claimed_sha: str | None = None, round_=None):
    sha = claimed_sha or hashlib.sha256(data).hexdigest()
    key = delta_key("fed", client, sha)
    sdk.store.put_bytes(key, data, write_once=False)
    msg = IngestMessage(federation="fed", round=round_, client_id=client, object_key=key, sha256=sha, size=len(data))
    return sdk.submit(msg, timeout=60)


def _cases(tmp_path):
    good = _good()
    nan = dict(good)
    nan[f"{MOD}.lora_A.weight"] = good[f"{MOD}.lora_A.weight"].clone()
    nan[f"{MOD}.lora_A.weight"][0, 0] = float("nan")
    truncated = _delta(tmp_path, "t", good)
    return {
        "not-safetensors": (b"\x80\x04\x95" + b"pickle-ish" * 10, "pickle"),
        "truncated": (truncated[: len(truncated) - 40], ""),
        "nan": (_delta(tmp_path, "nan", nan), "nan"),
        "a-without-b": (_delta(tmp_path, "ab", {f"{MOD}.lora_A.weight": good[f"{MOD}.lora_A.weight"]}), "lora_b"),
        "shapes-dont-pair": (_delta(tmp_path, "pair", {f"{MOD}.lora_A.weight": torch.randn(4, 8),
                                                       f"{MOD}.lora_B.weight": torch.randn(16, 3)}), "rank"),
        "rank-vs-config": (_delta(tmp_path, "rk", _good(r=2)), "rank"),
        "wrong-shape-for-federation": (_delta(tmp_path, "ws", _good(d_out=12)), "shape"),
    }


def test_worker_rejects_bad_deltas_and_round_completes(deployment, tmp_path, s3_endpoint):
    deployment.start_worker()
    env = deployment.env
    settings = Settings(redis_url=env["CHORUS_REDIS_URL"], store=env["CHORUS_STORE"],
                        s3_endpoint_url=s3_endpoint)
    sdk = ChorusClient(settings)
    sdk.create_federation("fed", base_model="tiny", quorum=2)
    first = _submit(sdk, "good-0", _delta(tmp_path, "g0", _good(0)))
    assert first.status == "accepted"

    for name, (data, needle) in _cases(tmp_path).items():
        with pytest.raises(Rejected) as info:
            _submit(sdk, f"bad-{name}", data)
        assert needle.lower() in info.value.reason.lower(), (name, info.value.reason)

    other = _delta(tmp_path, "g9", _good(9))
    with pytest.raises(Rejected, match="(?i)sha256|checksum|hash"):
        _submit(sdk, "liar", other, claimed_sha="0" * 64)
    with pytest.raises(Rejected, match="no round 7"):
        _submit(sdk, "future", _delta(tmp_path, "g7", _good(7)), round_=7)
    with pytest.raises(Rejected, match="(?i)different delta"):
        _submit(sdk, "good-0", _delta(tmp_path, "g0b", _good(5)))  # same client, different bytes

    status = sdk.status("fed")
    assert (status["deltas"], status["state"]) == (1, "open")  # nothing bad was counted

    assert _submit(sdk, "good-1", _delta(tmp_path, "g1", _good(1))).status in ("accepted", "fired")
    events = list(sdk.watch("fed", from_start=True, until_round=1, timeout=120))
    assert events[-1]["type"] == "round_complete"
    rejected = [e for e in events if e["type"] == "delta_rejected"]
    assert len(rejected) == len(_cases(tmp_path)) + 3
    assert all(e["reason"] and e["code"] for e in rejected)

    with pytest.raises(Rejected, match="(?i)closed"):
        _submit(sdk, "late", _delta(tmp_path, "gl", _good(3)), round_=1)
    with pytest.raises(UnknownFederation):
        sdk.upload("nope", tmp_path / "g1.safetensors", "x")
