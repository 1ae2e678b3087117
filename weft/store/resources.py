"""The JetStream resources weft declares: streams, KV buckets and object stores, each declared once
and cached here, whoever uses it.

Declaring is create-if-absent with the owner's config; a resource that exists is used as it is (its
config is neither compared nor updated: an owner that depends on a property checks what it got, as
`weft.store.lease` does with the lease bucket's TTL). The configs are the owners': the project
streams `weft.store.eventstore`'s, the lease bucket `weft.store.lease`'s, the snapshot bucket
`weft.store.snapshots`'s. Each kind keeps the creation it always had:

- a **stream** is added; "already in use" (another replica created it first) is fine;
- a **KV bucket** is looked up, created if missing, and looked up again if the creation was refused
  (created concurrently by another replica, perhaps with another TTL);
- an **object store** is looked up and created if missing.

Once declared, asking again costs a set or dict lookup (appends ask for their stream every time).
When the server says a resource vanished (an operator deleted it), its owner calls `forget_stream`,
`forget_kv` or `forget_object_store`: the next use declares, and so creates, it again. Nothing here
decides that a resource vanished.

Not here: Warp's registry bucket and work-queue streams (`weft.runtime.warp_bridge`), bound and
created with Warp's configs.
"""

from __future__ import annotations

import asyncio

import nats.js.errors
from nats.js import JetStreamContext, api
from nats.js.errors import BadRequestError, BucketNotFoundError
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore


class JetStreamResources:
    """The streams, KV buckets and object stores declared through one JetStream context."""

    def __init__(self, js: JetStreamContext) -> None:
        self.js = js
        self._streams: set[str] = set()
        self._kvs: dict[str, KeyValue] = {}
        self._object_stores: dict[str, ObjectStore] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    def _lock(self, kind: str, name: str) -> asyncio.Lock:
        """One declaration of a resource at a time: concurrent first uses wait for it."""
        return self._locks.setdefault((kind, name), asyncio.Lock())

    # --- streams ---------------------------------------------------------------------------

    def knows_stream(self, name: str) -> bool:
        """Declared (or seen) through these resources and not forgotten since."""
        return name in self._streams

    async def stream(self, config: api.StreamConfig) -> None:
        """Declare the stream `config.name` (once)."""
        name = config.name or ""
        if name in self._streams:
            return
        async with self._lock("stream", name):
            if name in self._streams:
                return
            try:
                await self.js.add_stream(config)
            except nats.js.errors.BadRequestError as err:
                # Created concurrently by another replica with the same config: fine.
                if "already in use" not in str(err.description or ""):
                    raise
            self._streams.add(name)

    async def stream_exists(self, name: str) -> bool:
        """Whether the stream exists (asking the server unless known). Looking does not create."""
        if name in self._streams:
            return True
        try:
            await self.js.stream_info(name)
        except nats.js.errors.NotFoundError:
            return False
        self._streams.add(name)
        return True

    def stream_seen(self, name: str) -> None:
        """The server listed the stream: declaring it later costs nothing."""
        self._streams.add(name)

    def forget_stream(self, name: str) -> None:
        self._streams.discard(name)

    # --- KV buckets ------------------------------------------------------------------------

    async def kv(self, config: api.KeyValueConfig) -> KeyValue:
        """The KV bucket `config.bucket`, declared (once) with `config` if missing."""
        bucket = config.bucket
        kv = self._kvs.get(bucket)
        if kv is not None:
            return kv
        async with self._lock("kv", bucket):
            kv = self._kvs.get(bucket)
            if kv is not None:
                return kv
            try:
                kv = await self.js.key_value(bucket)
            except BucketNotFoundError:
                try:
                    kv = await self.js.create_key_value(config)
                except BadRequestError:  # created concurrently by another replica, perhaps with another TTL
                    kv = await self.js.key_value(bucket)
            self._kvs[bucket] = kv
            return kv

    def forget_kv(self, bucket: str) -> None:
        self._kvs.pop(bucket, None)

    # --- object stores ---------------------------------------------------------------------

    async def object_store(self, config: api.ObjectStoreConfig) -> ObjectStore:
        """The object store `config.bucket`, declared (once) with `config` if missing."""
        bucket = config.bucket or ""
        store = self._object_stores.get(bucket)
        if store is not None:
            return store
        async with self._lock("object_store", bucket):
            store = self._object_stores.get(bucket)
            if store is not None:
                return store
            try:
                store = await self.js.object_store(bucket)
            except nats.js.errors.BucketNotFoundError:
                store = await self.js.create_object_store(bucket, config=config)
            self._object_stores[bucket] = store
            return store

    def forget_object_store(self, bucket: str) -> None:
        self._object_stores.pop(bucket, None)


def resources_of(js: JetStreamContext | JetStreamResources) -> JetStreamResources:
    """`js` itself, or resources of their own for a bare context (a cache of its own, as each of
    the store, the snapshots and the leases always had)."""
    return js if isinstance(js, JetStreamResources) else JetStreamResources(js)
