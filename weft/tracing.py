"""A replica's traces: OpenTelemetry spans exported with OTLP/HTTP, or nothing at all.

One `Tracing` per `WeftService`, like `weft.metrics.Metrics`: its own `TracerProvider` (never the
process-global one: tests run several replicas in one process) with a `BatchSpanProcessor` over an
`OTLPSpanExporter`, built only when `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or
`OTEL_EXPORTER_OTLP_ENDPOINT` is set (`Settings.otlp_traces_endpoint`). The SDK reads the other
standard variables itself (`OTEL_EXPORTER_OTLP_HEADERS`, `_TIMEOUT`, `_COMPRESSION`,
`OTEL_BSP_SCHEDULE_DELAY`, `OTEL_TRACES_SAMPLER`, ...). Unset, `NOOP`'s `span()` does no work at
all: no span, no context switch, and the HTTP middleware is not even installed. Set, each SDK span
costs tens of microseconds of the event loop's CPU (and its encoding as much again in the export
thread): a busy replica samples (`OTEL_TRACES_SAMPLER=parentbased_traceidratio`, `_ARG=0.1`).

With a ratio sampler (`traceidratio` or `parentbased_traceidratio`), weft decides itself whether a
new trace is kept, before asking the SDK anything: a trace left out then costs a random number
and a context variable, not the SDK's ~40 us (propagator, sampler, non-recording span, context),
and nothing under it (its commands' spans) is created. A caller's `traceparent` still decides for
its own request (parent-based), whichever ratio sampler was named.

The spans (names never carry ids; ids ride as attributes):
- `POST /api/work` (a server span per HTTP request, by route template) with children `decide`,
  `append` (`weft.stream_seq` of the appended event) and `fold` (waiting for the projection to
  reach that sequence), one of each per attempt of the command's OCC loop;
- `assign` (one per assignment the scheduler decides) and `spinup` (one per launch), each the root
  of its own trace, with the same command children;
- a command run outside any live span (an agent's report over NATS) gets a root `command <name>`.
Every span carries `weft.project` and, where one is known, `weft.correlation_id`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import INVALID_SPAN, Span, SpanKind, Status, StatusCode

log = logging.getLogger("weft.tracing")

__all__ = ["NOOP", "NO_SPAN", "Span", "SpanKind", "Tracing", "failed"]

SHUTDOWN_TIMEOUT_MS = 5_000  # how long stop() may spend flushing the last spans
RATIO_SAMPLERS = ("traceidratio", "parentbased_traceidratio")
# True inside a trace weft's own head sampling left out: no span is made there.
_left_out: ContextVar[bool] = ContextVar("weft_trace_left_out", default=False)


def head_ratio(env: Mapping[str, str]) -> float | None:
    """The ratio of new traces to keep when OTEL_TRACES_SAMPLER names a ratio sampler, else None
    (the SDK's sampler decides alone)."""
    if env.get("OTEL_TRACES_SAMPLER", "").strip().lower() not in RATIO_SAMPLERS:
        return None
    try:
        return min(1.0, max(0.0, float(env.get("OTEL_TRACES_SAMPLER_ARG", "1.0"))))
    except ValueError:
        return 1.0  # what the SDK does with a bad argument


class Tracing:
    """Where spans go. Without an `endpoint`: nowhere, at no cost (`enabled` False)."""

    def __init__(self, *, replica: str = "weft", endpoint: str | None = None) -> None:
        self.enabled = endpoint is not None
        self.endpoint = endpoint
        self._provider: Any = None
        self._tracer: trace.Tracer = trace.NoOpTracer()
        self._ratio = head_ratio(os.environ) if endpoint is not None else None
        if endpoint is not None:
            # Imported here: a replica without an endpoint loads no exporter (nor `requests`).
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

            resource = Resource.create({"service.name": "weft", "service.instance.id": replica})
            sampler: Any = None  # the SDK's, from OTEL_TRACES_SAMPLER
            if self._ratio is not None:  # new traces are sampled in span(); the SDK follows parents
                from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased

                sampler = ParentBased(ALWAYS_ON)
            self._provider = TracerProvider(resource=resource, shutdown_on_exit=False, sampler=sampler)
            self._provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
            self._tracer = self._provider.get_tracer("weft")
            log.info("exporting traces", extra={"endpoint": endpoint})

    def span(self, name: str, attributes: Mapping[str, Any] | None = None, *, kind: SpanKind = SpanKind.INTERNAL,
             root: bool = False, headers: Mapping[str, str] | None = None) -> contextlib.AbstractContextManager[Span]:
        """A span named `name`, current inside the block, ended (ERROR and the exception recorded
        if the block raises) on leaving it. `root`: the start of a new trace whatever is current
        (a task may have inherited a long-ended request's context), unless `headers` carry a
        caller's trace context (W3C `traceparent`). Attributes that are None are left out.
        Disabled, or under a span the sampler left out: the invalid span, on which every call does
        nothing, and nothing else (no SDK span object, no context switch)."""
        if not self.enabled or _left_out.get():
            return NO_SPAN
        current = trace.get_current_span()
        if not root and headers is None:
            ctx = current.get_span_context()
            if ctx.is_valid and not ctx.trace_flags.sampled:
                return NO_SPAN  # under a span the sampler left out: its children stay out, for free
        ratio = self._ratio
        if ratio is not None and ratio < 1.0 and (root or headers is not None or not current.is_recording()) \
                and (headers is None or "traceparent" not in headers) and random.random() >= ratio:
            return _LeftOut()  # a new trace, not kept
        return self._started(name, kind, root, headers, attributes or {})

    @contextlib.contextmanager
    def _started(self, name: str, kind: SpanKind, root: bool, headers: Mapping[str, str] | None,
                 attributes: Mapping[str, Any]) -> Iterator[Span]:
        parent = None
        if headers is not None:
            parent = propagate.extract(headers)  # an empty context (a new trace) without traceparent
        elif root:
            parent = otel_context.Context()
        attrs = {k: v for k, v in attributes.items() if v is not None}
        with self._tracer.start_as_current_span(name, context=parent, kind=kind, attributes=attrs) as span:
            yield span

    @staticmethod
    def in_live_span() -> bool:
        """Whether a span of a live trace is current: one still recording (a request's, an
        assignment's), or one the sampler left out (its children stay out with it). A sampled
        span that no longer records has ended: a context a task inherited from a past request."""
        if _left_out.get():
            return True
        span = trace.get_current_span()
        if span.is_recording():
            return True
        ctx = span.get_span_context()
        return ctx.is_valid and not ctx.trace_flags.sampled

    def flush(self) -> None:
        """Send the spans still queued now (blocking: run it in a thread)."""
        if self._provider is not None:
            self._provider.force_flush(SHUTDOWN_TIMEOUT_MS)

    def shutdown(self) -> None:
        """Flush the spans still queued and stop exporting (blocking: run it in a thread)."""
        if self._provider is not None:
            self._provider.force_flush(SHUTDOWN_TIMEOUT_MS)
            self._provider.shutdown()
            self._provider = None


class _NoSpan(contextlib.AbstractContextManager[Span]):
    """What a disabled `Tracing.span` gives: the invalid span, entered and left at no cost."""

    def __enter__(self) -> Span:
        return INVALID_SPAN

    def __exit__(self, *_exc: object) -> None:
        return None


NO_SPAN = _NoSpan()


class _LeftOut(contextlib.AbstractContextManager[Span]):
    """A trace head sampling left out: inside it, `span()` makes nothing (a fresh context manager
    each time, since it is entered re-entrantly across tasks)."""

    def __enter__(self) -> Span:
        self._token = _left_out.set(True)
        return INVALID_SPAN

    def __exit__(self, *_exc: object) -> None:
        _left_out.reset(self._token)


def failed(span: Span, reason: str) -> None:
    """Mark `span` as failed without an exception (an outcome caught and recorded elsewhere)."""
    span.set_status(Status(StatusCode.ERROR, reason))


NOOP = Tracing()
