"""The chaos run's clients, all through the load balancer, each keeping its own record of what it
was told (the invariants compare those records with the stream).

- `Submitter`: POST /api/work with an Idempotency-Key and an X-Correlation-Id of its own per
  logical submit; an unknown outcome (no answer, 502, 503, 504) is sent again with the same key
  and correlation id until a 2xx, bounded by `retry_for_s`.
- `Canceller`: POST /api/work/{id}/cancel on some acknowledged items (safe to repeat: decided on
  the stream's latest state), same retry rule; 200 and 409 are final answers.
- `WsSubscriber`: /api/ws, topic `work` of the project from seq 1; on any disconnect it connects
  again (nginx picks any replica) and subscribes with `fromSeq` = the last seq it saw + 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

UNKNOWN = (0, 502, 503, 504)  # 0: no answer at all (connection closed or timed out)
WORK = {"capability": "python", "boundary": "personal"}


@dataclass
class SubmitRecord:
    key: str
    correlation: str
    description: str
    statuses: list[int] = field(default_factory=list)
    work_id: str | None = None  # once acknowledged (2xx)
    seq: int | None = None
    unexpected: str | None = None  # a final answer that is neither 2xx nor an unknown outcome

    @property
    def acked(self) -> bool:
        return self.work_id is not None


@dataclass
class CancelRecord:
    work_id: str
    correlation: str
    statuses: list[int] = field(default_factory=list)
    status: int | None = None  # the final answer (200 or 409)
    already: bool = False  # 200 with alreadyCancelled
    seq: int | None = None
    unexpected: str | None = None


def _timeout() -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=20, sock_connect=5)


async def _post(http: aiohttp.ClientSession, url: str, params: dict[str, str], body: Any,
                headers: dict[str, str]) -> tuple[int, Any]:
    try:
        async with http.post(url, json=body, params=params, headers=headers, timeout=_timeout()) as resp:
            text = await resp.text()
            try:
                return resp.status, orjson.loads(text)
            except orjson.JSONDecodeError:
                return resp.status, text
    except (aiohttp.ClientError, TimeoutError, ConnectionError):
        return 0, None


async def _post_until_known(http: aiohttp.ClientSession, url: str, params: dict[str, str], body: Any,
                            headers: dict[str, str], statuses: list[int], retry_for_s: float) -> tuple[int, Any] | None:
    """The same request again while its outcome is unknown (UNKNOWN), every status noted in
    `statuses`; the first known answer, or None once `retry_for_s` is over."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + retry_for_s
    while True:
        status, answer = await _post(http, url, params, body, headers)
        statuses.append(status)
        if status not in UNKNOWN:
            return status, answer
        if loop.time() >= deadline:
            return None
        await asyncio.sleep(0.2)  # back off before the retry (Retry-After is 1 s; be quicker)


class Submitter:
    def __init__(self, base: str, project: str, tag: str, workers: int = 2, pause_s: float = 0.4,
                 retry_for_s: float = 90.0, seed: int = 0) -> None:
        self.base, self.project, self.tag = base, project, tag
        self.workers, self.pause_s, self.retry_for_s = workers, pause_s, retry_for_s
        self.records: list[SubmitRecord] = []
        self.stop = asyncio.Event()
        self.acked_event = asyncio.Event()  # set on each acknowledgement (cleared by whoever waits)
        self._n = 0
        self._rng = random.Random(seed)

    @property
    def acked(self) -> list[SubmitRecord]:
        return [r for r in self.records if r.acked]

    async def submit_one(self, http: aiohttp.ClientSession) -> SubmitRecord:
        i, self._n = self._n, self._n + 1
        rec = SubmitRecord(f"{self.tag}-key-{i}", f"{self.tag}-cid-{i}", f"chaos {self.tag} {i}")
        self.records.append(rec)
        body = {**WORK, "description": rec.description}
        headers = {"Idempotency-Key": rec.key, "X-Correlation-Id": rec.correlation}
        known = await _post_until_known(http, self.base + "/api/work", {"projectId": self.project}, body, headers,
                                        rec.statuses, self.retry_for_s)
        if known is None:
            rec.unexpected = f"no 2xx in {self.retry_for_s}s: {rec.statuses[-10:]}"
        elif known[0] in (200, 201, 202) and isinstance(known[1], dict):
            rec.work_id, rec.seq = str(known[1]["id"]), known[1].get("seq")
            self.acked_event.set()
        else:
            rec.unexpected = f"{known[0]} {str(known[1])[:300]}"
        return rec

    async def run(self, http: aiohttp.ClientSession) -> None:
        async def worker() -> None:
            while not self.stop.is_set():
                await self.submit_one(http)
                with contextlib.suppress(TimeoutError):  # load pacing, ended early by stop
                    await asyncio.wait_for(self.stop.wait(), self._rng.uniform(0.5, 1.5) * self.pause_s)

        await asyncio.gather(*(worker() for _ in range(self.workers)))

    async def wait_new_ack(self, timeout: float) -> bool:
        """Whether a submit was acknowledged (from now on) within `timeout`."""
        self.acked_event.clear()
        try:
            await asyncio.wait_for(self.acked_event.wait(), timeout)
            return True
        except TimeoutError:
            return False


class Canceller:
    def __init__(self, base: str, project: str, tag: str, submitter: Submitter, pause_s: float = 1.0,
                 retry_for_s: float = 90.0, seed: int = 0) -> None:
        self.base, self.project, self.tag = base, project, tag
        self.submitter, self.pause_s, self.retry_for_s = submitter, pause_s, retry_for_s
        self.records: list[CancelRecord] = []
        self.stop = asyncio.Event()
        self._rng = random.Random(seed)
        self._asked: set[str] = set()

    async def cancel_one(self, http: aiohttp.ClientSession, sub: SubmitRecord) -> CancelRecord:
        assert sub.work_id is not None
        rec = CancelRecord(sub.work_id, f"{self.tag}-cancel-{len(self.records)}")
        self.records.append(rec)
        params = {"projectId": self.project}
        if sub.seq:
            params["min_seq"] = str(sub.seq)  # whichever replica answers has folded the submit
        headers = {"X-Correlation-Id": rec.correlation}
        known = await _post_until_known(http, f"{self.base}/api/work/{sub.work_id}/cancel", params,
                                        {"reason": "chaos"}, headers, rec.statuses, self.retry_for_s)
        if known is None:
            rec.unexpected = f"no final answer in {self.retry_for_s}s: {rec.statuses[-10:]}"
        elif known[0] == 200 and isinstance(known[1], dict):
            rec.status, rec.already, rec.seq = 200, bool(known[1].get("alreadyCancelled")), known[1].get("seq")
        elif known[0] == 409:
            rec.status = 409
        else:
            rec.unexpected = f"{known[0]} {str(known[1])[:300]}"
        return rec

    async def run(self, http: aiohttp.ClientSession) -> None:
        while not self.stop.is_set():
            with contextlib.suppress(TimeoutError):  # load pacing, ended early by stop
                await asyncio.wait_for(self.stop.wait(), self._rng.uniform(0.5, 1.5) * self.pause_s)
            if self.stop.is_set():
                return
            # Mostly recent items (likely still pending or running), sometimes any.
            candidates = [r for r in self.submitter.acked[-8:] if r.work_id not in self._asked]
            if not candidates:
                continue
            pick = self._rng.choice(candidates)
            self._asked.add(str(pick.work_id))
            await self.cancel_one(http, pick)


@dataclass(frozen=True)
class Seen:
    seq: int
    event: str
    work_id: str


class WsSubscriber:
    def __init__(self, base: str, project: str, name: str) -> None:
        self.url = base.replace("http://", "ws://") + "/api/ws"
        self.project, self.name = project, name
        self.first_from = 1
        self.seen: list[Seen] = []
        self.connections = 0
        self.errors: list[str] = []
        self.stop = asyncio.Event()
        self.progress = asyncio.Event()  # set on each event

    @property
    def next_seq(self) -> int:
        return self.seen[-1].seq + 1 if self.seen else self.first_from

    async def run(self, http: aiohttp.ClientSession) -> None:
        while not self.stop.is_set():
            try:
                await self._session(http)
            except (aiohttp.ClientError, TimeoutError, ConnectionError, RuntimeError):
                pass
            if not self.stop.is_set():
                await asyncio.sleep(0.1)  # back off before reconnecting

    async def _session(self, http: aiohttp.ClientSession) -> None:
        async with http.ws_connect(self.url, heartbeat=5.0, timeout=aiohttp.ClientWSTimeout(ws_close=2)) as sock:
            self.connections += 1
            await sock.send_json({"type": "subscribe", "topic": "work", "projectId": self.project,
                                  "fromSeq": self.next_seq})
            stopper = asyncio.create_task(self.stop.wait())
            try:
                while True:
                    receive = asyncio.create_task(sock.receive())
                    done, _ = await asyncio.wait({receive, stopper}, return_when=asyncio.FIRST_COMPLETED)
                    if receive not in done:
                        receive.cancel()
                        with contextlib.suppress(asyncio.CancelledError, Exception):
                            await receive
                        return
                    msg = receive.result()
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        return  # closed, closing, error: reconnect
                    body = orjson.loads(msg.data)
                    if body.get("type") == "event" and body.get("topic") == "work":
                        self.seen.append(Seen(int(body["seq"]), str(body["event"]),
                                              str((body.get("data") or {}).get("workId"))))
                        self.progress.set()
                    elif body.get("type") == "error":
                        self.errors.append(str(body)[:300])
            finally:
                stopper.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await stopper

    async def caught_up(self, last_seq: int, timeout: float) -> bool:
        """Wait (bounded) until this subscriber has seen an event at or beyond `last_seq`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not (self.seen and self.seen[-1].seq >= last_seq):
            self.progress.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.progress.wait(), min(remaining, 1.0))
        return True
