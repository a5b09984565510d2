"""Every Redis key name chorus-mq uses, in one place (the table in docs/CONTRACTS.md).

A federation's keys share the hash tag ``{<federation>}`` so its scripts run on one
Cluster slot. Only the registry of federations is global. Names are checked on the way
in (``ids.check_name``), so a key or an ACL pattern built here never holds ``:``, a glob
character or whitespace.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..ids import check_name

PREFIX = "chorus"
FEDERATIONS = f"{PREFIX}:federations"

#: every per-client Redis ACL user is named ``client:<federation>:<client>``; ``:`` cannot occur in a
#: name, so two (federation, client) pairs never map to one user, nor onto ``worker``/``operator``/...
CLIENT_USER_PREFIX = "client"
_USER_SEPARATOR = ":"


def client_username(federation: str, client: str) -> str:
    """The Redis ACL user of ``client`` in ``federation`` (URL-quote it inside a URL: it holds ``:``)."""
    check_name(federation, "federation name")
    check_name(client, "client id")
    return _USER_SEPARATOR.join((CLIENT_USER_PREFIX, federation, client))


def parse_client_username(user: str) -> tuple[str, str] | None:
    """``(federation, client)`` of a client user's name; None for any other user (worker, operator, ...)."""
    parts = user.split(_USER_SEPARATOR)
    if len(parts) != 3 or parts[0] != CLIENT_USER_PREFIX:
        return None
    return parts[1], parts[2]


def client_user_prefix(federation: str) -> str:
    """What every client user of ``federation`` starts with (to list them)."""
    return _USER_SEPARATOR.join((CLIENT_USER_PREFIX, check_name(federation, "federation name"), ""))


@dataclass(frozen=True)
class FederationKeys:
    """The keys of one federation."""

    federation: str

    def __post_init__(self) -> None:
        check_name(self.federation, "federation name")

    @property
    def _base(self) -> str:
        return f"{PREFIX}:{{{self.federation}}}"

    @property
    def meta(self) -> str:
        """Hash: the federation's config, ``current_round``, ``latest_complete``, ``selection_seed``."""
        return f"{self._base}:meta"

    @property
    def modules(self) -> str:
        """Hash: declared module -> ``"d_out,d_in"`` (operator input, fixed at creation)."""
        return f"{self._base}:modules"

    @property
    def extras(self) -> str:
        """Hash: declared extra tensor (task head) -> ``"d0,d1,..."``."""
        return f"{self._base}:extras"

    @property
    def inbox(self) -> str:
        """Stream: the federation-wide inbox, for unsigned records of unregistered clients (development
        mode, ``CHORUS_ALLOW_UNSIGNED``); registered clients each have their own (:meth:`client_inbox`)."""
        return f"{self._base}:inbox"

    def client_inbox(self, client: str) -> str:
        """Stream: the only key a registered client writes (XADD), its signed ingest records in field ``m``.

        One per client, so no client's XADD options (MAXLEN/MINID trimming) reach another's records.
        """
        return f"{self._base}:inbox:{check_name(client, 'client id')}"

    @property
    def events(self) -> str:
        return f"{self._base}:events"

    @property
    def channel(self) -> str:
        """Pub/sub channel (not a key): a wake-up for live subscribers."""
        return f"{self._base}:live"

    @property
    def clients(self) -> str:
        """Hash: client -> registry record (secret, weight, dataset size, revoked)."""
        return f"{self._base}:clients"

    @property
    def secrets(self) -> str:
        """Server-only secrets (the DP noise key): never readable by client ACL users."""
        return f"{self._base}:secrets"

    def nonce(self, client: str, nonce: str) -> str:
        return f"{self._base}:nonce:{client}:{nonce}"

    @property
    def deadlines(self) -> str:
        """Sorted set: open round -> deadline."""
        return f"{self._base}:deadlines"

    @property
    def leases(self) -> str:
        """Sorted set: aggregating round -> lease end."""
        return f"{self._base}:leases"

    @property
    def rejected(self) -> str:
        """Hash: reason code -> count of inbox records dropped before authentication."""
        return f"{self._base}:rejected"

    def rate(self, client: str | None) -> str:
        """Hash with a TTL: the token bucket (``tokens``, ``at``) of a client's inbox, or of the federation-wide
        one (``None``): the inbox's rate budget (workers only)."""
        if client is None:
            return f"{self._base}:rate"
        return f"{self._base}:rate:{check_name(client, 'client id')}"

    def fetch_lock(self, client: str, sha256: str) -> str:
        """String with a TTL: one worker fetches and judges an object at a time (redis-py ``Lock``)."""
        return f"{self._base}:fetch:{check_name(client, 'client id')}:{sha256}"

    def round(self, r: int) -> str:
        return f"{self._base}:round:{int(r)}"

    @property
    def round_pattern(self) -> str:
        """ACL glob over every round key (hash, deltas, plan, shards) of this federation only."""
        return f"{self._base}:round:*"

    def deltas(self, r: int) -> str:
        return f"{self.round(r)}:deltas"

    def verdicts(self, r: int) -> str:
        """Hash with a TTL: ``client|sha256`` -> the verdict on those bytes in round ``r`` (JSON: size, code,
        reason), so an object already judged is never fetched again."""
        return f"{self.round(r)}:verdicts"

    def rejections(self, r: int) -> str:
        """Hash: ``client|code`` -> rejections of the client in round ``r`` under that code (only the first is
        published), and ``last:client`` -> its latest rejection (JSON: upload_id, code, reason, count)."""
        return f"{self.round(r)}:rejections"

    @property
    def ledger(self) -> str:
        """Hash, buffered federations: ``client|sha256`` -> the round (buffer) that accepted those bytes, so a
        redelivered or re-sent delta is a duplicate in every later buffer (no delta lands in two flushes)."""
        return f"{self._base}:buffered_ledger"

    def plan(self, r: int) -> str:
        return f"{self.round(r)}:plan"

    def shards(self, r: int) -> str:
        return f"{self.round(r)}:shards"

    @property
    def collected(self) -> str:
        """String: the sweep's cursor, the first round whose plan and shard keys it has not collected yet."""
        return f"{self._base}:collected"

    @property
    def opt_collected(self) -> str:
        """String: the first round whose server optimiser state objects may not be collected yet."""
        return f"{self._base}:opt_collected"

    @property
    def snapshots(self) -> str:
        """Hash: round -> snapshot record of the compacted cumulative correction."""
        return f"{self._base}:snapshots"

    @property
    def compaction(self) -> str:
        """String: the lock a running compaction holds (redis-py ``Lock``; workers only)."""
        return f"{self._base}:compaction"

    def compaction_request(self, r: int) -> str:
        """String with a TTL: the sweep asked for the snapshot of round ``r`` (so it asks once per retry)."""
        return f"{self._base}:compaction:{int(r)}"

    # -- secure aggregation (chorus_mq/state/secagg.py) -------------------------------------------

    def secagg(self, r: int) -> str:
        """Hash: round ``r``'s secure-aggregation state (phase, epoch, deadline, threshold, survivors): public,
        under the round pattern every client may read."""
        return f"{self.round(r)}:secagg"

    def secagg_phase(self, r: int, phase: str) -> str:
        """Hash: client -> its verified payload for ``phase`` of round ``r`` (workers only: sealed shares of
        every client are in the share phase's)."""
        return f"{self._base}:secagg:{int(r)}:{phase}"

    def secagg_members(self, r: int, phase: str) -> str:
        """Set: the clients who may submit in ``phase`` of round ``r`` (workers only)."""
        return f"{self._base}:secagg:{int(r)}:members:{phase}"

    def secagg_to(self, r: int, client: str) -> str:
        """Hash: what ``client`` must read in round ``r`` (``advert:<peer>``, ``share:<peer>``); readable by
        that client's ACL user alone (:meth:`secagg_to_pattern`)."""
        return f"{self._base}:secagg:{int(r)}:to:{check_name(client, 'client id')}"

    def secagg_to_pattern(self, client: str) -> str:
        """ACL glob over ``client``'s own delivery hashes, every round."""
        return f"{self._base}:secagg:*:to:{check_name(client, 'client id')}"
