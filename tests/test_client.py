"""The SDK's public surface: typed results, clear errors, a client's own credentials."""

from __future__ import annotations

import json

import pytest
import redis as redis_lib

from chorus_mq.client import ChorusClient, RoundSummary, Status, UploadResult
from chorus_mq.errors import AuthError, ChorusError, ConfigError, ServiceUnavailable, Timeout
from chorus_mq.names import RoundStatus
from chorus_mq.settings import Settings
from chorus_mq.state.events import Event

from .deltas import make_federation, random_factors, write_adapter
from .services import free_port

pytestmark = pytest.mark.services


def test_results_are_typed_and_serialisable(sdk, tmp_path):
    make_federation(sdk, "fed", quorum=1)
    res = sdk.upload("fed", write_adapter(tmp_path / "a.safetensors", random_factors(0)), "a")
    assert isinstance(res, UploadResult) and (res.status, res.round, res.n) == ("accepted", 1, 1) and res.bytes > 0
    status = sdk.status("fed")
    assert isinstance(status, Status) and status.state == RoundStatus.OPEN and status.latest_complete == 1
    json.dumps(status.to_dict())
    rounds = sdk.rounds("fed")
    assert [type(r) for r in rounds] == [RoundSummary, RoundSummary]
    assert (rounds[0].state, rounds[0].clients) == (RoundStatus.COMPLETE, ("a",))
    json.dumps([r.to_dict() for r in rounds])
    assert sdk.wait_round("fed", 1, timeout=5).state == RoundStatus.COMPLETE
    events = list(sdk.watch("fed", from_start=True, until_round=1, timeout=5))
    assert all(isinstance(e, Event) for e in events)
    assert events[-1].type == "round_complete" and events[-1].round == 1


def test_no_verdict_says_what_is_known(real_redis, redis_server, tmp_path):
    admin = ChorusClient(Settings(redis_url=redis_server.url, store=f"file://{tmp_path}/store", client_acl="off"))
    make_federation(admin, "fed", quorum=2)
    secret = admin.add_client("fed", "alice").secret
    alice = ChorusClient(admin.settings, secret=secret)  # no worker runs: nobody answers
    with pytest.raises(Timeout) as err:
        alice.upload("fed", write_adapter(tmp_path / "a.safetensors", random_factors(0)), "alice", timeout=1)
    said = str(err.value)
    assert "no verdict yet for upload" in said and "its own inbox" in said and "workers may be down" in said
    assert "check this client's secret" not in said  # no guess: a correct secret is the likely case


def test_an_unreachable_redis_is_one_clear_error_that_says_retrying_is_safe(tmp_path):
    sdk = ChorusClient(
        Settings(redis_url=f"redis://user:hunter2@127.0.0.1:{free_port()}/0", store=f"file://{tmp_path}/store")
    )
    with pytest.raises(ServiceUnavailable, match="retrying the same command is safe") as err:
        sdk.status("fed")
    assert "hunter2" not in str(err.value)


def test_a_clients_url_carries_its_user_and_secret(real_redis, redis_server, tmp_path):
    admin = ChorusClient(Settings(redis_url=redis_server.url, store=f"file://{tmp_path}/store", client_acl="on"))
    make_federation(admin, "fed", quorum=1)
    creds = admin.add_client("fed", "alice")
    assert creds.redis_username == "client:fed:alice" and creds.secret in creds.redis_url.replace("%", "")
    alice = ChorusClient(Settings(redis_url=creds.redis_url, store=f"file://{tmp_path}/store"))
    assert alice.secret == creds.secret  # the URL's password signs its records too
    assert alice.status("fed").quorum == 1
    with pytest.raises(redis_lib.exceptions.NoPermissionError):
        alice.clients("fed").list()  # the registry holds every client's secret: not for clients
    admin.revoke_client("fed", "alice")
    with pytest.raises(ChorusError, match="refused these credentials"):
        ChorusClient(Settings(redis_url=creds.redis_url, store=f"file://{tmp_path}/store")).status("fed")
    real_redis.execute_command("ACL", "DELUSER", "client:fed:alice")


def test_urls_are_redacted_and_only_client_urls_lend_a_secret(tmp_path):
    store = f"file://{tmp_path}/store"
    assert ChorusClient(Settings(redis_url="redis://client%3Afed%3Aa:s%2F1@h/0", store=store)).secret == "s/1"
    assert ChorusClient(Settings(redis_url="redis://worker:pw@h/0", store=store)).secret is None
    port = free_port()
    for url, shown in (
        (f"redis://u:pw@127.0.0.1:{port}/0", f"redis://u:***@127.0.0.1:{port}/0"),
        (f"redis://127.0.0.1:{port}/0", f"redis://127.0.0.1:{port}/0"),
    ):
        with pytest.raises(ServiceUnavailable) as caught:
            ChorusClient(Settings(redis_url=url, store=store)).status("fed")
        assert shown in str(caught.value) and "pw" not in str(caught.value)
    with pytest.raises(redis_lib.ConnectionError):
        redis_lib.Redis(port=free_port(), socket_connect_timeout=0.5).ping()


def test_a_client_learns_of_wrong_credentials_before_any_local_work(real_redis, redis_server, tmp_path):
    admin = ChorusClient(Settings(redis_url=redis_server.url, store=f"file://{tmp_path}/store", client_acl="on"))
    make_federation(admin, "fed", quorum=1)
    make_federation(admin, "other", quorum=1)
    creds = admin.add_client("fed", "alice")
    settings = Settings(redis_url=creds.redis_url, store=f"file://{tmp_path}/store")
    ChorusClient(settings).check_identity("fed", "alice")  # its own URL and secret: fine
    with pytest.raises(ConfigError, match=r"signing secret .* is not the password"):
        ChorusClient(settings, secret="not-" + creds.secret).check_identity("fed", "alice")
    with pytest.raises(ConfigError, match="credentials of client 'alice' of federation 'fed', not of client 'bob'"):
        ChorusClient(settings).check_identity("fed", "bob")
    with pytest.raises(ConfigError, match="not of client 'alice' of federation 'other'"):
        ChorusClient(settings).check_identity("other", "alice")
    # another federation's state: Redis's refusal says whose credentials these are
    with pytest.raises(AuthError, match="belong to client 'alice' of federation 'fed'"):
        ChorusClient(settings).status("other")
    admin.revoke_client("fed", "alice")
    with pytest.raises(AuthError, match="refused these credentials"):
        ChorusClient(settings).check_identity("fed", "alice")
    real_redis.execute_command("ACL", "DELUSER", "client:fed:alice")


def test_client_users_need_database_0_and_nothing_is_registered_otherwise(real_redis, redis_server, tmp_path):
    """A client user may not SELECT: a federation on another database would hand out URLs that cannot connect."""
    admin = ChorusClient(Settings(redis_url=redis_server.url, store=f"file://{tmp_path}/store", client_acl="on"))
    make_federation(admin, "fed", quorum=1)
    elsewhere = ChorusClient(
        Settings(redis_url=redis_server.url.rsplit("/", 1)[0] + "/3", store=f"file://{tmp_path}/s3", client_acl="on")
    )
    make_federation(elsewhere, "fed3", quorum=1)
    with pytest.raises(ConfigError, match="database 0"):
        elsewhere.add_client("fed3", "alice")
    assert elsewhere.clients("fed3").list() == []


@pytest.mark.services
def test_a_simulation_may_fix_the_workers_draw_and_a_federation_otherwise_gets_a_secret_one(sdk):
    from chorus_mq.state import FederationConfig

    from .deltas import declared

    model = declared(random_factors(0), None)
    sdk.create_federation(FederationConfig(name="fixed", base_model="m", quorum=1), model=model, selection_seed="s-0")
    sdk.create_federation(FederationConfig(name="drawn", base_model="m", quorum=1), model=model)
    assert sdk.state.selection_seed("fixed") == "s-0"
    drawn = sdk.state.selection_seed("drawn")
    assert len(drawn) == 32 and drawn != "s-0"  # 16 random bytes, hex
