"""chorus_mq/create_request.py: a federation-create request resolved to its config and declared model; the
defaults that depend on other options; the refusals of a flag of the other mode; creating from it."""

from __future__ import annotations

from pathlib import Path

import pytest

from chorus_mq.aggregation.dp import noise_for_budget
from chorus_mq.create_request import (
    BufferFlags,
    ConfigFields,
    CreateRequest,
    DpBudget,
    ModelSource,
    create_federation,
    resolve,
)
from chorus_mq.errors import ConfigError
from chorus_mq.names import FederationMode, Strategy, TaskType

from .deltas import declared, random_factors, write_adapter


@pytest.fixture
def model(tmp_path) -> ModelSource:
    """The model declared by a reference adapter (two modules)."""
    return ModelSource("m", reference_adapter=write_adapter(tmp_path / "reference.safetensors", random_factors(0)))


def test_a_sync_request_resolves_to_its_config_and_declared_model(model):
    request = CreateRequest("fed", model, quorum=3, fields=ConfigFields(strategy=Strategy.SVD, round_timeout=60))
    with resolve(request) as resolved:
        config = resolved.config
        assert (config.name, config.base_model, config.quorum, config.mode) == ("fed", "m", 3, FederationMode.SYNC)
        assert (config.strategy, config.round_timeout, config.min_quorum) == (Strategy.SVD, 60, 0)
        assert config.relative_clip == 10.0  # the config's own default in sync mode
        assert resolved.model.modules == declared(random_factors(0)).modules  # the reference adapter's
        assert resolved.initial_adapter is None


def test_a_buffered_request_maps_its_flags_onto_the_round_machine(model):
    flags = BufferFlags(buffer=4, min_buffer=2, flush_timeout=30, max_staleness=3, staleness_weight="constant")
    request = CreateRequest("buf", model, mode=FederationMode.BUFFERED, buffering=flags)
    with resolve(request) as resolved:
        config = resolved.config
        assert (config.quorum, config.min_quorum, config.round_timeout) == (4, 2, 30)
        assert (config.max_staleness, config.staleness_weight, config.max_per_client_per_flush) == (3, "constant", 1)
        assert config.relative_clip == 0.0  # off by default in buffered mode (--relative-clip K turns it on)
    with resolve(CreateRequest("buf", model, mode=FederationMode.BUFFERED, buffering=BufferFlags(buffer=2))) as r:
        assert (r.config.quorum, r.config.min_quorum, r.config.round_timeout, r.config.max_staleness) == (2, 1, 0, 10)


_BUFFERED = {"mode": FederationMode.BUFFERED, "buffering": BufferFlags(buffer=2)}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "--quorum is required"),
        (
            {"quorum": 2, "buffering": BufferFlags(buffer=2, max_staleness=1)},
            "--buffer, --max-staleness applies only to --mode buffered",
        ),
        ({"mode": FederationMode.BUFFERED}, "needs --buffer K"),
        ({**_BUFFERED, "quorum": 2}, "instead of --quorum"),
        ({**_BUFFERED, "fields": ConfigFields(min_quorum=1)}, "instead of --quorum, --min-quorum"),
        ({**_BUFFERED, "fields": ConfigFields(round_timeout=5)}, "instead of --quorum, --min-quorum"),
        (
            {**_BUFFERED, "buffering": BufferFlags(buffer=2, min_buffer=3)},
            "--min-buffer must be between 1 and --buffer 2",
        ),
        ({**_BUFFERED, "buffering": BufferFlags(buffer=2, flush_timeout=-1)}, "--flush-timeout cannot be negative"),
        ({**_BUFFERED, "fields": ConfigFields(screen_outliers=True)}, "does not combine with --screen-outliers"),
    ],
)
def test_a_flag_that_does_not_fit_the_mode_is_refused_by_name(model, options, message):
    with pytest.raises(ConfigError, match=message), resolve(CreateRequest("f", model, **options)):
        pass


def test_secure_aggregation_turns_relative_clipping_off_unless_it_is_given(model):
    secure = ConfigFields(strategy=Strategy.FFA_LORA, secure_aggregation=True)
    with resolve(CreateRequest("sec", model, quorum=2, fields=secure)) as resolved:
        assert resolved.config.relative_clip == 0.0
    with (
        pytest.raises(ConfigError, match="--relative-clip"),
        resolve(CreateRequest("sec", model, quorum=2, fields=secure, relative_clip=10.0)),
    ):
        pass
    with resolve(CreateRequest("plain", model, quorum=2, relative_clip=3.0)) as resolved:
        assert resolved.config.relative_clip == 3.0


def test_a_dp_budget_sets_the_noise_multiplier_over_a_given_one(model):
    fields = ConfigFields(clip_norm=1.0, dp_delta=1e-6, dp_noise_multiplier=0.5)
    with resolve(CreateRequest("dp", model, quorum=2, dp_budget=DpBudget(4.0, rounds=5), fields=fields)) as resolved:
        assert resolved.config.dp_noise_multiplier == noise_for_budget(4.0, 1e-6, 5)
    with resolve(CreateRequest("dp", model, quorum=2, fields=fields)) as resolved:
        assert resolved.config.dp_noise_multiplier == 0.5


def test_a_model_that_is_not_declared_is_refused(tmp_path):
    with (
        pytest.raises(ConfigError, match="'m' is not a local model directory"),
        resolve(CreateRequest("f", ModelSource("m"), quorum=1)),
    ):
        pass
    seq_cls = ModelSource(str(tmp_path), task=TaskType.SEQ_CLS)
    with (
        pytest.raises(ConfigError, match="--task seq-cls needs --labels"),
        resolve(CreateRequest("f", seq_cls, quorum=1)),
    ):
        pass


@pytest.mark.services
def test_create_federation_stores_the_resolved_config(sdk, model, tmp_path):
    request = CreateRequest("made", model, mode=FederationMode.BUFFERED, buffering=BufferFlags(buffer=3))
    created = create_federation(sdk, request)
    assert not created.initial_adapter
    assert sdk.state.config("made") == created.config
    assert created.config.quorum == 3 and created.config.buffered
    initial = ModelSource("m", initial_adapter=Path(model.reference_adapter))
    created = create_federation(sdk, CreateRequest("seeded", initial, quorum=1))
    assert created.initial_adapter and sdk.state.current_round("seeded") == 1
