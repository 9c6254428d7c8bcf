"""The service: the parts that outlive a request (the store, the writers, the read
cache, the key check, the StatsD receiver) and their life, from opening the store to
the drain at shutdown. It knows nothing of HTTP: :mod:`trioagg.http.app` runs it around
the ASGI lifespan, and the use cases (:mod:`trioagg.service.cases`) act on it.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import AsyncIterator

import trio

from ..core.settings import BUCKET_WIDTHS, Settings
from ..ingest.decode import Limits
from ..ingest.otlp import Streams
from ..ingest.statsd import Receiver
from ..ingest.statsd import open_socket as open_statsd_socket
from ..ingest.writer import ROLL_EVERY, Writers, purge_expired_ids, roll_tiers
from ..keys.auth import Authenticator
from ..query.readcache import ReadCache, watch_store
from ..store import Store, open_store
from .loopwatch import LongSteps, sample_loop_steps, tune_garbage_collector, watch_loop_stalls
from .metrics import Metrics

log = logging.getLogger("trioagg")

_BUCKET_NAMES = {seconds: name for name, seconds in BUCKET_WIDTHS.items()}


class Service:
    """The parts that outlive a request, and their life, which
    ``async with Service.running(settings, metrics) as service`` owns: it opens the
    store, starts the writers and the id purge in a nursery of its own, and on the
    way out stops in a fixed order (see :meth:`running`)."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        writers: Writers,
        metrics: Metrics,
        read_cache: ReadCache,
    ) -> None:
        self.settings = settings
        self.read_cache = read_cache
        self.store = store
        self.writers = writers
        self.metrics = metrics
        retention = settings.tiers.retention if settings.tiers is not None else None
        self.limits = Limits(settings.max_batch, settings.max_future, settings.max_age, retention)
        self.auth = Authenticator(settings.auth, store)
        #: The event loop's longest task steps (:mod:`trioagg.service.loopwatch`).
        self.loop_steps = LongSteps(metrics)
        #: Worker threads building big answers.
        self.answering = trio.CapacityLimiter(2)
        #: Queries holding rows read from the store, from their read to their answer:
        #: as many as can read at once and be built at once. The others wait before
        #: reading, so that the rows in memory are bounded (see the README's Limits).
        self.querying = trio.CapacityLimiter(settings.readers + 2)
        #: The StatsD receiver, with ``--statsd`` (in one process of several).
        self.statsd: Receiver | None = None
        #: Cumulative OTLP streams' last points, to turn them into deltas.
        self.otlp_streams = Streams()

    @classmethod
    @contextlib.asynccontextmanager
    async def running(
        cls, settings: Settings, metrics: Metrics, statsd_socket: socket.socket | None = None
    ) -> AsyncIterator[Service]:
        """Run the service for the body of the ``async with``; with ``--statsd``, receive
        StatsD on ``statsd_socket`` (bound by ``trioagg serve`` or its supervisor), or on
        a socket bound here. Leaving it: stop receiving StatsD and admitting
        requests, stop the purge and wait for it, close the writers' channels, drain them
        under ``drain_timeout`` (shielded from cancellation), answer what is left
        unstored, and close the store once no thread uses it. A writer that crashes
        cancels the body and the exception comes out of the ``async with``."""
        store = await open_store(settings)
        read_cache: ReadCache | None = None
        try:
            read_cache = ReadCache(
                entries=settings.read_cache_entries,
                max_bytes=settings.read_cache_bytes,
                ttl=settings.read_cache_ttl,
            )
            writers = Writers(
                store,
                metrics,
                committed=read_cache.committed if read_cache.enabled else None,
                count=settings.writers,
                batch_size=settings.batch_size,
                queue_size=settings.queue_size,
                enqueue_timeout=settings.enqueue_timeout,
                max_inflight=settings.max_inflight,
                flush_window=settings.flush_window,
                head_max=settings.head_max,
            )
            async with trio.open_nursery() as nursery:
                await nursery.start(writers.run)
                service = cls(settings, store, writers, metrics, read_cache)
                async with trio.open_nursery() as helpers:
                    interval = min(60.0, settings.dedup_window / 10)
                    helpers.start_soon(purge_expired_ids, store, interval)
                    if settings.tiers is not None:
                        helpers.start_soon(roll_tiers, store, metrics, ROLL_EVERY)
                    helpers.start_soon(watch_loop_stalls, metrics)
                    if read_cache.enabled:
                        helpers.start_soon(watch_store, store, read_cache)
                    helpers.start_soon(service.auth.record_uses)
                    if settings.auth == "auto":
                        await helpers.start(service.auth.watch_keys)
                    if settings.statsd is not None:
                        sock = statsd_socket or open_statsd_socket(settings.statsd)
                        service.statsd = Receiver(sock, writers, metrics, service.limits)
                        await helpers.start(service.statsd.run)
                        log.info("receiving StatsD on udp %s", service.statsd.address)
                    helpers.start_soon(
                        sample_loop_steps, service.loop_steps, settings.loop_step_sampling
                    )
                    tune_garbage_collector()
                    log.info(
                        "trioagg started: %s, %s buckets, %d writer(s), batch %d events, "
                        "queue %d requests, auth %s (%s)",
                        store.backend.description,
                        _BUCKET_NAMES[store.bucket],
                        settings.writers,
                        settings.batch_size,
                        settings.queue_size,
                        settings.auth,
                        _auth_state(settings.auth, required=service.auth.required),
                    )
                    try:
                        yield service
                    finally:
                        writers.accepting = False
                        helpers.cancel_scope.cancel()
                with trio.CancelScope(shield=True):
                    await service._drain()
        finally:
            if read_cache is not None:
                read_cache.clear()  # what its answers hold (flushed rollups too) goes now
            with trio.CancelScope(shield=True):
                await store.aclose()

    async def _drain(self) -> None:
        """Commit what is queued, until ``drain_timeout``, logging progress every
        :data:`DRAIN_PROGRESS_SECONDS`; then answer the rest unstored."""
        writers, timeout = self.writers, self.settings.drain_timeout
        before, queued = writers.committed_events, writers.queued()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._report_drain, before, trio.current_time() + timeout)
            drained = await writers.drain(timeout)
            nursery.cancel_scope.cancel()
        if not drained:
            log.error(
                "the drain deadline (%gs, drain_timeout) passed: the rest went unstored", timeout
            )
        log.info(
            "trioagg stopped: %d queued requests at shutdown, %d events committed while "
            "draining, %d since start",
            queued,
            writers.committed_events - before,
            writers.committed_events,
        )

    async def _report_drain(self, before: int, deadline: float) -> None:
        """Until cancelled, log what a long drain has left and done, so that an operator
        waiting for the process to exit sees it progress (or stuck on the store)."""
        while True:
            await trio.sleep(DRAIN_PROGRESS_SECONDS)
            requests, events = self.writers.waiting()
            log.info(
                "draining: %d events of %d requests still to commit, %d events committed "
                "since shutdown began, %.0fs left of drain_timeout",
                events,
                requests,
                self.writers.committed_events - before,
                max(0.0, deadline - trio.current_time()),
            )


#: How often a drain at shutdown logs its progress.
DRAIN_PROGRESS_SECONDS = 2.0


def _auth_state(mode: str, *, required: bool) -> str:
    """What the start-up log says of ``--auth``."""
    if mode == "off":
        return "keys never required"
    if required:
        return "keys required"
    return "no key yet: served without one to loopback connections only"
