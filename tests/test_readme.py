"""The README's Python example, run as written against a real redis-server (tasks run in this process)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from chorus_mq.adapters import LoraSpec, write_peft_adapter

from .deltas import make_federation, random_factors

pytestmark = pytest.mark.services
README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_python_example_runs(make_sdk, redis_server, tmp_path, monkeypatch, capsys):
    block = re.search(r"```python\n(.*?)```", README.read_text(), re.S)
    assert block, "the README has a Python example"
    admin = make_sdk(allow_unsigned=False)
    make_federation(admin, "demo", quorum=1)
    secret = admin.add_client("demo", "hospital-a").secret
    monkeypatch.chdir(tmp_path)
    factors = random_factors(0)
    write_peft_adapter(
        tmp_path / "my-adapter",
        {f"base_model.model.{m}": (A, B, 2.0) for m, (A, B) in factors.items()},
        LoraSpec(r=4, lora_alpha=8, target_modules=("q", "v")),
    )
    for key, value in {
        "CHORUS_REDIS_URL": redis_server.url,
        "CHORUS_STORE": admin.settings.store,
        "CHORUS_EAGER": "true",
        "CHORUS_SPOOL_DIR": str(tmp_path / "spool"),
        "CHORUS_CLIENT_SECRET": secret,
    }.items():
        monkeypatch.setenv(key, value)
    exec(compile(block.group(1), str(README), "exec"), {})
    printed = capsys.readouterr().out.split()
    assert printed[:2] == ["accepted", "1"] and printed[2] == "complete" and printed[3] == "1"
    assert (tmp_path / "global" / "adapter_model.safetensors").is_file()
