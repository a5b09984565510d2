"""The walking skeleton, end to end over the real stack, driven by the CLI: a federation declared from a local
model directory, three clients with the credentials `client add` printed for them (their own Redis user and
S3 keys), a real ingest worker and aggregate worker, and the pulled result checked exact through PEFT."""

from __future__ import annotations

import copy
import json
import threading

import pytest
import torch

from chorus_mq.adapters import fold_into_state_dict
from chorus_mq.pulled import iter_correction

from .tinyllama import TARGETS, client_adapter, exact_model, logits, tiny_llama

pytestmark = [pytest.mark.e2e, pytest.mark.services]


def test_exact_round_over_cli_worker_and_peft(stack, tmp_path):
    from peft import PeftModel

    base = tiny_llama()
    model_dir = tmp_path / "tiny-llama"
    base.save_pretrained(model_dir)  # config.json + model.safetensors: the federation reads the headers only
    ranks, alphas, sizes = (4, 8, 8), (8, 16, 32), (200, 300, 400)
    clients = [
        client_adapter(base, tmp_path / f"client{i}", rank=r, alpha=a, seed=10 + i)
        for i, (r, a) in enumerate(zip(ranks, alphas, strict=True))
    ]
    created = stack.cli(
        "federation",
        "create",
        "e2e",
        "--base-model",
        str(model_dir),
        "--target-modules",
        ",".join(TARGETS),
        "--quorum",
        "3",
    )
    assert "round 1 is open" in created.stdout
    creds = [stack.add_client("e2e", f"client-{i}") for i in range(3)]
    watcher = stack.spawn(
        "watch",
        "watch",
        "--federation",
        "e2e",
        "--json",
        "--until-round",
        "1",
        "--timeout",
        "180",
        env={"CHORUS_REDIS_URL": creds[0].redis_url},
    )

    # a bad delta first: refused locally with a reason, and the round still completes with the good ones
    truncated = tmp_path / "bad.safetensors"
    good = (tmp_path / "client0" / "adapter_model.safetensors").read_bytes()
    truncated.write_bytes(good[: len(good) // 2])
    bad = stack.cli(
        "upload",
        "--federation",
        "e2e",
        "--adapter",
        str(truncated),
        "--client-id",
        "client-0",
        as_=creds[0],
        check=False,
    )
    assert bad.returncode == 3 and "error:" in bad.stderr and "Traceback" not in bad.stderr

    results = {}

    def upload(i):
        results[i] = stack.cli(
            "upload",
            "--federation",
            "e2e",
            "--adapter",
            str(tmp_path / f"client{i}"),
            "--client-id",
            f"client-{i}",
            "--dataset-size",
            str(sizes[i]),
            as_=creds[i],
            check=False,
        )

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for res in results.values():
        assert res.returncode == 0, res.stderr
        assert "accepted" in res.stdout or "fired" in res.stdout

    watcher.wait(timeout=180)
    assert watcher.returncode == 0, stack.log(watcher)
    events = [json.loads(line) for line in stack.log(watcher).splitlines() if line.startswith("{")]
    assert events[-1]["type"] == "round_complete" and events[-1]["round"] == 1
    assert sum(e["type"] == "delta_accepted" for e in events) == 3

    status = json.loads(stack.cli("status", "--federation", "e2e", "--json", as_=creds[1]).stdout)
    assert (status["current_round"], status["latest_complete"], status["state"]) == (2, 1, "open")

    pulled = tmp_path / "pulled"
    stack.cli("pull", "--federation", "e2e", "--output", str(pulled), "--exact-adapter", as_=creds[2])
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "residual.safetensors",
        "cumulative_residual.safetensors",
        "manifest.json",
        "state.json",
    ):
        assert (pulled / name).is_file(), name
    manifest = json.loads((pulled / "manifest.json").read_text())
    assert [c["client_id"] for c in manifest["clients"]] == ["client-0", "client-1", "client-2"]
    assert [c["weight"] for c in manifest["clients"]] == pytest.approx([s / sum(sizes) for s in sizes])

    want = logits(exact_model(base, clients, list(sizes)))
    # base + cumulative residual (folded in fp32) + the global adapter through PEFT
    corrected = copy.deepcopy(base)
    corrected.load_state_dict(
        fold_into_state_dict(corrected.state_dict(), dict(iter_correction(pulled)), fan_in_fan_out=False)
    )
    got = logits(PeftModel.from_pretrained(corrected, str(pulled)).eval())
    adapter_only = logits(PeftModel.from_pretrained(copy.deepcopy(base), str(pulled)).eval())
    assert not torch.allclose(adapter_only, logits(base), atol=1e-4), "PEFT ignored the pulled adapter"
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(adapter_only, want, atol=1e-4), "the residual should matter for mixed ranks"
    # one adapter carrying global + cumulative residual, loaded on the untouched base, is exact too
    exact = logits(PeftModel.from_pretrained(copy.deepcopy(base), str(pulled / "exact_adapter")).eval())
    torch.testing.assert_close(exact, want, rtol=1e-4, atol=1e-4)

    assert "complete" in stack.cli("rounds", "--federation", "e2e", as_=creds[0]).stdout
