"""``chorus-mq simulate``: whole federations through the production code paths, in one process.

Round state and Lua scripts run on an in-process Redis-compatible server (fakeredis with Lua)
unless ``redis_url`` is given; deltas and results go to a ``file://`` store unless ``store_url``
is given; clients append signed records to the inbox, and the inbox pump, ingest, planning,
shards and commit are the Celery tasks, run eagerly. Every round is checked against a float64
oracle of the true weighted update, with the weights the workers applied (from the manifest).
``simulate --model`` trains real models instead (``chorus_mq.training.simulate_model``).
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .adapters import LoraSpec, ModelDecl, read_residual, write_peft_adapter
from .client import ChorusClient
from .names import ADAPTER_CONFIG, ADAPTER_WEIGHTS, RESIDUAL_FILE, ServerOptimizer, Strategy
from .state import FederationConfig
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
    return ChorusClient.embedded(workdir, redis_url=redis_url, store_url=store_url, **settings)


def run_simulation(
    *,
    clients: int = 5,
    rounds: int = 3,
    strategies: Sequence[str] = ("fedex-lora",),
    redis_url: str | None = None,
    store_url: str | None = None,
    seed: int = 0,
    server_opt: str = "none",
    server_lr: float | None = None,
    echo: Callable[[str], None] | None = print,
) -> list[dict[str, Any]]:
    """Run the federation(s); returns one row per (strategy, round). With ``server_opt`` every federation
    steps its exact aggregate with that server optimiser, and the oracle is that step (in float64)."""
    configs = {
        strategy: FederationConfig(
            name=f"sim-{strategy}-{secrets.token_hex(3)}",
            base_model="simulated-llama",
            quorum=clients,
            strategy=Strategy(strategy),
            server_opt=ServerOptimizer(server_opt),
            server_lr=server_lr,
        )
        for strategy in strategies
    }  # bad options are refused before anything runs
    workdir = Path(tempfile.mkdtemp(prefix="chorus-sim-"))
    try:
        sdk = embedded_sdk(workdir, redis_url=redis_url, store_url=store_url)
        rows = []
        if echo:
            echo(_HEADER)
        for strategy, config in configs.items():
            federation = config.name
            sdk.create_federation(config, model=declared_model())
            keys = [sdk.add_client(federation, f"client-{i}").secret for i in range(clients)]
            oracle = _Oracle(config)
            for r in range(1, rounds + 1):
                row = _run_round(sdk, federation, strategy, r, keys, seed, workdir, oracle)
                rows.append(row)
                if echo:
                    echo(_format(row))
        return rows
    finally:
        runtime.install(None)
        shutil.rmtree(workdir, ignore_errors=True)


Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]


class _Oracle:
    """What adapter + residual of a round must be, on the base its clients trained from: Σ wᵢ sᵢ Bᵢ Aᵢ, or
    under a server optimiser the previous adapter plus the step on (that sum − the previous adapter),
    in float64 with the oracle's own state."""

    def __init__(self, config: FederationConfig):
        from .aggregation.server_opt import ServerOptConfig

        self.cfg = ServerOptConfig(config.server_opt, lr=config.server_step_size)
        self.state: dict[str, Any] = {}

    def target(self, module: str, exact: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
        if not self.cfg.enabled:
            return exact
        from .aggregation.server_opt import step

        old = previous if previous is not None else torch.zeros_like(exact)
        change, self.state[module] = step(exact - old, self.state.get(module), self.cfg)
        return old + change


def _run_round(
    sdk: ChorusClient,
    federation: str,
    strategy: str,
    r: int,
    keys: list[str],
    seed: int,
    workdir: Path,
    oracle: _Oracle,
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
    previous = _products(out) if (out / ADAPTER_CONFIG).is_file() else {}  # the global round r started from
    manifest = sdk.pull(federation, out, r)
    weights = {c.client_id: c.weight for c in manifest.clients}
    exact, adapter = errors(
        out, updates, weights, target=lambda module, truth: oracle.target(module, truth, previous.get(module))
    )
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


def errors(
    pulled: Path,
    updates: dict[str, tuple[float, Factors]],
    weights: dict[str, float],
    *,
    target: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
) -> tuple[float, float]:
    """Worst relative Frobenius error over modules: adapter + this round's residual, and the adapter alone,
    against the float64 Σ wᵢ sᵢ Bᵢ Aᵢ with the weights the workers applied (or what ``target`` makes of it:
    a server optimiser's step)."""
    adapter = _products(pulled)
    residual = read_residual(pulled / RESIDUAL_FILE)
    worst_exact = worst_adapter = 0.0
    for path, _d_out, _d_in in MODULES:
        module = f"base_model.model.{path}"
        truth = sum(weights[c] * s * f[module][1].double() @ f[module][0].double() for c, (s, f) in updates.items())
        assert isinstance(truth, torch.Tensor)
        if target is not None:
            truth = target(module, truth)
        got = adapter[module]
        norm = torch.linalg.norm(truth)
        worst_adapter = max(worst_adapter, float(torch.linalg.norm(got - truth) / norm))
        res = residual.get(module)
        if res is not None:
            got = got + res.to_dense().double()
        worst_exact = max(worst_exact, float(torch.linalg.norm(got - truth) / norm))
    return worst_exact, worst_adapter


def _products(pulled: Path) -> dict[str, torch.Tensor]:
    """``scaling · B @ A`` in float64 per module of a pulled adapter."""
    import json

    from safetensors.torch import load_file

    spec = LoraSpec.from_peft_config(json.loads((pulled / ADAPTER_CONFIG).read_text()))
    tensors = load_file(pulled / ADAPTER_WEIGHTS)
    out = {}
    for key, A in tensors.items():
        if key.endswith(".lora_A.weight"):
            module = key.removesuffix(".lora_A.weight")
            B = tensors[f"{module}.lora_B.weight"].double()
            out[module] = spec.scaling(module, A.shape[0]) * B @ A.double()
    return out


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
