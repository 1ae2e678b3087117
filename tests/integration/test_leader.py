"""Scheduler leases (weft/store/lease.py) against a real nats-server.

Each test uses its own bucket (named after its project) so its short TTL cannot clash with another
test's bucket; transitions are awaited through the elector's condition, never by sleeping.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import nats.errors
import orjson
import pytest
from nats.aio.client import Client as NATS
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

from weft.store.lease import LeaderElector, LeaderLease, LeaseError, open_lease_bucket

TTL = 1.5


@pytest.fixture
def bucket(project: str) -> str:
    return f"leases-{project}"


@pytest.fixture
async def js(nc: NATS, bucket: str) -> AsyncIterator[JetStreamContext]:
    ctx = nc.jetstream()
    yield ctx
    try:
        await ctx.delete_key_value(bucket)
    except nats.errors.Error:
        pass


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, int | None]] = []

    def elected(self, project: str, epoch: int) -> None:
        self.events.append(("elected", project, epoch))

    async def deposed(self, project: str) -> None:  # async callbacks are awaited too
        self.events.append(("deposed", project, None))


def elector(js: JetStreamContext, holder: str, project: str, bucket: str, rec: Recorder | None = None) -> LeaderElector:
    return LeaderElector(
        js, holder, [project], ttl_s=TTL, bucket=bucket,
        on_elected=rec.elected if rec else None, on_deposed=rec.deposed if rec else None,
    )


async def first_elected(project: str, *electors: LeaderElector, timeout: float = 4 * TTL) -> LeaderElector:
    waits = {asyncio.create_task(e.wait_elected(project)): e for e in electors}
    done, pending = await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    for t in pending:
        t.cancel()
    assert done, "nobody was elected"
    return waits[next(iter(done))]


async def test_bucket_is_created_with_ttl_and_history_one(js: JetStreamContext, bucket: str) -> None:
    kv, ttl = await open_lease_bucket(js, TTL, bucket)
    status = await kv.status()
    assert ttl == pytest.approx(TTL)
    assert status.history == 1
    # Opening again (another replica) reuses it; a different requested TTL yields the bucket's.
    _kv2, ttl2 = await open_lease_bucket(js, 30.0, bucket)
    assert ttl2 == pytest.approx(TTL)


async def test_bucket_without_ttl_is_refused(js: JetStreamContext, bucket: str) -> None:
    await js.create_key_value(bucket=bucket, history=1)
    with pytest.raises(LeaseError):
        await open_lease_bucket(js, TTL, bucket)


async def test_only_one_of_two_electors_holds_a_project(js: JetStreamContext, project: str, bucket: str) -> None:
    rec_a, rec_b = Recorder(), Recorder()
    a, b = elector(js, "replica-a", project, bucket, rec_a), elector(js, "replica-b", project, bucket, rec_b)
    for _ in range(4):  # rounds driven by hand: deterministic, no loop timing involved
        await a.run_once()
        await b.run_once()
        assert a.is_leader(project) != b.is_leader(project)
    assert a.is_leader(project)  # the first to try won and kept it
    assert rec_a.events == [("elected", project, a.epoch(project))]
    assert rec_b.events == []
    lease = LeaderLease(js, project, "observer", TTL, bucket=bucket)
    current = await lease.current()
    assert current is not None
    assert current["holder"] == "replica-a" and current["epoch"] == a.epoch(project)
    assert "acquiredAt" in current


async def test_release_lets_the_other_take_over(js: JetStreamContext, project: str, bucket: str) -> None:
    rec_a, rec_b = Recorder(), Recorder()
    a, b = elector(js, "replica-a", project, bucket, rec_a), elector(js, "replica-b", project, bucket, rec_b)
    await a.start()
    epoch_a = await a.wait_elected(project, timeout=4 * TTL)
    await b.start()
    await b.run_once()
    assert not b.is_leader(project)
    await a.stop(release=True)
    assert rec_a.events == [("elected", project, epoch_a), ("deposed", project, None)]
    assert not a.is_leader(project)
    epoch_b = await b.wait_elected(project, timeout=4 * TTL)
    assert epoch_b > epoch_a
    await b.stop()


async def test_crashed_holder_is_replaced_and_epochs_increase(js: JetStreamContext, project: str, bucket: str) -> None:
    a, b = elector(js, "replica-a", project, bucket), elector(js, "replica-b", project, bucket)
    await a.start()
    await b.start()
    first = await first_elected(project, a, b)
    other = b if first is a else a
    epochs = [first.leaders[project]]
    await other.run_once()
    assert not other.is_leader(project)

    # Crash: the loop dies without releasing; the entry must lapse by the bucket TTL.
    await first.stop(release=False)
    epochs.append(await asyncio.wait_for(other.wait_elected(project), timeout=2 * TTL + 1.0))

    # The first one comes back and waits its turn; a clean release hands leadership back.
    await first.start()
    await first.run_once()
    assert not first.is_leader(project)
    await other.stop(release=True)
    epochs.append(await first.wait_elected(project, timeout=4 * TTL))
    assert epochs == sorted(epochs) and len(set(epochs)) == 3, epochs
    await first.stop()


async def test_epoch_is_stable_while_renewing(js: JetStreamContext, project: str, bucket: str) -> None:
    lease = LeaderLease(js, project, "replica-a", TTL, bucket=bucket)
    epoch = await lease.acquire_or_renew()
    assert epoch is not None and lease.is_leader
    revisions = {lease.revision}
    for _ in range(3):
        assert await lease.acquire_or_renew() == epoch
        revisions.add(lease.revision)
    assert len(revisions) == 4  # every renewal is a new revision; the epoch stays the term's start
    current = await lease.current()
    assert current is not None and current["epoch"] == epoch and current["revision"] == lease.revision


async def test_deposed_holder_renew_returns_none(js: JetStreamContext, project: str, bucket: str) -> None:
    a = LeaderLease(js, project, "replica-a", TTL, bucket=bucket)
    b = LeaderLease(js, project, "replica-b", TTL, bucket=bucket)
    epoch_a = await a.acquire_or_renew()
    assert epoch_a is not None
    assert await b.acquire_or_renew() is None
    # The entry goes away under a (as an expiry would) and b takes the project.
    kv, _ttl = await open_lease_bucket(js, TTL, bucket)
    await kv.purge(project)
    epoch_b = await b.acquire_or_renew()
    assert epoch_b is not None and epoch_b > epoch_a
    assert await a.acquire_or_renew() is None
    assert a.epoch is None and not a.is_leader
    # a's late release must not remove b's lease.
    await a.release()
    assert await b.acquire_or_renew() == epoch_b
    current = await b.current()
    assert current is not None and current["holder"] == "replica-b"


async def test_deposed_after_expiry(js: JetStreamContext, project: str, bucket: str) -> None:
    """A holder that stopped renewing (a long pause) finds someone else's lease and returns None."""
    a = LeaderLease(js, project, "replica-a", TTL, bucket=bucket)
    assert await a.acquire_or_renew() is not None
    b = elector(js, "replica-b", project, bucket)
    await b.start()
    epoch_b = await b.wait_elected(project, timeout=4 * TTL)
    # Safety: by the time anyone else could be elected, the silent holder no longer counts itself leader.
    assert not a.is_leader and a.epoch is None
    assert await a.acquire_or_renew() is None
    assert a.epoch is None
    assert b.epoch(project) == epoch_b
    await b.stop()


async def test_release_then_reacquire_after_delete_marker(js: JetStreamContext, project: str, bucket: str) -> None:
    a = LeaderLease(js, project, "replica-a", TTL, bucket=bucket)
    first = await a.acquire_or_renew()
    await a.release()
    assert a.epoch is None
    assert await LeaderLease(js, project, "x", TTL, bucket=bucket).current() is None
    second = await a.acquire_or_renew()
    assert first is not None and second is not None and second > first


class FlakyKV:
    """Applies writes, then loses the reply (as a timeout after the server acted would)."""

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv
        self.drop_replies = False

    async def create(self, key: str, value: bytes) -> int:
        rev = await self.kv.create(key, value)
        if self.drop_replies:
            raise nats.errors.TimeoutError
        return rev

    async def update(self, key: str, value: bytes, last: int | None = None) -> int:
        rev = await self.kv.update(key, value, last=last)
        if self.drop_replies:
            raise nats.errors.TimeoutError
        return rev

    def __getattr__(self, name: str) -> Any:
        return getattr(self.kv, name)


async def test_writes_with_lost_replies_are_adopted(js: JetStreamContext, project: str, bucket: str) -> None:
    kv, _ttl = await open_lease_bucket(js, TTL, bucket)
    flaky = FlakyKV(kv)
    lease = LeaderLease(js, project, "replica-a", TTL, bucket=bucket, kv=flaky)  # type: ignore[arg-type]
    other = LeaderLease(js, project, "replica-b", TTL, bucket=bucket)

    flaky.drop_replies = True
    assert await lease.acquire_or_renew() is None  # created, but we could not know
    flaky.drop_replies = False
    epoch = await lease.acquire_or_renew()  # finds its own entry and adopts it
    assert epoch is not None
    assert orjson.loads((await kv.get(project)).value)["holder"] == "replica-a"
    assert await other.acquire_or_renew() is None

    flaky.drop_replies = True
    assert await lease.acquire_or_renew() == epoch  # renewal applied, reply lost: still valid locally
    flaky.drop_replies = False
    assert await lease.acquire_or_renew() == epoch  # CAS on the stale revision fails, entry is ours
    assert lease.revision == (await kv.get(project)).revision
    assert await lease.acquire_or_renew() == epoch


async def test_elector_add_and_remove_projects(js: JetStreamContext, project: str, bucket: str) -> None:
    rec = Recorder()
    e = LeaderElector(js, "replica-a", ttl_s=TTL, bucket=bucket, on_elected=rec.elected, on_deposed=rec.deposed)
    await e.start()
    p2 = project + "-2"
    e.add_project(project)
    e.add_project(p2)
    await e.wait_until(lambda: {project, p2} <= set(e.leaders), timeout=4 * TTL)
    await e.remove_project(p2)
    assert set(e.leaders) == {project}
    assert ("deposed", p2, None) in rec.events
    assert await LeaderLease(js, p2, "x", TTL, bucket=bucket).current() is None  # released
    await e.stop()
    assert e.leaders == {}
    assert not e.running


async def test_callback_errors_do_not_break_the_loop(js: JetStreamContext, project: str, bucket: str) -> None:
    def boom(project: str, epoch: int) -> None:
        raise RuntimeError("callback bug")

    e = LeaderElector(js, "replica-a", [project], ttl_s=TTL, bucket=bucket, on_elected=boom)
    await e.start()
    await e.wait_elected(project, timeout=4 * TTL)
    rounds = e.rounds
    await e.wait_until(lambda: e.rounds > rounds + 1, timeout=4 * TTL)
    assert e.is_leader(project)
    await e.stop()


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        LeaderLease(None, "bad.project", "h")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        LeaderLease(None, "ok", "")  # type: ignore[arg-type]
