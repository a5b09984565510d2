"""Pure aggregation engine: LoRA client factors in, global factors and exact residual out.

No I/O: tensors only. See docs/CONTRACTS.md ("aggregation") and DESIGN.md section 1.
"""

from chorus_mq.aggregation.lowrank import chain_residuals
from chorus_mq.aggregation.parallel import map_ordered
from chorus_mq.factors import Residual
from chorus_mq.aggregation.strategies import STRATEGIES, aggregate_module
from chorus_mq.aggregation.updates import ClientUpdate, ModuleResult, weighted_mean

__all__ = [
    "STRATEGIES",
    "ClientUpdate",
    "ModuleResult",
    "Residual",
    "aggregate_module",
    "chain_residuals",
    "map_ordered",
    "weighted_mean",
]
