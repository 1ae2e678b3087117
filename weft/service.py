"""One weft replica: NATS connection, event store, live projections, commands and the HTTP server.

Shutdown (`WeftService.shutdown`, what SIGTERM runs):
1. not ready at once: `/health/ready` answers 503 "draining" (`begin_drain`);
2. still serving for `WEFT_DRAIN_S`, so the load balancer notices (a second signal cuts it short);
3. the HTTP server stops: listener closed, aiohttp's on_shutdown hooks run (WebSockets close with
   going-away), in-flight requests finish (bounded by `HTTP_SHUTDOWN_TIMEOUT_S`);
4. the schedulers stop deciding and the leases this replica holds are released (a CAS delete of
   its own revision), so another replica's elector, watching the bucket, takes over at once;
5. the rest stops: Warp bridge, agent gateway, liveness, projections, the NATS connection; the last
   spans are flushed to the OTLP endpoint (weft.tracing), if one is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import uuid

import nats
import nats.errors
from aiohttp import web
from nats.aio.client import Client as NATS

from weft.api import create_app
from weft.api.auth import TokenRegistry
from weft.api.common import Services
from weft.api.health import Lifecycle
from weft.api.httpserver import AppRunner
from weft.commands import Commands, RetryPolicy
from weft.core.access import TokenFileError
from weft.core.routing import DEFAULT_POLICY, load_policy
from weft.core.spinup_policy import PolicyFileError
from weft.metrics import Metrics
from weft.runtime.fleet_executor import FleetConfig
from weft.runtime.gateway import AgentGateway, Liveness, Pusher
from weft.runtime.scheduler import SchedulerConfig, SchedulerHost
from weft.runtime.warp_bridge import WarpBridge
from weft.settings import Settings, SettingsError
from weft.spinup import Mechanism, build_mechanisms
from weft.spinup.policy import PolicyFile
from weft.store import connection
from weft.store.eventstore import EventStore
from weft.store.natsauth import NatsAuth, redact_url, strip_url_credentials
from weft.store.readmodel import ReadModel
from weft.store.resources import JetStreamResources
from weft.store.snapshots import SnapshotStore
from weft.tracing import Tracing

log = logging.getLogger("weft.service")

# Room for an event's envelope (ids, actor, correlation id, timestamps) and its NATS headers.
EVENT_ENVELOPE_BYTES = 16 * 1024
HTTP_SHUTDOWN_TIMEOUT_S = 10.0  # how long in-flight requests may take to finish at shutdown


async def connect_nats(settings: Settings, url: str, *, connect_timeout_s: float = 30.0) -> NATS:
    """Connect, retrying until `connect_timeout_s`, then reconnect forever once connected."""
    try:
        auth = NatsAuth.from_env({**settings.nats_env, "NATS_URL": url})
    except ValueError as err:
        raise SettingsError(str(err)) from None

    conn: list[NATS] = []

    async def on_disconnect() -> None:
        if conn and conn[0].is_closed:  # our own close at shutdown
            log.info("nats connection closed")
        else:
            log.warning("nats disconnected")

    async def on_reconnect() -> None:
        log.info("nats reconnected")

    async def on_error(err: Exception) -> None:
        log.warning("nats error: %s", err)

    loop = asyncio.get_running_loop()
    deadline = loop.time() + connect_timeout_s
    delay = 0.2
    while True:
        try:
            nc = await connection.connect(
                url,
                auth=auth,
                user=settings.nats_user,
                password=settings.nats_pass,
                name=f"weft-{settings.replica_name}",
                **connection.RECONNECT_FOREVER,
                disconnected_cb=on_disconnect,
                reconnected_cb=on_reconnect,
                error_cb=on_error,
            )
            conn.append(nc)
            return nc
        except (OSError, nats.errors.NoServersError, TimeoutError) as err:
            if loop.time() + delay > deadline:
                raise ConnectionError(f"cannot reach NATS at {redact_url(url)}: {err}") from err
            log.warning("NATS at %s not reachable yet (%s); retrying", redact_url(url), err)
            await asyncio.sleep(delay)  # bounded backoff on startup only
            delay = min(delay * 2, 2.0)


class WeftService:
    def __init__(self, settings: Settings, mechanisms: dict[str, Mechanism] | None = None) -> None:
        self.settings = settings
        self.nc: NATS | None = None
        self.resources: JetStreamResources | None = None  # what its store and snapshots declare on the server
        self.readmodel: ReadModel | None = None
        self.commands: Commands | None = None
        self.app: web.Application | None = None
        self._runner: web.AppRunner | None = None
        self.policy = load_policy(settings.routing_policy) if settings.routing_policy else DEFAULT_POLICY
        self.mechanisms: dict[str, Mechanism] = mechanisms if mechanisms is not None else build_mechanisms()
        self.liveness: Liveness | None = None
        self.gateway: AgentGateway | None = None
        self.scheduler: SchedulerHost | None = None
        self.warp: WarpBridge | None = None
        self.port: int | None = None
        self.lifecycle = Lifecycle()
        self.released: list[str] = []  # projects whose leases the last stop() released
        self.metrics = Metrics(replica=settings.replica_name, enabled=settings.metrics)  # this replica's own registry (GET /metrics)
        # OTLP traces when OTEL_EXPORTER_OTLP_ENDPOINT is set, else OpenTelemetry's no-op
        self.tracing = Tracing(replica=settings.replica_name, endpoint=settings.otlp_traces_endpoint)

    async def start(self, nats_url: str, *, serve_http: bool = True) -> None:
        if serve_http:
            problem = self.settings.exposure_problem()
            if problem is not None:
                raise SettingsError(problem)
            if self.settings.insecure and not self.settings.auth_enabled:
                log.warning("INSECURE: serving an open API (no tokens) on a reachable address; anyone who can "
                            "reach it can run commands through weft", extra={"host": self.settings.api_host})
        try:
            tokens = TokenRegistry(self.settings.api_tokens, self.settings.tokens_file)
        except TokenFileError as err:
            raise SettingsError(f"WEFT_TOKENS_FILE: {err}") from None
        try:
            spinup_policy = PolicyFile(self.settings.spinup_policy_file)
        except PolicyFileError as err:
            raise SettingsError(f"WEFT_SPINUP_POLICY_FILE: {err}") from None
        self.nc = await connect_nats(self.settings, nats_url)
        self._fit_body_limit(self.nc.max_payload)
        self.resources = JetStreamResources(self.nc.jetstream())
        store = EventStore(
            self.resources,
            replicas=self.settings.stream_replicas,
            group_commit_after=self.settings.group_commit_after,
            publish_timeout_s=self.settings.publish_timeout_s,
            metrics=self.metrics,
        )
        snapshots = SnapshotStore(self.resources, replicas=self.settings.stream_replicas)
        self.readmodel = ReadModel(store, snapshots=snapshots, snapshot_every=self.settings.snapshot_every,
                                   snapshot_encode=self.settings.snapshot_encode)
        self.readmodel.on_attach.append(self.metrics.listen)
        await self.readmodel.start()
        self.commands = Commands(self.readmodel, store, metrics=self.metrics, spinup_policy=spinup_policy,
                                 tracing=self.tracing)
        self.liveness = Liveness(self.nc)
        await self.liveness.start()
        retry = RetryPolicy(base_ms=self.settings.retry_base_ms)
        self.gateway = AgentGateway(
            self.nc, self.commands, self.readmodel, self.liveness, heartbeat_ms=self.settings.heartbeat_ms, retry=retry
        )
        await self.gateway.start()
        config = SchedulerConfig(
            heartbeat_ms=self.settings.heartbeat_ms,
            accept_timeout_ms=self.settings.accept_timeout_ms,
            retain_done_s=self.settings.retain_done_s,
        )
        if self.settings.warp_bridge:
            self.warp = WarpBridge(
                self.nc,
                self.commands,
                self.readmodel,
                self.liveness,
                default_project=self.settings.default_project,
                project_map=dict(self.settings.warp_project_map),
                stale_after_s=config.warp_lost_after_s,
                replicas=self.settings.stream_replicas,
            )
        self.scheduler = SchedulerHost(
            self.readmodel,
            self.commands,
            self.policy,
            self.liveness,
            Pusher(self.nc, warp_offer=self.warp.offer if self.warp else None),
            holder=f"{self.settings.replica_name}-{uuid.uuid4().hex[:8]}",
            config=config,
            lease_ttl_s=self.settings.lease_ttl_s,
            replicas=self.settings.stream_replicas,
            mechanisms=self.mechanisms,
            fleet_config=FleetConfig(
                # the whole list: agents fail over too; never weft's own user:pass@
                agent_nats_url=self.settings.agent_nats_url or strip_url_credentials(nats_url),
                agent_nats_env=NatsAuth.from_env({**self.settings.nats_env, "NATS_URL": nats_url}).agent_env(),
                idle_timeout_ms=self.settings.idle_timeout_ms,
                max_crashes=self.settings.max_spinup_crashes,
            ),
        )
        await self.scheduler.start()
        readmodel = self.readmodel
        self.metrics.watch(lambda: readmodel.views, self.scheduler.leading)
        await self.metrics.start()
        if self.warp is not None:
            await self.warp.start()  # watches in the background; an empty or absent bucket never blocks
        self.app = create_app(
            Services(
                self.settings,
                self.readmodel,
                self.commands,
                self.policy,
                retry,
                mechanisms=self.mechanisms,
                leading=self.scheduler.leading,
                metrics=self.metrics,
                tracing=self.tracing,
            ),
            self.lifecycle,
            tokens=tokens,
        )
        if serve_http:
            self._runner = AppRunner(
                self.app, access_log=None, handle_signals=False, shutdown_timeout=HTTP_SHUTDOWN_TIMEOUT_S
            )
            await self._runner.setup()
            site = web.TCPSite(self._runner, self.settings.api_host, self.settings.api_port, backlog=1024)
            await site.start()
            sockets = getattr(site._server, "sockets", None) or []
            self.port = sockets[0].getsockname()[1] if sockets else self.settings.api_port
            log.info("weft serving", extra={"host": self.settings.api_host, "port": self.port})
        await self.readmodel.wait_ready(timeout=None)
        log.info("projections caught up", extra={"projects": len(self.readmodel.views)})

    def _fit_body_limit(self, max_payload: int) -> None:
        """A body the stream cannot hold must be a 413 at the door, never a failed append: the body
        limit stays below the server's max payload by the event envelope and headers."""
        fits = max_payload - EVENT_ENVELOPE_BYTES
        if self.settings.max_body_bytes > fits:
            log.info("request body limit lowered to fit the NATS max payload",
                     extra={"max_body_bytes": fits, "configured": self.settings.max_body_bytes, "max_payload": max_payload})
            self.settings = dataclasses.replace(self.settings, max_body_bytes=fits)

    def begin_drain(self) -> None:
        """Stop being ready (`/health/ready` answers 503 "draining"); everything else goes on."""
        if not self.lifecycle.draining:
            self.lifecycle.draining = True
            log.info("draining: not ready from now on", extra={"drain_s": self.settings.drain_s})

    async def drain(self, cut_short: asyncio.Event | None = None) -> None:
        """Not ready, still serving, for `drain_s` (less if `cut_short` is set meanwhile)."""
        self.begin_drain()
        if self.settings.drain_s > 0:
            waiter = cut_short if cut_short is not None else asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiter.wait(), self.settings.drain_s)

    async def shutdown(self, cut_short: asyncio.Event | None = None) -> None:
        """The graceful stop: `drain`, then `stop`."""
        await self.drain(cut_short)
        await self.stop()

    async def stop(self) -> None:
        """Stop at once (steps 3-5 of the module's shutdown sequence); readiness answers 503 until
        the listener closes."""
        self.begin_drain()
        runner, self._runner = self._runner, None
        if runner is not None:
            # Closes the listener, runs the app's on_shutdown hooks, lets in-flight requests finish.
            await runner.cleanup()
        if self.scheduler is not None:
            self.released = await self.scheduler.stop()  # stops deciding, then releases the leases
        if self.warp is not None:
            await self.warp.stop()
        if self.gateway is not None:
            await self.gateway.stop()
        if self.liveness is not None:
            await self.liveness.stop()
        if self.readmodel is not None:
            await self.readmodel.stop()
        if self.nc is not None:
            try:
                await asyncio.wait_for(self.nc.drain(), 5)
            except Exception:
                await self.nc.close()
        await self.metrics.stop()
        await asyncio.to_thread(self.tracing.shutdown)  # the last spans, flushed (bounded)
