"""The event catalogue: every event type weft writes, its entity, schema version and fields.

This is the only module that defines event types. Events are facts in the past tense and are never
rewritten; when a type's schema changes, bump its version here and upcast old versions in `upcast`.
The module is pure (no I/O) so projections, the store, the replay tool and tests all share it.
"""

from __future__ import annotations

import functools
import re
import types
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Literal, NotRequired, TypedDict, Union, get_args, get_origin, get_type_hints

import orjson

Entity = Literal["work", "agent", "target", "project"]

PROJECT_ID_RE: Final = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# Entity ids become subject tokens: no dots, wildcards or whitespace.
ENTITY_ID_RE: Final = re.compile(r"^[A-Za-z0-9_:@+=-]{1,128}$")


# --- data shapes, one per event type ---------------------------------------------------------


class WorkSubmitted(TypedDict):
    taskId: str
    capability: str
    boundary: str
    description: str
    priority: int
    preferredAgentType: str | None
    requiredAgentType: str | None
    deadline: str | None
    contextData: dict[str, Any] | None
    maxAttempts: int


class WorkAssigned(TypedDict):
    agentGuid: str
    attempt: int
    acceptBy: str  # ISO time after which an unaccepted assignment returns to pending


class WorkStarted(TypedDict):
    agentGuid: str


class WorkProgressed(TypedDict):
    agentGuid: str
    progress: int
    message: str | None


class WorkCompleted(TypedDict):
    agentGuid: str | None
    summary: str | None
    output: Any
    artifacts: list[Any] | None


class WorkFailed(TypedDict):
    """One attempt failed. The writer decided the outcome, so the fold needs no policy."""

    agentGuid: str | None
    message: str
    code: str | None
    recoverable: bool
    outcome: Literal["retry", "dead-letter"]
    retryAt: str | None


class WorkRequeued(TypedDict):
    reason: str
    retryAt: str | None
    # Why it was withdrawn, when the scheduler did it: "accept-timeout" marks `agentGuid` (the
    # holder) unresponsive until it shows life; "agent-offline" says its agent was lost or left.
    # A withdrawal names both keys, `cause` null when none was given; an operator's requeue neither.
    cause: NotRequired[str | None]
    agentGuid: NotRequired[str]


class WorkDeadLettered(TypedDict):
    reason: str
    cause: NotRequired[str | None]  # as in WorkRequeued, when a withdrawal used up the item's attempts
    agentGuid: NotRequired[str]


class WorkCancelled(TypedDict):
    reason: str | None


class WorkRetried(TypedDict):
    reason: str | None


class WorkDiscarded(TypedDict):
    reason: str | None


class WorkPurged(TypedDict):
    reason: str | None


class AgentRegistered(TypedDict):
    guid: str
    handle: str | None
    agentType: str
    capabilities: list[str]
    boundaries: list[str]
    maxConcurrentTasks: int
    hostname: str | None
    username: str | None
    visibility: str
    labels: dict[str, str]
    source: Literal["weft", "warp"]
    spinUpId: str | None
    targetId: str | None
    spindownAfterIdleMs: int | None


class AgentShutdownRequested(TypedDict):
    graceful: bool
    reason: str
    gracePeriodMs: int | None


class AgentDeregistered(TypedDict):
    reason: str | None


class AgentLost(TypedDict):
    lastHeartbeat: str | None


class TargetRegistered(TypedDict):
    target: dict[str, Any]  # the full definition, secrets as references only


class TargetUpdated(TypedDict):
    changes: dict[str, Any]


class TargetStatusChanged(TypedDict):
    reason: str | None


class TargetRemoved(TypedDict):
    reason: str | None


class TargetHealthChanged(TypedDict):
    healthStatus: Literal["healthy", "unhealthy", "unknown"]
    latencyMs: float | None
    error: str | None


class SpinUpRequested(TypedDict):
    spinUpId: str
    workId: str | None
    capability: str | None
    boundary: str | None
    reason: str


class SpinUpStarted(TypedDict):
    spinUpId: str
    mechanismResult: dict[str, Any] | None


class SpinUpCompleted(TypedDict):
    spinUpId: str
    agentGuid: str
    durationMs: float


class SpinUpFailed(TypedDict):
    spinUpId: str
    error: str
    durationMs: float


class LeaderElected(TypedDict):
    """A replica won the project's lease and will decide from now on. The envelope's `epoch` is
    the term's fence: above every epoch in the stream, whatever happened to the lease bucket."""

    holder: str
    leaseRevision: int


@dataclass(frozen=True, slots=True)
class EventSpec:
    name: str
    entity: Entity
    version: int
    data: type
    doc: str


def _spec(t: str, entity: Entity, data: type, doc: str, version: int = 1) -> tuple[str, EventSpec]:
    return t, EventSpec(t, entity, version, data, doc)


CATALOGUE: Final[dict[str, EventSpec]] = dict(
    [
        _spec("work.submitted", "work", WorkSubmitted, "a work item was accepted and is pending"),
        _spec("work.assigned", "work", WorkAssigned, "the scheduler gave the item to an agent"),
        _spec("work.started", "work", WorkStarted, "the agent accepted the assignment"),
        _spec("work.progressed", "work", WorkProgressed, "the agent reported progress"),
        _spec("work.completed", "work", WorkCompleted, "the item finished successfully"),
        _spec("work.failed", "work", WorkFailed, "an attempt failed; data says retry or dead-letter"),
        _spec("work.requeued", "work", WorkRequeued, "a live assignment was withdrawn; pending again"),
        _spec("work.dead_lettered", "work", WorkDeadLettered, "the item gave up without a failed attempt"),
        _spec("work.cancelled", "work", WorkCancelled, "the item was cancelled"),
        _spec("work.retried", "work", WorkRetried, "a dead-lettered item was put back to pending"),
        _spec("work.discarded", "work", WorkDiscarded, "a dead-lettered item was removed from the DLQ"),
        _spec("work.purged", "work", WorkPurged, "a finished item left the projection (retention); its events stay"),
        _spec("agent.registered", "agent", AgentRegistered, "an agent joined (or re-joined) the project"),
        _spec("agent.shutdown_requested", "agent", AgentShutdownRequested, "the agent was asked to stop"),
        _spec("agent.deregistered", "agent", AgentDeregistered, "the agent left on its own"),
        _spec("agent.lost", "agent", AgentLost, "the scheduler saw no heartbeat for too long"),
        _spec("target.registered", "target", TargetRegistered, "a spin-up target was registered"),
        _spec("target.updated", "target", TargetUpdated, "mutable target fields changed"),
        _spec("target.enabled", "target", TargetStatusChanged, "the target may be used again"),
        _spec("target.disabled", "target", TargetStatusChanged, "the target must not be used"),
        _spec("target.removed", "target", TargetRemoved, "the target was deleted"),
        _spec("target.health_changed", "target", TargetHealthChanged, "a probe changed the health status"),
        _spec("spinup.requested", "target", SpinUpRequested, "a spin-up on this target was decided"),
        _spec("spinup.started", "target", SpinUpStarted, "the mechanism launched the agent"),
        _spec("spinup.completed", "target", SpinUpCompleted, "an agent registered with the spin-up id"),
        _spec("spinup.failed", "target", SpinUpFailed, "the spin-up did not produce an agent in time"),
        _spec("leader.elected", "project", LeaderElected, "a scheduler took over; older epochs are fenced"),
    ]
)


# Hot-path lookup (every fold and subject): the entity of each event type.
ENTITY_OF: Final[dict[str, Entity]] = {name: spec.entity for name, spec in CATALOGUE.items()}


# --- payload validation: the shapes above, checked -------------------------------------------------


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """One key of an event's data: its type (NotRequired taken off) and whether it must be present."""

    name: str
    type: Any
    required: bool


@functools.cache
def fields_of(data: type) -> dict[str, FieldSpec]:
    """The keys a data shape (a TypedDict of this module) declares, in declaration order.

    Read from the annotations, not `__required_keys__`: with postponed annotations Python 3.11
    counts a `NotRequired[...]` key as required there."""
    out: dict[str, FieldSpec] = {}
    for name, hint in get_type_hints(data, include_extras=True).items():
        required = get_origin(hint) is not NotRequired
        out[name] = FieldSpec(name, hint if required else get_args(hint)[0], required)
    return out


def payload_errors(type_: str, data: object) -> list[str]:
    """What is wrong with `data` as the payload of a `type_` event (empty when it fits): a required
    key missing, a key the type does not declare, a value of another JSON type than declared
    (nested lists and dicts included; `bool` is not an `int`, an `int` is a `float`)."""
    spec = CATALOGUE.get(type_)
    if spec is None:
        return [f"unknown event type {type_!r}"]
    if not isinstance(data, Mapping):
        return [f"data: expected an object, got {_kind(data)}"]
    fields = fields_of(spec.data)
    errors = [f"{name}: missing" for name, f in fields.items() if f.required and name not in data]
    for name, value in data.items():
        f = fields.get(name)
        if f is None:
            errors.append(f"{name}: not a field of {type_} ({spec.data.__name__})")
        else:
            errors += _type_errors(str(name), f.type, value)
    return errors


# The JSON scalars a declared type accepts (JSON has one number type: an int is a float).
_SCALARS: Final[dict[Any, tuple[type, ...]]] = {
    str: (str,), int: (int,), float: (int, float), bool: (bool,), type(None): (type(None),)
}


def _type_errors(path: str, tp: Any, value: object) -> list[str]:
    if tp is Any:
        return []
    origin = get_origin(tp)
    if origin is Union or origin is types.UnionType:
        if any(not _type_errors(path, option, value) for option in get_args(tp)):
            return []
        return [f"{path}: expected {_type_name(tp)}, got {_kind(value)}"]
    if origin is Literal:
        if any(type(value) is type(a) and value == a for a in get_args(tp)):
            return []
        return [f"{path}: expected one of {', '.join(map(repr, get_args(tp)))}, got {value!r}"]
    if origin is list:
        if not isinstance(value, list):
            return [f"{path}: expected {_type_name(tp)}, got {_kind(value)}"]
        (item,) = get_args(tp)
        return [e for i, v in enumerate(value) for e in _type_errors(f"{path}[{i}]", item, v)]
    if origin is dict:
        if not isinstance(value, dict):
            return [f"{path}: expected {_type_name(tp)}, got {_kind(value)}"]
        _key, item = get_args(tp)  # always str: JSON object keys
        out = [f"{path}: key {k!r} is not a string" for k in value if not isinstance(k, str)]
        return out + [e for k, v in value.items() for e in _type_errors(f"{path}.{k}", item, v)]
    accepted = _SCALARS.get(tp)
    if accepted is None:
        raise TypeError(f"{path}: the catalogue declares {tp!r}, which payload_errors cannot check")
    if isinstance(value, accepted) and (tp is bool or not isinstance(value, bool)):
        return []
    return [f"{path}: expected {_type_name(tp)}, got {_kind(value)}"]


def _type_name(tp: Any) -> str:
    return "None" if tp is type(None) else getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _kind(value: object) -> str:
    return "null" if value is None else f"{type(value).__name__} {value!r}"[:80]


class UnsupportedEvent(ValueError):
    """A well-formed event this version of weft cannot read (written by a newer one). Unlike a
    corrupt message, some version can fold it: skipping it would make replicas disagree."""


class UnknownEventType(UnsupportedEvent):
    pass


class NewerEventVersion(UnsupportedEvent):
    pass


def idempotent_id(project: str, key: str) -> str:
    """The event id (and Nats-Msg-Id) for a client's Idempotency-Key: same key, same id."""
    return uuid.uuid5(uuid.NAMESPACE_URL, f"weft:{project}:{key}").hex


def format_ts(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def parse_ts(ts: str) -> datetime:
    return datetime.fromisoformat(ts.replace("Z", "+00:00"))


@dataclass(slots=True)
class Event:
    """The envelope of DESIGN.md §2. `seq` is the stream sequence, known only after append/read."""

    type: str
    entity_id: str
    data: dict[str, Any]
    project: str = ""
    id: str = ""  # minted at the edge (weft.stamps), never by the fold
    v: int = 0
    ts: str = ""
    actor: str = "system"
    correlation_id: str | None = None
    causation_id: str | None = None
    epoch: int | None = None
    idempotency_key: str | None = None
    seq: int = 0

    def __post_init__(self) -> None:
        if self.type not in ENTITY_OF:
            raise UnknownEventType(self.type)
        if not self.v:
            self.v = CATALOGUE[self.type].version

    @property
    def entity(self) -> Entity:
        return ENTITY_OF[self.type]

    @property
    def subject(self) -> str:
        return subject_for(self.project, self.entity, self.entity_id)

    def encode(self) -> bytes:
        body: dict[str, Any] = {
            "id": self.id,
            "type": self.type,
            "v": self.v,
            "ts": self.ts,
            "actor": self.actor,
            "project": self.project,
            "entityId": self.entity_id,
            "data": self.data,
        }
        if self.correlation_id:
            body["correlation_id"] = self.correlation_id
        if self.causation_id:
            body["causation_id"] = self.causation_id
        if self.epoch is not None:
            body["epoch"] = self.epoch
        if self.idempotency_key:
            body["idempotency_key"] = self.idempotency_key
        return orjson.dumps(body)

    def to_dict(self) -> dict[str, Any]:
        d = orjson.loads(self.encode())
        assert isinstance(d, dict)
        d["seq"] = self.seq
        return d


_new_event = object.__new__


def decode(raw: bytes, seq: int = 0) -> Event:
    """An event from its stored bytes. Builds the object field by field instead of through
    `Event(...)`: a rebuild decodes every event ever written, and the dataclass constructor with its
    defaults and `__post_init__` was a fifth of a rebuild's own time (make bench)."""
    body = orjson.loads(raw)
    type_ = body["type"]
    if type_ not in ENTITY_OF:
        raise UnknownEventType(type_)
    get = body.get
    ev: Event = _new_event(Event)
    ev.type = type_
    ev.entity_id = body["entityId"]
    ev.data = body["data"]
    ev.project = get("project", "")
    ev.id = body["id"]
    ev.v = body["v"]
    ev.ts = body["ts"]
    ev.actor = get("actor", "system")
    ev.correlation_id = get("correlation_id")
    ev.causation_id = get("causation_id")
    ev.epoch = get("epoch")
    ev.idempotency_key = get("idempotency_key")
    ev.seq = seq
    known = CATALOGUE[type_].version
    if ev.v == known:
        return ev
    if ev.v > known:
        raise NewerEventVersion(f"{type_} v{ev.v} (this weft reads up to v{known})")
    return upcast(ev)


def upcast(ev: Event) -> Event:
    """Bring an old schema version up to the current one. All types are at v1 so far."""
    return ev


ENTITIES: Final = frozenset({"work", "agent", "target", "project"})


def subject_for(project: str, entity: str, entity_id: str) -> str:
    """The event's subject. Refuses tokens that would change the subject's shape: a dot or a
    wildcard would land the event on another entity's subject, outside its optimistic concurrency."""
    if not is_valid_project_id(project):
        raise ValueError(f"invalid project id {project!r}")
    if entity not in ENTITIES:
        raise ValueError(f"invalid entity {entity!r}")
    if not is_valid_entity_id(entity_id):
        raise ValueError(f"invalid {entity} id {entity_id!r}")
    return f"weft.{project}.ev.{entity}.{entity_id}"


def stream_name(project: str) -> str:
    return f"WEFT_{project}"


def is_valid_project_id(project: str) -> bool:
    # fullmatch, not match: `$` also matches before a trailing newline ("abc\n" would pass).
    return PROJECT_ID_RE.fullmatch(project) is not None


def is_valid_entity_id(entity_id: str) -> bool:
    return ENTITY_ID_RE.fullmatch(entity_id) is not None

