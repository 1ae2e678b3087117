"""The chaos run's invariants, checked from the event stream (read back in full after the run) and
the clients' own records. Each check returns numbers for the table and example violations.

1. Acknowledged commands, exactly once. Every submit answered 2xx (201, 200 replayed, 202) is one
   `work.submitted` in the stream, with the acknowledged work id and the submit's own
   X-Correlation-Id (lost: none, or another id); no submit (acknowledged or not: its description
   is unique to the logical submit, whose retries share the Idempotency-Key) is in the stream more
   than once (duplicated). Every cancel answered 200 finds exactly one `work.cancelled` of its
   item (a 200 not `alreadyCancelled` at the answer's `seq`); no item is cancelled twice.
2. No item held by two agents. The stream is folded in order with `projections.fold.apply`, the
   fold every replica runs; an item is *held* by its `assignedTo` while its folded status is
   `assigned` or `in-progress` (from an applied `work.assigned` to the applied `work.completed`,
   `work.failed`, `work.requeued`, `work.dead_lettered` or `work.cancelled` that ends it). Events
   the fold drops before any handler (a deposed leader's, with an `epoch` below the state's; a
   repeat of an Idempotency-Key) are not looked at. An item is double-held when, while it is held
   by A, a `work.assigned` to another agent B is appended (the scheduler gave it to a second agent),
   or when a `work.started`, `work.progressed`, `work.completed` or `work.failed` naming an
   `agentGuid` other than the holder's (or naming one while nobody holds the item) is appended
   (the command layer accepted the report of an agent that did not hold it). A `work.assigned` to
   the holder itself while it holds the item is counted apart (`re-assigned to own holder`): one
   agent, so not a double hold. An assignment the fold ignored because its agent was offline or
   full holds nothing.
3. Every item terminal: folding the whole stream with `projections.fold` leaves every work item
   completed, failed (dead-lettered) or cancelled.
4. Hash equality: every replica, asked directly (not through nginx) with `min_seq` = the stream's
   last seq, reports the same `seq` and `stateHash` (GET /api/stats/projection), equal to the
   hash of this module's own fold of the stream.
5. WebSocket: each subscriber (topic `work`, the whole project, from seq 1, reconnecting with
   `fromSeq` = last seen + 1 to whichever replica nginx picks) saw exactly the `work`-topic live
   events that `weft.core.live_events.Translator` derives from the stream (folded as the live hub
   does), each once, in stream order: missed = expected not seen; duplicated = seen more than
   once; out of order = a seq not above the one before; unexpected = seen but not derived.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from projections.events import Event
from projections.fold import apply
from projections.state import LIVE_ASSIGNMENT, TERMINAL_WORK, ProjectState, state_hash
from tests.chaos.clients import CancelRecord, Seen, SubmitRecord, WsSubscriber
from weft.core.live_events import Translator

HOLD_ENDS = frozenset({"work.completed", "work.failed", "work.requeued", "work.dead_lettered", "work.cancelled"})
AGENT_REPORTS = frozenset({"work.started", "work.progressed", "work.completed", "work.failed"})
EXAMPLES = 5


@dataclass
class Report:
    seed: int = 0
    rounds: int = 0
    faults: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0
    events: int = 0
    items: int = 0
    submits_acked: int = 0
    cancels_acked: int = 0
    submit_statuses: Counter[int] = field(default_factory=Counter)
    unexpected_answers: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    double_held: dict[str, str] = field(default_factory=dict)  # work id -> the first violation
    stuck: dict[str, str] = field(default_factory=dict)  # work id -> status
    hashes: dict[str, tuple[int, str]] = field(default_factory=dict)  # replica -> (seq, stateHash)
    fold_hash: tuple[int, str] = (0, "")
    ws: dict[str, dict[str, int]] = field(default_factory=dict)  # subscriber -> counts
    ws_examples: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # Not a double hold (one agent): a work.assigned appended for an item its own holder still held.
    reassigned_to_holder: list[str] = field(default_factory=list)

    @property
    def acked(self) -> int:
        return self.submits_acked + self.cancels_acked

    @property
    def hashes_equal(self) -> bool:
        values = set(self.hashes.values())
        return len(self.hashes) == 3 and len(values) == 1 and values == {self.fold_hash}

    def ws_total(self, key: str) -> int:
        return sum(c[key] for c in self.ws.values())

    def violations(self) -> list[str]:
        out = []
        if self.unexpected_answers:
            out.append(f"{len(self.unexpected_answers)} unexpected answers: {self.unexpected_answers[:EXAMPLES]}")
        if self.lost:
            out.append(f"{len(self.lost)} acknowledged commands lost: {self.lost[:EXAMPLES]}")
        if self.duplicated:
            out.append(f"{len(self.duplicated)} commands duplicated: {self.duplicated[:EXAMPLES]}")
        if self.double_held:  # each item's events: grep its id in the run's events.jsonl
            out.append(f"{len(self.double_held)} items double-held: {list(self.double_held.items())[:EXAMPLES]}")
        if self.stuck:
            out.append(f"{len(self.stuck)} items not terminal: {list(self.stuck.items())[:EXAMPLES]}")
        if not self.hashes_equal:
            out.append(f"state hashes differ: {self.hashes} (own fold {self.fold_hash})")
        for key in ("missed", "duplicated", "out_of_order", "unexpected"):
            if self.ws_total(key):
                out.append(f"WebSocket events {key}: {self.ws} e.g. {self.ws_examples[:EXAMPLES]}")
                break
        if not self.ws or any(c["seen"] == 0 for c in self.ws.values()):
            out.append(f"a WebSocket subscriber saw nothing: {self.ws}")
        return out

    def table(self) -> str:
        faults = ", ".join(f"{k} {v}" for k, v in self.faults.items())
        rows = [
            ("seed", str(self.seed)),
            ("rounds", str(self.rounds)),
            ("faults by kind", faults),
            ("events in the stream", str(self.events)),
            ("work items", str(self.items)),
            ("commands acknowledged", f"{self.acked} ({self.submits_acked} submits, {self.cancels_acked} cancels)"),
            ("submit answers seen", ", ".join(f"{k}: {v}" for k, v in sorted(self.submit_statuses.items()))),
            ("unexpected answers", str(len(self.unexpected_answers))),
            ("lost", str(len(self.lost))),
            ("duplicated", str(len(self.duplicated))),
            ("double-held items", str(len(self.double_held))),
            ("re-assigned to own holder", str(len(self.reassigned_to_holder))),
            ("stuck items", str(len(self.stuck))),
            ("hash equality", ("equal" if self.hashes_equal else "DIFFERENT")
             + f" at seq {self.fold_hash[0]} ({len(self.hashes)} replicas + own fold)"),
            ("WS subscribers", ", ".join(f"{n}: {c['seen']} events, {c['connections']} connections"
                                         for n, c in self.ws.items())),
            ("WS events missed", str(self.ws_total("missed"))),
            ("WS events duplicated", str(self.ws_total("duplicated"))),
            ("WS events out of order", str(self.ws_total("out_of_order"))),
            ("WS events unexpected", str(self.ws_total("unexpected"))),
            ("wall time", f"{self.wall_s:.1f} s"),
            ("result", "PASS" if not self.violations() else "FAIL"),
        ]
        width = max(len(k) for k, _ in rows)
        line = "+" + "-" * (width + 2) + "+" + "-" * 60 + "+"
        body = [f"| {k.ljust(width)} | {v}" for k, v in rows]
        return "\n".join([line, *body, line])


def check_commands(report: Report, events: list[Event], submits: list[SubmitRecord],
                   cancels: list[CancelRecord]) -> None:
    submitted = [e for e in events if e.type == "work.submitted"]
    by_description: dict[str, list[Event]] = {}
    for e in submitted:
        by_description.setdefault(str(e.data.get("description")), []).append(e)
    per_item = Counter(e.entity_id for e in submitted)
    for rec in submits:
        report.submit_statuses.update(rec.statuses)
        if rec.unexpected:
            report.unexpected_answers.append(f"submit {rec.key}: {rec.unexpected}")
        stored = by_description.get(rec.description, [])
        if len(stored) > 1:
            report.duplicated.append(f"submit {rec.key} stored {len(stored)}x at seqs {[e.seq for e in stored]}")
        if not rec.acked:
            continue
        report.submits_acked += 1
        mine = [e for e in stored if e.entity_id == rec.work_id and e.correlation_id == rec.correlation]
        if not mine:
            report.lost.append(f"submit {rec.key} acked as {rec.work_id} (seq {rec.seq}), statuses {rec.statuses}, "
                               f"stream: {[(e.seq, e.entity_id, e.correlation_id) for e in stored]}")
    report.duplicated += [f"work.submitted {wid} {n}x" for wid, n in per_item.items() if n > 1]
    cancelled: dict[str, list[Event]] = {}
    for e in events:
        if e.type == "work.cancelled":
            cancelled.setdefault(e.entity_id, []).append(e)
    report.duplicated += [f"work.cancelled {wid} {len(es)}x at {[e.seq for e in es]}"
                          for wid, es in cancelled.items() if len(es) > 1]
    by_seq = {e.seq: e for e in events}
    for c in cancels:
        if c.unexpected:
            report.unexpected_answers.append(f"cancel {c.work_id}: {c.unexpected}")
        if c.status != 200:
            continue
        report.cancels_acked += 1
        stored = cancelled.get(c.work_id, [])
        at = by_seq.get(c.seq or 0)
        if not stored or (not c.already and (at is None or at.type != "work.cancelled" or at.entity_id != c.work_id)):
            report.lost.append(f"cancel {c.work_id} answered 200 (already={c.already}, seq {c.seq}), "
                               f"statuses {c.statuses}, work.cancelled in the stream at {[e.seq for e in stored]}")


def check_holders(report: Report, project: str, events: list[Event]) -> None:
    state = ProjectState(project=project)
    for ev in events:
        item = state.work.get(ev.entity_id) if ev.type.startswith("work.") else None
        fenced = (ev.epoch is not None and ev.epoch < state.epoch) or (
            ev.idempotency_key is not None and ev.idempotency_key in state.idempotency)
        if item is not None and not fenced:
            holder = item["assignedTo"] if item["status"] in LIVE_ASSIGNMENT else None
            guid = ev.data.get("agentGuid")
            wid = ev.entity_id
            if ev.type == "work.assigned" and holder is not None:
                if guid != holder and wid not in report.double_held:
                    report.double_held[wid] = f"seq {ev.seq}: assigned to {guid} while held by {holder}"
                elif guid == holder:
                    report.reassigned_to_holder.append(f"{wid} seq {ev.seq} ({guid})")
            elif ev.type in AGENT_REPORTS and guid is not None and guid != holder and wid not in report.double_held:
                report.double_held[wid] = f"seq {ev.seq}: {ev.type} from {guid} while held by {holder or 'nobody'}"
        apply(state, ev)


def fold_stream(project: str, events: list[Event]) -> tuple[ProjectState, list[Seen]]:
    """The stream folded as every replica folds it, and the `work`-topic live events it means."""
    state = ProjectState(project=project)
    translator = Translator(project)
    translator.seed(state)
    live: list[Seen] = []
    for ev in events:
        apply(state, ev)
        for le in translator.translate(ev, state):
            if le.topic == "work":
                live.append(Seen(le.seq, le.event, str(le.data.get("workId"))))
    return state, live


def check_terminal(report: Report, state: ProjectState) -> None:
    report.items = len(state.work)
    for wid in list(state.work):
        status = state.work.peek(wid)["status"] if hasattr(state.work, "peek") else state.work[wid]["status"]
        if status not in TERMINAL_WORK:
            report.stuck[wid] = status


def check_ws(report: Report, expected: list[Seen], subscribers: list[WsSubscriber]) -> None:
    for sub in subscribers:
        want = [e for e in expected if e.seq >= sub.first_from]
        want_set = set(want)
        counts = Counter(sub.seen)
        seen_set = set(counts)
        missed = [e for e in want if e not in seen_set]
        duplicated = sum(n - 1 for n in counts.values())
        disorder = sum(1 for a, b in zip(sub.seen, sub.seen[1:], strict=False) if b.seq <= a.seq)
        unexpected = [e for e in seen_set if e not in want_set]
        report.ws[sub.name] = {"seen": len(sub.seen), "connections": sub.connections, "missed": len(missed),
                               "duplicated": duplicated, "out_of_order": disorder, "unexpected": len(unexpected)}
        report.ws_examples += [f"{sub.name} missed {e}" for e in missed[:3]]
        report.ws_examples += [f"{sub.name} unexpected {e}" for e in unexpected[:3]]
        report.ws_examples += [f"{sub.name} duplicated {e} x{n}" for e, n in counts.items() if n > 1][:3]
        report.ws_examples += [f"{sub.name} errors: {sub.errors[:3]}"] if sub.errors else []


def check_all(report: Report, project: str, events: list[Event], submits: list[SubmitRecord],
              cancels: list[CancelRecord], subscribers: list[WsSubscriber]) -> ProjectState:
    report.events = len(events)
    check_commands(report, events, submits, cancels)
    check_holders(report, project, events)
    state, live = fold_stream(project, events)
    check_terminal(report, state)
    report.fold_hash = (state.seq, state_hash(state))
    check_ws(report, live, subscribers)
    return state


