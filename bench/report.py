"""Results: one row per metric, printed as a table and written to bench/results.json."""

from __future__ import annotations

import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

RESULTS_PATH = Path(__file__).with_name("results.json")


@dataclass
class Row:
    key: str
    metric: str
    value: float | None
    unit: str
    ratio: str = ""  # ratio/target column text
    verdict: str = ""  # PASS / MISS / "" (no target)
    note: str = ""  # shown instead of a value when there is none (n/a, skipped, ...)
    extra: dict[str, Any] = field(default_factory=dict)


def fmt_value(v: float | None) -> str:
    if v is None:
        return ""
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}" if abs(v) >= 0.1 else f"{v:.3f}"


def render(rows: list[Row]) -> str:
    head = ("metric", "value", "unit", "ratio/target")
    body = []
    for r in rows:
        value = fmt_value(r.value) if r.value is not None else (r.note or "n/a")
        ratio = " ".join(x for x in (r.ratio, r.verdict) if x)
        body.append((r.metric, value, r.unit, ratio))
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    line = "+-" + "-+-".join("-" * w for w in widths) + "-+"

    def fmt(cells: tuple[str, ...]) -> str:
        out = []
        for i, (c, w) in enumerate(zip(cells, widths, strict=True)):
            out.append(c.rjust(w) if i == 1 else c.ljust(w))
        return "| " + " | ".join(out) + " |"

    return "\n".join([line, fmt(head), line, *(fmt(b) for b in body), line])


def write_json(rows: list[Row], meta: dict[str, Any]) -> Path:
    doc = {
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": {"python": platform.python_version(), "machine": platform.machine(), "system": platform.system()},
        **meta,
        "rows": [asdict(r) for r in rows],
    }
    RESULTS_PATH.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    return RESULTS_PATH
