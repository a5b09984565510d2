"""The periodic sweep: close rounds whose deadline passed, re-enqueue aggregations whose lease ran out.

Every step is a Lua transition that checks the state it expects, so two sweeps at once
(two beats, or a beat and a manual run) cannot close or aggregate a round twice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from .runtime import Runtime

log = logging.getLogger(__name__)


def close_due_rounds(rt: Runtime, enqueue_aggregate: Callable[[str, int, int], None],
                     now: float | None = None) -> dict[str, list]:
    report: dict[str, list] = {"fired": [], "extended": [], "expired": [], "reclaimed": [], "failed": []}
    for federation in rt.state.federations():
        due, stale = rt.state.due(federation, now)
        for r in due:
            t = rt.state.close(federation, r, "deadline", now)
            if t.status == "fired":
                enqueue_aggregate(federation, r, t.epoch)
            if t.status in report:
                report[t.status].append((federation, r))
        for r in stale:
            info = rt.state.round(federation, r)
            attempts = rt.settings.max_aggregation_attempts
            if info["state"] == "aggregating" and info.get("reclaims", 0) + 1 >= attempts:
                t = rt.state.fail(federation, r, int(info["epoch"]),
                                  f"aggregation did not finish in {attempts} attempts (workers died or timed out)", now)
                if t.status == "ok":
                    report["failed"].append((federation, r))
                continue
            t = rt.state.reclaim(federation, r, now)
            if t.status == "reclaimed":
                enqueue_aggregate(federation, r, t.epoch)
                report["reclaimed"].append((federation, r))
    if any(report.values()):
        log.info("sweep: %s", report)
    return report
