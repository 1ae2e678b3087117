"""`weft watch`: following one work item, or a live view of a project, over the WebSocket API
(`/api/ws`), with a polling fallback for a weft without it (the upgrade answers 404 or similar).

The WebSocket authenticates with the subprotocols `bearer, <token>` (never `?token=`: the token stays
out of URLs and logs). Every event carries the stream `seq`; a reconnect subscribes again from the
last seq seen + 1, so nothing is missed or repeated. An item is read over REST with
`min_seq=<the event's seq>` after each of its events: that seq is in the stream, so the read waits
(bounded) until the replica has folded it and never asks for a sequence the stream does not have.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncGenerator, Callable
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson

from weft.cli.output import Output

if TYPE_CHECKING:
    from weft.cli.rest_commands import FleetClient

TERMINAL = {"completed", "failed", "cancelled"}
# An upgrade refused with one of these: this weft has no WebSocket API (or a proxy drops upgrades).
NO_WEBSOCKET = {400, 404, 405, 426, 501}
RECONNECTS = 8  # consecutive failed connections before giving up


class NoWebSocket(Exception):
    """The server has no WebSocket API: fall back to polling."""


def ws_url(http_url: str) -> str:
    if http_url.startswith("https://"):
        return "wss://" + http_url[len("https://"):] + "/api/ws"
    if http_url.startswith("http://"):
        return "ws://" + http_url[len("http://"):] + "/api/ws"
    return http_url + "/api/ws"


async def events(
    client: FleetClient, subscriptions: Callable[[], list[dict[str, Any]]], on_other: Callable[[dict[str, Any]], None]
    | None = None,
) -> AsyncGenerator[dict[str, Any], None]:
    """Event messages of the subscriptions, across reconnects: `subscriptions()` is called on each
    (re)connect, so it subscribes from the last seq seen + 1. Raises NoWebSocket when the server
    refuses the upgrade as unknown; an `error` message from the server is an ApiError."""
    from weft.cli.rest_commands import ApiError

    token = client.config.token
    protocols = ("bearer", token) if token else ()
    failures = 0
    while True:
        try:
            async with client.session.ws_connect(
                ws_url(client.config.url), protocols=protocols, heartbeat=20,
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=5),
            ) as ws:
                for sub in subscriptions():
                    await ws.send_json(sub)
                async for msg in ws:
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        continue
                    data = orjson.loads(msg.data)
                    kind = data.get("type")
                    if kind == "ack":
                        failures = 0
                    elif kind == "error":
                        raise ApiError(400, {"message": f"WebSocket: {data.get('error')}"})
                    elif kind == "event":
                        yield data
                    elif on_other is not None:
                        on_other(data)
        except aiohttp.WSServerHandshakeError as err:
            if err.status in (401, 403):
                raise ApiError(err.status, {"message": f"WebSocket upgrade refused: {err.message}"}) from None
            if err.status in NO_WEBSOCKET:
                raise NoWebSocket(str(err.status)) from None
            failures += 1
        except (aiohttp.ClientConnectionError, OSError, TimeoutError):
            failures += 1
        else:  # closed by the server (going away, slow consumer): connect again, from the last seq
            failures += 1
        if failures > RECONNECTS:
            raise aiohttp.ClientConnectionError(f"WebSocket lost {failures} times in a row")
        await asyncio.sleep(min(5.0, 0.1 * 2**failures))


class ItemPrinter:
    """Prints an item each time its status or progress changes: a line, or a JSON line."""

    def __init__(self, out: Output) -> None:
        self.out = out
        self.last: tuple[Any, ...] | None = None
        self.seen: list[dict[str, Any]] = []

    def show(self, item: dict[str, Any]) -> None:
        state = (item["status"], item.get("progress"), item.get("progressMessage"), item.get("assignedTo"))
        if state == self.last:
            return
        self.last = state
        self.seen.append(item)
        if self.out.json:
            self.out.json_line(item)
            return
        line = f"{item['status']:<12} {item.get('progress') or 0:>3}%  {item.get('progressMessage') or ''}".rstrip()
        if item.get("assignedTo") and item["status"] in ("assigned", "in-progress"):
            line += f"  [{item['assignedTo']}]" if not item.get("progressMessage") else ""
        if item["status"] == "failed" and (item.get("error") or {}).get("message"):
            line += f"  {item['error']['message']}"
        if self.out.tty:
            from rich.markup import escape

            head, _, rest = line.partition(" ")
            self.out.console.print(self.out.styled(head) + " " + escape(rest))
        else:
            self.out.write(line)


async def _read(client: FleetClient, work_id: str, min_seq: int | None = None) -> dict[str, Any]:
    from weft.cli.rest_commands import ApiError

    while True:
        try:
            item: dict[str, Any] = await client.call("GET", f"/api/work/{work_id}", min_seq=min_seq)
            return item
        except ApiError as err:
            if err.status != 503:  # 503: not folded within the replica's wait, or NATS away: ask again
                raise
            await asyncio.sleep(0.5)


async def follow_item(client: FleetClient, work_id: str, out: Output, poll_s: float = 1.0) -> dict[str, Any]:
    """Print each status/progress change of the item; return it once terminal."""
    printer = ItemPrinter(out)
    item = await _read(client, work_id)
    seq = client.last_seq  # the projection's sequence when it answered: events after it are news
    printer.show(item)
    if item["status"] in TERMINAL:
        return item
    project = client.config.project or item.get("projectId")

    def subscribe() -> list[dict[str, Any]]:
        sub: dict[str, Any] = {"type": "subscribe", "topic": "work", "fromSeq": seq + 1}
        if item.get("taskId"):  # the narrowest filter the server has; the work id is checked here
            sub["filter"] = {"taskId": item["taskId"]}
        if project:
            sub["projectId"] = project
        return [sub]

    try:
        async with contextlib.aclosing(events(client, subscribe)) as stream:
            async for ev in stream:
                seq = max(seq, int(ev.get("seq") or 0))
                if (ev.get("data") or {}).get("workId") != work_id:
                    continue  # another item with the same taskId
                item = await _read(client, work_id, min_seq=seq)
                printer.show(item)
                if item["status"] in TERMINAL:
                    return item
    except NoWebSocket:
        pass
    while True:  # a weft without /api/ws: poll
        await asyncio.sleep(poll_s)
        item = await _read(client, work_id)
        printer.show(item)
        if item["status"] in TERMINAL:
            return item
    raise AssertionError("unreachable")


# --- the live view of a project --------------------------------------------------------------------


def describe(ev: dict[str, Any]) -> str:
    """One line for an event: what it is about and the gist."""
    d = ev.get("data") or {}
    name = ev.get("event", "")
    if name.startswith("work:"):
        parts = [d.get("workId") or ""]
        if name == "work:submitted":
            parts += [f"{d.get('capability')}/{d.get('boundary')}", f"p{d.get('priority')}", d.get("description") or ""]
        elif d.get("assignedTo"):
            parts.append(f"agent={d['assignedTo']}")
        if name == "work:progress":
            parts.append(f"{d.get('progress')}%")
        if name == "work:failed" and d.get("errorMessage"):
            parts.append(d["errorMessage"])
        return " ".join(str(p) for p in parts if p)
    if name.startswith("agent:"):
        agent = d.get("agent") or {}
        parts = [agent.get("guid") or "", agent.get("agentType") or ""]
        if name == "agent:registered":
            parts.append(",".join(d.get("capabilities") or []))
        if name == "agent:updated":
            parts.append(f"{d.get('previousStatus') or '?'} -> {d.get('newStatus')} tasks={d.get('currentTaskCount')}")
        if name == "agent:shutdown" and d.get("reason"):
            parts.append(str(d["reason"]))
        return " ".join(p for p in parts if p)
    keys = ("name", "targetName", "targetId", "status", "healthStatus", "reason", "error")
    return " ".join(str(d[k]) for k in keys if d.get(k))


class ProjectModel:
    """What the live view shows: the queue (pending by capability), the agents, recent events."""

    def __init__(self, project: str | None, recent: int = 12) -> None:
        self.project = project
        self.pending: list[dict[str, Any]] = []
        self.agents: list[dict[str, Any]] = []
        self.stats: dict[str, Any] = {}
        self.recent: deque[tuple[int, str, str]] = deque(maxlen=recent)
        self.seq = 0
        self.mode = "connecting"

    async def refresh(self, client: FleetClient, min_seq: int | None = None) -> None:
        work = await client.call("GET", "/api/work", status="pending", limit=200, min_seq=min_seq or None)
        seq = client.last_seq
        agents = await client.call("GET", "/api/agents")
        self.pending = work.get("workItems", [])
        self.agents = agents.get("agents", [])
        self.seq = max(self.seq, seq)

    def queue_rows(self) -> list[list[Any]]:
        by_cap: dict[str, list[dict[str, Any]]] = {}
        for w in self.pending:
            by_cap.setdefault(w.get("capability") or "", []).append(w)
        rows = []
        for cap, items in sorted(by_cap.items()):
            reasons = sorted({w.get("waitingReason") or "" for w in items} - {""})
            rows.append([cap, len(items), max(int(w.get("priority") or 0) for w in items), "; ".join(reasons)])
        return rows

    def agent_rows(self) -> list[list[Any]]:
        return [[a.get("guid"), a.get("agentType"), a.get("status"),
                 f"{a.get('currentTaskCount', 0)}/{a.get('maxConcurrentTasks', 0)}", a.get("capabilities") or []]
                for a in self.agents if a.get("status") != "offline"]

    def render(self, out: Output) -> Any:
        from rich.console import Group
        from rich.text import Text

        work = self.stats.get("work") or {}
        head = Text.assemble(("weft watch ", "bold"), (self.project or "(default project)", "cyan"),
                             f"  seq {self.seq}  ", (self.mode, "dim"))
        if work:
            head.append(f"  pending {work.get('pending', 0)} active {work.get('active', 0)} "
                        f"completed {work.get('completed', 0)} failed {work.get('failed', 0)}")
        queue = out.rich_table(["capability", "pending", "top priority", "waiting because"],
                               [[str(c) for c in r] for r in self.queue_rows()], "Queue")
        agents = out.rich_table(["agent", "type", "status", "load", "capabilities"],
                                [[str(c) if not isinstance(c, list) else ",".join(c) for c in r]
                                 for r in self.agent_rows()], "Agents", status_cols=(2,))
        recent = out.rich_table(["seq", "event", "about"], [[str(s), e, a] for s, e, a in self.recent],
                                "Recent events")
        return Group(head, queue, agents, recent)


async def watch_project(
    client: FleetClient, out: Output, *, for_s: float | None = None, max_events: int | None = None,
    from_seq: int | None = None, poll_s: float = 1.0,
) -> int:
    """Live view of a project until Ctrl-C, `for_s` seconds, or `max_events` events."""
    model = ProjectModel(client.config.project)
    await model.refresh(client)
    start = from_seq if from_seq is not None else model.seq + 1
    state = {"next": start, "count": 0}
    seen: set[tuple[int, str, str]] = set()
    live: Any = None
    dirty = asyncio.Event()

    def on_event(ev: dict[str, Any]) -> None:
        seq = int(ev.get("seq") or 0)
        key = (seq, str(ev.get("event")), orjson.dumps(ev.get("data")).decode())
        if key in seen:
            return
        seen.add(key)
        state["next"] = max(state["next"], seq + 1)
        state["count"] += 1
        model.seq = max(model.seq, seq)
        model.recent.appendleft((seq, str(ev.get("event")), describe(ev)))
        if out.json:
            out.json_line(ev)
        elif live is None:
            out.write(f"{seq:>7}  {ev.get('event', ''):<22} {describe(ev)}".rstrip())
        dirty.set()

    def on_other(msg: dict[str, Any]) -> None:
        if msg.get("type") == "stats":
            model.stats = msg.get("data") or {}
            dirty.set()

    def subscribe() -> list[dict[str, Any]]:
        subs = []
        for topic in ("work", "agents", "targets"):
            sub: dict[str, Any] = {"type": "subscribe", "topic": topic, "fromSeq": state["next"]}
            if client.config.project:
                sub["projectId"] = client.config.project
            subs.append(sub)
        stats: dict[str, Any] = {"type": "subscribe", "topic": "stats"}
        if client.config.project:
            stats["projectId"] = client.config.project
        return [*subs, stats]

    def done() -> bool:
        return max_events is not None and state["count"] >= max_events

    async def follow() -> None:
        try:
            model.mode = "live (WebSocket)"
            async with contextlib.aclosing(events(client, subscribe, on_other)) as stream:
                async for ev in stream:
                    on_event(ev)
                    if done():
                        return
        except NoWebSocket:
            model.mode = f"polling every {poll_s:g}s (no WebSocket API)"
            await poll(client, model, on_event, done, poll_s)

    async def redraw() -> None:
        while True:
            await dirty.wait()
            dirty.clear()
            with contextlib.suppress(Exception):
                await model.refresh(client, min_seq=model.seq or None)
            live.update(model.render(out))
            await asyncio.sleep(0.25)

    bounded = asyncio.wait_for(follow(), for_s) if for_s is not None else follow()
    if not out.tty or out.json:
        with contextlib.suppress(TimeoutError):
            await bounded
        return 0
    from rich.live import Live

    with Live(model.render(out), console=out.console, refresh_per_second=4) as view:
        live = view
        drawer = asyncio.create_task(redraw())
        try:
            with contextlib.suppress(TimeoutError):
                await bounded
        finally:
            drawer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await drawer
            view.update(model.render(out))
    return 0


async def poll(client: FleetClient, model: ProjectModel, on_event: Callable[[dict[str, Any]], None],
               done: Callable[[], bool], poll_s: float) -> None:
    """Without the WebSocket API: list work and agents every `poll_s` and report what changed, as
    events named like the WebSocket's (`work:<status>`, `agent:<status>`) with the seq of the read."""
    known: dict[str, str] = {}
    while True:
        work = await client.call("GET", "/api/work", limit=200)
        seq = client.last_seq
        agents = await client.call("GET", "/api/agents")
        changes = []
        for w in work.get("workItems", []):
            if known.get("w" + w["id"]) != w["status"]:
                known["w" + w["id"]] = w["status"]
                name = "submitted" if w["status"] == "pending" else w["status"]
                changes.append({"type": "event", "topic": "work", "event": f"work:{name}", "seq": seq,
                                "polled": True, "data": {"workId": w["id"], "capability": w.get("capability"),
                                                         "boundary": w.get("boundary"), "priority": w.get("priority"),
                                                         "description": w.get("description"),
                                                         "assignedTo": w.get("assignedTo")}})
        for a in agents.get("agents", []):
            if known.get("a" + a["guid"]) != a["status"]:
                before = known.get("a" + a["guid"])
                known["a" + a["guid"]] = a["status"]
                changes.append({"type": "event", "topic": "agents", "event": "agent:updated", "seq": seq,
                                "polled": True, "data": {"agent": {"guid": a["guid"], "agentType": a.get("agentType")},
                                                         "previousStatus": before, "newStatus": a["status"],
                                                         "currentTaskCount": a.get("currentTaskCount")}})
        model.pending = [w for w in work.get("workItems", []) if w["status"] == "pending"]
        model.agents = agents.get("agents", [])
        for ev in changes:
            on_event(ev)
            if done():
                return
        await asyncio.sleep(poll_s)
