"""The agent protocol's messages and subjects (docs/agent-protocol.md), shared by server and clients.

Pure: pydantic models of the request bodies and the subject names, nothing that does I/O.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

GUID = r"^[A-Za-z0-9_:@+=-]{1,128}$"
CAPABILITY = r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$"
QUEUE_GROUP = "weft"
DEFAULT_HEARTBEAT_MS = 10_000

# Request verbs agents send (subject `weft.<project>.<verb>`), answered by any replica.
VERBS = (
    "agent.register",
    "agent.sync",
    "agent.deregister",
    "work.accept",
    "work.progress",
    "work.complete",
    "work.fail",
)


def request_subject(project: str, verb: str) -> str:
    return f"weft.{project}.{verb}"


def heartbeat_subject(project: str, guid: str) -> str:
    return f"weft.{project}.agent.heartbeat.{guid}"


def inbox_subject(project: str, guid: str) -> str:
    return f"weft.{project}.agent.{guid}.inbox"


class Msg(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class Register(Msg):
    guid: str = Field(pattern=GUID)
    handle: str | None = Field(None, max_length=200)
    agentType: str = Field(min_length=1, max_length=64)
    capabilities: list[str] = Field(min_length=1, max_length=200)
    boundaries: list[str] = Field(min_length=1, max_length=200)
    maxConcurrentTasks: int = Field(1, ge=1, le=1000)
    hostname: str | None = Field(None, max_length=255)
    username: str | None = Field(None, max_length=255)
    labels: dict[str, str] = Field(default_factory=dict)
    spinUpId: str | None = Field(None, max_length=128)
    targetId: str | None = Field(None, max_length=128)
    spindownAfterIdleMs: int | None = Field(None, ge=0)


class AgentRef(Msg):
    guid: str = Field(pattern=GUID)
    attempt: int | None = Field(None, ge=1)


class Deregister(AgentRef):
    reason: str | None = Field(None, max_length=2000)


class WorkRef(AgentRef):
    workId: str = Field(min_length=1, max_length=128)
    # The item's `attempts` when it was assigned: a late request about an earlier attempt of an
    # item re-assigned to the same agent is answered Conflict instead of landing on the new attempt.
    attempt: int | None = Field(None, ge=1)


class Progress(WorkRef):
    progress: int = Field(ge=0, le=100)
    message: str | None = Field(None, max_length=10_000)


class Complete(WorkRef):
    summary: str | None = Field(None, max_length=100_000)
    output: Any = None
    artifacts: list[Any] | None = None


class Fail(WorkRef):
    message: str = Field(min_length=1, max_length=100_000)
    code: str | None = Field(None, max_length=200)
    recoverable: bool = False


# REST bodies of the same requests: the work id is in the path.
class RestAccept(AgentRef):
    pass


class RestProgress(AgentRef):
    progress: int = Field(ge=0, le=100)
    message: str | None = Field(None, max_length=10_000)


class RestComplete(AgentRef):
    summary: str | None = Field(None, max_length=100_000)
    output: Any = None
    artifacts: list[Any] | None = None


class RestFail(AgentRef):
    message: str = Field(min_length=1, max_length=100_000)
    code: str | None = Field(None, max_length=200)
    recoverable: bool = False
