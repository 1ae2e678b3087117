"""How every weft program connects to NATS: the server list, the reconnect-forever options and the
client class (nats-py's, with a cheaper header parser)."""

from __future__ import annotations

from typing import Any

from nats.aio.client import Client as _NatsClient

# Re-exported: the reference agent may import this module only (tests/unit/test_layout.py).
from weft.store.natsauth import (
    SECRET_VARS,
    NatsAuth,
    agent_inbox_prefix,
    redact_secrets,
    redact_url,
)

__all__ = [
    "RECONNECT_FOREVER",
    "SECRET_VARS",
    "Client",
    "NatsAuth",
    "TLSRequired",
    "agent_inbox_prefix",
    "auth_options",
    "connect",
    "parse_header_lines",
    "redact_secrets",
    "redact_url",
    "servers",
]

# Reconnect forever, quickly: weft replicas and agents outlive NATS restarts and partitions.
RECONNECT_FOREVER: dict[str, Any] = {
    "max_reconnect_attempts": -1,
    "reconnect_time_wait": 0.5,
    "allow_reconnect": True,
    "connect_timeout": 2,
}


def servers(url: str) -> list[str]:
    """NATS_URL may list several servers, comma-separated, as the NATS CLI and other clients accept."""
    return [u.strip() for u in url.split(",") if u.strip()]


_MISSING: Any = object()
# Header names repeat on every message (Nats-Msg-Id, Nats-Expected-Last-Subject-Sequence, ...):
# remember how each raw name parses. Bounded, so hostile names cannot grow it without limit.
_NAMES: dict[bytes, str | None] = {}
_NAMES_MAX = 1024


def _header_name(raw: bytes) -> str | None:
    try:
        key = raw.strip().decode("ascii")
    except UnicodeDecodeError:
        return None
    return None if any(c.isspace() for c in key) else key


def parse_header_lines(raw: bytes) -> dict[str, str]:
    """nats-py 2.16's `Client._parse_header_lines`, result for result (a test compares them), at a
    fifth of the cost: it checks every character of every name with `str.isspace`, which was ~40%
    of a projection rebuild, since every stored event carries its Msg-Id and OCC headers."""
    out: dict[str, str] = {}
    names = _NAMES
    for line in raw.split(b"\r\n"):
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        key = names.get(name, _MISSING)
        if key is _MISSING:
            key = _header_name(name)
            if len(names) < _NAMES_MAX:
                names[name] = key
        if key is not None:
            out[key] = value.strip().decode("utf-8", "replace")
    return out


class Client(_NatsClient):
    """nats-py's client; only the header parser differs (see `parse_header_lines`)."""

    _parse_header_lines = staticmethod(parse_header_lines)


class TLSRequired(ConnectionError):
    """A tls:// URL (or NATS_TLS_*) and a server that did not ask for TLS: weft will not talk to it."""


def auth_options(auth: NatsAuth | None, options: dict[str, Any]) -> dict[str, Any]:
    """`auth`'s connect options under the explicit ones; an explicit None (`user=settings.nats_user`
    when unset) does not hide what `auth` gives."""
    merged = dict(auth.connect_options()) if auth is not None else {}
    for key, value in options.items():
        if value is None and key in merged:
            continue
        merged[key] = value
    return merged


async def connect(url: str | list[str], *, auth: NatsAuth | None = None, **options: Any) -> Client:
    """`nats.connect`, returning weft's client class. `url` may be a comma-separated list. `auth`:
    credentials and TLS (`weft.store.natsauth`); explicit `options` win over it."""
    nc = Client()
    await nc.connect(servers(url) if isinstance(url, str) else url, **auth_options(auth, options))
    if auth is not None and auth.uses_tls and not nc._server_info.get("tls_required"):
        # nats-py upgrades only when the server asks: refuse a server (or a man in the middle) that
        # does not, rather than carry on in clear text.
        await nc.close()
        raise TLSRequired("NATS TLS is configured (tls:// or NATS_TLS_*) but the server did not offer TLS")
    return nc
