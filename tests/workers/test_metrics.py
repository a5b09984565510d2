"""``chorus-mq worker --metrics-port``: Prometheus metrics from the prefork pool, scraped for real."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from chorus_mq.client import ChorusClient
from chorus_mq.settings import Settings

from ..deltas import make_federation, random_factors, write_adapter
from ..services import free_port

pytestmark = [pytest.mark.services, pytest.mark.e2e]
ROOT = Path(__file__).resolve().parents[2]


def _sample(text: str, name: str, **labels: str) -> float:
    """The value of the sample ``name{labels}`` in a scrape (0 when absent)."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()) and head.split("{")[0] == name:
            return float(value)
    return 0.0


def test_a_workers_metrics_count_deltas_rounds_phases_and_queues(redis_server, real_redis, tmp_path):
    port = free_port()
    env = {
        **os.environ,
        "CHORUS_REDIS_URL": redis_server.url,
        "CHORUS_STORE": f"file://{tmp_path}/store",
        "CHORUS_SPOOL_DIR": str(tmp_path / "spool"),
        "CHORUS_CLIENT_ACL": "off",
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    log = open(tmp_path / "worker.log", "w")  # noqa: SIM115 - closed below
    worker = subprocess.Popen(
        [sys.executable, "-m", "chorus_mq.cli", "worker", "-c", "2", "--metrics-port", str(port), "-l", "INFO"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        start_new_session=True,
    )
    try:
        settings = Settings(redis_url=redis_server.url, store=f"file://{tmp_path}/store", client_acl="off")
        admin = ChorusClient(settings)
        make_federation(admin, "fed", quorum=2)
        keys = [admin.add_client("fed", f"c{i}").secret for i in range(2)]
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        for i, key in enumerate(keys):
            path = write_adapter(tmp_path / f"c{i}.safetensors", random_factors(i))
            assert ChorusClient(settings, secret=key).upload("fed", path, f"c{i}", timeout=60).status == "accepted"
        admin.wait_round("fed", 1, timeout=60)
        text = ""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # pool children write their samples as their tasks end
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
            if _sample(text, "chorus_rounds_total", state="complete") >= 1:
                break
            time.sleep(0.3)
        assert _sample(text, "chorus_rounds_total", state="complete") == 1
        assert _sample(text, "chorus_deltas_total", outcome="accepted") == 1
        assert _sample(text, "chorus_deltas_total", outcome="fired") == 1
        assert _sample(text, "chorus_round_seconds_count") == 1
        for phase in ("ingest", "fetch", "math", "write", "commit"):
            assert _sample(text, "chorus_phase_seconds_count", phase=phase) >= 1, phase
        assert _sample(text, "chorus_bytes_in_total", task="shard") > 0
        assert _sample(text, "chorus_bytes_out_total", task="shard") > 0
        assert "chorus_queue_depth" in text and 'queue="chorus.ingest"' in text
        assert "chorus_shards_in_flight" in text
    finally:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(timeout=30)
        log.close()
