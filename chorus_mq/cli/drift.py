"""How ``status`` and ``rounds`` print drift: per client its declared label counts (compact), its cosine to
the round's aggregate, and its evaluation of the global model it started from. Torch-free."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..client import RoundSummary

#: a histogram with more labels shows its largest ones and a count of the rest
_TOP_LABELS = 4


def compact_counts(counts: Mapping[str, int], order: Sequence[str] = ()) -> str:
    """``"1000: neg 82% pos 18%"``: the total and each label's share (the largest few when there are many),
    in the federation's label order where it has one."""
    total = sum(counts.values())
    if total <= 0:
        return "0 examples"
    if len(counts) <= _TOP_LABELS:
        rank = {name: i for i, name in enumerate(order)}
        items = sorted(counts.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0]))
        more = ""
    else:
        items = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:_TOP_LABELS]
        more = f" +{len(counts) - _TOP_LABELS} more"
    return f"{total}: " + " ".join(f"{name} {100 * n / total:.0f}%" for name, n in items) + more


def _eval(report: Mapping[str, Any] | None) -> str:
    if not report:
        return "-"
    accuracy = report.get("accuracy")
    acc = "" if accuracy is None else f" acc {float(accuracy):.3f}"
    return f"round {report['round']}: loss {float(report['loss']):.4f}{acc} ({report['examples']} ex)"


def has_drift(summary: RoundSummary) -> bool:
    """Whether the round has anything to show: a declared histogram, a reported evaluation or a cosine."""
    cosines = summary.cosine or {}
    return bool(summary.label_counts or summary.evals or any(v is not None for v in cosines.values()))


def round_lines(summary: RoundSummary, labels: Sequence[str] = (), indent: str = "") -> list[str]:
    """The round's drift: the clients' mean evaluation, then a line per client."""
    mean = summary.global_eval
    head = f"{indent}round {summary.round} ({summary.state}, {summary.n} deltas)"
    if mean is not None:
        acc = "" if mean.accuracy is None else f", accuracy {mean.accuracy:.4f}"
        head += (
            f": round {mean.round}'s global model as {mean.clients} client(s) evaluated it: loss {mean.loss:.4f}"
            f"{acc} over {mean.examples} examples"
        )
    lines = [head]
    cosines = summary.cosine or {}
    clients = sorted(set(summary.clients) | set(summary.label_counts) | set(summary.evals) | set(cosines))
    width = max((len(c) for c in clients), default=0)
    for client in clients:
        value = cosines.get(client)
        cosine = "-" if value is None else f"{value:+.3f}"
        counts = summary.label_counts.get(client)
        declared = "-" if counts is None else compact_counts(counts, labels)
        report = _eval(summary.evals.get(client))
        several = summary.deltas_per_client.get(client)
        deltas = f"  ({several} deltas: mean cosine, latest declarations)" if several else ""
        lines.append(f"{indent}  {client:<{width}}  cosine {cosine:>6}  labels {declared}  eval {report}{deltas}")
    return lines


def drift_block(summaries: Sequence[RoundSummary], labels: Sequence[str] = ()) -> list[str]:
    """A header, then :func:`round_lines` for each round that has anything to show; empty when none has."""
    shown = [s for s in summaries if has_drift(s)]
    if not shown:
        return []
    lines = ["drift (cosine: the client's update against the round's aggregate, over the whole adapter):"]
    for summary in shown:
        lines.extend(round_lines(summary, labels, indent="  "))
    return lines
