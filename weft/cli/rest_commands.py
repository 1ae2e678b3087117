"""Fleet commands of the `weft` CLI: thin clients of the REST API (submit, work, agents, targets,
stats, dlq, watch). They talk to WEFT_API_URL (or LOOM_API_URL, default http://127.0.0.1:3000)
with WEFT_API_TOKEN (or LOOM_API_TOKEN) as the bearer token.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

TERMINAL = {"completed", "failed", "cancelled"}


@dataclass(frozen=True)
class ClientConfig:
    url: str
    token: str | None
    project: str | None

    @classmethod
    def from_env(cls, env: Mapping[str, str], project: str | None) -> ClientConfig:
        url = env.get("WEFT_API_URL") or env.get("LOOM_API_URL") or "http://127.0.0.1:3000"
        token = env.get("WEFT_API_TOKEN") or env.get("LOOM_API_TOKEN") or None
        return cls(url.rstrip("/"), token, project or env.get("LOOMINAL_PROJECT_ID") or None)


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
            method, self.config.url + path, json=body, params=query, headers=headers
        ) as resp:
            data = await resp.json(content_type=None)
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

    watch = sub.add_parser("watch", help="follow a work item until it is terminal")
    watch.add_argument("id")

    for p in (submit, work, agents, targets, dlq, watch):
        p.add_argument("--project", "-p", default=None)
        p.add_argument("--json", action="store_true", help="print raw JSON")
    sub.choices["stats"].add_argument("--project", "-p", default=None)
    sub.choices["stats"].add_argument("--json", action="store_true")


FLEET_COMMANDS = ("submit", "work", "agents", "targets", "stats", "dlq", "watch")


def _need(value: str | None, what: str) -> str:
    if not value:
        raise SystemExit(f"weft: {what} is required for this action")
    return value


async def _watch(client: FleetClient, work_id: str, out: list[Any]) -> dict[str, Any]:
    """Follow an item by long-polling on the stream sequence, not on a fixed interval."""
    seq = 0
    last: tuple[Any, ...] | None = None
    while True:
        try:
            item: dict[str, Any] = await client.call("GET", f"/api/work/{work_id}", min_seq=seq + 1)
        except ApiError as err:
            if err.status != 503:  # 503 = nothing new within the server's wait: ask again
                raise
            continue
        seq = client.last_seq  # the projection's sequence when it answered: wait for anything newer
        state = (item["status"], item.get("progress"), item.get("progressMessage"))
        if state != last:
            out.append(item)
            print(f"{item['status']:<12} {item.get('progress') or 0:>3}%  {item.get('progressMessage') or ''}")
            last = state
        if item["status"] in TERMINAL:
            return item


async def run_fleet(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    config = ClientConfig.from_env(env, getattr(args, "project", None))
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        client = FleetClient(config, session)
        try:
            result = await _dispatch(client, args)
        except ApiError as err:
            print(f"weft: {err}", file=sys.stderr)
            if isinstance(err.body, dict) and err.body.get("details", {}).get("field"):
                print(f"  field: {err.body['details']['field']}", file=sys.stderr)
            return 1
        except aiohttp.ClientError as err:
            print(f"weft: cannot reach {config.url}: {err}", file=sys.stderr)
            return 1
    if isinstance(result, dict) and not getattr(args, "json", False):
        _print_human(args.command, result)
    elif result is not None:
        sys.stdout.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0


async def _dispatch(client: FleetClient, args: argparse.Namespace) -> Any:
    cmd = args.command
    if cmd == "submit":
        body = {k: v for k, v in {
            "description": args.description, "capability": args.capability, "boundary": args.boundary,
            "priority": args.priority, "taskId": args.task_id, "requiredAgentType": args.required_agent_type,
            "preferredAgentType": args.preferred_agent_type, "maxAttempts": args.max_attempts,
        }.items() if v is not None}
        headers_key = args.idempotency_key
        if headers_key:
            client.session.headers["Idempotency-Key"] = headers_key
        created = await client.call("POST", "/api/work", body)
        if args.wait:
            return await _watch(client, created["id"], [])
        return created
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
    if cmd == "watch":
        return await _watch(client, args.id, [])
    raise SystemExit(f"weft: unknown command {cmd}")


def _print_human(cmd: str, result: dict[str, Any]) -> None:
    rows: list[str] = []
    if "workItems" in result:
        rows = [f"{w['id']}  {w['status']:<11} p{w['priority']:<2} {w['capability']:<12} {w['boundary']:<18} "
                f"{(w.get('waitingReason') or '')}" for w in result["workItems"]]
    elif "agents" in result:
        rows = [f"{a['guid']}  {a['status']:<7} {a['agentType']:<12} {a['currentTaskCount']}/{a['maxConcurrentTasks']} "
                f"{','.join(a['capabilities'])}" for a in result["agents"]]
    elif "targets" in result:
        rows = [f"{t['name']:<20} {t['status']:<9} {t['healthStatus']:<9} {t['mechanism']:<14} {t['agentType']}"
                for t in result["targets"]]
    elif "items" in result:
        rows = [f"{d['id']}  attempts={d['attempts']}  {d['reason']}" for d in result["items"]]
    if rows or any(k in result for k in ("workItems", "agents", "targets", "items")):
        print("\n".join(rows) if rows else "(none)")
        return
    sys.stdout.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")
