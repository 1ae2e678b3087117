"""The NATS side of the agent protocol (docs/agent-protocol.md): requests, heartbeats, pushes.

Every replica answers agent requests (queue group `weft`) and hears every heartbeat; only the
project's scheduler pushes messages to agents and turns silence into `agent.lost`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import nats.errors
import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from pydantic import BaseModel, ValidationError

from projections.events import is_valid_project_id
from projections.state import LIVE_ASSIGNMENT, ProjectState
from weft.aio import TaskSet
from weft.commands import Commands, Ctx, RetryPolicy
from weft.core import protocol
from weft.core.errors import NotFound, WeftError, invalid_field
from weft.logs import correlation_var, project_var
from weft.stamps import utc_now
from weft.store.readmodel import ReadModel

log = logging.getLogger("weft.runtime.gateway")

Handler = Callable[[str, Any], Awaitable[dict[str, Any]]]


def held_items(state: ProjectState, guid: str) -> list[dict[str, Any]]:
    agent = state.agents.get(guid)
    if agent is None:
        return []
    return [state.work[w] for w in agent["currentTasks"] if state.work[w]["status"] in LIVE_ASSIGNMENT]


def pending_shutdown(state: ProjectState, guid: str) -> dict[str, Any] | None:
    agent = state.agents.get(guid)
    return agent["shutdownRequested"] if agent else None


class Liveness:
    """Last heartbeat of each agent as seen by this replica (monotonic clock, memory only).

    It also watches this replica's own event loop: after a stall (CPU starvation, a long GC, a
    huge snapshot decode) heartbeats that arrived meanwhile are still unread, so silence measured
    then says nothing about the agents. `stalled_since(t)` lets the scheduler hold its judgement."""

    PROBE_S = 0.1

    def __init__(self, nc: NATS) -> None:
        self.nc = nc
        self.seen: dict[tuple[str, str], float] = {}
        self.wall: dict[tuple[str, str], str] = {}
        self.started = time.monotonic()
        self.last_stall = 0.0  # monotonic time at which the last loop stall ended
        self.stall_threshold_s = 0.5
        self._sub: Subscription | None = None
        self._probe: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._sub = await self.nc.subscribe("weft.*.agent.heartbeat.*", cb=self._on_heartbeat)
        self._probe = asyncio.create_task(self._watch_loop())

    async def _watch_loop(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(self.PROBE_S)
            now = time.monotonic()
            if now - last - self.PROBE_S > self.stall_threshold_s:
                self.last_stall = now
                log.warning("event loop stalled for %.2f s", now - last - self.PROBE_S)
            last = now

    def stalled_within(self, seconds: float) -> bool:
        """Did this replica's loop stall in the last `seconds`?"""
        return time.monotonic() - self.last_stall < seconds

    async def _on_heartbeat(self, msg: Msg) -> None:
        parts = msg.subject.split(".")
        self.beat(parts[1], parts[4])

    def beat(self, project: str, guid: str) -> None:
        self.seen[(project, guid)] = time.monotonic()
        self.wall[(project, guid)] = utc_now()

    def silent_for(self, project: str, guid: str) -> float:
        """Seconds since the last heartbeat (or since this replica started listening)."""
        return time.monotonic() - self.seen.get((project, guid), self.started)

    async def stop(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
        if self._sub is not None:
            with contextlib.suppress(nats.errors.Error):  # a closed connection has no interest left
                await self._sub.unsubscribe()


class AgentGateway:
    """Answers the protocol's request subjects for every project, on every replica."""

    def __init__(
        self,
        nc: NATS,
        commands: Commands,
        readmodel: ReadModel,
        liveness: Liveness,
        *,
        heartbeat_ms: int = protocol.DEFAULT_HEARTBEAT_MS,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.nc = nc
        self.commands = commands
        self.readmodel = readmodel
        self.liveness = liveness
        self.heartbeat_ms = heartbeat_ms
        self.retry = retry or RetryPolicy()
        self._subs: list[Subscription] = []
        self._tasks = TaskSet()
        self._handlers: dict[str, tuple[type[BaseModel], Handler]] = {
            "agent.register": (protocol.Register, self._register),
            "agent.sync": (protocol.AgentRef, self._sync),
            "agent.deregister": (protocol.Deregister, self._deregister),
            "work.accept": (protocol.WorkRef, self._accept),
            "work.progress": (protocol.Progress, self._progress),
            "work.complete": (protocol.Complete, self._complete),
            "work.fail": (protocol.Fail, self._fail),
        }

    async def start(self) -> None:
        for verb in protocol.VERBS:
            sub = await self.nc.subscribe(f"weft.*.{verb}", queue=protocol.QUEUE_GROUP, cb=self._dispatch)
            self._subs.append(sub)

    async def stop(self) -> None:
        for sub in self._subs:
            with contextlib.suppress(nats.errors.Error):  # a closed connection has no interest left
                await sub.unsubscribe()
        await self._tasks.wait()

    async def _dispatch(self, msg: Msg) -> None:
        # nats-py runs a subscription's callbacks one at a time: hand each request to its own task.
        self._tasks.spawn(self._handle(msg))

    async def _handle(self, msg: Msg) -> None:
        parts = msg.subject.split(".")
        project, verb = parts[1], ".".join(parts[2:4])
        reply: dict[str, Any]
        project_var.set(project)
        correlation_var.set((msg.headers or {}).get("X-Correlation-Id"))
        try:
            if not is_valid_project_id(project):
                raise WeftError("invalid project id", field="project")
            model, handler = self._handlers[verb]
            body = model.model_validate_json(msg.data or b"{}")
            reply = {"ok": True, **await handler(project, body)}
        except ValidationError as err:
            name, message = invalid_field(err)
            reply = {"ok": False, "error": "ValidationError", "message": f"{name}: {message}", "field": name}
        except WeftError as err:
            name = "ValidationError" if type(err) is WeftError else err.error
            reply = {"ok": False, "error": name, "message": err.message, "field": err.field}
        except Exception as err:
            log.exception("agent request failed", extra={"verb": verb})
            reply = {"ok": False, "error": "Unavailable", "message": f"internal error: {type(err).__name__}"}
        if msg.reply:
            await msg.respond(orjson.dumps(reply))

    def _ctx(self, project: str, guid: str) -> Ctx:
        return Ctx(project=project, actor=f"agent:{guid}", correlation_id=correlation_var.get())

    async def _register(self, project: str, body: Any) -> dict[str, Any]:
        decl = body.model_dump()
        # Registering is a sign of life, recorded before the event is appended: its fold wakes the
        # scheduler, which must not find this agent silent since the replica started.
        self.liveness.beat(project, body.guid)
        outcome = await self.commands.register_agent(self._ctx(project, body.guid), decl)
        state = self.readmodel.views[project].state
        return {
            "guid": body.guid,
            "seq": outcome.seq,
            "heartbeatIntervalMs": self.heartbeat_ms,
            "inbox": protocol.inbox_subject(project, body.guid),
            "assignments": held_items(state, body.guid),
            "shutdown": pending_shutdown(state, body.guid),
        }

    async def _sync(self, project: str, body: Any) -> dict[str, Any]:
        view = await self.readmodel.view(project)
        agent = view.state.agents.get(body.guid) if view else None
        if view is None or agent is None or agent["status"] == "offline":
            # Unknown, deregistered or declared lost: the agent must register again (same guid).
            raise NotFound(f"agent {body.guid} is not registered (or offline) in {project}", field="guid")
        self.liveness.beat(project, body.guid)
        return {"assignments": held_items(view.state, body.guid), "shutdown": pending_shutdown(view.state, body.guid)}

    async def _deregister(self, project: str, body: Any) -> dict[str, Any]:
        outcome = await self.commands.deregister_agent(self._ctx(project, body.guid), body.guid, body.reason)
        return {"seq": outcome.seq}

    async def _accept(self, project: str, body: Any) -> dict[str, Any]:
        outcome = await self.commands.accept_work(
            self._ctx(project, body.guid), body.workId, body.guid, attempt=body.attempt
        )
        return {"seq": outcome.seq}

    async def _progress(self, project: str, body: Any) -> dict[str, Any]:
        ctx = self._ctx(project, body.guid)
        outcome = await self.commands.progress_work(
            ctx, body.workId, body.guid, body.progress, body.message, attempt=body.attempt
        )
        return {"seq": outcome.seq}

    async def _complete(self, project: str, body: Any) -> dict[str, Any]:
        ctx = self._ctx(project, body.guid)
        outcome = await self.commands.complete_work(
            ctx, body.workId, body.guid, body.summary, body.output, body.artifacts, attempt=body.attempt
        )
        return {"seq": outcome.seq}

    async def _fail(self, project: str, body: Any) -> dict[str, Any]:
        ctx = self._ctx(project, body.guid)
        outcome = await self.commands.fail_work(
            ctx, body.workId, body.guid, body.message, body.code, body.recoverable, self.retry, attempt=body.attempt
        )
        item = self.readmodel.views[project].state.work[body.workId]
        retry = item["status"] == "pending"
        return {"seq": outcome.seq, "outcome": "retry" if retry else "dead-letter", "retryAt": item["retryAt"]}


WarpOffer = Callable[[str, dict[str, Any], dict[str, Any]], Awaitable[None]]


class Pusher:
    """Publishes pushes to agent inboxes (at most once; agents recover with `sync`).

    Assignments for Warp agents (`source: "warp"`) also go to `warp_offer`, which publishes them
    in Warp's own work-queue format (weft.runtime.warp_bridge) so Warp's claim tool receives them.
    """

    def __init__(self, nc: NATS, warp_offer: WarpOffer | None = None) -> None:
        self.nc = nc
        self.warp_offer = warp_offer
        self._tasks = TaskSet()

    def push_assignment(self, project: str, agent: dict[str, Any], item: dict[str, Any]) -> None:
        self.push(project, agent["guid"], {"type": "assignment", "work": item})
        if agent.get("source") == "warp" and self.warp_offer is not None:
            self._tasks.spawn(self._offer(project, agent, item))

    async def _offer(self, project: str, agent: dict[str, Any], item: dict[str, Any]) -> None:
        assert self.warp_offer is not None
        try:
            await self.warp_offer(project, agent, item)
        except Exception:
            log.exception("warp offer failed", extra={"project": project, "work_id": item["id"]})

    def push(self, project: str, guid: str, body: dict[str, Any]) -> None:
        self._tasks.spawn(self._publish(protocol.inbox_subject(project, guid), orjson.dumps(body)))

    async def _publish(self, subject: str, payload: bytes) -> None:
        try:
            await self.nc.publish(subject, payload)
        except Exception as err:  # the agent will sync; a lost push is never lost work
            log.warning("push to %s failed: %s", subject, err)
