"""The models a client trains and serves: the federation's initial adapter, and the exact global model.

The exact global model of round r is the base model in float32, with round r's cumulative
residual folded into its weights in float32 (never into a bf16 base: that loses about 11% of
the correction), and round r's global adapter on top through PEFT. Round r+1's clients start
training from exactly that model.
"""

from __future__ import annotations

import json
import math
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chorus_mq.errors import ConfigError, IncompatibleDelta, InvalidAdapter
from chorus_mq.names import ADAPTER_CONFIG, ADAPTER_WEIGHTS, CUMULATIVE_FILE, PEFT_TASK_TYPES, TaskType

# peft 0.21 calls transformers 5's deprecated ``is_gradient_checkpointing``: the warning was the first
# line every user saw from train, export and federation create, and says nothing they can act on
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

if TYPE_CHECKING:
    import torch
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from chorus_mq.sdk.participant import ParticipantSdk

PEFT_PREFIX = "base_model.model."
#: task heads peft keeps as ``modules_to_save`` for sequence classification, by architecture
HEAD_NAMES = ("classifier", "score")
#: weights a checkpoint lacks are initialised from this seed, so every party builds the same base
_BASE_SEED = 0
#: held around every model load. transformers 5 builds a model inside context managers that swap
#: process-wide functions (``PreTrainedModel.tie_weights``, ``torch.nn.init.*``, the default dtype)
#: and restore them on exit; two threads loading at once restore each other's stand-ins, and from
#: then on every model in the process loads untied (GPT-2's ``lm_head`` left uninitialised: losses
#: of 2e23). Clients trained in threads of one process (the SDK, our e2e tests) share this lock.
_LOAD_LOCK = threading.RLock()


def load_tokenizer(model_dir: str | Path) -> PreTrainedTokenizerBase:
    """The model's tokenizer, with a padding token (GPT-2 style tokenizers have none: use EOS)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError(f"the tokenizer in {model_dir} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base(
    model_dir: str | Path, task: TaskType | str, *, num_labels: int | None = None, labels: Sequence[str] | None = None
) -> PreTrainedModel:
    """The base model in float32, eval mode. Weights the checkpoint lacks (a new head) come from a fixed seed."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.utils import logging

    hf_logging: Any = logging

    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if task == TaskType.SEQ_CLS:
        n = num_labels or (len(labels) if labels else None)
        if not n:
            raise ConfigError("a seq-cls model needs the federation's labels (or a head to read their count from)")
        kwargs["num_labels"] = n
        if labels:
            kwargs["id2label"] = dict(enumerate(labels))
            kwargs["label2id"] = {name: i for i, name in enumerate(labels)}
    loader = AutoModelForSequenceClassification if task == TaskType.SEQ_CLS else AutoModelForCausalLM
    with _LOAD_LOCK:  # the verbosity and the RNG are process-wide too: save and restore them under it
        verbosity = hf_logging.get_verbosity()
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()  # a new head is reported as "MISSING": expected, and seeded below
        hf_logging.disable_progress_bar()  # a local checkpoint loads in well under a second: no bar per round
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(_BASE_SEED)
                model: Any = loader.from_pretrained(str(model_dir), **kwargs)
        finally:
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()
    if model.config.pad_token_id is None:  # seq-cls heads on decoder models find the last token by it
        tokenizer_pad = _pad_token_id(model_dir)
        model.config.pad_token_id = tokenizer_pad
    out: PreTrainedModel = model.float().eval()
    return out


def _pad_token_id(model_dir: str | Path) -> int | None:
    tokenizer = load_tokenizer(model_dir)
    return int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else None


def head_names(model: torch.nn.Module) -> tuple[str, ...]:
    """The task head modules of a seq-cls model (what peft saves as ``modules_to_save``)."""
    names = tuple(name for name in HEAD_NAMES if _has_module(model, name))
    if not names:
        raise ConfigError(f"{type(model).__name__} has no task head named {' or '.join(HEAD_NAMES)}")
    return names


def _has_module(model: torch.nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def uses_conv1d(model: torch.nn.Module, target_modules: Sequence[str]) -> bool:
    """Whether the targeted layers are GPT-2 ``Conv1D`` (weights stored ``d_in x d_out``: fan_in_fan_out)."""
    from transformers.pytorch_utils import Conv1D

    wanted = set(target_modules)
    return any(isinstance(m, Conv1D) for n, m in model.named_modules() if n.rpartition(".")[2] in wanted)


def default_target_modules(model: PreTrainedModel) -> tuple[str, ...]:
    """peft's default LoRA targets for this architecture (``query,value`` for BERT, ``c_attn`` for GPT-2)."""
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    targets = DEFAULTS.get(model.config.model_type)
    if not targets:
        raise ConfigError(f"no default LoRA target modules for {model.config.model_type!r}: pass --target-modules")
    return tuple(targets)


def lora_config(
    *,
    task: TaskType | str,
    rank: int,
    alpha: float,
    target_modules: Sequence[str],
    heads: Sequence[str] = (),
    fan_in_fan_out: bool = False,
) -> Any:
    """The LoraConfig every party of a federation uses (dropout off: averaging wants deterministic steps)."""
    from peft import LoraConfig

    if rank < 1:
        raise ConfigError(f"LoRA rank must be positive, got {rank}")
    if not (alpha > 0 and math.isfinite(alpha)):
        raise ConfigError(f"LoRA alpha must be positive, got {alpha}")
    options: dict[str, Any] = {"lora_alpha": int(alpha) if float(alpha).is_integer() else alpha}
    return LoraConfig(
        task_type=PEFT_TASK_TYPES[TaskType(task)],
        r=rank,
        **options,
        target_modules=sorted(set(target_modules)),
        modules_to_save=list(heads) or None,
        lora_dropout=0.0,
        fan_in_fan_out=fan_in_fan_out,
    )


def build_initial_adapter(
    model_dir: str | Path,
    out_dir: str | Path,
    *,
    task: TaskType | str,
    labels: Sequence[str] = (),
    target_modules: Sequence[str] | None = None,
    rank: int = 8,
    alpha: float | None = None,
    seed: int = 0,
    base_model: str | None = None,
    fed_sb: bool = False,
) -> Path:
    """Write the federation's round-0 adapter: PEFT LoRA (B = 0, A seeded) plus, for seq-cls, the task head.

    Two builds with the same arguments are byte-identical, so any party can check the
    federation's initial adapter. ``alpha`` defaults to ``2 * rank``. ``fed_sb``: B and A are instead
    Fed-SB's frozen frame (orthonormal, seeded per module: :func:`chorus_mq.aggregation.sandwich.frame`);
    round 0 pairs it with ``R = 0``.
    """
    import torch
    from peft import get_peft_model

    task = TaskType(task)
    if task == TaskType.SEQ_CLS and len(labels) < 2:
        raise ConfigError(f"a seq-cls federation needs at least two labels, got {list(labels)}")
    base = load_base(model_dir, task, labels=labels or None)
    config, heads = _base_lora_config(base, task, rank, alpha, target_modules)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for head in heads:  # the head is new: every party gets the same one from the seed
            init_head(base.get_submodule(head), std=float(getattr(base.config, "initializer_range", 0.02)))
        model = get_peft_model(base, config)
    out = Path(out_dir)
    model.save_pretrained(str(out), save_embedding_layers=False)
    normalise_adapter_config(out, base_model=base_model or Path(model_dir).name)
    if fed_sb:
        write_fed_sb_frame(out, seed)
    return out


def write_fed_sb_frame(adapter_dir: Path, seed: int) -> None:
    """Replace every module's lora_A / lora_B in a saved adapter by Fed-SB's seeded orthonormal frame."""
    from safetensors.torch import load_file, save_file

    from chorus_mq.aggregation.sandwich import frame

    weights = adapter_dir / ADAPTER_WEIGHTS
    tensors = load_file(str(weights))
    for key in sorted(tensors):
        if key.endswith(".lora_A.weight"):
            module = key.removesuffix(".lora_A.weight")
            a, b = tensors[key], tensors[f"{module}.lora_B.weight"]
            tensors[f"{module}.lora_B.weight"], tensors[key] = frame(
                int(b.shape[0]), int(a.shape[1]), int(a.shape[0]), seed=seed, module=module
            )
    save_file(tensors, str(weights), metadata={"format": "pt"})


def _base_lora_config(
    base: Any, task: TaskType, rank: int, alpha: float | None, target_modules: Sequence[str] | None
) -> tuple[Any, tuple[str, ...]]:
    """The LoRA config for ``base`` (``alpha`` defaults to ``2 * rank``) and its task-head module names."""
    heads = head_names(base) if task == TaskType.SEQ_CLS else ()
    targets = tuple(target_modules) if target_modules else default_target_modules(base)
    config = lora_config(
        task=task,
        rank=rank,
        alpha=alpha or 2.0 * rank,
        target_modules=targets,
        heads=heads,
        fan_in_fan_out=uses_conv1d(base, targets),
    )
    return config, heads


def init_head(head: torch.nn.Module, *, std: float) -> None:
    """Normal(0, std) weights and zero biases for every linear layer of a task head (from the current seed)."""
    import torch

    with torch.no_grad():
        for layer in head.modules():
            if isinstance(layer, torch.nn.Linear):
                layer.weight.normal_(0.0, std)
                if layer.bias is not None:
                    layer.bias.zero_()


def normalise_adapter_config(adapter_dir: Path, *, base_model: str | None = None) -> dict[str, Any]:
    """Rewrite ``adapter_config.json`` deterministically: sorted targets, no duplicate heads, no local path.

    peft writes ``target_modules`` in set order (which changes with the hash seed) and lists
    its default heads again after ours; the same adapter must give the same bytes everywhere.
    """
    path = adapter_dir / ADAPTER_CONFIG
    config: dict[str, Any] = json.loads(path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(set(config["target_modules"]))
    if config.get("modules_to_save"):
        config["modules_to_save"] = list(dict.fromkeys(config["modules_to_save"]))
    config["base_model_name_or_path"] = base_model
    config["inference_mode"] = True
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return config


# -- the exact global model ------------------------------------------------------------------------


def adapter_head_rows(adapter_dir: str | Path) -> int | None:
    """The number of labels the adapter's task head has (None when it carries no head)."""
    from safetensors import safe_open

    with safe_open(str(Path(adapter_dir) / ADAPTER_WEIGHTS), "pt") as handle:
        for key in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
            if any(key == f"{PEFT_PREFIX}{head}.weight" for head in HEAD_NAMES):
                return int(handle.get_slice(key).get_shape()[0])
    return None


def fold_cumulative_residual(model: torch.nn.Module, pulled_dir: str | Path) -> int:
    """Fold a pulled directory's base correction into ``model``'s weights (float32); return modules folded.

    The correction is ``cumulative_residual.safetensors`` plus the later rounds' increments that
    ``pull`` keeps beside it until they outweigh it (``chorus_mq.pulled.iter_correction`` sums them).
    """
    import torch
    from transformers.pytorch_utils import Conv1D

    from chorus_mq.pulled import iter_correction

    if not (Path(pulled_dir) / CUMULATIVE_FILE).exists():
        return 0
    folded = 0
    with torch.no_grad():
        for name, residual in iter_correction(Path(pulled_dir)):
            module = find_module(model, name)
            weight = module.weight
            if weight.dtype != torch.float32:
                raise ConfigError(
                    f"refusing to fold the residual into a {weight.dtype} weight ({name}): load the base in float32"
                )
            weight.copy_(residual.fold_into(weight, fan_in_fan_out=isinstance(module, Conv1D)))
            folded += 1
    return folded


def find_module(model: torch.nn.Module, name: str) -> Any:
    """The module a PEFT module name (``base_model.model.<path>``) refers to in the plain base model."""
    path = name.removeprefix(PEFT_PREFIX)
    try:
        return model.get_submodule(path)
    except AttributeError:
        pass
    # a federation may declare names without the architecture prefix (``encoder...`` for ``bert.encoder...``)
    matches = [m for n, m in model.named_modules() if n.endswith("." + path)]
    if len(matches) != 1:
        raise IncompatibleDelta(
            f"residual module {name!r} is not in the base model "
            f"({'ambiguous' if matches else 'no such module'}): a different base model?"
        )
    return matches[0]


def corrected_base(
    pulled_dir: str | Path | None, model_dir: str | Path, *, task: TaskType | str, labels: Sequence[str] | None = None
) -> PreTrainedModel:
    """The base model (float32) with the pulled cumulative residual folded in; the plain base without ``pulled_dir``."""
    num_labels = adapter_head_rows(pulled_dir) if pulled_dir is not None and task == TaskType.SEQ_CLS else None
    base = load_base(model_dir, task, num_labels=num_labels, labels=labels)
    if pulled_dir is not None:
        fold_cumulative_residual(base, pulled_dir)
    return base


def exact_model(
    pulled_dir: str | Path,
    model_dir: str | Path,
    *,
    task: TaskType | str,
    trainable: bool = False,
    labels: Sequence[str] | None = None,
) -> PeftModel:
    """Base + cumulative residual (float32) + the pulled global adapter: round r's exact global model.

    With ``trainable`` the global adapter's LoRA factors and head are trainable, so a client's
    round r+1 starts exactly from round r's global model.
    """
    from peft import PeftModel

    task = TaskType(task)
    base = corrected_base(pulled_dir, model_dir, task=task, labels=labels)
    with _LOAD_LOCK:
        model = PeftModel.from_pretrained(base, str(pulled_dir), is_trainable=trainable)
    check_adapter_loaded(model, Path(pulled_dir))
    if not trainable:
        model.eval()
    return model


def global_model(
    sdk: ParticipantSdk,
    federation: str,
    model_dir: str | Path,
    round_: int | None = None,
    *,
    workdir: str | Path | None = None,
    trainable: bool = False,
) -> PeftModel:
    """The exact global model of a round of ``federation`` (base + cumulative correction in fp32 + global adapter),
    pulled through ``sdk`` into ``workdir`` (a new temporary directory by default)."""
    import tempfile

    from chorus_mq.sdk.connection import service

    workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="chorus-model-"))
    sdk.pull(federation, workdir, round_)
    with service(sdk.settings):
        task_type = sdk.state.config(federation).task_type
    if task_type is None:
        raise ConfigError(
            f"federation {federation!r} declares no task (seq-cls or causal-lm); it was created "
            "without --task or a task-typed adapter"
        )
    return exact_model(workdir, Path(model_dir), task=task_type, trainable=trainable)


def freeze_factor(model: torch.nn.Module, factor: str) -> int:
    """Stop gradients to every LoRA ``factor`` (``lora_A`` or ``lora_B``) of ``model``; returns how many.

    The optimiser takes only parameters that require grad, so the frozen factor leaves training with
    the very bytes it was loaded with (ffa-lora, rolora: ingest checks them against the published ones).
    """
    marker = f".{factor}."
    frozen = 0
    for name, param in model.named_parameters():
        if marker in name:
            param.requires_grad_(False)
            frozen += 1
    if not frozen:
        raise ConfigError(f"the model has no {factor} parameters to freeze")
    return frozen


def check_adapter_loaded(model: PeftModel, adapter_dir: Path) -> None:
    """Refuse an adapter whose tensors did not all land in the model (peft only warns, and then does nothing)."""
    from peft.utils import get_peft_model_state_dict
    from safetensors import safe_open

    with safe_open(str(adapter_dir / ADAPTER_WEIGHTS), "pt") as handle:
        saved = set(handle.keys())
    loaded = set(get_peft_model_state_dict(model, save_embedding_layers=False))
    missing = sorted(saved - loaded)
    if missing:
        raise InvalidAdapter(
            f"{len(missing)} tensors of {adapter_dir} match nothing in the model "
            f"(first: {missing[0]}): built for a different base model or task?"
        )


# -- a client's starting point at its own rank ------------------------------------------------------


@dataclass(frozen=True)
class StartGap:
    """The part of the global update beyond a client's rank: 0 unless its rank is below the global adapter's."""

    modules: int
    truncated: int  # modules whose global update has more directions than the client's rank
    relative: float  # largest ||G - G_r||_F / ||G||_F over modules (G: the global adapter's s·B·A)
    kept: bool = True  # kept frozen in the client's model and upload (exact), or dropped


@dataclass(frozen=True)
class Start:
    """A client's trainable starting model, and the frozen remainder its upload must carry."""

    model: PeftModel
    gap: StartGap
    #: module -> (left (d_out, k), right (k, d_in)): the global update's directions beyond the client's rank,
    #: folded (fp32) into this client's copy of the base and appended to its upload by ``save_adapter``
    remainder: dict[str, tuple[torch.Tensor, torch.Tensor]]


def start_model(
    pulled_dir: str | Path | None,
    model_dir: str | Path,
    *,
    task: TaskType | str,
    rank: int | None = None,
    alpha: float | None = None,
    labels: Sequence[str] | None = None,
    target_modules: Sequence[str] | None = None,
    seed: int = 0,
    keep_remainder: bool = True,
) -> Start:
    """A client's starting model for the next round: trainable LoRA of rank ``rank``, scaling ``alpha / rank``.

    Without ``rank`` it is :func:`exact_model` (trainable): the global adapter's own rank. With a
    rank at least the global adapter's, the global factors are kept and padded (new A rows from
    peft's init, B columns zero). With a lower rank each module trains the top ``rank``
    directions of the global update; the rest (the remainder) stays frozen: folded into this
    client's base copy and appended to its upload, so the start is the global model and the
    upload is the client's whole model (both exact; the upload has the global rank). With
    ``keep_remainder=False`` the remainder is dropped instead (for ``stack``, whose global rank
    is the sum of the uploads' and would otherwise multiply every round): the client then
    starts from the best rank-``rank`` approximation. Without ``pulled_dir`` (a causal-lm
    federation created without an initial adapter) it is a fresh LoRA on the base, seeded.
    """
    import torch
    from peft import get_peft_model

    task = TaskType(task)
    if pulled_dir is not None and rank is None:
        model = exact_model(pulled_dir, model_dir, task=task, trainable=True, labels=labels)
        return Start(model, StartGap(0, 0, 0.0), {})
    if pulled_dir is None and task == TaskType.SEQ_CLS:
        raise ConfigError(
            "a seq-cls federation needs an initial adapter (round 0) so that every client starts "
            "from the same task head: create it with `federation create --task seq-cls --labels ...`"
        )
    base = corrected_base(pulled_dir, model_dir, task=task, labels=labels)
    global_factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    head_state: dict[str, torch.Tensor] = {}
    if pulled_dir is not None:
        global_factors, head_state, targets = read_adapter(Path(pulled_dir))
        target_modules = target_modules or targets
    config, _ = _base_lora_config(base, task, rank or 8, alpha, target_modules)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = get_peft_model(base, config)
    gap, remainder = _load_start(model, global_factors, head_state, keep_remainder=keep_remainder)
    return Start(model, gap, remainder)


def read_adapter(adapter_dir: Path) -> tuple[dict[str, tuple[Any, Any, float]], dict[str, Any], tuple[str, ...]]:
    """Per module (A, B, scaling) of a saved PEFT adapter, its other tensors (the head), and its target modules."""
    from safetensors.torch import load_file

    from chorus_mq.adapters import LoraSpec

    spec = LoraSpec.from_peft_config(json.loads((adapter_dir / ADAPTER_CONFIG).read_text()))
    tensors = load_file(str(adapter_dir / ADAPTER_WEIGHTS))
    factors: dict[str, tuple[Any, Any, float]] = {}
    head: dict[str, Any] = {}
    for key, tensor in tensors.items():
        if key.endswith(".lora_A.weight"):
            module = key.removesuffix(".lora_A.weight")
            factors[module] = (tensor, tensors[f"{module}.lora_B.weight"], spec.scaling(module, tensor.shape[0]))
        elif not key.endswith(".lora_B.weight"):
            head[key] = tensor
    if isinstance(spec.target_modules, str):  # a regex: name the modules it matched instead
        return factors, head, tuple(sorted(m.removeprefix(PEFT_PREFIX) for m in factors))
    return factors, head, tuple(spec.target_modules)


def _load_start(
    model: PeftModel, factors: dict[str, tuple[Any, Any, float]], head: dict[str, Any], *, keep_remainder: bool
) -> tuple[StartGap, dict[str, tuple[Any, Any]]]:
    """Write each module's starting factors and the global head into ``model``; fold kept remainders into its base."""
    import torch
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from transformers.pytorch_utils import Conv1D

    from chorus_mq.factors import Residual

    current = get_peft_model_state_dict(model, save_embedding_layers=False)
    state = dict(head)
    remainders: dict[str, tuple[Any, Any]] = {}
    truncated, worst = 0, 0.0
    inner: Any = model.base_model.model
    for module, (A, B, scaling) in factors.items():
        fresh = current.get(f"{module}.lora_A.weight")
        if fresh is None:
            raise IncompatibleDelta(f"the global adapter's module {module!r} is not a LoRA module of this model")
        lora = inner.get_submodule(module.removeprefix(PEFT_PREFIX))
        fit = fit_rank(A, B, scaling, fresh, float(lora.scaling["default"]))
        state[f"{module}.lora_A.weight"], state[f"{module}.lora_B.weight"] = fit.A, fit.B
        if fit.lost > 0:
            truncated += 1
            worst = max(worst, fit.lost)
            if keep_remainder and fit.remainder is not None:
                left, right = fit.remainder
                base_layer = lora.get_base_layer()
                with torch.no_grad():
                    folded = Residual(left=left, right=right).fold_into(
                        base_layer.weight, fan_in_fan_out=isinstance(base_layer, Conv1D)
                    )
                    base_layer.weight.copy_(folded)
                remainders[module] = (left, right)
    result = set_peft_model_state_dict(model, state)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise IncompatibleDelta(f"{len(unexpected)} tensors of the global adapter fit nothing (first: {unexpected[0]})")
    return StartGap(len(factors), truncated, worst, kept=keep_remainder), remainders


@dataclass(frozen=True)
class RankFit:
    """Starting factors at a client's rank, the relative size of what did not fit, and that remainder's factors."""

    A: Any
    B: Any
    lost: float
    remainder: tuple[Any, Any] | None = None  # (left, right), scaling 1


def fit_rank(A: torch.Tensor, B: torch.Tensor, scaling: float, fresh_a: torch.Tensor, out_scaling: float) -> RankFit:
    """Factors ``(A', B')`` of rank ``fresh_a.shape[0]`` with ``out_scaling·B'A'`` closest to ``scaling·B·A``.

    Also returns the relative Frobenius size of what does not fit (0 when the rank suffices) and
    its exact factors, so ``out_scaling·B'A' + left @ right == scaling·B·A``. Rows of ``A'`` the
    global update does not need keep their fresh init, with zero ``B'`` columns, so they start
    at zero and still train.
    """
    import torch

    rank, d_in = fresh_a.shape
    r_global = A.shape[0]
    if A.shape[1] != d_in:
        raise IncompatibleDelta(f"global A has {A.shape[1]} columns; the model's module has {d_in}")
    a64, b64 = A.double(), B.double()
    if r_global <= rank or not bool(b64.any()):
        # pad (or, when B = 0, keep the first rows of the shared A): exact
        keep = min(r_global, rank)
        a_out = fresh_a.clone().double()
        b_out = torch.zeros(B.shape[0], rank, dtype=torch.float64)
        a_out[:keep] = a64[:keep]
        b_out[:, :keep] = b64[:, :keep] * (scaling / out_scaling)
        return RankFit(a_out.float(), b_out.float(), 0.0)
    # best rank-`rank` approximation of scaling·B·A through QR of each factor and an SVD of the r x r core
    qb, rb = torch.linalg.qr(b64)
    qa, ra = torch.linalg.qr(a64.T)
    u, s, vh = torch.linalg.svd(scaling * rb @ ra.T)
    root = s[:rank].sqrt()
    b_out = (qb @ u[:, :rank]) * root / out_scaling
    a_out = root[:, None] * (vh[:rank] @ qa.T)
    # directions the update does not have would start dead (A and B zero): give them fresh A rows
    dead = s[:rank] <= s[0] * torch.finfo(torch.float32).eps * max(B.shape[0], d_in)
    a_out[dead] = fresh_a[dead].double()
    b_out[:, dead] = 0.0
    total = float(s.square().sum())
    lost = math.sqrt(float(s[rank:].square().sum()) / total) if total > 0 else 0.0
    tail = s[rank:].sqrt()
    left = (qb @ u[:, rank:]) * tail
    right = tail[:, None] * (vh[rank:] @ qa.T)
    return RankFit(a_out.float(), b_out.float(), lost, (left.float(), right.float()))
