"""The OpenAPI 3.1 document, built from the route table and the pydantic request models.

A test checks that every route the app serves is documented here and nothing documented is missing.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import BaseModel

from weft.api import responses, schemas
from weft.api.common import json_response
from weft.core import protocol
from weft.core.live_events import ALL_EVENTS, FILTER_KEYS, TOPICS

ERROR = {
    "type": "object",
    "required": ["error", "message", "details"],
    "properties": {
        "error": {"type": "string"},
        "message": {"type": "string"},
        "details": {"type": "object", "properties": {"field": {"type": ["string", "null"]}}},
    },
}
PROJECT = {"name": "projectId", "in": "query", "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
           "description": "project (or header X-Weft-Project); default LOOMINAL_PROJECT_ID"}
MIN_SEQ = {"name": "min_seq", "in": "query", "schema": {"type": "integer", "minimum": 0},
           "description": "wait (bounded) until this replica folded the stream up to this sequence"}
PAGING = [{"name": "cursor", "in": "query", "schema": {"type": "string"}},
          {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 50}}]


def q(*names: str) -> list[dict[str, Any]]:
    return [{"name": n, "in": "query", "schema": {"type": "string"}} for n in names]


def p(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


# (method, path, summary, parameters, body model, success status)
OPERATIONS: list[tuple[str, str, str, list[dict[str, Any]], type[BaseModel] | None, int]] = [
    ("get", "/health", "Liveness and readiness of this replica", [], None, 200),
    ("get", "/health/live", "Liveness: 200 while the process serves", [], None, 200),
    ("get", "/health/ready", "Readiness: 200, or 503 naming why (draining, NATS, catching up)", [], None, 200),
    ("get", "/metrics", "This replica's metrics, Prometheus text format (docs/metrics.md); a read token if auth is on",
     [], None, 200),
    ("get", "/api/ws", "WebSocket upgrade: subscribe to work, agents, targets, stats (README: WebSocket API)", [], None, 101),
    ("get", "/api/openapi.json", "This document", [], None, 200),
    ("get", "/api/docs", "Human-readable pointer to this document", [], None, 200),
    ("get", "/api/work", "List work items (priority, then age)",
     [PROJECT, MIN_SEQ, *q("status", "boundary", "classification", "capability", "assignedTo"), *PAGING], None, 200),
    ("post", "/api/work", "Submit a work item (Idempotency-Key header honoured)", [PROJECT], schemas.WorkSubmit, 201),
    ("post", "/api/work/cancel-batch", "Cancel (or reassign) many work items", [PROJECT], schemas.CancelBatch, 200),
    ("get", "/api/work/{id}", "Get a work item", [p("id"), PROJECT, MIN_SEQ], None, 200),
    ("get", "/api/work/{id}/history", "Every event of a work item, in stream order", [p("id"), PROJECT], None, 200),
    ("post", "/api/work/{id}/cancel", "Cancel a work item (idempotent; 409 if completed or failed)", [p("id"), PROJECT],
     schemas.Reason, 200),
    ("post", "/api/work/{id}/accept", "Agent accepts its assignment (REST form of work.accept)", [p("id"), PROJECT],
     protocol.RestAccept, 200),
    ("post", "/api/work/{id}/progress", "Agent reports progress", [p("id"), PROJECT], protocol.RestProgress, 200),
    ("post", "/api/work/{id}/complete", "Agent reports completion", [p("id"), PROJECT], protocol.RestComplete, 200),
    ("post", "/api/work/{id}/fail", "Agent reports a failed attempt", [p("id"), PROJECT], protocol.RestFail, 200),
    ("get", "/api/dlq", "Dead-lettered work items", [PROJECT, MIN_SEQ, *q("capability", "boundary"), *PAGING],
     None, 200),
    ("post", "/api/dlq/{id}/retry", "Put a dead-lettered item back to pending", [p("id"), PROJECT], schemas.Reason,
     200),
    ("post", "/api/dlq/{id}/discard", "Remove an item from the dead-letter queue", [p("id"), PROJECT],
     schemas.Reason, 200),
    ("get", "/api/agents", "List agents (all projects unless projectId)",
     [PROJECT, MIN_SEQ, *q("type", "status", "capability", "boundary"), *PAGING], None, 200),
    ("post", "/api/agents/shutdown-batch", "Ask many agents to stop", [PROJECT], schemas.ShutdownBatch, 200),
    ("get", "/api/agents/{guid}", "Get an agent", [p("guid"), PROJECT, MIN_SEQ], None, 200),
    ("get", "/api/agents/{guid}/history", "Every event of an agent, in stream order", [p("guid"), PROJECT], None,
     200),
    ("post", "/api/agents/{guid}/shutdown", "Ask an agent to stop", [p("guid"), PROJECT], schemas.Shutdown, 200),
    ("get", "/api/targets", "List spin-up targets",
     [PROJECT, MIN_SEQ, *q("type", "status", "capability", "boundary", "classification", "mechanism"), *PAGING],
     None, 200),
    ("post", "/api/targets", "Register a target (nested or flat config; secrets as references)", [PROJECT],
     schemas.TargetRegister, 201),
    ("post", "/api/targets/disable-batch", "Disable many targets", [PROJECT], schemas.DisableBatch, 200),
    ("get", "/api/targets/{idOrName}", "Get a target", [p("idOrName"), PROJECT, MIN_SEQ], None, 200),
    ("put", "/api/targets/{idOrName}", "Update mutable target fields", [p("idOrName"), PROJECT], None, 200),
    ("delete", "/api/targets/{idOrName}", "Remove a target", [p("idOrName"), PROJECT], None, 200),
    ("post", "/api/targets/{idOrName}/test", "Probe the target now", [p("idOrName"), PROJECT], None, 200),
    ("post", "/api/targets/{idOrName}/spin-up",
     "Request a spin-up on this target (SpinUpResult: success, triggered, status in-progress)",
     [p("idOrName"), PROJECT], schemas.SpinUpRequest, 200),
    ("post", "/api/targets/{idOrName}/enable", "Enable a target", [p("idOrName"), PROJECT], schemas.Reason, 200),
    ("post", "/api/targets/{idOrName}/disable", "Disable a target", [p("idOrName"), PROJECT], schemas.Reason, 200),
    ("get", "/api/stats", "Fleet statistics, all projects, plus the flat counts of the request's project",
     [PROJECT], None, 200),
    ("get", "/api/stats/projects", "Projects known to this replica", [PROJECT], None, 200),
    ("get", "/api/stats/projection", "This replica's fold of a project: seq and state hash", [PROJECT, MIN_SEQ],
     None, 200),
    ("get", "/api/channels", "Warp channels of a project", [PROJECT], None, 200),
    ("get", "/api/channels/{name}/messages", "Recent messages of a Warp channel (empty if not used yet)",
     [p("name"), PROJECT, *q("limit")], None, 200),
]

EXTRA: list[tuple[str, str, str, list[dict[str, Any]], type[BaseModel] | None, int]] = []


def websocket_operation() -> dict[str, Any]:
    """/api/ws as OpenAPI can say it: the upgrade, its auth, and (under `x-weft-websocket`) the
    message schemas both ways, built from the tables the server itself checks against."""
    topic = {"type": "string", "enum": list(TOPICS)}
    filters = {t: {"type": "object", "additionalProperties": False,
                   "properties": {k: {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}
                                  for k in sorted(keys)}} for t, keys in FILTER_KEYS.items()}
    client = {"oneOf": [
        {"type": "object", "required": ["type", "topic"], "properties": {
            "type": {"const": "subscribe"}, "topic": topic, "projectId": PROJECT["schema"],
            "fromSeq": {"type": "integer", "minimum": 1, "description": "replay from this stream sequence, then live"},
            "filter": {"type": "object", "description": "keys per topic: see x-filters"}}},
        {"type": "object", "required": ["type", "topic"], "properties": {"type": {"const": "unsubscribe"},
                                                                         "topic": topic}},
        {"type": "object", "required": ["type"], "properties": {"type": {"const": "ping"}}},
    ]}
    server = {"oneOf": [
        {"type": "object", "required": ["type", "topic", "event", "seq", "projectId", "timestamp", "data"],
         "properties": {"type": {"const": "event"}, "topic": topic, "event": {"type": "string", "enum": list(ALL_EVENTS)},
                        "seq": {"type": "integer"}, "projectId": {"type": "string"},
                        "timestamp": {"type": "string"}, "data": {"type": "object"}}},
        {"type": "object", "required": ["type", "timestamp"], "properties": {
            "type": {"enum": ["ack", "pong", "error", "stats"]}, "timestamp": {"type": "string"}}},
    ]}
    return {
        "description": "Upgrade to a WebSocket (README: WebSocket API). With tokens configured, authenticate with "
                       "`Authorization: Bearer`, `?token=` or the subprotocols `bearer, <token>`; 401 at the upgrade "
                       "otherwise. Close codes: 1001 replica going away, 1008 slow consumer, 1009 message too big.",
        "parameters": [{"name": "token", "in": "query", "schema": {"type": "string"},
                        "description": "bearer token, for clients that cannot set headers"}],
        "responses": {"101": {"description": "switching protocols"},
                      "400": {"description": "not a WebSocket upgrade request",
                              "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
                      "401": {"description": "missing or invalid token",
                              "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
                      "default": {"description": "error",
                                  "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}},
        "x-weft-websocket": {"client": client, "server": server, "x-filters": filters},
    }


# Error statuses every route may answer, besides its own (auth ones only with tokens configured).
COMMON_ERRORS = {"400": "invalid input (a field, projectId, min_seq, cursor...)",
                 "401": "missing or invalid token (tokens configured)",
                 "403": "the token's role or projects do not allow this",
                 "404": "no such entity", "429": "the token is over its request rate",
                 "503": "the store or the projection is unavailable now; nothing was stored, retry (Retry-After)"}
COMMAND_ERRORS = {"409": "the entity's state does not allow this command",
                  "413": "request body too large", "422": "Idempotency-Key reused with another body",
                  "504": "OutcomeUnknown: the append may or may not have landed (the body says how to look)"}
OPEN_ERRORS = {"/health": {"503": responses.HEALTH}, "/health/ready": {"503": responses.READY},
               "/health/live": {}, "/api/openapi.json": {}, "/api/docs": {}}


def error_ref(description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def responses_of(method: str, path: str) -> dict[str, Any]:
    """The documented answers of one route: its 2xx (and 304) bodies, then its error statuses."""
    out: dict[str, Any] = {}
    for status, content in responses.SUCCESS[(method, path)].items():
        out[status] = {"description": "not modified" if status == "304" else "success"}
        if content:
            out[status]["content"] = content
    if path in OPEN_ERRORS:
        for status, schema in OPEN_ERRORS[path].items():
            out[status] = {"description": "not ready", "content": responses.json_body(schema)}
        return out
    errors = dict(COMMON_ERRORS)
    if method != "get":
        errors.update(COMMAND_ERRORS)
    for status in sorted(errors):
        out[status] = error_ref(errors[status])
    return out


def request_schema(model: type[BaseModel], components: dict[str, Any]) -> dict[str, Any]:
    """The model's JSON Schema (its definitions moved to components), with its "exactly one of"
    rule (`SELECTORS`) as a oneOf, so a generated client knows it too."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, sub in schema.pop("$defs", {}).items():
        components[name] = sub
    choices = SELECTORS.get(model)
    if choices is not None:
        schema["oneOf"] = [{"required": [a], "not": {"required": [b]}} for a, b in (choices, choices[::-1])]
        for name in choices:  # null means absent to the model, but then neither is given: not documented
            schema["properties"][name] = next(
                (alt for alt in schema["properties"][name].get("anyOf", []) if alt.get("type") != "null"),
                schema["properties"][name])
    return schema


# Request models whose validator demands exactly one of two fields (weft.api.schemas).
SELECTORS: dict[type[BaseModel], tuple[str, str]] = {
    schemas.CancelBatch: ("workItemIds", "filter"),
    schemas.ShutdownBatch: ("agentGuids", "filter"),
    schemas.DisableBatch: ("targetIds", "filter"),
}


def document() -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    components: dict[str, Any] = {"Error": ERROR, **responses.COMPONENTS}
    for method, path, summary, params, model, _status in OPERATIONS + EXTRA:
        op: dict[str, Any] = {"summary": summary, "parameters": params}
        if path != "/api/ws":
            op["responses"] = responses_of(method, path)
        if path in OPEN_ERRORS:
            op["security"] = []  # open without a token (weft.api.auth.OPEN_PATHS)
        if model is not None:
            components[model.__name__] = request_schema(model, components)
            op["requestBody"] = {
                "required": model in (schemas.WorkSubmit, schemas.TargetRegister) or model in SELECTORS,
                "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}},
            }
        paths.setdefault(path, {})[method] = op
    paths["/api/ws"]["get"].update(websocket_operation())
    return {
        "openapi": "3.1.0",
        "info": {"title": "weft", "version": "0.1.0",
                 "description": "Event-sourced coordinator for fleets of AI coding agents. Every 2xx command "
                                "response carries the event's stream sequence (`seq`, `X-Weft-Seq`)."},
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
        "paths": paths,
    }


async def openapi_json(request: web.Request) -> web.Response:
    return json_response(document())


async def docs(request: web.Request) -> web.Response:
    html = ("<!doctype html><title>weft API</title><h1>weft API</h1>"
            "<p>The OpenAPI 3.1 document is at <a href='/api/openapi.json'>/api/openapi.json</a>.</p>")
    return web.Response(text=html, content_type="text/html")


def routes() -> list[web.RouteDef]:
    return [web.get("/api/openapi.json", openapi_json), web.get("/api/docs", docs)]
