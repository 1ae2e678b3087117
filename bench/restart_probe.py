"""A real restart, measured: a fresh Python process connects, loads the snapshot, folds the tail,
and reports when its projection is ready. Run by bench.run; prints one JSON line.

    python -m bench.restart_probe NATS_URL PROJECT
"""

from __future__ import annotations

import cProfile
import os
import sys
import time

T_IMPORTS = time.perf_counter()


import orjson  # noqa: E402

from bench.rebuild import TimedReadModel, TimedSnapshots, peak_rss_mb  # noqa: E402
from weft import aio  # noqa: E402
from weft.store import connection  # noqa: E402
from weft.store.eventstore import EventStore  # noqa: E402


async def main(url: str, project: str) -> None:
    t0 = time.perf_counter()
    nc = await connection.connect(url)  # as weft serve: its client class and event loop
    snapshots = TimedSnapshots(nc.jetstream())
    replica = TimedReadModel(EventStore(snapshots.resources), snapshots=snapshots, snapshot_every=0)
    t_connected = time.perf_counter()
    await replica.start()
    await replica.wait_ready(timeout=600)
    t_ready = time.perf_counter()
    view = replica.views[project]
    report = {
        "imports_s": t0 - T_IMPORTS,
        "connect_s": t_connected - t0,
        "ready_s": t_ready - t_connected,
        "snapshot_fetch_s": snapshots.snapshot_fetch_s,
        "snapshot_decode_s": replica.snapshot_load_s - snapshots.snapshot_fetch_s,
        "seq": view.state.seq,
        "work_items": len(view.state.work),
        "events_applied": view.state.events_applied,
        "max_rss_mb": peak_rss_mb(),
        "max_rss_after_fetch_mb": snapshots.peak_rss_after_fetch_mb,
    }
    if os.environ.get("WEFT_BENCH_PROBE_PROFILE"):
        import pstats

        prof = PROFILE[0]
        prof.disable()
        pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(12)
    sys.stdout.write(orjson.dumps(report).decode() + "\n")
    sys.stdout.flush()
    os._exit(0)  # a restart is measured to ready; tearing a 2 GB heap down is not part of it


PROFILE: list[cProfile.Profile] = []

if __name__ == "__main__":
    if os.environ.get("WEFT_BENCH_PROBE_PROFILE"):
        PROFILE.append(cProfile.Profile())
        PROFILE[0].enable()
    aio.run(main(sys.argv[1], sys.argv[2]))
