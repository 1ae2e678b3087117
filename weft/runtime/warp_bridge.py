"""The Warp bridge: Loominal Warp's agents in weft's registry, weft's assignments in Warp's queues.

Registry import. Warp agents announce themselves by putting a `RegistryEntry` (JSON) under their
guid in the global KV bucket `agent-registry` and re-putting it every 60 s as a heartbeat. Every
replica watches the bucket (initial values included) and turns what weft cares about into events:

- an entry weft does not know, or one whose declaration changed (type, capabilities, boundaries,
  capacity, reported task count, idle limit, handle, host, user, visibility), or one that comes back
  online after weft saw it go offline, appends
  `agent.registered` with an event id derived from the KV revision, so every replica that sees the
  same entry appends the same event once (JetStream's Msg-Id dedupe plus the store's own-event check);
- a heartbeat-only update appends nothing: it only feeds `Liveness` (the scheduler declares a Warp
  agent lost after `warp_lost_after_s` without one);
- `status: offline`, a delete or a purge marker deregisters the agent (idempotent).

What an entry declares is read as the original read it, plus Warp's own fields: `agentType` and
`boundaries` from `metadata` (the original's place) or the top level, `["default"]` when it names no
boundary (never a wildcard: a literal "*" is dropped), `maxConcurrentTasks` (default 1),
`currentTaskCount` (kept as a label: routing counts it as load, Warp agents also work for
themselves), `spindownAfterIdleMs`, and its visibility (`visibility`, else Warp's `scope`, else
project-only), which `weft.core.routing.visible_in` applies to listings and routing.

"Changed" is judged against the project's projection, not against memory, so a restarted replica
re-reading the whole bucket appends nothing for entries weft already reflects. Entries that do not
parse (not JSON, not an object, no guid or capabilities, guid not matching its key, foreign keys of
other tools) are skipped with a debug log; nothing an entry holds can stop the watcher.

Work offering. When the scheduler assigns work to a Warp agent, `offer` publishes the item in Warp's
`WorkItem` format to `global.workqueue.<capability>` (stream `WORKQUEUE_<CAP>`, created with Warp's
config if missing) with `Nats-Msg-Id` = work id + attempt, so a re-push does not duplicate it.
Warp's `warp_work_claim` then receives it; the agent reports back through weft's REST endpoints.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import nats.errors
import nats.js.errors
import orjson
from nats.aio.client import Client as NATS
from nats.js import api
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from projections.events import idempotent_id, is_valid_entity_id, is_valid_project_id
from projections.state import Record
from weft.aio import cancel_and_wait
from weft.commands import Commands, Ctx
from weft.core.errors import NotFound
from weft.core.routing import ANY_BOUNDARY, WARP_TASK_COUNT_LABEL
from weft.logs import project_var
from weft.runtime.gateway import Liveness
from weft.store.readmodel import ProjectView, ReadModel

log = logging.getLogger("weft.runtime.warp_bridge")

REGISTRY_BUCKET: Final = "agent-registry"
REGISTRY_MAX_AGE_S: Final = 24 * 3600.0  # Warp's own bucket config
WORKQUEUE_PREFIX: Final = "global.workqueue"
WORKQUEUE_MAX_AGE_S: Final = 7 * 24 * 3600.0  # Warp's own stream config
ACTOR: Final = "warp-bridge"
OFFERED_BY: Final = "weft"

_VISIBILITIES: Final = frozenset({"private", "project-only", "user-only", "public"})
# Warp's `scope` (current: private|personal|team|public; older: user|project) as weft visibility.
_SCOPE_VISIBILITY: Final = {
    "private": "private",
    "personal": "user-only",
    "user": "user-only",
    "team": "project-only",
    "project": "project-only",
    "public": "public",
}
_MAX_CAPABILITIES: Final = 200
_MAX_CAPABILITY_LEN: Final = 128
_BAD_SUBJECT_CHARS: Final = re.compile(r"[\s*>]")
# The fields of a registration weft cares about: a difference in any of them re-registers.
_DECLARED: Final = ("agentType", "capabilities", "boundaries", "maxConcurrentTasks", "spindownAfterIdleMs",
                    "handle", "hostname", "username", "visibility", "labels", "source")
DEFAULT_BOUNDARIES: Final = ("default",)  # the original's boundaries for an entry that names none
_MAX_TASKS: Final = 1000


# --- pure: entries, declarations, work offers ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class WarpEntry:
    """The parts of a Warp `RegistryEntry` weft uses, validated."""

    guid: str
    agent_type: str
    capabilities: tuple[str, ...]
    handle: str | None
    hostname: str | None
    username: str | None
    visibility: str
    status: str  # online | busy | offline (anything else counts as online)
    project_id: str | None  # Warp's projectId, as written
    boundaries: tuple[str, ...] = DEFAULT_BOUNDARIES
    max_tasks: int = 1
    task_count: int | None = None  # the entry's own currentTaskCount
    spindown_ms: int | None = None


def _text(value: Any, limit: int) -> str | None:
    if not isinstance(value, str) or not value.strip():
        return None
    return value[:limit]


def _count(value: Any, minimum: int, maximum: int) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        return None
    return value


def _boundaries(value: Any) -> tuple[str, ...] | None:
    """The boundaries an entry names, or None when it names none usable. A literal "*" is dropped:
    the original matches boundaries literally, so it never made an entry a wildcard."""
    if not isinstance(value, list) or len(value) > _MAX_CAPABILITIES:
        return None
    names = [b for b in value if isinstance(b, str) and b.strip() and len(b) <= _MAX_CAPABILITY_LEN]
    names = [b for b in names if b != ANY_BOUNDARY]
    return tuple(dict.fromkeys(names)) or None


def parse_entry(key: str, value: bytes | None) -> WarpEntry | None:
    """The entry under `key`, or None when it is not a Warp registry entry weft can use."""
    if not value:
        return None
    try:
        body = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(body, dict):
        return None
    guid = body.get("guid")
    if not isinstance(guid, str) or guid != key or not is_valid_entity_id(guid):
        return None
    caps = body.get("capabilities")
    if not isinstance(caps, list) or len(caps) > _MAX_CAPABILITIES:
        return None
    if not all(isinstance(c, str) and c.strip() and len(c) <= _MAX_CAPABILITY_LEN for c in caps):
        return None
    visibility = body.get("visibility")
    if visibility not in _VISIBILITIES:
        visibility = _SCOPE_VISIBILITY.get(str(body.get("scope")), "project-only")
    status = body.get("status")
    project_id = body.get("projectId")
    raw_meta = body.get("metadata")
    meta: dict[str, Any] = raw_meta if isinstance(raw_meta, dict) else {}
    max_tasks = _count(body.get("maxConcurrentTasks"), 1, _MAX_TASKS) or _count(meta.get("maxConcurrentTasks"), 1,
                                                                                _MAX_TASKS)
    return WarpEntry(
        guid=guid,
        agent_type=_text(meta.get("agentType"), 64) or _text(body.get("agentType"), 64) or "warp",
        capabilities=tuple(dict.fromkeys(caps)),
        handle=_text(body.get("handle"), 200),
        hostname=_text(body.get("hostname"), 255),
        username=_text(body.get("username"), 255),
        visibility=str(visibility),
        status=status if status in ("online", "busy", "offline") else "online",
        project_id=project_id if isinstance(project_id, str) else None,
        boundaries=_boundaries(meta.get("boundaries")) or _boundaries(body.get("boundaries")) or DEFAULT_BOUNDARIES,
        max_tasks=max_tasks or 1,
        task_count=_count(body.get("currentTaskCount"), 0, _MAX_TASKS),
        spindown_ms=_count(body.get("spindownAfterIdleMs"), 0, 2**53),
    )


def project_for(entry: WarpEntry, default_project: str, project_map: Mapping[str, str] | None = None) -> str:
    """weft's project for an entry: mapped, else its projectId if valid as a weft id, else the default."""
    pid = entry.project_id
    if pid is not None and project_map and pid in project_map:
        return project_map[pid]
    if pid is not None and is_valid_project_id(pid):
        return pid
    return default_project


def declaration(entry: WarpEntry) -> dict[str, Any]:
    """The `register_agent` declaration of a Warp agent: the boundaries, capacity and idle limit its
    entry declares (`["default"]` and one item at a time when it declares none)."""
    labels = {"warpProjectId": entry.project_id} if entry.project_id else {}
    if entry.task_count is not None:
        labels[WARP_TASK_COUNT_LABEL] = str(entry.task_count)
    return {
        "guid": entry.guid,
        "agentType": entry.agent_type,
        "capabilities": list(entry.capabilities),
        "boundaries": list(entry.boundaries),
        "maxConcurrentTasks": entry.max_tasks,
        "spindownAfterIdleMs": entry.spindown_ms,
        "handle": entry.handle,
        "hostname": entry.hostname,
        "username": entry.username,
        "visibility": entry.visibility,
        "labels": labels,
        "source": "warp",
    }


def needs_registration(agent: Record | None, decl: Mapping[str, Any]) -> bool:
    """Whether the projection's agent differs from the declaration in anything weft cares about."""
    if agent is None or agent["status"] == "offline":
        return True
    return any(agent.get(k) != decl[k] for k in _DECLARED)


def workqueue_subject(capability: str) -> str | None:
    """Warp's queue subject for a capability, or None when the capability cannot be part of a subject.

    Warp publishes to `global.workqueue.{capability}` verbatim, so a dotted capability ("node.js")
    becomes several tokens; that is still a valid subject and the one Warp's claim reads. Empty
    tokens, wildcards and whitespace are not."""
    if not capability or _BAD_SUBJECT_CHARS.search(capability) or "" in capability.split("."):
        return None
    return f"{WORKQUEUE_PREFIX}.{capability}"


def workqueue_stream(capability: str) -> str:
    """`WORKQUEUE_<CAP>`: uppercased, every non-alphanumeric character as `_` (Warp's sanitiser)."""
    return "WORKQUEUE_" + re.sub(r"[^A-Za-z0-9]", "_", capability).upper()


def work_offer(project: str, agent: Mapping[str, Any], item: Mapping[str, Any]) -> dict[str, Any]:
    """A weft work item in Warp's `WorkItem` shape (plus the weft project and the assigned agent, which
    Warp ignores but a cooperating agent can use: only the assigned guid may accept it in weft)."""
    body: dict[str, Any] = {
        "id": item["id"],
        "taskId": item["taskId"],
        "capability": item["capability"],
        "description": item["description"],
        "priority": item["priority"],
        "offeredBy": OFFERED_BY,
        "offeredAt": item["offeredAt"],
        "attempts": item["attempts"],
        "scope": "team",
        "projectId": project,
        "boundary": item.get("boundary"),
        "assignedTo": agent["guid"],
    }
    if item.get("deadline"):
        body["deadline"] = item["deadline"]
    if item.get("contextData") is not None:
        body["contextData"] = item["contextData"]
    return body


def offer_msg_id(item: Mapping[str, Any]) -> str:
    return f"{item['id']}:{item['attempts']}"


# --- the registry bucket -------------------------------------------------------------------------


async def open_registry(js: Any, bucket: str = REGISTRY_BUCKET, replicas: int = 1) -> KeyValue:
    """Bind to the registry bucket, creating it with Warp's config (history 1) when missing.

    Binds without `js.key_value`'s checks: Warp creates the stream itself without a history limit
    (max_msgs_per_subject -1), which nats-py would refuse as a "bad bucket"."""
    stream = f"KV_{bucket}"
    try:
        info = await js.stream_info(stream)
    except nats.js.errors.NotFoundError:
        config = api.StreamConfig(
            name=stream,
            subjects=[f"$KV.{bucket}.>"],
            storage=api.StorageType.FILE,
            max_age=REGISTRY_MAX_AGE_S,
            max_msgs_per_subject=1,
            allow_rollup_hdrs=True,
            deny_delete=True,
            deny_purge=False,
            allow_direct=True,
            discard=api.DiscardPolicy.OLD,
            num_replicas=replicas,
        )
        try:
            info = await js.add_stream(config)
        except nats.js.errors.BadRequestError:
            # Created concurrently (by Warp, another replica), perhaps with other settings: use it.
            info = await js.stream_info(stream)
    return KeyValue(name=bucket, stream=stream, pre=f"$KV.{bucket}.", js=js, direct=bool(info.config.allow_direct))


# --- the bridge ------------------------------------------------------------------------------------


class WarpBridge:
    """One per replica: imports the registry bucket into projects' registries and offers Warp agents'
    assignments on Warp's queues (`offer` is the Pusher's `warp_offer` hook). Entries are handled
    one at a time in watch order; `wait_processed(revision)` tells when a put has been handled."""

    def __init__(
        self,
        nc: NATS,
        commands: Commands,
        readmodel: ReadModel,
        liveness: Liveness,
        *,
        default_project: str,
        project_map: Mapping[str, str] | None = None,
        stale_after_s: float = 180.0,
        bucket: str = REGISTRY_BUCKET,
        replicas: int = 1,
        check_interval_s: float = 5.0,
        max_backoff_s: float = 5.0,
        catch_up_s: float = 10.0,
    ) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.commands = commands
        self.readmodel = readmodel
        self.liveness = liveness
        self.default_project = default_project
        self.project_map = dict(project_map or {})
        self.stale_after_s = stale_after_s
        self.bucket = bucket
        self.replicas = replicas
        self.check_interval_s = check_interval_s
        self.max_backoff_s = max_backoff_s
        self.catch_up_s = catch_up_s
        self.ready = asyncio.Event()  # set once the bucket's initial values were handled
        self.watchers_started = 0
        self.last_revision = 0  # the highest KV revision handled (or skipped), in watch order
        self._seen: dict[str, tuple[int, Any]] = {}  # key -> (revision, timestamp) last handled
        self._projects: dict[str, str] = {}  # guid -> weft project it was last imported into
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._counter = itertools.count()
        self._workqueues: set[str] = set()
        self._watcher: KeyValue.KeyWatcher | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Start watching in the background; never blocks on NATS (see `wait_ready`)."""
        self._stopping = False
        self._task = asyncio.create_task(self._supervise(), name="warp-bridge")

    async def wait_ready(self, timeout: float | None = None) -> bool:
        try:
            await asyncio.wait_for(self.ready.wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def stop(self) -> None:
        self._stopping = True
        await cancel_and_wait(self._task)
        await self._stop_watcher()

    async def _stop_watcher(self) -> None:
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            try:
                await watcher.stop()  # type: ignore[no-untyped-call]
            except Exception:
                pass

    async def wait_processed(self, revision: int, timeout: float) -> bool:
        """True once the watcher handled KV revision `revision` (or a later one)."""
        if self.last_revision >= revision:
            return True
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (revision, next(self._counter), fut))
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout)
            return True
        except TimeoutError:
            return False

    def _handled(self, revision: int) -> None:
        self.last_revision = max(self.last_revision, revision)
        while self._waiters and self._waiters[0][0] <= self.last_revision:
            _, _, fut = heapq.heappop(self._waiters)
            if not fut.done():
                fut.set_result(None)

    # --- the watch loop ----------------------------------------------------------------------

    async def _supervise(self) -> None:
        """Keep one watcher alive: nats-py's watcher can stall silently (its ephemeral consumer gone
        after a reconnect or a server restart), so recreate it, with bounded backoff, whenever it
        stops, its consumer disappears or the connection reconnected."""
        backoff = 0.1
        while not self._stopping:
            try:
                kv = await open_registry(self.js, self.bucket, self.replicas)
                reconnects = self.nc.stats["reconnects"]
                self._watcher = await kv.watchall()
                self.watchers_started += 1
                if await self._consume(self._watcher, reconnects):
                    backoff = 0.1
            except asyncio.CancelledError:
                raise
            except Exception as err:
                log.warning("warp registry watch failed: %s", err)
            finally:
                await self._stop_watcher()
            if self._stopping or self.nc.is_closed:
                return
            await asyncio.sleep(backoff)
            backoff = min(self.max_backoff_s, backoff * 2)

    async def _consume(self, watcher: KeyValue.KeyWatcher, reconnects: int) -> bool:
        """Handle updates until the watcher should be replaced. True if it delivered its initial values."""
        initial_done = False
        while not self._stopping:
            if self.nc.stats["reconnects"] != reconnects:
                log.info("nats reconnected: recreating the warp registry watcher")
                return initial_done
            try:
                entry = await watcher.updates(timeout=self.check_interval_s)  # type: ignore[no-untyped-call]
            except TimeoutError:
                if not await self._healthy(watcher):
                    return initial_done
                continue
            if entry is None:  # end of the initial values (also on an empty bucket)
                initial_done = True
                self.ready.set()
                continue
            if not isinstance(entry, KeyValue.Entry):  # the stop sentinel: the watcher was stopped
                return initial_done
            await self._handle(entry)
        return initial_done

    async def _healthy(self, watcher: KeyValue.KeyWatcher) -> bool:
        if self.nc.is_closed:
            return False
        if not self.nc.is_connected:
            return True  # reconnecting: judged once the reconnect counter moves
        try:
            await watcher._sub.consumer_info()  # type: ignore[union-attr]
        except nats.js.errors.NotFoundError:
            log.info("warp registry watcher lost its consumer: recreating it")
            return False
        except Exception as err:  # a timeout while the server is busy: keep it, look again later
            log.debug("warp registry watcher check failed: %s", err)
        return True

    async def _handle(self, entry: KeyValue.Entry) -> None:
        revision = int(entry.revision or 0)
        stamp = (revision, entry.created)
        try:
            if self._seen.get(entry.key) == stamp:
                return  # a recreated watcher re-delivering what was handled already
            if entry.operation in (KV_DEL, KV_PURGE):
                await self._on_delete(entry.key)
            else:
                await self._on_put(entry)
            self._seen[entry.key] = stamp
        except Exception:
            # Never let one entry stop the watcher; a later put (heartbeat) of the key retries.
            log.exception("warp registry entry not imported", extra={"key": entry.key})
        finally:
            project_var.set(None)
            self._handled(revision)

    # --- entries -----------------------------------------------------------------------------

    def _fresh(self, created: Any) -> bool:
        """Whether the put is recent enough to count as a sign of life (the server's time of the put;
        nats-py types it as int but hands over the message's datetime)."""
        if isinstance(created, int | float):
            created = datetime.fromtimestamp(created / 1e9, UTC)
        if not isinstance(created, datetime):
            return True
        return (datetime.now(UTC) - created).total_seconds() <= self.stale_after_s

    async def _on_put(self, kv_entry: KeyValue.Entry) -> None:
        entry = parse_entry(kv_entry.key, kv_entry.value)
        if entry is None:
            log.debug("not a warp registry entry, skipped", extra={"key": kv_entry.key})
            return
        project = project_for(entry, self.default_project, self.project_map)
        project_var.set(project)
        previous = self._projects.get(entry.guid)
        if previous is not None and previous != project:
            await self._deregister(previous, entry.guid, f"warp: moved to project {project}")
        self._projects[entry.guid] = project
        if entry.status == "offline":
            await self._deregister(project, entry.guid, "warp: offline")
            return
        if not self._fresh(kv_entry.created):
            # No heartbeat for too long (Warp crashed without going offline): not alive, so neither
            # registered nor kept alive; if weft has it online, the scheduler declares it lost.
            log.debug("stale warp registry entry, skipped", extra={"guid": entry.guid})
            return
        view = await self._view(project, create=True)
        assert view is not None
        agent = view.state.agents.get(entry.guid)
        if agent is not None and agent["source"] != "warp" and agent["status"] != "offline":
            log.warning("warp entry %s names a live weft agent; not imported", entry.guid)
            return
        self.liveness.beat(project, entry.guid)
        decl = declaration(entry)
        if not needs_registration(agent, decl):
            return  # a heartbeat: liveness only, no event
        event_id = idempotent_id(project, f"warp:{entry.guid}:{kv_entry.revision}")
        await self.commands.register_agent(Ctx(project=project, actor=ACTOR), decl, event_id=event_id)
        self.liveness.beat(project, entry.guid)
        log.info("warp agent imported", extra={"guid": entry.guid, "agentType": entry.agent_type})

    async def _on_delete(self, key: str) -> None:
        if not is_valid_entity_id(key):
            return
        project = self._projects.pop(key, None)
        projects = [project] if project else [p for p, v in self.readmodel.views.items() if key in v.state.agents]
        for p in projects:
            await self._deregister(p, key, "warp: registry entry deleted")

    async def _deregister(self, project: str, guid: str, reason: str) -> None:
        view = await self._view(project, create=False)
        if view is None:
            return
        agent = view.state.agents.get(guid)
        if agent is None or agent["source"] != "warp" or agent["status"] == "offline":
            return
        try:
            await self.commands.deregister_agent(Ctx(project=project, actor=ACTOR), guid, reason)
        except NotFound:
            pass

    async def _view(self, project: str, *, create: bool) -> ProjectView | None:
        view = await self.readmodel.view(project, create=create)
        if view is not None and not view.caught_up.is_set():
            # Judge "changed" against the whole history, not a half-folded projection.
            try:
                await asyncio.wait_for(view.caught_up.wait(), self.catch_up_s)
            except TimeoutError:
                log.warning("projection of %s not caught up; importing anyway", project)
        return view

    # --- work offers -------------------------------------------------------------------------

    async def offer(self, project: str, agent: dict[str, Any], item: dict[str, Any]) -> None:
        """Publish an assignment to a Warp agent in Warp's work-queue format (the Pusher's hook)."""
        capability = str(item["capability"])
        subject = workqueue_subject(capability)
        if subject is None:
            log.warning("capability %r cannot be a Warp queue subject; work %s not offered", capability, item["id"])
            return
        stream = workqueue_stream(capability)
        if not await self._ensure_workqueue(stream, subject):
            return
        payload = orjson.dumps(work_offer(project, agent, item))
        await self.js.publish(
            subject, payload, stream=stream, timeout=5.0, headers={api.Header.MSG_ID.value: offer_msg_id(item)}
        )
        log.info("work offered on warp queue", extra={"work_id": item["id"], "guid": agent["guid"],
                                                      "subject": subject})

    async def _ensure_workqueue(self, stream: str, subject: str) -> bool:
        if stream in self._workqueues:
            return True
        try:
            info = await self.js.stream_info(stream)
        except nats.js.errors.NotFoundError:
            config = api.StreamConfig(
                name=stream,
                subjects=[subject],
                retention=api.RetentionPolicy.WORK_QUEUE,
                storage=api.StorageType.FILE,
                num_replicas=self.replicas,
                max_msgs=-1,
                max_age=WORKQUEUE_MAX_AGE_S,
            )
            try:
                info = await self.js.add_stream(config)
            except nats.js.errors.BadRequestError as err:
                if "already in use" not in str(err.description or ""):
                    raise
                info = await self.js.stream_info(stream)
        if subject not in (info.config.subjects or []):
            # Two capabilities that sanitise alike ("node.js", "node_js") share Warp's stream name.
            log.warning("stream %s does not carry %s; work not offered", stream, subject)
            return False
        self._workqueues.add(stream)
        return True
