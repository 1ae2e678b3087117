"""An async client of the weft agent protocol (docs/agent-protocol.md), for `weft agent` and tests.

    client = AgentClient("myproject", "my-guid")
    await client.connect("nats://127.0.0.1:4222")       # reconnects forever
    reply = await client.register(agent_type="claude-code", capabilities=["python"], boundaries=["*"])
    async for push in client.pushes():                   # Assignment | Cancel | Shutdown
        ...
    await client.accept(work_id); await client.progress(work_id, 50, "halfway")
    await client.complete(work_id, summary="done")       # or client.fail(work_id, "why", recoverable=True)
    await client.deregister("bye"); await client.close()

Requests that must not be lost (register, accept, complete, fail, and sync when asked) are retried
with a capped exponential backoff while weft cannot answer (timeout, no responders, disconnected,
`Unavailable`): weft answers repeats idempotently. Any other `{"ok": false}` reply raises
`RequestError` at once (`Conflict`: the item is no longer ours, stop working on it).

`attempt` (optional on the work requests) is the item's `attempts` value from the assignment. It is
not in protocol v1 (weft ignores unknown fields today); it lets weft tell a late retry of attempt 1's
`complete`/`fail` from a report about attempt 2 when the item came back to the same agent.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import nats
import nats.errors
import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from weft.core.protocol import heartbeat_subject, inbox_subject, request_subject
from weft.stamps import utc_now
from weft.store import connection
from weft.store.connection import NatsAuth

log = logging.getLogger("weft.agent.client")

Body = dict[str, Any]




class RequestError(Exception):
    """weft answered `{"ok": false, ...}` (not `Unavailable`, which is retried)."""

    def __init__(self, verb: str, error: str, message: str = "", field: str | None = None) -> None:
        super().__init__(f"{verb}: {error}: {message}" if message else f"{verb}: {error}")
        self.verb = verb
        self.error = error
        self.message = message
        self.field = field

    @property
    def conflict(self) -> bool:
        return self.error == "Conflict"

    @property
    def not_found(self) -> bool:
        return self.error == "NotFound"


class RetriesExhausted(Exception):
    """A request with a deadline got no answer from weft in time."""


# Transient: weft (or NATS) cannot answer now; the same request may be repeated.
TRANSIENT = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.StaleConnectionError,
    nats.errors.FlushTimeoutError,
    asyncio.TimeoutError,
    OSError,
)


@dataclass(frozen=True)
class ShutdownRequest:
    graceful: bool
    reason: str | None = None
    grace_period_ms: int | None = None

    @classmethod
    def parse(cls, body: Any) -> ShutdownRequest | None:
        if not isinstance(body, Mapping):
            return None
        grace = body.get("gracePeriodMs")
        return cls(
            graceful=bool(body.get("graceful", True)),
            reason=body.get("reason") if isinstance(body.get("reason"), str) else None,
            grace_period_ms=grace if isinstance(grace, int) and not isinstance(grace, bool) else None,
        )


@dataclass(frozen=True)
class Assignment:
    work: Body

    @property
    def work_id(self) -> str:
        return str(self.work.get("id"))


@dataclass(frozen=True)
class Cancel:
    work_id: str
    reason: str | None = None


@dataclass(frozen=True)
class Shutdown:
    request: ShutdownRequest


Push = Assignment | Cancel | Shutdown


def parse_push(body: Any) -> Push | None:
    """An inbox message as a typed push, or None if it is not one this client understands."""
    if not isinstance(body, Mapping):
        return None
    kind = body.get("type")
    if kind == "assignment" and isinstance(body.get("work"), Mapping) and isinstance(body["work"].get("id"), str):
        return Assignment(dict(body["work"]))
    if kind == "cancel" and isinstance(body.get("workId"), str):
        reason = body.get("reason")
        return Cancel(body["workId"], reason if isinstance(reason, str) else None)
    if kind == "shutdown":
        req = ShutdownRequest.parse(body)
        return Shutdown(req) if req is not None else None
    return None


def _work_list(raw: Any) -> list[Body]:
    if not isinstance(raw, list):
        return []
    return [dict(w) for w in raw if isinstance(w, Mapping) and isinstance(w.get("id"), str)]


@dataclass(frozen=True)
class RegisterReply:
    guid: str
    seq: int | None
    heartbeat_interval_ms: int | None
    inbox: str | None
    assignments: list[Body]
    shutdown: ShutdownRequest | None
    raw: Body = field(repr=False)

    @classmethod
    def parse(cls, body: Body, guid: str) -> RegisterReply:
        hb = body.get("heartbeatIntervalMs")
        return cls(
            guid=str(body.get("guid") or guid),
            seq=body.get("seq") if isinstance(body.get("seq"), int) else None,
            heartbeat_interval_ms=hb if isinstance(hb, int) and hb > 0 else None,
            inbox=body.get("inbox") if isinstance(body.get("inbox"), str) else None,
            assignments=_work_list(body.get("assignments")),
            shutdown=ShutdownRequest.parse(body.get("shutdown")),
            raw=body,
        )


@dataclass(frozen=True)
class SyncReply:
    assignments: list[Body]
    shutdown: ShutdownRequest | None
    raw: Body = field(repr=False)

    @classmethod
    def parse(cls, body: Body) -> SyncReply:
        return cls(_work_list(body.get("assignments")), ShutdownRequest.parse(body.get("shutdown")), body)


class AgentClient:
    """One agent's side of the protocol over one NATS connection.

    Pass `nc` to use a connection you own (tests); otherwise `connect()` opens one that reconnects
    forever and reports reconnects to `on_reconnect` listeners. `request_timeout_s` bounds one
    attempt; `max_backoff_s` caps the wait between attempts of a retried request.
    """

    def __init__(
        self,
        project: str,
        guid: str,
        *,
        nc: NATS | None = None,
        request_timeout_s: float = 5.0,
        max_backoff_s: float = 5.0,
    ) -> None:
        self.project = project
        self.guid = guid
        self._nc = nc
        self._owns_nc = False
        self.request_timeout_s = request_timeout_s
        self.max_backoff_s = max_backoff_s
        self._connected = asyncio.Event()
        if nc is not None and nc.is_connected:
            self._connected.set()
        self._reconnect_listeners: list[Callable[[], None]] = []
        self._push_listeners: list[Callable[[Push], None]] = []
        self._pushes: asyncio.Queue[Push | None] = asyncio.Queue()
        self._subs: dict[str, Subscription] = {}
        self._closed = False

    # --- connection -------------------------------------------------------------------------------

    @property
    def nc(self) -> NATS:
        if self._nc is None:
            raise RuntimeError("AgentClient is not connected: call connect() or pass nc")
        return self._nc

    @property
    def inbox(self) -> str:
        return inbox_subject(self.project, self.guid)

    @property
    def is_connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    async def connect(
        self,
        url: str,
        *,
        user: str | None = None,
        password: str | None = None,
        name: str | None = None,
        connect_timeout_s: float = 0.0,
        auth: NatsAuth | None = None,
        inbox_prefix: str | None = None,
    ) -> None:
        """Connect, retrying until `connect_timeout_s` (0: forever); afterwards reconnect forever.
        `auth`: credentials and TLS (`weft.store.natsauth`); `inbox_prefix`: where replies come
        (`natsauth.agent_inbox_prefix`: per project, so NATS permissions can keep projects apart)."""

        async def on_disconnect() -> None:
            self._connected.clear()
            if not self._closed:
                log.warning("nats disconnected", extra={"agent_guid": self.guid})

        async def on_reconnect() -> None:
            self._connected.set()
            log.info("nats reconnected", extra={"agent_guid": self.guid})
            self.notify_reconnected()

        async def on_error(err: Exception) -> None:
            log.warning("nats error: %s", err, extra={"agent_guid": self.guid})

        connecting = connection.connect(
            url,
            auth=auth,
            user=user,
            password=password,
            name=name or f"weft-agent-{self.guid}",
            **connection.RECONNECT_FOREVER,
            disconnected_cb=on_disconnect,
            reconnected_cb=on_reconnect,
            error_cb=on_error,
            **({"inbox_prefix": inbox_prefix} if inbox_prefix else {}),
        )
        self._nc = await (asyncio.wait_for(connecting, connect_timeout_s) if connect_timeout_s > 0 else connecting)
        self._owns_nc = True
        self._connected.set()

    def on_reconnect(self, listener: Callable[[], None]) -> None:
        """Call `listener()` after every reconnect (the agent re-syncs then)."""
        self._reconnect_listeners.append(listener)

    def on_push(self, listener: Callable[[Push], None]) -> None:
        """Call `listener(push)` for every push, in addition to queueing it for `pushes()`."""
        self._push_listeners.append(listener)

    def notify_reconnected(self) -> None:
        """For owners of their own `nc`: tell the client (and its listeners) the connection is back."""
        self._connected.set()
        for listener in list(self._reconnect_listeners):
            try:
                listener()
            except Exception:
                log.exception("reconnect listener failed")

    async def close(self) -> None:
        """Stop the inbox and end `pushes()`; closes the connection if `connect()` opened it."""
        if self._closed:
            return
        self._closed = True
        for sub in self._subs.values():
            try:
                await sub.unsubscribe()
            except nats.errors.Error:
                pass
        self._subs.clear()
        self._pushes.put_nowait(None)
        if self._owns_nc and self._nc is not None and not self._nc.is_closed:
            await self._nc.close()

    # --- pushes -----------------------------------------------------------------------------------

    async def subscribe_inbox(self, subject: str | None = None) -> None:
        """Listen on the inbox (idempotent). `register()` does this first, before it registers."""
        subject = subject or self.inbox
        if subject in self._subs:
            return
        self._subs[subject] = await self.nc.subscribe(subject, cb=self._on_inbox)

    async def _on_inbox(self, msg: Msg) -> None:
        try:
            body = orjson.loads(msg.data)
        except orjson.JSONDecodeError:
            log.warning("ignoring a push that is not JSON", extra={"agent_guid": self.guid})
            return
        push = parse_push(body)
        if push is None:
            log.warning("ignoring an unknown push: %.200s", msg.data, extra={"agent_guid": self.guid})
            return
        self._pushes.put_nowait(push)
        for listener in list(self._push_listeners):
            try:
                listener(push)
            except Exception:
                log.exception("push listener failed")

    async def pushes(self) -> AsyncIterator[Push]:
        """Every push in arrival order, until `close()`. Iterate it from one task only."""
        while True:
            push = await self._pushes.get()
            if push is None:
                self._pushes.put_nowait(None)  # wake any other iterator too
                return
            yield push

    # --- requests ---------------------------------------------------------------------------------

    async def request(
        self,
        verb: str,
        body: Body,
        *,
        retry: bool = False,
        deadline_s: float | None = None,
    ) -> Body:
        """One request; with `retry`, repeated on transient failures until answered or `deadline_s`.

        Returns the reply body (`ok: true`). Raises `RequestError` for a definite `ok: false`, the
        transient error itself without `retry`, `RetriesExhausted` when the deadline passes.
        """
        subject = request_subject(self.project, verb)
        payload = orjson.dumps(body)
        until = None if deadline_s is None else time.monotonic() + deadline_s
        backoff = 0.1
        attempt = 0
        while True:
            attempt += 1
            try:
                if self._nc is None or self._nc.is_closed:
                    raise nats.errors.ConnectionClosedError
                timeout = self.request_timeout_s
                if until is not None:
                    timeout = max(0.05, min(timeout, until - time.monotonic()))
                try:
                    msg = await self.nc.request(subject, payload, timeout=timeout)
                finally:
                    _raise_if_cancelling()
                reply = orjson.loads(msg.data)
                if not isinstance(reply, dict):
                    raise RequestError(verb, "ValidationError", "reply is not a JSON object")
                if reply.get("ok") is True:
                    return reply
                error = str(reply.get("error") or "Error")
                if error not in ("Unavailable", "OutcomeUnknown"):  # both: a repeat is answered idempotently
                    raise RequestError(verb, error, str(reply.get("message") or ""), reply.get("field"))
                failure: Exception = RequestError(verb, error, str(reply.get("message") or ""))
            except nats.errors.ConnectionClosedError:
                raise
            except TRANSIENT as err:
                failure = err
            except orjson.JSONDecodeError:
                failure = RequestError(verb, "ValidationError", "reply is not JSON")
                if not retry:
                    raise failure from None
            if not retry:
                raise failure
            if until is not None and time.monotonic() >= until:
                raise RetriesExhausted(f"{verb}: no answer from weft ({failure!r})")
            pause = min(self.max_backoff_s, backoff) * (0.5 + random.random() / 2)
            backoff *= 2
            if attempt == 1 or attempt % 10 == 0:
                log.warning(
                    "%s: weft did not answer (%s); retrying", verb, type(failure).__name__,
                    extra={"agent_guid": self.guid, "attempt": attempt, **_work_extra(body)},
                )
            if until is not None:
                pause = max(0.0, min(pause, until - time.monotonic()))
            await self._pause(pause)

    async def _pause(self, seconds: float) -> None:
        """Wait `seconds` before the next attempt, but no longer than until the connection is back."""
        if self.is_connected or seconds <= 0:
            await asyncio.sleep(seconds)
            return
        try:
            await asyncio.wait_for(self._connected.wait(), seconds)
        except TimeoutError:
            pass

    async def register(
        self,
        *,
        agent_type: str,
        capabilities: Sequence[str],
        boundaries: Sequence[str],
        max_concurrent_tasks: int = 1,
        handle: str | None = None,
        hostname: str | None = None,
        username: str | None = None,
        labels: Mapping[str, str] | None = None,
        spin_up_id: str | None = None,
        target_id: str | None = None,
        spindown_after_idle_ms: int | None = None,
        retry: bool = True,
        deadline_s: float | None = None,
    ) -> RegisterReply:
        """Subscribe to the inbox, then register (retried until weft answers unless `retry=False`)."""
        await self.subscribe_inbox()
        body: Body = {
            "guid": self.guid,
            "agentType": agent_type,
            "capabilities": list(capabilities),
            "boundaries": list(boundaries),
            "maxConcurrentTasks": max_concurrent_tasks,
        }
        optional: Body = {
            "handle": handle,
            "hostname": hostname,
            "username": username,
            "labels": dict(labels) if labels else None,
            "spinUpId": spin_up_id,
            "targetId": target_id,
            "spindownAfterIdleMs": spindown_after_idle_ms,
        }
        body.update({k: v for k, v in optional.items() if v is not None})
        reply = RegisterReply.parse(await self.request("agent.register", body, retry=retry, deadline_s=deadline_s), self.guid)
        if reply.inbox and reply.inbox != self.inbox:
            await self.subscribe_inbox(reply.inbox)
        return reply

    async def sync(self, *, retry: bool = True, deadline_s: float | None = None) -> SyncReply:
        body = await self.request("agent.sync", {"guid": self.guid}, retry=retry, deadline_s=deadline_s)
        return SyncReply.parse(body)

    async def deregister(self, reason: str | None = None, *, deadline_s: float | None = 10.0) -> Body:
        body: Body = {"guid": self.guid}
        if reason:
            body["reason"] = reason[:2000]
        return await self.request("agent.deregister", body, retry=True, deadline_s=deadline_s)

    async def heartbeat(self, current_task_count: int, status: str | None = None) -> bool:
        """Publish one heartbeat; False (nothing sent) while disconnected: a stale beat is useless."""
        if not self.is_connected:
            return False
        body: Body = {"guid": self.guid, "currentTaskCount": current_task_count, "ts": utc_now()}
        if status:
            body["status"] = status
        try:
            await self.nc.publish(heartbeat_subject(self.project, self.guid), orjson.dumps(body))
        except (nats.errors.Error, OSError) as err:
            log.debug("heartbeat not sent: %s", err, extra={"agent_guid": self.guid})
            return False
        return True

    def _ref(self, work_id: str, attempt: int | None) -> Body:
        body: Body = {"guid": self.guid, "workId": work_id}
        if attempt is not None:
            body["attempt"] = attempt  # the item's `attempts` when assigned; see the module docstring
        return body

    async def accept(self, work_id: str, *, attempt: int | None = None, retry: bool = True) -> Body:
        return await self.request("work.accept", self._ref(work_id, attempt), retry=retry)

    async def progress(
        self, work_id: str, progress: int, message: str | None = None, *, attempt: int | None = None,
        retry: bool = False,
    ) -> Body:
        body = self._ref(work_id, attempt)
        body["progress"] = max(0, min(100, int(progress)))
        if message:
            body["message"] = message
        return await self.request("work.progress", body, retry=retry)

    async def complete(
        self,
        work_id: str,
        *,
        summary: str | None = None,
        output: Any = None,
        artifacts: list[Any] | None = None,
        attempt: int | None = None,
        retry: bool = True,
    ) -> Body:
        body = self._ref(work_id, attempt)
        if summary is not None:
            body["summary"] = summary
        if output is not None:
            body["output"] = output
        if artifacts is not None:
            body["artifacts"] = artifacts
        return await self.request("work.complete", body, retry=retry)

    async def fail(
        self,
        work_id: str,
        message: str,
        *,
        code: str | None = None,
        recoverable: bool = False,
        attempt: int | None = None,
        retry: bool = True,
    ) -> Body:
        body = self._ref(work_id, attempt)
        body.update(message=message or "failed", recoverable=recoverable)
        if code is not None:
            body["code"] = code
        return await self.request("work.fail", body, retry=retry)


def _raise_if_cancelling() -> None:
    """Re-raise a cancellation that `asyncio.wait_for` swallowed (Python 3.11 drops a cancel that
    arrives as the awaited reply completes); otherwise a cancelled retry loop would keep going."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _work_extra(body: Body) -> Body:
    work_id = body.get("workId")
    return {"work_id": work_id} if work_id else {}
