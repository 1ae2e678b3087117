"""REST submit throughput: `weft serve` as a subprocess, POST /api/work from C concurrent workers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import orjson

from bench import httpload
from weft.store.embedded import free_port

BODY = {"capability": "python", "boundary": "personal", "description": "bench item"}
PROJECT = "bench"


class NotReady(Exception):
    """weft serve could not be started or never became healthy: the row prints n/a."""


@dataclass
class RestResult:
    requests: int = 0
    ok: int = 0
    errors: int = 0
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)
    first_error: str = ""
    concurrency: int = 0
    time_bounded: bool = False
    cpu_ms_per_request: float | None = None  # the weft serve process's CPU (user + system) per request

    @property
    def rate(self) -> float:
        return self.ok / self.seconds if self.seconds > 0 else 0.0

    def pct(self, p: float) -> float:
        if not self.latencies_ms:
            return 0.0
        xs = sorted(self.latencies_ms)
        return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


SERVED_PIDS: dict[str, int] = {}  # base URL -> pid of the `weft serve` behind it (for its CPU time)


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process so far (Linux /proc), None if unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def weft_binary() -> Path:
    return Path(sys.executable).parent / "weft"


@contextlib.asynccontextmanager
async def weft_serve(nats_url: str, work_dir: Path, *, profile_to: Path | None = None,  # type: ignore[no-untyped-def]
                     extra_env: dict[str, str] | None = None, ready_s: float = 30.0):
    """`weft serve` against the bench's server; with `profile_to`, under cProfile (weft handles
    SIGTERM by shutting down cleanly, so the profile gets written)."""
    exe = weft_binary()
    if not exe.exists():
        raise NotReady(f"{exe} not found")
    argv = [str(exe), "serve"]
    if profile_to is not None:
        argv = [sys.executable, "-m", "cProfile", "-o", str(profile_to), "-m", "weft.cli", "serve"]
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WEFT_", "API_", "NATS_", "LOOMINAL_"))}
    env.update(
        NATS_URL=nats_url,
        API_PORT=str(port),
        API_HOST="127.0.0.1",
        API_TOKENS="",
        LOG_LEVEL="warning",
        WEFT_DATA_DIR=str(work_dir / "weft-data"),
    )
    env.update(extra_env or {})
    log_path = work_dir / "weft-serve.log"
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            *argv, env=env, stdout=log, stderr=log, stdin=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        await wait_healthy(base, ready_s, proc=proc, log_path=log_path)
        SERVED_PIDS[base] = proc.pid
        yield base
    finally:
        SERVED_PIDS.pop(base, None)
        await _stop(proc)


def _log_tail(path: Path | None, lines: int = 3) -> str:
    if path is None:
        return ""
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(t.strip() for t in text[-lines:])


async def wait_healthy(base: str, limit_s: float, path: str = "/health", proc: asyncio.subprocess.Process | None = None,
                       log_path: Path | None = None) -> None:
    """Until GET `path` answers 200 (bounded: `limit_s` at 10 tries a second); NotReady otherwise."""
    deadline = time.monotonic() + limit_s
    timeout = aiohttp.ClientTimeout(total=2.0)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        for _ in range(int(limit_s * 10)):  # bounded: limit_s at 10 tries a second
            if proc is not None and proc.returncode is not None:
                raise NotReady(f"weft serve exited with {proc.returncode}: {_log_tail(log_path)}")
            try:
                async with http.get(base + path) as resp:
                    if resp.status == 200:
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
    raise NotReady(f"GET {path} not 200 within {limit_s:.0f}s: {_log_tail(log_path)}")


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 20.0)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


async def fire(base: str, n: int, concurrency: int, *, time_limit_s: float = 45.0, project: str = PROJECT) -> RestResult:
    """n requests from `concurrency` keep-alive connections (bench.httpload, so the load generator
    takes little CPU from the weft process it measures); workers stop taking new ones after
    `time_limit_s` (`res.time_bounded` then says so and the rate is over the requests that finished)."""
    url = urlsplit(base)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    request = httpload.build_request(
        "POST", host, port, "/api/work", orjson.dumps(BODY),
        {"X-Weft-Project": project, "Content-Type": "application/json"},
    )
    try:
        pid = SERVED_PIDS.get(base)
        cpu_before = cpu_seconds(pid) if pid else None
        out, seconds, bounded = await httpload.run_in_process(
            host, port, request, n, concurrency, time_limit_s=time_limit_s, warmup=min(20, n)
        )
        cpu_after = cpu_seconds(pid) if pid else None
    except (OSError, httpload.HttpLoadError) as err:
        raise NotReady(f"load generator failed: {err}") from err
    res = RestResult(concurrency=concurrency, seconds=seconds, time_bounded=bounded)
    if cpu_before is not None and cpu_after is not None and out.done:
        # Includes the warm-up's few requests: within the /proc tick (10 ms) on thousands of requests.
        res.cpu_ms_per_request = (cpu_after - cpu_before) * 1000 / out.done
    res.latencies_ms = out.latencies_ms
    res.statuses = {str(k): v for k, v in out.statuses.items()}
    res.ok = sum(v for k, v in out.statuses.items() if 200 <= k < 300)
    res.errors = sum(v for k, v in out.statuses.items() if not 200 <= k < 300)
    res.requests = res.ok + res.errors
    res.first_error = out.first_error
    return res
