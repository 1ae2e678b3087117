"""Orchestration: start a fresh nats-server, run every row, print the table, write results.json."""

from __future__ import annotations

import asyncio
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from bench import eventgen, ha, rebuild, rest, stall, workloop
from bench.config import BenchConfig
from bench.raw import (
    fresh_stream,
    publish_awaited,
    publish_batched,
    publish_pipelined,
    replay_ordered,
    replay_ordered_iter,
)
from bench.report import Row, render, write_json
from bench.server import connect, nats_server, quiet_logs

RAW_PAYLOAD = (b'{"bench":"raw","pad":"' + b"x" * 300)[:298] + b'"}'  # 300 bytes
EVENT_PAYLOAD = (b'{"bench":"raw","pad":"' + b"x" * 550)[:548] + b'"}'  # a work.submitted event's size
REFERENCE_IN_FLIGHT = 256  # publishes awaiting acks, in the pipelined reference and as batches
SUBMIT_TARGET = 0.8  # of the raw reference (issue 15, target 2)
SUBMIT_CPU_TARGET_MS = 0.15
REBUILD_TARGET = 0.5
RESTART_TARGET_S = 5.0
WS_P99_TARGET_MS = 10.0
KILL_FAILOVER_TARGET_S = 3.0
TERM_FAILOVER_TARGET_S = 0.5
OBS_OVERHEAD_TARGET = 0.05


def progress(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


class Bench:
    def __init__(self, cfg: BenchConfig, root: Path) -> None:
        self.cfg = cfg
        self.root = root
        self.rows: dict[str, Row] = {}
        self.crashed: list[str] = []
        self.profiles: dict[str, str] = {}
        self.meta: dict[str, Any] = {}

    def row(self, row: Row) -> None:
        self.rows[row.key] = row

    def value(self, key: str) -> float | None:
        r = self.rows.get(key)
        return r.value if r else None

    async def guarded(self, name: str, keys: list[tuple[str, str, str]], coro: Any) -> None:
        """Run one section; on a crash, its rows say so and the process exits 1 at the end."""
        try:
            await coro
        except Exception as err:
            self.crashed.append(f"{name}: {err!r}")
            progress(f"{name} FAILED: {err!r}")
            traceback.print_exc(file=sys.stderr)
            for key, metric, unit in keys:
                if key not in self.rows:
                    self.row(Row(key, metric, None, unit, note=f"error: {type(err).__name__}"))

    # --- 1 + 2: raw JetStream -------------------------------------------------------------------

    async def raw(self, url: str) -> None:
        n = self.cfg.raw_msgs
        nc = await connect(url)
        try:
            js = nc.jetstream()
            await fresh_stream(js, "BENCH_RAW", ["bench.raw.>"])
            progress(f"raw: pipelined publish of {n:,} x {len(RAW_PAYLOAD)} B")
            pipelined = await publish_pipelined(
                js, ((f"bench.raw.{i % 16}", RAW_PAYLOAD, None) for i in range(n)), time_limit_s=120
            )
            self.row(Row("raw_publish_pipelined", f"raw JetStream publish, pipelined ({n:,} x 300 B)",
                         pipelined.rate, "msgs/s", ratio="reference",
                         extra={"seconds": pipelined.seconds, "errors": pipelined.errors}))
            m = self.cfg.awaited_msgs
            progress(f"raw: awaited publish of {m:,}")
            await fresh_stream(js, "BENCH_RAW_AWAITED", ["bench.awaited.>"])
            awaited = await publish_awaited(js, "bench.awaited.x", RAW_PAYLOAD, m)
            self.row(Row("raw_publish_awaited", f"raw JetStream publish, awaited one at a time ({m:,})",
                         awaited.rate, "msgs/s", ratio=f"x{awaited.rate / pipelined.rate:.2f} of pipelined",
                         extra={"seconds": awaited.seconds}))
            await js.delete_stream("BENCH_RAW_AWAITED")
            progress(f"raw: ordered-consumer replay of {n:,}")
            replay = await replay_ordered(js, "BENCH_RAW", "bench.raw.>", n, time_limit_s=120)
            self.row(Row("raw_replay", f"raw ordered-consumer replay, callback ({n:,} x 300 B)", replay.rate,
                         "msgs/s", ratio="reference", extra={"seconds": replay.seconds}))
            replay_iter = await replay_ordered_iter(js, "BENCH_RAW", "bench.raw.>", n, time_limit_s=120)
            self.row(Row("raw_replay_iter", "raw ordered-consumer replay, `async for msg in sub.messages`",
                         replay_iter.rate, "msgs/s", ratio=f"x{replay_iter.rate / replay.rate:.2f} of callback",
                         extra={"seconds": replay_iter.seconds}))
            await js.delete_stream("BENCH_RAW")
        finally:
            await nc.close()

    # --- 3: projection rebuild ------------------------------------------------------------------

    async def rebuild(self, url: str) -> None:
        items = self.cfg.rebuild_items
        total = eventgen.total_events(items)
        progress(f"rebuild: appending {total:,} weft events ({items:,} items x 5 + agents)")
        res = await rebuild.bench_rebuild(url, "benchrebuild", items, profile=self.cfg.profile, rounds=self.cfg.rounds)
        raw_rate = self.value("raw_replay")
        raw_pub = self.value("raw_publish_pipelined")
        ready = res.rebuild
        assert ready is not None
        rate, ratio = statistics.median(res.rates), statistics.median(res.ratios)
        same_raw = statistics.median([r.rate for r in res.raw_replays])
        rounds = ", ".join(f"{x:.2f}" for x in res.ratios)
        self.row(Row("rebuild", f"projection rebuild, new ReadModel to ready ({res.events:,} events, median of "
                     f"{len(res.ratios)})", rate, "events/s",
                     ratio=f"x{ratio:.2f} of raw replay of the same stream (>= {REBUILD_TARGET:.2f}; rounds {rounds})",
                     verdict=verdict(ratio >= REBUILD_TARGET),
                     extra={"seconds": res.rebuild_seconds, "events": res.events, "ratios": res.ratios}))
        self.row(Row("rebuild_raw_weft_replay", "  raw replay of that weft stream, callback (Msg-Id + OCC headers, "
                     "~400 B; paired rounds)", same_raw, "msgs/s",
                     ratio=f"x{same_raw / raw_rate:.2f} of the 300 B raw replay" if raw_rate else "",
                     extra={"seconds": [r.seconds for r in res.raw_replays]}))
        if raw_rate:
            self.row(Row("rebuild_vs_synthetic", "  rebuild against the 300 B header-less raw replay above", rate,
                         "events/s", ratio=f"x{rate / raw_rate:.2f}"))
        self.row(Row("rebuild_raw_weft_replay_iter", "  raw replay of that weft stream, `sub.messages`",
                     res.raw_replay_iter.rate, "msgs/s",
                     ratio=f"x{rate / res.raw_replay_iter.rate:.2f} rebuild/this",
                     extra={"seconds": res.raw_replay_iter.seconds}))
        self.row(Row("rebuild_inproc", "  decode + apply in process, no NATS", res.inproc.rate, "events/s",
                     extra={"seconds": res.inproc.seconds}))
        self.row(Row("rebuild_inproc_nogc", "  decode + apply in process, cyclic GC paused", res.inproc_nogc.rate,
                     "events/s", ratio=f"x{res.inproc_nogc.rate / res.inproc.rate:.2f} of GC on",
                     extra={"seconds": res.inproc_nogc.seconds}))
        self.row(Row("weft_publish_pipelined", "  weft events published pipelined (Msg-Id + OCC headers)",
                     res.publish.rate, "events/s",
                     ratio=f"x{res.publish.rate / raw_pub:.2f} of raw pipelined" if raw_pub else "",
                     extra={"seconds": res.publish.seconds}))
        if ready.profile:
            self.profiles["rebuild"] = ready.profile
        await self._drop_stream(url, "WEFT_benchrebuild")

    # --- 5: REST submit -------------------------------------------------------------------------

    async def rest(self, url: str) -> None:
        """Paired rounds: a pipelined raw publish, then a burst of REST submits, so the ratio is of
        two numbers taken a moment apart on this (noisy, shared) machine; the median round counts."""
        n, c = self.cfg.rest_requests, self.cfg.rest_concurrency
        m = max(2_000, self.cfg.raw_msgs // 3)
        progress(f"rest: starting weft serve, then {self.cfg.rounds} rounds of ({m:,} raw publishes, "
                 f"{n:,} POST /api/work with {c} connections)")
        metric = f"weft REST submit, POST /api/work (C={c})"
        prof_path = self.root / "weft-serve.prof" if self.cfg.profile else None
        results: list[rest.RestResult] = []
        raws: list[tuple[float, float]] = []
        try:
            async with rest.weft_serve(url, self.root, profile_to=prof_path) as base:
                for rnd in range(self.cfg.rounds):
                    raws.append(await self._raw_publish_round(url, f"BENCH_PAIRED_{rnd}", m))
                    results.append(await rest.fire(base, n, c, time_limit_s=self.cfg.rest_time_limit_s))
            if prof_path is not None and prof_path.exists():
                self.profiles["weft serve (REST submit)"] = rebuild.profile_file_text(prof_path)
            await self._drop_stream(url, f"WEFT_{rest.PROJECT}")  # later sections start without it
        except rest.NotReady as err:
            progress(f"rest: n/a: {err}")
            self.row(Row("rest_submit", metric, None, "req/s", note="n/a (weft serve not ready)",
                         extra={"reason": str(err)}))
            return
        pipelined = [p for p, _b in raws]
        batched = [b for _p, b in raws]
        refs = [max(p, b) for p, b in raws]
        ratios = [r.rate / raw for r, raw in zip(results, refs, strict=True)]
        ratio = statistics.median(ratios)
        res = results[sorted(range(len(results)), key=ratios.__getitem__)[len(results) // 2]]  # the median round
        errors = sum(r.errors for r in results)
        metric = f"weft REST submit, POST /api/work ({res.requests:,} req, C={c}, median of {len(results)})"
        if any(r.time_bounded for r in results):
            metric += f" [time-capped at {self.cfg.rest_time_limit_s:.0f} s]"
        rounds = ", ".join(f"{x:.2f}" for x in ratios)
        first_error = next((r.first_error for r in results if r.first_error), "")
        cpu = [r.cpu_ms_per_request for r in results if r.cpu_ms_per_request is not None]
        extra = {"seconds": [r.seconds for r in results], "rates": [r.rate for r in results], "raw_rates": refs,
                 "raw_pipelined": pipelined, "raw_batched": batched, "cpu_ms_per_request": cpu,
                 "ratios": ratios, "errors": errors, "statuses": [r.statuses for r in results],
                 "first_error": first_error}
        self.row(Row("rest_submit", metric, res.rate, "req/s",
                     ratio=f"x{ratio:.2f} of the raw reference, same rounds (>= {SUBMIT_TARGET:.2f}; rounds {rounds})",
                     verdict=verdict(ratio >= SUBMIT_TARGET and errors == 0), extra=extra))
        size = len(EVENT_PAYLOAD)
        self.row(Row("rest_raw_paired", "  raw reference: the higher of the two below, per round (median)",
                     statistics.median(refs), "msgs/s"))
        self.row(Row("rest_raw_pipelined", f"  raw pipelined publish, {REFERENCE_IN_FLIGHT} in flight ({m:,} x {size} B, "
                     "no headers, median)", statistics.median(pipelined), "msgs/s"))
        self.row(Row("rest_raw_batched", f"  raw atomic batches of 64, {REFERENCE_IN_FLIGHT // 64} in flight "
                     f"({m:,} x {size} B, median)", statistics.median(batched), "msgs/s"))
        if cpu:
            self.row(Row("rest_cpu", "  weft serve's CPU per submit (user + system, median round)",
                         statistics.median(cpu), "ms", ratio=f"<= {SUBMIT_CPU_TARGET_MS} ms",
                         verdict=verdict(statistics.median(cpu) <= SUBMIT_CPU_TARGET_MS)))
        self.row(Row("rest_p50", "  submit latency p50 (median round)", res.pct(50), "ms"))
        self.row(Row("rest_p99", "  submit latency p99 (median round)", res.pct(99), "ms"))
        if errors:
            self.row(Row("rest_errors", "  submit errors (non-2xx / failed)", float(errors), "requests",
                         note="", ratio=first_error[:60]))

    async def _drop_stream(self, url: str, stream: str) -> None:
        nc = await connect(url)
        try:
            await nc.jetstream().delete_stream(stream)
        finally:
            await nc.close()

    async def _raw_publish_round(self, url: str, stream: str, m: int) -> tuple[float, float]:
        """(pipelined, atomic batches) msgs/s of weft-sized events, fsync'd, on fresh streams."""
        nc = await connect(url)
        try:
            js = nc.jetstream()
            subject = f"bench.paired.{stream.lower()}"
            await fresh_stream(js, stream, [subject + ".>"])
            pipelined = await publish_pipelined(
                js, ((f"{subject}.{i % 16}", EVENT_PAYLOAD, None) for i in range(m)), time_limit_s=120,
                in_flight=REFERENCE_IN_FLIGHT,
            )
            await js.delete_stream(stream)
            await fresh_stream(js, stream, [subject + ".>"], atomic=True)
            batched = await publish_batched(nc, [f"{subject}.{i}" for i in range(16)], EVENT_PAYLOAD, m,
                                            batch=64, in_flight=REFERENCE_IN_FLIGHT // 64, time_limit_s=120)
            await js.delete_stream(stream)
            if batched.errors:
                progress(f"rest: {batched.errors} atomic batches refused (server older than 2.12?)")
            return pipelined.rate, (batched.rate if not batched.errors else 0.0)
        finally:
            await nc.close()

    # --- 6: the agent work loop ---------------------------------------------------------------------

    async def workloop(self, url: str) -> None:
        n, items, agents = 300, 2_000, 20
        progress(f"workloop: {n} submit->assignment round trips, then {items:,} items over {agents} agents")
        nc = await connect(url)
        try:
            async with rest.weft_serve(url, self.root) as base:
                lat = await workloop.latency(base, nc, "benchlatency", n)
                tp = await workloop.throughput(base, nc, "benchloop", items, agents)
        finally:
            await nc.close()
        s = workloop.summary(lat)
        for key, p, target in (("loop_p50", 50, 3.0), ("loop_p95", 95, None), ("loop_p99", 99, 10.0)):
            label = f"submit -> idle agent holds assignment, p{p} ({n} samples)" if p == 50 else f"  p{p}"
            value = s[f"p{p}_ms"]
            self.row(Row(key, label, value, "ms", ratio=f"<= {target:.0f} ms" if target else "",
                         verdict=verdict(value <= target) if target else "", extra=s if p == 50 else {}))
        self.row(Row("loop_throughput", f"assignments/s, {agents} agents x 1 slot ({items:,} items, "
                     "assign+accept+complete)", tp.rate, "items/s", extra={"seconds": tp.seconds}))

    # --- 4: restart with a snapshot --------------------------------------------------------------

    async def restart(self) -> None:
        cfg = self.cfg
        items = eventgen.items_for_events(cfg.restart_events)
        tail_items = max(0, min(2_000, items // 50))
        res = rebuild.RestartResult(
            events=eventgen.total_events(items), tail_events=tail_items * eventgen.EVENTS_PER_ITEM
        )
        store_dir = self.root / "restart"
        project = "benchrestart"
        res.load_sync = "always" if cfg.load_sync_always else "lazy"
        progress(f"restart: bulk-loading {res.events:,} events (server sync_interval {res.load_sync})")
        async with nats_server(store_dir, sync_always=cfg.load_sync_always, name="weft-bench-load") as srv:
            await rebuild.load_stream(srv.url, project, items, res)
        assert res.load is not None
        self.row(Row("restart_load", f"  bulk load of that stream (core publish, no acks; sync {res.load_sync})",
                     res.load.rate, "events/s", extra={"seconds": res.load.seconds, "events": res.events}))
        progress("restart: nats-server restarted on that store with sync_interval always")
        async with nats_server(store_dir, sync_always=True, name="weft-bench-restart") as srv:
            await rebuild.snapshot_and_measure(
                srv.url, project, items, tail_items, res,
                skip_no_snapshot=cfg.skip_no_snapshot, no_snapshot_limit_s=cfg.no_snapshot_limit_s,
                restart_limit_s=cfg.restart_limit_s, profile=cfg.profile, progress=progress,
            )
        ws = res.with_snapshot
        assert ws is not None
        fresh = res.fresh_process
        if fresh is not None:
            label = (f"restart to ready with snapshot, fresh process ({res.events:,} events + "
                     f"{res.tail_events:,} tail)")
            self.row(Row("restart_fresh", label, fresh["wall_s"], "s", ratio=f"<= {RESTART_TARGET_S:.0f} s",
                         verdict=verdict(fresh["wall_s"] <= RESTART_TARGET_S), extra=fresh))
            self.row(Row("restart_fresh_parts", "  of which start+imports / snapshot fetch / decode / rest",
                         fresh["ready_s"], "s",
                         ratio=f"{fresh['wall_s'] - fresh['ready_s'] - fresh['connect_s']:.2f} / "
                               f"{fresh['snapshot_fetch_s']:.2f} / {fresh['snapshot_decode_s']:.2f} / "
                               f"{fresh['ready_s'] - fresh['snapshot_fetch_s'] - fresh['snapshot_decode_s']:.2f}"))
            self.row(Row("restart_fresh_rss", "  peak memory (RSS) of that process", fresh["max_rss_mb"], "MB",
                         ratio=f"{fresh['max_rss_after_fetch_mb']:,.0f} MB once the snapshot was fetched"))
        again = res.fresh_process_again
        if again is not None:
            self.row(Row("restart_fresh_again", "  second fresh process (memory pages already used once)",
                         again["wall_s"], "s", ratio=f"decode {again['snapshot_decode_s']:.2f} s"))
        label = "  same inside the long-lived bench process"
        self.row(Row("restart_snapshot", label, ws.seconds, "s",
                     extra={"connect_s": ws.connect_s, "attach_s": ws.attach_s,
                            "snapshot_load_s": ws.snapshot_load_s, "snapshot_fetch_s": ws.snapshot_fetch_s,
                            "events": res.events, "tail_events": res.tail_events,
                            "snapshot_seq": res.snapshot_seq}))
        decode_s = ws.snapshot_load_s - ws.snapshot_fetch_s
        self.row(Row("restart_snapshot_fetch", "  snapshot fetch (SnapshotStore.load_snapshot: pull consumer into one buffer)",
                     ws.snapshot_fetch_s, "s"))
        self.row(Row("restart_snapshot_decode", "  snapshot decode (orjson -> ProjectState, cyclic GC paused)", decode_s, "s"))
        tail_s = ws.seconds - ws.attach_s
        self.row(Row("restart_tail", f"  tail replay after attach ({res.tail_events:,} events)", tail_s, "s"))
        self.row(Row("restart_snapshot_size", "  snapshot size", res.snapshot_bytes / 1e6, "MB",
                     extra={"bytes": res.snapshot_bytes, "write_s": res.snapshot_write_s}))
        self.row(Row("restart_snapshot_write", "  snapshot write (object store put, a background task)",
                     res.snapshot_write_s, "s"))
        self.row(Row("restart_snapshot_encode", "  snapshot encode on the event loop: every item decoded",
                     res.encode_decoded_s, "s", ratio=f"{res.encode_loaded_s:.2f} s after a restart"))
        ns = res.no_snapshot
        self.row(Row("restart_no_snapshot", f"restart to ready without snapshot ({res.events:,} events)",
                     ns.seconds if ns else None, "s", note=res.no_snapshot_note,
                     ratio=f"{res.events / ns.seconds:,.0f} events/s" if ns else "",
                     extra={"seconds": ns.seconds if ns else None}))
        if ws.profile:
            self.profiles["restart_snapshot"] = ws.profile

    # --- 7: high availability, live events, observability overhead ---------------------------------

    async def ha(self, url: str) -> None:
        clients = self.cfg.ws_clients
        progress(f"ha: WebSocket fan-out to {clients} clients on one replica")
        ws = await ha.ws_latency(url, self.root, clients=clients, events=100)
        note = f"{len(ws.latencies_ms):,} deliveries, {ws.missing} missing"
        self.row(Row("ws_p50", f"WebSocket event -> client, {clients} clients, p50 (from the publish reaching NATS)",
                     ha.pct(ws.latencies_ms, 50), "ms", ratio=note,
                     extra={"from_post_p50_ms": ha.pct(ws.from_post_ms, 50), "missing": ws.missing}))
        p99 = ha.pct(ws.latencies_ms, 99)
        self.row(Row("ws_p99", "  p99", p99, "ms", ratio=f"<= {WS_P99_TARGET_MS:.0f} ms; from the POST: p50 "
                     f"{ha.pct(ws.from_post_ms, 50):.1f}, p99 {ha.pct(ws.from_post_ms, 99):.1f} ms",
                     verdict=verdict(p99 <= WS_P99_TARGET_MS and ws.missing == 0)))
        progress("ha: leader failover, kill -9 and SIGTERM (3 each)")
        fo = await ha.failover(url, rounds=3)
        kill, term = ha.median(fo["kill"]), ha.median(fo["term"])
        self.row(Row("failover_kill", "kill -9 of the scheduling leader -> next assignment (median of 3)", kill, "s",
                     ratio=f"<= {KILL_FAILOVER_TARGET_S:.0f} s; runs " + ", ".join(f"{x:.2f}" for x in fo["kill"]),
                     verdict=verdict(kill <= KILL_FAILOVER_TARGET_S), extra=fo))
        self.row(Row("failover_term", "SIGTERM of the scheduling leader -> next assignment (median of 3)", term, "s",
                     ratio=f"<= {TERM_FAILOVER_TARGET_S} s; runs " + ", ".join(f"{x:.3f}" for x in fo["term"]),
                     verdict=verdict(term <= TERM_FAILOVER_TARGET_S)))
        n, c = self.cfg.ha_requests, self.cfg.rest_concurrency
        if ha.available("nginx"):
            progress("ha: REST submit through nginx, 1 then 3 replicas")
            lb = await ha.through_nginx(url, self.root, n, c)
            for count, res in lb.items():
                self.row(Row(f"nginx_{count}", f"REST submit through nginx, {count} replica{'s' * (count > 1)} "
                             f"({n:,} req, C={c})", res.rate, "req/s",
                             ratio=f"p99 {res.pct(99):.0f} ms, errors {res.errors}"))
        else:
            self.row(Row("nginx_1", "REST submit through nginx", None, "req/s", note="n/a (needs Debian nginx)"))
        progress("ha: R3 cluster against R1: submit throughput and restart to ready")
        stores = await ha.r3_vs_r1(self.root, n, c)
        for name, store in stores.items():
            self.row(Row(f"{name.lower()}_submit", f"REST submit on {name} ({'3-node cluster' if name == 'R3' else '1 node'})",
                         store.submit.rate, "req/s", ratio=f"p99 {store.submit.pct(99):.0f} ms"))
            self.row(Row(f"{name.lower()}_restart", f"  restart to ready on {name} ({store.events:,} events, no snapshot)",
                         store.restart_s, "s"))
        rounds = self.cfg.rounds
        progress(f"ha: metrics and tracing overhead, {rounds} rounds of 4 variants")
        obs = await ha.overhead(url, rounds, n, c)
        off = obs["off"]
        for name, rates in obs.items():
            if name == "off":
                self.row(Row("obs_off", f"REST submit, metrics and tracing off (median of {rounds})",
                             ha.median(rates), "req/s", extra=obs))
                continue
            ratios = [r / o for r, o in zip(rates, off, strict=True)]
            cost = 1 - ha.median(ratios)
            target = name in ("metrics", "metrics+tracing")
            self.row(Row(f"obs_{name}", f"  {name} on", ha.median(rates), "req/s",
                         ratio=f"overhead {cost:+.0%} (rounds " + ", ".join(f"{1 - x:+.0%}" for x in ratios) + ")"
                               + (f"; <= {OBS_OVERHEAD_TARGET:.0%}" if target else ""),
                         verdict=verdict(cost <= OBS_OVERHEAD_TARGET) if target else ""))

    async def stall(self) -> None:
        """Target 6 of perf round two: no event-loop stall over 50 ms, snapshots included."""
        progress(f"stall: bulk-loading {stall.ITEMS:,} items, then {stall.REQUESTS:,} submits per snapshot mode")
        async with nats_server(self.root / "stall", sync_always=False, name="weft-bench-stall-load") as srv:
            events = await stall.load(srv.url, stall.ITEMS)  # core publish: as fast as the server stores
        async with nats_server(self.root / "stall", sync_always=True, name="weft-bench-stall") as srv:
            for mode in ("loop", "fork"):
                res = await stall.run_mode(srv.url, self.root / "stall-work", mode, stall.ITEMS, stall.REQUESTS,
                                           stall.CONCURRENCY)
                events += res.requests
                target = mode == "fork"
                lag = res.loop_lag_max_s
                self.row(Row(f"stall_{mode}", f"REST submit latency max under load with snapshots every "
                             f"{stall.SNAPSHOT_EVERY:,} events, encoded {'in a forked child' if target else 'on the loop'}",
                             res.max_ms, "ms",
                             ratio=(f"p99.9 {res.p999_ms:.1f}, p50 {res.p50_ms:.1f} ms; loop lag max "
                                    f"{'<= ' + format(lag * 1000, '.0f') + ' ms' if lag is not None else 'n/a'}; "
                                    f"{res.rate:,.0f} req/s x{stall.CONCURRENCY}"
                                    + (f"; <= {stall.STALL_TARGET_MS:.0f} ms" if target else "")),
                             verdict=verdict(res.p999_ms <= stall.STALL_TARGET_MS and (lag or 0) <= 0.05)
                             if target else "",
                             extra={**res.__dict__, "events_folded_so_far": events}))
                if target:
                    worst = max(res.fork_ms, default=None)
                    self.row(Row("stall_fork_own", "  of which the snapshot's own time on the loop (cut + fork), max",
                                 worst, "ms", ratio=f"{len(res.fork_ms)} snapshots; <= {stall.STALL_TARGET_MS:.0f} ms",
                                 verdict=verdict(worst is not None and worst <= stall.STALL_TARGET_MS),
                                 note="" if worst is not None else "n/a (no forked snapshot logged)"))

    # --- all ---------------------------------------------------------------------------------------

    async def run(self) -> None:
        t0 = time.perf_counter()
        progress(f"fresh nats-server (sync_interval always) in {self.root}")
        async with nats_server(self.root / "main", sync_always=True) as srv:
            self.meta["nats_url"] = srv.url
            if self.cfg.runs("raw"):
                raw_keys = [("raw_publish_pipelined", "raw JetStream publish, pipelined", "msgs/s"),
                            ("raw_publish_awaited", "raw JetStream publish, awaited", "msgs/s"),
                            ("raw_replay", "raw ordered-consumer replay", "msgs/s")]
                await self.guarded("raw", raw_keys, self.raw(srv.url))
            if self.cfg.runs("rebuild"):
                await self.guarded("rebuild", [("rebuild", "projection rebuild", "events/s")],
                                   self.rebuild(srv.url))
            if self.cfg.runs("rest"):
                await self.guarded("rest", [("rest_submit", "weft REST submit", "req/s")], self.rest(srv.url))
            if self.cfg.runs("workloop"):
                await self.guarded("workloop", [("loop_p50", "submit -> assignment latency", "ms")],
                                   self.workloop(srv.url))
            if self.cfg.runs("ha"):
                await self.guarded("ha", [("ws_p99", "WebSocket fan-out", "ms")], self.ha(srv.url))
        if self.cfg.runs("stall"):
            await self.guarded("stall", [("stall_fork", "REST latency max with snapshots", "ms")], self.stall())
        if self.cfg.runs("restart"):
            await self.guarded("restart", [("restart_snapshot", "restart to ready with snapshot", "s")],
                               self.restart())
        self.meta["total_seconds"] = time.perf_counter() - t0

    def ordered_rows(self) -> list[Row]:
        order = ["raw_publish_pipelined", "raw_publish_awaited", "raw_replay", "raw_replay_iter", "rebuild",
                 "rebuild_raw_weft_replay", "rebuild_vs_synthetic", "rebuild_raw_weft_replay_iter", "rebuild_inproc",
                 "rebuild_inproc_nogc", "weft_publish_pipelined", "restart_fresh", "restart_fresh_parts", "restart_fresh_rss", "restart_fresh_again", "restart_snapshot", "restart_snapshot_fetch",
                 "restart_snapshot_decode",
                 "restart_tail", "restart_snapshot_size", "restart_snapshot_write", "restart_snapshot_encode",
                 "restart_no_snapshot", "restart_load", "rest_submit", "rest_raw_paired", "rest_raw_pipelined", "rest_raw_batched", "rest_cpu", "rest_p50", "rest_p99", "rest_errors",
                 "loop_p50", "loop_p95", "loop_p99", "loop_throughput", "ws_p50", "ws_p99", "failover_kill",
                 "failover_term", "nginx_1", "nginx_3", "r1_submit", "r1_restart", "r3_submit", "r3_restart",
                 "obs_off", "obs_metrics", "obs_metrics+tracing", "obs_metrics+tracing 10%", "stall_loop", "stall_fork", "stall_fork_own"]
        rows = [self.rows[k] for k in order if k in self.rows]
        rows += [r for k, r in self.rows.items() if k not in order]
        return rows


def main() -> int:
    quiet_logs()
    cfg = BenchConfig.from_env()
    root = Path(tempfile.mkdtemp(prefix="weft-bench-"))
    bench = Bench(cfg, root)
    try:
        asyncio.run(bench.run())
    except KeyboardInterrupt:
        return 130
    finally:
        shutil.rmtree(root, ignore_errors=True)
    rows = bench.ordered_rows()
    print(render(rows))
    total = bench.meta.get("total_seconds", 0.0)
    print(f"nats-server: 127.0.0.1, R1, sync_interval always; python {sys.version.split()[0]}; "
          f"total {total:.0f} s")
    for name, text in bench.profiles.items():
        print(f"\n--- cProfile: {name} (by tottime) ---\n{text}", file=sys.stderr)
    path = write_json(rows, {"config": {**cfg.__dict__, "only": sorted(cfg.only)}, "crashed": bench.crashed, **bench.meta})
    print(f"results: {path}")
    if bench.crashed:
        print("crashed: " + "; ".join(bench.crashed), file=sys.stderr)
        return 1
    return 0
