"""Target decisions: register, update, remove, enable/disable, health, and the spin-ups a target runs.

Validation of a definition or an update (`weft.core.targets`) happens before these are called:
they take the validated definition or changes and check them against the state only.
"""

from __future__ import annotations

import uuid
from typing import Any

from projections.state import ProjectState, Record
from weft.core.decisions import Draft
from weft.core.errors import Conflict, NotFound
from weft.core.fleet_policy import target_load

# --- lookups -------------------------------------------------------------------------------------


def find_target(state: ProjectState, id_or_name: str) -> Record | None:
    t = state.targets.get(id_or_name)
    if t is not None:
        return t
    for candidate in state.targets.values():
        if candidate["name"] == id_or_name:
            return candidate
    return None


def resolve_target_id(state: ProjectState, id_or_name: str) -> str:
    """The id of the target a client names by id or by name."""
    t = find_target(state, id_or_name)
    if t is None:
        raise NotFound(f"target {id_or_name} not found", field="idOrName")
    return str(t["id"])


def target_of(state: ProjectState, target_id: str) -> Record:
    t = state.targets.get(target_id)
    if t is None:
        raise NotFound(f"target {target_id} not found", field="idOrName")
    return t


def target_id_for(project: str, name: str) -> str:
    """A target's id derives from its name, so two replicas registering one name contend on one
    subject and optimistic concurrency lets exactly one win: names stay unique without a lock."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"weft-target:{project}:{name}"))


def matches_target_filter(t: Record, flt: dict[str, Any]) -> bool:
    return all(not flt.get(k) or t.get(k) == flt[k] for k in ("agentType", "status", "mechanism"))


def select_targets(state: ProjectState, flt: dict[str, Any]) -> list[str]:
    return [t["id"] for t in state.targets.values() if matches_target_filter(t, flt)]


# --- the registry --------------------------------------------------------------------------------


def register_target(
    state: ProjectState, target_id: str, definition: dict[str, Any], idempotency_key: str | None = None
) -> Draft:
    if find_target(state, definition["name"]) is not None:
        raise Conflict(f"a target named {definition['name']!r} already exists", field="name")
    return Draft("target.registered", target_id, {"target": definition}, idempotency_key=idempotency_key)


def registration_differences(target: Record, definition: dict[str, Any]) -> list[str]:
    """The fields in which `definition` differs from the registration that created `target` (a
    repeat of an Idempotency-Key must be the same request). Once the target was updated its record
    no longer shows the registration, and only the name can tell two requests apart."""
    fields = sorted(definition) if target.get("updatedAt") == target.get("registeredAt") else ["name"]
    return [f for f in fields if f != "status" and target.get(f) != definition.get(f)]


def update_target(state: ProjectState, target_id: str, changes: dict[str, Any]) -> Draft | None:
    """`changes` as validated against the current target; none is a no-op."""
    target_of(state, target_id)
    if not changes:
        return None
    return Draft("target.updated", target_id, {"changes": changes})


def remove_target(state: ProjectState, target_id: str, reason: str | None = None) -> Draft:
    target_of(state, target_id)
    return Draft("target.removed", target_id, {"reason": reason})


def set_target_enabled(state: ProjectState, target_id: str, enabled: bool, reason: str | None = None) -> Draft | None:
    """Enable or disable; a no-op when the target is so already. Enabling a target its breaker
    opened (`error`) is what closes the breaker."""
    t = target_of(state, target_id)
    if enabled and t["status"] == "available":
        return None
    if not enabled and t["status"] == "disabled":
        return None
    return Draft("target.enabled" if enabled else "target.disabled", target_id, {"reason": reason})


def record_health(
    state: ProjectState, target_id: str, status: str, latency_ms: float | None, error: str | None
) -> Draft | None:
    """A probe's result, appended only when it changes something: the status, or the error of a
    target that stays unhealthy."""
    t = target_of(state, target_id)
    if t["healthStatus"] == status and (status == "healthy" or t.get("lastError") == error):
        return None
    data = {"healthStatus": status, "latencyMs": latency_ms, "error": error}
    return Draft("target.health_changed", target_id, data)


# --- spin-ups ------------------------------------------------------------------------------------


def request_spin_up(
    state: ProjectState,
    target_id: str,
    spin_up_id: str,
    work_id: str | None = None,
    reason: str = "manual",
    epoch: int | None = None,
) -> Draft:
    """A spin-up on an available target. A manual one also respects the target's agent limit (the
    scheduler's plan already does)."""
    t = target_of(state, target_id)
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
    return Draft("spinup.requested", target_id, data, epoch=epoch)


def record_spin_up(
    state: ProjectState, target_id: str, spin_up_id: str, type_: str, data: dict[str, Any], epoch: int
) -> Draft | None:
    """spinup.started / .completed / .failed for a spin-up still in flight (else a no-op); a start
    only for one not started yet."""
    t = state.targets.get(target_id)
    if t is None or spin_up_id not in t["activeSpinUps"]:
        return None
    if type_ == "spinup.started" and t["activeSpinUps"][spin_up_id]["status"] != "requested":
        return None
    return Draft(type_, target_id, {"spinUpId": spin_up_id, **data}, epoch=epoch)
