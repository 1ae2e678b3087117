"""`GET /metrics`: this replica's metrics in the Prometheus text format (docs/metrics.md), and the
middleware that counts every HTTP request by route template, method and status.

Open like /health unless tokens are configured (API_TOKENS or WEFT_TOKENS_FILE); then it takes a
token of role `read` (weft.api.auth), and a token scoped to some projects sees only their series
(and those of the replica itself, which carry no project). Each replica serves only its own
numbers: scrape every one.
"""

from __future__ import annotations

from collections.abc import Iterator

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from weft.api.common import SERVICES, principal_of
from weft.api.errors import Handler
from weft.core.errors import NotFound
from weft.metrics import CONTENT_TYPE, monotonic

UNMATCHED = "unmatched"  # no route: never the raw path (a label per probe of a scanner)


class ProjectScoped(Collector):
    """A registry's families with only the samples of `projects` (or of no project)."""

    def __init__(self, registry: CollectorRegistry, projects: frozenset[str]) -> None:
        self.registry = registry
        self.projects = projects

    def collect(self) -> Iterator[Metric]:
        for family in self.registry.collect():
            kept = [s for s in family.samples if "project" not in s.labels or s.labels["project"] in self.projects]
            if kept or not family.samples:
                family.samples = kept
                yield family


async def metrics(request: web.Request) -> web.Response:
    # On the loop, not in a thread: the observed gauges read the projections the loop folds.
    svc = request.app[SERVICES]
    if not svc.metrics.enabled:
        raise NotFound("metrics are off on this replica (WEFT_METRICS=off)", field="path")
    scope = principal_of(request).projects
    if scope is None:
        body = svc.metrics.render()
    else:
        scoped = CollectorRegistry(auto_describe=False)
        scoped.register(ProjectScoped(svc.metrics.registry, scope))
        body = generate_latest(scoped)
    resp = web.Response(body=body)
    resp.headers["Content-Type"] = CONTENT_TYPE
    return resp


def route_template(request: web.BaseRequest) -> str:
    """The matched route's template (`/api/work/{id}`), or `unmatched`."""
    match_info = getattr(request, "match_info", None)
    route = getattr(match_info, "route", None)
    resource = getattr(route, "resource", None)
    canonical = getattr(resource, "canonical", None) if resource is not None else None
    return canonical if isinstance(canonical, str) and canonical else UNMATCHED


@web.middleware
async def http_metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = monotonic()
    status = 500
    try:
        resp = await handler(request)
        status = resp.status
        return resp
    except web.HTTPException as err:
        status = err.status
        raise
    finally:
        request.app[SERVICES].metrics.http(route_template(request), request.method, status, monotonic() - started)


def routes() -> list[web.RouteDef]:
    return [web.get("/metrics", metrics)]
