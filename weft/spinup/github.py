"""The `github-actions` mechanism: one `workflow_dispatch` run per spin-up, through GitHub's REST API.

The workflow must declare the inputs weft sends (GitHub rejects undeclared inputs with 422), and
should name its run after the spin-up so weft finds *its* run, not merely the newest one:

    run-name: weft ${{ inputs.weft_spinup_id }}
    on:
      workflow_dispatch:
        inputs:
          weft_spinup_id: {required: true, type: string}
          weft_work_id: {required: false, type: string}
          weft_nats_url: {required: true, type: string}
          weft_project: {required: true, type: string}
    jobs:
      agent:
        runs-on: ubuntu-latest
        env:
          WEFT_SPINUP_ID: ${{ inputs.weft_spinup_id }}
          WEFT_WORK_ID: ${{ inputs.weft_work_id }}
          NATS_URL: ${{ inputs.weft_nats_url }}
          LOOMINAL_PROJECT_ID: ${{ inputs.weft_project }}
          NATS_USER: ${{ secrets.NATS_USER }}
          NATS_PASS: ${{ secrets.NATS_PASS }}
        steps:
          - run: weft agent --type <agentType> --capabilities <...> --idle-exit 300

Inputs are visible to anyone who can read the repository's Actions runs: secrets (NATS credentials,
model API keys) belong in repository secrets, never in `inputs` or in the NATS URL.

Config (`config.githubActions`): `repo` (owner/name), `workflow` (file name or id), `ref` (main),
`token` (`env:`/`file:` reference) or else the variable named by `tokenEnvVar` (GITHUB_TOKEN), `inputs`
(extra, sent as strings), `apiUrl` (https://api.github.com; GitHub Enterprise: https://HOST/api/v3),
`startTimeoutMs` (how long to look for the run), `requestTimeoutMs`, `returnRunDetails` (ask GitHub to
answer the dispatch with the run id, a 2026 API addition; off by default for GitHub Enterprise Server).

The run id only serves `stop` (cancel): a spin-up succeeds when an agent registers with its spin-up
id, so a run not found in time still launches successfully, with `runId: null`.
"""

from __future__ import annotations

import asyncio
import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

from projections.events import format_ts, parse_ts
from weft.core.targets import ConfigSchema, fail, opt_bool, opt_int, opt_resolvable_ref, opt_str, opt_url
from weft.spinup.base import (
    Launched,
    ProbeResult,
    SpinUpError,
    SpinUpRequest,
    Stopwatch,
    redact,
    resolve_secret,
)

API_VERSION = "2022-11-28"
DEFAULT_API_URL = "https://api.github.com"
DEFAULT_REQUEST_TIMEOUT_MS = 30000
DEFAULT_PROBE_TIMEOUT_MS = 10000
CREATED_SLACK = timedelta(minutes=1)  # clock skew between us and GitHub
FIRST_POLL_DELAY_S = 0.25
MAX_POLL_DELAY_S = 3.0
MESSAGE_LIMIT = 300
HINTS = {
    401: " (the token was rejected)",
    403: " (the token lacks actions:write on the repository, or a rate limit was hit)",
    404: " (no such repository or workflow, or the token cannot see it)",
}
WEFT_INPUTS = ("weft_spinup_id", "weft_work_id", "weft_nats_url", "weft_project")  # set by dispatch_body


def _check_config(body: dict[str, Any]) -> None:
    key = SCHEMA.key
    if not re.match(r"^[\w.-]+/[\w.-]+$", str(body["repo"])):
        raise fail(key, "repo", "must be owner/name")
    workflow = body["workflow"]
    if isinstance(workflow, bool) or not isinstance(workflow, str | int):
        raise fail(key, "workflow", "must be a workflow file name or id")
    opt_str(body, key, "ref")
    if body.get("tokenEnvVar") is not None and not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", str(body["tokenEnvVar"])):
        raise fail(key, "tokenEnvVar", "must be an environment variable name")
    opt_resolvable_ref(body, key, "token")
    opt_url(body, key, "apiUrl")
    opt_int(body, key, "startTimeoutMs", 0)
    opt_int(body, key, "requestTimeoutMs", 100)
    opt_bool(body, key, "returnRunDetails")
    for name, value in (body.get("inputs") or {}).items():
        if name in WEFT_INPUTS:
            raise fail(key, f"inputs.{name}", "is set by weft for each spin-up")
        if value is not None and not isinstance(value, str | int | float | bool):
            raise fail(key, f"inputs.{name}", "must be a string, number or boolean (inputs are sent as strings)")


SCHEMA = ConfigSchema(
    mechanism="github-actions",
    key="githubActions",
    required=("repo", "workflow"),
    defaults={"ref": "main", "tokenEnvVar": "GITHUB_TOKEN", "inputs": {}, "startTimeoutMs": 5000},
    aliases={"workflowFile": "workflow"},
    check=_check_config,
)


def token_of(cfg: dict[str, Any]) -> str:
    """The API token, resolved at the moment of use: `token` reference first, else `tokenEnvVar`."""
    if cfg.get("token"):
        return resolve_secret(cfg["token"])
    return resolve_secret(f"env:{cfg.get('tokenEnvVar') or 'GITHUB_TOKEN'}")


def input_value(value: Any) -> str:
    """workflow_dispatch inputs are strings."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return ""
    return json.dumps(value, separators=(",", ":"))


def dispatch_body(req: SpinUpRequest) -> dict[str, Any]:
    cfg = req.config
    inputs = {name: input_value(v) for name, v in (cfg.get("inputs") or {}).items()}
    inputs.update(
        weft_spinup_id=req.spin_up_id,
        weft_work_id=req.work["id"] if req.work is not None else "",
        weft_nats_url=req.nats_url,
        weft_project=req.project,
    )
    body: dict[str, Any] = {"ref": cfg.get("ref") or "main", "inputs": inputs}
    if cfg.get("returnRunDetails"):
        body["return_run_details"] = True
    return body


def github_message(body: Any, text: str) -> str:
    """GitHub's own explanation: `message`, plus the first of `errors` when it says more."""
    if isinstance(body, dict) and body.get("message"):
        message = str(body["message"])
        errors = body.get("errors")
        if isinstance(errors, list) and errors:
            first = errors[0]
            detail = (first.get("message") or first.get("code")) if isinstance(first, dict) else first
            if detail and str(detail) not in message:
                message = f"{message}: {detail}"
        return message[:MESSAGE_LIMIT]
    return text.strip()[:MESSAGE_LIMIT] or "(empty response)"


def run_matches(run: dict[str, Any], spin_up_id: str) -> bool:
    return any(spin_up_id in str(run.get(k) or "") for k in ("name", "display_title"))


class GitHubApi:
    """The few GitHub REST calls the mechanism makes, for one target's config and token."""

    def __init__(self, cfg: dict[str, Any], token: str, timeout_s: float) -> None:
        self.cfg = cfg
        self.token = token
        self.timeout_s = timeout_s
        owner, _, name = str(cfg["repo"]).partition("/")
        base = str(cfg.get("apiUrl") or DEFAULT_API_URL).rstrip("/")
        self.repo_url = f"{base}/repos/{quote(owner, safe='')}/{quote(name, safe='')}"
        self.workflow_url = f"{self.repo_url}/actions/workflows/{quote(str(cfg['workflow']), safe='')}"

    def headers(self) -> dict[str, str]:
        return {
            "Accept": "application/vnd.github+json",
            "X-GitHub-Api-Version": API_VERSION,
            "Authorization": f"Bearer {self.token}",
            "User-Agent": "weft",
        }

    async def call(self, method: str, url: str, **kw: Any) -> tuple[int, Any, str]:
        """(status, parsed JSON body or None, raw text); network failures become SpinUpError."""
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout, headers=self.headers()) as session,
                session.request(method, url, allow_redirects=False, **kw) as resp,
            ):
                text = await resp.text(errors="replace")
                status = resp.status
        except TimeoutError:
            raise SpinUpError(f"GitHub API did not answer {method} within {self.timeout_s:g} s") from None
        except aiohttp.ClientError as err:
            raise SpinUpError(redact(f"GitHub API unreachable: {err}", [self.token])[:500]) from None
        try:
            body = json.loads(text) if text else None
        except ValueError:
            body = None
        return status, body, text

    def error(self, action: str, status: int, body: Any, text: str) -> SpinUpError:
        message = github_message(body, text)
        return SpinUpError(redact(f"GitHub {action} failed: {status} {message}{HINTS.get(status, '')}", [self.token]))

    async def dispatch(self, body: dict[str, Any]) -> dict[str, Any] | None:
        """Create the workflow_dispatch event; GitHub's run details when it returned them."""
        status, answer, text = await self.call("POST", f"{self.workflow_url}/dispatches", json=body)
        if status == 422 and body.get("return_run_details") and "return_run_details" in text:
            # A GitHub Enterprise Server without the 2026 API: dispatch again without the flag.
            body = {k: v for k, v in body.items() if k != "return_run_details"}
            status, answer, text = await self.call("POST", f"{self.workflow_url}/dispatches", json=body)
        if status == 204:
            return None
        if status == 200:
            return answer if isinstance(answer, dict) else None
        raise self.error(f"dispatch of {self.cfg['workflow']} in {self.cfg['repo']}", status, answer, text)

    async def find_run(self, spin_up_id: str, since: datetime) -> dict[str, Any] | None:
        """The workflow_dispatch run named after this spin-up, created since `since`, if listed yet."""
        params = {
            "event": "workflow_dispatch",
            "created": ">=" + since.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "per_page": "100",
        }
        status, answer, text = await self.call("GET", f"{self.workflow_url}/runs", params=params)
        if status != 200:
            raise self.error("listing runs", status, answer, text)
        runs = answer.get("workflow_runs") if isinstance(answer, dict) else None
        for run in runs or []:
            if isinstance(run, dict) and run_matches(run, spin_up_id):
                return run
        return None

    async def cancel(self, run_id: int | str) -> None:
        status, answer, text = await self.call("POST", f"{self.repo_url}/actions/runs/{run_id}/cancel")
        if status in (202, 204, 404, 409):  # cancelling, gone, or already finished
            return
        raise self.error(f"cancelling run {run_id}", status, answer, text)


class GithubActionsMechanism:
    name = SCHEMA.mechanism
    requires = ("aiohttp",)  # what build_mechanisms imports before offering this mechanism

    @staticmethod
    def _api(cfg: dict[str, Any], timeout_ms: int | None = None) -> GitHubApi:
        timeout = timeout_ms or int(cfg.get("requestTimeoutMs") or DEFAULT_REQUEST_TIMEOUT_MS)
        return GitHubApi(cfg, token_of(cfg), timeout / 1000)

    async def launch(self, req: SpinUpRequest) -> Launched:
        cfg = req.config
        api = self._api(cfg)
        dispatched_at = datetime.now(UTC)
        details = await api.dispatch(dispatch_body(req))
        handle: dict[str, Any] = {
            "repo": cfg["repo"],
            "workflow": cfg["workflow"],
            "runId": None,
            "runUrl": None,
            "spinUpId": req.spin_up_id,
            "dispatchedAt": format_ts(dispatched_at),
        }
        if details and details.get("workflow_run_id"):
            handle.update(runId=details["workflow_run_id"], runUrl=details.get("html_url"))
            return Launched(handle=handle)
        try:
            run = await self._poll_for_run(api, req.spin_up_id, dispatched_at, int(cfg.get("startTimeoutMs") or 0))
        except SpinUpError as err:
            # The dispatch went through; not finding the run (e.g. no actions:read) costs only `stop`.
            handle["runLookupError"] = str(err)
            return Launched(handle=handle)
        if run is not None:
            handle.update(runId=run.get("id"), runUrl=run.get("html_url"))
        return Launched(handle=handle)

    @staticmethod
    async def _poll_for_run(api: GitHubApi, spin_up_id: str, since: datetime, timeout_ms: int) -> dict[str, Any] | None:
        """Look for the run by spin-up id with bounded exponential backoff, for up to `timeout_ms`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_ms / 1000
        delay = FIRST_POLL_DELAY_S
        while True:
            run = await api.find_run(spin_up_id, since - CREATED_SLACK)
            remaining = deadline - loop.time()
            if run is not None or remaining <= 0:
                return run
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 2, MAX_POLL_DELAY_S)

    async def stop(self, target: dict[str, Any], handle: dict[str, Any], graceful: bool) -> None:
        """Cancel the run on a forced stop; a graceful stop leaves the agent to exit by itself."""
        if graceful:
            return
        cfg = target["config"][SCHEMA.key]
        api = self._api(cfg)
        run_id = handle.get("runId")
        if run_id is None and handle.get("spinUpId") and handle.get("dispatchedAt"):
            # Not found at launch (GitHub can take longer than startTimeoutMs to list it): look again.
            since = parse_ts(str(handle["dispatchedAt"]))
            run = await api.find_run(str(handle["spinUpId"]), since - CREATED_SLACK)
            run_id = run.get("id") if run else None
        if run_id is not None:
            await api.cancel(run_id)

    async def probe(self, target: dict[str, Any]) -> ProbeResult:
        """Healthy when the workflow exists, the token can read it, and its state is `active`."""
        cfg = target["config"][SCHEMA.key]
        watch = Stopwatch()
        try:
            # A little under the fleet's own deadline for the probe, so GitHub's answer wins the race.
            timeout_ms = int((target.get("healthCheck") or {}).get("timeoutMs") or DEFAULT_PROBE_TIMEOUT_MS) * 9 // 10
            api = self._api(cfg, timeout_ms)
            status, answer, text = await api.call("GET", api.workflow_url)
        except SpinUpError as err:
            return ProbeResult("unhealthy", watch.ms, str(err))
        if status != 200:
            return ProbeResult("unhealthy", watch.ms, str(api.error(f"reading workflow {cfg['workflow']}", status, answer, text)))
        state = answer.get("state") if isinstance(answer, dict) else None
        if state != "active":
            return ProbeResult("unhealthy", watch.ms, f"workflow {cfg['workflow']} in {cfg['repo']} is {state or 'in an unknown state'}")
        return ProbeResult("healthy", watch.ms, None)
