"""Creating a federation (operators): the declared model, and an optional initial adapter as round 0.

The federation knows its model from the start: every module's shape and the task head every
delta must carry are pinned at creation, never by the first upload. With an initial adapter
(the shared LoRA initialisation and task head), round 0 is a complete round whose global
adapter it is, so independent clients start round 1 from identical weights.
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ConfigError, IncompatibleDelta, ObjectExists
from .layout import manifest_key, shard_key
from .manifest import Manifest, ObjectRef, ShardEntry
from .names import SHARD_FORMAT, TaskType
from .state import FederationConfig, RoundState
from .strategy import strategy_spec

if TYPE_CHECKING:
    import torch

    from .adapters import ModelDecl
    from .store import Store


def create(
    state: RoundState,
    store: Store,
    config: FederationConfig,
    *,
    model: ModelDecl,
    initial_adapter: str | Path | None = None,
    selection_seed: str | None = None,
) -> FederationConfig:
    """Create ``config``'s federation in ``state``, its initial adapter (if any) published to ``store`` as round 0
    (see :meth:`chorus_mq.sdk.operator.OperatorSdk.create_federation`)."""
    if not model.modules:
        raise ConfigError(
            "the declared model has no modules: give --base-model DIR (a local model directory) "
            "or --reference-adapter PATH"
        )
    if config.scaffold and initial_adapter is None:
        raise ConfigError(
            "--scaffold needs an initial adapter (round 0): the server variate is measured from the global "
            "adapter every client starts from; create the federation with --task, --labels, --target-modules "
            "and --lora-rank (or --initial-adapter)"
        )
    if strategy_spec(config.strategy).frozen_shared and initial_adapter is None:
        raise ConfigError(
            f"--strategy {config.strategy} needs an initial adapter (round 0): it publishes the shared factors "
            f"every client keeps frozen ({_round0_factors(config)}); give --task (with --lora-rank and "
            "--target-modules) or --initial-adapter"
        )
    if config.personal_heads:
        if not model.extras:
            raise ConfigError(
                "--personal-heads needs a task head to keep local, and the declared model has none "
                "(a seq-cls federation declares it: --task seq-cls --labels ...)"
            )
        if initial_adapter is None:
            raise ConfigError(
                "--personal-heads needs an initial adapter (round 0): its head is where every client's own "
                "head starts, and the global head every round publishes"
            )
    initial = None
    if initial_adapter is not None:
        initial = _publish_initial(store, config, model, Path(initial_adapter))
    state.create_federation(config, model, initial=initial, seed=selection_seed)
    return config


def _round0_factors(config: FederationConfig) -> str:
    if strategy_spec(config.strategy).sandwich:
        return "B and A an orthonormal frame seeded per module, R = 0"
    return "A seeded, B = 0"


def _fed_sb_start(module: str, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """Round 0's R (zeros) for a Fed-SB module, after checking that the initial adapter's B and A are a
    frame: full rank, so every R is a distinct update (a zero B, PEFT's default, would train nothing)."""
    import torch

    a, b = tensors[f"{module}.lora_A.weight"], tensors[f"{module}.lora_B.weight"]
    rank = int(a.shape[0])
    for name, factor in (("lora_A", a), ("lora_B", b)):
        if int(torch.linalg.matrix_rank(factor.to(torch.float64))) < rank:
            raise IncompatibleDelta(
                f"initial adapter module {module!r}: fed-sb freezes its {name} as the frame every R is trained "
                f"in, and this one has rank below {rank} (a zero lora_B, PEFT's default, trains nothing); build "
                "it with --task (an orthonormal frame) or give full-rank factors"
            )
    return torch.zeros(rank, rank, dtype=torch.float32)


#: the size of each part of round 0 of a strategy with frozen shared factors (a later round's shard task reads
#: the parts of its modules)
FRAME_PART_BYTES = 8 * 1024**2


def _publish_initial(store: Store, config: FederationConfig, model: ModelDecl, path: Path) -> tuple[str, str]:
    """Write the initial adapter as round 0's shard (frozen shared factors: parts of about ``FRAME_PART_BYTES``,
    contiguous runs of the sorted items) and its manifest; returns (manifest key, sha256)."""
    import torch

    from .adapters import load_adapter, write_safetensors

    adapter = load_adapter(path)
    spec = adapter.spec
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in adapter.tensors if ".lora_A." in k or ".lora_B." in k})
    extras = sorted(k for k in adapter.tensors if ".lora_A." not in k and ".lora_B." not in k)
    for name in modules:
        if name not in model.modules:
            raise IncompatibleDelta(f"initial adapter module {name!r} is not in the declared model")
    if set(extras) != set(model.extras):
        raise IncompatibleDelta(
            f"initial adapter extras {extras} differ from the declared task head {sorted(model.extras)}"
        )
    items = sorted([*modules, *extras])
    tensors: dict[str, torch.Tensor] = {}
    for item in items:
        keys = [item] if item in model.extras else [f"{item}.{part}.weight" for part in ("lora_A", "lora_B")]
        for key in keys:
            tensors[key] = adapter.tensors[key].to(torch.float32)
    if strategy_spec(config.strategy).sandwich:
        for name in modules:
            tensors[f"{name}.lora_R.weight"] = _fed_sb_start(name, tensors)
    federation = config.name
    ranges = [(0, len(items))]
    if strategy_spec(config.strategy).frozen_shared:
        from .workers.plan import balanced_ranges

        # later rounds refer to the frozen factors here rather than writing them again, and each of their shard
        # tasks reads those of its own modules: in parts, so a task reads (and hashes) a few parts, not all
        sizes = [sum(t.numel() * 4 for k, t in tensors.items() if k == i or k.startswith(f"{i}.lora_")) for i in items]
        ranges = list(balanced_ranges(sizes, math.ceil(sum(sizes) / FRAME_PART_BYTES)))
    shards = []
    with tempfile.TemporaryDirectory() as tmp:
        for k, (start, end) in enumerate(ranges):
            part = items[start:end]
            mine = {key: t for key, t in tensors.items() if key in part or key.rsplit(".lora_", 1)[0] in part}
            local = Path(tmp) / f"shard-{k}.safetensors"
            # each shard in the canonical order every round's shard objects use (all float32: by name)
            sha = write_safetensors(local, mine, {"format": SHARD_FORMAT})
            key = shard_key(federation, 0, k, "adapter", sha)
            try:
                store.put_file(key, local, write_once=True)
            except ObjectExists:
                pass  # content-addressed
            ref = ObjectRef(key, sha, local.stat().st_size)
            shards.append(ShardEntry(k, part[0], part[-1], len(part), ref, None))
    peft = spec.replace(base_model=config.base_model).to_peft_config()
    manifest = Manifest(
        federation=federation,
        round=0,
        epoch=0,
        strategy=str(config.strategy),
        base_model=config.base_model,
        adapter_config=peft,
        clients=(),
        shards=tuple(shards),
        modules=len(modules),
        adapter_bytes=sum(s.adapter.size for s in shards),
    )
    raw = manifest.to_json()
    mkey = manifest_key(federation, 0)
    try:
        store.put_bytes(mkey, raw, write_once=True)
    except ObjectExists:
        existing = store.get_bytes(mkey)
        if existing != raw:
            raise ConfigError(
                f"the store already holds a different round-0 manifest at {mkey} (an earlier "
                f"federation named {federation!r}?); choose another name"
            ) from None
    return mkey, hashlib.sha256(raw).hexdigest()


def canonical_decl(decl: ModelDecl, model_dir: Path, task: TaskType | None) -> ModelDecl:
    """Module names as PEFT names them for ``task``: a BERT checkpoint says ``encoder.layer.0...`` while a
    ``BertForSequenceClassification`` adapter says ``bert.encoder.layer.0...``; add the task model's prefix."""
    if task is None:
        return decl
    try:
        import transformers
    except ImportError:  # pragma: no cover - the train extra brings it
        return decl
    config = json.loads((model_dir / "config.json").read_text())
    auto = (
        transformers.AutoModelForSequenceClassification
        if task == TaskType.SEQ_CLS
        else transformers.AutoModelForCausalLM
    )
    model_config = transformers.AutoConfig.for_model(**config)
    try:
        cls = auto._model_mapping[type(model_config)]
    except KeyError:
        return decl
    prefix = getattr(cls, "base_model_prefix", "")
    base = "base_model.model."
    # a task-model checkpoint (LlamaForCausalLM: model.layers..., lm_head) already has the prefix;
    # only a bare base checkpoint (BertModel: encoder..., embeddings...) lacks it everywhere
    if not prefix or any(m.removeprefix(base).startswith(prefix + ".") for m in decl.modules):
        return decl
    from dataclasses import replace

    renamed = {f"{base}{prefix}.{m.removeprefix(base)}": shape for m, shape in decl.modules.items()}
    return replace(decl, modules=renamed)
