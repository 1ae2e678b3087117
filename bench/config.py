"""Bench knobs, read once from the environment (see the package docstring)."""

from __future__ import annotations

import os
from dataclasses import dataclass


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip().replace("_", "")
    return int(raw) if raw else default


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class BenchConfig:
    restart_events: int
    skip_no_snapshot: bool
    raw_msgs: int
    awaited_msgs: int
    rebuild_items: int
    rest_requests: int
    rest_concurrency: int
    rest_time_limit_s: float
    load_sync_always: bool
    profile: bool
    only: frozenset[str]
    rounds: int = 5
    ws_clients: int = 500
    ha_requests: int = 4_000
    no_snapshot_limit_s: float = 120.0
    restart_limit_s: float = 180.0

    @classmethod
    def from_env(cls) -> BenchConfig:
        return cls(
            restart_events=max(10, _int("WEFT_BENCH_EVENTS", 1_000_000)),
            skip_no_snapshot=_flag("WEFT_BENCH_SKIP_NO_SNAPSHOT"),
            raw_msgs=max(100, _int("WEFT_BENCH_RAW_MSGS", 40_000)),
            awaited_msgs=max(10, _int("WEFT_BENCH_AWAITED_MSGS", 1_000)),
            rebuild_items=max(10, _int("WEFT_BENCH_REBUILD_ITEMS", 8_000)),
            rest_requests=max(10, _int("WEFT_BENCH_REST_REQUESTS", 8_000)),
            rest_concurrency=max(1, _int("WEFT_BENCH_REST_CONCURRENCY", 128)),
            rest_time_limit_s=float(max(1, _int("WEFT_BENCH_REST_SECONDS", 45))),
            load_sync_always=os.environ.get("WEFT_BENCH_LOAD_SYNC", "lazy").strip().lower() == "always",
            profile=_flag("WEFT_BENCH_PROFILE"),
            only=frozenset(x.strip() for x in os.environ.get("WEFT_BENCH_ONLY", "").split(",") if x.strip()),
            rounds=max(1, _int("WEFT_BENCH_ROUNDS", 5)),
            ws_clients=max(2, _int("WEFT_BENCH_WS_CLIENTS", 500)),
            ha_requests=max(100, _int("WEFT_BENCH_HA_REQUESTS", 4_000)),
        )

    def runs(self, section: str) -> bool:
        return not self.only or section in self.only
