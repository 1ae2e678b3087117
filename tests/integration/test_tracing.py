"""Traces leave a real `weft serve` process as OTLP/HTTP and link up as designed.

The collector here is a local aiohttp server on 127.0.0.1 standing in for an OTLP collector: it
takes the exporter's protobuf POSTs at `/v1/traces`, decodes them with the OTLP protos and wakes
the test on each one (no sleeps: every wait is bounded and event-driven).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import nats
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from tests.processes import WeftProcess
from tests.servers import own_nats_server
from tests.support import FakeAgent, own_replica, until
from weft.api.tracing import http_tracing_middleware
from weft.settings import Settings
from weft.store.embedded import EmbeddedNats
from weft.tracing import NO_SPAN

pytestmark = pytest.mark.slow

WORK = {"capability": "python", "boundary": "personal", "description": "traced work"}
SERVER, PRODUCER = 2, 4  # opentelemetry.proto.trace.v1.Span.SpanKind


@dataclass
class Received:
    """One span as the collector got it, with its resource's attributes."""

    name: str
    kind: int
    trace_id: bytes
    span_id: bytes
    parent_span_id: bytes
    attributes: dict[str, Any]
    resource: dict[str, Any]
    status_code: int


def _value(v: AnyValue) -> Any:
    which = v.WhichOneof("value")
    return getattr(v, which) if which else None


class Collector:
    """Every span POSTed to /v1/traces, and a wait for a condition over them."""

    def __init__(self) -> None:
        self.spans: list[Received] = []
        self.requests = 0
        self._arrived = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/traces", self._export)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _export(self, request: web.Request) -> web.Response:
        assert request.content_type == "application/x-protobuf"
        body = ExportTraceServiceRequest.FromString(await request.read())
        for rs in body.resource_spans:
            resource = {a.key: _value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    self.spans.append(Received(
                        s.name, s.kind, s.trace_id, s.span_id, s.parent_span_id,
                        {a.key: _value(a.value) for a in s.attributes}, resource, s.status.code,
                    ))
        self.requests += 1
        self._arrived.set()
        return web.Response(body=ExportTraceServiceResponse().SerializeToString(),
                            content_type="application/x-protobuf")

    async def until(self, found: Callable[[list[Received]], Any], timeout: float = 20.0) -> Any:
        """`found(spans)` once it is truthy, re-checked on every export received."""
        async with asyncio.timeout(timeout):
            while not (result := found(self.spans)):
                self._arrived.clear()
                await self._arrived.wait()
            return result


@pytest.fixture(scope="module")
async def trace_nats(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[EmbeddedNats]:
    """A server of this module's own, so the traced process alone leads (and assigns) its project."""
    async with own_nats_server(tmp_path_factory, "tracing") as server:
        yield server


@pytest.fixture
async def collector() -> AsyncIterator[Collector]:
    c = Collector()
    await c.start()
    yield c
    await c.stop()


def children(spans: list[Received], parent: Received) -> dict[str, Received]:
    return {s.name: s for s in spans if s.parent_span_id == parent.span_id and s.trace_id == parent.trace_id}


async def test_a_submit_and_its_assignment_are_exported_as_linked_spans(
    trace_nats: EmbeddedNats, collector: Collector
) -> None:
    project = "trace" + uuid.uuid4().hex[:8]
    correlation = "corr-" + uuid.uuid4().hex[:8]
    weft = WeftProcess(trace_nats.url, project, env={
        "OTEL_EXPORTER_OTLP_ENDPOINT": collector.base, "OTEL_BSP_SCHEDULE_DELAY": "100",
        "WEFT_REPLICA_NAME": "traced-1",
    })
    await weft.start()
    nc = await nats.connect(trace_nats.url)
    agent = FakeAgent(nc, project, "tracer-1")
    try:
        await agent.start()
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{weft.base}/api/work", json=WORK, params={"projectId": project},
                                 headers={"X-Correlation-Id": correlation}) as resp:
                assert resp.status == 201, await resp.text()
                body = await resp.json()
            push = await agent.next_push("assignment", timeout=20)
            assert push["work"]["id"] == body["id"]
            async with http.get(f"{weft.base}/api/work/{body['id']}/history", params={"projectId": project}) as resp:
                history = (await resp.json())["events"]
        assigned_seq = next(e["seq"] for e in history if e["type"] == "work.assigned")
        seq = body["seq"]

        def submit_traced(spans: list[Received]) -> Received | None:
            for s in spans:
                if s.name == "POST /api/work" and s.attributes.get("weft.correlation_id") == correlation \
                        and set(children(spans, s)) >= {"decide", "append", "fold"}:
                    return s
            return None

        def assignment_traced(spans: list[Received]) -> Received | None:
            for s in spans:
                if s.name == "assign" and s.attributes.get("weft.work_id") == body["id"] \
                        and set(children(spans, s)) >= {"decide", "append", "fold"}:
                    return s
            return None

        server = await collector.until(submit_traced)
        assert server.kind == SERVER and server.parent_span_id == b""
        assert server.attributes["http.request.method"] == "POST"
        assert server.attributes["http.route"] == "/api/work"
        assert server.attributes["http.response.status_code"] == 201
        assert server.attributes["weft.project"] == project
        assert server.resource["service.name"] == "weft"
        assert server.resource["service.instance.id"] == "traced-1"
        steps = children(collector.spans, server)
        for name in ("decide", "append", "fold"):
            assert steps[name].attributes["weft.correlation_id"] == correlation
            assert steps[name].attributes["weft.project"] == project
            assert steps[name].attributes["weft.command"] == "submit_work"
        assert steps["append"].kind == PRODUCER
        assert steps["append"].attributes["weft.stream_seq"] == seq
        assert steps["append"].attributes["messaging.destination.name"] == f"weft.{project}.ev.work.{body['id']}"
        assert steps["fold"].attributes["weft.stream_seq"] == seq
        assert steps["fold"].attributes["weft.folded"] is True

        assign = await collector.until(assignment_traced)
        assert assign.parent_span_id == b"" and assign.trace_id != server.trace_id  # a trace of its own
        assert assign.attributes["weft.correlation_id"] == correlation  # the item's: found from the submit's
        assert assign.attributes["weft.work_seq"] == seq
        assert assign.attributes["weft.stream_seq"] == assigned_seq > seq
        assert assign.attributes["weft.agent_guid"] == "tracer-1"
        assert children(collector.spans, assign)["append"].attributes["weft.stream_seq"] == assigned_seq
        # an agent's report over NATS, outside any request: a root span of its own over its steps
        registered = await collector.until(lambda spans: next(
            (s for s in spans if s.name == "command register_agent" and "append" in children(spans, s)), None))
        assert registered.parent_span_id == b"" and registered.attributes["weft.project"] == project
        # no span is named by an id: names are route templates and step names
        assert not [s.name for s in collector.spans if body["id"] in s.name or correlation in s.name]
    finally:
        await agent.close()
        await nc.close()
        assert await weft.stop() == 0


async def test_a_failed_request_is_an_error_span_and_a_caller_trace_context_is_its_parent(
    trace_nats: EmbeddedNats, collector: Collector
) -> None:
    project = "trace" + uuid.uuid4().hex[:8]
    trace_id, parent_id = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    async with own_replica(trace_nats.url, project, otlp_traces_endpoint=f"{collector.base}/v1/traces") as api:
        assert api.service is not None and api.service.tracing.enabled
        resp = await api.call("GET", "/api/work/no-such-item",
                              headers={"traceparent": f"00-{trace_id}-{parent_id}-01"})
        assert resp.status == 404
        resp = await api.call("POST", "/api/work", {"capability": 3})
        assert resp.status == 400
        await asyncio.to_thread(api.service.tracing.flush)  # the spans are sent now

        def named(name: str) -> Callable[[list[Received]], Received | None]:
            return lambda spans: next((s for s in spans if s.name == name), None)

        got = await collector.until(named("GET /api/work/{id}"))
        assert got.trace_id.hex() == trace_id and got.parent_span_id.hex() == parent_id
        assert got.attributes["http.response.status_code"] == 404 and got.status_code == 0  # 4xx: not a server error
        bad = await collector.until(named("POST /api/work"))
        assert bad.attributes["http.response.status_code"] == 400


def whole_submit(trace_id: str) -> Callable[[list[Received]], list[Received] | None]:
    """The spans of trace `trace_id` once its submit's request, decide, append and fold arrived."""
    def check(got: list[Received]) -> list[Received] | None:
        found = [s for s in got if s.trace_id.hex() == trace_id]
        return found if {s.name for s in found} >= {"POST /api/work", "decide", "append", "fold"} else None

    return check


async def test_a_request_the_caller_left_unsampled_creates_no_spans_at_all(
    trace_nats: EmbeddedNats, collector: Collector
) -> None:
    """A `traceparent` with the sampled flag off: the request span is not recorded (parent-based
    sampling) and its decide/append/fold children are not even created, so unsampled requests
    cost next to nothing. A sampled request after it is exported with all of them."""
    project = "trace" + uuid.uuid4().hex[:8]
    unsampled, sampled = "1af7651916cd43dd8448eb211c80319c", "2af7651916cd43dd8448eb211c80319c"
    async with own_replica(trace_nats.url, project, otlp_traces_endpoint=f"{collector.base}/v1/traces") as api:
        assert api.service is not None
        for trace_id, flags in ((unsampled, "00"), (sampled, "01")):
            await api.ok("POST", "/api/work", WORK, status=201,
                         headers={"traceparent": f"00-{trace_id}-b7ad6b7169203331-{flags}"})
        await asyncio.to_thread(api.service.tracing.flush)
        spans = await collector.until(whole_submit(sampled))
    assert spans and not [s for s in collector.spans if s.trace_id.hex() == unsampled]


async def test_a_failed_spin_up_is_an_error_span_with_its_mechanism_target_and_outcome(
    trace_nats: EmbeddedNats, collector: Collector
) -> None:
    project = "trace" + uuid.uuid4().hex[:8]
    target = {
        "name": "broken", "agentType": "claude-code", "mechanism": "local", "capabilities": ["python"],
        "config": {"command": "sh", "args": ["-c", "exit 3"]}, "cooldownMs": 0,
        "circuitBreakerThreshold": 1, "healthCheck": {"enabled": False},
    }
    async with own_replica(trace_nats.url, project, otlp_traces_endpoint=f"{collector.base}/v1/traces") as api:
        assert api.service is not None
        await api.ok("POST", "/api/targets", target, status=201)
        item = await api.ok("POST", "/api/work", WORK, status=201, headers={"X-Correlation-Id": "needs-an-agent"})
        await until(api, lambda s: next(iter(s.targets.values()))["status"] == "error")
        await asyncio.to_thread(api.service.tracing.flush)

        def spun(spans: list[Received]) -> Received | None:
            return next((s for s in spans if s.name == "spinup" and s.attributes.get("weft.work_id") == item["id"]
                         and "append" in children(spans, s)), None)

        got = await collector.until(spun)
        assert got.parent_span_id == b"" and got.status_code == 2  # STATUS_CODE_ERROR
        assert got.attributes["weft.mechanism"] == "local" and got.attributes["weft.target"] == "broken"
        assert got.attributes["weft.outcome"] == "failed"
        assert got.attributes["weft.correlation_id"] == "needs-an-agent"
        assert children(collector.spans, got)["append"].attributes["weft.event_type"] == "spinup.failed"


async def test_without_an_endpoint_nothing_is_traced_and_no_exporter_exists(trace_nats: EmbeddedNats) -> None:
    assert Settings.from_env({}).otlp_traces_endpoint is None
    project = "trace" + uuid.uuid4().hex[:8]
    async with own_replica(trace_nats.url, project) as api:
        service = api.service
        assert service is not None and service.app is not None and service.commands is not None
        assert not service.tracing.enabled and service.tracing._provider is None
        assert service.commands.tracing is service.tracing
        assert http_tracing_middleware not in service.app.middlewares  # not a call per request
        assert service.tracing.span("decide") is NO_SPAN
        await api.ok("POST", "/api/work", WORK, status=201, headers={"X-Correlation-Id": "untraced"})


@pytest.mark.parametrize(("env", "endpoint"), [
    ({}, None),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, "http://collector:4318/v1/traces"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/"}, "http://collector:4318/v1/traces"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:4318", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://b/x"}, "http://b/x"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:4318", "OTEL_SDK_DISABLED": "true"}, None),
])
def test_the_traces_endpoint_is_resolved_as_the_sdk_does(env: dict[str, str], endpoint: str | None) -> None:
    assert Settings.from_env(env).otlp_traces_endpoint == endpoint


async def test_a_ratio_sampler_of_zero_makes_no_span_but_a_sampled_caller_still_gets_its_trace(
    trace_nats: EmbeddedNats, collector: Collector, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With `parentbased_traceidratio` at 0, weft's own head sampling leaves every new trace out
    (requests, the assignment, an agent's reports: no root at all), while a caller's sampled
    `traceparent` keeps its request's whole trace."""
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0")
    project = "trace" + uuid.uuid4().hex[:8]
    kept = "3af7651916cd43dd8448eb211c80319c"
    async with own_replica(trace_nats.url, project, otlp_traces_endpoint=f"{collector.base}/v1/traces") as api:
        assert api.service is not None
        for _ in range(5):
            await api.ok("POST", "/api/work", WORK, status=201)
        await api.ok("POST", "/api/work", WORK, status=201,
                     headers={"traceparent": f"00-{kept}-b7ad6b7169203331-01"})
        await asyncio.to_thread(api.service.tracing.flush)

        await collector.until(whole_submit(kept))
    assert {s.trace_id.hex() for s in collector.spans} == {kept}, {s.name for s in collector.spans}
