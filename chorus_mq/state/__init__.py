"""Round state in Redis: key names, Lua scripts, the round state machine, events, inbox, clients, ACL users."""

from .acl import Acl, SyncReport, client_url
from .clients import ClientRegistry
from .config import FederationConfig
from .events import Event, EventLog
from .inbox import Inbox, InboxEntry, read_group
from .protocol import Reply
from .records import ClientInfo, DeltaRecord, ManifestRef, RoundInfo, SnapshotRecord
from .redis_keys import FEDERATIONS, FederationKeys, client_username
from .rounds import ModelShapes, RoundState
from .selection import next_selected_round

__all__ = [
    "FEDERATIONS",
    "Acl",
    "ClientInfo",
    "ClientRegistry",
    "DeltaRecord",
    "Event",
    "EventLog",
    "FederationConfig",
    "FederationKeys",
    "Inbox",
    "InboxEntry",
    "ManifestRef",
    "ModelShapes",
    "Reply",
    "RoundInfo",
    "RoundState",
    "SnapshotRecord",
    "SyncReport",
    "client_url",
    "client_username",
    "next_selected_round",
    "read_group",
]
