"""Round state in Redis: key names, Lua scripts, the round state machine, events."""

from .events import EventLog, make_event
from .keys import FederationKeys
from .rounds import FederationConfig, RoundState

__all__ = ["EventLog", "FederationConfig", "FederationKeys", "RoundState", "make_event"]
