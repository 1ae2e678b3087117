"""Agent commands: register, deregister, mark lost, and shutdown requests (single, batch, idle scale-down)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from projections.events import Event, parse_ts
from projections.state import ProjectState, Record
from weft.commands.core import BatchOutcome, CommandsBase, Ctx, Outcome
from weft.core.errors import Conflict, NotFound
from weft.stamps import new_id


class AgentCommands(CommandsBase):
    async def register_agent(self, ctx: Ctx, decl: dict[str, Any], event_id: str | None = None) -> Outcome:
        """`event_id` makes a registration idempotent across replicas (e.g. the Warp bridge derives it
        from the KV revision, so every replica that sees the entry appends the same event once)."""
        guid = decl["guid"]
        data = {
            "guid": guid,
            "handle": decl.get("handle"),
            "agentType": decl["agentType"],
            "capabilities": list(decl["capabilities"]),
            "boundaries": list(decl["boundaries"]),
            "maxConcurrentTasks": decl.get("maxConcurrentTasks", 1),
            "hostname": decl.get("hostname"),
            "username": decl.get("username"),
            "visibility": decl.get("visibility", "project-only"),
            "labels": dict(decl.get("labels") or {}),
            "source": decl.get("source", "weft"),
            "spinUpId": decl.get("spinUpId"),
            "targetId": decl.get("targetId"),
            "spindownAfterIdleMs": decl.get("spindownAfterIdleMs"),
        }
        ev_id = event_id or new_id()
        await self.view(ctx.project, create=True)  # an agent joining is what creates a project
        return await self.execute(
            ctx, f"agent.{guid}", lambda s: self.event(ctx, "agent.registered", guid, data, id=ev_id)
        )

    async def deregister_agent(self, ctx: Ctx, guid: str, reason: str | None) -> Outcome:
        def decide(state: ProjectState) -> Event | None:
            agent = state.agents.get(guid)
            if agent is None:
                raise NotFound(f"agent {guid} not found", field="guid")
            if agent["status"] == "offline":
                return None
            return self.event(ctx, "agent.deregistered", guid, {"reason": reason})

        return await self.execute(ctx, f"agent.{guid}", decide)

    async def mark_agent_lost(self, ctx: Ctx, guid: str, last_heartbeat: str | None, epoch: int) -> Outcome:
        def decide(state: ProjectState) -> Event | None:
            agent = state.agents.get(guid)
            if agent is None or agent["status"] == "offline":
                return None
            return self.event(ctx, "agent.lost", guid, {"lastHeartbeat": last_heartbeat}, epoch=epoch)

        return await self.execute(ctx, f"agent.{guid}", decide)

    async def request_shutdown(
        self, ctx: Ctx, guid: str, graceful: bool, reason: str, grace_period_ms: int | None
    ) -> Outcome:
        def decide(state: ProjectState) -> Event:
            agent = state.agents.get(guid)
            if agent is None:
                raise NotFound(f"agent {guid} not found", field="guid")
            if agent["status"] == "offline":
                raise Conflict(f"agent {guid} is offline", field="guid")
            data = {"graceful": graceful, "reason": reason, "gracePeriodMs": grace_period_ms}
            return self.event(ctx, "agent.shutdown_requested", guid, data)

        return await self.execute(ctx, f"agent.{guid}", decide)

    async def shutdown_batch(
        self,
        ctx: Ctx,
        guids: list[str] | None,
        flt: dict[str, Any] | None,
        graceful: bool,
        reason: str,
        grace_period_ms: int | None,
        now: datetime | None = None,
    ) -> BatchOutcome:
        view = await self.view(ctx.project)
        if guids is None:
            at = now or datetime.now(UTC)
            guids = [a["guid"] for a in view.state.agents.values() if _matches_agent_filter(a, flt or {}, at)]
        return await self._batch(
            guids, lambda g: self.request_shutdown(ctx, g, graceful, reason, grace_period_ms), BatchOutcome()
        )

    async def scale_down_idle(self, ctx: Ctx, guid: str, epoch: int) -> Outcome:
        """Ask an idle agent to stop, re-checking on the newest state that it still holds nothing."""

        def decide(state: ProjectState) -> Event | None:
            agent = state.agents.get(guid)
            if agent is None or agent["status"] == "offline" or agent["currentTaskCount"] or agent["shutdownRequested"]:
                return None
            data = {"graceful": True, "reason": "idle-timeout", "gracePeriodMs": None}
            return self.event(ctx, "agent.shutdown_requested", guid, data, epoch=epoch)

        return await self.execute(ctx, f"agent.{guid}", decide)


# --- pure helpers ---------------------------------------------------------------------------------

def _matches_agent_filter(a: Record, flt: dict[str, Any], now: datetime) -> bool:
    if flt.get("status") and a["status"] != flt["status"]:
        return False
    if flt.get("agentType") and a["agentType"] != flt["agentType"]:
        return False
    if flt.get("capability") and flt["capability"] not in a["capabilities"]:
        return False
    if flt.get("boundary") and flt["boundary"] not in a["boundaries"]:
        return False
    idle = flt.get("idleTimeMs")
    if idle is not None:
        if a["currentTaskCount"] > 0:
            return False
        idle_for = (now - parse_ts(a["lastActivity"])).total_seconds() * 1000
        if idle_for < idle:
            return False
    return True
