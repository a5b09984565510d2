"""``chorus-mq simulate``: a whole federation through the production code paths, in one process.

Round state and Lua scripts run on an in-process Redis-compatible server (fakeredis with
Lua) unless ``redis_url`` is given, deltas and results go to a ``file://`` store unless
``store_url`` is given, and ingest and aggregation are the Celery tasks, run eagerly.
Clients are registered and sign their uploads, as in production. Every round is checked
against a float64 oracle of the true weighted update.
"""

from __future__ import annotations

import json
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import redis as redis_lib
import torch

from .adapters import LoraSpec, read_residual
from .adapters.header import write_safetensors
from .client import ChorusClient
from .settings import Settings
from .store import open_store
from .workers import runtime

#: a small Llama-like model: (module path, d_out, d_in)
MODULES = [(f"model.layers.{i}.self_attn.{name}", d_out, 256)
           for i in range(4) for name, d_out in (("q_proj", 256), ("k_proj", 128), ("v_proj", 128), ("o_proj", 256))]
RANKS = (8, 4, 16, 8, 12)
LORA_ALPHA = 16


def run_simulation(*, clients: int = 5, rounds: int = 3, strategies=("fedex-lora",), redis_url: str | None = None,
                   store_url: str | None = None, seed: int = 0, echo: Callable[[str], None] | None = print) -> list[dict]:
    """Run the federation(s); returns one row per (strategy, round)."""
    workdir = Path(tempfile.mkdtemp(prefix="chorus-sim-"))
    try:
        redis = _redis(redis_url)
        settings = Settings(redis_url=redis_url or "redis://embedded", store=store_url or f"file://{workdir}/store",
                            eager=True, spool_dir=str(workdir / "spool"))
        rt = runtime.Runtime(settings, redis, open_store(settings.store, settings))
        runtime.install(rt)
        sdk = ChorusClient(settings, redis=redis, store=rt.store)
        rows = []
        if echo:
            echo(_HEADER)
        for strategy in strategies:
            federation = f"sim-{strategy}-{secrets.token_hex(3)}"
            sdk.create_federation(federation, base_model="simulated-llama", quorum=clients, strategy=strategy)
            secrets_ = [sdk.clients(federation).add(f"client-{i}") for i in range(clients)]
            for r in range(1, rounds + 1):
                row = _run_round(sdk, federation, strategy, r, secrets_, seed, workdir)
                rows.append(row)
                if echo:
                    echo(_format(row))
        return rows
    finally:
        runtime.install(None)
        shutil.rmtree(workdir, ignore_errors=True)


def _redis(url: str | None) -> redis_lib.Redis:
    if url:
        return redis_lib.Redis.from_url(url, decode_responses=True)
    import fakeredis
    return fakeredis.FakeRedis(server=fakeredis.FakeServer(), decode_responses=True)


def _run_round(sdk: ChorusClient, federation: str, strategy: str, r: int, secrets_: list[str], seed: int,
               workdir: Path) -> dict:
    n = len(secrets_)
    gen = torch.Generator().manual_seed(seed * 10_007 + r)
    updates, sizes = [], []
    for i in range(n):
        rank = RANKS[i % len(RANKS)]
        factors = {path: (torch.randn(rank, d_in, generator=gen) / d_in**0.5,
                          torch.randn(d_out, rank, generator=gen) / rank**0.5 * (1 + i / n))
                   for path, d_out, d_in in MODULES}
        size = int(torch.randint(100, 1000, (1,), generator=gen))
        directory = workdir / f"{federation}-r{r}-c{i}"
        _write_peft_adapter(directory, factors, rank)
        updates.append((LORA_ALPHA / rank, factors))
        sizes.append(size)
    started = time.perf_counter()
    for i, size in enumerate(sizes):
        sdk.upload(federation, workdir / f"{federation}-r{r}-c{i}", f"client-{i}", dataset_size=size, round_=r,
                   secret=secrets_[i])
    elapsed = time.perf_counter() - started
    out = workdir / f"{federation}-pull-{r}"
    manifest = sdk.pull(federation, out, r)
    exact, adapter = _errors(out, updates, sizes)
    return {"strategy": strategy, "round": r, "clients": len(manifest["clients"]), "exact_error": exact,
            "adapter_error": adapter, "aggregate_s": manifest["aggregation_seconds"], "round_s": elapsed,
            "residual_bytes": manifest["residual_bytes"]}


def _write_peft_adapter(directory: Path, factors: dict, rank: int) -> None:
    """What a client's trainer would save: adapter_config.json + adapter_model.safetensors."""
    directory.mkdir(parents=True)
    spec = LoraSpec(r=rank, lora_alpha=LORA_ALPHA, target_modules=("k_proj", "o_proj", "q_proj", "v_proj"),
                    task_type="CAUSAL_LM", base_model="simulated-llama")
    (directory / "adapter_config.json").write_text(json.dumps(spec.to_peft_config()))
    tensors = {}
    for path, (A, B) in factors.items():
        tensors[f"base_model.model.{path}.lora_A.weight"] = A
        tensors[f"base_model.model.{path}.lora_B.weight"] = B
    write_safetensors(directory / "adapter_model.safetensors", tensors)


def _errors(pulled: Path, updates: list, sizes: list[int]) -> tuple[float, float]:
    """Worst relative Frobenius error over modules: base+adapter+residual, and adapter alone."""
    spec = LoraSpec.from_peft_config(json.loads((pulled / "adapter_config.json").read_text()))
    from safetensors.torch import load_file
    adapter = load_file(pulled / "adapter_model.safetensors")
    residual = read_residual(pulled / "residual.safetensors")
    weights = torch.tensor(sizes, dtype=torch.float64) / sum(sizes)
    worst_exact = worst_adapter = 0.0
    for path, _d_out, _d_in in MODULES:
        module = f"base_model.model.{path}"
        truth = sum(w * s * f[path][1].double() @ f[path][0].double() for w, (s, f) in zip(weights, updates))
        A, B = adapter[f"{module}.lora_A.weight"].double(), adapter[f"{module}.lora_B.weight"].double()
        got = spec.scaling(module, A.shape[0]) * B @ A
        adapter_err = float(torch.linalg.norm(got - truth) / torch.linalg.norm(truth))
        res = residual.get(module)
        if res is not None:
            got = got + (res.double() if not isinstance(res, tuple) else res[0].double() @ res[1].double())
        worst_exact = max(worst_exact, float(torch.linalg.norm(got - truth) / torch.linalg.norm(truth)))
        worst_adapter = max(worst_adapter, adapter_err)
    return worst_exact, worst_adapter


_HEADER = (f"{'strategy':<11} {'round':>5} {'clients':>7} {'exact err':>10} {'adapter err':>11} "
           f"{'aggregate':>9} {'round':>7} {'residual':>9}")


def _format(row: dict) -> str:
    return (f"{row['strategy']:<11} {row['round']:>5} {row['clients']:>7} {row['exact_error']:>10.2e} "
            f"{row['adapter_error']:>11.2e} {row['aggregate_s']:>8.3f}s {row['round_s']:>6.2f}s "
            f"{row['residual_bytes'] / 1024:>7.0f}KB")
