"""Replay fixtures: streams exported from real runs (`weft replay export`), folded again here.

A fixture is JSON lines: each event's `Event.to_dict()` (with its `seq`), then one footer line
{"kind": "footer", "project", "seq", "from", "state_hash", ...}. Folding the events with
`projections.apply` must give the footer's hash: a change to the fold that alters the state of a
recorded run shows up as a mismatch (bump STATE_SCHEMA and re-record, or fix the fold).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from projections import ProjectState, apply, state_hash
from projections.events import Event, decode

FIXTURES = Path(__file__).parent / "fixtures" / "replay"


@dataclass
class Fixture:
    path: Path
    events: list[Event]
    footer: dict[str, Any]


def load(path: Path) -> Fixture:
    events: list[Event] = []
    footer: dict[str, Any] | None = None
    for n, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        assert footer is None, f"{path.name}:{n}: a line after the footer"
        body = orjson.loads(line)
        if body.get("kind") == "footer":
            footer = body
            continue
        seq = body.pop("seq")
        events.append(decode(orjson.dumps(body), seq))
    assert footer is not None, f"{path.name}: no footer line"
    return Fixture(path, events, footer)


def fold_fixture(fx: Fixture) -> ProjectState:
    state = ProjectState(project=fx.footer["project"])
    for ev in fx.events:
        apply(state, ev)
    return state


def check(fx: Fixture) -> ProjectState:
    """Fold the fixture and compare with its footer; returns the state for further checks."""
    assert fx.footer.get("from", 1) == 1, f"{fx.path.name}: exported from seq {fx.footer['from']}, not replayable alone"
    seqs = [ev.seq for ev in fx.events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), f"{fx.path.name}: sequences out of order"
    state = fold_fixture(fx)
    assert state.seq == fx.footer["seq"], f"{fx.path.name}: folded to seq {state.seq}, footer says {fx.footer['seq']}"
    got = state_hash(state)
    assert got == fx.footer["state_hash"], f"{fx.path.name}: state hash {got} != recorded {fx.footer['state_hash']}"
    return state


def all_fixtures() -> list[Path]:
    return sorted(FIXTURES.glob("*.jsonl"))
