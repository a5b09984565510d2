"""Buffered flushes publish versions in order: a flush is planned only once every flush before it has ended.

Torch-free (the sweep imports it). A flush that fired while the one before it aggregates waits: its round
task renews its lease and is retried with backoff, the commit of the flush before re-sends it at once, and
the sweep keeps its lease alive instead of counting the wait as a dead worker's attempt.
"""

from __future__ import annotations

from ..errors import ServiceUnavailable
from ..names import ENDED_STATES
from .runtime import Runtime


class FlushWaiting(ServiceUnavailable):
    """A flush cannot be planned before the flush of the version it moves has ended (retried with backoff)."""

    code = "flush_waiting"


def unended_before(rt: Runtime, federation: str, r: int) -> int | None:
    """The latest round before ``r`` (after the latest complete one) that has not ended; None: none."""
    latest = rt.state.latest_complete(federation) or 0
    for earlier in range(r - 1, latest, -1):
        if rt.state.round(federation, earlier).state not in ENDED_STATES:
            return earlier
    return None


def wait_for_previous(rt: Runtime, federation: str, r: int, epoch: int) -> None:
    """Return once every round before ``r`` has ended; else renew ``r``'s lease (it is waiting, not dead) and
    raise :class:`FlushWaiting` so the task is retried."""
    earlier = unended_before(rt, federation, r)
    if earlier is not None:
        rt.state.renew(federation, r, epoch)
        raise FlushWaiting(f"flush {r} of {federation!r} waits for flush {earlier} to end")


def waiting_flush(rt: Runtime, federation: str, r: int) -> bool:
    """Whether aggregating round ``r`` is a buffered flush not planned yet because an earlier one has not ended."""
    return (
        rt.state.config(federation).buffered
        and rt.state.plan(federation, r) is None
        and unended_before(rt, federation, r) is not None
    )
