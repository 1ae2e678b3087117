"""A replica's metrics: OpenTelemetry instruments read by a Prometheus exporter (docs/metrics.md).

One `Metrics` per `WeftService`: its own `MeterProvider` with a `PrometheusMetricReader` on its own
`prometheus_client.CollectorRegistry` (never the process-global one: tests run several replicas in
one process), rendered by `GET /metrics` (`weft.api.metrics`). Components take a `Metrics` and fall
back to `NOOP` (OpenTelemetry's no-op meter: every call does nothing), so one built without it, as
many tests do, records nothing and needs nothing.

The instruments every request touches (HTTP requests and their time, commands, appends and their
time, group-commit batches) are prometheus_client metrics on the same registry, each label set's
child cached: a record costs about a microsecond, where the OpenTelemetry SDK's costs 20-25 us on
a small VM (it checks and hashes the attributes each time), which at six records a request was
10-20 % of REST submit throughput. Their names, labels and buckets are the same either way.

Recording is a call where a thing happens (an append, a command's outcome, a batch); what is state
(queue depth, agents, targets, leadership, projection lag, WebSocket clients) is observed from the
projections at scrape time; what the stream says happened to work (wait and run times, outcomes,
spin-ups, leadership changes) is recorded as each event is folded, so every replica counts the
same (aggregate across replicas with max, not sum).

Labels never carry ids (work ids, guids, correlation ids, raw paths): only the project and small
closed sets (command names, event types, statuses, route templates). Values that clients choose
(capability, boundary, agent type, mechanism) are capped per project and scrape (`MAX_VALUES`);
the rest are reported as `_other`.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from opentelemetry import metrics as otel
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from projections.events import Event, parse_ts
from projections.state import ProjectState
from weft.aio import cancel_and_wait

# No `_created` series next to each prometheus_client counter and histogram: OpenTelemetry's
# exporter writes none, and they would double the hot instruments' series.
disable_created_metrics()  # type: ignore[no-untyped-call]

log = logging.getLogger("weft.metrics")

CONTENT_TYPE = CONTENT_TYPE_LATEST
MAX_VALUES = 50  # distinct client-chosen label values (capability, agent type, ...) per project
OTHER = "_other"
LOOP_LAG_INTERVAL_S = 0.1  # how often the event-loop probe schedules itself: a stall of 0.1 s is always seen

# Bucket bounds (seconds) for fast operations (appends, HTTP, loop lag) and for work (wait, run).
FAST_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SLOW_S = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 10800.0, 86400.0)
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

# Folded event type -> the outcome label(s) of weft_work_outcomes_total.
OUTCOMES = {
    "work.completed": ("completed",),
    "work.requeued": ("requeued",),
    "work.dead_lettered": ("dead_lettered",),
    "work.cancelled": ("cancelled",),
    "work.retried": ("dlq_retried",),
    "work.discarded": ("discarded",),
}
SPINUP_OUTCOMES = {"spinup.requested": "requested", "spinup.started": "started", "spinup.completed": "completed",
                   "spinup.failed": "failed"}

Views = Callable[[], Mapping[str, Any]]  # project -> weft.store.readmodel.ProjectView (duck-typed)


def command_name(decide: Callable[..., Any]) -> str:
    """The command a decision closure belongs to (`WorkCommands.cancel_work.<locals>.decide` ->
    `cancel_work`): a name from the code, so a bounded label."""
    qual = getattr(decide, "__qualname__", "") or "unknown"
    return qual.split(".<locals>", 1)[0].rsplit(".", 1)[-1] or "unknown"


def _capped(seen: dict[str, None], value: object) -> str:
    text = str(value) if value is not None else "none"
    if text in seen:
        return text
    if len(seen) >= MAX_VALUES:
        return OTHER
    seen[text] = None
    return text


def _seconds_between(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    try:
        return max(0.0, (parse_ts(end) - parse_ts(start)).total_seconds())
    except (ValueError, TypeError):
        return None


class _Hot:
    """A prometheus_client metric with its children cached per label values (the hot path);
    without a registry (metrics off) it records nothing."""

    def __init__(self, metric: Any) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], Any] = {}

    def _child(self, values: tuple[str, ...]) -> Any:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child


class _HotCounter(_Hot):
    def __init__(self, name: str, doc: str, labels: tuple[str, ...], registry: CollectorRegistry | None) -> None:
        super().__init__(Counter(name, doc, labels, registry=registry) if registry is not None else None)

    def add(self, amount: float, *values: str) -> None:
        if self._metric is not None:
            self._child(values).inc(amount)


class _HotHistogram(_Hot):
    def __init__(self, name: str, doc: str, labels: tuple[str, ...], buckets: Sequence[float],
                 registry: CollectorRegistry | None) -> None:
        super().__init__(Histogram(name, doc, labels, buckets=buckets, registry=registry) if registry is not None else None)

    def record(self, value: float, *values: str) -> None:
        if self._metric is not None:
            self._child(values).observe(value)


class Metrics:
    """Every instrument of one replica. `enabled=False`: OpenTelemetry's no-op meter (`NOOP`)."""

    def __init__(self, *, replica: str = "weft", enabled: bool = True) -> None:
        self.enabled = enabled
        self.registry = CollectorRegistry(auto_describe=False)
        self._provider: MeterProvider | None = None
        if enabled:
            reader = PrometheusMetricReader(disable_target_info=True, scope_info_enabled=False, registry=self.registry)
            self._provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False,
                                           resource=Resource.create({"service.name": "weft",
                                                                     "service.instance.id": replica}))
            meter = self._provider.get_meter("weft")
        else:
            meter = otel.NoOpMeterProvider().get_meter("weft")
        self._views: Views = dict
        self._leading: Callable[[], Mapping[str, int]] = dict
        self._hubs: weakref.WeakSet[Any] = weakref.WeakSet()
        self._last_ts: dict[str, str] = {}  # project -> timestamp of the last event folded here
        self._loop_task: asyncio.Task[None] | None = None

        # commands and the store (the hot path: prometheus_client, see the module docstring)
        hot = self.registry if enabled else None
        self.commands = _HotCounter("weft_commands", "Commands run, by command and outcome",
                                    ("project", "command", "outcome"), hot)
        self.command_retries = meter.create_counter(
            "weft_command_retries_total", description="Command attempts repeated after an OCC conflict or a stale view")
        self.events_appended = _HotCounter("weft_events_appended", "Events appended to the project stream by this "
                                           "replica", ("project", "type"), hot)
        self.append_seconds = _HotHistogram("weft_append_duration_seconds", "Time of one append, until the "
                                            "stream's ack", ("project",), FAST_S, hot)
        self.occ_conflicts = meter.create_counter(
            "weft_occ_conflicts_total", description="Appends rejected by the stream's expected-sequence check")
        self.batch_events = _HotHistogram("weft_group_commit_batch_events", "Events per committed atomic batch",
                                          ("project",), BATCH_SIZES, hot)
        self.batches = _HotCounter("weft_group_commit_batches", "Atomic batches sent, by outcome (committed, "
                                   "fallback)", ("project", "outcome"), hot)
        # work, as the stream tells it (folded)
        self.work_wait_seconds = meter.create_histogram(
            "weft_work_wait_seconds", description="Time from submit to each assignment",
            explicit_bucket_boundaries_advisory=SLOW_S)
        self.work_run_seconds = meter.create_histogram(
            "weft_work_run_seconds", description="Time from assignment (start if accepted) to completion or failure",
            explicit_bucket_boundaries_advisory=SLOW_S)
        self.work_outcomes = meter.create_counter(
            "weft_work_outcomes_total", description="Work outcomes folded (completed, failed, retried, dead_lettered, ...)")
        self.spinups = meter.create_counter(
            "weft_spinups_total", description="Spin-up events folded, by mechanism and outcome")
        self.spinup_seconds = meter.create_histogram(
            "weft_spinup_duration_seconds", description="Spin-up time until an agent registered (or it failed)",
            explicit_bucket_boundaries_advisory=SLOW_S)
        self.leadership_changes = meter.create_counter(
            "weft_leadership_changes_total", description="Leader terms announced in the project stream (leader.elected)")
        # HTTP and the event loop
        self.http_requests = _HotCounter("weft_http_requests", "HTTP requests, by route template, method and status",
                                         ("route", "method", "status"), hot)
        self.http_seconds = _HotHistogram("weft_http_request_duration_seconds", "HTTP request time, by route "
                                          "template, method and status", ("route", "method", "status"), FAST_S, hot)
        self.loop_lag_seconds = meter.create_histogram(
            "weft_event_loop_lag_seconds", description="Delay of a timer on the event loop beyond its due time",
            explicit_bucket_boundaries_advisory=FAST_S)
        # state, observed at scrape time
        obs = meter.create_observable_gauge
        obs("weft_queue_depth_items", [self._queue_depth],
            description="Pending work items by project, capability, boundary and priority")
        obs("weft_work_items", [self._work_items], description="Work items in the projection by status")
        obs("weft_agents", [self._agents], description="Agents by project, status and type")
        obs("weft_targets", [self._targets], description="Spin-up targets by project, mechanism, status and health")
        obs("weft_leader", [self._leader], description="1 for each project this replica leads (schedules)")
        obs("weft_projection_seq", [self._projection_seq], description="Last stream sequence folded here")
        obs("weft_projection_lag_events", [self._lag_events],
            description="Events in the stream not yet folded here (as last known)")
        obs("weft_projection_lag_seconds", [self._lag_seconds],
            description="Seconds since the timestamp of the last event folded here")
        obs("weft_websocket_clients", [self._ws(lambda h: h.connections)], description="Connected WebSocket clients")
        obs("weft_websocket_subscriptions", [self._ws(lambda h: h.subscriptions)],
            description="WebSocket subscriptions")
        meter.create_observable_counter("weft_websocket_dropped_clients_total", [self._ws(lambda h: h.dropped)],
                                        description="WebSocket clients closed as slow consumers")

    # --- wiring -----------------------------------------------------------------------------------

    def watch(self, views: Views, leading: Callable[[], Mapping[str, int]] | None = None) -> None:
        """Observe the projections (`ReadModel.views`) and which projects this replica leads."""
        self._views = views
        if leading is not None:
            self._leading = leading

    def watch_hub(self, hub: Any) -> None:
        """Observe a live hub's WebSocket clients (`weft.runtime.live_hub.LiveHub`)."""
        if self.enabled:
            self._hubs.add(hub)

    def listen(self, view: Any) -> None:
        """Record what the project's events say as they are folded (`ProjectView.listeners`)."""
        if self.enabled and self.on_folded not in view.listeners:
            view.listeners.append(self.on_folded)

    def render(self) -> bytes:
        """The Prometheus text exposition of every instrument."""
        return generate_latest(self.registry)

    async def start(self) -> None:
        if self.enabled and self._loop_task is None:
            self._loop_task = asyncio.create_task(self._loop_lag(), name="metrics:loop-lag")

    async def stop(self) -> None:
        """Stop the event-loop probe (what `start` started)."""
        task, self._loop_task = self._loop_task, None
        await cancel_and_wait(task)
        # The provider stays: a service may start again, and its registry is its own (nothing global
        # to unregister); it goes with the service.

    async def _loop_lag(self) -> None:
        """A timer due every `LOOP_LAG_INTERVAL_S`; how late it runs is the loop's scheduling delay."""
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + LOOP_LAG_INTERVAL_S
            await asyncio.sleep(LOOP_LAG_INTERVAL_S)  # a probe, not synchronisation
            self.loop_lag_seconds.record(max(0.0, loop.time() - due))

    # --- recording ----------------------------------------------------------------------------------

    def command(self, project: str, name: str, outcome: str) -> None:
        self.commands.add(1, project, name, outcome)

    def command_retry(self, project: str, name: str) -> None:
        self.command_retries.add(1, {"project": project, "command": name})

    def appended(self, ev: Event, seconds: float) -> None:
        self.events_appended.add(1, ev.project, ev.type)
        self.append_seconds.record(seconds, ev.project)

    def conflict(self, project: str) -> None:
        self.occ_conflicts.add(1, {"project": project})

    def batch(self, stream: str, events: int, committed: bool) -> None:
        project = stream.removeprefix("WEFT_")
        self.batches.add(1, project, "committed" if committed else "fallback")
        if committed:
            self.batch_events.record(events, project)

    def http(self, route: str, method: str, status: int, seconds: float) -> None:
        labels = (route, method if method in HTTP_METHODS else "other", str(status))
        self.http_requests.add(1, *labels)
        self.http_seconds.record(seconds, *labels)

    def on_folded(self, ev: Event, state: ProjectState) -> None:
        """A view listener: the stream's facts about work, spin-ups and leadership."""
        project = state.project
        self._last_ts[project] = ev.ts
        kind = ev.type
        if kind.startswith("work."):
            if kind == "work.assigned":
                item = state.work.get(ev.entity_id)
                if item is not None and item["assignedAt"] == ev.ts:  # the fold took it
                    wait = _seconds_between(item["offeredAt"], ev.ts)
                    if wait is not None:
                        self.work_wait_seconds.record(wait, {"project": project})
                return
            outcomes: tuple[str, ...] | None = OUTCOMES.get(kind)
            if kind == "work.failed":
                then = "retried" if ev.data.get("outcome") == "retry" else "dead_lettered"
                outcomes = ("failed", then)
            if outcomes is None:
                return
            for outcome in outcomes:
                self.work_outcomes.add(1, {"project": project, "outcome": outcome})
            if kind in ("work.completed", "work.failed"):
                item = state.work.get(ev.entity_id)
                if item is not None:
                    run = _seconds_between(item.get("startedAt") or item.get("assignedAt"), ev.ts)
                    if run is not None:
                        self.work_run_seconds.record(run, {"project": project, "outcome": outcomes[0]})
        elif kind in SPINUP_OUTCOMES:
            target = state.targets.get(ev.entity_id)
            mechanism = str(target.get("mechanism")) if target is not None else "unknown"
            labels = {"project": project, "mechanism": mechanism, "outcome": SPINUP_OUTCOMES[kind]}
            self.spinups.add(1, labels)
            if "durationMs" in ev.data:
                self.spinup_seconds.record(max(0.0, float(ev.data["durationMs"]) / 1000), labels)
        elif kind == "leader.elected":
            self.leadership_changes.add(1, {"project": project})

    # --- observed at scrape time ------------------------------------------------------------------

    def _each_view(self) -> Iterator[tuple[str, Any]]:
        try:
            yield from list(self._views().items())
        except Exception:  # a scrape must never fail on a view being attached meanwhile
            log.exception("metrics: views could not be read")

    def _queue_depth(self, _options: CallbackOptions) -> Iterable[Observation]:
        out = []
        for project, view in self._each_view():
            counts: dict[tuple[str, str, str], int] = {}
            caps: dict[str, None] = {}
            bounds: dict[str, None] = {}
            for (capability, boundary, priority), n in view.state.pending_counts().items():
                key = (_capped(caps, capability), _capped(bounds, boundary), str(priority))
                counts[key] = counts.get(key, 0) + n
            for (cap, boundary, priority), n in counts.items():
                out.append(Observation(n, {"project": project, "capability": cap, "boundary": boundary,
                                           "priority": priority}))
        return out

    def _work_items(self, _options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(n, {"project": project, "status": status})
                for project, view in self._each_view() for status, n in view.state.work_counts.items()]

    def _agents(self, _options: CallbackOptions) -> Iterable[Observation]:
        out = []
        for project, view in self._each_view():
            counts: dict[tuple[str, str], int] = {}
            types: dict[str, None] = {}
            for agent in view.state.agents.values():
                key = (str(agent["status"]), _capped(types, agent.get("agentType")))
                counts[key] = counts.get(key, 0) + 1
            out += [Observation(n, {"project": project, "status": s, "type": t}) for (s, t), n in counts.items()]
        return out

    def _targets(self, _options: CallbackOptions) -> Iterable[Observation]:
        out = []
        for project, view in self._each_view():
            counts: dict[tuple[str, str, str], int] = {}
            mechanisms: dict[str, None] = {}
            for t in view.state.targets.values():
                key = (_capped(mechanisms, t.get("mechanism")), str(t.get("status")), str(t.get("healthStatus")))
                counts[key] = counts.get(key, 0) + 1
            out += [Observation(n, {"project": project, "mechanism": m, "status": s, "health": h})
                    for (m, s, h), n in counts.items()]
        return out

    def _leader(self, _options: CallbackOptions) -> Iterable[Observation]:
        try:
            leading = set(self._leading())
        except Exception:
            leading = set()
        return [Observation(1 if project in leading else 0, {"project": project}) for project, _ in self._each_view()]

    def _projection_seq(self, _options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(view.state.seq, {"project": project}) for project, view in self._each_view()]

    def _lag_events(self, _options: CallbackOptions) -> Iterable[Observation]:
        out = []
        for project, view in self._each_view():
            pending = getattr(view.tail, "pending", 0) or 0
            out.append(Observation(max(pending, view.target_seq - view.state.seq, 0), {"project": project}))
        return out

    def _lag_seconds(self, _options: CallbackOptions) -> Iterable[Observation]:
        now = datetime.now(UTC)
        out = []
        for project, _ in self._each_view():
            ts = self._last_ts.get(project)
            if ts is None:
                continue
            try:
                out.append(Observation(max(0.0, (now - parse_ts(ts)).total_seconds()), {"project": project}))
            except (ValueError, TypeError):
                continue
        return out

    def _ws(self, read: Callable[[Any], int]) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(_options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(sum(read(h) for h in list(self._hubs)))]

        return observe


NOOP = Metrics(enabled=False)


def monotonic() -> float:
    """The clock durations are measured with."""
    return time.perf_counter()
