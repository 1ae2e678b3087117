"""`weft replay state|diff|export|hash` and `weft events tail`: time travel over a project's stream.

Every command folds with `projections.apply`, the very function the live read model folds with, so
the state printed for a sequence is the state every replica had there. Nothing here writes to the
stream. Output goes to stdout (JSON with --json; rich tables on a TTY, plain text when piped); the
progress bar (events/s, ETA) goes to stderr, and only when stderr is a terminal.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import AsyncGenerator, Callable, Iterator
from datetime import UTC, datetime
from typing import IO, Any, cast

import orjson

from projections import ProjectState, apply, decode_state, encode_state, state_hash
from projections.diff import StateDiff, diff_states
from projections.events import Event, parse_ts
from weft.cli.output import plain_table
from weft.store.eventstore import EventStore

# --- progress (stderr, TTY only) -------------------------------------------------------------------


class _NoProgress:
    def advance(self, n: int = 1) -> None:
        pass


@contextlib.contextmanager
def progress(total: int, what: str, stream: IO[str] | None = None) -> Iterator[Any]:
    """A progress bar on `stream` (stderr) when it is a terminal, else nothing at all."""
    stream = stream if stream is not None else sys.stderr
    if total <= 0 or not stream.isatty():
        yield _NoProgress()
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task: Any) -> Text:
            return Text(f"{task.speed or 0:,.0f} events/s")

    bar = Progress(TextColumn(what), BarColumn(), MofNCompleteColumn(), Rate(), TextColumn("ETA"),
                   TimeRemainingColumn(), console=Console(file=stream), transient=True)
    task = bar.add_task(what, total=total)

    class Advance:
        def advance(self, n: int = 1) -> None:
            bar.advance(task, n)

    with bar:
        yield Advance()


# --- folding ---------------------------------------------------------------------------------------


def parse_time(raw: str) -> datetime:
    """An ISO 8601 instant; without an offset it is taken as UTC."""
    try:
        t = parse_ts(raw)
    except ValueError:
        raise SystemExit(f"weft: --at-time {raw!r} is not an ISO 8601 time") from None
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


async def fold_to(
    store: EventStore, project: str, *, at_seq: int | None = None, at_time: datetime | None = None,
    on_event: Callable[[Event], None] | None = None,
) -> ProjectState:
    """The projection after the stream's prefix up to `at_seq` (inclusive), or up to the last event
    stamped at or before `at_time` (the prefix ends at the first event stamped later: a fold is
    always of a prefix of the stream), or of the whole stream."""
    state = ProjectState(project=project)
    last = await store.last_seq(project)
    end = last if at_seq is None else min(at_seq, last)
    with progress(end, "folding") as bar:
        # aclosing: leaving early (at_time) closes the ordered consumer at once
        async with contextlib.aclosing(cast(AsyncGenerator[Event, None], store.read_range(project, 1, end))) as events:
            async for ev in events:
                if at_time is not None and parse_ts(ev.ts) > at_time:
                    break
                apply(state, ev)
                if on_event is not None:
                    on_event(ev)
                bar.advance()
    return state


async def fold_two(store: EventStore, project: str, first: int, second: int) -> tuple[ProjectState, ProjectState]:
    """The projections after seq `first` and after seq `second` (first <= second), in one pass: the
    state at `first` is copied through the snapshot encoding, then the fold goes on."""
    state = ProjectState(project=project)
    early: ProjectState | None = None
    last = await store.last_seq(project)
    end = min(second, last)
    with progress(end, "folding") as bar:
        async for ev in store.read_range(project, 1, end):
            if early is None and ev.seq > first:
                early = decode_state(encode_state(state))
            apply(state, ev)
            bar.advance()
    return (early if early is not None else decode_state(encode_state(state))), state


def state_json(state: ProjectState) -> dict[str, Any]:
    return {
        "project": state.project,
        "seq": state.seq,
        "state_hash": state_hash(state),
        "events_applied": state.events_applied,
        "last_activity": state.last_activity,
        "epoch": state.epoch,
        "leader": state.leader,
        "work_counts": state.work_counts,
        "purged_counts": state.purged_counts,
        "work": dict(sorted(state.work.items())),
        "agents": state.agents,
        "targets": state.targets,
    }


async def export(
    store: EventStore, project: str, start: int = 1, end: int | None = None,
    write: Callable[[bytes], Any] | None = None,
) -> dict[str, Any]:
    """Write the events with start <= seq <= end as JSON lines (`Event.to_dict`), then a footer
    line {"kind": "footer", "seq", "state_hash", ...}. The hash is of the fold from seq 1 up to the
    footer's seq, so with `start` 1 (the default) the file alone reproduces it
    (tests/replay_fixtures.py); events before `start` are folded but not written. Returns the footer."""
    out = write if write is not None else sys.stdout.buffer.write
    state = ProjectState(project=project)
    last = await store.last_seq(project)
    stop = last if end is None else min(end, last)
    count = 0
    with progress(stop, "exporting") as bar:
        async for ev in store.read_range(project, 1, stop):
            apply(state, ev)
            if ev.seq >= start:
                out(orjson.dumps(ev.to_dict()) + b"\n")
                count += 1
            bar.advance()
    footer = {"kind": "footer", "project": project, "seq": state.seq, "from": start, "to": stop,
              "events": count, "state_hash": state_hash(state)}
    out(orjson.dumps(footer) + b"\n")
    return footer


# --- presentation ----------------------------------------------------------------------------------


def _tables(title_rows: list[tuple[str, list[str], list[list[str]]]], stream: IO[str]) -> None:
    """Tables as rich renders them on a terminal; tab-free plain columns when piped."""
    if stream.isatty():
        from rich.console import Console
        from rich.table import Table

        console = Console(file=stream)
        for title, header, rows in title_rows:
            table = Table(title=title)
            for h in header:
                table.add_column(h)
            for row in rows:
                table.add_row(*row)
            console.print(table)
        return
    for title, header, rows in title_rows:
        stream.write(f"{title}\n{plain_table(header, rows, upper=False, indent='  ')}\n\n")


def _s(value: Any) -> str:
    return "-" if value is None else str(value)


def print_state(state: ProjectState, stream: IO[str]) -> None:
    counts = ", ".join(f"{k} {v}" for k, v in state.work_counts.items())
    stream.write(f"project {state.project} at seq {state.seq} ({state.events_applied} events applied, "
                 f"last activity {_s(state.last_activity)})\nstate hash {state_hash(state)}\nwork: {counts}\n\n")
    items = [[wid, _s(w.get("status")), _s(w.get("capability")), _s(w.get("boundary")), _s(w.get("assignedTo")),
              _s(w.get("attempts"))] for wid, w in sorted(state.work.items())]
    agents = [[guid, _s(a.get("agentType")), _s(a.get("status")), _s(a.get("currentTaskCount")),
               _s(a.get("spinUpId"))] for guid, a in sorted(state.agents.items())]
    targets = [[tid, _s(t.get("name")), _s(t.get("mechanism")), _s(t.get("status"))]
               for tid, t in sorted(state.targets.items())]
    _tables([
        (f"work items ({len(items)})", ["id", "status", "capability", "boundary", "assignedTo", "attempts"], items),
        (f"agents ({len(agents)})", ["guid", "type", "status", "tasks", "spinUpId"], agents),
        (f"targets ({len(targets)})", ["id", "name", "mechanism", "status"], targets),
    ], stream)


def _short(value: Any, limit: int = 60) -> str:
    text = orjson.dumps(value).decode()
    return text if len(text) <= limit else text[: limit - 1] + "…"


def print_diff(diff: StateDiff, stream: IO[str]) -> None:
    stream.write(f"diff seq {diff.from_seq} -> {diff.to_seq}\n\n")
    sections = []
    for name, part in (("work items", diff.items), ("agents", diff.agents), ("targets", diff.targets)):
        rows = [[eid, "added", "", "", ""] for eid in part.added]
        rows += [[eid, "removed", "", "", ""] for eid in part.removed]
        rows += [[eid, "changed", f, _short(c.old), _short(c.new)]
                 for eid, fields in part.changed.items() for f, c in fields.items()]
        sections.append((f"{name} ({len(part.added)} added, {len(part.removed)} removed, "
                         f"{len(part.changed)} changed)", ["id", "change", "field", "old", "new"], rows))
    _tables(sections, stream)


def event_line(ev: Event) -> str:
    actor = f" actor={ev.actor}" if ev.actor else ""
    corr = f" corr={ev.correlation_id}" if ev.correlation_id else ""
    return f"{ev.seq:>7}  {ev.ts}  {ev.type:<24} {ev.entity_id}{actor}{corr}  {_short(ev.data, 120)}"


# --- the commands ----------------------------------------------------------------------------------


async def tail_events(
    store: EventStore, project: str, *, start: int = 1, entity: str | None = None, as_json: bool = False,
    follow: bool = False, write: Callable[[str], Any] | None = None,
) -> int:
    """Print the raw stream from `start` (only `entity`'s events if given); with `follow`, keep
    printing new events until cancelled (Ctrl-C). Returns the number of events printed."""
    out = write if write is not None else (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    printed = 0

    def show(ev: Event) -> None:
        nonlocal printed
        if entity is not None and ev.entity_id != entity:
            return
        out((orjson.dumps(ev.to_dict()).decode() if as_json else event_line(ev)) + "\n")
        printed += 1

    if not follow:
        async for ev in store.read_range(project, start):
            show(ev)
        return printed
    tail = await store.tail(project, start, show)
    try:
        await asyncio.Event().wait()  # until Ctrl-C cancels the run
    finally:
        await tail.stop()
    return printed


def add_replay_commands(sub: Any, replay: argparse.ArgumentParser) -> None:
    """The subcommands of `weft replay` (`replay` with none keeps its hash summary) and `weft events`."""
    rsub = replay.add_subparsers(dest="replay_command", metavar="{state,diff,export,hash}")

    def project_arg(p: argparse.ArgumentParser) -> None:
        # SUPPRESS: not given here, the value given before the subcommand (if any) stands.
        p.add_argument("--project", default=argparse.SUPPRESS, help="the project whose stream to read")

    state = rsub.add_parser("state", help="the projection at a sequence or a time")
    project_arg(state)
    at = state.add_mutually_exclusive_group(required=True)
    at.add_argument("--at-seq", type=int, help="fold events up to and including this sequence")
    at.add_argument("--at-time", help="fold events stamped at or before this ISO 8601 time")
    state.add_argument("--json", action="store_true", help="print the state as JSON")
    diff = rsub.add_parser("diff", help="what changed between two sequences")
    project_arg(diff)
    diff.add_argument("--from", dest="from_", type=int, required=True, help="the earlier sequence")
    diff.add_argument("--to", type=int, required=True, help="the later sequence")
    diff.add_argument("--json", action="store_true")
    exp = rsub.add_parser("export", help="events as JSON lines plus a footer with the state hash")
    project_arg(exp)
    exp.add_argument("--from", dest="from_", type=int, default=1)
    exp.add_argument("--to", type=int, default=None)
    hsh = rsub.add_parser("hash", help="fold the stream and print the state hash summary")
    project_arg(hsh)
    hsh.add_argument("--to-seq", type=int, default=argparse.SUPPRESS)

    events = sub.add_parser("events", help="read a project's raw event stream")
    esub = events.add_subparsers(dest="events_command", required=True)
    tail = esub.add_parser("tail", help="print events (pretty, or JSON lines with --json)")
    tail.add_argument("--project", required=True)
    tail.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    tail.add_argument("--entity", help="only events of this entity id (work id, agent guid, target id)")
    tail.add_argument("--from-seq", type=int, default=1)
    tail.add_argument("--json", action="store_true")


async def run(settings: Any, args: argparse.Namespace) -> int:
    """`weft replay <sub>` or `weft events tail` (the bare `weft replay` stays in weft.cli.main)."""
    from weft.service import connect_nats

    project = getattr(args, "project", None)
    if not project:
        print("weft: --project is required", file=sys.stderr)
        return 2
    nc = await connect_nats(settings, settings.nats_url or "nats://127.0.0.1:4222")
    try:
        store = EventStore(nc.jetstream())
        if not await store.stream_exists(project):
            print(f"weft: project {project} has no stream", file=sys.stderr)
            return 1
        if args.command == "events":
            with contextlib.suppress(asyncio.CancelledError, KeyboardInterrupt):
                await tail_events(store, project, start=args.from_seq, entity=args.entity, as_json=args.json,
                                  follow=args.follow)
            return 0
        cmd = args.replay_command
        if cmd == "state":
            at_time = parse_time(args.at_time) if args.at_time else None
            state = await fold_to(store, project, at_seq=args.at_seq, at_time=at_time)
            if args.json:
                sys.stdout.write(orjson.dumps(state_json(state), option=orjson.OPT_SORT_KEYS).decode() + "\n")
            else:
                print_state(state, sys.stdout)
            return 0
        if cmd == "diff":
            if args.to < args.from_:
                print("weft: --to must not be below --from", file=sys.stderr)
                return 2
            old, new = await fold_two(store, project, args.from_, args.to)
            diff = diff_states(old, new)
            if args.json:
                sys.stdout.write(orjson.dumps(diff.to_dict(), option=orjson.OPT_SORT_KEYS).decode() + "\n")
            else:
                print_diff(diff, sys.stdout)
            return 0
        if cmd == "export":
            await export(store, project, max(1, args.from_), args.to)
            sys.stdout.flush()
            return 0
        print(f"weft: unknown replay command {cmd}", file=sys.stderr)
        return 2
    finally:
        await nc.close()
