"""Stores: where rollups are kept. ``open_store`` picks the backend from ``--db``."""

from __future__ import annotations

import fnmatch
import functools

from ..settings import Settings
from .base import Backend, CommitResult, KeyInfo, Row, Store, WritePolicy
from .sqlite import SQLiteBackend

__all__ = [
    "Backend",
    "CommitResult",
    "KeyInfo",
    "Row",
    "SQLiteBackend",
    "Store",
    "WritePolicy",
    "open_store",
]


def write_policy(settings: Settings) -> WritePolicy:
    """The writer's view of the settings."""
    patterns = settings.quantiles

    @functools.lru_cache(maxsize=65536)
    def keeps_quantiles(key: str) -> bool:
        return any(fnmatch.fnmatchcase(key, pattern) for pattern in patterns)

    return WritePolicy(settings.bucket, settings.dedup_window, keeps_quantiles)


async def open_store(settings: Settings) -> Store:
    """Open (creating if needed) the store named by ``settings.db``."""
    backend = SQLiteBackend(settings.db, settings.sync)
    return await Store.open(
        backend,
        policy=write_policy(settings),
        readers=settings.readers,
        busy_timeout=settings.busy_timeout,
    )
