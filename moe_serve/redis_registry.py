"""Registry shared through a Redis server.

Workers write `<prefix>workers:<id>` (a JSON WorkerRecord) with a TTL and refresh it on a
heartbeat; an entry whose worker stops heartbeating expires by itself. Every change is announced
on the `<prefix>events` channel, which routers subscribe to; they re-read the entries on each
announcement and, as a slow safety net for silent expiries, once per half TTL.
When Redis is unreachable both sides keep their last state and retry with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from moe_serve.registry import Registry, WorkerRecord

logger = logging.getLogger(__name__)

DEFAULT_TTL_S = 10.0


def worker_key(prefix: str, worker_id: str) -> str:
    return f"{prefix}workers:{worker_id}"


def events_channel(prefix: str) -> str:
    return f"{prefix}events"


class _OutageLog:
    """Logs a Redis outage once when it starts and once when it ends, never per attempt."""

    def __init__(self, what: str) -> None:
        self.what, self.down = what, False

    def failed(self, error: Exception) -> None:
        if not self.down:
            logger.warning("%s: Redis unreachable (%s); keeping the last known state and retrying", self.what, error)
            self.down = True

    def recovered(self) -> None:
        if self.down:
            logger.info("%s: Redis reachable again", self.what)
            self.down = False


class RedisRegistry(Registry):
    """Router-side view of the workers registered in Redis."""

    def __init__(self, url: str, prefix: str, ttl_s: float = DEFAULT_TTL_S) -> None:
        super().__init__()
        self.url, self.prefix, self.ttl_s = url, prefix, ttl_s
        self._client = aioredis.Redis.from_url(url)
        self._task: asyncio.Task[None] | None = None
        self._outage = _OutageLog(f"registry watcher ({url})")

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._follow(), name="redis-registry-watch")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._client.aclose()

    async def refresh(self) -> bool:
        """Re-read every registered worker; False (state kept) when Redis is unreachable."""
        try:
            keys = [key async for key in self._client.scan_iter(match=worker_key(self.prefix, "*"), count=500)]
            values = await self._client.mget(keys) if keys else []
        except (RedisError, OSError) as error:
            self._outage.failed(error)
            return False
        self._outage.recovered()
        records = []
        for value in values:
            if value is None:  # expired between SCAN and MGET
                continue
            try:
                records.append(WorkerRecord.from_json(value))
            except (ValueError, KeyError, TypeError) as error:
                logger.warning("registry: ignoring a malformed worker entry: %s", error)
        self._replace_all(records)
        return True

    async def _follow(self) -> None:
        backoff = 0.1
        while True:
            pubsub = self._client.pubsub()
            try:
                await pubsub.subscribe(events_channel(self.prefix))
                await self.refresh()  # catch up on what happened while not subscribed
                backoff = 0.1
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=self.ttl_s / 2)
                    await self.refresh()
                    if message is None:
                        continue
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as error:
                self._outage.failed(error)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.ttl_s / 2)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()


class RedisRegistration:
    """Worker-side: keeps one WorkerRecord registered in Redis while the worker lives."""

    def __init__(self, url: str, prefix: str, record: WorkerRecord, ttl_s: float = DEFAULT_TTL_S) -> None:
        self.url, self.prefix, self.record, self.ttl_s = url, prefix, record, ttl_s
        self._client = aioredis.Redis.from_url(url)
        self._task: asyncio.Task[None] | None = None
        self._outage = _OutageLog(f"worker {record.worker_id} registration ({url})")

    async def start(self) -> None:
        await self._write()
        self._task = asyncio.create_task(self._heartbeat(), name="redis-registration-heartbeat")

    async def stop(self) -> None:
        """Deregister now, so routers stop sending work before the TTL would expire."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        try:
            await self._client.delete(worker_key(self.prefix, self.record.worker_id))
            await self._client.publish(events_channel(self.prefix), f"deregister {self.record.worker_id}")
        except (RedisError, OSError) as error:
            logger.warning(
                "could not deregister %s from Redis (%s); its entry expires in %.0f s",
                self.record.worker_id,
                error,
                self.ttl_s,
            )
        await self._client.aclose()

    async def _write(self) -> bool:
        key = worker_key(self.prefix, self.record.worker_id)
        try:
            # SET ... GET tells whether the entry existed: announce only new registrations
            previous = await self._client.set(key, self.record.to_json(), px=max(100, int(self.ttl_s * 1000)), get=True)
            if previous is None:
                await self._client.publish(events_channel(self.prefix), f"register {self.record.worker_id}")
        except (RedisError, OSError) as error:
            self._outage.failed(error)
            return False
        self._outage.recovered()
        return True

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.ttl_s / 3)
            await self._write()
