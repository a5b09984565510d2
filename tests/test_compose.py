"""Static checks of docker-compose.yml and the Dockerfile (no Docker needed)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

# The chorus-mq subcommands the stack runs (checked against the real CLI below).
EXPECTED_SUBCOMMANDS = {"worker": "worker", "beat": "beat"}

CONDITIONS = {
    "redis": "service_healthy",
    "minio": "service_healthy",
    "minio-init": "service_completed_successfully",
}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def _command(service: dict) -> list[str]:
    cmd = service.get("command", [])
    return shlex.split(cmd) if isinstance(cmd, str) else list(cmd)


def test_services_exist(services):
    assert {"redis", "minio", "minio-init", "worker", "beat"} <= set(services)


def test_redis_is_durable_and_never_evicts(services):
    cmd = _command(services["redis"])
    assert cmd[cmd.index("--appendonly") + 1] == "yes"
    assert cmd[cmd.index("--maxmemory-policy") + 1] == "noeviction"
    assert any(v.endswith(":/data") for v in services["redis"]["volumes"])


def test_images_are_pinned(services):
    minio = services["minio"]["image"]
    assert re.fullmatch(r"quay\.io/minio/minio:RELEASE\.\d{4}-\d\d-\d\dT\d\d-\d\d-\d\dZ", minio)
    assert services["minio-init"]["image"] == minio
    redis_tag = services["redis"]["image"].partition(":")[2]
    assert redis_tag and redis_tag != "latest"


def test_depends_on_conditions(services):
    for name, service in services.items():
        for dep, spec in service.get("depends_on", {}).items():
            assert spec["condition"] == CONDITIONS[dep], (name, dep)
    for name in ("worker", "beat"):
        assert set(services[name]["depends_on"]) == {"redis", "minio-init"}
    assert set(services["minio-init"]["depends_on"]) == {"minio"}


def test_healthchecks(services):
    redis_check = services["redis"]["healthcheck"]["test"]
    assert redis_check[1] == "redis-cli" and redis_check[-1] == "ping"
    assert services["minio"]["healthcheck"]["test"][-3:] == ["mc", "ready", "local"]
    worker_check = " ".join(services["worker"]["healthcheck"]["test"])
    assert "inspect ping" in worker_check and "$$HOSTNAME" in worker_check


def test_worker_is_scalable(services):
    worker = services["worker"]
    assert "container_name" not in worker and "ports" not in worker
    assert services["beat"].get("deploy", {}).get("replicas", 1) == 1


def test_chorus_env_agrees_and_names_services(services):
    env = services["worker"]["environment"]
    assert env == services["beat"]["environment"]
    hosts = set(services)
    assert re.fullmatch(r"redis://[\w-]+:[^@]+@([\w-]+):6379/\d+", env["CHORUS_REDIS_URL"])[1] in hosts
    assert re.fullmatch(r"http://([\w-]+):9000", env["CHORUS_S3_ENDPOINT_URL"])[1] == "minio"
    minio_env = services["minio"]["environment"]
    assert env["AWS_ACCESS_KEY_ID"] == minio_env["MINIO_ROOT_USER"]
    assert env["AWS_SECRET_ACCESS_KEY"] == minio_env["MINIO_ROOT_PASSWORD"]


def test_minio_init_creates_the_store_bucket(services):
    bucket = services["worker"]["environment"]["CHORUS_STORE"].removeprefix("s3://").split("/")[0]
    script = " ".join(_command(services["minio-init"]))
    assert re.search(rf"mc mb --ignore-existing local/{re.escape(bucket)}(\s|$)", script)
    assert "mc alias set local http://minio:9000" in script


def test_services_run_chorus_subcommands(services):
    from chorus_mq.cli import main
    for name, sub in EXPECTED_SUBCOMMANDS.items():
        assert _command(services[name])[0] == sub  # ENTRYPOINT supplies "chorus-mq"
        assert sub in main.commands, f"docker-compose runs `chorus-mq {sub}`, which the CLI lacks"


def _dockerfile() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    return [tuple(ln.split(None, 1)) for ln in lines]


def test_dockerfile():
    instructions = _dockerfile()
    assert instructions[0] == ("FROM", "python:3.11-slim")
    entrypoints = [arg for op, arg in instructions if op == "ENTRYPOINT"]
    assert json.loads(entrypoints[-1]) == ["chorus-mq"]
    runs = [arg for op, arg in instructions if op == "RUN"]
    torch_at = next(i for i, r in enumerate(runs) if "torch==" in r)
    peft_at = next(i for i, r in enumerate(runs) if ".[peft]" in r)
    assert torch_at < peft_at  # the pinned torch wheel must win over a resolver's pick
    assert ("ARG", 'PIP_EXTRA_INDEX_URL=""') in instructions
    users = [arg for op, arg in instructions if op == "USER"]
    assert users and users[-1] not in ("root", "0")
    # No registry host is baked in; the CPU wheel index is a build argument.
    assert not re.search(r"https?://", (ROOT / "Dockerfile").read_text())


def test_redis_runs_with_the_tested_acl_file(services):
    redis = services["redis"]
    command = _command(redis)
    acl = command[command.index("--aclfile") + 1]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in redis["volumes"] if v.startswith("./")}
    assert (ROOT / mounts[acl]).resolve() == (ROOT / "deploy" / "redis" / "users.acl").resolve()
    users = {line.split()[1]: line for line in (ROOT / "deploy/redis/users.acl").read_text().splitlines()}
    assert users["default"].split()[2] == "off"
    url = services["worker"]["environment"]["CHORUS_REDIS_URL"]
    user, password = url.removeprefix("redis://").split("@")[0].split(":")
    assert f">{password}" in users[user]
    health = " ".join(redis["healthcheck"]["test"])
    assert "--user health" in health and "health-dev-password" in users["health"]
    assert "CHORUS_ALLOW_UNSIGNED" not in services["worker"]["environment"]  # signatures required
