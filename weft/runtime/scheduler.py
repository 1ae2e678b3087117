"""The per-project scheduler: runs only on the replica holding the project's lease.

It turns state into decisions: assignments (routing.plan_assignments), withdrawn assignments
(agent lost or offline, not accepted in time), lost agents (no heartbeat for 3 intervals). Every
decision is an event carrying the lease epoch, appended with per-entity OCC and re-validated
against the newest state, so a stale plan or a deposed leader can never assign an item twice.

The scheduler reacts to events as they are folded (no polling interval): a submit wakes it and
the matching idle agent gets its assignment within one append round trip.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from projections.events import Event, format_ts, parse_ts
from projections.state import ProjectState, Record
from projections.work import ACCEPT_TIMEOUT
from weft.aio import cancel_and_wait, wait_event
from weft.commands import Commands, Ctx, Outcome
from weft.core import fleet_policy, retention
from weft.core.errors import Unavailable, WeftError
from weft.core.routing import Plan, RoutingPolicy, plan_assignments
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


@dataclass(frozen=True)
class SchedulerConfig:
    heartbeat_ms: int = 10_000
    lost_after_heartbeats: int = 3
    accept_timeout_ms: int = 30_000
    # An item whose assignments keep being withdrawn (agents dying under it, accept timeouts) is
    # dead-lettered once it used its own `maxAttempts`, or this many attempts if that is lower.
    max_withdrawals: int = 10
    # Warp agents heartbeat into their KV entry every 60 s; Warp's own GC calls 3 minutes silence offline.
    warp_lost_after_s: float = 180.0
    idle_tick_s: float = 5.0
    # Finished items leave the projection this long after their last change (0: kept forever);
    # the scheduler looks for them every `purge_every_s`, at most `purge_batch` at a time.
    retain_done_s: float = 0.0
    purge_every_s: float = 60.0
    purge_batch: int = 500


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
        self.last_plan: Plan | None = None
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
        decisions: list[Awaitable[Outcome]] = []
        lost_after = {
            "weft": self.config.heartbeat_ms * self.config.lost_after_heartbeats / 1000,
            "warp": self.config.warp_lost_after_s,
        }
        accept_deadline: datetime | None = None
        # Right after this replica's own loop stalled, unread heartbeats may be queued: judge later.
        may_judge = not self.liveness.stalled_within(lost_after["weft"])
        # Agents that let an assignment time out get no work (routing) until they show life:
        # `heard_from` those marked so that this replica heard since; `timed_out` those about to be.
        heard_from: set[str] = set()
        timed_out: set[str] = set()
        for agent in list(state.agents.values()):
            guid = agent["guid"]
            offline = agent["status"] == "offline"
            silence = lost_after.get(agent["source"], lost_after["weft"])
            if not offline and may_judge and self._silent_for(agent, now) > silence:
                last = self.liveness.wall.get((self.project, guid))
                decisions.append(self.commands.mark_agent_lost(self.ctx, guid, last, self.epoch))
                continue  # its work is withdrawn once the loss is folded (next tick)
            if not offline and agent.get("unresponsiveSince") and self._heard_since(guid, agent["unresponsiveSince"]):
                heard_from.add(guid)
            for work_id in list(agent["currentTasks"]):
                item = state.work[work_id]
                if offline:
                    reason = f"agent {guid} {agent['offlineReason'] or 'offline'}"
                    decisions.append(self._withdraw(item, reason, "agent-offline"))
                elif item["status"] == "assigned" and item["acceptBy"]:
                    accept_by = parse_ts(item["acceptBy"])
                    if accept_by <= now:
                        timed_out.add(guid)
                        decisions.append(self._withdraw(item, f"not accepted by {guid} in time", ACCEPT_TIMEOUT))
                    elif accept_deadline is None or accept_by < accept_deadline:
                        accept_deadline = accept_by
        if self._worth_planning(state, now):
            plan = plan_assignments(
                state, self.policy, now, self.spinning_up(state), heard_from=heard_from, timed_out=timed_out
            )
        else:
            plan = Plan()  # nobody could take anything: an O(pending) plan would change nothing
        self.last_plan = plan
        accept_by_ts = format_ts(now + timedelta(milliseconds=self.config.accept_timeout_ms))
        for work_id, guid in plan.assignments:
            decisions.append(self.commands.assign_work(self.ctx, work_id, guid, self.epoch, accept_by_ts))
        if self.fleet is not None:
            decisions += self.fleet.decisions(state, plan, now, {guid for _, guid in plan.assignments})
        decisions += self._purges(state, now)
        if decisions:
            results = await asyncio.gather(*decisions, return_exceptions=True)
            for r in results:
                if isinstance(r, BaseException):
                    log.warning("decision not applied: %s", r, extra={"project": self.project})
        self._deadline_s = self._next_deadline(state, now, accept_deadline)

    def _purges(self, state: ProjectState, now: datetime) -> list[Awaitable[Outcome]]:
        cfg = self.config
        if cfg.retain_done_s <= 0 or (self._next_purge is not None and now < self._next_purge):
            return []
        before = retention.cutoff(now, cfg.retain_done_s)
        due = retention.due_for_purge(state, before, cfg.purge_batch, self._purge_cursor)
        # Found some: more may be due further on, so look again soon (not at once: if the purges
        # cannot be appended, NATS down say, the next pass must not spin).
        every = min(cfg.purge_every_s, cfg.retain_done_s / 2)  # a short retention is checked as often
        self._next_purge = now + timedelta(seconds=min(1.0, every) if due else every)
        return [self.commands.purge_work(self.ctx, wid, before, self.epoch) for wid in due]

    def _silent_for(self, agent: Record, now: datetime) -> float:
        """Seconds without a sign of life from the agent itself: since the last heartbeat this
        replica heard, but never longer than since the last event the agent itself caused
        (`lastSeen`: its registration, an accept, progress, a result), so an agent that joined a
        long-running replica a moment ago is not 'silent since the replica started'. What weft
        says about the agent (an assignment, a withdrawal) is no sign of life: a dead agent that
        keeps being offered work must still fall silent."""
        heard = self.liveness.silent_for(self.project, agent["guid"])
        # A record folded before `lastSeen` existed: its registration is the last word known of it.
        seen = agent.get("lastSeen") or agent["registeredAt"]
        active = (now - parse_ts(seen)).total_seconds()
        return min(heard, max(0.0, active))

    def _heard_since(self, guid: str, ts: str) -> bool:
        """Did this replica hear the agent (a heartbeat, a registration, a sync) after `ts`?"""
        last = self.liveness.wall.get((self.project, guid))
        return last is not None and parse_ts(last) > parse_ts(ts)

    def _worth_planning(self, state: ProjectState, now: datetime) -> bool:
        if state.work_counts["pending"] == 0:
            return False
        for a in state.agents.values():
            if a["status"] != "offline" and not a["shutdownRequested"] and a["currentTaskCount"] < a["maxConcurrentTasks"]:
                return True
        return self.fleet is not None and fleet_policy.any_target_can_launch(state, now, self.fleet.config.max_crashes)

    def _withdraw(self, item: Record, reason: str, cause: str) -> Awaitable[Outcome]:
        return self.commands.withdraw_assignment(
            self.ctx, item["id"], reason, self.epoch, self.config.max_withdrawals,
            guid=item["assignedTo"], attempt=item["attempts"], cause=cause,
        )

    def _next_deadline(self, state: ProjectState, now: datetime, accept_deadline: datetime | None) -> float:
        """Seconds until something time-based is due: a retry backoff, an accept timeout, a heartbeat."""
        due = [self.config.idle_tick_s, self.config.heartbeat_ms / 1000]
        if self.config.retain_done_s > 0 and self._next_purge is not None:
            due.append((self._next_purge - now).total_seconds())
        if self.fleet is not None:
            fleet_due = self.fleet.next_deadline(state, now)
            if fleet_due is not None:
                due.append(fleet_due)
        if accept_deadline is not None:
            due.append((accept_deadline - now).total_seconds())
        if self.last_plan is not None:
            for work_id, code in self.last_plan.codes.items():
                if code == "backoff":
                    retry_at = state.work[work_id]["retryAt"]
                    if retry_at:
                        due.append((parse_ts(retry_at) - now).total_seconds())
        return max(0.005, min(due))

    @staticmethod
    def spinning_up(state: ProjectState) -> set[str]:
        return {
            op["workId"] for t in state.targets.values() for op in t["activeSpinUps"].values() if op.get("workId")
        }


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
            readmodel.store.js,
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
            fleet = FleetManager(project, self.commands, self.mechanisms, self.policy, epoch, self.fleet_config)
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

    async def stop(self) -> None:
        self._releasing = True
        await self.elector.stop(release=True)
        for project in list(self._takeovers):
            await self._cancel_takeover(project)
        await asyncio.gather(*(s.stop() for s in self.schedulers.values()), return_exceptions=True)
        self.schedulers.clear()
