"""Target commands: register, update, remove, enable/disable, health, and the spin-ups a target runs.

The decisions are `weft.core.decisions.targets`; a definition or an update is validated here
(`weft.core.targets`) before its decision sees it.
"""

from __future__ import annotations

from typing import Any

from projections.events import Event
from projections.state import ProjectState
from weft.commands.core import BatchOutcome, CommandsBase, Ctx, Outcome
from weft.core import targets
from weft.core.decisions import targets as decisions
from weft.core.decisions.targets import find_target
from weft.core.errors import IdempotencyKeyReused
from weft.spinup import SCHEMAS
from weft.stamps import new_uuid
from weft.store.readmodel import ProjectView

__all__ = ["TargetCommands", "find_target"]


class TargetCommands(CommandsBase):
    async def register_target(self, ctx: Ctx, body: Any) -> Outcome:
        definition = targets.validate_new_target(body, SCHEMAS)
        self.spinup_policy.current().check(ctx.project, definition)
        # The id derives from the name, so two replicas registering one name contend on one subject
        # and optimistic concurrency lets exactly one win: names stay unique without a lock.
        target_id = decisions.target_id_for(ctx.project, definition["name"])
        view = await self.view(ctx.project, create=True)
        key, event_id, earlier = self.keyed_create(ctx, view, "target")
        if earlier is None:

            def decide(state: ProjectState) -> Event | None:
                return self.emit(ctx, decisions.register_target(state, target_id, definition, key), event_id)

            outcome = await self.execute(ctx, f"target.{target_id}", decide)
            if not key or outcome.created:
                return outcome
            # The first request with this key won inside the server's dedupe window.
            self._check_same_registration(ctx, view.state, outcome.entity_id, definition)
            return outcome
        self._check_same_registration(ctx, view.state, earlier.entity_id, definition)
        return earlier

    @staticmethod
    def _check_same_registration(ctx: Ctx, state: ProjectState, target_id: str, definition: dict[str, Any]) -> None:
        target = state.targets.get(target_id)
        differs = decisions.registration_differences(target, definition) if target is not None else []
        if differs:
            raise IdempotencyKeyReused.of(ctx.idempotency_key, "target", "targetId", target_id, differs)

    async def update_target(self, ctx: Ctx, id_or_name: str, updates: Any) -> Outcome:
        target_id = self._target_id(await self.view(ctx.project), id_or_name)

        def decide(state: ProjectState) -> Event | None:
            current = decisions.target_of(state, target_id)
            changes = targets.validate_update(current, updates, SCHEMAS)
            self.spinup_policy.current().check(ctx.project, {**current, **changes})
            return self.emit(ctx, decisions.update_target(state, target_id, changes))

        return await self.execute(ctx, f"target.{target_id}", decide)

    async def remove_target(self, ctx: Ctx, id_or_name: str, reason: str | None = None) -> Outcome:
        target_id = self._target_id(await self.view(ctx.project), id_or_name)

        def decide(state: ProjectState) -> Event | None:
            return self.emit(ctx, decisions.remove_target(state, target_id, reason))

        return await self.execute(ctx, f"target.{target_id}", decide)

    async def set_target_enabled(self, ctx: Ctx, id_or_name: str, enabled: bool, reason: str | None = None) -> Outcome:
        target_id = self._target_id(await self.view(ctx.project), id_or_name)

        def decide(state: ProjectState) -> Event | None:
            return self.emit(ctx, decisions.set_target_enabled(state, target_id, enabled, reason))

        return await self.execute(ctx, f"target.{target_id}", decide)

    async def disable_batch(
        self, ctx: Ctx, ids: list[str] | None, flt: dict[str, Any] | None, reason: str | None
    ) -> BatchOutcome:
        view = await self.view(ctx.project)
        if ids is None:
            ids = decisions.select_targets(view.state, flt or {})
        return await self._batch(ids, lambda i: self.set_target_enabled(ctx, i, False, reason), BatchOutcome())

    async def record_health(
        self, ctx: Ctx, target_id: str, status: str, latency_ms: float | None, error: str | None
    ) -> Outcome:
        def decide(state: ProjectState) -> Event | None:
            return self.emit(ctx, decisions.record_health(state, target_id, status, latency_ms, error))

        return await self.execute(ctx, f"target.{target_id}", decide)

    def _target_id(self, view: ProjectView, id_or_name: str) -> str:
        return decisions.resolve_target_id(view.state, id_or_name)

    # --- spin-ups -------------------------------------------------------------------------------

    async def request_spin_up(
        self, ctx: Ctx, id_or_name: str, work_id: str | None = None, reason: str = "manual", epoch: int | None = None
    ) -> tuple[Outcome, str]:
        target_id = self._target_id(await self.view(ctx.project), id_or_name)
        spin_up_id = new_uuid()

        def decide(state: ProjectState) -> Event | None:
            draft = decisions.request_spin_up(state, target_id, spin_up_id, work_id, reason, epoch)
            return self.emit(ctx, draft)

        return await self.execute(ctx, f"target.{target_id}", decide), spin_up_id

    async def record_spin_up(
        self, ctx: Ctx, target_id: str, spin_up_id: str, type_: str, data: dict[str, Any], epoch: int
    ) -> Outcome:
        """spinup.started / .completed / .failed for a spin-up still in flight (else a no-op)."""

        def decide(state: ProjectState) -> Event | None:
            return self.emit(ctx, decisions.record_spin_up(state, target_id, spin_up_id, type_, data, epoch))

        return await self.execute(ctx, f"target.{target_id}", decide)
