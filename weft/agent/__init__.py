"""The reference agent (`weft agent`) and a reusable client of the agent protocol."""

from weft.agent.client import (
    AgentClient,
    Assignment,
    Cancel,
    Push,
    RegisterReply,
    RequestError,
    RetriesExhausted,
    Shutdown,
    ShutdownRequest,
    SyncReply,
)
from weft.agent.runner import AgentRunner, StopRequest, parse_progress
from weft.agent.settings import AgentSettings, AgentSettingsError

__all__ = [
    "AgentClient",
    "AgentRunner",
    "AgentSettings",
    "AgentSettingsError",
    "Assignment",
    "Cancel",
    "Push",
    "RegisterReply",
    "RequestError",
    "RetriesExhausted",
    "Shutdown",
    "ShutdownRequest",
    "StopRequest",
    "SyncReply",
    "parse_progress",
]
