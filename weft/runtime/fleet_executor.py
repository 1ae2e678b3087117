"""The fleet's hands, on the project's leader: launch, watch, complete, clean up, probe.

Decisions come from the pure `weft.core.plan` (with `weft.core.fleet_policy`): the scheduler appends
them and hands the effects here (`clean_up_overdue`, `probe`); this module does the I/O and records
each outcome as an event. What it keeps in memory (launches and probes running, when it last
probed) goes into each tick's plan as a `FleetSnapshot`.

A spin-up succeeds only when an agent registers with its id (`spinup.completed`); a launch that
returns but produces no agent within the target's timeout fails (`spinup.failed`) and whatever
it started is stopped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from projections.events import Event, parse_ts
from projections.state import ProjectState
from weft.aio import TaskSet
from weft.commands import Commands, Ctx
from weft.core import fleet_policy
from weft.core.fleet_policy import FleetSnapshot
from weft.runtime.probes import probe_target
from weft.spinup.base import Mechanism, SpinUpError, SpinUpRequest
from weft.tracing import Span, failed

log = logging.getLogger("weft.runtime.fleet_executor")


@dataclass(frozen=True)
class FleetConfig:
    agent_nats_url: str
    agent_nats_env: Mapping[str, str] = field(default_factory=dict)  # NatsAuth.agent_env(): the agents' own credentials
    idle_timeout_ms: int = 300_000
    max_crashes: int = fleet_policy.DEFAULT_MAX_CRASHES
    health_checks: bool = True


class FleetManager:
    def __init__(
        self,
        project: str,
        commands: Commands,
        mechanisms: dict[str, Mechanism],
        epoch: int,
        config: FleetConfig,
    ) -> None:
        self.project = project
        self.commands = commands
        self.mechanisms = mechanisms
        self.epoch = epoch
        self.config = config
        self.ctx = Ctx(project=project, actor="scheduler", fresh_answers=False)
        # spin-up id -> its launch task, while launching: completion waits for it, because a fast
        # agent can register before launch() returns, and its handle must be recorded first.
        self._launching: dict[str, asyncio.Task[None]] = {}
        self._probing: set[str] = set()
        # When each target was last probed by this leader: probes are frequent, only changes are events.
        self._probed_at: dict[str, datetime] = {}
        self._tasks = TaskSet()
        # Why waiting items got no spin-up in the last tick's plan (set by the scheduler).
        self.blocked: dict[str, str] = {}

    def snapshot(self) -> FleetSnapshot:
        """What the pure plan needs of this manager: the rules and what runs here now."""
        return FleetSnapshot(
            idle_timeout_ms=self.config.idle_timeout_ms,
            max_crashes=self.config.max_crashes,
            health_checks=self.config.health_checks,
            launching=frozenset(self._launching),
            probing=frozenset(self._probing),
            probed_at=dict(self._probed_at),
            mechanisms=frozenset(self.mechanisms),
        )

    # --- reacting to folded events -------------------------------------------------------------

    def takeover(self, state: ProjectState) -> None:
        """A new leader launches what was requested but never started (its predecessor may have
        died in between; a rare duplicate agent just idles away)."""
        for t in state.targets.values():
            for op in t["activeSpinUps"].values():
                if op["status"] == "requested":
                    self._launch(state, t["id"], op["spinUpId"])

    def on_event(self, ev: Event, state: ProjectState) -> None:
        if ev.type == "spinup.requested":
            self._launch(state, ev.entity_id, ev.data["spinUpId"])
        elif ev.type == "agent.registered" and ev.data.get("spinUpId"):
            self._complete(state, ev)
        elif ev.type in ("agent.deregistered", "agent.lost"):
            agent = state.agents.get(ev.entity_id)
            if agent and agent.get("launch"):
                self._tasks.spawn(self._clean_up(state, agent["launch"], graceful=ev.type == "agent.deregistered"))

    def _launch(self, state: ProjectState, target_id: str, spin_up_id: str) -> None:
        if spin_up_id in self._launching:
            return
        t = state.targets.get(target_id)
        if t is None or spin_up_id not in t["activeSpinUps"]:
            return
        op = t["activeSpinUps"][spin_up_id]
        work = state.work.get(op["workId"]) if op.get("workId") else None
        req = SpinUpRequest(spin_up_id, self.project, dict(t), dict(work) if work else None, self.config.agent_nats_url,
                           self.config.agent_nats_env)
        self._launching[spin_up_id] = self._tasks.spawn(self._run_launch(req, op["requestedAt"]))

    async def _run_launch(self, req: SpinUpRequest, requested_at: str) -> None:
        """Launch, and record `spinup.started` or `spinup.failed`. However it ends (a mechanism's
        bug, a record that could not be appended, cancellation), the spin-up stops counting as
        launching: if no outcome was recorded, the plan fails it once it is overdue, so it
        cannot hold its target's slot forever."""
        t = req.target
        started = time.perf_counter()
        mechanism = self.mechanisms.get(t["mechanism"])
        with self.commands.tracing.span("spinup", {
            "weft.project": self.project, "weft.spin_up_id": req.spin_up_id, "weft.target_id": t["id"],
            "weft.target": t["name"], "weft.mechanism": t["mechanism"],
            "weft.work_id": req.work["id"] if req.work else None,
            "weft.correlation_id": req.work.get("correlationId") if req.work else None,
        }, root=True) as span:
            try:
                try:
                    if mechanism is None:
                        raise SpinUpError(f"mechanism {t['mechanism']} is not available in this weft")
                    # Again at launch: the policy may have been tightened since the target was registered.
                    denied = self.commands.spinup_policy.current().problem(self.project, t)
                    if denied is not None:
                        raise SpinUpError(f"denied: {denied[1]}")
                    launched = await asyncio.wait_for(mechanism.launch(req), t["spinUpTimeoutMs"] / 1000)
                except (SpinUpError, TimeoutError, OSError) as err:
                    await self._launch_failed(req, str(err) or type(err).__name__, started, span)
                    return
                except Exception as err:  # a mechanism's bug is still a failed spin-up, not a stuck one
                    log.exception("spin-up raised", extra={"project": self.project, "target": t["name"]})
                    await self._launch_failed(req, f"{type(err).__name__}: {err}", started, span)
                    return
                log.info("agent launched",
                         extra={"project": self.project, "target": t["name"], "spin_up_id": req.spin_up_id})
                span.set_attribute("weft.outcome", "started")
                await self._record(t["id"], req.spin_up_id, "spinup.started", {"mechanismResult": launched.handle})
            finally:
                self._launching.pop(req.spin_up_id, None)

    async def _launch_failed(self, req: SpinUpRequest, reason: str, started: float, span: Span) -> None:
        t = req.target
        log.warning("spin-up failed: %s", reason, extra={"project": self.project, "target": t["name"]})
        span.set_attribute("weft.outcome", "failed")
        failed(span, reason)
        data = {"error": reason, "durationMs": round((time.perf_counter() - started) * 1000, 3)}
        await self._record(t["id"], req.spin_up_id, "spinup.failed", data)

    def _complete(self, state: ProjectState, ev: Event) -> None:
        spin_up_id = ev.data["spinUpId"]
        for t in state.targets.values():
            op = t["activeSpinUps"].get(spin_up_id)
            if op is not None:
                took = (parse_ts(ev.ts) - parse_ts(op["requestedAt"])).total_seconds() * 1000
                data = {"agentGuid": ev.entity_id, "durationMs": round(took, 3)}
                self._tasks.spawn(self._record_completion(t["id"], spin_up_id, data))
                return

    async def _record_completion(self, target_id: str, spin_up_id: str, data: dict[str, Any]) -> None:
        launching = self._launching.get(spin_up_id)
        if launching is not None:
            await asyncio.wait({launching})  # its spinup.started (with the handle) goes first
        await self._record(target_id, spin_up_id, "spinup.completed", data)

    async def _record(self, target_id: str, spin_up_id: str, type_: str, data: dict[str, Any]) -> None:
        try:
            await self.commands.record_spin_up(self.ctx, target_id, spin_up_id, type_, data, self.epoch)
        except Exception:
            log.exception("could not record %s", type_, extra={"project": self.project, "spin_up_id": spin_up_id})

    async def _clean_up(self, state: ProjectState, launch: dict[str, Any], graceful: bool) -> None:
        t = state.targets.get(launch["targetId"])
        mechanism = self.mechanisms.get(t["mechanism"]) if t else None
        if t is None or mechanism is None or not launch.get("handle"):
            return
        try:
            await mechanism.stop(dict(t), launch["handle"], graceful)
        except Exception as err:
            log.warning("clean-up after agent failed: %s", err, extra={"project": self.project, "target": t["name"]})

    # --- effects of each scheduler tick's plan ----------------------------------------------------

    def clean_up_overdue(self, state: ProjectState, target_id: str, handle: Any) -> None:
        """Stop what the launch of an overdue spin-up started (its failure is being recorded)."""
        if handle:
            self._tasks.spawn(self._clean_up(state, {"targetId": target_id, "handle": handle}, graceful=False))

    def probe(self, state: ProjectState, target_ids: Iterable[str], now: datetime) -> None:
        """Start the health probes the plan found due."""
        for target_id in target_ids:
            t = state.targets.get(target_id)
            if t is None or target_id in self._probing:
                continue
            self._probing.add(target_id)
            self._probed_at[target_id] = now
            self._tasks.spawn(self._probe(dict(t)))

    async def _probe(self, t: dict[str, Any]) -> None:
        try:
            result = await probe_target(t, self.mechanisms, self.project, self.commands.spinup_policy.current())
            status, latency, error = result.status, result.latency_ms, result.error
        except Exception as err:
            status, latency, error = "unhealthy", None, f"health check failed: {err}"
        try:
            await self.commands.record_health(self.ctx, t["id"], status, latency, error)
        except Exception:
            log.exception("could not record health", extra={"project": self.project, "target": t["name"]})
        finally:
            self._probing.discard(t["id"])

    async def stop(self) -> None:
        await self._tasks.cancel()
