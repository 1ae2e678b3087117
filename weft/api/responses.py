"""JSON Schemas of every 2xx response body, for the OpenAPI document (`weft.api.openapi`).

Each schema names the fields the handler always sends (`required`) with their types; enums come
from the tables the fold and the mechanisms use, not copies. Records are open (`additionalProperties`
is not restricted): a stream written by an older weft, or a target registered with extra fields,
may carry more.
"""

from __future__ import annotations

from typing import Any

from projections.state import AGENT_STATUSES, WORK_STATUSES
from weft.spinup import SCHEMAS

Schema = dict[str, Any]

TARGET_STATUSES = ("available", "disabled", "error")  # projections.targets: registered, disabled, tripped
HEALTH_STATUSES = ("healthy", "unhealthy", "unknown")  # projections.events.TargetHealthChanged


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(schema: Schema) -> Schema:
    return {"oneOf": [schema, {"type": "null"}]}


def obj(required: dict[str, Schema], optional: dict[str, Schema] | None = None, *, closed: bool = False) -> Schema:
    out: Schema = {"type": "object", "required": list(required), "properties": {**required, **(optional or {})}}
    if closed:
        out["additionalProperties"] = False
    return out


STR: Schema = {"type": "string"}
INT: Schema = {"type": "integer"}
NUM: Schema = {"type": "number"}
BOOL: Schema = {"type": "boolean"}
ANY: Schema = {}
OBJECT: Schema = {"type": "object"}
STRS: Schema = {"type": "array", "items": STR}
SEQ: Schema = {"type": "integer", "minimum": 0, "description": "stream sequence of the command's event"}
OPT_STR = nullable(STR)

AGENT_SUMMARY = obj({"guid": STR, "handle": OPT_STR, "agentType": STR, "hostname": OPT_STR})

WORK_ITEM = obj({
    "id": STR, "taskId": STR, "capability": STR, "description": STR, "priority": INT, "boundary": STR,
    "preferredAgentType": OPT_STR, "requiredAgentType": OPT_STR, "deadline": OPT_STR, "contextData": ANY,
    "status": {"type": "string", "enum": list(WORK_STATUSES)}, "offeredBy": STR, "offeredAt": STR,
    "attempts": INT, "maxAttempts": INT, "assignedTo": OPT_STR, "assignedAt": OPT_STR,
    "assignedSeq": nullable(INT), "acceptBy": OPT_STR, "startedAt": OPT_STR, "progress": NUM,
    "progressMessage": OPT_STR, "result": ANY, "error": ANY, "errors": {"type": "array"},
    "deadLetter": nullable(OBJECT), "retryAt": OPT_STR, "completedAt": OPT_STR, "cancelledAt": OPT_STR,
    "updatedAt": STR, "projectId": STR, "correlationId": OPT_STR,
    "assignedToAgent": nullable(AGENT_SUMMARY), "waitingReason": OPT_STR,
})

AGENT = obj({
    "guid": STR, "handle": OPT_STR, "agentType": STR, "status": {"type": "string", "enum": list(AGENT_STATUSES)},
    "capabilities": STRS, "boundaries": STRS, "visibility": STR, "hostname": OPT_STR, "username": OPT_STR,
    "projectId": STR, "maxConcurrentTasks": INT, "currentTasks": STRS, "currentTaskCount": INT,
    "registeredAt": STR, "lastActivity": STR,
}, {"labels": OBJECT, "source": STR, "lastSeen": OPT_STR, "lastHeartbeat": OPT_STR})

TARGET = obj({
    "id": STR, "name": STR, "agentType": STR, "mechanism": {"type": "string", "enum": list(SCHEMAS)},
    "capabilities": STRS, "boundaries": STRS, "config": OBJECT, "normalizedConfig": OBJECT,
    "status": {"type": "string", "enum": list(TARGET_STATUSES)},
    "healthStatus": {"type": "string", "enum": list(HEALTH_STATUSES)}, "activeSpinUps": {"type": "array"},
    "useCount": INT, "registeredAt": STR, "updatedAt": STR,
}, {"description": OPT_STR, "tags": STRS, "healthCheck": OBJECT, "lastHealthCheck": OPT_STR, "lastError": ANY,
    "lastSpinUp": nullable(OBJECT), "maxConcurrentAgents": INT})


def page_of(key: str, item: Schema, *, project: bool = False) -> Schema:
    """The list envelope of weft.api.pagination.page."""
    fields = {key: {"type": "array", "items": item}, "count": INT, "total": INT, "hasMore": BOOL,
              "nextCursor": OPT_STR, "prevCursor": OPT_STR}
    if project:
        fields["projectId"] = STR
    return obj(fields)


DLQ_ITEM = obj({"id": STR, "workItem": ref("WorkItem"), "reason": ANY, "attempts": INT, "failedAt": STR,
                "errors": {"type": "array"}})

ACK = obj({"success": {"const": True}, "seq": SEQ}, {"message": STR})
STORED_NOT_FOLDED = obj({"id": STR, "entity": STR, "projectId": STR, "seq": SEQ, "folded": {"const": False},
                         "message": STR})

SUBMITTED = obj({
    "id": STR, "workItemId": STR, "taskId": STR, "status": {"type": "string", "enum": list(WORK_STATUSES)},
    "projectId": STR, "targetAgentType": OPT_STR, "spinUpTriggered": BOOL,
    "estimatedWaitSeconds": nullable(NUM), "waitingReason": OPT_STR, "seq": SEQ,
})
CANCELLED = obj({"success": {"const": True}, "message": STR, "id": STR, "alreadyCancelled": BOOL,
                 "workItem": ref("WorkItem"), "seq": SEQ})
FAILED = obj({"success": {"const": True}, "outcome": {"enum": ["retry", "dead-letter"]}, "retryAt": OPT_STR,
              "seq": SEQ})


def batch(extra: dict[str, Schema]) -> Schema:
    """weft.api.work.batch_body plus the route's own fields."""
    return obj({"success": STRS, "failed": STRS, "count": INT, "errors": ANY, "completedAt": STR,
                "totalProcessed": INT, "successRate": NUM, "seq": nullable(SEQ), **extra})


HEALTH_CHECKED = obj({"targetId": STR, "targetName": STR, "healthy": BOOL,
                      "healthStatus": {"type": "string", "enum": list(HEALTH_STATUSES)},
                      "latencyMs": nullable(NUM), "error": OPT_STR, "checkedAt": STR, "seq": SEQ})
SPUN_UP = obj({"success": {"const": True}, "triggered": {"const": True}, "status": {"const": "in-progress"},
               "operationId": STR, "spinUpId": STR, "targetId": STR, "targetName": STR, "workItemId": OPT_STR,
               "timestamp": STR, "seq": SEQ})

EVENT = obj({"seq": INT, "time": OPT_STR, "type": OPT_STR, "actor": OPT_STR, "correlationId": OPT_STR,
             "data": ANY}, {"undecodable": BOOL})
HISTORY = obj({"id": STR, "entity": {"enum": ["work", "agent"]}, "projectId": STR, "count": INT,
               "events": {"type": "array", "items": EVENT, "minItems": 1}})

PROJECT_STATS = obj({k: INT for k in ("agents", "pendingWork", "activeWork", "completedWork", "failedWork",
                                      "cancelledWork", "deadLetteredWork", "purgedWork", "targets", "seq")}
                    | {"lastActivity": OPT_STR})
TOTALS = obj({k: INT for k in ("agents", "pendingWork", "activeWork", "completedWork", "failedWork", "targets",
                               "cancelledWork", "deadLetteredWork", "purgedWork")})
STATS = obj({"timestamp": STR, "totalProjects": INT, "totals": TOTALS,
             "byProject": {"type": "object", "additionalProperties": PROJECT_STATS}, "projectId": STR,
             "pending": INT, "active": INT, "completed": INT, "failed": INT, "total": INT})
PROJECTS = obj({"timestamp": STR, "projects": STRS, "count": INT,
                "details": {"type": "array", "items": {"allOf": [obj({"projectId": STR}), PROJECT_STATS]}}})
PROJECTION = obj({"projectId": STR, "seq": INT, "stateHash": STR, "eventsApplied": INT, "epoch": INT,
                  "leader": nullable(OBJECT)})

CHANNELS = obj({"channels": {"type": "array", "items": obj({"name": STR, "description": STR, "stream": STR,
                                                             "messageCount": INT})},
                "count": INT, "projectId": STR})
MESSAGES = obj({"channel": STR, "messages": {"type": "array", "items": obj(
    {"timestamp": ANY, "handle": ANY, "message": ANY, "seq": INT})}, "count": INT, "projectId": STR})

HEALTH = obj({"status": {"enum": ["ok", "starting", "degraded", "draining"]}, "timestamp": STR,
              "documentation": STR, "websocket": OBJECT, "ready": BOOL, "nats": obj({"connected": BOOL}),
              "replica": STR, "projects": INT, "leading": {"type": "object", "additionalProperties": INT},
              "uptimeSeconds": NUM}, {"halted": ANY})
LIVE = obj({"status": {"const": "alive"}, "replica": STR, "uptimeSeconds": NUM})
READY = obj({"status": {"enum": ["ready", "not-ready"]}, "reasons": STRS, "replica": STR}, {"halted": ANY})

OPENAPI = obj({"openapi": STR, "info": OBJECT, "paths": OBJECT, "components": OBJECT})

# Reusable component schemas, by name.
COMPONENTS: dict[str, Schema] = {
    "WorkItem": WORK_ITEM, "Agent": AGENT, "Target": TARGET, "DLQItem": DLQ_ITEM, "Ack": ACK,
    "StoredNotFolded": STORED_NOT_FOLDED, "History": HISTORY, "ProjectStats": PROJECT_STATS,
}


def json_body(schema: Schema) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def text_body(media: str) -> dict[str, Any]:
    return {media: {"schema": {"type": "string"}}}


# (method, path) -> {status: content}: the 2xx answers of each route (other than the error shape).
ACCEPTED = {"202": json_body(ref("StoredNotFolded"))}
SUCCESS: dict[tuple[str, str], dict[str, dict[str, Any]]] = {
    ("get", "/health"): {"200": json_body(HEALTH)},
    ("get", "/health/live"): {"200": json_body(LIVE)},
    ("get", "/health/ready"): {"200": json_body(READY)},
    ("get", "/metrics"): {"200": text_body("text/plain")},
    ("get", "/api/openapi.json"): {"200": json_body(OPENAPI)},
    ("get", "/api/docs"): {"200": text_body("text/html")},
    ("get", "/api/work"): {"200": json_body(page_of("workItems", ref("WorkItem"), project=True))},
    ("post", "/api/work"): {"201": json_body(SUBMITTED), "200": json_body(SUBMITTED), **ACCEPTED},
    ("post", "/api/work/cancel-batch"): {"200": json_body(batch(
        {"cancelledItems": STRS, "reassignedItems": STRS, "notCancellable": STRS}))},
    ("get", "/api/work/{id}"): {"200": json_body(ref("WorkItem"))},
    ("get", "/api/work/{id}/history"): {"200": json_body(ref("History"))},
    ("post", "/api/work/{id}/cancel"): {"200": json_body(CANCELLED)},
    ("post", "/api/work/{id}/accept"): {"200": json_body(ref("Ack"))},
    ("post", "/api/work/{id}/progress"): {"200": json_body(ref("Ack"))},
    ("post", "/api/work/{id}/complete"): {"200": json_body(ref("Ack"))},
    ("post", "/api/work/{id}/fail"): {"200": json_body(FAILED), **ACCEPTED},
    ("get", "/api/dlq"): {"200": json_body(page_of("items", ref("DLQItem"), project=True))},
    ("post", "/api/dlq/{id}/retry"): {"200": json_body(ref("Ack"))},
    ("post", "/api/dlq/{id}/discard"): {"200": json_body(ref("Ack"))},
    ("get", "/api/agents"): {"200": json_body(page_of("agents", ref("Agent")))},
    ("post", "/api/agents/shutdown-batch"): {"200": json_body(batch({"shutdownAgents": STRS, "graceful": BOOL}))},
    ("get", "/api/agents/{guid}"): {"200": json_body(ref("Agent"))},
    ("get", "/api/agents/{guid}/history"): {"200": json_body(ref("History"))},
    ("post", "/api/agents/{guid}/shutdown"): {"200": json_body(obj(
        {"success": {"const": True}, "message": STR, "graceful": BOOL, "seq": SEQ}))},
    ("get", "/api/targets"): {"200": json_body(page_of("targets", ref("Target")))},
    ("post", "/api/targets"): {"201": json_body(ref("Target")), "200": json_body(ref("Target")), **ACCEPTED},
    ("post", "/api/targets/disable-batch"): {"200": json_body(batch({"disabledTargets": STRS,
                                                                     "alreadyDisabled": STRS}))},
    ("get", "/api/targets/{idOrName}"): {"200": json_body(ref("Target"))},
    ("put", "/api/targets/{idOrName}"): {"200": json_body(ref("Target")), **ACCEPTED},
    ("delete", "/api/targets/{idOrName}"): {"200": json_body(ref("Ack"))},
    ("post", "/api/targets/{idOrName}/test"): {"200": json_body(HEALTH_CHECKED)},
    ("post", "/api/targets/{idOrName}/spin-up"): {"200": json_body(SPUN_UP)},
    ("post", "/api/targets/{idOrName}/enable"): {"200": json_body(ref("Ack"))},
    ("post", "/api/targets/{idOrName}/disable"): {"200": json_body(ref("Ack"))},
    ("get", "/api/stats"): {"200": json_body(STATS), "304": {}},
    ("get", "/api/stats/projects"): {"200": json_body(PROJECTS), "304": {}},
    ("get", "/api/stats/projection"): {"200": json_body(PROJECTION)},
    ("get", "/api/channels"): {"200": json_body(CHANNELS)},
    ("get", "/api/channels/{name}/messages"): {"200": json_body(MESSAGES)},
}
