"""The health monitor: probes every instance with GET /api/version.

Probes never generate text. An instance with models marked missing (it answered
404 for them) is also asked for GET /api/tags, so that a model pulled later is
used again without waiting for the mark to expire.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import weakref
from typing import TYPE_CHECKING

import httpx

if TYPE_CHECKING:
    from ollama_pool._instance import Instance
    from ollama_pool._pool import OllamaPool

logger = logging.getLogger(__name__)

# Errors of a failed or malformed /api/tags answer.
_LISTING_ERRORS = (httpx.HTTPError, ValueError, AttributeError, KeyError, TypeError)


class HealthMonitor:
    """Probes instances from one background thread with its own event loop.

    A thread serves sync and async callers alike and never depends on a caller's
    event loop, which may close between two `asyncio.run()` calls. Healthy
    instances are probed every `interval` seconds; an ejected instance is probed
    once its ejection time has passed and then every `interval` seconds until a
    probe succeeds.

    The monitor keeps only a weak reference to its pool, so a pool dropped
    without `close()` can be garbage-collected, and the thread then ends.
    """

    def __init__(self, pool: OllamaPool, interval: float, probe_timeout: float):
        self._pool_ref = weakref.ref(pool)
        self._interval = interval
        self._probe_timeout = probe_timeout
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._stopping = False
        self._ready = threading.Event()

    @property
    def _pool(self) -> OllamaPool:
        pool = self._pool_ref()
        # `_main` holds a reference to the pool while it probes, so it is alive.
        assert pool is not None
        return pool

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(
            target=self._run, name="ollama-pool-health", daemon=True
        )
        self._thread.start()
        self._ready.wait()

    def wake(self) -> None:
        """Make the monitor re-check its schedule now, for example after an ejection."""
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None and not loop.is_closed():
            # RuntimeError: the loop closed in between.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(wake.set)

    def request_stop(self) -> None:
        """Make the thread end soon, without waiting for it."""
        self._stopping = True
        self.wake()

    def stop(self) -> None:
        """Stop the thread and close its connections; returns when both are done."""
        self.request_stop()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        self._thread = None

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._ready.set()
        timeout = httpx.Timeout(self._probe_timeout)
        async with httpx.AsyncClient(timeout=timeout, trust_env=False) as client:
            while not self._stopping:
                pool = self._pool_ref()
                if pool is None:  # Garbage-collected without close().
                    break
                due = self._due_instances(time.monotonic())
                if due:
                    await asyncio.gather(*(self._probe(client, i) for i in due))
                    continue
                delay = self._seconds_to_next(time.monotonic())
                # No reference to the pool while waiting, so it can be collected.
                del pool
                self._wake.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=delay)

    def _due_instances(self, now: float) -> list[Instance]:
        with self._pool._lock:
            return [
                instance
                for instance in self._pool.instances
                if now >= instance.next_probe_at
                and (instance.healthy or now >= instance.ejected_until)
            ]

    def _seconds_to_next(self, now: float) -> float:
        with self._pool._lock:
            times = [
                max(instance.next_probe_at, instance.ejected_until)
                if not instance.healthy
                else instance.next_probe_at
                for instance in self._pool.instances
            ]
        return max(0.01, min(times, default=now + self._interval) - now)

    async def _probe(self, client: httpx.AsyncClient, instance: Instance) -> None:
        instance.next_probe_at = time.monotonic() + self._interval
        reason = ""
        try:
            response = await client.get(
                f"{instance.plain_url}/api/version", auth=instance.auth
            )
            if response.status_code != 200:
                reason = f"probe GET /api/version returned HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            reason = f"probe GET /api/version failed: {type(exc).__name__}: {exc}"
        self._pool._record_probe(instance, reason)
        if not reason and instance.missing_models:
            await self._check_models(client, instance)

    async def _check_models(
        self, client: httpx.AsyncClient, instance: Instance
    ) -> None:
        """Ask /api/tags which models `instance` has and drop stale 404 marks."""
        try:
            response = await client.get(
                f"{instance.plain_url}/api/tags", auth=instance.auth
            )
            response.raise_for_status()
            entries = response.json().get("models") or []
            # A name that is not a string would crash the monitor thread later.
            names = [
                entry["name"] for entry in entries if isinstance(entry.get("name"), str)
            ]
        except (
            httpx.HTTPError,
            ValueError,
            AttributeError,
            KeyError,
            TypeError,
        ) as exc:
            # The 404 marks stay; they expire on their own (see OllamaPool).
            logger.debug(
                "Listing the models of %s failed: %s: %s",
                instance.url,
                type(exc).__name__,
                exc,
            )
            return
        self._pool._record_models(instance, names)
