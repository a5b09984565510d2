"""A worker whose warm shutdown after an unrecoverable error hangs exits anyway (workers/crash.py)."""

from __future__ import annotations

import subprocess
import sys
import time

from celery.platforms import EX_FAILURE

# Celery's stop, replaced by one that never returns (the dead pool child it waited on), then patched
_SCRIPT = """
import sys, time
from celery.worker.worker import WorkController
WorkController.stop = lambda self, in_sighandler=False, exitcode=None: time.sleep(60 if exitcode else 0)
from chorus_mq.workers import crash
crash.install(grace_s=0.5)
crash.install(grace_s=0.5)  # idempotent
WorkController.stop(object(), exitcode=int(sys.argv[1]))
print("stopped")
"""


def _stop(exitcode: int) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    res = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(exitcode)], capture_output=True, text=True, timeout=60, check=False
    )
    return res, time.monotonic() - started


def test_a_hung_stop_after_an_unrecoverable_error_exits_within_the_grace():
    res, took = _stop(EX_FAILURE)
    assert res.returncode == EX_FAILURE and "stopped" not in res.stdout, res
    assert took < 20, took  # the grace (0.5 s) plus start-up, far below the 60 s the stop would hang
    assert "did not stop within" in res.stderr


def test_a_clean_stop_is_left_alone():
    res, _ = _stop(0)
    assert res.returncode == 0 and "stopped" in res.stdout, res
