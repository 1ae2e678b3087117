"""Agent commands: register, deregister, mark lost, and shutdown requests (single, batch, idle scale-down).

The decisions are `weft.core.decisions.agents`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from projections.events import Event
from projections.state import ProjectState
from weft.commands.core import BatchOutcome, CommandsBase, Ctx, Outcome
from weft.core.decisions import agents as decisions
from weft.stamps import new_id


class AgentCommands(CommandsBase):
    async def register_agent(self, ctx: Ctx, decl: dict[str, Any], event_id: str | None = None) -> Outcome:
        """`event_id` makes a registration idempotent across replicas (e.g. the Warp bridge derives it
        from the KV revision, so every replica that sees the entry appends the same event once)."""
        draft = decisions.register_agent(decl)
        ev_id = event_id or new_id()
        await self.view(ctx.project, create=True)  # an agent joining is what creates a project
        return await self.execute(ctx, f"agent.{draft.entity_id}", lambda s: self.emit(ctx, draft, ev_id))

    async def deregister_agent(self, ctx: Ctx, guid: str, reason: str | None) -> Outcome:
        def decide(state: ProjectState) -> Event | None:
            return self.emit(ctx, decisions.deregister_agent(state, guid, reason))

        return await self.execute(ctx, f"agent.{guid}", decide)

    async def mark_agent_lost(self, ctx: Ctx, guid: str, last_heartbeat: str | None, epoch: int) -> Outcome:
        def decide(state: ProjectState) -> Event | None:
            return self.emit(ctx, decisions.mark_agent_lost(state, guid, last_heartbeat, epoch))

        return await self.execute(ctx, f"agent.{guid}", decide)

    async def request_shutdown(
        self, ctx: Ctx, guid: str, graceful: bool, reason: str, grace_period_ms: int | None
    ) -> Outcome:
        def decide(state: ProjectState) -> Event | None:
            return self.emit(ctx, decisions.request_shutdown(state, guid, graceful, reason, grace_period_ms))

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
            guids = decisions.select_agents(view.state, flt or {}, now or datetime.now(UTC))
        return await self._batch(
            guids, lambda g: self.request_shutdown(ctx, g, graceful, reason, grace_period_ms), BatchOutcome()
        )

    async def scale_down_idle(self, ctx: Ctx, guid: str, epoch: int) -> Outcome:
        """Ask an idle agent to stop, re-checking on the newest state that it still holds nothing."""

        def decide(state: ProjectState) -> Event | None:
            return self.emit(ctx, decisions.scale_down_idle(state, guid, epoch))

        return await self.execute(ctx, f"agent.{guid}", decide)
