"""What ``simulate --model --out DIR`` writes: per-seed rows, their mean ± sd over seeds, the baselines a
federation must beat (chance and the majority class), and a plot of held-out accuracy and loss per round.

The plot is drawn from :func:`summarise`'s rows and the baselines, and :func:`plot_rounds` returns what it
drew, read back from the figure, so a test checks the plotted data rather than pixels.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Protocol

from chorus_mq.names import BEST_ALONE, CENTRALISED

#: the plot's panels: which row field each shows, and its axis label
PANELS = (("accuracy", "held-out accuracy"), ("loss", "held-out loss (cross-entropy)"))
CHANCE, MAJORITY, PRIOR = "chance", "majority class", "label prior"
#: the baselines that are not federations, dashed: centralised training in black, the best client alone in red
_STYLES: dict[str, dict[str, Any]] = {
    CENTRALISED: {"linestyle": "--", "color": "black"},
    BEST_ALONE: {"linestyle": "--", "color": "tab:red", "marker": "s"},
}


class _Row(Protocol):
    """What :func:`summarise` reads of a row (``simulate_model.SimRow``)."""

    @property
    def strategy(self) -> str: ...
    @property
    def round(self) -> int: ...
    @property
    def accuracy(self) -> float: ...
    @property
    def loss(self) -> float: ...
    @property
    def cosine(self) -> float | None: ...
    @property
    def personal_accuracy(self) -> float | None: ...
    @property
    def personal_loss(self) -> float | None: ...


@dataclass(frozen=True)
class Baselines:
    """What a model must beat on one seed's held-out split, from the labels alone."""

    seed: int
    labels: int
    #: uniform guessing: accuracy 1/K, loss ln K
    chance_accuracy: float
    chance_loss: float
    #: always the training data's most common label, scored on the held-out labels
    majority_accuracy: float
    #: the training data's label frequencies (add-one smoothed) as every prediction: its held-out cross-entropy
    prior_loss: float

    @classmethod
    def of(cls, seed: int, labels: int, train: Sequence[int], test: Sequence[int]) -> Baselines:
        counts = Counter(train)
        majority = max(range(labels), key=lambda c: (counts[c], -c))
        prior = [(counts[c] + 1) / (len(train) + labels) for c in range(labels)]
        n = max(1, len(test))
        return cls(
            seed=seed,
            labels=labels,
            chance_accuracy=1.0 / labels,
            chance_loss=math.log(labels),
            majority_accuracy=sum(1 for y in test if y == majority) / n,
            prior_loss=-math.fsum(math.log(prior[y]) for y in test) / n,
        )


@dataclass(frozen=True)
class SummaryRow:
    """One strategy's round over every seed: mean and sample standard deviation (None with one seed)."""

    strategy: str
    round: int
    seeds: int
    accuracy_mean: float
    accuracy_sd: float | None
    loss_mean: float
    loss_sd: float | None
    #: the mean over seeds of the round's mean client cosine to the aggregate (None: not measured)
    cosine_mean: float | None = None
    #: ``--personal-heads``: each client's own model on its own held-out examples (None: not measured)
    personal_accuracy_mean: float | None = None
    personal_accuracy_sd: float | None = None
    personal_loss_mean: float | None = None
    personal_loss_sd: float | None = None


def _sd(values: Sequence[float]) -> float | None:
    return statistics.stdev(values) if len(values) > 1 else None


def summarise(rows: Sequence[_Row]) -> list[SummaryRow]:
    """Rows grouped by (strategy, round) over seeds, in the order they first appear."""
    groups: dict[tuple[str, int], list[_Row]] = {}
    for row in rows:
        groups.setdefault((row.strategy, row.round), []).append(row)
    out = []
    for (strategy, r), mine in groups.items():
        accuracy, loss = [x.accuracy for x in mine], [x.loss for x in mine]
        cosines = [x.cosine for x in mine if x.cosine is not None]
        own_acc = [x.personal_accuracy for x in mine if x.personal_accuracy is not None]
        own_loss = [x.personal_loss for x in mine if x.personal_loss is not None]
        out.append(
            SummaryRow(
                strategy=strategy,
                round=r,
                seeds=len(mine),
                accuracy_mean=statistics.fmean(accuracy),
                accuracy_sd=_sd(accuracy),
                loss_mean=statistics.fmean(loss),
                loss_sd=_sd(loss),
                cosine_mean=statistics.fmean(cosines) if cosines else None,
                personal_accuracy_mean=statistics.fmean(own_acc) if own_acc else None,
                personal_accuracy_sd=_sd(own_acc),
                personal_loss_mean=statistics.fmean(own_loss) if own_loss else None,
                personal_loss_sd=_sd(own_loss),
            )
        )
    return out


def mean_baselines(baselines: Sequence[Baselines]) -> dict[str, float]:
    """The lines the plot draws: each baseline's mean over seeds (the split differs by seed)."""
    return {
        f"{CHANCE} accuracy": statistics.fmean(b.chance_accuracy for b in baselines),
        f"{MAJORITY} accuracy": statistics.fmean(b.majority_accuracy for b in baselines),
        f"{CHANCE} loss": statistics.fmean(b.chance_loss for b in baselines),
        f"{PRIOR} loss": statistics.fmean(b.prior_loss for b in baselines),
    }


@dataclass(frozen=True)
class Series:
    """One drawn series as the figure holds it: x, y, and the half-height of each error bar (None: no bars)."""

    x: tuple[float, ...]
    y: tuple[float, ...]
    err: tuple[float, ...] | None = None


def write_results(
    out: Path, config: Mapping[str, Any], rows: Sequence[Any], baselines: Sequence[Baselines], *, title: str = ""
) -> dict[str, dict[str, Series]]:
    """``results.csv`` (a row per seed, strategy and round), ``summary.csv`` (mean and sd over seeds),
    ``results.json`` (config, rows, summary, baselines) and ``accuracy.png``; returns what was plotted."""
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(rows)
    _write_csv(out / "results.csv", [asdict(r) for r in rows], [f.name for f in fields(rows[0])] if rows else [])
    _write_csv(out / "summary.csv", [asdict(s) for s in summary], [f.name for f in fields(SummaryRow)])
    body = {
        "config": dict(config),
        "rows": [asdict(r) for r in rows],
        "summary": [asdict(s) for s in summary],
        "baselines": [asdict(b) for b in baselines],
    }
    (out / "results.json").write_text(json.dumps(body, indent=2) + "\n")
    return plot_rounds(summary, baselines, out / "accuracy.png", title=title)


def _write_csv(path: Path, rows: list[dict[str, Any]], names: list[str]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=names)
        writer.writeheader()
        writer.writerows(rows)


def plot_rounds(
    summary: Sequence[SummaryRow], baselines: Sequence[Baselines], path: Path, *, title: str = ""
) -> dict[str, dict[str, Series]]:
    """Held-out accuracy and loss per round, a line per strategy (the centralised baseline dashed), error
    bars of ± one sd where there are several seeds, and the chance and majority-class (label prior) lines.
    Returns each panel's series by label, read back from the figure."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.ticker import MaxNLocator

    lines = mean_baselines(baselines) if baselines else {}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, (panel, label) in zip(axes, PANELS, strict=True):
        for strategy in dict.fromkeys(s.strategy for s in summary):
            mine = [s for s in summary if s.strategy == strategy]
            style = _STYLES.get(strategy, {"marker": "o"})
            _series(ax, mine, panel, strategy, style)
            # --personal-heads: each client's own model on its own held-out examples, mean over clients
            own = [s for s in mine if getattr(s, f"personal_{panel}_mean") is not None]
            if own:
                _series(ax, own, f"personal_{panel}", f"{strategy} (own heads)", {"linestyle": ":", "marker": "s"})
        for name, value in lines.items():
            if name.endswith(panel):
                dotted = name.startswith(CHANCE)
                ax.axhline(value, color="grey", linestyle=":" if dotted else "-.", linewidth=1, label=name)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("round")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    seeds = max((s.seeds for s in summary), default=1)
    fig.suptitle(title + (f" (mean ± sd over {seeds} seeds)" if seeds > 1 else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    drawn = {panel: _drawn(ax) for ax, (panel, _label) in zip(axes, PANELS, strict=True)}
    plt.close(fig)
    return drawn


def _series(ax: Any, rows: Sequence[SummaryRow], field: str, label: str, style: Mapping[str, Any]) -> None:
    """One line of means per round, with ± sd bars where every point has one (several seeds)."""
    sds = [getattr(s, f"{field}_sd") for s in rows]
    ax.errorbar(
        [s.round for s in rows],
        [getattr(s, f"{field}_mean") for s in rows],
        yerr=None if any(sd is None for sd in sds) else sds,
        capsize=3,
        label=label,
        **style,
    )


def _drawn(ax: Any) -> dict[str, Series]:
    """Every labelled series of ``ax``: error-bar lines with their bars' half-heights, and plain lines."""
    from matplotlib.container import ErrorbarContainer

    series: dict[str, Series] = {}
    in_containers = set()
    for container in ax.containers:
        if not isinstance(container, ErrorbarContainer):
            continue
        line, _caps, bars = container.lines
        in_containers.add(id(line))
        err = None
        if bars:
            err = tuple(float(abs(seg[1][1] - seg[0][1]) / 2) for seg in bars[0].get_segments())
        series[str(container.get_label())] = Series(_floats(line.get_xdata()), _floats(line.get_ydata()), err)
    for line in ax.get_lines():
        label = line.get_label()
        if id(line) not in in_containers and not label.startswith("_"):
            series[label] = Series(_floats(line.get_xdata()), _floats(line.get_ydata()))
    return series


def _floats(values: Any) -> tuple[float, ...]:
    return tuple(float(v) for v in values)
