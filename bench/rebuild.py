"""Projection rebuild and restart-to-ready: weft's own read path (EventStore tail -> ReadModel fold)."""

from __future__ import annotations

import asyncio
import contextlib
import cProfile
import gc
import io
import pstats
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from nats.aio.client import Client as NATS

from bench import eventgen
from bench.raw import BenchError, Timed, publish_core, publish_pipelined, replay_ordered, replay_ordered_iter
from bench.server import connect
from projections import ProjectState, apply, encode_state
from projections.events import decode, stream_name
from weft.store.eventstore import EventStore
from weft.store.readmodel import ProjectView, ReadModel
from weft.store.snapshots import SnapshotStore


def peak_rss_mb() -> float:
    """This process's peak resident memory. Not getrusage's ru_maxrss: Linux carries the forking
    parent's peak into it across exec (the bench's own 1 GB, measured in a probe it spawned)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return 0.0


class TimedSnapshots(SnapshotStore):
    """SnapshotStore that records snapshot sizes and fetch times (and can pretend there is none)."""

    def __init__(self, *args: Any, ignore_snapshots: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ignore_snapshots = ignore_snapshots
        self.snapshot_fetch_s = 0.0
        self.snapshot_bytes = 0
        self.saved_bytes = 0
        self.save_s = 0.0
        self.peak_rss_after_fetch_mb = 0.0

    async def load_snapshot(self, project: str) -> bytes | bytearray | None:
        if self.ignore_snapshots:
            return None
        t = time.perf_counter()
        raw = await super().load_snapshot(project)
        self.snapshot_fetch_s += time.perf_counter() - t
        self.snapshot_bytes = len(raw or b"")
        self.peak_rss_after_fetch_mb = peak_rss_mb()
        return raw

    async def save_snapshot(self, project: str, payload: bytes | bytearray | memoryview) -> None:
        t = time.perf_counter()
        await super().save_snapshot(project, payload)
        self.save_s += time.perf_counter() - t
        self.saved_bytes = len(payload)


class TimedReadModel(ReadModel):
    def __init__(self, store: EventStore, **kwargs: Any) -> None:
        super().__init__(store, **kwargs)
        self.snapshot_load_s = 0.0  # fetch + decode

    async def _load_snapshot(self, project: str) -> ProjectState | None:
        t = time.perf_counter()
        state = await super()._load_snapshot(project)
        self.snapshot_load_s += time.perf_counter() - t
        return state


@dataclass
class Ready:
    seconds: float
    connect_s: float
    attach_s: float  # connect + start() (snapshot fetch/decode, consumer created)
    snapshot_load_s: float
    snapshot_fetch_s: float
    snapshot_bytes: int
    state: ProjectState
    readmodel: TimedReadModel
    nc: NATS
    snapshots: TimedSnapshots
    profile: str = ""


async def replica_to_ready(
    url: str,
    project: str,
    *,
    timeout_s: float,
    ignore_snapshots: bool = False,
    profile: bool = False,
) -> Ready:
    """Time a brand-new replica (new connection) from nothing until `wait_ready`. Caller closes nc."""
    prof = cProfile.Profile() if profile else None
    if prof:
        prof.enable()
    t0 = time.perf_counter()
    nc = await connect(url)
    t_conn = time.perf_counter()
    snapshots = TimedSnapshots(nc.jetstream(), ignore_snapshots=ignore_snapshots)
    replica = TimedReadModel(EventStore(snapshots.resources), snapshots=snapshots, snapshot_every=0)
    t_attach = t_conn
    try:
        async with asyncio.timeout(timeout_s):  # bounds snapshot loading too, not only the tail
            await replica.start()
            t_attach = time.perf_counter()
            await replica.wait_ready()
    except TimeoutError:
        if prof:
            prof.disable()
        await replica.stop()
        await nc.close()
        raise BenchError(f"replica not ready within {timeout_s:.0f}s") from None
    except BaseException:
        if prof:
            prof.disable()
        await replica.stop()
        await nc.close()
        raise
    t1 = time.perf_counter()
    if prof:
        prof.disable()
    return Ready(
        seconds=t1 - t0,
        connect_s=t_conn - t0,
        attach_s=t_attach - t0,
        snapshot_load_s=replica.snapshot_load_s,
        snapshot_fetch_s=snapshots.snapshot_fetch_s,
        snapshot_bytes=snapshots.snapshot_bytes,
        state=replica.views[project].state,
        readmodel=replica,
        nc=nc,
        snapshots=snapshots,
        profile=profile_text(prof) if prof else "",
    )


async def close_ready(r: Ready) -> None:
    await r.readmodel.stop()
    await r.nc.close()


def profile_text(prof: cProfile.Profile, top: int = 22) -> str:
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def profile_file_text(path: Any, top: int = 30) -> str:
    out = io.StringIO()
    pstats.Stats(str(path), stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def in_process_fold(raws: list[bytes], *, gc_off: bool = False) -> Timed:
    """decode + apply without NATS: the part of a rebuild that is weft's own code."""
    state = ProjectState(project="inproc")
    gc.collect()
    if gc_off:
        gc.disable()
    try:
        t = time.perf_counter()
        for seq, raw in enumerate(raws, 1):
            apply(state, decode(raw, seq))
        return Timed(len(raws), time.perf_counter() - t)
    finally:
        gc.enable()


# --- row 3: projection rebuild ------------------------------------------------------------------


@dataclass
class RebuildResult:
    events: int
    publish: Timed
    # Paired rounds, each a raw replay of the weft stream (ordered consumer + callback, headers and
    # all, no decode) right before a rebuild of it: the ratio is taken per round, its median reported.
    raw_replays: list[Timed]
    rebuild_seconds: list[float]
    raw_replay_iter: Timed  # the same stream through `sub.messages` (how Tail read before callbacks)
    inproc: Timed
    inproc_nogc: Timed
    rebuild: Ready | None = None  # the last round's replica (profile, state)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rates(self) -> list[float]:
        return [self.events / s for s in self.rebuild_seconds]

    @property
    def ratios(self) -> list[float]:
        return [rate / raw.rate for rate, raw in zip(self.rates, self.raw_replays, strict=True)]


async def bench_rebuild(url: str, project: str, items: int, *, profile: bool, rounds: int) -> RebuildResult:
    nc = await connect(url)
    try:
        js = nc.jetstream()
        store = EventStore(js)
        await store.ensure_stream(project)
        raws: list[bytes] = []

        def keep(msgs: Any) -> Any:
            for m in msgs:
                raws.append(m[1])
                yield m

        total = eventgen.total_events(items)
        pub = await publish_pipelined(
            js, keep(eventgen.messages(eventgen.generate(project, items))), time_limit_s=180
        )
        if pub.errors:
            raise BenchError(f"{pub.errors} of {total} weft events were rejected")
        last = await store.last_seq(project)
        if last != total:
            raise BenchError(f"stream holds {last} events, expected {total}")
        raw_iter = await replay_ordered_iter(
            js, stream_name(project), f"weft.{project}.ev.>", total, time_limit_s=120
        )
    finally:
        await nc.close()
    inproc, inproc_nogc = in_process_fold(raws), in_process_fold(raws, gc_off=True)
    raws.clear()
    raw_replays: list[Timed] = []
    seconds: list[float] = []
    ready: Ready | None = None
    for rnd in range(rounds):
        nc = await connect(url)
        try:
            raw_replays.append(
                await replay_ordered(nc.jetstream(), stream_name(project), f"weft.{project}.ev.>", total, time_limit_s=120)
            )
        finally:
            await nc.close()
        ready = await replica_to_ready(url, project, timeout_s=120, profile=profile and rnd == rounds - 1)
        try:
            check_state(ready.state, total, items)
            seconds.append(ready.seconds)
        finally:
            await close_ready(ready)
    return RebuildResult(
        events=total,
        publish=pub,
        raw_replays=raw_replays,
        rebuild_seconds=seconds,
        raw_replay_iter=raw_iter,
        inproc=inproc,
        inproc_nogc=inproc_nogc,
        rebuild=ready,
    )


def check_state(state: ProjectState, events: int, items: int) -> None:
    if state.events_applied != events or state.work_counts.get("completed") != items:
        raise BenchError(
            f"rebuilt state is wrong: {state.events_applied} events applied (want {events}), "
            f"{state.work_counts.get('completed')} completed (want {items})"
        )


# --- row 4: restart to ready with a snapshot -----------------------------------------------------


@dataclass
class RestartResult:
    events: int
    tail_events: int
    load: Timed | None = None
    load_sync: str = ""
    no_snapshot: Ready | None = None
    no_snapshot_note: str = ""
    snapshot_seq: int = 0
    snapshot_bytes: int = 0
    snapshot_write_s: float = 0.0
    # encode_state on the event loop (a replica's snapshot stall): every item decoded, as after
    # a full fold, and right after a restart, with the items still encoded
    encode_decoded_s: float = 0.0
    encode_loaded_s: float = 0.0
    with_snapshot: Ready | None = None
    fresh_process: dict[str, float] | None = None  # bench.restart_probe's report, plus wall_s
    fresh_process_again: dict[str, float] | None = None


def time_encode(state: ProjectState) -> float:
    t = time.perf_counter()
    encode_state(state)
    return time.perf_counter() - t


async def load_stream(url: str, project: str, items: int, res: RestartResult) -> None:
    nc = await connect(url)
    try:
        js = nc.jetstream()
        store = EventStore(js)
        await store.ensure_stream(project)
        res.load = await publish_core(
            nc, js, stream_name(project), eventgen.messages(eventgen.generate(project, items)),
            expect_last_seq=res.events, time_limit_s=240,
        )
        last = await store.last_seq(project)
        if last != res.events:
            raise BenchError(f"stream holds {last} events, expected {res.events}")
    finally:
        await nc.close()


async def fresh_process_restart(url: str, project: str, limit_s: float) -> dict[str, float]:
    """Spawn `python -m bench.restart_probe` and time it from spawn to its ready report: interpreter
    start, imports, connect, snapshot fetch + decode and tail replay all count."""
    t0 = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.restart_probe", url, project, stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), limit_s)
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        await proc.wait()
    if not line:
        raise BenchError("restart probe exited without a report")
    report: dict[str, float] = orjson.loads(line)
    report["wall_s"] = time.perf_counter() - t0
    return report


async def snapshot_and_measure(
    url: str,
    project: str,
    items: int,
    tail_items: int,
    res: RestartResult,
    *,
    skip_no_snapshot: bool,
    no_snapshot_limit_s: float,
    restart_limit_s: float,
    profile: bool,
    progress: Callable[[str], None],
) -> None:
    state: ProjectState | None = None
    writer: Ready | None = None
    if not skip_no_snapshot:
        progress(f"restart: full rebuild without snapshot ({res.events:,} events, limit {no_snapshot_limit_s:.0f}s)")
        try:
            writer = await replica_to_ready(
                url, project, timeout_s=no_snapshot_limit_s, ignore_snapshots=True
            )
            check_state(writer.state, res.events, items)
            res.no_snapshot = writer
        except BenchError as err:
            res.no_snapshot_note = f"> {no_snapshot_limit_s:.0f} s ({err})"
            writer = None
    else:
        res.no_snapshot_note = "skipped"

    if writer is None:
        progress("restart: folding the stream's events in process for the snapshot")
        events = eventgen.generate(project, items)
        state = ProjectState(project=project)
        for seq, ev in enumerate(events, 1):
            ev.seq = seq
            apply(state, ev)
        nc = await connect(url)
        snapshots = TimedSnapshots(nc.jetstream())
        replica = TimedReadModel(EventStore(snapshots.resources), snapshots=snapshots, snapshot_every=0)
        replica.views[project] = ProjectView(project, state)  # the state a rebuild would have given
        res.encode_decoded_s = time_encode(state)
        try:
            res.snapshot_seq = await replica.snapshot_now(project)
        finally:
            await nc.close()
        res.snapshot_bytes, res.snapshot_write_s = snapshots.saved_bytes, snapshots.save_s
    else:
        res.encode_decoded_s = time_encode(writer.readmodel.views[project].state)
        res.snapshot_seq = await writer.readmodel.snapshot_now(project)
        res.snapshot_bytes, res.snapshot_write_s = writer.snapshots.saved_bytes, writer.snapshots.save_s
        await close_ready(writer)
        writer.state = ProjectState(project=project)  # let the big state go
    del state

    if tail_items:
        progress(f"restart: appending {res.tail_events:,} tail events after the snapshot")
        nc = await connect(url)
        try:
            tail = await publish_pipelined(
                nc.jetstream(),
                eventgen.messages(
                    eventgen.generate(project, tail_items, first_item=items, with_agents=False),
                    first_seq=res.events + 1,
                ),
                time_limit_s=120,
            )
            if tail.errors:
                raise BenchError(f"{tail.errors} tail events rejected")
        finally:
            await nc.close()

    progress("restart: a fresh process from snapshot + tail (the real restart)")
    res.fresh_process = await fresh_process_restart(url, project, restart_limit_s)
    # Again: on this VM the first run's memory is pages the host has never backed (first touch
    # costs ~4x more); the second shows the restart on memory the machine has already used.
    res.fresh_process_again = await fresh_process_restart(url, project, restart_limit_s)
    progress("restart: new replica from snapshot + tail, in this (long-lived, big-heap) process")
    ready = await replica_to_ready(url, project, timeout_s=restart_limit_s, profile=profile)
    try:
        check_state(ready.state, res.events + res.tail_events, items + tail_items)
        res.encode_loaded_s = time_encode(ready.state)
        res.with_snapshot = ready
    finally:
        await close_ready(ready)
        ready.state = ProjectState(project=project)
    gc.collect()
