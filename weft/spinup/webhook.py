"""The `webhook` mechanism: one HTTP request per spin-up to a service that starts the agent.

Config (`config.webhook`): `url`, `method` (POST|GET|PUT), `headers` (values may be `env:NAME` or
`file:PATH` references, resolved at each request, never stored), `bodyTemplate`, `successCodes`
([200, 201, 202]), `timeoutMs`, `healthCheck` (`{url?, method: HEAD|GET}`, default HEAD on `url`),
`stopUrl` with `stopMethod` (POST) and `stopBodyTemplate` (called by `stop`).

Templating: `{{spinUpId}}`, `{{workId}}`, `{{capability}}`, `{{boundary}}`, `{{description}}`,
`{{targetName}}`, `{{targetId}}`, `{{agentType}}`, `{{projectId}}`, `{{natsUrl}}`, `{{timestamp}}`
(and `{{graceful}}` on stop). Work fields are empty when the spin-up has no work item.
- A JSON template (an object or array, or a string holding one) is filled inside its string values
  and re-serialised, so a value with quotes or newlines stays valid JSON; sent as application/json.
- Any other string template is filled as plain text (no escaping); sent as application/json if the
  result parses as JSON, else text/plain. Prefer a JSON template.
- No template: a JSON object holding every variable.
- Placeholders in URLs are percent-encoded. GET sends no body.

Redirects are not followed (a 3xx is a failure unless listed in `successCodes`), so configured
headers never travel to another host. Error messages name the URL's origin only (a path can hold a
token, as Slack-style hook URLs do) and never contain a resolved header value.
"""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import quote, urlsplit

from weft.core.targets import ConfigSchema, fail, opt_int, opt_template, opt_url
from weft.spinup.base import (
    Launched,
    ProbeResult,
    SecretError,
    SpinUpError,
    SpinUpRequest,
    Stopwatch,
    redact,
    resolve_secret,
)
from weft.stamps import utc_now

PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z]+)\s*\}\}")
DEFAULT_SUCCESS = (200, 201, 202)
DEFAULT_TIMEOUT_MS = 30000
DEFAULT_PROBE_TIMEOUT_MS = 10000
READ_LIMIT = 8192  # bytes read from any response
RESPONSE_LIMIT = 1000  # characters of the response kept in the handle
EXCERPT_LIMIT = 200  # characters of the response quoted in an error
# Variables kept in the handle for `stop` (not the NATS URL, which may carry credentials, nor the
# work description, which may be long).
HANDLE_VARS = ("spinUpId", "workId", "capability", "boundary", "targetName", "targetId", "agentType", "projectId")
HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


# --- config (pure) ---------------------------------------------------------------------------------


def _check_config(body: dict[str, Any]) -> None:
    key = SCHEMA.key
    if str(body.get("method", "")).upper() not in ("POST", "GET", "PUT"):
        raise fail(key, "method", "must be POST, GET or PUT")
    body["method"] = str(body["method"]).upper()
    if not re.match(r"^https?://", str(body["url"])):
        raise fail(key, "url", "must be an http(s) URL")
    codes = body.get("successCodes")
    if not (isinstance(codes, list) and codes and all(
            isinstance(c, int) and not isinstance(c, bool) and 100 <= c <= 599 for c in codes)):
        raise fail(key, "successCodes", "must be a non-empty list of HTTP status codes")
    opt_int(body, key, "timeoutMs", 100)
    for name, value in (body.get("headers") or {}).items():
        if not HEADER_NAME.match(str(name)):
            raise fail(key, f"headers.{name}", "is not a valid header name")
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise fail(key, f"headers.{name}", "must be a string")
        if isinstance(value, str) and value.startswith("secret:"):
            raise fail(key, f"headers.{name}", "must be env:NAME or file:PATH: secret: names a Kubernetes secret")
    opt_template(body, key, "bodyTemplate")
    opt_template(body, key, "stopBodyTemplate")
    opt_url(body, key, "stopUrl")
    if body.get("stopMethod") is not None:
        if str(body["stopMethod"]).upper() not in ("POST", "PUT", "DELETE", "GET"):
            raise fail(key, "stopMethod", "must be POST, PUT, DELETE or GET")
        body["stopMethod"] = str(body["stopMethod"]).upper()
    check = body.get("healthCheck")
    if check is not None:
        if not isinstance(check, dict):
            raise fail(key, "healthCheck", "must be an object {url?, method: HEAD|GET}")
        opt_url(check, f"{key}.healthCheck", "url")
        method = str(check.get("method") or "HEAD").upper()
        if method not in ("HEAD", "GET"):
            raise fail(key, "healthCheck.method", "must be HEAD or GET")
        body["healthCheck"] = {**check, "method": method}


SCHEMA = ConfigSchema(
    mechanism="webhook",
    key="webhook",
    required=("url",),
    defaults={"method": "POST", "headers": {}, "successCodes": list(DEFAULT_SUCCESS), "timeoutMs": DEFAULT_TIMEOUT_MS},
    check=_check_config,
)


# --- templating (pure) -----------------------------------------------------------------------------


def template_vars(req: SpinUpRequest) -> dict[str, str]:
    work = req.work or {}
    target = req.target
    return {
        "spinUpId": req.spin_up_id,
        "workId": str(work.get("id") or ""),
        "capability": str(work.get("capability") or ""),
        "boundary": str(work.get("boundary") or ""),
        "description": str(work.get("description") or ""),
        "targetName": str(target["name"]),
        "targetId": str(target["id"]),
        "agentType": str(target["agentType"]),
        "projectId": req.project,
        "natsUrl": req.nats_url,
        "timestamp": utc_now(),
    }


def fill_text(text: str, values: dict[str, str], encode: Any = None) -> str:
    """Replace known `{{name}}` placeholders; unknown ones stay as written."""

    def one(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in values:
            return m.group(0)
        return str(encode(values[name])) if encode is not None else values[name]

    return PLACEHOLDER.sub(one, text)


def fill_json(node: Any, values: dict[str, str]) -> Any:
    """Fill placeholders inside every string value of a JSON document (keys stay as written)."""
    if isinstance(node, str):
        return fill_text(node, values)
    if isinstance(node, list):
        return [fill_json(v, values) for v in node]
    if isinstance(node, dict):
        return {k: fill_json(v, values) for k, v in node.items()}
    return node


def render_body(template: Any, values: dict[str, str]) -> tuple[bytes, str]:
    """(body, content type) for a template (None, a JSON object/array, or a string)."""
    if template is None:
        return json.dumps(values).encode(), "application/json"
    if isinstance(template, str):
        try:
            parsed = json.loads(template)
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict | list):
            text = fill_text(template, values)
            try:
                json.loads(text)
                kind = "application/json"
            except ValueError:
                kind = "text/plain; charset=utf-8"
            return text.encode(), kind
        template = parsed
    return json.dumps(fill_json(template, values)).encode(), "application/json"


def fill_url(url: str, values: dict[str, str]) -> str:
    return fill_text(url, values, encode=lambda v: quote(v, safe=""))


def origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}"


def resolve_headers(configured: dict[str, Any], secrets: list[str]) -> dict[str, str]:
    """Header values, with `env:`/`file:` references resolved now; resolved values go to `secrets`."""
    headers: dict[str, str] = {}
    for name, value in configured.items():
        text = str(value)
        if text.startswith(("env:", "file:")):
            try:
                text = resolve_secret(text)
            except SecretError as err:
                raise SecretError(f"header {name}: {err}") from None
            secrets.append(text)
        elif text.startswith("secret:"):
            raise SecretError(f"header {name}: {text.split('/')[0]} is a Kubernetes secret; a webhook needs env:NAME or file:PATH")
        headers[name] = text
    return headers


class WebhookMechanism:
    name = SCHEMA.mechanism
    requires = ("aiohttp",)  # what build_mechanisms imports before offering this mechanism

    async def _send(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        body: bytes | None,
        timeout_ms: int,
        secrets: list[str],
    ) -> tuple[int, str]:
        """(status, the first characters of the body); failures become SpinUpError."""
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=timeout_ms / 1000)
        where = f"webhook {method} to {origin(url)}"
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.request(method, url, headers=headers, data=body, allow_redirects=False) as resp,
            ):
                raw = await resp.content.read(READ_LIMIT) if method != "HEAD" else b""
                return resp.status, redact(raw.decode("utf-8", errors="replace"), secrets)
        except TimeoutError:
            raise SpinUpError(f"{where} timed out after {timeout_ms} ms") from None
        except (aiohttp.ClientError, ValueError) as err:
            message = redact(str(err).replace(url, origin(url)), secrets)
            raise SpinUpError(f"{where} failed: {type(err).__name__}: {message}"[:500]) from None

    @staticmethod
    def _headers(cfg: dict[str, Any], content_type: str | None, spin_up_id: str | None, secrets: list[str]) -> dict[str, str]:
        headers = {"User-Agent": "weft"}
        if spin_up_id:
            headers["X-Weft-Spinup-Id"] = spin_up_id
        configured = resolve_headers(cfg.get("headers") or {}, secrets)
        if content_type and not any(k.lower() == "content-type" for k in configured):
            headers["Content-Type"] = content_type
        headers.update(configured)
        return headers

    async def _call(
        self, cfg: dict[str, Any], method: str, url: str, template: Any, values: dict[str, str], action: str
    ) -> tuple[int, str]:
        secrets: list[str] = []
        body, content_type = render_body(template, values) if method != "GET" else (None, None)
        headers = self._headers(cfg, content_type, values.get("spinUpId"), secrets)
        target_url = fill_url(url, values)
        status, text = await self._send(
            method, target_url, headers, body, int(cfg.get("timeoutMs") or DEFAULT_TIMEOUT_MS), secrets
        )
        if status not in (cfg.get("successCodes") or DEFAULT_SUCCESS):
            excerpt = " ".join(text.split())[:EXCERPT_LIMIT]
            raise SpinUpError(f"webhook {action} ({method} to {origin(target_url)}) answered {status}: {excerpt or '(empty body)'}")
        return status, text

    async def launch(self, req: SpinUpRequest) -> Launched:
        cfg = req.config
        values = template_vars(req)
        status, text = await self._call(cfg, cfg.get("method") or "POST", cfg["url"], cfg.get("bodyTemplate"), values, "launch")
        return Launched(
            handle={"status": status, "response": text[:RESPONSE_LIMIT], "vars": {k: values[k] for k in HANDLE_VARS}}
        )

    async def stop(self, target: dict[str, Any], handle: dict[str, Any], graceful: bool) -> None:
        """Call `stopUrl` if configured (templated with the launch's variables plus `graceful`)."""
        cfg = target["config"][SCHEMA.key]
        if not cfg.get("stopUrl"):
            return
        values = {k: str(v) for k, v in (handle.get("vars") or {}).items()}
        values.update(graceful="true" if graceful else "false", timestamp=utc_now())
        for name in HANDLE_VARS:
            values.setdefault(name, "")
        await self._call(cfg, cfg.get("stopMethod") or "POST", cfg["stopUrl"], cfg.get("stopBodyTemplate"), values, "stop")

    async def probe(self, target: dict[str, Any]) -> ProbeResult:
        """HEAD (or the configured check) on the URL: healthy on a success code (HEAD: any status < 400)."""
        cfg = target["config"][SCHEMA.key]
        check = cfg.get("healthCheck") or {}
        method = str(check.get("method") or "HEAD").upper()
        values = {"targetName": target["name"], "targetId": target["id"], "agentType": target["agentType"]}
        url = fill_url(str(check.get("url") or cfg["url"]), values)
        # A little under the fleet's own deadline for the probe, so the receiver's answer wins the race.
        timeout_ms = int((target.get("healthCheck") or {}).get("timeoutMs") or DEFAULT_PROBE_TIMEOUT_MS) * 9 // 10
        watch = Stopwatch()
        secrets: list[str] = []
        try:
            headers = self._headers(cfg, None, None, secrets)
            status, text = await self._send(method, url, headers, None, timeout_ms, secrets)
        except SpinUpError as err:
            return ProbeResult("unhealthy", watch.ms, str(err))
        if status in (cfg.get("successCodes") or DEFAULT_SUCCESS) or (method == "HEAD" and status < 400):
            return ProbeResult("healthy", watch.ms, None)
        excerpt = " ".join(text.split())[:EXCERPT_LIMIT]
        return ProbeResult("unhealthy", watch.ms, f"health check {method} to {origin(url)} answered {status}{': ' + excerpt if excerpt else ''}")
