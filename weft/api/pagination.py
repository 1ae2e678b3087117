"""Cursor pagination like the original: limit 1-100 (default 50), cursors bound to their filter."""

from __future__ import annotations

import base64
import hashlib
import heapq
from collections.abc import Callable, Sequence
from typing import Any

import orjson

from weft.core.errors import InvalidInput

DEFAULT_LIMIT = 50
MAX_LIMIT = 100
# No list is longer; a bigger offset is a forged cursor (and would overflow the cursor's 64-bit JSON).
MAX_OFFSET = 2**31


def filter_hash(filters: dict[str, Any]) -> str:
    clean = {k: v for k, v in filters.items() if v is not None}
    return hashlib.sha256(orjson.dumps(clean, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]


def encode_cursor(offset: int, limit: int, fhash: str) -> str:
    raw = orjson.dumps({"offset": offset, "limit": limit, "filterHash": fhash})
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def parse_limit(raw: str | None) -> int:
    if raw is None or raw == "":
        return DEFAULT_LIMIT
    try:
        value = int(raw)
    except ValueError:
        raise InvalidInput("limit must be an integer", field="limit") from None
    return max(1, min(MAX_LIMIT, value))


def decode_cursor(cursor: str | None, fhash: str) -> int:
    """The offset a cursor points at; 400 if it is malformed or was made for other filters."""
    if not cursor:
        return 0
    try:
        body = orjson.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        offset = body["offset"]
        made_for = body.get("filterHash")
    except (ValueError, KeyError, TypeError, orjson.JSONDecodeError):
        raise InvalidInput("cursor is malformed", field="cursor") from None
    if type(offset) is not int or not 0 <= offset <= MAX_OFFSET:
        raise InvalidInput("cursor is malformed", field="cursor")
    if made_for is not None and made_for != fhash:
        raise InvalidInput("cursor was issued for different filters", field="cursor")
    return offset


def page(
    items: Sequence[Any],
    key: str,
    cursor: str | None,
    limit_raw: str | None,
    filters: dict[str, Any],
    *,
    order: Callable[[Any], Any] | None = None,
) -> dict[str, Any]:
    """One page of `items`. With `order`, `items` may be unsorted: only the first offset+limit are
    ordered (a heap, not a sort of everything), so early pages of a long list stay cheap."""
    fhash = filter_hash(filters)
    limit = parse_limit(limit_raw)
    offset = decode_cursor(cursor, fhash)
    if order is None:
        chunk = list(items[offset : offset + limit])
    else:
        chunk = heapq.nsmallest(offset + limit, items, key=order)[offset:]
    has_more = offset + limit < len(items)
    return {
        key: chunk,
        "count": len(chunk),
        "total": len(items),
        "hasMore": has_more,
        "nextCursor": encode_cursor(offset + limit, limit, fhash) if has_more else None,
        "prevCursor": encode_cursor(max(0, offset - limit), limit, fhash) if offset > 0 else None,
    }
