"""Target commands: register, update, remove, enable/disable, health, and the spin-ups a target runs."""

from __future__ import annotations

import uuid
from typing import Any

from projections.events import Event
from projections.state import ProjectState, Record
from weft.commands.core import BatchOutcome, CommandsBase, Ctx, Outcome
from weft.core import targets
from weft.core.errors import Conflict, NotFound
from weft.core.fleet_policy import target_load
from weft.stamps import new_uuid
from weft.store.readmodel import ProjectView


class TargetCommands(CommandsBase):
    async def register_target(self, ctx: Ctx, body: Any) -> Outcome:
        definition = targets.validate_new_target(body)
        # The id derives from the name, so two replicas registering one name contend on one subject
        # and optimistic concurrency lets exactly one win: names stay unique without a lock.
        target_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"weft-target:{ctx.project}:{definition['name']}"))
        view = await self.view(ctx.project, create=True)
        key, event_id, earlier = self.keyed_create(ctx, view, "target")
        if earlier is not None:
            return earlier

        def decide(state: ProjectState) -> Event:
            if find_target(state, definition["name"]) is not None:
                raise Conflict(f"a target named {definition['name']!r} already exists", field="name")
            return self.event(
                ctx,
                "target.registered",
                target_id,
                {"target": definition},
                id=event_id,
                idempotency_key=key,
            )

        return await self.execute(ctx, f"target.{target_id}", decide)

    async def update_target(self, ctx: Ctx, id_or_name: str, updates: Any) -> Outcome:
        target_id = self._target_id(await self.view(ctx.project), id_or_name)

        def decide(state: ProjectState) -> Event | None:
            current = _target(state, target_id)
            changes = targets.validate_update(current, updates)
            if not changes:
                return None
            return self.event(ctx, "target.updated", target_id, {"changes": changes})

        return await self.execute(ctx, f"target.{target_id}", decide)

    async def remove_target(self, ctx: Ctx, id_or_name: str, reason: str | None = None) -> Outcome:
        target_id = self._target_id(await self.view(ctx.project), id_or_name)

        def decide(state: ProjectState) -> Event:
            _target(state, target_id)
            return self.event(ctx, "target.removed", target_id, {"reason": reason})

        return await self.execute(ctx, f"target.{target_id}", decide)

    async def set_target_enabled(self, ctx: Ctx, id_or_name: str, enabled: bool, reason: str | None = None) -> Outcome:
        target_id = self._target_id(await self.view(ctx.project), id_or_name)

        def decide(state: ProjectState) -> Event | None:
            t = _target(state, target_id)
            if enabled and t["status"] == "available":
                return None
            if not enabled and t["status"] == "disabled":
                return None
            return self.event(ctx, "target.enabled" if enabled else "target.disabled", target_id, {"reason": reason})

        return await self.execute(ctx, f"target.{target_id}", decide)

    async def disable_batch(
        self, ctx: Ctx, ids: list[str] | None, flt: dict[str, Any] | None, reason: str | None
    ) -> BatchOutcome:
        view = await self.view(ctx.project)
        if ids is None:
            ids = [t["id"] for t in view.state.targets.values() if _matches_target_filter(t, flt or {})]
        return await self._batch(ids, lambda i: self.set_target_enabled(ctx, i, False, reason), BatchOutcome())

    async def record_health(
        self, ctx: Ctx, target_id: str, status: str, latency_ms: float | None, error: str | None
    ) -> Outcome:
        def decide(state: ProjectState) -> Event | None:
            t = _target(state, target_id)
            if t["healthStatus"] == status and (status == "healthy" or t.get("lastError") == error):
                return None
            data = {"healthStatus": status, "latencyMs": latency_ms, "error": error}
            return self.event(ctx, "target.health_changed", target_id, data)

        return await self.execute(ctx, f"target.{target_id}", decide)

    def _target_id(self, view: ProjectView, id_or_name: str) -> str:
        t = find_target(view.state, id_or_name)
        if t is None:
            raise NotFound(f"target {id_or_name} not found", field="idOrName")
        return str(t["id"])

    # --- spin-ups -------------------------------------------------------------------------------

    async def request_spin_up(
        self, ctx: Ctx, id_or_name: str, work_id: str | None = None, reason: str = "manual", epoch: int | None = None
    ) -> tuple[Outcome, str]:
        target_id = self._target_id(await self.view(ctx.project), id_or_name)
        spin_up_id = new_uuid()

        def decide(state: ProjectState) -> Event:
            t = _target(state, target_id)
            if t["status"] != "available":
                raise Conflict(f"target {t['name']} is {t['status']}", field="id")
            if reason == "manual":
                load = target_load(state, t)
                if load >= t["maxConcurrentAgents"]:
                    raise Conflict(f"target {t['name']} is at its limit of {t['maxConcurrentAgents']} agents "
                                   f"({load} running or starting); retry when one has finished", field="id")
            item = state.work.get(work_id) if work_id else None
            data = {
                "spinUpId": spin_up_id,
                "workId": work_id,
                "capability": item["capability"] if item else None,
                "boundary": item["boundary"] if item else None,
                "reason": reason,
            }
            return self.event(ctx, "spinup.requested", target_id, data, epoch=epoch)

        return await self.execute(ctx, f"target.{target_id}", decide), spin_up_id

    async def record_spin_up(
        self, ctx: Ctx, target_id: str, spin_up_id: str, type_: str, data: dict[str, Any], epoch: int
    ) -> Outcome:
        """spinup.started / .completed / .failed for a spin-up still in flight (else a no-op)."""

        def decide(state: ProjectState) -> Event | None:
            t = state.targets.get(target_id)
            if t is None or spin_up_id not in t["activeSpinUps"]:
                return None
            if type_ == "spinup.started" and t["activeSpinUps"][spin_up_id]["status"] != "requested":
                return None
            return self.event(ctx, type_, target_id, {"spinUpId": spin_up_id, **data}, epoch=epoch)

        return await self.execute(ctx, f"target.{target_id}", decide)


# --- pure helpers ---------------------------------------------------------------------------------

def _target(state: ProjectState, target_id: str) -> Record:
    t = state.targets.get(target_id)
    if t is None:
        raise NotFound(f"target {target_id} not found", field="idOrName")
    return t


def find_target(state: ProjectState, id_or_name: str) -> Record | None:
    t = state.targets.get(id_or_name)
    if t is not None:
        return t
    for candidate in state.targets.values():
        if candidate["name"] == id_or_name:
            return candidate
    return None


def _matches_target_filter(t: Record, flt: dict[str, Any]) -> bool:
    return all(not flt.get(k) or t.get(k) == flt[k] for k in ("agentType", "status", "mechanism"))
