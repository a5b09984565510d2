"""The worker layer in-process: real redis-server, a file:// store, Celery tasks run eagerly."""

from __future__ import annotations

import json

import pytest
import torch

from chorus_mq.adapters import LoraSpec, write_safetensors
from chorus_mq.client import ChorusClient
from chorus_mq.settings import Settings
from chorus_mq.store import open_store
from chorus_mq.workers import runtime


@pytest.fixture
def make_sdk(real_redis, redis_server, tmp_path):
    """``make_sdk(**settings)`` -> a ChorusClient whose uploads run the real tasks in this process."""
    def make(secret: str | None = None, **overrides) -> ChorusClient:
        settings = Settings(redis_url=redis_server.url, store=f"file://{tmp_path}/store", eager=True,
                            spool_dir=str(tmp_path / "spool"), **overrides)
        rt = runtime.Runtime(settings, real_redis, open_store(settings.store, settings))
        runtime.install(rt)
        return ChorusClient(settings, redis=real_redis, store=rt.store, secret=secret)
    yield make
    runtime.install(None)


@pytest.fixture
def sdk(make_sdk):
    return make_sdk()


def write_adapter(path, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], *, alpha: float = 8.0, extras=None):
    """A delta file with an embedded adapter_config; ``factors`` maps module path -> (A, B)."""
    rank = next(iter(factors.values()))[0].shape[0]
    spec = LoraSpec(r=rank, lora_alpha=alpha, target_modules=tuple(sorted({m.rsplit(".", 1)[-1] for m in factors})),
                    modules_to_save=tuple(sorted({k.split(".")[2] for k in (extras or {})})))
    tensors = {}
    for module, (A, B) in factors.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = A
        tensors[f"base_model.model.{module}.lora_B.weight"] = B
    tensors.update(extras or {})
    write_safetensors(path, tensors, {"format": "chorus-delta/1", "adapter_config": json.dumps(spec.to_peft_config())})
    return path


def random_factors(seed: int, modules=("layers.0.q", "layers.0.v"), r=4, d_out=16, d_in=12, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return {m: (torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g) * scale) for m in modules}
