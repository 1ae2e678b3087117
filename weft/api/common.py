"""What every handler needs: the app's services, the project of a request, JSON in and out, min_seq."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson
from aiohttp import web
from pydantic import BaseModel

from projections.events import is_valid_project_id
from weft.commands import Commands, Ctx, RetryPolicy
from weft.core.access import ANONYMOUS, Principal
from weft.core.errors import Forbidden, InvalidInput, Unavailable
from weft.core.limits import ENV as LIMIT_ENV
from weft.core.routing import DEFAULT_POLICY, RoutingPolicy
from weft.logs import correlation_var, project_var
from weft.metrics import NOOP, Metrics
from weft.settings import Settings
from weft.spinup.base import Mechanism
from weft.stamps import new_id
from weft.store.readmodel import ProjectView, ReadModel
from weft.tracing import NOOP as NO_TRACING
from weft.tracing import Tracing

M = TypeVar("M", bound=BaseModel)


@dataclass
class Services:
    settings: Settings
    readmodel: ReadModel
    commands: Commands
    policy: RoutingPolicy = field(default_factory=lambda: DEFAULT_POLICY)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    # project -> ((seq, second), waiting reasons): the routing plan as last computed for reads
    plan_cache: dict[str, tuple[tuple[int, int], dict[str, str]]] = field(default_factory=dict)
    mechanisms: dict[str, Mechanism] = field(default_factory=dict)
    leading: Callable[[], dict[str, int]] = field(default=lambda: {})  # project -> epoch led here
    metrics: Metrics = NOOP  # GET /metrics and the HTTP middleware (weft.api.metrics)
    tracing: Tracing = NO_TRACING  # a server span per request when on (weft.api.tracing)


SERVICES = web.AppKey("services", Services)
TOKENS = web.AppKey("tokens", object)  # weft.api.auth.TokenRegistry (typed loosely: auth imports this module)
ACTOR = web.RequestKey("actor", str)
PRINCIPAL = web.RequestKey("principal", Principal)


def services(request: web.Request) -> Services:
    return request.app[SERVICES]


def principal_of(request: web.Request) -> Principal:
    principal: Principal = request.get(PRINCIPAL, ANONYMOUS)
    return principal


def check_project(principal: Principal, project: str) -> str:
    """`project` if the principal may use it. The refusal is the same whether the project exists
    or not: a token never learns of a project outside its scope."""
    if not principal.may_use(project):
        raise Forbidden(f"token {principal.name!r} may not use project {project!r}", field="projectId")
    return project


def explicit_project(request: web.Request) -> str | None:
    raw = request.query.get("projectId") or request.headers.get("X-Weft-Project")
    if raw is None:
        return None
    if not is_valid_project_id(raw):
        raise InvalidInput("projectId must match [A-Za-z0-9_-]{1,64}", field="projectId")
    return check_project(principal_of(request), raw)


def default_project(request: web.Request) -> str:
    return principal_of(request).default_project(services(request).settings.default_project)


def project_of(request: web.Request) -> str:
    project = explicit_project(request) or check_project(principal_of(request), default_project(request))
    project_var.set(project)
    return project


def ctx_of(request: web.Request, project: str) -> Ctx:
    limits = services(request).settings.limits
    for header in ("X-Correlation-Id", "X-Request-Id"):
        limits.check_chars(header, request.headers.get(header), limits.id_chars, LIMIT_ENV["id_chars"])
    correlation = request.headers.get("X-Correlation-Id") or request.headers.get("X-Request-Id") or new_id()
    correlation_var.set(correlation)
    key = request.headers.get("Idempotency-Key")
    if key is not None and not (0 < len(key) <= 200):
        raise InvalidInput("Idempotency-Key must be 1-200 characters", field="Idempotency-Key")
    return Ctx(project=project, actor=request.get(ACTOR, "api"), correlation_id=correlation, idempotency_key=key)


# As deep as pydantic's JSON parser lets a typed body nest; an event must also stay below orjson's
# own encoding limit (254), or a body accepted here would fail at the append.
MAX_JSON_DEPTH = 200


def nesting_too_deep(value: Any, limit: int = MAX_JSON_DEPTH) -> str | None:
    """The path of the first node nested deeper than `limit`, or None (iterative: no recursion)."""
    stack: list[tuple[Any, str, int]] = [(value, "body", 1)]
    while stack:
        node, path, depth = stack.pop()
        if isinstance(node, dict | list):
            if depth > limit:
                return path
            items = node.items() if isinstance(node, dict) else enumerate(node)
            stack.extend((child, f"{path}.{key}" if isinstance(node, dict) else f"{path}[{key}]", depth + 1)
                         for key, child in items)
    return None


async def read_json(request: web.Request) -> Any:
    raw = await request.read()
    if not raw:
        return {}
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as err:
        raise InvalidInput(f"malformed JSON: {err}", field="body") from None
    where = nesting_too_deep(body)
    if where is not None:
        field = where.removeprefix("body.").split(".", 1)[0].split("[", 1)[0] if where != "body" else "body"
        raise InvalidInput(f"body nests deeper than {MAX_JSON_DEPTH} levels (at {where[:200]})", field=field)
    return body


# What orjson (hence an event) can encode; pydantic's parser keeps any integer.
INT_MIN, INT_MAX = -(2**63), 2**64 - 1


def integer_out_of_range(value: Any, path: str) -> str | None:
    """The path of the first integer under `value` outside orjson's 64-bit range, or None."""
    stack: list[tuple[Any, str]] = [(value, path)]
    while stack:
        node, where = stack.pop()
        if isinstance(node, BaseModel):
            node = node.model_dump()
        if isinstance(node, dict):
            stack.extend((child, f"{where}.{key}") for key, child in node.items())
        elif isinstance(node, list | tuple):
            stack.extend((child, f"{where}[{i}]") for i, child in enumerate(node))
        elif isinstance(node, int) and not isinstance(node, bool) and not INT_MIN <= node <= INT_MAX:
            return where
    return None


async def parse_body(request: web.Request, model: type[M]) -> M:
    raw = await request.read()
    body = model.model_validate_json(raw or b"{}")
    for name in type(body).model_fields:
        where = integer_out_of_range(getattr(body, name), name)
        if where is not None:
            raise InvalidInput(f"{where[:200]}: integers must lie between -2**63 and 2**64-1", field=name)
    return body


def json_response(body: Any, status: int = 200, seq: int | None = None) -> web.Response:
    resp = web.Response(status=status, body=orjson.dumps(body), content_type="application/json")
    if seq is not None:
        resp.headers["X-Weft-Seq"] = str(seq)
    return resp


def min_seq_of(request: web.Request) -> int:
    raw = request.query.get("min_seq") or request.headers.get("X-Weft-Min-Seq")
    if raw is None:
        return 0
    try:
        value = int(raw)
    except ValueError:
        raise InvalidInput("min_seq must be a non-negative integer", field="min_seq") from None
    if value < 0:
        raise InvalidInput("min_seq must be a non-negative integer", field="min_seq")
    return value


async def read_view(request: web.Request, project: str) -> ProjectView | None:
    """The project's view for a read, after waiting (bounded) for `min_seq` if the client gave one."""
    svc = services(request)
    wanted = min_seq_of(request)
    view = await svc.readmodel.view(project)  # a read never creates a project
    if not wanted or (view is not None and view.state.seq >= wanted):
        return view
    # A sequence the stream has not reached may never come: wait only for one it holds.
    last = await svc.readmodel.store.last_seq(project) if view is not None else 0
    if wanted > last:
        raise InvalidInput(
            f"min_seq {wanted} is beyond the last sequence of project {project}'s stream ({last})",
            field="min_seq",
            details={"lastSeq": last},
        )
    assert view is not None
    if not await view.wait_for(wanted, svc.settings.min_seq_wait_ms / 1000):
        raise Unavailable(
            f"projection of {project} is at {view.state.seq}, below min_seq {wanted}; retry",
            field="min_seq",
        )
    return view


def all_views(request: web.Request) -> list[ProjectView]:
    """Every project's view on this replica that the request's token may use, by project id."""
    replica = services(request).readmodel
    principal = principal_of(request)
    return [replica.views[p] for p in sorted(replica.views) if principal.may_use(p)]


async def views_of(request: web.Request) -> list[ProjectView]:
    """The views a read covers: the named project's alone (after its `min_seq`; none when it does
    not exist), else every project's."""
    named = explicit_project(request)
    if named is None:
        return all_views(request)
    view = await read_view(request, named)
    return [view] if view else []
