"""``chorus-mq beat``: run the sweep every ``CHORUS_SWEEP_INTERVAL`` seconds, surviving Redis restarts.

A plain loop rather than a scheduler with a lock: the sweep is safe to run twice at once, so
several beats are harmless, and a beat never exits because Redis went away for a while
(celery-redbeat's did, 3 of 3 times); it logs, backs off and carries on.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from types import FrameType

import redis as redis_lib
from kombu.exceptions import OperationalError

from ..settings import Settings
from .app import get_dispatcher
from .runtime import Runtime
from .sweep import sweep

log = logging.getLogger(__name__)

_TRANSIENT = (redis_lib.ConnectionError, redis_lib.TimeoutError, OperationalError, ConnectionError, TimeoutError)


def run_beat(settings: Settings, *, stop: threading.Event | None = None, max_backoff: float = 10.0) -> None:
    """Sweep forever (until ``stop`` is set or SIGTERM/SIGINT)."""
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():

        def _stop(signum: int, frame: FrameType | None) -> None:
            log.info("beat: signal %s, stopping", signum)
            stop.set()

        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
    rt = Runtime.from_settings(settings)
    dispatch = get_dispatcher(settings)
    backoff = 0.5
    log.info("beat: sweeping every %.1fs", settings.sweep_interval)
    while not stop.is_set():
        started = time.monotonic()
        try:
            sweep(rt, dispatch)
            backoff = 0.5
        except _TRANSIENT as exc:
            log.warning("beat: Redis or the broker is unavailable (%s); retrying in %.1fs", exc, backoff)
            stop.wait(backoff)
            backoff = min(backoff * 2, max_backoff)
            continue
        except Exception:
            log.exception("beat: sweep failed; carrying on")
        stop.wait(max(0.0, settings.sweep_interval - (time.monotonic() - started)))
