"""A worker that hit an unrecoverable error exits within a bound, so its supervisor starts a new one.

Celery logs ``Unrecoverable error`` and begins a *warm* shutdown when its event loop raises. Seen
here (issue 15's fault schedules): Redis killed under an ingest task, the task's hard time limit
killed the pool child while it was writing its result, the main process read half a message from the
child's pipe (``UnicodeDecodeError`` in ``asynpool._recv_message``), and the warm shutdown then
waited for ever on the dead child: a process alive, consuming nothing, that no restart policy
would replace. The patched ``stop`` arms a timer for that case only: past ``grace_s`` the process
exits with Celery's failure code. Tasks are idempotent and inputs stay pending until their verdict,
so a cut-short shutdown loses nothing.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from celery.platforms import EX_FAILURE
from celery.worker.worker import WorkController

log = logging.getLogger(__name__)
_MARK = "_chorus_bounded_failure_stop"


def install(grace_s: float = 20.0) -> None:
    """Patch ``WorkController.stop`` once per process (idempotent)."""
    if getattr(WorkController, _MARK, False):
        return
    stop = WorkController.stop

    def bounded_stop(self: Any, in_sighandler: bool = False, exitcode: int | None = None) -> None:
        if exitcode == EX_FAILURE:  # an unrecoverable error (or Ctrl-C): never hang on the way out
            timer = threading.Timer(grace_s, _exit_now, args=(grace_s,))
            timer.daemon = True
            timer.start()
        stop(self, in_sighandler=in_sighandler, exitcode=exitcode)

    WorkController.stop = bounded_stop
    setattr(WorkController, _MARK, True)


def _exit_now(grace_s: float) -> None:
    log.critical("the worker did not stop within %.0fs of an unrecoverable error: exiting now", grace_s)
    logging.shutdown()
    os._exit(EX_FAILURE)
