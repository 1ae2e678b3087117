"""The token bucket and rate limiter (the clock is an argument) and the limit settings."""

from __future__ import annotations

import pytest

from weft.core.limits import RateLimiter, TokenBucket
from weft.settings import Settings, SettingsError


def test_a_bucket_allows_its_burst_then_refills_at_its_rate() -> None:
    bucket = TokenBucket(rate=2.0, burst=4.0)
    assert [bucket.take(10.0) for _ in range(4)] == [0.0] * 4
    assert bucket.take(10.0) == pytest.approx(0.5)
    assert bucket.take(10.5) == 0.0  # half a second later: one more
    assert bucket.take(10.5) > 0


def test_the_limiter_keeps_one_bucket_per_token_and_a_token_s_own_rate_wins() -> None:
    limiter = RateLimiter(rate=1.0)  # burst 2
    assert [limiter.retry_after("a", 0.0) for _ in range(3)] == [0, 0, 1]
    assert limiter.retry_after("b", 0.0) == 0
    assert limiter.retry_after("c", 0.0, rate=0.0) == 0  # 0: this token is not limited
    assert [limiter.retry_after("d", 0.0, rate=0.01) for _ in range(2)] == [0, 100]


def test_the_limiter_forgets_the_least_recently_seen_tokens_first() -> None:
    limiter = RateLimiter(rate=1.0)
    limiter.MAX_KEYS = 2
    for key in ("a", "b", "a", "c"):
        limiter.retry_after(key, 0.0)
    assert set(limiter._buckets) == {"a", "c"}


def test_limits_are_settings() -> None:
    limits = Settings.from_env({"WEFT_MAX_DESCRIPTION_CHARS": "10", "WEFT_RATE_LIMIT_PER_S": "2.5"}).limits
    assert (limits.description_chars, limits.requests_per_s) == (10, 2.5)
    with pytest.raises(SettingsError, match="WEFT_MAX_LIST_ITEMS"):
        Settings.from_env({"WEFT_MAX_LIST_ITEMS": "0"})
    with pytest.raises(SettingsError, match="WEFT_WS_MAX_MESSAGES_PER_S"):
        Settings.from_env({"WEFT_WS_MAX_MESSAGES_PER_S": "0"})
