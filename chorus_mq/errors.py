"""One error hierarchy. Every message says what went wrong and what to do about it."""

from __future__ import annotations


class ChorusError(Exception):
    """Root of every error chorus-mq raises on purpose."""

    exit_code = 1
    #: short machine-readable reason, used in events and the CLI
    code = "error"


class ConfigError(ChorusError):
    """Settings or arguments that cannot work together."""

    exit_code = 2
    code = "config"


class InvalidAdapter(ChorusError):
    """An adapter or delta file is malformed, unsafe or inconsistent."""

    exit_code = 3
    code = "invalid_adapter"


class ChecksumMismatch(InvalidAdapter):
    code = "checksum_mismatch"


class TooLarge(InvalidAdapter):
    code = "too_large"


class LimitExceeded(InvalidAdapter):
    """More tensors, patterns or header than the federation's declared model can need."""

    code = "limit_exceeded"


class UpdateTooLarge(InvalidAdapter):
    """A module update whose norm ||s B A|| is not finite or above the federation's bound."""

    code = "update_too_large"


class IncompatibleDelta(InvalidAdapter):
    """Well-formed, but does not fit the federation (modules, ranks, base model)."""

    code = "incompatible"


class InvalidReport(InvalidAdapter):
    """An upload record's label counts or evaluation report do not fit its federation."""

    code = "invalid_report"


class NotFound(ChorusError):
    exit_code = 4
    code = "not_found"


class UnknownFederation(NotFound):
    code = "unknown_federation"


class UnknownRound(NotFound):
    code = "unknown_round"


class ObjectMissing(NotFound):
    code = "object_missing"


class Conflict(ChorusError):
    exit_code = 5
    code = "conflict"


class FederationExists(Conflict):
    code = "federation_exists"


class RoundClosed(Conflict):
    code = "round_closed"


class NotSelected(Conflict):
    """Client sampling did not pick this client for the round."""

    code = "not_selected"


class DuplicateDelta(Conflict):
    """A different delta from the same client in the same round."""

    code = "conflicting_delta"


class StaleDelta(Conflict):
    """A buffered federation's delta trained from a version too old (or not yet published)."""

    code = "stale_delta"


class ObjectExists(Conflict):
    """A write-once object already exists."""

    code = "object_exists"


class Rejected(ChorusError):
    """The worker rejected an upload; ``reason`` is its explanation."""

    exit_code = 6
    code = "rejected"

    def __init__(self, reason: str, code: str = "rejected"):
        super().__init__(reason)
        self.reason = reason
        self.code = code


class AuthError(ChorusError):
    exit_code = 7
    code = "unauthorized"


class Unauthenticated(AuthError):
    """A message whose sender cannot be established: logged and counted, never published."""

    code = "unauthenticated"


class AggregationError(ChorusError):
    code = "aggregation_failed"


class StoreError(ChorusError):
    """Object storage failed in a way that retrying may fix."""

    exit_code = 8
    code = "store"


class ServiceUnavailable(ChorusError):
    """Redis (or another service) cannot be reached; retrying the same command is safe."""

    exit_code = 8
    code = "unavailable"


class Timeout(ChorusError):
    exit_code = 9
    code = "timeout"


class RoundFailed(ChorusError):
    """A round a command waited for ended without a result (failed, expired or aborted)."""

    exit_code = 10
    code = "round_failed"


class DataError(ConfigError):
    """A training or evaluation data set that cannot be used as given (format, columns, labels, size)."""

    code = "bad_data"


class StateCorrupt(ChorusError):
    """A Redis key holds something chorus-mq never writes there (another type, unparsable data).

    The transition that found it changed nothing; the message names the key to inspect.
    """

    code = "state_corrupt"


class DeltaEvicted(Conflict):
    """The operator evicted this very delta from the round: it cannot be registered there again."""

    code = "evicted"


class SecAggError(ChorusError):
    """A secure-aggregation round cannot go on as asked (parameters, too few clients, a refused request)."""

    code = "secagg"


class PeerMisbehaved(SecAggError):
    """One named client sent something malformed; the protocol goes on without it where it can."""

    code = "secagg_peer"

    def __init__(self, client: str, reason: str):
        super().__init__(f"client {client!r}: {reason}")
        self.client = client
        self.reason = reason


class UnmaskRefused(SecAggError):
    """An honest client refuses an unmask request that would let the aggregator learn one client's input."""

    code = "secagg_refused"
