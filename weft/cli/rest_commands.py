"""Fleet commands of the `weft` CLI: thin clients of the REST API (submit, work, agents, targets,
stats, dlq, watch). They talk to WEFT_API_URL (or Shuttle's LOOM_API_URL; default
http://127.0.0.1:3000) with WEFT_API_TOKEN (or LOOM_API_TOKEN) as the bearer token, for the project
given by --project, else WEFT_PROJECT / LOOMINAL_PROJECT_ID, else the server's default.

Output: `--json` prints the API's answer as JSON (`watch` and `submit --wait`: one JSON document per
line, each update); otherwise aligned tables, coloured by rich on a terminal, plain text when piped
(weft.cli.output). `watch` follows over the WebSocket API (weft.cli.live).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from weft.cli.live import follow_item, watch_project
from weft.cli.output import Output

REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=60)


@dataclass(frozen=True)
class ClientConfig:
    url: str
    token: str | None
    project: str | None

    @classmethod
    def from_env(cls, env: Mapping[str, str], project: str | None) -> ClientConfig:
        url = env.get("WEFT_API_URL") or env.get("LOOM_API_URL") or "http://127.0.0.1:3000"
        token = env.get("WEFT_API_TOKEN") or env.get("LOOM_API_TOKEN") or None
        project = project or env.get("WEFT_PROJECT") or env.get("LOOMINAL_PROJECT_ID") or None
        return cls(url.strip().rstrip("/"), token.strip() if token else None, project)


class ApiError(Exception):
    def __init__(self, status: int, body: Any) -> None:
        detail = body.get("message") if isinstance(body, dict) else str(body)
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.body = body


class FleetClient:
    def __init__(self, config: ClientConfig, session: aiohttp.ClientSession) -> None:
        self.config = config
        self.session = session
        self.last_seq = 0

    async def call(self, method: str, path: str, body: Any = None, **params: Any) -> Any:
        headers = {"Authorization": f"Bearer {self.config.token}"} if self.config.token else {}
        query = {k: str(v) for k, v in params.items() if v is not None}
        if self.config.project:
            query.setdefault("projectId", self.config.project)
        async with self.session.request(
            method, self.config.url + path, json=body, params=query, headers=headers, timeout=REQUEST_TIMEOUT
        ) as resp:
            raw = await resp.read()
            try:
                data = orjson.loads(raw) if raw else None
            except orjson.JSONDecodeError:
                data = {"message": raw.decode(errors="replace")[:200]}
            self.last_seq = int(resp.headers.get("X-Weft-Seq", "0") or 0)
            if resp.status >= 400:
                raise ApiError(resp.status, data)
            return data


def add_fleet_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    submit = sub.add_parser("submit", help="submit a work item")
    submit.add_argument("description")
    submit.add_argument("--capability", required=True)
    submit.add_argument("--boundary", required=True)
    submit.add_argument("--priority", type=int, default=None)
    submit.add_argument("--task-id", default=None)
    submit.add_argument("--agent-type", dest="required_agent_type", default=None, help="required agent type")
    submit.add_argument("--prefer", dest="preferred_agent_type", default=None, help="preferred agent type")
    submit.add_argument("--max-attempts", type=int, default=None)
    submit.add_argument("--idempotency-key", default=None)
    submit.add_argument("--wait", action="store_true", help="wait until the item is terminal")

    work = sub.add_parser("work", help="list work items, or show/cancel one")
    work.add_argument("action", nargs="?", choices=["list", "show", "cancel"], default="list")
    work.add_argument("id", nargs="?")
    work.add_argument("--status")
    work.add_argument("--boundary")
    work.add_argument("--limit", type=int, default=50)

    agents = sub.add_parser("agents", help="list agents, or show/shutdown one")
    agents.add_argument("action", nargs="?", choices=["list", "show", "shutdown"], default="list")
    agents.add_argument("guid", nargs="?")
    agents.add_argument("--type")
    agents.add_argument("--status")
    agents.add_argument("--capability")
    agents.add_argument("--force", action="store_true", help="forced (not graceful) shutdown")

    targets = sub.add_parser("targets", help="list, show, test, enable, disable or remove targets")
    targets.add_argument("action", nargs="?", choices=["list", "show", "test", "enable", "disable", "remove"],
                         default="list")
    targets.add_argument("target", nargs="?")

    sub.add_parser("stats", help="fleet statistics")

    dlq = sub.add_parser("dlq", help="dead-letter queue: list, retry, discard")
    dlq.add_argument("action", nargs="?", choices=["list", "retry", "discard"], default="list")
    dlq.add_argument("id", nargs="?")

    watch = sub.add_parser(
        "watch", help="follow a work item until it is terminal; without an id, a live view of the project",
        description="With an id: print each status/progress change of the item until it is terminal. "
                    "Without: a live view of the project (queue, agents, recent events) over the WebSocket "
                    "API (polling a weft without it); one line per event when piped. Ctrl-C stops.")
    watch.add_argument("id", nargs="?", help="a work item id")
    watch.add_argument("--for", dest="for_s", type=float, default=None, metavar="SECONDS",
                       help="stop the project view after this long")
    watch.add_argument("--events", dest="max_events", type=int, default=None, metavar="N",
                       help="stop the project view after N events")
    watch.add_argument("--from-seq", type=int, default=None, metavar="SEQ",
                       help="start the project view's events at this stream sequence (default: from now)")
    watch.add_argument("--interval", type=float, default=1.0, metavar="SECONDS",
                       help="polling interval without the WebSocket API (default 1)")

    stats = sub.choices["stats"]
    for p in (submit, work, agents, targets, stats, dlq, watch):
        p.add_argument("--project", "-p", default=None, help="project (default: WEFT_PROJECT, LOOMINAL_PROJECT_ID, "
                                                               "else the server's)")
        p.add_argument("--json", action="store_true", help="print the API's JSON")


FLEET_COMMANDS = ("submit", "work", "agents", "targets", "stats", "dlq", "watch")


def _need(value: str | None, what: str) -> str:
    if not value:
        raise SystemExit(f"weft: {what} is required for this action")
    return value


async def run_fleet(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    config = ClientConfig.from_env(env, getattr(args, "project", None))
    out = Output(json=getattr(args, "json", False))
    # No session-wide timeout: REST calls carry their own (REQUEST_TIMEOUT), a WebSocket lives long.
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=15)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        client = FleetClient(config, session)
        try:
            return await _dispatch(client, args, out)
        except ApiError as err:
            print(f"weft: {err}", file=sys.stderr)
            if isinstance(err.body, dict) and (err.body.get("details") or {}).get("field"):
                print(f"  field: {err.body['details']['field']}", file=sys.stderr)
            return 1
        except (aiohttp.ClientError, TimeoutError) as err:
            print(f"weft: cannot reach {config.url}: {err or type(err).__name__}", file=sys.stderr)
            return 1


def _exit_of(item: dict[str, Any]) -> int:
    """`submit --wait` and `watch <id>`: 0 if the item completed, 1 if it failed or was cancelled."""
    return 0 if item.get("status") == "completed" else 1


async def _dispatch(client: FleetClient, args: argparse.Namespace, out: Output) -> int:
    cmd = args.command
    if cmd == "submit":
        body = {k: v for k, v in {
            "description": args.description, "capability": args.capability, "boundary": args.boundary,
            "priority": args.priority, "taskId": args.task_id, "requiredAgentType": args.required_agent_type,
            "preferredAgentType": args.preferred_agent_type, "maxAttempts": args.max_attempts,
        }.items() if v is not None}
        if args.idempotency_key:
            client.session.headers["Idempotency-Key"] = args.idempotency_key
        created = await client.call("POST", "/api/work", body)
        if args.wait:
            if not out.json:
                out.write(f"submitted {created['id']}")
            return _exit_of(await follow_item(client, created["id"], out))
        return show(out, "submit", created)
    if cmd == "watch":
        if args.id:
            return _exit_of(await follow_item(client, args.id, out, poll_s=args.interval))
        return await watch_project(client, out, for_s=args.for_s, max_events=args.max_events,
                                   from_seq=args.from_seq, poll_s=args.interval)
    return show(out, cmd, await _request(client, args), getattr(args, "action", None))


async def _request(client: FleetClient, args: argparse.Namespace) -> Any:
    cmd = args.command
    if cmd == "work":
        if args.action == "show":
            return await client.call("GET", f"/api/work/{_need(args.id, 'id')}")
        if args.action == "cancel":
            return await client.call("POST", f"/api/work/{_need(args.id, 'id')}/cancel", {})
        return await client.call("GET", "/api/work", status=args.status, boundary=args.boundary, limit=args.limit)
    if cmd == "agents":
        if args.action == "show":
            return await client.call("GET", f"/api/agents/{_need(args.guid, 'guid')}")
        if args.action == "shutdown":
            return await client.call("POST", f"/api/agents/{_need(args.guid, 'guid')}/shutdown",
                                     {"graceful": not args.force})
        return await client.call("GET", "/api/agents", type=args.type, status=args.status, capability=args.capability)
    if cmd == "targets":
        if args.action == "list":
            return await client.call("GET", "/api/targets")
        target = _need(args.target, "target")
        if args.action == "show":
            return await client.call("GET", f"/api/targets/{target}")
        if args.action == "remove":
            return await client.call("DELETE", f"/api/targets/{target}")
        return await client.call("POST", f"/api/targets/{target}/{args.action}", {})
    if cmd == "stats":
        return await client.call("GET", "/api/stats")
    if cmd == "dlq":
        if args.action == "list":
            return await client.call("GET", "/api/dlq")
        return await client.call("POST", f"/api/dlq/{_need(args.id, 'id')}/{args.action}", {})
    raise SystemExit(f"weft: unknown command {cmd}")


# --- human output ----------------------------------------------------------------------------------


def _age(ts: Any) -> str:
    return str(ts or "")[:19].replace("T", " ")


def show(out: Output, cmd: str, result: Any, action: str | None = None) -> int:
    """Print a command's answer: JSON with --json, else a table or the record's fields."""
    if out.json:
        out.json_doc(result)
        return 0
    if not isinstance(result, dict):
        out.write(str(result) if result is not None else "ok")
        return 0
    if "workItems" in result:
        out.table(["id", "status", "pri", "capability", "boundary", "agent", "description / waiting"],
                  [[w["id"], w["status"], w.get("priority"), w.get("capability"), w.get("boundary"),
                    w.get("assignedTo"), w.get("waitingReason") or w.get("description")]
                   for w in result["workItems"]], status_cols=(1,))
    elif "agents" in result and isinstance(result["agents"], list):
        out.table(["guid", "status", "type", "load", "capabilities", "boundaries", "handle"],
                  [[a["guid"], a.get("status"), a.get("agentType"),
                    f"{a.get('currentTaskCount', 0)}/{a.get('maxConcurrentTasks', 0)}", a.get("capabilities"),
                    a.get("boundaries"), a.get("handle")] for a in result["agents"]], status_cols=(1,))
    elif "targets" in result and isinstance(result["targets"], list):
        out.table(["name", "status", "health", "mechanism", "agent type", "capabilities"],
                  [[t.get("name"), t.get("status"), t.get("healthStatus"), t.get("mechanism"), t.get("agentType"),
                    t.get("capabilities")] for t in result["targets"]], status_cols=(1, 2))
    elif "items" in result and isinstance(result["items"], list):  # the DLQ
        out.table(["id", "attempts", "reason", "capability", "dead since"],
                  [[d.get("id"), d.get("attempts"), d.get("reason"), (d.get("workItem") or {}).get("capability"),
                    _age(d.get("deadLetteredAt") or (d.get("workItem") or {}).get("updatedAt"))]
                   for d in result["items"]])
    elif cmd == "stats":
        _show_stats(out, result)
    elif cmd in ("submit", "work") and "id" in result and "status" in result:
        _show_item(out, result)
    elif "workItem" in result:  # cancel
        _show_item(out, result["workItem"], "cancelled" + (" (already)" if result.get("alreadyCancelled") else ""))
    elif cmd == "agents" and "guid" in result:
        out.fields([(k, result.get(k)) for k in ("guid", "handle", "agentType", "status", "capabilities",
                                                  "boundaries", "currentTaskCount", "maxConcurrentTasks",
                                                  "hostname", "lastHeartbeat", "registeredAt")])
    elif cmd == "targets" and "name" in result:
        out.fields([(k, result.get(k)) for k in ("id", "name", "status", "healthStatus", "mechanism", "agentType",
                                                  "capabilities", "boundaries", "maxConcurrentAgents",
                                                  "lastHealthCheck", "description")])
    else:  # acknowledgements: {success, message, seq, ...}
        out.fields([(k, v) for k, v in result.items() if not isinstance(v, dict | list)])
    return 0


def _show_item(out: Output, item: dict[str, Any], title: str | None = None) -> None:
    err = item.get("error") or {}
    out.fields([("id", item.get("id")), ("status", item.get("status")), ("taskId", item.get("taskId")),
                ("projectId", item.get("projectId")), ("targetAgentType", item.get("targetAgentType")),
                ("capability", item.get("capability")), ("boundary", item.get("boundary")),
                ("priority", item.get("priority")), ("assignedTo", item.get("assignedTo")),
                ("progress", f"{item['progress']}%" if item.get("progress") is not None else None),
                ("progressMessage", item.get("progressMessage")), ("waiting", item.get("waitingReason")),
                ("attempts", item.get("attempts")), ("error", err.get("message") if isinstance(err, dict) else err),
                ("result", (item.get("result") or {}).get("summary") if isinstance(item.get("result"), dict)
                 else item.get("result")),
                ("description", item.get("description")), ("createdAt", item.get("createdAt")),
                ("updatedAt", item.get("updatedAt")), ("seq", item.get("seq"))], title)


def _show_stats(out: Output, result: dict[str, Any]) -> None:
    flat = [(k, result.get(k)) for k in ("projectId", "pending", "active", "completed", "failed", "total")
            if k in result]
    if flat:
        out.fields(flat)
    totals = result.get("totals")
    if isinstance(totals, dict):
        out.table(["total", "value"], [[k, v] for k, v in totals.items() if not isinstance(v, dict | list)])
    by_project = result.get("byProject")
    if isinstance(by_project, dict) and by_project:
        keys = ("agents", "pendingWork", "activeWork", "completedWork", "failedWork", "targets")
        out.table(["project", *keys], [[p, *[(v or {}).get(k) for k in keys]] for p, v in sorted(by_project.items())])
