"""Reading the scoped token file (WEFT_TOKENS_FILE) from disk; the format and its checks are
weft.core.access's. Its own module so the CLI (`weft tokens`, `weft serve`'s start-up check) reads
the file without importing the HTTP API."""

from __future__ import annotations

from pathlib import Path

from weft.core.access import TokenFile, TokenFileError, parse_token_file
from weft.watched_file import read_parsed


def read_token_file(path: Path) -> TokenFile:
    return read_parsed(path, parse_token_file, TokenFileError)
