"""Every Redis key name chorus-mq uses, in one place.

A federation's keys share the hash tag ``{<federation>}`` so its scripts run on one
Cluster slot. Only the registry of federations is global.
"""

from __future__ import annotations

from dataclasses import dataclass

PREFIX = "chorus"
FEDERATIONS = f"{PREFIX}:federations"


@dataclass(frozen=True)
class FederationKeys:
    federation: str

    @property
    def _base(self) -> str:
        return f"{PREFIX}:{{{self.federation}}}"

    @property
    def meta(self) -> str:
        return f"{self._base}:meta"

    @property
    def events(self) -> str:
        return f"{self._base}:events"

    @property
    def channel(self) -> str:
        """Pub/sub channel (not a key): a wake-up for live subscribers."""
        return f"{self._base}:live"

    @property
    def deadlines(self) -> str:
        return f"{self._base}:deadlines"

    @property
    def leases(self) -> str:
        return f"{self._base}:leases"

    @property
    def shapes(self) -> str:
        return f"{self._base}:shapes"

    @property
    def secrets(self) -> str:
        """Server-only secrets (the DP noise key): never readable by client ACL users."""
        return f"{self._base}:secrets"

    @property
    def clients(self) -> str:
        return f"{self._base}:clients"

    @property
    def privacy(self) -> str:
        return f"{self._base}:privacy"

    def nonce(self, client: str, nonce: str) -> str:
        return f"{self._base}:nonce:{client}:{nonce}"

    def round(self, r: int) -> str:
        return f"{self._base}:round:{r}"

    def deltas(self, r: int) -> str:
        return f"{self._base}:round:{r}:deltas"
