"""/api/work/{id}/history and /api/agents/{guid}/history: every event of one entity, in stream order.

Each entity's events sit on a subject of their own (`weft.<project>.ev.<entity>.<id>`,
`projections.events.subject_for`), so a history is read from the stream with a consumer filtered on
that subject: no scan of the project's other events. The subject's last message (a direct get) says
where to stop, and whether there is any event at all (404 otherwise). Read from the stream, not the
projection, so a purged item (retention: it left the projection, its events stay) still has its
history. Only the project's own stream is read: which project comes from `?projectId=` (or
X-Weft-Project), else the default, as every other route.
"""

from __future__ import annotations

from typing import Any

import nats.js.errors
from aiohttp import web
from nats.js import api

from projections.events import Entity, decode, is_valid_entity_id, stream_name, subject_for
from weft.api.common import json_response, project_of, services
from weft.core.errors import NotFound
from weft.store.eventstore import EventStore

READ_TIMEOUT_S = 10.0


def present_event(ev: Any) -> dict[str, Any]:
    return {"seq": ev.seq, "time": ev.ts, "type": ev.type, "actor": ev.actor,
            "correlationId": ev.correlation_id, "data": ev.data}


async def entity_events(store: EventStore, project: str, entity: Entity, entity_id: str) -> list[dict[str, Any]]:
    """The entity's events, oldest first (empty when it has none, or the project has no stream)."""
    if not is_valid_entity_id(entity_id):
        return []
    subject = subject_for(project, entity, entity_id)
    stream = stream_name(project)
    try:
        last = (await store.js.get_last_msg(stream, subject)).seq  # NotFound: no such stream or subject
    except nats.js.errors.NotFoundError:
        return []
    if not last:
        return []
    sub = await store.js.subscribe(
        subject, stream=stream, ordered_consumer=True,
        config=api.ConsumerConfig(deliver_policy=api.DeliverPolicy.ALL),
    )
    out: list[dict[str, Any]] = []
    try:
        while True:
            msg = await sub.next_msg(timeout=READ_TIMEOUT_S)
            seq = msg.metadata.sequence.stream
            if seq > last:
                break
            try:
                out.append(present_event(decode(msg.data, seq)))
            except Exception:  # corrupt, or of a newer weft: shown as what it is, not skipped
                out.append({"seq": seq, "time": None, "type": None, "actor": None, "correlationId": None,
                            "data": None, "undecodable": True})
            if seq >= last:
                break
    finally:
        await sub.unsubscribe()
    return out


async def _history(request: web.Request, entity: Entity, entity_id: str, what: str, field: str) -> web.Response:
    project = project_of(request)
    store = services(request).readmodel.store
    events = await entity_events(store, project, entity, entity_id)
    if not events:
        raise NotFound(f"{what} {entity_id} has no events in project {project}", field=field)
    return json_response({"id": entity_id, "entity": entity, "projectId": project, "count": len(events),
                          "events": events}, seq=events[-1]["seq"])


async def work_history(request: web.Request) -> web.Response:
    return await _history(request, "work", request.match_info["id"], "work item", "id")


async def agent_history(request: web.Request) -> web.Response:
    return await _history(request, "agent", request.match_info["guid"], "agent", "guid")


def routes() -> list[web.RouteDef]:
    return [
        web.get("/api/work/{id}/history", work_history),
        web.get("/api/agents/{guid}/history", agent_history),
    ]
