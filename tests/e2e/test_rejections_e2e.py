"""Bad deltas reach a real worker (bypassing the SDK's local validation, as a hostile client with its own
credentials can): each gets a specific reason as a ``delta_rejected`` event, nothing else changes, and the
round completes with the good deltas."""

from __future__ import annotations

import json

import pytest
import torch

from chorus_mq.adapters import LoraSpec, write_safetensors
from chorus_mq.errors import AuthError, Rejected, UnknownFederation
from chorus_mq.state import FederationConfig

from ..deltas import declared
from .stack import submit_raw

pytestmark = [pytest.mark.e2e, pytest.mark.services]

MOD = "base_model.model.layers.0.q"
SPEC = LoraSpec(r=4, lora_alpha=8, target_modules=("q",))


def _delta(tmp_path, name, tensors, spec=SPEC) -> bytes:
    path = tmp_path / f"{name}.safetensors"
    meta = {"format": "chorus-delta/1", "adapter_config": json.dumps(spec.to_peft_config())}
    write_safetensors(path, tensors, meta)
    return path.read_bytes()


def _good(seed=0, r=4, d_out=16, d_in=8):
    g = torch.Generator().manual_seed(seed)
    return {
        f"{MOD}.lora_A.weight": torch.randn(r, d_in, generator=g),
        f"{MOD}.lora_B.weight": torch.randn(d_out, r, generator=g),
    }


def _cases(tmp_path):
    good = _good()
    nan = dict(good)
    nan[f"{MOD}.lora_A.weight"] = good[f"{MOD}.lora_A.weight"].clone()
    nan[f"{MOD}.lora_A.weight"][0, 0] = float("nan")
    truncated = _delta(tmp_path, "t", good)
    return {  # name -> (bytes, what the reason must say, the code)
        "not-safetensors": (b"\x80\x04\x95" + b"pickle-ish" * 10, "pickle", "invalid_adapter"),
        "truncated": (truncated[: len(truncated) - 40], "truncated", "invalid_adapter"),
        "nan": (_delta(tmp_path, "nan", nan), "nan", "invalid_adapter"),
        "a-without-b": (
            _delta(tmp_path, "ab", {f"{MOD}.lora_A.weight": good[f"{MOD}.lora_A.weight"]}),
            "lora_b",
            "invalid_adapter",
        ),
        "shapes-dont-pair": (
            _delta(
                tmp_path,
                "pair",
                {f"{MOD}.lora_A.weight": torch.randn(4, 8), f"{MOD}.lora_B.weight": torch.randn(16, 3)},
            ),
            "rank",
            "invalid_adapter",
        ),
        "rank-vs-config": (_delta(tmp_path, "rk", _good(r=2)), "rank", "invalid_adapter"),
        "wrong-shape-for-federation": (
            _delta(tmp_path, "ws", _good(d_out=12)),
            "federation declares 16x8",
            "incompatible",
        ),
        "undeclared-module": (
            _delta(tmp_path, "um", {k.replace(".q.", ".k."): v for k, v in _good().items()}),
            "not in the federation's declared model",
            "incompatible",
        ),
    }


def test_worker_rejects_bad_deltas_and_round_completes(stack, tmp_path):
    op = stack.operator()
    op.create_federation(
        FederationConfig(name="rej", base_model="tiny", quorum=2),
        model=declared({"layers.0.q": (torch.zeros(4, 8), torch.zeros(16, 4))}),
    )
    sdks = {c: stack.client(stack.add_client("rej", c)) for c in ("good-0", "good-1", "mallory", "late")}

    def submit(client, data, **kw):
        return submit_raw(sdks[client], "rej", client, data, **kw)

    first = submit("good-0", _delta(tmp_path, "g0", _good(0)))
    assert first.status == "accepted"

    cases = _cases(tmp_path)
    for name, (data, needle, code) in cases.items():
        with pytest.raises(Rejected) as info:
            submit("mallory", data)
        assert needle.lower() in info.value.reason.lower(), (name, info.value.reason)
        assert info.value.code == code, (name, info.value.code, info.value.reason)

    with pytest.raises(Rejected, match=r"(?i)sha256|checksum|hash") as info:
        submit("mallory", _delta(tmp_path, "g9", _good(9)), claimed_sha="0" * 64)
    assert info.value.code == "checksum_mismatch"
    with pytest.raises(Rejected, match="no round 7"):
        submit("mallory", _delta(tmp_path, "g7", _good(7)), round_=7)
    with pytest.raises(Rejected, match=r"(?i)different delta"):
        submit("good-0", _delta(tmp_path, "g0b", _good(5)))  # same client, different bytes

    status = op.status("rej")
    assert (status.deltas, status.state) == (1, "open")  # nothing bad was counted

    assert submit("good-1", _delta(tmp_path, "g1", _good(1))).status == "accepted"
    assert op.wait_round("rej", 1, timeout=120).state == "complete"
    events = list(sdks["good-0"].watch("rej", from_start=True, until_round=1, timeout=60))
    assert events[-1].type == "round_complete"
    rejected = [e for e in events if e.type == "delta_rejected"]
    # issue 15, finding 10: the first rejection per client, round and reason is published, repeats are counted
    # (every submit above still got its own verdict)
    codes = [code for _, _, code in cases.values()]
    assert len(rejected) == len(set(codes)) + 3
    repeats = {f"{code}_repeats": codes.count(code) - 1 for code in set(codes) if codes.count(code) > 1}
    assert {k: v for k, v in op.status("rej").rejected.items() if k.endswith("_repeats")} == repeats
    assert all(e.fields["reason"] and e.fields["code"] for e in rejected)
    assert {e.fields["client"] for e in rejected} == {"mallory", "good-0"}

    with pytest.raises(Rejected, match=r"(?i)closed"):
        submit("late", _delta(tmp_path, "gl", _good(3)), round_=1)
    path = tmp_path / "g1.safetensors"
    with pytest.raises(UnknownFederation):
        op.upload("nope", path, "x")
    with pytest.raises(AuthError, match="denied"):  # a client cannot even learn whether another federation exists
        sdks["late"].upload("nope", path, "late")
