"""A real Prometheus for tests: Debian's `prometheus` binary, run from ops/prometheus/prometheus.yml
with only the weft job's targets and the scrape interval (1 s) substituted, queried over its HTTP API.

Synchronisation is by asking Prometheus itself, with bounded deadlines: `/-/ready` for readiness,
`/api/v1/targets` for targets up and for a scrape that started after a given moment (so what a
test did before it is in the TSDB). Polls are spaced by a short pause; nothing waits a fixed time
in the hope that something happened meanwhile.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from tests.lb import terminate
from weft.store.embedded import die_with_parent, free_port

OPS_CONFIG = Path(__file__).resolve().parent.parent / "ops" / "prometheus" / "prometheus.yml"
PACKAGE = "prometheus"  # the Debian package that ships /usr/bin/prometheus
POLL_S = 0.1  # pause between two polls of a bounded wait


def prometheus_binary() -> str | None:
    """The `prometheus` on PATH, else Debian's /usr/bin/prometheus; None when neither is there."""
    found = shutil.which("prometheus")
    if found is None and Path("/usr/bin/prometheus").exists():
        found = "/usr/bin/prometheus"
    return found


def available() -> bool:
    """Whether a `prometheus` binary is there (tests skip, naming the Debian package, when not)."""
    return prometheus_binary() is not None


SKIP_REASON = (f"needs prometheus (Debian package `{PACKAGE}`; `make test` installs it when run as root "
               "with apt)")


def prometheus_config(targets: Sequence[str], interval: str = "1s") -> str:
    """ops/prometheus/prometheus.yml with the weft job scraping `targets` every `interval`; the other
    jobs (NATS through its exporter, which does not run here) are left out."""
    config = yaml.safe_load(OPS_CONFIG.read_text())
    jobs = [job for job in config["scrape_configs"] if job["job_name"] == "weft"]
    assert len(jobs) == 1, f"{OPS_CONFIG} has no single `weft` job"
    jobs[0]["static_configs"] = [{"targets": list(targets)}]
    config["scrape_configs"] = jobs
    config["global"] = {**config.get("global", {}), "scrape_interval": interval, "evaluation_interval": interval,
                        "scrape_timeout": interval}
    return str(yaml.safe_dump(config, sort_keys=False))


class PrometheusError(AssertionError):
    """Prometheus did not start, or answered a query with an error."""


class Prometheus:
    """`prometheus --config.file=... --storage.tsdb.path=... --web.listen-address=127.0.0.1:<port>`."""

    def __init__(self, binary: str, workdir: Path, targets: Sequence[str]) -> None:
        self.port = free_port()
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.config = workdir / "prometheus.yml"
        self.config.write_text(prometheus_config(targets))
        self.argv = [binary, f"--config.file={self.config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
                     f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"]
        self.log = workdir / "prometheus.log"
        self.proc: asyncio.subprocess.Process | None = None
        self.http: aiohttp.ClientSession | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, timeout: float = 20.0) -> None:
        with self.log.open("wb") as out:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv, stdout=out, stderr=asyncio.subprocess.STDOUT, preexec_fn=die_with_parent)
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        await self._until(self._ready, timeout, "Prometheus never became ready (/-/ready)")

    async def stop(self) -> None:
        if self.http is not None:
            await self.http.close()
            self.http = None
        if self.proc is not None:
            await terminate(self.proc)
        self.proc = None

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    async def _until(self, check: Any, timeout: float, what: str) -> Any:
        """Await `check()` (async, truthy when done), polling until a bounded deadline."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if self.proc is not None and self.proc.returncode is not None:
                raise PrometheusError(f"prometheus exited with {self.proc.returncode}:\n{self.output()}")
            result = await check()
            if result:
                return result
            if loop.time() > deadline:
                raise PrometheusError(f"{what} within {timeout} s:\n{self.output()}")
            await asyncio.sleep(POLL_S)  # a poll's pause; the deadline bounds the wait

    async def _ready(self) -> bool:
        assert self.http is not None
        try:
            async with self.http.get(f"{self.base}/-/ready") as resp:
                return resp.status == 200
        except aiohttp.ClientConnectionError:
            return False

    async def api(self, path: str, **params: str) -> Any:
        """`data` of a Prometheus HTTP API answer (`/api/v1/<path>`)."""
        assert self.http is not None
        async with self.http.get(f"{self.base}/api/v1/{path}", params=params) as resp:
            body = await resp.json()
        if body.get("status") != "success":
            raise PrometheusError(f"/api/v1/{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    async def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """An instant query, now or at `at` (time.time()): the result's series (a scalar or string
        answer as one of them)."""
        params = {"query": expr} if at is None else {"query": expr, "time": f"{at:.3f}"}
        data = await self.api("query", **params)
        result = data["result"]
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": result}]
        return list(result)

    async def label_values(self, label: str, match: str) -> list[str]:
        """`label_values(match, label)` as Grafana's variable query asks for it."""
        assert self.http is not None
        async with self.http.get(f"{self.base}/api/v1/label/{label}/values", params={"match[]": match}) as resp:
            body = await resp.json()
        if body.get("status") != "success":
            raise PrometheusError(f"label values of {label} for {match}: {body.get('error')}")
        return list(body["data"])

    async def targets(self) -> list[dict[str, Any]]:
        return list((await self.api("targets", state="active"))["activeTargets"])

    async def targets_up(self, instances: Sequence[str], timeout: float = 20.0) -> None:
        """Until every one of `instances` (host:port) has been scraped successfully."""
        async def up() -> bool:
            health = {t["labels"]["instance"]: t["health"] for t in await self.targets()}
            return all(health.get(i) == "up" for i in instances)

        await self._until(up, timeout, f"targets {list(instances)} not all up")

    async def scraped_after(self, moment: float, instances: Sequence[str], timeout: float = 20.0) -> None:
        """Until each of `instances` had a successful scrape that began after `moment` (time.time())."""
        async def scraped() -> bool:
            last = {t["labels"]["instance"]: t for t in await self.targets()}
            return all(i in last and last[i]["health"] == "up"
                       and datetime.fromisoformat(last[i]["lastScrape"]).timestamp() > moment for i in instances)

        await self._until(scraped, timeout, f"no scrape of {list(instances)} after {moment}")

    async def scrape_round(self, instances: Sequence[str], timeout: float = 20.0) -> None:
        """Until every one of `instances` has been scraped once more from now on."""
        await self.scraped_after(time.time(), instances, timeout)
