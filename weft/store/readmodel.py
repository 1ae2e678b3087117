"""A replica's live read model: one ordered tail per project stream feeding the pure projections.

Each replica tails every project stream (one ordered consumer per project, never one per request),
so any replica can serve any read, and `wait_for(seq)` gives read-your-writes behind a load balancer.
Snapshots are written every `snapshot_every` events and only ever shorten a rebuild.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
from collections.abc import Callable

import orjson

from projections import ProjectState, apply, decode_state, encode_state
from projections.events import Event, UnsupportedEvent, is_valid_project_id
from projections.state import adopt_snapshot, release_cut
from weft.aio import TaskSet
from weft.store import gcpause
from weft.store.eventstore import EventStore, Tail
from weft.store.snapshot_child import FORK_AVAILABLE, ChildFailed, ForkedEncoder
from weft.store.snapshots import SnapshotStore

log = logging.getLogger("weft.store.readmodel")

Listener = Callable[[Event, ProjectState], None]
REBUILD_GC_PAUSE_LIMIT_S = 300.0
CATCH_UP_REPORT_S = 10.0  # how often a start-up that waits for the backlog says where it is
CATCH_UP_REPORT_MAX = 5  # projects named per report


class ProjectView:
    """The folded state of one project plus the means to wait for a sequence and to be told of events."""

    def __init__(self, project: str, state: ProjectState | None = None) -> None:
        self.project = project
        self.state = state or ProjectState(project=project)
        self.listeners: list[Listener] = []
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._counter = itertools.count()
        self.caught_up = asyncio.Event()
        self.target_seq = 0  # the stream's last sequence when we attached
        self.tail: Tail | None = None
        self.events_since_snapshot = 0
        self.snapshot_every = 0
        self.on_snapshot_due: Callable[[ProjectView], None] | None = None
        self.snapshot_child: ForkedEncoder | None = None  # the snapshot being encoded, if any
        self.snapshot_deferred = False  # one fell due while it was
        self.gc_pause: gcpause.Pause | None = None  # held while folding the backlog found at attach
        # (seq, reason) of an event this weft cannot read: the projection stops before it.
        self.halted: tuple[int, str] | None = None

    def apply(self, ev: Event) -> None:
        if (ev.seq and ev.seq <= self.state.seq) or self.halted is not None:
            return
        try:
            apply(self.state, ev)
        except Exception:
            # A malformed event must not stop the projection; the fold already advanced the
            # sequences, so every replica skips it alike.
            log.exception("event could not be folded", extra={"project": self.project, "seq": ev.seq})
        self.events_since_snapshot += 1
        self._advanced()
        if self.events_since_snapshot >= self.snapshot_every > 0 and self.on_snapshot_due is not None:
            self.on_snapshot_due(self)
        for listener in self.listeners:
            try:
                listener(ev, self.state)
            except Exception:
                log.exception("listener failed", extra={"project": self.project})

    def skip(self, seq: int, subject: str, err: Exception) -> None:
        """A message in the stream that does not decode.

        A well-formed event of a newer weft (`UnsupportedEvent`) halts the projection before it: a
        replica that skipped it would disagree with one that can fold it, and a snapshot would bake
        the gap in. The project reads as of the event before; it is not ready until a weft that
        reads the event replays it. Anything else (not an event at all) no version can fold: its
        sequence counts as folded (as `apply` does for an event the fold ignores), alike on every
        replica, so waiters and OCC see the stream's position."""
        if seq <= self.state.seq or self.halted is not None:
            return
        if isinstance(err, UnsupportedEvent):
            self.halted = (seq, f"event at seq {seq} cannot be read by this weft: {err}")
            log.error("projection halted: %s; upgrade weft", self.halted[1], extra={"project": self.project, "seq": seq})
            # Nothing waits for what will not come: waiters re-check and fail at once, and a
            # start-up that waits for the backlog goes on (the project reports not ready).
            for _, _, fut in self._waiters:
                if not fut.done():
                    fut.set_result(None)
            self._waiters.clear()
            if not self.caught_up.is_set():
                self.set_caught_up()
            return
        log.error("corrupt message skipped: %s", err, extra={"project": self.project, "seq": seq})
        self.state.seq = seq
        self.state.last_event_id = ""  # whatever its Msg-Id: a snapshot here is verified as unknown
        parts = subject.split(".")
        if len(parts) == 5:  # weft.<project>.ev.<entity>.<id>
            self.state.entity_seq[f"{parts[3]}.{parts[4]}"] = seq
        self._advanced()

    def _advanced(self) -> None:
        seq = self.state.seq
        while self._waiters and self._waiters[0][0] <= seq:
            _, _, fut = heapq.heappop(self._waiters)
            if not fut.done():
                fut.set_result(None)
        if not self.caught_up.is_set() and seq >= self.target_seq:
            self.set_caught_up()

    def set_caught_up(self) -> None:
        self.caught_up.set()
        if self.gc_pause is not None:
            self.gc_pause.end()
            self.gc_pause = None

    async def wait_for(self, seq: int, timeout: float) -> bool:
        """True once the projection reached `seq`; False after `timeout` seconds."""
        if self.state.seq >= seq:
            return True
        if self.halted is not None:
            return False
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (seq, next(self._counter), fut))
        try:
            # The future is ours alone, so a timeout may cancel it: no shield (a task per wait).
            async with asyncio.timeout(timeout):
                await fut
            return self.state.seq >= seq  # not so if woken by a halt
        except TimeoutError:
            # Drop our entry: a client's min_seq that never comes must not stay in the heap forever.
            self._waiters = [w for w in self._waiters if not w[2].done()]
            heapq.heapify(self._waiters)
            return False


class ReadModel:
    def __init__(
        self, store: EventStore, *, snapshots: SnapshotStore | None = None, snapshot_every: int = 50_000,
        snapshot_encode: str = "fork",
    ) -> None:
        self.store = store
        # By default on the store's resources, with its replicas (as when the store kept snapshots).
        self.snapshots = snapshots or SnapshotStore(store.resources, replicas=store.replicas)
        self.snapshot_every = snapshot_every
        # "fork": snapshots are encoded in a child process (`weft.store.snapshot_child`); "loop": on the event loop.
        self.snapshot_encode = snapshot_encode if FORK_AVAILABLE else "loop"
        self.views: dict[str, ProjectView] = {}
        self._attach_lock = asyncio.Lock()
        self._tasks = TaskSet()  # attaches of new projects and snapshot writes
        self._advisory_sub: object | None = None
        self.on_attach: list[Callable[[ProjectView], None]] = []
        self.started_at = time.monotonic()

    async def start(self) -> None:
        # Streams created by other replicas: attach as soon as the server announces them. Subscribe
        # (and flush, so the server has the interest) before listing, or a stream created in between
        # would be neither listed nor announced.
        nc = self.store.js._nc
        self._advisory_sub = await nc.subscribe("$JS.EVENT.ADVISORY.STREAM.CREATED.*", cb=self._on_stream_created)
        await nc.flush()
        for project in await self.store.list_projects():
            await self.attach(project)

    async def _on_stream_created(self, msg: object) -> None:
        stream = getattr(msg, "subject", "").rsplit(".", 1)[-1]
        if stream.startswith("WEFT_"):
            project = stream[len("WEFT_") :]
            if is_valid_project_id(project):
                self._tasks.spawn(self.attach(project))

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until every project known at start has been folded up to its last sequence then.
        Every `CATCH_UP_REPORT_S` meanwhile, logs which projects are behind and where they are: a
        rebuild of a long stream shows its progress, one that stopped moving shows where."""
        views = list(self.views.values())
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while pending := [v for v in views if not v.caught_up.is_set()]:
            step = CATCH_UP_REPORT_S if deadline is None else min(CATCH_UP_REPORT_S, deadline - loop.time())
            if step <= 0:
                raise TimeoutError(f"{len(pending)} projects not caught up")
            waiter = asyncio.ensure_future(asyncio.gather(*(v.caught_up.wait() for v in pending)))
            try:
                await asyncio.wait({waiter}, timeout=step)
            finally:
                waiter.cancel()
            behind = [v for v in pending if not v.caught_up.is_set()]
            for v in behind[:CATCH_UP_REPORT_MAX]:
                log.warning("still catching up: at seq %d of %d (%d projects behind)", v.state.seq, v.target_seq,
                            len(behind), extra={"project": v.project, "seq": v.state.seq, "target_seq": v.target_seq})

    @property
    def ready(self) -> bool:
        return all(v.caught_up.is_set() and v.halted is None for v in self.views.values())

    def halted(self) -> dict[str, dict[str, object]]:
        """Projects whose projection stopped before an event this weft cannot read."""
        return {p: {"seq": v.halted[0], "reason": v.halted[1]} for p, v in self.views.items() if v.halted}

    async def view(self, project: str, *, create: bool = False) -> ProjectView | None:
        """The project's view; attaches lazily. Without `create`, an unknown project gives None."""
        v = self.views.get(project)
        if v is not None:
            return v
        if not create and not await self.store.stream_exists(project):
            return None
        return await self.attach(project)

    async def attach(self, project: str) -> ProjectView:
        async with self._attach_lock:
            existing = self.views.get(project)
            if existing is not None:
                return existing
            await self.store.ensure_stream(project)
            last_seq = await self.store.last_seq(project)
            # The snapshot's and the backlog's objects live as long as the replica and form no
            # cycles: no cyclic GC until caught up (bounded, in case the tail never gets there).
            pause = gcpause.Pause(limit_s=REBUILD_GC_PAUSE_LIMIT_S)
            try:
                state = await self._load_snapshot(project)
            except BaseException:
                pause.end()
                raise
            if state is not None:
                mismatch = await self._snapshot_mismatch(project, state, last_seq)
                if mismatch:
                    log.warning("snapshot ignored, replaying: %s", mismatch, extra={"project": project, "snapshot_seq": state.seq})
                    state = None
            view = ProjectView(project, state)
            view.target_seq = last_seq
            view.gc_pause = pause
            if view.state.seq >= view.target_seq:
                view.set_caught_up()
            self.views[project] = view
            view.snapshot_every = self.snapshot_every
            view.on_snapshot_due = self._snapshot_due
            view.tail = await self.store.tail(project, view.state.seq + 1, view.apply, view.skip)
            for hook in self.on_attach:
                hook(view)
            log.info(
                "project attached",
                extra={"project": project, "from_seq": view.state.seq, "target_seq": view.target_seq},
            )
            return view

    async def state_before(self, project: str, seq: int) -> ProjectState:
        """A fresh copy of the project's state folded up to `seq - 1`, by the live fold's code: from
        the snapshot when it is at or below that point and belongs to this stream, else from seq 1.
        Costs a fold of the events in between (up to `seq` of them without a usable snapshot)."""
        state = await self._load_snapshot(project)
        if state is not None and (
            state.seq >= seq or await self._snapshot_mismatch(project, state, await self.store.last_seq(project))
        ):
            state = None
        if state is None:
            state = ProjectState(project=project)
        if state.seq < seq - 1:
            async for ev in self.store.read_range(project, state.seq + 1, seq - 1):
                apply(state, ev)
        return state

    async def _load_snapshot(self, project: str) -> ProjectState | None:
        try:
            raw = await self.snapshots.load_snapshot(project)
            if raw is None:
                return None
            return decode_state(raw)  # items stay encoded in `raw` until read (projections.worktable)
        except (ValueError, orjson.JSONDecodeError, KeyError) as err:
            # A snapshot is an optimisation: an unreadable or old-schema one means a full replay.
            log.warning("snapshot ignored: %s", err, extra={"project": project})
            return None

    async def _snapshot_mismatch(self, project: str, state: ProjectState, last_seq: int) -> str | None:
        """Why the snapshot does not belong to this stream (another project's, or of an earlier
        stream of the name that was deleted and refilled), or None: the stream must hold, at the
        snapshot's sequence, the very event the snapshot was folded up to."""
        if state.project != project:
            return f"it is of project {state.project!r}"
        if state.seq > last_seq:
            return f"it is at seq {state.seq}, beyond the stream's last {last_seq}"
        if state.seq == 0:
            return None
        found = await self.store.msg_id_at(project, state.seq) or ""
        if not found or found != state.last_event_id:
            return f"the stream's event at seq {state.seq} is {found!r}, not {state.last_event_id!r}"
        return None

    def _snapshot_due(self, view: ProjectView) -> None:
        view.events_since_snapshot = 0
        state = view.state
        if self.snapshot_encode == "fork":
            if view.snapshot_child is not None:
                view.snapshot_deferred = True  # one at a time: the next starts when this one ends
                return
            try:
                view.snapshot_child = ForkedEncoder(state)
            except OSError:
                log.exception("snapshot child could not start; encoding on the event loop",
                              extra={"project": state.project})
            else:
                self._tasks.spawn(self._adopt_forked(view, view.snapshot_child))
                return
        # Encode now, on the loop, so the snapshot is exactly the state at this sequence.
        payload = encode_state(state, settle=True)
        self._tasks.spawn(self._write_snapshot(state.project, payload, state.seq))

    async def _adopt_forked(self, view: ProjectView, child: ForkedEncoder) -> None:
        """Wait for the child, settle finished items onto what it encoded, write it; then the next
        snapshot if one fell due meanwhile (never two writes of a project's snapshot at once)."""
        project, seq = view.project, child.cut.seq
        try:
            try:
                enc = await child.result()
                adoption = adopt_snapshot(view.state, enc.payload, enc.items_end, enc.index, enc.cut)
                while True:  # a chunk at a time, letting requests and folds run between
                    try:
                        next(adoption)
                    except StopIteration as done:
                        settled = done.value
                        break
                    await asyncio.sleep(0)
            finally:
                release_cut(view.state)
            # fork_ms: the loop's share of this snapshot (the cut and the fork)
            await self._write_snapshot(project, enc.payload, seq,
                                       {"settled": settled, "fork_ms": round(child.stalled_s * 1000, 1)})
        except ChildFailed as err:
            log.error("snapshot skipped: %s", err, extra={"project": project, "seq": seq})
        except Exception:  # a snapshot only shortens a rebuild: never let it take the replica down
            log.exception("snapshot skipped", extra={"project": project, "seq": seq})
        finally:
            view.snapshot_child = None
        if view.snapshot_deferred:
            view.snapshot_deferred = False
            self._snapshot_due(view)

    async def _write_snapshot(
        self, project: str, payload: bytes | bytearray | memoryview, seq: int, details: dict[str, object] | None = None
    ) -> None:
        try:
            await self.snapshots.save_snapshot(project, payload)
            log.info("snapshot written", extra={"project": project, "seq": seq, "bytes": len(payload), **(details or {})})
        except Exception:
            log.exception("snapshot write failed", extra={"project": project})

    async def snapshot_now(self, project: str) -> int:
        view = self.views[project]
        view.events_since_snapshot = 0
        await self.snapshots.save_snapshot(project, encode_state(view.state, settle=True))
        return view.state.seq

    async def catch_up(self, project: str, timeout: float) -> bool:
        """Fold up to the stream's current last sequence (after an OCC conflict, say)."""
        view = self.views[project]
        return await view.wait_for(await self.store.last_seq(project), timeout)

    async def stop(self) -> None:
        if self._advisory_sub is not None:
            try:
                await self._advisory_sub.unsubscribe()  # type: ignore[attr-defined]
            except Exception:
                pass
        # Attaches still in flight finish first, so their tails are stopped too.
        await self._tasks.wait()
        for view in self.views.values():
            if view.tail is not None:
                await view.tail.stop()
            if view.gc_pause is not None:
                view.gc_pause.end()
        await self._tasks.wait()
