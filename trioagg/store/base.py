"""The async face of a store: threads, connections, limiters and busy retries.

A :class:`Backend` speaks one database's dialect through blocking calls.
:class:`Store` runs those calls in worker threads with ``trio.to_thread``:
the single write connection behind a capacity limiter of its own (so reads
can never take the writer's thread), and reads on a fixed pool of read
connections, which also bounds how many read threads run at once. Nothing here knows SQL or HTTP.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

import trio

from ..errors import StoreBusy, StoreError
from ..rollup import Rollup, Slot

log = logging.getLogger("trioagg.store")

#: A stored row: (key, bucket start, canonical tags JSON, rollup).
Row = tuple[str, int, str, Rollup]

T = TypeVar("T")

_FIRST_BACKOFF = 0.01
_MAX_BACKOFF = 1.0


class Backend(Protocol):
    """Blocking, dialect-specific operations; every method runs in a worker thread."""

    description: str

    def connect(self, *, write: bool) -> Any:
        """Open a connection; the write connection also creates the schema."""

    def prepare(self, conn: Any, bucket: int) -> None:
        """Create the schema if needed and record ``bucket`` in a new store.
        Raises ConfigError when an existing store was created differently."""

    def upsert(self, conn: Any, rollups: dict[Slot, Rollup]) -> None:
        """Merge ``rollups`` into the stored ones in one transaction, or store nothing."""

    def fetch(self, conn: Any, keys: Sequence[str], start: int, end: int) -> list[Row]:
        """The rows of ``keys`` whose bucket starts in ``[start, end)``."""

    def ping(self, conn: Any) -> None:
        """Raise if the database cannot be reached."""

    def is_busy(self, error: Exception) -> bool:
        """Whether ``error`` means another writer holds the database's lock."""

    def close(self, conn: Any) -> None: ...


class Store:
    """A backend's connections, used from trio. Create it with :meth:`open`."""

    def __init__(
        self, backend: Backend, writer: Any, readers: list[Any], bucket: int, busy_timeout: float
    ) -> None:
        self.backend = backend
        self.bucket = bucket
        self.busy_timeout = busy_timeout
        self._writer = writer
        self._write_limiter = trio.CapacityLimiter(1)
        self._idle_send, self._idle_receive = trio.open_memory_channel[Any](len(readers))
        for conn in readers:
            self._idle_send.send_nowait(conn)
        self._readers = readers

    @classmethod
    async def open(
        cls, backend: Backend, *, bucket: int, readers: int, busy_timeout: float
    ) -> Store:
        """Connect, create or check the schema, and open ``readers`` read connections."""

        def connect_all() -> tuple[Any, list[Any]]:
            writer = backend.connect(write=True)
            try:
                backend.prepare(writer, bucket)
                return writer, [backend.connect(write=False) for _ in range(readers)]
            except BaseException:
                backend.close(writer)
                raise

        writer, conns = await trio.to_thread.run_sync(connect_all)
        return cls(backend, writer, conns, bucket, busy_timeout)

    async def write(self, rollups: dict[Slot, Rollup]) -> None:
        """Commit ``rollups`` in one transaction, retrying while the database is busy.

        Raises :class:`StoreBusy` after ``busy_timeout`` of retries and
        :class:`StoreError` for any other failure; either way nothing was stored.
        Cancellation while the transaction runs waits for it to finish.
        """
        backoff = _FIRST_BACKOFF
        deadline = trio.current_time() + self.busy_timeout
        while True:
            try:
                await self._run_write(self.backend.upsert, rollups)
                return
            except StoreError:
                raise
            except Exception as error:
                if not self.backend.is_busy(error):
                    raise StoreError(f"the transaction failed: {error}") from error
                if trio.current_time() + backoff > deadline:
                    raise StoreBusy(
                        f"the database stayed locked for {self.busy_timeout:g}s"
                    ) from error
                log.debug("database busy, retrying in %.3fs", backoff)
                await trio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF)

    async def read(self, keys: Sequence[str], start: int, end: int) -> list[Row]:
        """Rows of ``keys`` in ``[start, end)``, read on a connection of the read pool."""
        return await self._run_read(self.backend.fetch, keys, start, end)

    async def ping(self) -> None:
        """Raise if the database cannot be reached from a read connection."""
        await self._run_read(self.backend.ping)

    async def aclose(self) -> None:
        """Close every connection. Call it after the writer has stopped."""

        def close_all() -> None:
            for conn in [self._writer, *self._readers]:
                self.backend.close(conn)

        await trio.to_thread.run_sync(close_all)

    async def _run_write(self, operation: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(
            operation, self._writer, *args, limiter=self._write_limiter
        )

    async def _run_read(self, operation: Callable[..., T], *args: Any) -> T:
        conn = await self._idle_receive.receive()
        try:
            return await trio.to_thread.run_sync(operation, conn, *args)
        finally:
            self._idle_send.send_nowait(conn)
