"""What a worker or beat checks and sets up before it serves: no shipped development password for a Redis
that is not on this machine (issue 15, finding 11), and the bounded inbox append function loaded."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from chorus_mq.errors import ConfigError
from chorus_mq.settings import Settings
from chorus_mq.state.functions import loaded
from chorus_mq.workers.startup import SHIPPED_PASSWORDS, check_redis_credentials, is_loopback, keep_functions_loaded

from ..e2e.stack import acl_passwords
from ..services import run_cli, wait_for
from ..state.support import url_of

ROOT = Path(__file__).resolve().parents[2]


def test_the_shipped_passwords_are_the_ones_in_users_acl():
    assert set(acl_passwords().values()) == SHIPPED_PASSWORDS


@pytest.mark.parametrize("host", ["127.0.0.1", "127.3.2.1", "localhost", "LOCALHOST", "[::1]"])
def test_shipped_passwords_are_accepted_for_a_redis_on_this_machine(host):
    check_redis_credentials(Settings(redis_url=f"redis://worker:worker-dev-password@{host}:6379/0"))
    assert is_loopback(host)


@pytest.mark.parametrize("host", ["redis", "10.0.0.5", "[2001:db8::1]", "127.0.0.1.example.com", "0.0.0.0"])
@pytest.mark.parametrize("setting", ["redis_url", "broker_url"])
def test_shipped_passwords_are_refused_for_any_other_redis(host, setting):
    for password in sorted(SHIPPED_PASSWORDS):
        settings = Settings(**{setting: f"redis://worker:{password}@{host}:6379/0"})
        with pytest.raises(ConfigError, match=f"CHORUS_{setting.upper()} uses the development password") as err:
            check_redis_credentials(settings)
        assert "deploy/redis/README.md" in str(err.value)
    check_redis_credentials(Settings(**{setting: f"redis://worker:a-real-password@{host}:6379/0"}))


@pytest.mark.parametrize("command", [("worker", "--role", "ingest"), ("beat",)])
def test_worker_and_beat_refuse_to_start_with_a_shipped_password(command, tmp_path):
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "CHORUS_REDIS_URL": "redis://worker:worker-dev-password@redis.invalid:6379/0",
    }
    res = run_cli(command, env, tmp_path, timeout=120, check=False)
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert "CHORUS_REDIS_URL uses the development password 'worker-dev-password'" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.services
def test_a_worker_keeps_the_append_function_loaded(real_redis):
    real_redis.function_flush()
    stop = threading.Event()
    keeper = keep_functions_loaded(Settings(redis_url=url_of(real_redis)), interval_s=0.2, stop=stop)
    try:
        wait_for(lambda: loaded(real_redis), 10, "the library to be loaded")
        real_redis.function_flush()  # e.g. a Redis restarted without its AOF
        wait_for(lambda: loaded(real_redis), 10, "the library to be loaded again")
    finally:
        stop.set()
        keeper.join(5)
    assert not keeper.is_alive()
    source = str(real_redis.function_list(library="chorus", withcode=True))  # the worker's limits, written in
    assert "local MAX_RECORD_BYTES = 16384" in source and "local MAX_RECORDS = 64" in source
