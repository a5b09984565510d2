import time
import pytest
from .conftest import size_of, timing, upload, wait_hook, wait_round

@pytest.mark.parametrize("interval", [None, "0.5"])
def test_restore_latency(deployment, delta_file, interval):
    fed = "lat"
    env = timing(3, 4, 5, 300)
    if interval:
        env["CHORUS_FAULT_RESTORE_INTERVAL"] = interval
    deployment.env.update(env, CHORUS_FAULT_AGGREGATE_SLEEP="60")
    doomed = deployment.start_worker(faulty=True)
    sdk = deployment.sdk()
    sdk.create_federation(fed, base_model="tiny", quorum=1)
    upload(sdk, fed, "c0", delta_file(0), size_of(0))
    wait_hook(deployment, fed, 1)
    t0 = time.monotonic()
    deployment.kill(doomed)
    deployment.start_worker(faulty=True)
    wait_round(deployment, fed, 1, timeout=300)
    print("RECOVERY", interval, round(time.monotonic() - t0, 1))
