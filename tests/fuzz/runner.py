"""Schemathesis against the served OpenAPI document: every phase, with and without tokens.

Checks: no 5xx, responses, status codes and content types as documented, and (`weft_rejections`)
every 4xx in the JSON error shape with no event of its own in the stream (each request carries a
unique X-Correlation-Id; the events appended between before and after the call are read back).
With tokens, one request in ten goes without one and one in ten with a wrong one: 401 unless the
route is open. With scoped tokens (a WEFT_TOKENS_FILE), requests alternate between a `read` token
of one project and a `submit` token of two: a route above the token's role is never a 2xx, and no
2xx answer names a project outside the token's list. Requests run one at a time (workers 1), so
before/after is the request's own.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
import uuid
from typing import Any

import schemathesis
from schemathesis.config import SchemathesisConfig
from schemathesis.engine import events, from_schema

from projections.events import is_valid_project_id
from tests.fuzz.server import FuzzServer
from weft.api.auth import OPEN_PATHS
from weft.core.access import Principal, Role, ScryptParams, TokenEntry, TokenFile, required_role

TOKEN = "fuzz-admin-token"
# Scoped tokens: name -> (token, role, projects).
SCOPED = {"reader": ("fuzz-reader-token", Role.read, ("fuzz-a",)),
          "submitter": ("fuzz-submitter-token", Role.submit, ("fuzz-a", "fuzz-b"))}
# Fuzzed project ids are folded onto a few, so the run does not create a stream per case.
PROJECTS = ("default", "fuzz-a", "fuzz-b")
CHECKS = ("not_a_server_error", "response_schema_conformance", "status_code_conformance",
          "content_type_conformance")


@dataclasses.dataclass
class Sent:
    project: str | None
    seq_before: int
    correlation: str
    auth: str  # good | none | wrong | open
    scoped: str | None = None  # the SCOPED token used, if any


@dataclasses.dataclass
class Run:
    """What the hooks and the check need of the configuration being fuzzed."""

    server: FuzzServer
    tokens: bool
    scoped: bool = False
    calls: int = 0
    sent: dict[int, Sent] = dataclasses.field(default_factory=dict)


CURRENT: Run | None = None


def fold_project(value: Any) -> Any:
    if isinstance(value, str) and is_valid_project_id(value) and value not in PROJECTS:
        return PROJECTS[int(hashlib.sha256(value.encode()).hexdigest(), 16) % len(PROJECTS)]
    return value


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    run = CURRENT
    if run is None:
        return
    run.calls += 1
    if isinstance(case.query, dict) and "projectId" in case.query:
        case.query["projectId"] = fold_project(case.query["projectId"])
    headers = dict(case.headers or {})
    correlation = uuid.uuid4().hex
    headers["X-Correlation-Id"] = correlation
    auth = "open" if case.path in OPEN_PATHS else "good"
    if run.tokens and auth == "good":
        auth = {0: "none", 1: "wrong"}.get(run.calls % 10, "good")
    headers.pop("Authorization", None)
    scoped = ("reader", "submitter")[run.calls % 2] if run.scoped else None
    if scoped is not None and auth in ("good", "open"):
        headers["Authorization"] = f"Bearer {SCOPED[scoped][0]}"
    elif run.tokens and auth in ("good", "open"):
        headers["Authorization"] = f"Bearer {TOKEN}"
    elif auth == "wrong":
        headers["Authorization"] = "Bearer not-the-token"
    case.headers = headers
    raw = case.query.get("projectId") if isinstance(case.query, dict) else None
    project = raw if raw is None or (isinstance(raw, str) and is_valid_project_id(raw)) else None
    if raw is None:  # a token of one project uses it when the request names none
        project = SCOPED[scoped][2][0] if scoped is not None and len(SCOPED[scoped][2]) == 1 else "default"
    seq = run.server.last_seq(project) if project else 0
    run.sent[id(case)] = Sent(project, seq, correlation, auth, scoped)


@schemathesis.check
def weft_rejections(ctx: Any, response: Any, case: Any) -> bool | None:
    """A 4xx is `{error, message, details}` and appended no event; a request without the right
    token is a 401 unless its route is open."""
    run = CURRENT
    sent = run.sent.pop(id(case), None) if run is not None else None
    if run is None or sent is None:
        return None
    status = response.status_code
    if sent.auth in ("none", "wrong") and status != 401:
        raise AssertionError(f"{sent.auth} token answered {status}, not 401")
    if sent.scoped is not None and 200 <= status < 300:
        scope_leak(sent.scoped, case, response)
    if not 400 <= status < 500:
        return None
    try:
        body = response.json()
    except ValueError:
        raise AssertionError(f"4xx body is not JSON ({response.headers.get('content-type')}): "
                             f"{response.text[:200]!r}") from None
    if not (isinstance(body, dict) and isinstance(body.get("error"), str) and isinstance(body.get("message"), str)
            and isinstance(body.get("details"), dict)):
        raise AssertionError(f"4xx body is not the error shape: {str(body)[:200]}")
    if sent.project is not None and run.server.last_seq(sent.project) != sent.seq_before:
        mine = [e for e in run.server.correlations_after(sent.project, sent.seq_before) if e[1] == sent.correlation]
        if mine:
            raise AssertionError(f"rejected request ({status}) appended events {mine}")
    return True


def scope_leak(name: str, case: Any, response: Any) -> None:
    """A 2xx for a scoped token: its role allows the route, and the body names none of the
    projects outside its list."""
    _, role, projects = SCOPED[name]
    if case.path not in OPEN_PATHS and required_role(case.method.upper(), case.path) > role:
        raise AssertionError(f"{name} ({role.name}) got {response.status_code} for {case.method} {case.path}")
    text = response.text
    for other in set(PROJECTS) - set(projects):
        if f'"projectId":"{other}"' in text.replace(" ", "") or f'"project":"{other}"' in text.replace(" ", ""):
            raise AssertionError(f"{name} (projects {projects}) was shown project {other}: {text[:200]}")


def scoped_tokens_file() -> bytes:
    params = ScryptParams(salt=b"fuzz-salt-16byte", n=2**10)  # cheap: the fuzzer presents thousands
    return TokenFile(params, tuple(TokenEntry(Principal(name, role, frozenset(projects)), params.hash(token))
                                   for name, (token, role, projects) in SCOPED.items())).to_json()


@dataclasses.dataclass
class Result:
    name: str
    cases: int
    failures: list[str]
    seed: int
    seconds: float


def config_for(base_url: str, seed: int, max_examples: int) -> SchemathesisConfig:
    checks: dict[str, Any] = {"enabled": False, **{name: {"enabled": True} for name in (*CHECKS, "weft_rejections")}}
    return SchemathesisConfig.from_dict({
        "seed": seed,
        "base-url": base_url,
        "workers": 1,
        "generation": {"max-examples": max_examples, "mode": "all"},
        "checks": checks,
        "phases": {"examples": {"enabled": True}, "coverage": {"enabled": True}, "fuzzing": {"enabled": True},
                   "stateful": {"enabled": True, "max-steps": max(5, max_examples // 5)}},
        "request-timeout": 15,
    })


def fuzz(name: str, *, tokens: bool, seed: int, max_examples: int, scoped: bool = False) -> Result:
    """One configuration: its own nats-server and weft, the whole engine run, then both stopped."""
    global CURRENT
    server = FuzzServer(tokens=(TOKEN,) if tokens else (), tokens_file=scoped_tokens_file() if scoped else None)
    started = time.monotonic()
    base = server.start()
    try:
        CURRENT = Run(server, tokens or scoped, scoped)
        schema = schemathesis.openapi.from_url(f"{base}/api/openapi.json",
                                               config=config_for(base, seed, max_examples))
        cases, failures = 0, []
        for event in from_schema(schema).execute():
            if isinstance(event, events.ScenarioFinished):
                cases += len(event.recorder.interactions)
                for checks in event.recorder.checks.values():
                    for check in checks:
                        if check.status.name == "FAILURE" and check.failure_info is not None:
                            failure = check.failure_info.failure
                            failures.append(f"{event.recorder.label} {check.name}: {failure.title}: "
                                            f"{getattr(failure, 'message', '')}"[:600])
            elif isinstance(event, events.NonFatalError | events.FatalError):
                info = getattr(event, "info", None) or getattr(event, "exception", None)
                failures.append(f"engine error: {str(getattr(info, 'message', info))[:600]}")
    finally:
        CURRENT = None
        server.stop()
    unique = sorted(set(failures))
    return Result(name, cases, unique, seed, time.monotonic() - started)


def fuzz_all(seed: int, max_examples: int) -> list[Result]:
    return [fuzz("no tokens", tokens=False, seed=seed, max_examples=max_examples),
            fuzz("tokens", tokens=True, seed=seed, max_examples=max_examples),
            fuzz("scoped tokens", tokens=False, scoped=True, seed=seed, max_examples=max_examples)]


def report(results: list[Result]) -> str:
    lines = []
    for r in results:
        lines.append(f"fuzz [{r.name}]: cases {r.cases}, failures {len(r.failures)}, seed {r.seed}, "
                     f"{r.seconds:.1f} s")
        lines += [f"  - {f}" for f in r.failures]
    total = sum(r.cases for r in results)
    fails = sum(len(r.failures) for r in results)
    lines.append(f"fuzz total: cases {total}, failures {fails}, seed {results[0].seed if results else '-'}")
    return "\n".join(lines)
