"""The lifecycle rule deploy/minio/ documents for a client's uploads: valid S3, and aimed at uploads only."""

from __future__ import annotations

import json
import re
from pathlib import Path

import boto3
import pytest

from chorus_mq.layout import accepted_key, client_prefix, delta_key, index_key, manifest_key

pytestmark = pytest.mark.services  # moto's S3 as a real HTTP server

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "minio"
SHA = "0" * 64


def test_the_documented_rule_expires_uploads_and_nothing_the_workers_keep(s3_endpoint):
    config = json.loads((DEPLOY / "deltas-lifecycle.json").read_text())
    [rule] = config["Rules"]
    prefix = rule["Filter"]["Prefix"]
    store_prefix, federation = "federations", "fed"  # docker-compose.yml's CHORUS_STORE, the docs' federation
    assert prefix == f"{store_prefix}/{client_prefix(federation, 'alice').rsplit('/', 2)[0]}/"
    assert f"{store_prefix}/{delta_key(federation, 'alice', SHA)}".startswith(prefix)
    for kept in (
        accepted_key(federation, "alice", SHA),
        index_key(federation, "alice", SHA),
        manifest_key(federation, 1),
    ):
        assert not f"{store_prefix}/{kept}".startswith(prefix), kept
    assert rule["Status"] == "Enabled" and rule["Expiration"]["Days"] >= 1

    # S3 accepts it as written
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket="chorus-lifecycle")
    s3.put_bucket_lifecycle_configuration(Bucket="chorus-lifecycle", LifecycleConfiguration=config)
    [stored] = s3.get_bucket_lifecycle_configuration(Bucket="chorus-lifecycle")["Rules"]
    assert stored["Filter"]["Prefix"] == prefix and stored["Expiration"]["Days"] == rule["Expiration"]["Days"]

    # the README's mc command and the JSON name the same prefix and expiry
    text = (DEPLOY / "README.md").read_text()
    command = re.search(r"mc ilm rule add --prefix \"([^\"]+)\" --expire-days (\d+) chorus/chorus", text)
    assert command is not None and (command[1], int(command[2])) == (prefix, rule["Expiration"]["Days"])
