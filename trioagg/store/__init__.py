"""Stores: where rollups are kept. ``open_store`` picks the backend from ``--db``."""

from __future__ import annotations

from ..settings import Settings
from .base import Backend, Row, Store
from .sqlite import SQLiteBackend

__all__ = ["Backend", "Row", "SQLiteBackend", "Store", "open_store"]


async def open_store(settings: Settings) -> Store:
    """Open (creating if needed) the store named by ``settings.db``."""
    backend = SQLiteBackend(settings.db, settings.sync)
    return await Store.open(
        backend,
        bucket=settings.bucket,
        readers=settings.readers,
        busy_timeout=settings.busy_timeout,
    )
