"""Input limits and the per-token request rate (pure: the clock is an argument).

Every limit is a setting (`ENV` names it) and every refusal names the field, the limit and the
setting that raises it, so an operator who hits one knows what to change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import orjson

from weft.core.errors import InvalidInput


@dataclass(frozen=True)
class Limits:
    description_chars: int = 200_000
    id_chars: int = 256  # taskId, X-Correlation-Id / X-Request-Id
    context_bytes: int = 64 * 1024  # contextData, encoded as JSON
    list_items: int = 1_000  # capabilities, boundaries, tags, the ids of a batch
    targets_per_project: int = 200
    ws_message_bytes: int = 64 * 1024
    ws_messages_per_s: float = 20.0  # per connection, with a burst of twice that
    requests_per_s: float = 0.0  # per token, on each replica; 0 = no limit
    burst: float = 0.0  # 0 = twice the rate

    def check_chars(self, name: str, value: str | None, limit: int, setting: str) -> None:
        if value is not None and len(value) > limit:
            raise _over(name, f"is {len(value)} characters; at most {limit}", limit, setting)

    def check_items(self, name: str, value: list[Any] | None) -> None:
        if value is not None and len(value) > self.list_items:
            raise _over(name, f"has {len(value)} entries; at most {self.list_items}", self.list_items,
                        ENV["list_items"])

    def check_context(self, value: Any) -> None:
        if value is None:
            return
        size = len(orjson.dumps(value))
        if size > self.context_bytes:
            raise _over("contextData", f"is {size} bytes as JSON; at most {self.context_bytes}", self.context_bytes,
                        ENV["context_bytes"])


ENV = {
    "description_chars": "WEFT_MAX_DESCRIPTION_CHARS",
    "id_chars": "WEFT_MAX_ID_CHARS",
    "context_bytes": "WEFT_MAX_CONTEXT_BYTES",
    "list_items": "WEFT_MAX_LIST_ITEMS",
    "targets_per_project": "WEFT_MAX_TARGETS_PER_PROJECT",
    "ws_message_bytes": "WEFT_WS_MAX_MESSAGE_BYTES",
    "ws_messages_per_s": "WEFT_WS_MAX_MESSAGES_PER_S",
    "requests_per_s": "WEFT_RATE_LIMIT_PER_S",
    "burst": "WEFT_RATE_LIMIT_BURST",
}


def _over(name: str, what: str, limit: int, setting: str) -> InvalidInput:
    return InvalidInput(f"{name} {what} (limit {setting})", field=name, details={"limit": limit, "setting": setting})


@dataclass
class TokenBucket:
    """`rate` tokens a second up to `burst`; `take` answers 0 (allowed) or the seconds to wait."""

    rate: float
    burst: float
    level: float = field(default=-1.0)
    at: float = 0.0

    def take(self, now: float) -> float:
        if self.level < 0:
            self.level, self.at = self.burst, now
        self.level = min(self.burst, self.level + (now - self.at) * self.rate)
        self.at = now
        if self.level >= 1.0:
            self.level -= 1.0
            return 0.0
        return (1.0 - self.level) / self.rate


class RateLimiter:
    """One bucket per key (a token's name), bounded: the least recently seen keys are forgotten
    first, which can only ever let a forgotten key start again with a full bucket."""

    MAX_KEYS = 10_000

    def __init__(self, rate: float, burst: float = 0.0):
        self.rate = rate
        self.burst = max(1.0, burst or 2 * rate)  # below one, not even the first request would pass
        self._buckets: dict[str, TokenBucket] = {}

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def retry_after(self, key: str, now: float, rate: float | None = None) -> int:
        """0 when the request may go ahead, else whole seconds to wait (for `Retry-After`)."""
        rate = rate if rate is not None else self.rate
        if rate <= 0:
            return 0
        bucket = self._buckets.pop(key, None) or TokenBucket(rate, self.burst if rate == self.rate else max(1.0, 2 * rate))
        self._buckets[key] = bucket  # most recently seen last
        if len(self._buckets) > self.MAX_KEYS:
            del self._buckets[next(iter(self._buckets))]
        wait = bucket.take(now)
        return 0 if wait == 0 else max(1, math.ceil(wait))
