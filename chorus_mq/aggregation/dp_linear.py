"""Server-side DP for the linear strategies (ffa-lora, fed-sb, rolora): the trained factor alone is noised.

Pure math on tensors. A linear strategy publishes a frozen shared frame F (ffa-lora's A, fed-sb's B and A,
rolora's factor frozen this round) and one trained factor X. The frame was published before and is public;
what a round or a flush releases about its clients is X alone, and the model ``s X F`` is post-processing of
it. So the unit the Gaussian mechanism clips is the client's step of the trained factor against the version
it trained from, in the units of the version the release moves (scaling ``s``)::

    ΔX_i = (s_i / s) X_i − (s_b / s) X_{b_i}

clipped over the whole adapter (every module's step together) to Frobenius norm C, ``c_i = min(1, C / ||ΔX_i||)``.
Clipping the product ``s ΔX F`` instead would bound X's sensitivity only when F has orthonormal rows (fed-sb:
both frame factors), which nothing guarantees; clipping X's step bounds it whatever the frame.

The release follows ``aggregation.dp``'s mechanism (add/remove one client, fixed public weights ``q_i`` that
are not renormalised, L2 sensitivity ``C max q``): with ``q_i = 1 / K`` (a synchronous round, quorum K) or
``g(τ_i) / (K k_i)`` (a buffered flush: ``aggregation.buffered.dp_flush_weights``, a client's deltas weigh at
most 1/K together) and the server learning rate η (1 in synchronous rounds)::

    X_{v+1} = X_v + η (Σ_i q_i c_i ΔX_i + Z),   Z ~ N(0, σ²) per element,  σ = z C / K

the frame published as it is, bit for bit, and no residual. An absent client is a zero step. Noise comes
from ``aggregation.dp.gaussian_noise_dense`` under the caller's generator (``aggregation.dp.noise_generator``:
per federation, round and module, so a rerun of a shard releases the same bytes). A task head published with
the adapter is a trained tensor like X: its step joins X's in the client's one clip factor and it is released
the same way (``aggregation.dp.dp_head_release``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from chorus_mq.aggregation.dp import adapter_clip_factor, dp_step_release
from chorus_mq.aggregation.server_opt import PreviousFactors, factor_of
from chorus_mq.aggregation.updates import ModuleResult, check_finite
from chorus_mq.errors import AggregationError
from chorus_mq.names import Factor

_F64 = torch.float64

__all__ = ["adapter_clip_factor", "linear_dp_release", "trained_step"]


def trained_step(upload: Tensor, upload_scaling: float, base: Tensor, base_scaling: float, scaling: float) -> Tensor:
    """``(s_i / s) X_i − (s_b / s) X_b`` in float64: a client's step of the trained factor against its base
    version, in the units of the version the release moves (scaling ``s``)."""
    if upload.shape != base.shape:
        raise AggregationError(
            f"a trained factor of shape {tuple(upload.shape)} against its base version's {tuple(base.shape)}"
        )
    if not (math.isfinite(scaling) and scaling != 0.0):
        raise AggregationError(f"the published scaling must be finite and nonzero, got {scaling!r}")
    step = upload.to(_F64) * (float(upload_scaling) / scaling)
    return step.sub_(base.to(_F64), alpha=float(base_scaling) / scaling)


def linear_dp_release(
    current: PreviousFactors,
    uploads: Sequence[tuple[Tensor, float]],
    bases: Sequence[PreviousFactors],
    weights: Sequence[float],
    *,
    trains: Factor,
    sigma: float,
    generator: torch.Generator,
    lr: float = 1.0,
) -> ModuleResult:
    """One module's release: ``X_v + lr (Σ_i w_i ΔX_i + Z)`` for factor ``trains`` of ``current`` (version v),
    ``uploads`` each client's trained factor and scaling, ``bases`` the version each trained from (its frame must
    be ``current``'s, value for value), ``weights`` ``q_i c_i`` (fixed, clipped, never renormalised), Z drawn from
    ``generator``. The frame and the scaling stay ``current``'s; no residual. One rounding, at the cast."""
    trains = Factor(trains)
    if not (len(uploads) == len(bases) == len(weights)) or not uploads:
        raise AggregationError(f"{len(uploads)} uploads, {len(bases)} bases, {len(weights)} weights: need one each")
    if not (math.isfinite(lr) and lr > 0):
        raise AggregationError(f"the server learning rate must be a finite number > 0, got {lr!r}")
    x_v = factor_of(current, trains)
    if x_v is None:
        raise AggregationError(f"the published version has no {trains} to move")
    s = float(current.scaling)
    steps = []
    for (x, s_i), base in zip(uploads, bases, strict=True):
        if base is not current:
            _check_frame(base, current, trains)
        x_b = factor_of(base, trains)
        if x_b is None:
            raise AggregationError(f"a base version has no {trains}")
        steps.append(trained_step(x, s_i, x_b, base.scaling, s))
    out = dp_step_release(x_v, steps, [float(w) for w in weights], sigma=sigma, generator=generator, lr=lr)
    if trains == Factor.LORA_R:
        result = ModuleResult(current.A, current.B, s, None, R=out)
    elif trains == Factor.LORA_B:
        result = ModuleResult(current.A, out, s, None)
    else:
        result = ModuleResult(out, current.B, s, None)
    return check_finite(result)


def _check_frame(base: PreviousFactors, current: PreviousFactors, trains: Factor) -> None:
    """Every version of a buffered flush shares the frame: a step against another frame is no step of X."""
    for which in (Factor.LORA_A, Factor.LORA_B, Factor.LORA_R):
        if which == trains:
            continue
        mine, theirs = factor_of(base, which), factor_of(current, which)
        if mine is None and theirs is None:
            continue
        if mine is None or theirs is None or mine.shape != theirs.shape or not torch.equal(mine, theirs):
            raise AggregationError(
                f"a base version's {which} differs from the published one: the clients' step is taken on the "
                f"trained factor ({trains}) alone, so every version must share the frozen frame"
            )
