"""The default clip relative to the round's median client (issue 15 finding 3), as pure math.

With the defaults (k = 10, weights capped at half a round) an outlier just under
``--max-update-norm`` claiming a dataset of 1e9 must not make the published update more than
10x the largest honest client's; a round where nobody exceeds k x the median is unchanged.
"""

from __future__ import annotations

import math

import pytest
import torch
from agg_oracle import make_clients, total_delta

from chorus_mq.aggregation import ClientUpdate, aggregate_module, policy_weights
from chorus_mq.aggregation.robust import RELATIVE_CLIP, clip_update, lower_median, relative_clip_factors
from chorus_mq.errors import ConfigError
from chorus_mq.factors import update_norm
from chorus_mq.names import WeightPolicy

torch.set_num_threads(1)
NAN = math.nan


def _norms(round_: list[list[ClientUpdate | None]]) -> torch.Tensor:
    """(M, N) module norms, NaN where a client did not send the module."""
    return torch.tensor(
        [[NAN if u is None else update_norm(u.A, u.B, u.scaling) for u in module] for module in round_],
        dtype=torch.float64,
    )


def _publish(round_, factors, weights, strategy="fedex-lora") -> list[torch.Tensor]:
    """Each module's published update (adapter + residual) after clipping with ``factors``."""
    out = []
    for m, module in enumerate(round_):
        kept = [
            clip_update(ClientUpdate(u.A, u.B, u.scaling, w), float(factors[m, i]))
            for i, (u, w) in enumerate(zip(module, weights, strict=True))
            if u is not None
        ]
        out.append(total_delta(aggregate_module(kept, strategy)))
    return out


def _whole(parts) -> float:
    return math.sqrt(sum(float(p.norm()) ** 2 for p in parts))


def _outlier_round(seed: int = 0):
    """Two modules; 4 honest clients (norms ~2.5) and one rank-1 outlier of norm 9,990 in every module."""
    modules = []
    for m in range(2):
        honest = make_clients(32, 24, [8] * 4, seed=seed + m, alpha=1.0)
        honest = [ClientUpdate(u.A, u.B * (2.5 / update_norm(u.A, u.B, u.scaling)), u.scaling) for u in honest]
        a = torch.zeros(1, 24)
        a[0, m] = 1.0
        b = torch.full((32, 1), 9990.0 / math.sqrt(32) / 16.0)
        modules.append([*honest, ClientUpdate(a, b, 16.0)])
    return modules


def test_lower_median():
    assert lower_median(torch.tensor([3.0, 1.0])) == 1.0  # two clients: the smaller sets the scale
    assert lower_median(torch.tensor([5.0, 1.0, 3.0])) == 3.0
    assert lower_median(torch.tensor([4.0, 1.0, 3.0, 2.0])) == 2.0
    assert math.isnan(lower_median(torch.tensor([])))


@pytest.mark.parametrize("strategy", ["fedex-lora", "fedavg", "svd", "stack"])
def test_an_outlier_with_a_huge_claim_owns_nothing_by_default(strategy):
    round_ = _outlier_round()
    # the claim 1e9 against 1000 each: the cap gives the outlier half the round
    weights = list(
        policy_weights({f"c{i}": 1e9 if i == 4 else 1e3 for i in range(5)}, WeightPolicy.DATASET_SIZE, cap=0.5).values()
    )
    assert weights[4] == pytest.approx(0.5)
    norms = _norms(round_)
    honest_max = max(_whole([torch.tensor(float(norms[m, i])) for m in range(2)]) for i in range(4))
    unclipped = _publish(round_, torch.ones_like(norms), weights, strategy)
    assert _whole(unclipped) > 100 * honest_max  # the issue: the outlier owns the update
    factors = relative_clip_factors(norms, RELATIVE_CLIP)
    assert torch.all(factors[:, :4] == 1.0) and torch.all(factors[:, 4] < 0.01)
    published = _publish(round_, factors, weights, strategy)
    assert _whole(published) <= 10 * honest_max
    for m in range(2):  # and per module, against that module's largest honest update
        assert float(published[m].norm()) <= 10 * float(norms[m, :4].max())


def test_an_honest_round_is_bit_identical_with_and_without_the_rule():
    """Norms spread 8x around the median (dataset sizes, learning rates): nobody is clipped."""
    round_ = []
    for m in range(3):
        clients = make_clients(40, 30, [4, 8, 6, 8, 4], seed=m, rslora=True)
        spread = [1.0, 8.0, 0.2, 3.0, 1.5]
        round_.append([ClientUpdate(u.A, u.B * s, u.scaling, u.weight) for u, s in zip(clients, spread, strict=True)])
    round_[2][3] = None  # a client that did not train a module
    factors = relative_clip_factors(_norms(round_), RELATIVE_CLIP)
    assert torch.equal(factors, torch.ones_like(factors))
    weights = [1.0, 2.0, 3.0, 1.0, 0.5]
    with_rule, without = _publish(round_, factors, weights), _publish(round_, torch.ones_like(factors), weights)
    assert all(torch.equal(x, y) for x, y in zip(with_rule, without, strict=True))


def test_per_module_and_whole_update_caps():
    # module 0: client 4 is 50x its module's median; module 2: client 1 alone trained it, 30x the
    # others' whole updates (no module median to hold it, the whole-update cap does)
    norms = torch.tensor([[1.0, 1.0, 1.0, 1.0, 50.0], [2.0] * 5, [NAN, 30.0, NAN, NAN, NAN]], dtype=torch.float64)
    f = relative_clip_factors(norms, 10.0)
    whole = torch.tensor([math.sqrt(5), math.sqrt(905), math.sqrt(5), math.sqrt(5), math.sqrt(2504)])
    med = math.sqrt(5)  # the lower median of the whole-update norms
    assert f[0, 4] == pytest.approx(10.0 / 50.0) and f[1, 4] == pytest.approx(10 * med / float(whole[4]))
    assert f[1, 1] == f[2, 1] == pytest.approx(10 * med / float(whole[1]))
    assert torch.all(f[:, [0, 2, 3]] == 1.0)
    clipped = torch.where(torch.isnan(norms), torch.zeros_like(norms), norms) * f
    assert torch.all(clipped.square().sum(0).sqrt() <= 10 * med * (1 + 1e-12))
    assert torch.all(clipped[:2] <= 10 * torch.tensor([[1.0], [2.0]], dtype=torch.float64) * (1 + 1e-12))


def test_degenerate_rounds_clip_nothing_they_cannot_measure():
    assert torch.equal(
        relative_clip_factors(torch.tensor([[7.0]], dtype=torch.float64), 10.0), torch.ones(1, 1, dtype=torch.float64)
    )
    zeros = torch.tensor([[0.0, 0.0, 5.0]], dtype=torch.float64)  # a zero median carries no scale
    assert torch.equal(relative_clip_factors(zeros, 10.0), torch.ones_like(zeros))
    two = relative_clip_factors(torch.tensor([[1.0, 100.0]], dtype=torch.float64), 10.0)
    assert two.tolist() == [[1.0, pytest.approx(0.1)]]


@pytest.mark.parametrize("k", [0.5, math.inf, math.nan, -1.0])
def test_bad_k(k):
    with pytest.raises(ConfigError, match="relative clip"):
        relative_clip_factors(torch.ones(1, 2, dtype=torch.float64), k)
