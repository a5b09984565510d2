"""Fault 4: S3 fails transiently during the client's upload, the worker's ingest and the aggregation.

Client and worker reach moto through the FaultProxy, which faults chosen requests:
``error`` (503 ServiceUnavailable), ``drop`` (connection closed, no answer), ``stall`` (no
answer until the client's read timeout), ``lost`` (the request reaches S3, the answer never
comes back: a write-once PUT that succeeded looks failed, and its retry meets 412).
boto3's own retries absorb short bursts; longer ones surface as StoreError: the client is
told and retries the upload itself, a worker task retries with backoff. Nothing is
half-registered and the result is the undisturbed one.
"""

from __future__ import annotations

import pytest

from chorus_mq.errors import StoreError
from chorus_mq.settings import Settings

from .conftest import MARKS, federation, size_of, upload, wait_round
from .invariants import assert_exactly_once

pytestmark = MARKS

#: the store tries a request this often on transient errors (CHORUS_S3_MAX_ATTEMPTS)
ATTEMPTS = Settings().s3_max_attempts
#: failures per phase: a burst boto3 absorbs, and an outage longer than its attempts
BURST, OUTAGE = 2, ATTEMPTS + 1


@pytest.mark.parametrize("mode", ["error", "drop", "stall", "lost"])
def test_s3_transient_failures_in_upload_ingest_and_aggregation(deployment, fault_proxy, no_backoff, delta_file, mode):
    fed = f"s3-{mode}"
    # a 1 s read timeout (30 s by default) makes a stalled request a quick timeout, in workers and the SDK alike
    deployment.env.update(
        CHORUS_S3_ENDPOINT_URL=fault_proxy.url, CHORUS_FAULT_NO_S3_BACKOFF="1", CHORUS_S3_READ_TIMEOUT="1"
    )
    outage = BURST if mode == "stall" else OUTAGE  # each stalled attempt costs a timeout: keep them few
    sdk = deployment.sdk()
    federation(sdk, fed, quorum=4)
    deployment.start_worker(faulty=True)
    sizes = {f"c{i}": size_of(i) for i in range(4)}
    accepted = []

    # the client's PUT: a burst is absorbed ...
    fault_proxy.fail_next(BURST, mode=mode, match=r"^PUT .*/deltas/c0/")
    accepted.append(upload(sdk, fed, "c0", delta_file(0), sizes["c0"]))
    assert fault_proxy.injected == BURST
    # ... an outage is the client's to retry, and leaves nothing behind
    if mode != "stall":
        fault_proxy.fail_next(ATTEMPTS, mode=mode, match=r"^PUT .*/deltas/c1/")
        with pytest.raises(StoreError, match=r"(?i)retry"):
            sdk.upload(fed, delta_file(1), "c1", dataset_size=sizes["c1"], timeout=60)
        assert fault_proxy.injected == ATTEMPTS
        assert sdk.status(fed).deltas == 1 and sdk.state.registered_sha(fed, 1, "c1") is None
    accepted.append(upload(sdk, fed, "c1", delta_file(1), sizes["c1"]))

    # the worker's HEAD/GET of the delta during ingest: the task retries
    fault_proxy.fail_next(outage, mode=mode, match=r"^(HEAD|GET) .*/deltas/c2/")
    accepted.append(upload(sdk, fed, "c2", delta_file(2), sizes["c2"]))
    assert fault_proxy.injected == outage

    # everything the round's tasks read and write under its prefix: shard objects, the manifest
    fault_proxy.fail_next(outage, mode=mode, match=r" .*/rounds/")
    accepted.append(upload(sdk, fed, "c3", delta_file(3), sizes["c3"]))
    assert wait_round(deployment, fed, 1) == "complete"
    assert fault_proxy.injected == outage

    fault_proxy.fail_next(0)
    report = assert_exactly_once(deployment, fed, sizes=sizes, accepted=accepted)
    assert report.complete == {1: ["c0", "c1", "c2", "c3"]}
