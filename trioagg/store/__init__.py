"""Stores: where rollups are kept. ``open_store`` picks the backend from ``--db``."""

from __future__ import annotations

import fnmatch
import functools

from ..core.settings import Settings
from .base import Appended, Backend, KeyInfo, Row, Store, TierCut
from .plan import WritePolicy
from .sqlite import SQLiteBackend

_POSTGRES_SCHEMES = ("postgresql://", "postgres://")

__all__ = [
    "Appended",
    "Backend",
    "KeyInfo",
    "Row",
    "SQLiteBackend",
    "Store",
    "TierCut",
    "WritePolicy",
    "open_store",
    "store_exists",
]


def write_policy(settings: Settings) -> WritePolicy:
    """The writer's view of the settings."""
    patterns = settings.quantiles

    @functools.lru_cache(maxsize=65536)
    def keeps_quantiles(key: str) -> bool:
        return any(fnmatch.fnmatchcase(key, pattern) for pattern in patterns)

    return WritePolicy(settings.bucket, settings.dedup_window, keeps_quantiles, settings.tiers)


def is_postgres(db: str) -> bool:
    return db.startswith(_POSTGRES_SCHEMES)


def make_backend(settings: Settings) -> Backend:
    """The backend ``--db`` names: a ``postgresql://`` URL, or else a SQLite file."""
    if is_postgres(settings.db):
        from .postgres import PostgresBackend  # loads libpq only when it is used

        return PostgresBackend(settings.db, timeout=settings.store_timeout, tiers=settings.tiers)
    return SQLiteBackend(settings.db, settings.sync, shards=settings.writers, tiers=settings.tiers)


async def open_store(settings: Settings) -> Store:
    """Open (creating if needed) the store named by ``settings.db``."""
    return await Store.open(
        make_backend(settings),
        policy=write_policy(settings),
        writers=settings.writers,
        readers=settings.readers,
        busy_timeout=settings.busy_timeout,
    )


async def store_exists(settings: Settings) -> bool:
    """Whether ``settings.db`` holds a store, creating nothing (see :meth:`Store.exists`)."""
    return await Store.exists(make_backend(settings))
