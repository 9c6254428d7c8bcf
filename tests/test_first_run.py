"""A new machine's first commands: whether a store exists is told without creating
anything."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

import psycopg

from trioagg.settings import Settings
from trioagg.store import open_store, store_exists

from .conftest import fresh_schema, sql


async def test_whether_a_store_exists_is_told_without_creating_anything(
    tmp_path: Path, postgres_dsn: str
) -> None:
    missing = tmp_path / "no" / "trioagg.db"
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    other = tmp_path / "other.db"
    with contextlib.closing(sqlite3.connect(other)) as conn:
        conn.execute("CREATE TABLE notes (text TEXT)")
    for path in (missing, empty, other):
        assert not await store_exists(Settings(db=str(path)))
    assert not missing.parent.exists() and empty.read_bytes() == b""
    assert sql(other, "SELECT name FROM sqlite_master") == [("notes",)]

    schema, url = fresh_schema(postgres_dsn)
    try:
        assert not await store_exists(Settings(db=url))
        tables = f"SELECT table_name FROM information_schema.tables WHERE table_schema = '{schema}'"
        assert sql(url, tables) == []
        for db in (str(tmp_path / "made.db"), url):
            await (await open_store(Settings(db=db))).aclose()
            assert await store_exists(Settings(db=db))
    finally:
        with psycopg.connect(postgres_dsn, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")
