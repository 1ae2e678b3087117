"""A weft replica for the fuzzer: the bundled nats-server and an in-process weft on 127.0.0.1, run
in a thread of their own (schemathesis calls synchronously), with inert mechanisms so a fuzzed
target never launches anything on this machine."""

from __future__ import annotations

import asyncio
import tempfile
import threading
from collections.abc import Coroutine
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from projections.events import decode, stream_name
from weft.service import WeftService
from weft.settings import Settings
from weft.spinup import SCHEMAS
from weft.spinup.base import Launched, ProbeResult, SpinUpRequest
from weft.store.embedded import EmbeddedNats, NatsServerConfig, free_port

T = TypeVar("T")


class InertMechanism:
    """Launches nothing: the launch fails, the probe says unknown."""

    def __init__(self, name: str) -> None:
        self.name = name

    async def launch(self, req: SpinUpRequest) -> Launched:
        raise RuntimeError("the fuzz replica launches nothing")

    async def stop(self, target: dict[str, Any], handle: dict[str, Any], graceful: bool) -> None:
        return None

    async def probe(self, target: dict[str, Any]) -> ProbeResult:
        return ProbeResult("unknown", None, "fuzz replica: no probe")


class FuzzServer:
    """`start()` returns the base URL; `last_seq` and `events_after` read the stream (from the
    caller's thread); `stop()` stops everything it started."""

    def __init__(self, *, tokens: tuple[str, ...] = (), tokens_file: bytes | None = None) -> None:
        self.tokens = tokens
        self.tokens_file = tokens_file  # the JSON of a WEFT_TOKENS_FILE (scoped tokens)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-weft", daemon=True)
        self.tmp = tempfile.TemporaryDirectory(prefix="weft-fuzz-")
        self.nats: EmbeddedNats | None = None
        self.service: WeftService | None = None

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> str:
        self.thread.start()
        return self.run(self._start())

    async def _start(self) -> str:
        self.nats = EmbeddedNats(NatsServerConfig(store_dir=Path(self.tmp.name), port=free_port(),
                                                  server_name="weft-fuzz"))
        await self.nats.start()
        tokens_path = None
        if self.tokens_file is not None:
            tokens_path = Path(self.tmp.name) / "tokens.json"
            tokens_path.write_bytes(self.tokens_file)
        settings = replace(Settings.from_env({}), api_host="127.0.0.1", api_port=0, api_tokens=self.tokens,
                           tokens_file=tokens_path, replica_name="fuzz", snapshot_every=0, warp_bridge=False, min_seq_wait_ms=500)
        self.service = WeftService(settings, mechanisms={name: InertMechanism(name) for name in SCHEMAS})
        await self.service.start(self.nats.url)
        return f"http://127.0.0.1:{self.service.port}"

    def last_seq(self, project: str) -> int:
        assert self.service is not None and self.service.readmodel is not None
        return self.run(self.service.readmodel.store.last_seq(project))

    def correlations_after(self, project: str, seq: int) -> list[tuple[int, str | None, str]]:
        """(seq, correlation id, type) of every event of `project` after `seq`."""
        return self.run(self._correlations_after(project, seq))

    async def _correlations_after(self, project: str, seq: int) -> list[tuple[int, str | None, str]]:
        assert self.service is not None and self.service.readmodel is not None
        store = self.service.readmodel.store
        last = await store.last_seq(project)
        out = []
        for s in range(seq + 1, last + 1):
            msg = await store.js.get_msg(stream_name(project), seq=s)
            ev = decode(msg.data or b"", s)
            out.append((s, ev.correlation_id, ev.type))
        return out

    def stop(self) -> None:
        try:
            self.run(self._stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.tmp.cleanup()

    async def _stop(self) -> None:
        if self.service is not None:
            await self.service.stop()
        if self.nats is not None:
            await self.nats.stop()
