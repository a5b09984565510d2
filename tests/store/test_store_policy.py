"""The client policy document, user names and the MinIO commands (no server needed)."""

from __future__ import annotations

import json
import shlex
import subprocess

import pytest

from chorus_mq.errors import ConfigError
from chorus_mq.store.policy import (
    S3Credentials,
    client_policy,
    iam_user_name,
    minio_commands,
    minio_revoke_commands,
    new_secret_key,
)


def test_policy_allows_exactly_what_a_client_needs():
    doc = client_policy("chorus", "fed-data", "bank", "alice")
    assert doc["Version"] == "2012-10-17"
    grants = {(tuple(s["Action"]), tuple(s["Resource"])) for s in doc["Statement"]}
    assert grants == {
        (
            ("s3:PutObject", "s3:GetObject", "s3:AbortMultipartUpload"),
            ("arn:aws:s3:::chorus/fed-data/bank/deltas/alice/*",),
        ),
        (
            ("s3:GetObject",),
            ("arn:aws:s3:::chorus/fed-data/bank/rounds/*", "arn:aws:s3:::chorus/fed-data/bank/snapshots/*"),
        ),
    }
    assert all(s["Effect"] == "Allow" and "Condition" not in s for s in doc["Statement"])
    text = json.dumps(doc)
    for absent in ("Delete", "List", "s3:*", "accepted", "index", "bob"):
        assert absent not in text


def test_policy_without_a_prefix():
    doc = client_policy("chorus", "", "bank", "alice")
    assert doc["Statement"][0]["Resource"] == ["arn:aws:s3:::chorus/bank/deltas/alice/*"]


@pytest.mark.parametrize(
    ("bucket", "prefix", "federation", "client"),
    [
        ("Bad_Bucket", "", "bank", "alice"),
        ("chorus", "a/*", "bank", "alice"),  # a wildcard in the prefix would widen every grant
        ("chorus", "${aws:username}", "bank", "alice"),
        ("chorus", "../x", "bank", "alice"),
        ("chorus", "", "bank/other", "alice"),
        ("chorus", "", "bank", "*"),
        ("chorus", "", "bank", "alice\n"),
    ],
)
def test_policy_refuses_names_that_could_widen_it(bucket, prefix, federation, client):
    with pytest.raises(ConfigError):
        client_policy(bucket, prefix, federation, client)


def test_user_names_are_deterministic_short_and_unambiguous():
    assert iam_user_name("bank", "alice") == "chorus+bank+alice" == iam_user_name("bank", "alice")
    # Hyphens are legal in names, so the separator is one that is not.
    assert iam_user_name("a-b", "c") != iam_user_name("a", "b-c")
    long_pair = ("f" * 64, "c" * 64)
    name = iam_user_name(*long_pair)
    assert len(name) <= 64 and name == iam_user_name(*long_pair)
    assert name != iam_user_name("f" * 64, "c" * 63 + "d")
    # IAM names are unique regardless of case: mixed case is hashed from the exact pair.
    names = {iam_user_name("bank", c).lower() for c in ("alice", "Alice", "ALICE")}
    assert len(names) == 3
    assert all(len(iam_user_name(f, c)) <= 64 for f in ("x", "y" * 64) for c in ("Z", "z" * 64))
    with pytest.raises(ConfigError):
        iam_user_name("bank", "al ice")


def test_credentials_never_print_the_secret():
    keys = S3Credentials("AKIAEXAMPLE", "very-secret", session_token="tok", user="u")
    assert "very-secret" not in repr(keys) and "tok" not in repr(keys)
    assert keys.env() == {
        "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE",
        "AWS_SECRET_ACCESS_KEY": "very-secret",
        "AWS_SESSION_TOKEN": "tok",
    }


def test_minio_commands_write_the_policy_and_grant_it(tmp_path):
    secret = new_secret_key()
    assert 8 <= len(secret) <= 40
    cmds = minio_commands("chorus", "p", "bank", "alice", secret_key=secret, alias="prod minio")
    assert len(cmds) == 4
    # The first command is a here-document: run it with a real shell and read what it wrote.
    subprocess.run(["bash", "-c", cmds[0]], cwd=tmp_path, check=True)
    written = json.loads((tmp_path / "chorus+bank+alice.json").read_text())
    assert written == client_policy("chorus", "p", "bank", "alice")
    user = "chorus+bank+alice"
    assert shlex.split(cmds[1]) == ["mc", "admin", "user", "add", "prod minio", user, secret]
    assert shlex.split(cmds[2]) == ["mc", "admin", "policy", "create", "prod minio", user, f"{user}.json"]
    assert shlex.split(cmds[3]) == ["mc", "admin", "policy", "attach", "prod minio", user, "--user", user]
    revoke = [shlex.split(c) for c in minio_revoke_commands("bank", "alice", alias="prod minio")]
    assert revoke == [
        ["mc", "admin", "policy", "detach", "prod minio", user, "--user", user],
        ["mc", "admin", "user", "remove", "prod minio", user],
        ["mc", "admin", "policy", "remove", "prod minio", user],
    ]


def test_minio_commands_quote_hostile_secrets(tmp_path):
    cmds = minio_commands("chorus", "", "bank", "alice", secret_key="a'b;$(x)`y`", policy_file=str(tmp_path / "p.json"))
    assert shlex.split(cmds[1])[-1] == "a'b;$(x)`y`"
    for bad in ("short", "x" * 41, " padded-secret "):
        with pytest.raises(ConfigError, match="8 to 40"):
            minio_commands("chorus", "", "bank", "alice", secret_key=bad)


def test_minio_commands_generate_a_secret_when_none_is_given():
    first = shlex.split(minio_commands("chorus", "", "bank", "alice")[1])[-1]
    second = shlex.split(minio_commands("chorus", "", "bank", "alice")[1])[-1]
    assert first != second and 8 <= len(first) <= 40
