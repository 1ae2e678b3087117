"""How every weft program connects to NATS: the server list and the reconnect-forever options."""

from __future__ import annotations

from typing import Any

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
