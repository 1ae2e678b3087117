"""How the fleet commands print: JSON with --json; aligned, coloured tables (rich) when stdout is a
terminal; plain aligned text (no colour, no box drawing) when it is piped.

WEFT_CLI_TTY=1 (or 0) forces the terminal (or piped) rendering, for tests and for `watch` under a
pager; NO_COLOR is honoured by rich.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from typing import IO, Any

import orjson

STATUS_STYLE = {
    "pending": "yellow", "assigned": "cyan", "in-progress": "blue", "completed": "green", "failed": "red",
    "cancelled": "magenta", "online": "green", "busy": "yellow", "offline": "bright_black", "draining": "magenta",
    "healthy": "green", "unhealthy": "red", "unknown": "bright_black", "enabled": "green", "disabled": "bright_black",
}


def is_tty(stream: IO[str] | None = None, env: Mapping[str, str] | None = None) -> bool:
    forced = (env if env is not None else os.environ).get("WEFT_CLI_TTY")
    if forced in ("0", "1"):
        return forced == "1"
    stream = stream if stream is not None else sys.stdout
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple):
        return ",".join(cell(v) for v in value)
    if isinstance(value, dict):
        return orjson.dumps(value).decode()
    return str(value)


def plain_table(columns: Sequence[str], rows: Sequence[Sequence[str]], *, upper: bool = True, indent: str = "") -> str:
    """Columns padded to their widest cell, two spaces apart; the header in upper case unless not
    `upper`; every line after `indent`."""
    head = [c.upper() for c in columns] if upper else list(columns)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    lines = [(indent + "  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True))).rstrip()
             for line in [head, *rows]]
    return "\n".join(lines)


class Output:
    def __init__(self, json: bool = False, tty: bool | None = None, stream: IO[str] | None = None) -> None:
        self.stream = stream if stream is not None else sys.stdout
        self.json = json
        self.tty = is_tty(self.stream) if tty is None else tty
        self._console: Any = None

    @property
    def console(self) -> Any:
        if self._console is None:
            from rich.console import Console

            self._console = Console(file=self.stream, force_terminal=self.tty or None, highlight=False)
        return self._console

    def write(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def json_doc(self, value: Any) -> None:
        """One JSON document, indented (a command's whole answer)."""
        self.write(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode())

    def json_line(self, value: Any) -> None:
        """One JSON document on one line (each update of a stream: `watch --json` is JSON lines)."""
        self.write(orjson.dumps(value).decode())

    def styled(self, text: str) -> str:
        return f"[{STATUS_STYLE[text]}]{text}[/]" if text in STATUS_STYLE else text

    def table(self, columns: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None,
              status_cols: Sequence[int] = ()) -> None:
        cells = [[cell(v) for v in r] for r in rows]
        if not self.tty:
            self.write(plain_table(columns, cells) if cells else "(none)")
            return
        self.console.print(self.rich_table(columns, cells, title, status_cols))

    def rich_table(self, columns: Sequence[str], cells: Sequence[Sequence[str]], title: str | None = None,
                   status_cols: Sequence[int] = ()) -> Any:
        from rich import box
        from rich.markup import escape
        from rich.table import Table

        t = Table(*columns, title=title, box=box.SIMPLE_HEAD, header_style="bold", title_justify="left")
        for r in cells:
            t.add_row(*[self.styled(v) if i in status_cols else escape(v) for i, v in enumerate(r)])
        if not cells:
            t.add_row(*["[dim](none)[/]"] + [""] * (len(columns) - 1))
        return t

    def fields(self, pairs: Sequence[tuple[str, Any]], title: str | None = None) -> None:
        """A record as aligned `key  value` lines (a rich grid on a terminal)."""
        rows = [(k, cell(v)) for k, v in pairs if v is not None and v != "" and v != []]
        if not self.tty:
            width = max((len(k) for k, _ in rows), default=0)
            if title:
                self.write(title)
            self.write("\n".join(f"{k.ljust(width)}  {v}" for k, v in rows))
            return
        from rich.markup import escape
        from rich.table import Table

        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold")
        grid.add_column()
        for k, v in rows:
            grid.add_row(k, self.styled(v) if k == "status" or k == "health" else escape(v))
        if title:
            self.console.print(f"[bold]{escape(title)}[/]")
        self.console.print(grid)
