"""Pure aggregation engine: LoRA client factors in, global factors and exact residual out.

No I/O: tensors only. See docs/CONTRACTS.md ("aggregation") and DESIGN.md section 1.
"""

from chorus_mq.aggregation.lowrank import chain_residuals
from chorus_mq.aggregation.parallel import map_ordered
from chorus_mq.aggregation.residuals import residual_layout, sum_layout, sum_residuals
from chorus_mq.aggregation.shapes import OutputLayout, output_layout
from chorus_mq.aggregation.strategies import aggregate_module
from chorus_mq.aggregation.updates import ClientMeta, ClientUpdate, ModuleResult, weighted_mean
from chorus_mq.aggregation.weights import policy_weights
from chorus_mq.factors import Residual

__all__ = [
    "ClientMeta",
    "ClientUpdate",
    "ModuleResult",
    "OutputLayout",
    "Residual",
    "aggregate_module",
    "chain_residuals",
    "map_ordered",
    "output_layout",
    "policy_weights",
    "residual_layout",
    "sum_layout",
    "sum_residuals",
    "weighted_mean",
]
