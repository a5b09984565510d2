"""``chorus-mq simulate``: whole federations through the production code paths, in one process.

Round state and Lua scripts run on an in-process Redis-compatible server (fakeredis with Lua)
unless ``redis_url`` is given; deltas and results go to a ``file://`` store unless ``store_url``
is given; clients append signed records to the inbox, and the inbox pump, ingest, planning,
shards and commit are the Celery tasks, run eagerly. Every round is checked against a float64
oracle of the true weighted update, with the weights the workers applied (from the manifest).
``simulate --model`` trains real models instead (``chorus_mq.training.simulate``).
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import redis as redis_lib
import torch

from .adapters import LoraSpec, ModelDecl, read_residual, write_peft_adapter
from .client import ChorusClient
from .names import ADAPTER_CONFIG, ADAPTER_WEIGHTS, RESIDUAL_FILE, Strategy
from .settings import Settings
from .state import FederationConfig
from .store import open_store
from .workers import runtime

#: a small Llama-like model: (module path, d_out, d_in)
MODULES = [
    (f"model.layers.{i}.self_attn.{name}", d_out, 256)
    for i in range(4)
    for name, d_out in (("q_proj", 256), ("k_proj", 128), ("v_proj", 128), ("o_proj", 256))
]
RANKS = (8, 4, 16, 8, 12)
LORA_ALPHA = 16
TARGETS = ("k_proj", "o_proj", "q_proj", "v_proj")


def declared_model() -> ModelDecl:
    """What the simulated federation declares: every module's shape."""
    return ModelDecl(
        modules={f"base_model.model.{p}": (d_out, d_in) for p, d_out, d_in in MODULES},
        extras={},
        target_modules=TARGETS,
        task_type="CAUSAL_LM",
    )


def embedded_sdk(
    workdir: Path, *, redis_url: str | None = None, store_url: str | None = None, **settings: Any
) -> ChorusClient:
    """An SDK whose uploads run the real tasks in this process (fakeredis unless ``redis_url``)."""
    redis = _redis(redis_url)
    config = Settings(
        redis_url=redis_url or "redis://embedded",
        store=store_url or f"file://{workdir}/store",
        eager=True,
        spool_dir=str(workdir / "spool"),
        client_acl="off",
        **settings,
    )
    rt = runtime.Runtime(config, redis, open_store(config.store, config))
    runtime.install(rt)
    return ChorusClient(config, redis=redis, store=rt.store)


def run_simulation(
    *,
    clients: int = 5,
    rounds: int = 3,
    strategies: Sequence[str] = ("fedex-lora",),
    redis_url: str | None = None,
    store_url: str | None = None,
    seed: int = 0,
    echo: Callable[[str], None] | None = print,
) -> list[dict[str, Any]]:
    """Run the federation(s); returns one row per (strategy, round)."""
    workdir = Path(tempfile.mkdtemp(prefix="chorus-sim-"))
    try:
        sdk = embedded_sdk(workdir, redis_url=redis_url, store_url=store_url)
        rows = []
        if echo:
            echo(_HEADER)
        for strategy in strategies:
            federation = f"sim-{strategy}-{secrets.token_hex(3)}"
            sdk.create_federation(
                FederationConfig(
                    name=federation, base_model="simulated-llama", quorum=clients, strategy=Strategy(strategy)
                ),
                model=declared_model(),
            )
            keys = [sdk.add_client(federation, f"client-{i}").secret for i in range(clients)]
            for r in range(1, rounds + 1):
                row = _run_round(sdk, federation, strategy, r, keys, seed, workdir)
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
    import hashlib

    import fakeredis

    client = fakeredis.FakeRedis(server=fakeredis.FakeServer(), decode_responses=True)
    # fakeredis lacks Redis's Lua builtin redis.sha1hex, which client sampling uses: give it SHA-1
    # (tests/state/test_selection.py checks the draws agree with a real redis-server)
    client.eval("return 1", 0)  # builds the embedded server's Lua runtime
    server = client.connection_pool.connection_kwargs.get("server")
    runtime = getattr(server, "_lua_runtime", None)
    if runtime is not None:
        runtime.globals()[b"redis"][b"sha1hex"] = lambda s: hashlib.sha1(bytes(s)).hexdigest().encode()
    return client


Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]


def _run_round(
    sdk: ChorusClient, federation: str, strategy: str, r: int, keys: list[str], seed: int, workdir: Path
) -> dict[str, Any]:
    n = len(keys)
    gen = torch.Generator().manual_seed(seed * 10_007 + r)
    updates: dict[str, tuple[float, Factors]] = {}
    sizes = []
    for i in range(n):
        rank = RANKS[i % len(RANKS)]
        factors = {
            f"base_model.model.{path}": (
                torch.randn(rank, d_in, generator=gen) / d_in**0.5,
                torch.randn(d_out, rank, generator=gen) / rank**0.5 * (1 + i / n),
            )
            for path, d_out, d_in in MODULES
        }
        sizes.append(int(torch.randint(100, 1000, (1,), generator=gen)))
        spec = LoraSpec(
            r=rank, lora_alpha=LORA_ALPHA, target_modules=TARGETS, task_type="CAUSAL_LM", base_model="simulated-llama"
        )
        # what a client's trainer saves: adapter_config.json + adapter_model.safetensors
        write_peft_adapter(
            workdir / f"{federation}-r{r}-c{i}", {m: (A, B, LORA_ALPHA / rank) for m, (A, B) in factors.items()}, spec
        )
        updates[f"client-{i}"] = (LORA_ALPHA / rank, factors)
    started = time.perf_counter()
    for i, size in enumerate(sizes):
        sdk.upload(
            federation, workdir / f"{federation}-r{r}-c{i}", f"client-{i}", dataset_size=size, round_=r, secret=keys[i]
        )
    elapsed = time.perf_counter() - started
    out = workdir / f"{federation}-pull"
    manifest = sdk.pull(federation, out, r)
    weights = {c.client_id: c.weight for c in manifest.clients}
    exact, adapter = errors(out, updates, weights)
    return {
        "strategy": strategy,
        "round": r,
        "clients": len(manifest.clients),
        "exact_error": exact,
        "adapter_error": adapter,
        "aggregate_s": manifest.timings.get("quorum_to_commit", 0.0),
        "round_s": elapsed,
        "residual_bytes": manifest.residual_bytes,
    }


def errors(pulled: Path, updates: dict[str, tuple[float, Factors]], weights: dict[str, float]) -> tuple[float, float]:
    """Worst relative Frobenius error over modules: adapter + this round's residual, and the adapter alone,
    against the float64 Σ wᵢ sᵢ Bᵢ Aᵢ with the weights the workers applied."""
    import json

    from safetensors.torch import load_file

    spec = LoraSpec.from_peft_config(json.loads((pulled / ADAPTER_CONFIG).read_text()))
    adapter = load_file(pulled / ADAPTER_WEIGHTS)
    residual = read_residual(pulled / RESIDUAL_FILE)
    worst_exact = worst_adapter = 0.0
    for path, _d_out, _d_in in MODULES:
        module = f"base_model.model.{path}"
        truth = sum(weights[c] * s * f[module][1].double() @ f[module][0].double() for c, (s, f) in updates.items())
        assert isinstance(truth, torch.Tensor)
        A, B = adapter[f"{module}.lora_A.weight"].double(), adapter[f"{module}.lora_B.weight"].double()
        got = spec.scaling(module, A.shape[0]) * B @ A
        norm = torch.linalg.norm(truth)
        worst_adapter = max(worst_adapter, float(torch.linalg.norm(got - truth) / norm))
        res = residual.get(module)
        if res is not None:
            got = got + res.to_dense().double()
        worst_exact = max(worst_exact, float(torch.linalg.norm(got - truth) / norm))
    return worst_exact, worst_adapter


_HEADER = (
    f"{'strategy':<11} {'round':>5} {'clients':>7} {'exact err':>10} {'adapter err':>11} "
    f"{'aggregate':>9} {'round':>7} {'residual':>9}"
)


def _format(row: dict[str, Any]) -> str:
    return (
        f"{row['strategy']:<11} {row['round']:>5} {row['clients']:>7} {row['exact_error']:>10.2e} "
        f"{row['adapter_error']:>11.2e} {row['aggregate_s']:>8.3f}s {row['round_s']:>6.2f}s "
        f"{row['residual_bytes'] / 1024:>7.0f}KB"
    )
