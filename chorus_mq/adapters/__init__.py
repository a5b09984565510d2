"""PEFT LoRA adapters and deltas on local disk <-> per-module factors, validated as untrusted input.

Knows nothing of Redis, S3, Celery or the aggregation layer. Only safetensors is ever read.
"""

from .delta import DELTA_FORMAT, DeltaFile, DeltaSummary, LocalAdapter, ModuleShape, load_adapter, \
    normalise_key, validate_local, write_delta
from .export import RESIDUAL_FORMAT, fold_residuals, read_residual, write_peft_adapter, write_residual, \
    write_exact_adapter, write_residual_adapter
from .header import DEFAULT_MAX_HEADER_BYTES, Header, TensorInfo, read_header, sniff, write_safetensors
from .spec import PEFT_PREFIX, LoraSpec, module_path

__all__ = [
    "DEFAULT_MAX_HEADER_BYTES", "DELTA_FORMAT", "PEFT_PREFIX", "RESIDUAL_FORMAT",
    "DeltaFile", "DeltaSummary", "Header", "LocalAdapter", "LoraSpec", "ModuleShape", "TensorInfo",
    "fold_residuals", "load_adapter", "module_path", "normalise_key", "read_header", "read_residual",
    "sniff", "validate_local", "write_delta", "write_peft_adapter", "write_residual",
    "write_exact_adapter", "write_residual_adapter", "write_safetensors",
]
