"""The walking skeleton, end to end over real Redis, S3 (moto) and worker processes, driven by the CLI."""

from __future__ import annotations

import copy
import json
import threading

import pytest
import torch

from chorus_mq.adapters import fold_residuals, read_residual

from .tinyllama import client_adapter, exact_model, logits, tiny_llama

pytestmark = pytest.mark.e2e


def test_exact_round_over_cli_worker_and_peft(deployment, tmp_path):
    from peft import PeftModel

    base = tiny_llama()
    ranks, alphas, sizes = (4, 8, 8), (8, 16, 32), (100, 300, 600)
    clients = [client_adapter(base, tmp_path / f"client{i}", rank=r, alpha=a, seed=10 + i)
               for i, (r, a) in enumerate(zip(ranks, alphas))]
    deployment.env["CHORUS_ALLOW_UNSIGNED"] = "false"  # production mode: every client signs
    deployment.start_worker(concurrency=2)
    deployment.cli("federation", "create", "e2e", "--base-model", "tiny-llama", "--quorum", "3")
    secrets = [deployment.cli("client", "add", f"client-{i}", "--federation", "e2e").stdout.strip().splitlines()[-1]
               for i in range(3)]
    watcher = deployment.popen_cli("watch", "--federation", "e2e", "--json", "--until-round", "1", "--timeout", "180")

    # a bad delta first: rejected with a reason, and the round still completes with the good ones
    truncated = tmp_path / "bad.safetensors"
    good = (tmp_path / "client0" / "adapter_model.safetensors").read_bytes()
    truncated.write_bytes(good[: len(good) // 2])
    bad = deployment.cli("upload", "--federation", "e2e", "--adapter", str(truncated), "--client-id", "mallory",
                         check=False)
    assert bad.returncode != 0 and "error:" in bad.stderr and "Traceback" not in bad.stderr

    results = {}

    def upload(i):
        results[i] = deployment.cli("upload", "--federation", "e2e", "--adapter", str(tmp_path / f"client{i}"),
                                    "--client-id", f"client-{i}", "--dataset-size", str(sizes[i]),
                                    "--secret", secrets[i], check=False)

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, res in results.items():
        assert res.returncode == 0, res.stderr
        assert "accepted" in res.stdout or "fired" in res.stdout

    out, err = watcher.communicate(timeout=180)
    assert watcher.returncode == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert events[-1]["type"] == "round_complete" and events[-1]["round"] == 1
    assert sum(e["type"] == "delta_accepted" for e in events) == 3

    status = json.loads(deployment.cli("status", "--federation", "e2e", "--json").stdout)
    assert status["current_round"] == 2 and status["latest_complete"] == 1 and status["state"] == "open"

    pulled = tmp_path / "pulled"
    deployment.cli("pull", "--federation", "e2e", "--output", str(pulled))
    for name in ("adapter_config.json", "adapter_model.safetensors", "residual.safetensors", "manifest.json"):
        assert (pulled / name).is_file(), name
    manifest = json.loads((pulled / "manifest.json").read_text())
    assert [c["client_id"] for c in manifest["clients"]] == ["client-0", "client-1", "client-2"]

    want = logits(exact_model(base, clients, list(sizes)))
    # base + cumulative residual (folded in fp32) + the global adapter through PEFT
    corrected = copy.deepcopy(base)
    corrected.load_state_dict(fold_residuals(corrected.state_dict(), read_residual(pulled / "cumulative_residual.safetensors"),
                                             fan_in_fan_out=False))
    got = logits(PeftModel.from_pretrained(corrected, pulled).eval())
    adapter_only = logits(PeftModel.from_pretrained(copy.deepcopy(base), pulled).eval())
    assert not torch.allclose(adapter_only, logits(base), atol=1e-4), "PEFT ignored the pulled adapter"
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(adapter_only, want, atol=1e-4), "the residual should matter for mixed ranks"
    # one adapter carrying global + cumulative residual, loaded on the untouched base, is exact too
    exact = logits(PeftModel.from_pretrained(copy.deepcopy(base), pulled / "exact_adapter").eval())
    torch.testing.assert_close(exact, want, rtol=1e-4, atol=1e-4)

    rounds = deployment.cli("rounds", "--federation", "e2e")
    assert "complete" in rounds.stdout
