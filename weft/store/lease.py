"""Per-project scheduler lease in the JetStream KV bucket `weft-leases` (DESIGN.md §1, §5).

One key per project; its value is orjson `{holder, acquiredAt}` (renewals add `epoch`, `renewedAt`).

- **Acquire** = `kv.create` (create-if-absent). The revision it returns starts a leadership term and
  names it here (`epoch` of this module). It is not the fence on its own: revisions start again at
  1 when the bucket is deleted and recreated, so the scheduler announces each term in the project's
  stream (`leader.elected`) with an epoch above every epoch the stream has seen
  (`weft.commands.leadership.term_epoch`), and stamps that one on its decisions.
- **Renew** = `kv.update(key, value, last=revision)`: a compare-and-set on the holder's own last
  revision. The epoch stays the same for the whole term. A failed CAS means someone else's entry
  is there (ours lapsed or was removed): leadership is lost and the epoch becomes None. A bucket
  that vanished (no responders) is opened, and so created, again on the next attempt (the bucket
  is declared through `weft.store.resources`, which is told to forget it).
- **Expiry**: the bucket's TTL (`max_age` of its stream, history 1) removes an entry that was not
  renewed in time, so a dead leader's lease lapses and another replica's `create` succeeds.
- **Local validity**: a holder counts itself leader only until `ttl` after it *sent* its last
  successful write (the server stamps the entry no earlier, so it cannot expire sooner). If renewals
  keep failing (partition, slow server), the holder steps down on its own before anyone else can
  take over. Decision events still carry the epoch and use per-entity OCC: that is the real fence.
- **Release** = a CAS delete of the holder's own revision: it never removes a successor's lease.
  A replica that shuts down stops deciding first, then releases (`LeaderElector.stop`), so no
  decision of its term can race the successor's. Every elector watches the bucket: a delete (or
  purge) of a project it competes for starts its next round at once, so a released lease is taken
  over within one round trip, not after the TTL or the next renewal interval.

- **A holder that died** (kill -9, a crashed host) would hold its leases until the TTL. Every
  elector answers requests on its own liveness subject (`alive_subject`); the others probe each
  foreign holder of a project they compete for every `PROBE_S`. NATS answers "no responders" at
  once when no connection anywhere in the cluster subscribes to it, i.e. the holder's connection
  is gone. After `PROBE_STRIKES` such answers in a row (longer than a client's reconnect), a
  follower CAS-deletes that exact entry (the revision it saw, so a renewal in between wins) and
  the watch starts the next round: failover in ~1.5 s instead of the TTL. Safe even if the holder
  was only cut off: it could not append while disconnected, its next renewal fails its CAS, and
  its decisions carry the old epoch, which the stream fences.

A write whose outcome is unknown (timeout, cancellation) is resolved on the next attempt: if the
entry turns out to be ours (same holder and epoch, or the exact bytes of our pending create), it is
adopted rather than treated as someone else's.

`LeaderElector` runs the renew loop for a set of projects and reports transitions through
callbacks and awaitable predicates.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import logging
import random
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import nats.errors
import nats.js.errors
import orjson
from nats.js.api import KeyValueConfig
from nats.js.client import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from projections.events import is_valid_project_id
from weft.aio import cancel_and_wait, wait_event
from weft.stamps import utc_now
from weft.store.resources import JetStreamResources, resources_of

log = logging.getLogger("weft.store.lease")

LEASE_BUCKET = "weft-leases"
DEFAULT_TTL_S = 6.0
ALIVE_PREFIX = "weft.leases.alive."
PROBE_S = 0.5  # between two liveness probes of a foreign holder
PROBE_STRIKES = 3  # "no responders" answers in a row that mean the holder is gone (> a reconnect)


def alive_subject(holder: str) -> str:
    """The subject a holder answers on while its NATS connection lives (a hash: any holder name
    becomes one valid subject token)."""
    return ALIVE_PREFIX + hashlib.sha256(holder.encode()).hexdigest()[:16]

# Failures that leave the outcome of a lease operation unknown or merely postpone it.
TRANSIENT: tuple[type[BaseException], ...] = (nats.errors.Error, asyncio.TimeoutError, OSError)

ElectedCallback = Callable[[str, int], Awaitable[None] | None]
DeposedCallback = Callable[[str], Awaitable[None] | None]


class LeaseError(RuntimeError):
    """The lease bucket cannot provide leases (e.g. it exists without a TTL)."""


async def open_lease_bucket(
    js: JetStreamContext | JetStreamResources,
    ttl_s: float = DEFAULT_TTL_S,
    bucket: str = LEASE_BUCKET,
    replicas: int = 1,
) -> tuple[KeyValue, float]:
    """Open (creating if missing) the lease bucket; returns it and its effective TTL in seconds.

    The TTL is a property of the bucket (its stream's max_age), shared by every project's lease.
    If the bucket already exists with another TTL, that TTL wins (logged): renewal intervals must
    follow the TTL that actually expires entries. A bucket without a TTL is refused.
    """
    if ttl_s <= 0:
        raise ValueError("ttl_s must be > 0")
    config = KeyValueConfig(
        bucket=bucket, history=1, ttl=ttl_s, replicas=replicas, description="weft scheduler leases"
    )
    kv = await resources_of(js).kv(config)  # created if missing; an existing bucket is used as it is
    status = await kv.status()
    ttl = status.ttl
    if not ttl:
        raise LeaseError(f"KV bucket {bucket} has no TTL: leases of dead holders would never lapse")
    if abs(ttl - ttl_s) > 1e-3:
        log.warning("lease bucket %s has ttl %.3fs, not the requested %.3fs; using the bucket's", bucket, ttl, ttl_s)
    return kv, float(ttl)


class LeaderLease:
    """The lease on one project for one holder. Not safe for concurrent calls on one instance."""

    def __init__(
        self,
        js: JetStreamContext | JetStreamResources,
        project: str,
        holder: str,
        ttl_s: float = DEFAULT_TTL_S,
        *,
        bucket: str = LEASE_BUCKET,
        kv: KeyValue | None = None,
        replicas: int = 1,
    ) -> None:
        if not is_valid_project_id(project):
            raise ValueError(f"invalid project id {project!r}")
        if not holder:
            raise ValueError("holder must be a non-empty, per-process unique name")
        self.resources = resources_of(js)  # declares (and caches) the bucket
        self.js = self.resources.js
        self.project = project
        self.holder = holder
        self.ttl_s = ttl_s
        self.bucket = bucket
        self.replicas = replicas
        self._kv = kv
        self._epoch: int | None = None
        self._revision = 0
        self._acquired_at = ""
        self._valid_until = 0.0  # loop.time() after which we no longer count ourselves leader
        self._pending_create: tuple[bytes, float] | None = None  # a create whose outcome is unknown
        self._pending_renewals: list[float] = []  # send times of renewals whose outcome is unknown

    # --- state -----------------------------------------------------------------------------

    @property
    def epoch(self) -> int | None:
        """The current term's epoch while the lease is locally valid, else None."""
        return self._epoch if self.is_leader else None

    @property
    def is_leader(self) -> bool:
        return self._epoch is not None and _now() < self._valid_until

    @property
    def revision(self) -> int:
        """The KV revision of this holder's latest entry (0 when not holding)."""
        return self._revision if self._epoch is not None else 0

    # --- operations ------------------------------------------------------------------------

    async def acquire_or_renew(self) -> int | None:
        """Renew the lease if held, else try to acquire it. Returns the epoch, or None if not leader.

        Transient errors (timeouts, connection loss) are logged and answered from local validity:
        a holder stays leader until its last successful write is `ttl` old.
        """
        kv = await self._bucket()
        if self._epoch is not None and _now() >= self._valid_until:
            log.warning("lease %s lapsed locally (epoch %s): stepping down", self.project, self._epoch)
            self._lose()
        if self._epoch is not None:
            return await self._renew(kv)
        return await self._acquire(kv)

    async def release(self) -> None:
        """Give the lease up now (CAS delete of our own entry) so another holder can take over."""
        if self._epoch is None:
            return
        epoch, revision = self._epoch, self._revision
        self._lose()
        kv = await self._bucket()
        try:
            await kv.delete(self.project, last=revision)
            return
        except TRANSIENT as e:
            # Wrong last revision (an unknown-outcome renewal landed) or a transient failure.
            log.debug("lease %s release by revision %s failed: %r", self.project, revision, e)
        with contextlib.suppress(*TRANSIENT):
            entry = await kv.get(self.project)
            if self._entry_epoch(entry, epoch) == epoch:
                await kv.delete(self.project, last=_revision(entry))

    async def current(self) -> dict[str, Any] | None:
        """The lease entry as stored (`holder`, `acquiredAt`, `epoch`, `revision`), or None if free."""
        kv = await self._bucket()
        try:
            entry = await kv.get(self.project)
        except KeyNotFoundError:
            return None
        value = _decode(entry.value)
        if value is None:
            return None
        value.setdefault("epoch", _revision(entry))
        value["revision"] = _revision(entry)
        return value

    # --- internals -------------------------------------------------------------------------

    async def _bucket(self) -> KeyValue:
        if self._kv is None:
            self._kv, self.ttl_s = await open_lease_bucket(self.resources, self.ttl_s, self.bucket, self.replicas)
        return self._kv

    async def _acquire(self, kv: KeyValue) -> int | None:
        sent = _now()
        acquired_at = utc_now()
        value = orjson.dumps({"holder": self.holder, "acquiredAt": acquired_at})
        previous = self._pending_create
        self._pending_create = (value, sent)
        try:
            revision = await kv.create(self.project, value)
        except (KeyWrongLastSequenceError, KeyNotFoundError):
            # Someone's entry is there (or vanished mid-call). Ours, if a create of ours had timed out?
            self._pending_create = previous
            return await self._adopt_pending_create(kv)
        except TRANSIENT as e:
            log.warning("lease %s acquire failed: %r", self.project, e)
            self._reopen_if_gone(e)
            return None
        self._pending_create = None
        self._start_term(revision, revision, acquired_at, sent)
        log.info("lease %s acquired by %s, epoch %s", self.project, self.holder, revision)
        return revision

    async def _adopt_pending_create(self, kv: KeyValue) -> int | None:
        pending = self._pending_create
        if pending is None:
            return None
        try:
            entry = await kv.get(self.project)
        except KeyNotFoundError:
            self._pending_create = None
            return None
        except TRANSIENT:
            return None
        value, sent = pending
        if entry.value != value:
            if _now() >= sent + self.ttl_s:
                self._pending_create = None  # it would have expired by now anyway
            return None
        self._pending_create = None
        epoch = _revision(entry)
        decoded = _decode(entry.value) or {}
        self._start_term(epoch, epoch, str(decoded.get("acquiredAt", "")), sent)
        log.info("lease %s: adopted our own create, epoch %s", self.project, epoch)
        return epoch

    async def _renew(self, kv: KeyValue) -> int | None:
        epoch = self._epoch
        assert epoch is not None
        sent = _now()
        value = orjson.dumps(
            {"holder": self.holder, "acquiredAt": self._acquired_at, "epoch": epoch, "renewedAt": utc_now()}
        )
        self._pending_renewals.append(sent)
        try:
            revision = await kv.update(self.project, value, last=self._revision)
        except KeyWrongLastSequenceError:
            self._pending_renewals.pop()  # this attempt definitely did not apply
            return await self._after_cas_failure(kv, epoch)
        except TRANSIENT as e:
            log.warning("lease %s renew failed (epoch %s): %r", self.project, epoch, e)
            self._reopen_if_gone(e)
            return self.epoch
        self._pending_renewals.clear()
        self._revision = revision
        self._valid_until = sent + self.ttl_s
        return epoch

    async def _after_cas_failure(self, kv: KeyValue, epoch: int) -> int | None:
        """Our CAS failed: either a renewal of ours with unknown outcome landed, or we lost."""
        if self._pending_renewals:
            try:
                entry = await kv.get(self.project)
            except KeyNotFoundError:
                entry = None
            except TRANSIENT:
                return self.epoch  # cannot tell yet; local validity decides
            if entry is not None and self._entry_epoch(entry, epoch) == epoch:
                # Count from the earliest unknown renewal: the most conservative expiry.
                self._valid_until = max(self._valid_until, self._pending_renewals[0] + self.ttl_s)
                self._revision = _revision(entry)
                self._pending_renewals.clear()
                log.info("lease %s: adopted our own renewal at revision %s", self.project, entry.revision)
                return self.epoch
        log.warning("lease %s lost by %s (epoch %s): entry changed under us", self.project, self.holder, epoch)
        self._lose()
        return None

    def _reopen_if_gone(self, err: BaseException) -> None:
        """No responders: the bucket's stream is gone (an operator deleted it). Open, and so
        create, it again on the next attempt rather than fail forever."""
        if isinstance(err, nats.errors.NoRespondersError | nats.js.errors.NoStreamResponseError):
            self.resources.forget_kv(self.bucket)
            self._kv = None

    def _entry_epoch(self, entry: KeyValue.Entry, epoch: int) -> int | None:
        """The entry's epoch if it is one of ours for `epoch`'s term, else None."""
        value = _decode(entry.value)
        if value is None or value.get("holder") != self.holder:
            return None
        found = value.get("epoch", _revision(entry))
        return epoch if found == epoch else None

    def _start_term(self, epoch: int, revision: int, acquired_at: str, sent: float) -> None:
        self._epoch = epoch
        self._revision = revision
        self._acquired_at = acquired_at
        self._valid_until = sent + self.ttl_s
        self._pending_renewals.clear()

    def _lose(self) -> None:
        self._epoch = None
        self._revision = 0
        self._valid_until = 0.0
        self._pending_renewals.clear()


class LeaderElector:
    """Keeps trying to lead a set of projects: acquires free leases, renews held ones every ttl/3.

    `on_elected(project, epoch)` and `on_deposed(project)` (plain or async functions) run in the
    loop, in order, after each round; keep them quick (start a task, do not schedule inline).
    `stop()` reports every held project as deposed: a stopped elector renews nothing, so its
    process must stop acting as leader even if the entries have not lapsed yet.
    """

    def __init__(
        self,
        js: JetStreamContext | JetStreamResources,
        holder: str,
        projects: Iterable[str] = (),
        *,
        ttl_s: float = DEFAULT_TTL_S,
        on_elected: ElectedCallback | None = None,
        on_deposed: DeposedCallback | None = None,
        bucket: str = LEASE_BUCKET,
        replicas: int = 1,
    ) -> None:
        self.resources = resources_of(js)  # shared with its leases: the bucket is declared once
        self.js = self.resources.js
        self.holder = holder
        self.ttl_s = ttl_s
        self.bucket = bucket
        self.replicas = replicas
        self.on_elected = on_elected
        self.on_deposed = on_deposed
        self._kv: KeyValue | None = None
        self._leases: dict[str, LeaderLease] = {}
        self._leaders: dict[str, int] = {}
        self._cond = asyncio.Condition()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._round_lock = asyncio.Lock()
        self._foreign: dict[str, tuple[str, int]] = {}  # project -> (holder, revision) of others' entries
        self._strikes: dict[str, int] = {}  # foreign holder -> "no responders" in a row
        self._alive_sub: Any = None
        self._probe_task: asyncio.Task[None] | None = None
        self.rounds = 0
        for p in projects:
            self.add_project(p)

    # --- state -----------------------------------------------------------------------------

    @property
    def interval(self) -> float:
        return self.ttl_s / 3

    @property
    def leaders(self) -> dict[str, int]:
        """Projects this elector currently leads, with their epochs (as of the last round)."""
        return dict(self._leaders)

    def epoch(self, project: str) -> int | None:
        """The epoch to stamp on decisions for `project`, or None if not (or no longer) leader."""
        lease = self._leases.get(project)
        if lease is None or project not in self._leaders:
            return None
        return lease.epoch

    def is_leader(self, project: str) -> bool:
        return self.epoch(project) is not None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    # --- membership ------------------------------------------------------------------------

    def add_project(self, project: str) -> None:
        """Compete for `project` from the next round (which starts at once if running)."""
        if project not in self._leases:
            self._leases[project] = LeaderLease(
                self.resources, project, self.holder, self.ttl_s, bucket=self.bucket, kv=self._kv,
                replicas=self.replicas,
            )
            self._wake.set()

    async def remove_project(self, project: str) -> None:
        """Stop competing for `project`, releasing its lease if held."""
        async with self._round_lock:
            lease = self._leases.pop(project, None)
            await self._transition(project, None)  # stop deciding first, then give the lease up
            if lease is not None:
                with contextlib.suppress(*TRANSIENT):
                    await lease.release()

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        if self.running:
            return
        await self._open()
        self._alive_sub = await self.js._nc.subscribe(alive_subject(self.holder), cb=_answer)
        self._task = asyncio.create_task(self._loop(), name=f"weft-leader-{self.holder}")
        self._watch_task = asyncio.create_task(self._watch(), name=f"weft-lease-watch-{self.holder}")
        self._probe_task = asyncio.create_task(self._probe(), name=f"weft-lease-probe-{self.holder}")

    async def stop(self, release: bool = True) -> list[str]:
        """Stop the loop. With `release`, give up held leases so others take over at once;
        without (a simulated crash), they lapse after the TTL.

        Every held project is reported deposed first (its scheduler stops deciding), and only
        then released: a successor never overlaps a term of ours that is still deciding."""
        task, self._task = self._task, None
        watch, self._watch_task = self._watch_task, None
        probe, self._probe_task = self._probe_task, None
        sub, self._alive_sub = self._alive_sub, None
        if sub is not None:
            with contextlib.suppress(*TRANSIENT):
                await sub.unsubscribe()
        for t in (task, watch, probe):
            await cancel_and_wait(t)
        async with self._round_lock:
            for project in list(self._leases):
                await self._transition(project, None)
            return await self.release_all() if release else []

    async def release_all(self) -> list[str]:
        """CAS-delete every lease entry this elector holds (its own revision only); returns the
        projects released. Call with the loop stopped, or the next round acquires them again."""
        held = [(p, lease) for p, lease in self._leases.items() if lease._epoch is not None]
        results = await asyncio.gather(*(lease.release() for _p, lease in held), return_exceptions=True)
        released = []
        for (project, _lease), result in zip(held, results, strict=True):
            if isinstance(result, BaseException):
                log.warning("lease %s: release failed (it lapses after the TTL): %r", project, result)
            else:
                released.append(project)
                log.info("lease %s released by %s", project, self.holder)
        return released

    async def run_once(self) -> None:
        """One round: acquire or renew every project's lease (concurrently), then report changes."""
        await self._open()
        async with self._round_lock:
            projects = list(self._leases.items())
            results = await asyncio.gather(
                *(self._attempt(lease) for _p, lease in projects),
                return_exceptions=True,
            )
            for (project, lease), result in zip(projects, results, strict=True):
                if isinstance(result, BaseException):
                    if not isinstance(result, TRANSIENT):
                        log.error("lease %s: unexpected error", project, exc_info=result)
                    else:
                        log.warning("lease %s: %r", project, result)
                await self._transition(project, lease.epoch)
            self.rounds += 1
        async with self._cond:
            self._cond.notify_all()

    # --- awaiting transitions (tests, startup) ---------------------------------------------

    async def wait_until(self, predicate: Callable[[], bool], timeout: float | None = None) -> None:
        """Wait, bounded by `timeout`, until `predicate()` holds after some round."""
        async with asyncio.timeout(timeout), self._cond:
            await self._cond.wait_for(predicate)

    async def wait_elected(self, project: str, timeout: float | None = None) -> int:
        await self.wait_until(lambda: project in self._leaders, timeout)
        return self._leaders[project]

    async def wait_deposed(self, project: str, timeout: float | None = None) -> None:
        await self.wait_until(lambda: project not in self._leaders, timeout)

    # --- internals -------------------------------------------------------------------------

    async def _open(self) -> None:
        if self._kv is None:
            self._kv, self.ttl_s = await open_lease_bucket(self.resources, self.ttl_s, self.bucket, self.replicas)
            for lease in self._leases.values():
                lease._kv, lease.ttl_s = self._kv, self.ttl_s

    async def _attempt(self, lease: LeaderLease) -> int | None:
        # The lease's coroutine is made here, inside the task: a round cancelled before its tasks
        # start leaves no never-awaited coroutine behind.
        return await asyncio.wait_for(lease.acquire_or_renew(), timeout=self.interval)

    async def _watch(self) -> None:
        """Start a round as soon as a lease we compete for is deleted or purged (a holder released
        it), instead of at the next interval; and note who holds the others, for `_probe`. Best
        effort: the rounds go on without it."""
        while self._task is not None:
            watcher = None
            try:
                await self._open()
                assert self._kv is not None
                watcher = await self._kv.watchall()
                async for entry in watcher:
                    if entry is None:
                        continue
                    if entry.operation not in ("DEL", "PURGE"):
                        holder = (_decode(entry.value) or {}).get("holder")
                        if isinstance(holder, str) and holder != self.holder:
                            self._foreign[entry.key] = (holder, _revision(entry))
                        else:
                            self._foreign.pop(entry.key, None)
                        continue
                    self._foreign.pop(entry.key, None)
                    if entry.key in self._leases and entry.key not in self._leaders:
                        log.debug("lease %s released by its holder: campaigning now", entry.key)
                        self._wake.set()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.debug("lease bucket watch failed: %r; retrying", e)
            finally:
                if watcher is not None:
                    with contextlib.suppress(Exception):
                        await watcher.stop()  # type: ignore[no-untyped-call]
            await asyncio.sleep(self.interval)  # back off a failing watch; rounds continue meanwhile

    async def _probe(self) -> None:
        """Release the leases of foreign holders whose NATS connection is gone (module docstring)."""
        while self._task is not None:
            await asyncio.sleep(PROBE_S)
            wanted = {p: hr for p, hr in self._foreign.items() if p in self._leases and p not in self._leaders}
            holders = {holder for holder, _rev in wanted.values()}
            self._strikes = {h: n for h, n in self._strikes.items() if h in holders}
            for holder in holders:
                try:
                    await self.js._nc.request(alive_subject(holder), b"", timeout=PROBE_S)
                    self._strikes[holder] = 0
                except nats.errors.NoRespondersError:
                    self._strikes[holder] = self._strikes.get(holder, 0) + 1
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # a timeout or our own connection trouble: tells nothing
                    log.debug("lease probe of %s: %r", holder, e)
                if self._strikes.get(holder, 0) >= PROBE_STRIKES:
                    self._strikes[holder] = 0
                    await self._release_dead(holder, [(p, rev) for p, (h, rev) in wanted.items() if h == holder])

    async def _release_dead(self, holder: str, entries: list[tuple[str, int]]) -> None:
        assert self._kv is not None
        for project, revision in entries:
            try:
                await self._kv.delete(project, last=revision)  # only the entry we saw: a renewal wins
            except TRANSIENT as e:  # a wrong last sequence (the holder renewed) is a nats.errors.Error
                log.debug("lease %s: release of %s's entry failed: %r", project, holder, e)
                continue
            log.warning("lease released: holder %s is gone from NATS (%d probes without responders)",
                        holder, PROBE_STRIKES, extra={"project": project})

    async def _loop(self) -> None:
        while self._task is not None:  # stop() clears it: the loop ends even if a cancel were lost
            self._wake.clear()
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("leader election round failed")
            # Jitter spreads the renewals of many replicas; the wake event starts a round early.
            delay = self.interval * random.uniform(0.85, 1.0)
            await wait_event(self._wake, delay)

    async def _transition(self, project: str, epoch: int | None) -> None:
        old = self._leaders.get(project)
        if old == epoch:
            return
        if old is not None:
            del self._leaders[project]
            log.info("%s deposed from %s (epoch %s)", self.holder, project, old)
            await self._call(self.on_deposed, project)
        if epoch is not None:
            self._leaders[project] = epoch
            log.info("%s elected for %s (epoch %s)", self.holder, project, epoch)
            await self._call(self.on_elected, project, epoch)
        async with self._cond:
            self._cond.notify_all()

    async def _call(self, callback: Callable[..., Any] | None, *args: Any) -> None:
        if callback is None:
            return
        try:
            result = callback(*args)
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("leader callback %s%r failed", getattr(callback, "__name__", callback), args)


def _now() -> float:
    return asyncio.get_running_loop().time()


async def _answer(msg: Any) -> None:
    with contextlib.suppress(*TRANSIENT):
        await msg.respond(b"")


def _revision(entry: KeyValue.Entry) -> int:
    return int(entry.revision or 0)


def _decode(raw: bytes | None) -> dict[str, Any] | None:
    if not raw:
        return None
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None
