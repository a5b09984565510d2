"""Least-privilege S3 credentials for federation clients.

A client may put (and read back, and abort its failed multipart uploads of) objects under its own
``<F>/deltas/<client>/`` prefix and read its federation's published results (``rounds/``,
``snapshots/``); nothing else: no delete, no list, no other client's deltas, no other federation.
Every read the client's code makes is an ``s3:GetObject`` (objects are sized with a ranged GET,
see :mod:`.s3`); the workers delete its uploads once judged, and a lifecycle rule on ``<F>/deltas/``
bounds the rest (deploy/minio/README.md). :func:`client_policy` is that rule as an
IAM policy document; :func:`provision_iam_client` applies it through the IAM API (AWS, or any
store with one); :func:`minio_commands` prints what a MinIO operator runs instead (MinIO has
no IAM API, only ``mc admin``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import secrets
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ..errors import ChorusError, ConfigError, StoreError
from ..ids import check_name
from ..layout import client_prefix, rounds_prefix, snapshots_prefix
from .object_keys import check_bucket, check_key

#: the inline policy's name on every client user
POLICY_NAME = "chorus-client"
#: IAM path the client users live under (lets an operator list or bound them)
USER_PATH = "/chorus/"
_USER_PREFIX = "chorus"
# Letters that may not be in a federation or client name, so "chorus+F+C" splits one way only.
_SEP = "+"
_TAG_FEDERATION = "chorus:federation"
_TAG_CLIENT = "chorus:client"
# IAM wildcards and policy variables: a prefix holding one would widen every grant.
_POLICY_SPECIALS = frozenset("*?$")


@dataclass(frozen=True)
class S3Credentials:
    """An S3 access key pair (and the user it belongs to, when known). The secret never prints."""

    access_key_id: str
    secret_access_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)
    user: str | None = None

    def env(self) -> dict[str, str]:
        """The standard AWS environment variables for these keys (what boto3 and ``mc`` read)."""
        out = {"AWS_ACCESS_KEY_ID": self.access_key_id, "AWS_SECRET_ACCESS_KEY": self.secret_access_key}
        if self.session_token:
            out["AWS_SESSION_TOKEN"] = self.session_token
        return out


def client_policy(bucket: str, prefix: str, federation: str, client: str) -> dict[str, Any]:
    """The IAM policy document that lets ``client`` of ``federation`` do only what a client needs.

    ``prefix`` is the store URL's prefix (``s3://bucket/prefix``), ``""`` for none.
    """
    own = _object_arn(bucket, prefix, client_prefix(federation, client))
    results = [_object_arn(bucket, prefix, p) for p in (rounds_prefix(federation), snapshots_prefix(federation))]
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "OwnDeltas",
                "Effect": "Allow",
                # GetObject too: the SDK sizes and re-reads its own uploads; Abort: it cleans up a failed multipart.
                "Action": ["s3:PutObject", "s3:GetObject", "s3:AbortMultipartUpload"],
                "Resource": [own],
            },
            {"Sid": "FederationResults", "Effect": "Allow", "Action": ["s3:GetObject"], "Resource": results},
        ],
    }


def iam_user_name(federation: str, client: str) -> str:
    """The deterministic user name for a client: ``chorus+<F>+<client>``, hashed when long.

    IAM names are at most 64 characters and unique regardless of case, so a long or mixed-case
    pair is shortened and made unique by a digest of the exact pair.
    """
    check_name(federation, "federation name")
    check_name(client, "client id")
    plain = _SEP.join((_USER_PREFIX, federation, client))
    if len(plain) <= 64 and plain == plain.lower():
        return plain
    digest = hashlib.sha256(f"{federation}\n{client}".encode()).hexdigest()[:16]
    return _SEP.join((_USER_PREFIX, federation[:20], client[:18], digest))


def provision_iam_client(iam: Any, bucket: str, prefix: str, federation: str, client: str) -> S3Credentials:
    """Create (or update) the client's IAM user with :func:`client_policy` and return a fresh access key.

    ``iam`` is a boto3 IAM client with the operator's rights. Re-running is safe: the user and its
    policy are brought to the same state and the key is rotated (older keys are deleted).
    """
    document = json.dumps(client_policy(bucket, prefix, federation, client), sort_keys=True)
    user = iam_user_name(federation, client)
    tags = [{"Key": _TAG_FEDERATION, "Value": federation}, {"Key": _TAG_CLIENT, "Value": client}]
    with _iam_errors(f"provisioning S3 user {user}"):
        try:
            iam.create_user(UserName=user, Path=USER_PATH, Tags=tags)
        except iam.exceptions.EntityAlreadyExistsException:
            _check_owner(iam, user, federation, client)
        iam.put_user_policy(UserName=user, PolicyName=POLICY_NAME, PolicyDocument=document)
        # IAM allows two keys per user; the one handed out now is the only valid one after.
        for old in iam.list_access_keys(UserName=user)["AccessKeyMetadata"]:
            iam.delete_access_key(UserName=user, AccessKeyId=old["AccessKeyId"])
        key = iam.create_access_key(UserName=user)["AccessKey"]
    return S3Credentials(key["AccessKeyId"], key["SecretAccessKey"], user=user)


def revoke_iam_client(iam: Any, federation: str, client: str) -> bool:
    """Delete the client's keys, policy and user; False if there was no such user (idempotent)."""
    user = iam_user_name(federation, client)
    with _iam_errors(f"revoking S3 user {user}"):
        try:
            keys = iam.list_access_keys(UserName=user)["AccessKeyMetadata"]
        except iam.exceptions.NoSuchEntityException:
            return False
        _check_owner(iam, user, federation, client)
        for key in keys:
            iam.delete_access_key(UserName=user, AccessKeyId=key["AccessKeyId"])
        with contextlib.suppress(iam.exceptions.NoSuchEntityException):
            iam.delete_user_policy(UserName=user, PolicyName=POLICY_NAME)
        iam.delete_user(UserName=user)
    return True


def new_secret_key() -> str:
    """A random secret key of 40 characters (MinIO's upper bound, well above its minimum of 8)."""
    return secrets.token_urlsafe(30)


def minio_commands(
    bucket: str,
    prefix: str,
    federation: str,
    client: str,
    *,
    secret_key: str | None = None,
    alias: str = "chorus",
    policy_file: str | None = None,
) -> list[str]:
    """Shell commands that give ``client`` its least-privilege MinIO user (run them in order).

    The first writes the policy file; then ``mc admin user add``, ``policy create`` and ``policy
    attach``. The client's access key is :func:`iam_user_name`; ``secret_key`` is what it gets
    with it (default: a fresh :func:`new_secret_key`, which the printed commands then carry).
    """
    if secret_key is None:
        secret_key = new_secret_key()
    if not isinstance(secret_key, str) or not 8 <= len(secret_key) <= 40 or secret_key != secret_key.strip():
        raise ConfigError("the MinIO secret key must be 8 to 40 characters without surrounding spaces")
    document = json.dumps(client_policy(bucket, prefix, federation, client), indent=2, sort_keys=True)
    user = iam_user_name(federation, client)
    path = policy_file or f"{user}.json"
    q = shlex.quote
    return [
        f"cat > {q(path)} <<'CHORUS_POLICY'\n{document}\nCHORUS_POLICY",
        f"mc admin user add {q(alias)} {q(user)} {q(secret_key)}",
        f"mc admin policy create {q(alias)} {q(user)} {q(path)}",
        f"mc admin policy attach {q(alias)} {q(user)} --user {q(user)}",
    ]


def minio_revoke_commands(federation: str, client: str, *, alias: str = "chorus") -> list[str]:
    """The ``mc admin`` commands that take a client's MinIO user and policy away again."""
    user = shlex.quote(iam_user_name(federation, client))
    a = shlex.quote(alias)
    return [
        f"mc admin policy detach {a} {user} --user {user}",
        f"mc admin user remove {a} {user}",
        f"mc admin policy remove {a} {user}",
    ]


# -- helpers ---------------------------------------------------------------------------------
def _object_arn(bucket: str, prefix: str, key_prefix: str) -> str:
    check_bucket(bucket)
    if prefix:
        check_key(prefix)
        if _POLICY_SPECIALS & set(prefix):
            raise ConfigError(f"store prefix {prefix!r} may not contain '*', '?' or '$' (IAM wildcards)")
    return f"arn:aws:s3:::{bucket}/{prefix + '/' if prefix else ''}{key_prefix}*"


def _check_owner(iam: Any, user: str, federation: str, client: str) -> None:
    tags = {t["Key"]: t["Value"] for t in iam.list_user_tags(UserName=user)["Tags"]}
    if (tags.get(_TAG_FEDERATION), tags.get(_TAG_CLIENT)) != (federation, client):
        raise ConfigError(
            f"IAM user {user} exists but is not chorus-mq's user for client {client!r} of federation "
            f"{federation!r} (its tags say {tags}); remove or rename it first"
        )


def _iam_code(exc: Exception) -> str:
    response = getattr(exc, "response", None)
    return str(response.get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""


@contextlib.contextmanager
def _iam_errors(what: str) -> Iterator[None]:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except ChorusError:
        raise
    except ClientError as exc:
        code = _iam_code(exc)
        message = exc.response.get("Error", {}).get("Message") or ""
        if code in ("AccessDenied", "InvalidClientTokenId", "SignatureDoesNotMatch"):
            raise StoreError(
                f"{what} was refused ({code}): the operator's credentials need iam:CreateUser, "
                "iam:ListUserTags, iam:PutUserPolicy, iam:ListAccessKeys, iam:CreateAccessKey, "
                "iam:DeleteAccessKey, iam:DeleteUserPolicy and iam:DeleteUser"
            ) from exc
        raise StoreError(f"{what} failed: {code} {message}".rstrip()) from exc
    except BotoCoreError as exc:
        raise StoreError(f"{what} failed: {exc}; is the IAM endpoint reachable? Retry later") from exc
