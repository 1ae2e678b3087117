"""Event-loop stalls under load, snapshots included: `weft serve` folds a project of many items
while REST submits flow at a moderate rate (not saturation, where queueing hides a stall), and
snapshots fall due every `SNAPSHOT_EVERY` events. Run once with snapshots encoded on the event
loop and once in a forked child (`WEFT_SNAPSHOT_ENCODE`), against the same stream.

A stall of the loop delays every request in flight by as much, so the latency tail (p99.9, max)
shows it; `weft_event_loop_lag_seconds` (a timer every 0.1 s) shows it from inside.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson
from prometheus_client.parser import text_string_to_metric_families

from bench import eventgen, rebuild, rest

PROJECT = "benchstall"
SNAPSHOT_EVERY = 10_000
ITEMS = 30_000  # loaded first: 150,016 events, so a snapshot encodes 30,000+ items
REQUESTS = 25_000  # per mode: each run folds 150,000+ events of backlog and 25,000 live
CONCURRENCY = 16
STALL_TARGET_MS = 50.0


@dataclass
class StallResult:
    mode: str
    items_before: int
    requests: int = 0
    rate: float = 0.0
    p50_ms: float = 0.0
    p999_ms: float = 0.0
    max_ms: float = 0.0
    loop_lag_max_s: float | None = None  # the smallest histogram bound holding every observation
    snapshots: int = 0
    fork_ms: list[float] = field(default_factory=list)  # cut + fork of each forked snapshot
    errors: int = 0
    statuses: dict[str, int] = field(default_factory=dict)


async def load(url: str, items: int) -> int:
    """Bulk-load the project (5 events per item); returns the events loaded."""
    res = rebuild.RestartResult(events=eventgen.total_events(items), tail_events=0)
    await rebuild.load_stream(url, PROJECT, items, res)
    return res.events


async def scrape(base: str) -> dict[float, float]:
    """The loop-lag histogram's buckets: bound -> cumulative count."""
    async with aiohttp.ClientSession() as http, http.get(base + "/metrics") as resp:
        text = await resp.text()
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "weft_event_loop_lag_seconds":
            for s in family.samples:
                if s.name.endswith("_bucket"):
                    buckets[float(s.labels["le"])] = s.value
    return buckets


def max_bound(before: dict[float, float], after: dict[float, float]) -> float | None:
    """The smallest bucket bound under which every observation between two scrapes fell."""
    total = after.get(float("inf"), 0.0) - before.get(float("inf"), 0.0)
    if total <= 0:
        return None
    for bound in sorted(after):
        if after[bound] - before.get(bound, 0.0) >= total:
            return bound
    return None


def fork_times(log_path: Path) -> list[float]:
    out = []
    for line in log_path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            rec = orjson.loads(line)
            if isinstance(rec, dict) and rec.get("fork_ms") is not None:
                out.append(float(rec["fork_ms"]))
    return out


async def run_mode(url: str, work_dir: Path, mode: str, items_before: int, requests: int,
                   concurrency: int) -> StallResult:
    # Info as JSON: the replica's "snapshot encoded in a child" lines carry the loop's share (fork_ms).
    env = {"WEFT_SNAPSHOT_EVERY": str(SNAPSHOT_EVERY), "WEFT_SNAPSHOT_ENCODE": mode,
           "LOG_LEVEL": "info", "LOG_FORMAT": "json"}
    res = StallResult(mode, items_before)
    (work_dir / mode).mkdir(parents=True, exist_ok=True)
    async with rest.weft_serve(url, work_dir / mode, extra_env=env, ready_s=120.0) as base:
        await rest.wait_healthy(base, 120.0, "/health/ready")  # the backlog folded
        before = await scrape(base)
        out = await rest.fire(base, requests, concurrency, time_limit_s=120.0, project=PROJECT)
        after = await scrape(base)
    res.requests, res.rate, res.errors, res.statuses = out.requests, out.rate, out.errors, out.statuses
    res.p50_ms, res.p999_ms = out.pct(50), out.pct(99.9)
    res.max_ms = max(out.latencies_ms, default=0.0)
    res.loop_lag_max_s = max_bound(before, after)
    res.snapshots = out.ok // SNAPSHOT_EVERY  # at least this many fell due during the load
    res.fork_ms = fork_times(work_dir / mode / "weft-serve.log")
    return res
