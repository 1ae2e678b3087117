"""The per-project scheduler: runs only on the replica holding the project's lease.

Each tick asks the pure `weft.core.plan.plan` for every decision at once (assignments, withdrawn
assignments, lost agents, spin-ups, scale-downs, overdue spin-ups, probes, purges, the next
wake-up) and only carries them out: each decision maps to one `Commands` call, and the fleet's
effects (clean-ups, probes) go to the `FleetManager`. Every decision is an event carrying the
lease epoch, appended with per-entity OCC and re-validated against the newest state, so a stale
plan or a deposed leader can never assign an item twice.

The scheduler reacts to events as they are folded (no polling interval): a submit wakes it and
the matching idle agent gets its assignment within one append round trip.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from projections.events import Event
from projections.state import ProjectState
from weft.aio import cancel_and_wait, wait_event
from weft.commands import Commands, Ctx, Outcome
from weft.core import plan, retention
from weft.core.errors import Unavailable, WeftError
from weft.core.plan import Assignment, SchedulerConfig, TickPlan
from weft.core.routing import Plan, RoutingPolicy
from weft.logs import project_var
from weft.runtime.fleet_executor import FleetConfig, FleetManager
from weft.runtime.gateway import Liveness, Pusher
from weft.spinup.base import Mechanism
from weft.stamps import new_id
from weft.store.lease import TRANSIENT, LeaderElector
from weft.store.readmodel import ProjectView, ReadModel

log = logging.getLogger("weft.runtime.scheduler")

# What postpones a take-over's announcement (a store hiccup, a concurrent announcement).
_RETRYABLE: tuple[type[BaseException], ...] = (WeftError, *TRANSIENT)


__all__ = ["ProjectScheduler", "SchedulerConfig", "SchedulerHost"]  # SchedulerConfig lives in weft.core.plan


class ProjectScheduler:
    def __init__(
        self,
        view: ProjectView,
        commands: Commands,
        policy: RoutingPolicy,
        liveness: Liveness,
        pusher: Pusher,
        epoch: int,
        config: SchedulerConfig,
        fleet: FleetManager | None = None,
        lease_valid: Callable[[], bool] = lambda: True,
    ) -> None:
        self.view = view
        # Whether this replica's lease is still locally valid: checked before every decision, so a
        # holder whose renewals fail stops deciding before anyone else can take over.
        self.lease_valid = lease_valid
        self.fleet = fleet
        self.project = view.project
        self.commands = commands
        self.policy = policy
        self.liveness = liveness
        self.pusher = pusher
        self.epoch = epoch
        self.config = config
        self.wake = asyncio.Event()
        self._stopping = False
        self.last_plan: Plan | None = None  # the routing plan of the last tick
        self.last_tick: TickPlan | None = None
        self._task: asyncio.Task[None] | None = None
        self._deadline_s = config.idle_tick_s
        self.ctx = Ctx(project=self.project, actor="scheduler", fresh_answers=False)
        self._next_purge: datetime | None = None  # the first tick looks at once
        self._idle_reason: str | None = None
        self._purge_cursor = retention.Cursor()

    def start(self) -> None:
        self.view.listeners.append(self._on_event)
        self._repush_outstanding()
        if self.fleet is not None:
            self.fleet.takeover(self.view.state)
        self.wake.set()
        self._task = asyncio.create_task(self._run(), name=f"scheduler:{self.project}")
        log.info("scheduling", extra={"project": self.project, "epoch": self.epoch})

    async def stop(self) -> None:
        self._stopping = True  # ends the loop even if a cancellation were lost
        if self._on_event in self.view.listeners:
            self.view.listeners.remove(self._on_event)
        await cancel_and_wait(self._task)
        if self.fleet is not None:
            await self.fleet.stop()

    # --- pushes and wake-ups, straight from the fold ---------------------------------------------

    def _on_event(self, ev: Event, state: ProjectState) -> None:
        if ev.type == "work.assigned":
            item = state.work.get(ev.entity_id)
            agent = state.agents.get(ev.data["agentGuid"])
            if item and agent and item["status"] == "assigned" and item["assignedTo"] == agent["guid"]:
                self.pusher.push_assignment(self.project, agent, item)
        elif ev.type == "work.cancelled":
            item = state.work.get(ev.entity_id)
            if item and item["assignedTo"]:  # assignedTo survives only a live assignment's cancel
                body = {"type": "cancel", "workId": item["id"], "reason": ev.data.get("reason")}
                self.pusher.push(self.project, item["assignedTo"], body)
        elif ev.type == "agent.shutdown_requested":
            body = {"type": "shutdown", **ev.data}
            self.pusher.push(self.project, ev.entity_id, body)
        if self.fleet is not None:
            self.fleet.on_event(ev, state)
        self.wake.set()

    def _repush_outstanding(self) -> None:
        """A new leader cannot know which pushes its predecessor sent (or whether events were
        folded before this replica won the lease): push again what an agent must act on. Agents
        dedupe by work id, so a repeat is harmless; a miss would cost an accept timeout."""
        state = self.view.state
        for agent in state.agents.values():
            if agent["status"] == "offline":
                continue
            if agent["shutdownRequested"]:
                self.pusher.push(self.project, agent["guid"], {"type": "shutdown", **agent["shutdownRequested"]})
            for work_id in agent["currentTasks"]:
                item = state.work[work_id]
                if item["status"] == "assigned":
                    self.pusher.push_assignment(self.project, agent, item)

    # --- the loop ----------------------------------------------------------------------------

    async def _run(self) -> None:
        project_var.set(self.project)
        while not self._stopping:
            await wait_event(self.wake, self._deadline_s)
            if self._stopping:  # stop() ran meanwhile (mypy keeps the loop condition's narrowing)
                return  # type: ignore[unreachable]
            self.wake.clear()
            try:
                await self.tick(datetime.now(UTC))
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("scheduler tick failed", extra={"project": self.project})
                await asyncio.sleep(0.5)  # back off a failing store instead of spinning

    def deposed(self) -> str | None:
        """Why this scheduler must not decide now, or None."""
        if self.view.halted is not None:
            return "projection halted"
        if self.view.state.epoch > self.epoch:
            return f"fenced by epoch {self.view.state.epoch}"  # a newer leader announced itself
        if not self.lease_valid():
            return "lease no longer valid"
        return None

    async def tick(self, now: datetime) -> None:
        # Checked once: this tick's decisions start in this same turn of the loop. A lease that
        # lapses while they wait is fenced by the fold once the next leader has announced itself.
        why = self.deposed()
        if why is not None:
            if why != self._idle_reason:
                log.warning("not deciding: %s", why, extra={"project": self.project, "epoch": self.epoch})
            self._idle_reason = why
            return
        self._idle_reason = None
        state = self.view.state
        tick = plan.plan(
            state, now, self.config, self.policy, self._heard(state),
            fleet=self.fleet.snapshot() if self.fleet is not None else None,
            next_purge=self._next_purge, purge_cursor=self._purge_cursor,
        )
        self.last_tick, self.last_plan = tick, tick.routing
        self._next_purge, self._purge_cursor = tick.purges.next_at, tick.purges.cursor
        decisions = self._execute(state, tick, now)
        if decisions:
            results = await asyncio.gather(*decisions, return_exceptions=True)
            for r in results:
                if isinstance(r, BaseException):
                    log.warning("decision not applied: %s", r, extra={"project": self.project})
        self._deadline_s = tick.deadline_s

    def _heard(self, state: ProjectState) -> plan.Heard:
        """This replica's heartbeat memory of the project's live agents, as plain data for the plan."""
        liveness, project = self.liveness, self.project
        # Right after this replica's own loop stalled, unread heartbeats may be queued: judge later.
        judge = not liveness.stalled_within(self.config.lost_after_s("weft"))
        silent: dict[str, float] = {}
        last: dict[str, str] = {}
        for guid, agent in state.agents.items():
            if agent["status"] == "offline":
                continue
            if judge:
                silent[guid] = liveness.silent_for(project, guid)
            wall = liveness.wall.get((project, guid))
            if wall is not None:
                last[guid] = wall
        return plan.Heard(silent, last, judge)

    def _execute(self, state: ProjectState, tick: TickPlan, now: datetime) -> list[Awaitable[Outcome]]:
        """Each decision of the plan as its command (all appended concurrently), plus the fleet's effects."""
        commands, ctx, epoch = self.commands, self.ctx, self.epoch
        out: list[Awaitable[Outcome]] = [commands.mark_agent_lost(ctx, a.guid, a.last_heard, epoch) for a in tick.lost]
        for w in tick.withdrawals:
            out.append(commands.withdraw_assignment(
                ctx, w.work_id, w.reason, epoch, self.config.max_withdrawals,
                guid=w.guid, attempt=w.attempt, cause=w.cause,
            ))
        if commands.tracing.enabled:
            out += [self._traced_assign(state, a, epoch) for a in tick.assignments]
        else:  # no span: nothing to look up in the item
            out += [commands.assign_work(ctx, a.work_id, a.guid, epoch, a.accept_by) for a in tick.assignments]
        if self.fleet is not None:
            self.fleet.blocked = tick.spin_up_blocked
            for d in tick.spin_ups:
                out.append(self._request_spin_up(d.target_id, d.work_id))
            for f in tick.spin_up_failures:
                data = {"error": f.error, "durationMs": f.duration_ms}
                out.append(commands.record_spin_up(ctx, f.target_id, f.spin_up_id, "spinup.failed", data, epoch))
                self.fleet.clean_up_overdue(state, f.target_id, f.handle)
            for down in tick.scale_downs:
                out.append(commands.scale_down_idle(ctx, down.guid, epoch))
            self.fleet.probe(state, tick.probes, now)
        before = tick.purges.before
        if before is not None:
            out += [commands.purge_work(ctx, wid, before, epoch) for wid in tick.purges.work_ids]
        return out

    async def _traced_assign(self, state: ProjectState, a: Assignment, epoch: int) -> Outcome:
        """One assignment, traced as the root of its own trace (with the item's correlation id and
        the sequence of its last event, so it can be found from the submit's). `epoch` is the
        tick's, like every other decision of it."""
        item = state.work.get(a.work_id)
        with self.commands.tracing.span("assign", {
            "weft.project": self.project, "weft.work_id": a.work_id, "weft.agent_guid": a.guid, "weft.epoch": epoch,
            "weft.correlation_id": item["correlationId"] if item else None,
            "weft.work_seq": state.entity_seq.get(f"work.{a.work_id}"),
        }, root=True) as span:
            outcome = await self.commands.assign_work(self.ctx, a.work_id, a.guid, epoch, a.accept_by)
            span.set_attributes({"weft.stream_seq": outcome.seq, "weft.noop": outcome.noop})
            return outcome

    async def _request_spin_up(self, target_id: str, work_id: str) -> Outcome:
        outcome, _ = await self.commands.request_spin_up(self.ctx, target_id, work_id, "waiting work", self.epoch)
        return outcome


class SchedulerHost:
    """Runs a LeaderElector over every attached project and a ProjectScheduler for each one led."""

    def __init__(
        self,
        readmodel: ReadModel,
        commands: Commands,
        policy: RoutingPolicy,
        liveness: Liveness,
        pusher: Pusher,
        holder: str,
        config: SchedulerConfig,
        lease_ttl_s: float,
        replicas: int = 1,
        mechanisms: dict[str, Mechanism] | None = None,
        fleet_config: FleetConfig | None = None,
    ) -> None:
        self.mechanisms = mechanisms or {}
        self.fleet_config = fleet_config
        self.readmodel = readmodel
        self.commands = commands
        self.policy = policy
        self.liveness = liveness
        self.pusher = pusher
        self.config = config
        self.schedulers: dict[str, ProjectScheduler] = {}
        self._takeovers: dict[str, asyncio.Task[None]] = {}
        self._releasing = False
        self.elector = LeaderElector(
            readmodel.store.resources,
            holder,
            ttl_s=lease_ttl_s,
            on_elected=self._elected,
            on_deposed=self._deposed,
            replicas=replicas,
        )

    async def start(self) -> None:
        for project in self.readmodel.views:
            self.elector.add_project(project)
        self.readmodel.on_attach.append(lambda view: self.elector.add_project(view.project))
        await self.elector.start()

    async def _elected(self, project: str, revision: int) -> None:
        # The elector's round must not wait for the take-over (catch-up, an append): a task.
        await self._cancel_takeover(project)
        task = asyncio.create_task(self._take_over(project, revision), name=f"take-over:{project}")
        self._takeovers[project] = task

    async def _take_over(self, project: str, revision: int) -> None:
        """Catch up with the stream (so every epoch in it is seen), announce the term with
        `leader.elected`, then start deciding with the announced epoch: from the announcement on,
        the fold ignores any late decision of an older term."""
        project_var.set(project)
        old = self.schedulers.pop(project, None)
        if old is not None:
            await old.stop()

        def valid() -> bool:
            return self.elector.epoch(project) == revision

        view = self.readmodel.views[project]
        ctx = Ctx(project=project, actor="scheduler", correlation_id=new_id())
        delay = 0.2
        while valid():
            try:
                if view.halted is not None:
                    raise Unavailable(view.halted[1])
                await self.readmodel.catch_up(project, self.config.idle_tick_s)
                _, epoch = await self.commands.announce_leader(ctx, self.elector.holder, revision, valid)
                break
            except _RETRYABLE as err:
                # Once a warning, then quietly: a halted project would otherwise log every 2 s.
                level = logging.WARNING if delay == 0.2 else logging.DEBUG
                log.log(level, "could not announce leadership: %s", err, extra={"project": project})
                await asyncio.sleep(delay)  # bounded backoff; ends when the lease does
                delay = min(delay * 2, 2.0)
        else:
            return
        fleet = None
        if self.fleet_config is not None:
            fleet = FleetManager(project, self.commands, self.mechanisms, epoch, self.fleet_config)
        sched = ProjectScheduler(
            view, self.commands, self.policy, self.liveness, self.pusher, epoch, self.config, fleet, valid
        )
        self.schedulers[project] = sched
        sched.start()

    async def _cancel_takeover(self, project: str) -> None:
        task = self._takeovers.pop(project, None)
        if task is not None:
            await cancel_and_wait(task)

    async def _deposed(self, project: str) -> None:
        await self._cancel_takeover(project)
        sched = self.schedulers.pop(project, None)
        if sched is not None:
            if self._releasing:  # our own shutdown gave the lease up: nothing went wrong
                log.info("lease released", extra={"project": project})
            else:
                log.warning("lost the lease", extra={"project": project})
            await sched.stop()

    async def wait_scheduling(self, project: str, timeout: float) -> ProjectScheduler:
        """The project's scheduler once this replica leads it and has announced its term."""
        async with asyncio.timeout(timeout):
            await self.elector.wait_elected(project)
            task = self._takeovers.get(project)
            if task is not None:
                await asyncio.shield(task)
        sched = self.schedulers.get(project)
        if sched is None:
            raise LookupError(f"not scheduling {project}: deposed during the take-over")
        return sched

    def leading(self) -> dict[str, int]:
        return {p: s.epoch for p, s in self.schedulers.items()}

    async def stop(self, release: bool = True) -> list[str]:
        """Stop scheduling, then (with `release`) give every lease held here up at once: a CAS
        delete of this holder's own revision, so another replica takes the projects over now rather
        than after the TTL (their electors watch the bucket). Returns the projects released.

        The elector reports each held project deposed first (its scheduler and take-over stop),
        and only then deletes the entries: no decision of ours overlaps the successor's term."""
        self._releasing = True
        released = await self.elector.stop(release=release)
        for project in list(self._takeovers):
            await self._cancel_takeover(project)
        await asyncio.gather(*(s.stop() for s in self.schedulers.values()), return_exceptions=True)
        self.schedulers.clear()
        if released:
            log.info("leases released", extra={"projects": released})
        return released
