"""PEFT LoRA adapters and deltas on local disk <-> per-module factors, validated as untrusted input.

Knows nothing of Redis, S3, Celery or the aggregation layer. Only safetensors is ever read.
"""

from .checks import check_delta
from .delta import DeltaFile, DeltaSummary, LocalAdapter, load_adapter, validate_local, write_delta
from .export import write_exact_adapter, write_peft_adapter, write_residual_adapter
from .header import Header, TensorInfo, read_header, strict_json
from .index import (
    DeltaIndex,
    ExtraEntry,
    ModuleEntry,
    TensorSpan,
    build_index,
    extra_from_bytes,
    fetch_ranges,
    module_from_bytes,
    slice_span,
    tensors_from_bytes,
)
from .merge import MergeSource, merge_safetensors
from .model import ModelDecl, model_decl_from_adapter, model_decl_from_dir
from .residual import ResidualReader, fold_into_state_dict, iter_residual, read_residual, write_residual
from .spec import LoraSpec
from .writer import StreamingWriter, layout_key, write_safetensors

__all__ = [
    "DeltaFile",
    "DeltaIndex",
    "DeltaSummary",
    "ExtraEntry",
    "Header",
    "LocalAdapter",
    "LoraSpec",
    "MergeSource",
    "ModelDecl",
    "ModuleEntry",
    "ResidualReader",
    "StreamingWriter",
    "TensorInfo",
    "TensorSpan",
    "build_index",
    "check_delta",
    "extra_from_bytes",
    "fetch_ranges",
    "fold_into_state_dict",
    "iter_residual",
    "layout_key",
    "load_adapter",
    "merge_safetensors",
    "model_decl_from_adapter",
    "model_decl_from_dir",
    "module_from_bytes",
    "read_header",
    "read_residual",
    "slice_span",
    "strict_json",
    "tensors_from_bytes",
    "validate_local",
    "write_delta",
    "write_exact_adapter",
    "write_peft_adapter",
    "write_residual",
    "write_residual_adapter",
    "write_safetensors",
]
