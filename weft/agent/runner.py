"""The reference agent's loop: register, heartbeat, sync, and run the configured command per item.

Per work item: `work.accept`, then the command (`/bin/sh -c CMD`, in a session of its own under a
small supervisor, weft/agent/lifeline.py) with the description on stdin and `WEFT_WORK_*` and
`WEFT_FENCING_TOKEN` in its environment. When the item ends, however it ends, and when the agent
dies, even by `kill -9`, every process the command started is killed. `progress: N message` lines
on stdout become `work.progress` (best effort, latest wins); exit 0 becomes `work.complete` (summary = the
last non-progress lines, output = the stdout tail), any other exit `work.fail` (recoverable for the
configured exit codes). accept/complete/fail are retried until weft answers, so an item survives a
NATS restart; a `Conflict`/`NotFound` answer means the item is no longer ours and stops it.

Work is deduplicated by id (one run per id at a time) and by (id, attempt, assignment sequence) once
finished, so a sync answered by a replica that is a little behind cannot start a finished item
again, while a new assignment of the same attempt number (after a DLQ retry) still runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import socket
import sys
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from weft.agent.client import (
    AgentClient,
    Assignment,
    Body,
    Cancel,
    RegisterReply,
    RequestError,
    RetriesExhausted,
    Shutdown,
    ShutdownRequest,
    SyncReply,
)
from weft.agent.lifeline import EXITED, SWEPT
from weft.agent.settings import AgentSettings
from weft.aio import TaskSet
from weft.logs import correlation_var, project_var

log = logging.getLogger("weft.agent")

DEFAULT_HEARTBEAT_MS = 10_000
MAX_LINE_BYTES = 64 * 1024
MAX_ENV_VALUE_BYTES = 64 * 1024  # Linux caps one env string at 128 KiB; the full text is on stdin
MAX_PROGRESS_MESSAGE = 1000
FINISHED_MEMORY = 4096
EX_OK = 0
EX_CONFIG = 2  # the registration was refused: bad configuration, like a bad flag
SHELL = "/bin/sh"
LIFELINE = str(Path(__file__).with_name("lifeline.py"))
LIFELINE_TIMEOUT_S = 5.0  # how long the supervisor may take to confirm that the command's processes are gone

_PROGRESS_RE = re.compile(r"^\s*progress:\s*(\d{1,3})(?:\.\d+)?\s*%?(?:\s+(.*?))?\s*$", re.IGNORECASE)


def parse_progress(line: str) -> tuple[int, str | None] | None:
    """`progress: 40 compiling` -> (40, "compiling"); None if the line is not a progress line."""
    m = _PROGRESS_RE.match(line)
    if m is None:
        return None
    value = int(m.group(1))
    if value > 100:
        return None
    message = (m.group(2) or "").strip()
    return value, (message[:MAX_PROGRESS_MESSAGE] or None)


def tail_text(text: str, max_bytes: int) -> str:
    """The last `max_bytes` bytes of `text` (UTF-8), cut at a character boundary."""
    data = text.encode()
    if len(data) <= max_bytes:
        return text
    return data[-max_bytes:].decode(errors="ignore")


class TailBuffer:
    """Keeps the last lines of a stream within `max_bytes` (UTF-8), and whether it dropped any."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.lines: deque[str] = deque()
        self.size = 0
        self.truncated = False

    def add(self, line: str) -> None:
        line = tail_text(line, self.max_bytes)
        self.lines.append(line)
        self.size += len(line.encode()) + 1
        while self.size > self.max_bytes and self.lines:
            self.size -= len(self.lines.popleft().encode()) + 1
            self.truncated = True

    def text(self) -> str:
        return "\n".join(self.lines)


async def iter_lines(stream: asyncio.StreamReader, max_line: int = MAX_LINE_BYTES) -> AsyncIterator[str]:
    """Decoded lines of a byte stream; a line longer than `max_line` comes out in pieces."""
    buf = b""
    while True:
        chunk = await stream.read(65536)
        if not chunk:
            break
        buf += chunk
        while True:
            nl = buf.find(b"\n")
            if nl < 0:
                break
            line, buf = buf[:nl], buf[nl + 1 :]
            while len(line) > max_line:
                yield line[:max_line].decode(errors="replace")
                line = line[max_line:]
            yield line.rstrip(b"\r").decode(errors="replace")
        while len(buf) > max_line:
            yield buf[:max_line].decode(errors="replace")
            buf = buf[max_line:]
    if buf:
        yield buf.rstrip(b"\r").decode(errors="replace")


def _env_value(value: str, limit: int = MAX_ENV_VALUE_BYTES) -> str:
    value = value.replace("\x00", "")
    data = value.encode()
    return value if len(data) <= limit else data[:limit].decode(errors="ignore")


def work_env(settings: AgentSettings, work: Mapping[str, Any]) -> dict[str, str]:
    """The environment of one item's command: the agent's own plus the WEFT_WORK_* variables."""
    env = dict(settings.child_env)
    context = orjson.dumps(work.get("contextData") or {}).decode()
    if len(context.encode()) > MAX_ENV_VALUE_BYTES:
        log.warning("contextData too large for WEFT_WORK_CONTEXT: set to {}", extra={"work_id": work.get("id")})
        context = "{}"
    priority = work.get("priority")
    attempt = work.get("attempts")
    token = work.get("assignedSeq")
    env.update(
        WEFT_WORK_ID=_env_value(str(work.get("id") or "")),
        WEFT_WORK_TASK_ID=_env_value(str(work.get("taskId") or "")),
        WEFT_WORK_CAPABILITY=_env_value(str(work.get("capability") or "")),
        WEFT_WORK_BOUNDARY=_env_value(str(work.get("boundary") or "")),
        WEFT_WORK_PRIORITY="" if priority is None else str(priority),
        WEFT_WORK_DESCRIPTION=_env_value(str(work.get("description") or "")),
        WEFT_WORK_ATTEMPT="" if attempt is None else str(attempt),
        # The stream sequence of this run's `work.assigned`: grows with every (re)assignment of the
        # item, also when the attempt number does not (a DLQ retry resets it). Empty from a weft
        # that does not send it.
        WEFT_FENCING_TOKEN=str(token) if isinstance(token, int) and not isinstance(token, bool) else "",
        WEFT_WORK_CONTEXT=context.replace("\x00", ""),
        WEFT_PROJECT=settings.project,
        WEFT_AGENT_GUID=settings.guid,
    )
    return env


FinishedKey = tuple[str, Any, Any]


def _finished_key(work: Mapping[str, Any]) -> FinishedKey:
    """One assignment of an item: (id, attempt, the sequence of its `work.assigned`)."""
    return (str(work.get("id")), work.get("attempts"), work.get("assignedSeq"))


def _signal_group(proc: asyncio.subprocess.Process, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)  # start_new_session: the supervisor leads the command's process group


class Lifeline:
    """The agent's end of one command's lifeline, the socket to its supervisor (weft/agent/lifeline.py).

    `ended` resolves with the shell's returncode when the supervisor reports it (None if the
    supervisor died without saying). `cut()` closes our end: the supervisor SIGKILLs every process
    of the command, wherever it went, and confirms. The kernel cuts it for us if the agent dies, so
    the path a `kill -9` takes is the one every completion and cancel goes through.
    """

    def __init__(self, sock: socket.socket, proc: asyncio.subprocess.Process, warn: Callable[[str], None]) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.proc = proc
        self.warn = warn
        self.swept = False
        self.ended: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        self._reader = asyncio.create_task(self._read())
        self._cut: asyncio.Future[None] | None = None

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        buf = b""
        try:
            while data := await loop.sock_recv(self.sock, 4096):
                buf += data
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    self._on_line(line)
        except OSError:
            pass
        finally:
            self.sock.close()
            if not self.ended.done():
                self.ended.set_result(None)

    def _on_line(self, line: bytes) -> None:
        word, _, arg = line.partition(b" ")
        if word == EXITED and not self.ended.done():
            with contextlib.suppress(ValueError):
                self.ended.set_result(int(arg))
        elif word == SWEPT:
            self.swept = True

    def cut(self) -> asyncio.Future[None]:
        """Kill every process of the command (once); resolves when they are gone, bounded."""
        if self._cut is None:
            self._cut = asyncio.ensure_future(self._sweep())
        return self._cut

    async def _sweep(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)
        await asyncio.wait({self._reader}, timeout=LIFELINE_TIMEOUT_S)  # it reads until the supervisor exits
        if not self.swept:  # the supervisor was killed, or is stuck: the process group is what is in reach
            self.warn("the command's supervisor did not confirm that its processes are gone: killing its group")
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        if not self._reader.done():
            self._reader.cancel()
            await asyncio.wait({self._reader})


@dataclass
class StopRequest:
    graceful: bool
    reason: str
    grace_period_ms: int | None = None


class ProgressPump:
    """Sends an item's progress one request at a time, latest value wins, never retried."""

    def __init__(self, runner: AgentRunner, run: ItemRun) -> None:
        self.runner = runner
        self.run = run
        self.latest: tuple[int, str | None] | None = None
        self.wake = asyncio.Event()
        self.idle = asyncio.Event()
        self.idle.set()
        self.task = asyncio.create_task(self._loop())

    def offer(self, value: int, message: str | None) -> None:
        self.latest = (value, message)
        self.idle.clear()
        self.wake.set()

    async def _loop(self) -> None:
        try:
            await self._send_loop()
        finally:
            self.idle.set()

    async def _send_loop(self) -> None:
        client = self.runner.client
        while True:
            if self.latest is None:
                self.idle.set()
            await self.wake.wait()
            self.wake.clear()
            if self.latest is None:
                continue
            value, message = self.latest
            self.latest = None
            try:
                await client.progress(self.run.work_id, value, message, attempt=self.run.attempt)
                self.runner.log_item(self.run, logging.DEBUG, "progress %s%% sent", value)
            except RequestError as err:
                if err.conflict or err.not_found:
                    self.runner.stop_item(self.run, f"progress refused: {err.error} {err.message}")
                    return
                self.runner.log_item(self.run, logging.WARNING, "progress refused: %s", err)
            except Exception as err:  # transient: progress may be dropped
                self.runner.log_item(self.run, logging.DEBUG, "progress dropped: %r", err)

    async def close(self, flush_timeout_s: float = 0.0) -> None:
        """Stop sending. With `flush_timeout_s`, first give the latest value that long to go out."""
        if flush_timeout_s > 0 and not self.task.done() and not self.idle.is_set():
            flushed = asyncio.create_task(self.idle.wait())
            await asyncio.wait({flushed, self.task}, timeout=flush_timeout_s, return_when=asyncio.FIRST_COMPLETED)
            flushed.cancel()
        self.latest = None
        if not self.task.done():
            self.task.cancel()
        await asyncio.wait({self.task})


@dataclass
class ItemRun:
    work: Body
    work_id: str
    key: FinishedKey
    attempt: int | None = None
    task: asyncio.Task[None] | None = None
    proc: asyncio.subprocess.Process | None = None
    lifeline: Lifeline | None = None
    exited: asyncio.Future[int | None] | None = None  # the shell's returncode (None: unknown)
    stopped: str | None = None  # why we stopped it: nothing further is reported
    summary: deque[str] = field(default_factory=deque)
    output: TailBuffer = field(default_factory=lambda: TailBuffer(64 * 1024))
    stderr: TailBuffer = field(default_factory=lambda: TailBuffer(4096))
    pump: ProgressPump | None = None


class AgentRunner:
    """Runs one agent until it is told (or decides) to stop; `run()` returns the exit code."""

    def __init__(self, settings: AgentSettings, client: AgentClient) -> None:
        self.settings = settings
        self.client = client
        self.running: dict[str, ItemRun] = {}
        self.queued: OrderedDict[str, Body] = OrderedDict()
        self.finished: OrderedDict[FinishedKey, None] = OrderedDict()
        self.draining = False
        self.registered = asyncio.Event()
        self.heartbeat_ms = settings.heartbeat_ms or DEFAULT_HEARTBEAT_MS
        self.stop_request: StopRequest | None = None
        self.stopping = asyncio.Event()  # set once a shutdown was requested
        self._forced = asyncio.Event()
        self._idle = asyncio.Event()
        self._busy = asyncio.Event()
        self._sync_wanted = asyncio.Event()
        self._tasks = TaskSet()
        self._loops: list[asyncio.Task[None]] = []
        self._register_lock = asyncio.Lock()
        self._update_load()

    # --- logging ----------------------------------------------------------------------------------

    def log_item(self, run: ItemRun, level: int, msg: str, *args: Any, exc_info: bool = False) -> None:
        prefix = "work " + run.work_id.replace("%", "%%") + ": "
        extra = {"work_id": run.work_id, "agent_guid": self.settings.guid}
        log.log(level, prefix + msg, *args, exc_info=exc_info, extra=extra)

    # --- lifecycle --------------------------------------------------------------------------------

    def request_stop(self, req: StopRequest) -> None:
        """Graceful: take no new work, finish what runs, deregister. Forced: kill, deregister. A forced
        request after a graceful one escalates it."""
        if self.stop_request is None:
            self.stop_request = req
            log.info("shutdown requested (%s): %s", "graceful" if req.graceful else "forced", req.reason,
                     extra={"agent_guid": self.settings.guid})
        elif not req.graceful and self.stop_request.graceful:
            self.stop_request = req
            log.info("forced shutdown requested: %s", req.reason, extra={"agent_guid": self.settings.guid})
        self.draining = True
        if self.queued:
            log.info("dropping %d queued assignment(s) (weft withdraws them)", len(self.queued))
            self.queued.clear()
        if not req.graceful:
            self._forced.set()
        self.stopping.set()
        self._update_load()

    def _on_shutdown(self, req: ShutdownRequest) -> None:
        self.request_stop(StopRequest(req.graceful, req.reason or "shutdown requested by weft", req.grace_period_ms))

    async def run(self) -> int:
        project_var.set(self.settings.project)
        self.client.on_reconnect(self._sync_wanted.set)
        registering = asyncio.create_task(self._register())
        stopped = asyncio.create_task(self.stopping.wait())
        await asyncio.wait({registering, stopped}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if not registering.done():  # told to stop while weft was not answering: nothing to undo
            registering.cancel()
            await asyncio.wait({registering})
            log.info("stopped before weft answered the registration", extra={"agent_guid": self.settings.guid})
            return EX_OK
        try:
            reply = registering.result()
        except RequestError as err:
            log.error("registration refused: %s", err, extra={"agent_guid": self.settings.guid})
            return EX_CONFIG
        self.heartbeat_ms = self.settings.heartbeat_ms or reply.heartbeat_interval_ms or DEFAULT_HEARTBEAT_MS
        log.info(
            "registered as %s (heartbeat %d ms, %d held item(s))", self.settings.guid, self.heartbeat_ms,
            len(reply.assignments), extra={"agent_guid": self.settings.guid},
        )
        self._loops = [
            asyncio.create_task(self._push_loop()),
            asyncio.create_task(self._heartbeat_loop()),
            asyncio.create_task(self._sync_loop()),
        ]
        if self.settings.idle_exit_s > 0:
            self._loops.append(asyncio.create_task(self._idle_loop()))
        self._apply(reply.assignments, reply.shutdown)
        try:
            await self.stopping.wait()
            await self._wind_down()
        finally:
            for task in self._loops:
                task.cancel()
            await asyncio.gather(*self._loops, return_exceptions=True)
            for run in list(self.running.values()):
                await self._terminate(run)
            await self._tasks.wait()
        return EX_OK

    async def _register(self) -> RegisterReply:
        s = self.settings
        async with self._register_lock:
            reply = await self.client.register(
                agent_type=s.agent_type,
                capabilities=s.capabilities,
                boundaries=s.boundaries,
                max_concurrent_tasks=s.max_tasks,
                handle=s.handle,
                hostname=s.hostname or None,
                username=s.username,
                labels=s.labels,
                spin_up_id=s.spin_up_id,
                target_id=s.target_id,
                spindown_after_idle_ms=int(s.idle_exit_s * 1000) if s.idle_exit_s > 0 else None,
            )
        self.registered.set()
        return reply

    async def _wind_down(self) -> None:
        req = self.stop_request
        assert req is not None
        if req.graceful and not self._forced.is_set():
            waits = {asyncio.create_task(self._idle.wait()), asyncio.create_task(self._forced.wait())}
            grace = req.grace_period_ms / 1000 if req.grace_period_ms else None
            if self.running:
                log.info("waiting for %d running item(s) to finish", len(self.running))
            done, pending = await asyncio.wait(waits, timeout=grace, return_when=asyncio.FIRST_COMPLETED)
            for t in pending:
                t.cancel()
            if not done:
                log.warning("grace period over: stopping %d running item(s)", len(self.running))
        if self.running:
            await asyncio.gather(*(self._terminate(run, "agent shutting down") for run in list(self.running.values())))
        reason = self.stop_request.reason if self.stop_request else None
        try:
            await self.client.deregister(reason, deadline_s=self.settings.deregister_timeout_s)
            log.info("deregistered", extra={"agent_guid": self.settings.guid})
        except (RequestError, RetriesExhausted) as err:
            log.warning("deregister failed: %s", err, extra={"agent_guid": self.settings.guid})
        except Exception as err:
            log.warning("deregister failed: %r", err, extra={"agent_guid": self.settings.guid})

    # --- loops ------------------------------------------------------------------------------------

    async def _push_loop(self) -> None:
        async for push in self.client.pushes():
            if isinstance(push, Assignment):
                self.offer(push.work)
            elif isinstance(push, Cancel):
                self.cancel(push.work_id, push.reason)
            elif isinstance(push, Shutdown):
                self._on_shutdown(push.request)

    async def _heartbeat_loop(self) -> None:
        beats = 0
        while True:
            await asyncio.sleep(self.heartbeat_ms / 1000)
            status = "busy" if len(self.running) >= self.settings.max_tasks else "online"
            await self.client.heartbeat(len(self.running), status)
            beats += 1
            if self.settings.sync_every_heartbeats and beats % self.settings.sync_every_heartbeats == 0:
                self._sync_wanted.set()

    async def _sync_loop(self) -> None:
        while True:
            await self._sync_wanted.wait()
            self._sync_wanted.clear()
            try:
                await self.sync_now()
            except Exception:
                log.exception("sync failed", extra={"agent_guid": self.settings.guid})

    async def sync_now(self) -> SyncReply | None:
        """Ask weft what this agent holds and start what is not running; re-register if weft no
        longer knows the agent (it was declared lost, or the guid is unknown)."""
        try:
            reply = await self.client.sync()
        except RequestError as err:
            if (err.not_found or err.field == "guid") and not self.draining:
                log.warning("weft does not know this agent (%s): registering again", err.error,
                            extra={"agent_guid": self.settings.guid})
                registered = await self._register()
                self._apply(registered.assignments, registered.shutdown)
                return None
            raise
        if reply.raw.get("status") == "offline" and not self.draining:
            log.warning("weft lists this agent offline: registering again", extra={"agent_guid": self.settings.guid})
            registered = await self._register()
            self._apply(registered.assignments, registered.shutdown)
            return reply
        self._apply(reply.assignments, reply.shutdown)
        return reply

    async def _idle_loop(self) -> None:
        limit = self.settings.idle_exit_s
        while True:
            await self._idle.wait()
            self._busy.clear()
            busy = asyncio.create_task(self._busy.wait())
            try:
                await asyncio.wait({busy}, timeout=limit)  # not wait_for: it can swallow our cancel
            finally:
                busy.cancel()
            if not busy.done() and self._idle.is_set() and not self.draining:
                self.request_stop(StopRequest(True, f"idle for {limit:g}s"))
                return

    # --- work -------------------------------------------------------------------------------------

    def _apply(self, assignments: list[Body], shutdown: ShutdownRequest | None) -> None:
        for work in assignments:
            self.offer(work)
        if shutdown is not None:
            self._on_shutdown(shutdown)

    def offer(self, work: Body) -> None:
        """An item weft says this agent holds (push or sync): start it unless it already runs."""
        work_id = work.get("id")
        if not isinstance(work_id, str):
            return
        if self.draining:
            log.info("work %s: not taken, shutting down", work_id, extra={"work_id": work_id})
            return
        status = work.get("status")
        if status is not None and status not in ("assigned", "in-progress"):
            return
        if work_id in self.running or work_id in self.queued or _finished_key(work) in self.finished:
            return
        self.queued[work_id] = work
        self._start_queued()

    def _start_queued(self) -> None:
        while self.queued and not self.draining and len(self.running) < self.settings.max_tasks:
            work_id, work = self.queued.popitem(last=False)
            s = self.settings
            attempt = work.get("attempts")
            run = ItemRun(
                work=work, work_id=work_id, key=_finished_key(work),
                attempt=attempt if isinstance(attempt, int) and not isinstance(attempt, bool) else None,
                output=TailBuffer(s.output_max_bytes), stderr=TailBuffer(s.stderr_max_bytes),
                summary=deque(maxlen=max(1, s.summary_lines)),
            )
            self.running[work_id] = run
            run.task = asyncio.create_task(self._run_item(run))
        self._update_load()

    def cancel(self, work_id: str, reason: str | None) -> None:
        if work_id in self.queued:
            work = self.queued.pop(work_id)
            self._remember(_finished_key(work))
            log.info("work %s: cancelled before it started", work_id, extra={"work_id": work_id})
            self._update_load()
            return
        run = self.running.get(work_id)
        if run is not None:
            self.stop_item(run, f"cancelled: {reason or 'no reason given'}")

    def stop_item(self, run: ItemRun, reason: str) -> None:
        """Stop an item for good (cancel push, Conflict): kill its command, report nothing more."""
        if run.stopped is not None:
            return
        self._tasks.spawn(self._terminate(run, reason))

    async def _terminate(self, run: ItemRun, reason: str = "agent stopping") -> None:
        if run.stopped is None:
            run.stopped = reason
            self._remember(run.key)
            self.log_item(run, logging.INFO, "stopping: %s", reason)
        proc, exited = run.proc, run.exited
        if proc is not None and exited is not None and not exited.done():
            _signal_group(proc, signal.SIGTERM)  # the command's group; its supervisor ignores it
            await asyncio.wait({exited}, timeout=self.settings.kill_grace_s)
            if not exited.done():
                self.log_item(run, logging.WARNING, "still running after %gs: SIGKILL", self.settings.kill_grace_s)
        await self._end_processes(run)  # SIGKILL for what is left, in any group or session
        task = run.task
        if task is not None and task is not asyncio.current_task() and not task.done():
            task.cancel()
            await asyncio.wait({task})

    async def _end_processes(self, run: ItemRun) -> None:
        """Kill whatever is left of the item's command, in any process group of its session."""
        if run.lifeline is not None:
            await asyncio.shield(run.lifeline.cut())

    def _remember(self, key: FinishedKey) -> None:
        self.finished[key] = None
        while len(self.finished) > FINISHED_MEMORY:
            self.finished.popitem(last=False)

    def _update_load(self) -> None:
        if self.running or self.queued:
            self._idle.clear()
            self._busy.set()
        else:
            self._busy.clear()
            self._idle.set()

    async def _report(self, run: ItemRun, what: str, call: Callable[[], Awaitable[Body]]) -> bool:
        """Send accept/complete/fail (retried until answered); False if weft says it is not ours."""
        if run.stopped is not None:
            return False
        try:
            await call()
            return True
        except RequestError as err:
            self._remember(run.key)
            if err.conflict or err.not_found:
                self.log_item(run, logging.WARNING, "%s refused (%s: %s): dropping the item", what, err.error, err.message)
            else:
                self.log_item(run, logging.ERROR, "%s rejected: %s", what, err)
            return False

    async def _run_item(self, run: ItemRun) -> None:
        correlation = run.work.get("correlationId")
        correlation_var.set(correlation if isinstance(correlation, str) else None)
        try:
            if not await self._report(run, "accept", lambda: self.client.accept(run.work_id, attempt=run.attempt)):
                if run.stopped is None:
                    run.stopped = "accept refused"
                return
            self.log_item(run, logging.INFO, "accepted (attempt %s)", run.work.get("attempts"))
            if run.stopped is not None:
                return
            rc = await self._execute(run)
            # A cancel push (another task) may have stopped it meanwhile; mypy keeps the narrowing
            # of the check above across the await.
            if run.stopped is not None:
                return  # type: ignore[unreachable]
            self._remember(run.key)
            await self._finish(run, rc)
        except Exception:
            # A bug, not a verdict on the item: it stays held, and the next sync starts it again.
            self.log_item(run, logging.ERROR, "unexpected error while running the item", exc_info=True)
        finally:
            try:
                if run.pump is not None:
                    await run.pump.close()
                await self._end_processes(run)
            finally:  # also when a cancel lands in the awaits above
                if self.running.get(run.work_id) is run:
                    del self.running[run.work_id]
                self._update_load()
                self._start_queued()

    async def _execute(self, run: ItemRun) -> int | None:
        """Run the command to its end; its exit code, or None if it could not start."""
        s = self.settings
        try:
            run.proc, run.lifeline = proc, lifeline = await self._start_command(run)
        except OSError as err:
            run.stderr.add(f"could not start the command: {err}")
            self.log_item(run, logging.ERROR, "could not start the command: %s", err)
            return None
        run.exited = exited = lifeline.ended
        run.pump = ProgressPump(self, run)
        self.log_item(run, logging.INFO, "command started (pid %d)", proc.pid)
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        feeder = asyncio.create_task(self._feed(proc.stdin, str(run.work.get("description") or "")))
        readers = asyncio.gather(self._read_stdout(run, proc.stdout), self._read_stderr(run, proc.stderr))
        try:
            first: set[asyncio.Future[Any]] = {exited, readers}
            await asyncio.wait(first, return_when=asyncio.FIRST_COMPLETED)
            await exited
            if not readers.done():
                # The command exited but something it started still holds its output: end that too.
                await asyncio.wait({readers}, timeout=s.drain_timeout_s)
                if not readers.done():
                    self.log_item(run, logging.WARNING, "leftover processes hold the output: killing them")
                    await self._end_processes(run)
                    await asyncio.wait({readers}, timeout=s.drain_timeout_s)
            # What the command left running ends with it, before weft hears the outcome: a later
            # attempt of the item can never run beside a leftover of this one.
            await self._end_processes(run)
            rc = exited.result()
            if rc is None:  # the supervisor died without a word: its own exit is all we know
                try:
                    rc = await asyncio.wait_for(proc.wait(), s.drain_timeout_s + 5)
                except TimeoutError:
                    rc = proc.returncode if proc.returncode is not None else -1
            return rc
        finally:
            readers.cancel()
            feeder.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await readers
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await feeder

    async def _start_command(self, run: ItemRun) -> tuple[asyncio.subprocess.Process, Lifeline]:
        """Start the command under its supervisor: `python lifeline.py FD AGENT_PID /bin/sh -c CMD`."""
        s = self.settings
        if not sys.executable:
            raise OSError("no Python interpreter to run the command's lifeline")
        ours, theirs = socket.socketpair()
        try:
            fd = theirs.fileno()
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-I", "-S", LIFELINE, str(fd), str(os.getpid()), SHELL, "-c", s.command,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=work_env(s, run.work),
                cwd=s.workdir,
                start_new_session=True,
                pass_fds=(fd,),
            )
        except BaseException:
            ours.close()  # a supervisor that did start sees the EOF and sweeps
            raise
        finally:
            theirs.close()
        return proc, Lifeline(ours, proc, lambda msg: self.log_item(run, logging.WARNING, msg.replace("%", "%%")))

    async def _feed(self, stdin: asyncio.StreamWriter, description: str) -> None:
        try:
            stdin.write(description.encode())
            await stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            stdin.close()

    async def _read_stdout(self, run: ItemRun, stream: asyncio.StreamReader) -> None:
        async for line in iter_lines(stream):
            run.output.add(line)
            prog = parse_progress(line)
            if prog is not None:
                if run.pump is not None and run.stopped is None:
                    run.pump.offer(*prog)
            elif line.strip():
                run.summary.append(line)

    async def _read_stderr(self, run: ItemRun, stream: asyncio.StreamReader) -> None:
        async for line in iter_lines(stream):
            run.stderr.add(line)
            self.log_item(run, logging.DEBUG, "stderr: %s", line[:500])

    async def _finish(self, run: ItemRun, rc: int | None) -> None:
        s = self.settings
        if run.pump is not None:
            await run.pump.close(flush_timeout_s=s.request_timeout_s)
        if rc == 0:
            summary = tail_text("\n".join(run.summary), s.summary_max_bytes) or None
            output = run.output.text()
            if run.output.truncated:
                output = "[... earlier output truncated ...]\n" + output
            call = lambda: self.client.complete(run.work_id, summary=summary, output=output, attempt=run.attempt)  # noqa: E731
            if await self._report(run, "complete", call):
                self.log_item(run, logging.INFO, "completed")
            return
        if rc is None:
            message, code, recoverable = run.stderr.text() or "could not start the command", "spawn-error", True
        else:
            if rc < 0:
                message, code = f"command killed by signal {-rc}", f"signal-{-rc}"
            else:
                message, code = f"command exited with code {rc}", f"exit-{rc}"
            recoverable = rc in s.recoverable_exit_codes
            detail = run.stderr.text()
            if detail:
                message += "; stderr: " + detail
            elif run.summary:
                message += "; last output: " + "\n".join(run.summary)
        message = tail_text(message, 16 * 1024)
        if await self._report(run, "fail", lambda: self.client.fail(
            run.work_id, message, code=code, recoverable=recoverable, attempt=run.attempt)):
            self.log_item(run, logging.INFO, "failed (%s, recoverable=%s)", code, recoverable)
