"""Real load balancers for tests: nginx and haproxy run from the ops/ configs themselves, with only
the replica addresses, the listen port and log/pid paths substituted."""

from __future__ import annotations

import asyncio
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from weft.store.embedded import die_with_parent, free_port

OPS = Path(__file__).resolve().parent.parent / "ops"
NGINX_CONF = OPS / "nginx" / "weft.conf"
HAPROXY_CFG = OPS / "haproxy" / "haproxy.cfg"


def _sub(pattern: str, repl: str, text: str, count: int) -> str:
    out, n = re.subn(pattern, repl, text, flags=re.MULTILINE)
    assert n == count, f"expected {count} match(es) of {pattern!r} in the ops config, found {n}"
    return out


def nginx_conf(upstreams: Sequence[int], port: int, workdir: Path, read_timeout_s: int | None = None) -> str:
    """ops/nginx/weft.conf for replicas on 127.0.0.1:`upstreams`, listening on 127.0.0.1:`port`."""
    text = NGINX_CONF.read_text()
    assert len(upstreams) == 3
    for i, up in enumerate(upstreams, 1):
        text = _sub(rf"^(\s*server\s+)weft{i}:3000\b", rf"\g<1>127.0.0.1:{up}", text, 1)
    text = _sub(r"^(\s*listen\s+)3000;", rf"\g<1>127.0.0.1:{port};", text, 1)
    text = _sub(r"^pid\s+\S+;", f"pid {workdir}/nginx.pid;", text, 1)
    text = _sub(r"^(\s*access_log\s+)\S+", rf"\g<1>{workdir}/access.log", text, 1)
    text = _sub(r"^(\s*error_log\s+)\S+", rf"\g<1>{workdir}/error.log", text, 1)
    text = _sub(r"^worker_processes\s+\S+;", "worker_processes 1;", text, 1)
    if read_timeout_s is not None:  # only the plain API location's (the first) read timeout
        text = _sub(r"^(    proxy_read_timeout\s+)\S+;", rf"\g<1>{read_timeout_s}s;", text, 1)
    # Temp files of a non-root nginx: inside the work dir, not /var/lib/nginx.
    temps = "".join(f"  {d}_temp_path {workdir}/{d};\n" for d in
                    ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return _sub(r"^http \{\n", "http {\n" + temps, text, 1)


def haproxy_cfg(upstreams: Sequence[int], port: int, workdir: Path, check_path: str = "/health/ready",
                read_timeout_s: int | None = None, l7_retry_guard: bool = True) -> str:
    text = HAPROXY_CFG.read_text()
    assert len(upstreams) == 3
    for i, up in enumerate(upstreams, 1):
        text = _sub(rf"^(\s*server\s+weft{i}\s+)weft{i}:3000\b", rf"\g<1>127.0.0.1:{up}", text, 1)
    text = _sub(r"^(\s*bind\s+):3000$", rf"\g<1>127.0.0.1:{port}", text, 1)
    text = _sub(r"^(\s*pidfile\s+)\S+$", rf"\g<1>{workdir}/haproxy.pid", text, 1)
    if check_path != "/health/ready":
        text = _sub(r"GET /health/ready\b", f"GET {check_path}", text, 1)
    if not l7_retry_guard:  # only to show what the guard prevents
        text = _sub(r"^\s*http-request disable-l7-retry .*\n", "", text, 1)
    if read_timeout_s is not None:
        text = _sub(r"^(\s*timeout server\s+)\S+$", rf"\g<1>{read_timeout_s}s", text, 1)
    return text


NGINX_LINE = re.compile(r'"(?P<method>[A-Z]+) (?P<path>\S+) [^"]*" (?P<status>\d{3}) .*upstream="(?P<up>[^"]*)"')
# httplog: ... weft_http weft/weft2 0/0/0/1/1 200 338 - - ---- 1/1/0/0/0 0/0 "GET /health HTTP/1.1"
HAPROXY_LINE = re.compile(r' weft_http\S* \S+/(?P<server>\S+) [-\d]+/[-\d]+/[-\d]+/[-\d]+/[-\d]+ (?P<status>\d{3}) '
                          r'.* \d+/\d+/\d+/\d+/(?P<retries>\+?\d+) \d+/\d+ "(?P<method>[A-Z]+) (?P<path>\S+)')


class Logged:
    """One request in a load balancer's log: the servers it tried (nginx names every one; haproxy
    the last and how many retries), and the answer."""

    def __init__(self, method: str, path: str, status: int, servers: list[str], retries: int) -> None:
        self.method, self.path, self.status, self.servers, self.retries = method, path, status, servers, retries

    def __repr__(self) -> str:
        return f"{self.method} {self.path} {self.status} via {self.servers} retries={self.retries}"


def parse(kind: str, line: str) -> Logged | None:
    if kind == "nginx":
        m = NGINX_LINE.search(line)
        if m is None:
            return None
        ups = [u.strip() for u in m["up"].split(",") if u.strip()]
        return Logged(m["method"], m["path"], int(m["status"]), ups, len(ups) - 1)
    m = HAPROXY_LINE.search(line)
    if m is None:
        return None
    return Logged(m["method"], m["path"], int(m["status"]), [m["server"]], int(m["retries"].lstrip("+")))


class LoadBalancer:
    """nginx (`nginx -p <dir> -c <conf> -g 'daemon off;'`) or haproxy (`haproxy -db -f <cfg>`)."""

    def __init__(self, kind: str, upstreams: Sequence[int], workdir: Path, **options: object) -> None:
        self.kind = kind
        self.port = free_port()
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        if kind == "nginx":
            for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
                (workdir / d).mkdir(exist_ok=True)
            self.conf = workdir / "nginx.conf"
            self.conf.write_text(nginx_conf(upstreams, self.port, workdir, **options))  # type: ignore[arg-type]
            self.argv = [binary("nginx"), "-p", str(workdir), "-c", str(self.conf), "-g", "daemon off;"]
        else:
            self.conf = workdir / "haproxy.cfg"
            self.conf.write_text(haproxy_cfg(upstreams, self.port, workdir, **options))  # type: ignore[arg-type]
            self.argv = [binary("haproxy"), "-db", "-f", str(self.conf)]
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def check_config(self) -> None:
        test = ["-t"] if self.kind == "nginx" else ["-c"]
        proc = await asyncio.create_subprocess_exec(
            *self.argv[:1], *test, *self.argv[1:], stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT)
        out, _ = await proc.communicate()
        assert proc.returncode == 0, out.decode(errors="replace")

    async def start(self) -> None:
        await self.check_config()
        # Output to a file, never an unread pipe (haproxy logs every request to stdout).
        with _append(self.workdir / "output.log") as out:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv, stdout=out, stderr=asyncio.subprocess.STDOUT, preexec_fn=die_with_parent)
        # Ready when it accepts a connection: a bounded poll (at most 10 s), not a fixed sleep.
        for _ in range(1000):
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                if self.proc.returncode is not None:
                    raise RuntimeError(f"{self.kind} exited: {self.output_text()}") from None
                await asyncio.sleep(0.01)
                continue
            writer.close()
            await writer.wait_closed()
            return
        raise RuntimeError(f"{self.kind} never listened on {self.port}")

    def output_text(self) -> str:
        path = self.workdir / "output.log"
        return path.read_text(errors="replace") if path.exists() else ""

    async def stop(self) -> None:
        if self.proc is not None:
            await terminate(self.proc)
        self.proc = None

    def server_id(self, index: int, port: int) -> str:
        """How the log names replica `index` (0-based) on `port`."""
        return f"weft{index + 1}" if self.kind == "haproxy" else f"127.0.0.1:{port}"

    def requests(self) -> list[Logged]:
        return [r for r in (parse(self.kind, line) for line in self.access_log()) if r is not None]

    def access_log(self) -> list[str]:
        """One line a request: nginx's access log; haproxy's httplog lines on its stdout."""
        if self.kind == "haproxy":
            return [line for line in self.output_text().splitlines() if " weft_http " in line]
        path = self.workdir / "access.log"
        return path.read_text().splitlines() if path.exists() else []


async def terminate(proc: asyncio.subprocess.Process, timeout: float = 10) -> None:
    """SIGTERM, then SIGKILL if it is still there after `timeout` seconds; reaped either way."""
    if proc.returncode is None:
        proc.terminate()
    try:
        await asyncio.wait_for(proc.wait(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()


def _append(path: Path) -> BinaryIO:
    return path.open("ab")


def binary(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin:/sbin")
    return found or name


def available(name: str) -> bool:
    return shutil.which(name) is not None or shutil.which(name, path="/usr/sbin:/usr/local/sbin:/sbin") is not None
