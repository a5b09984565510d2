"""A round's lease, renewed while any of its tasks runs.

The lease is short (``CHORUS_AGGREGATION_LEASE``, 30 s by default) so that a round whose worker
died is re-dispatched by the sweep within about a minute; every running task of the round
renews it every third of that. Renewal is fenced by the epoch: once the sweep has reclaimed
the round, the old run's renewals fail and :attr:`Heartbeat.lost` tells it to stop early.
"""

from __future__ import annotations

import logging
import threading
from types import TracebackType

import redis as redis_lib

from .runtime import Runtime

log = logging.getLogger(__name__)


class Heartbeat:
    """``with Heartbeat(rt, federation, round, epoch):`` renews the round's lease in a thread."""

    def __init__(self, rt: Runtime, federation: str, round_: int, epoch: int):
        self.rt, self.federation, self.round, self.epoch = rt, federation, round_, epoch
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False

    def renew(self) -> bool:
        try:
            ok = self.rt.state.renew(self.federation, self.round, self.epoch)
        except (redis_lib.ConnectionError, redis_lib.TimeoutError) as exc:
            log.warning("lease renewal of %s/%s failed: %s (retrying)", self.federation, self.round, exc)
            return True  # unknown, not lost: the next beat tries again
        if not ok:
            self.lost = True
        return ok

    def _run(self) -> None:
        interval = self.rt.settings.lease_renew_interval
        while not self._stop.wait(interval):
            if not self.renew():
                log.warning(
                    "round %s/%s epoch %s was reclaimed; this run's results will be discarded",
                    self.federation,
                    self.round,
                    self.epoch,
                )
                return

    def __enter__(self) -> Heartbeat:
        self.renew()
        self._thread = threading.Thread(target=self._run, name=f"lease-{self.federation}-{self.round}", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
