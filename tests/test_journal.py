"""The journal and the head on their own, on a real SQLite file and without a server:
whatever the interleaving of appends, flushes, failed flushes, crashes and replays by
another process, the rollups table ends up equal to the fold of the acknowledged events,
and a read (table plus head) never counts an event twice or misses one."""

from __future__ import annotations

import sqlite3
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trioagg.core.events import Point
from trioagg.core.settings import Settings
from trioagg.store import make_backend
from trioagg.store.base import JournalTaken, flush_head, journal_batch, replay_journal
from trioagg.store.head import ROW_BYTES, Head, decode_batch, encode_batch
from trioagg.store.plan import SeriesCache, WritePolicy
from trioagg.store.sql import SQLBackend
from trioagg.store.sqlite import SQLiteBackend

HOUR = 3600
POLICY = WritePolicy(HOUR, 86400.0, lambda key: False)


class FailingBackend(SQLiteBackend):
    """A real SQLite store whose next COMMIT fails on cue: before it runs (nothing
    committed) or after it ran (committed, but the caller is told it failed, as when a
    connection drops while the server commits)."""

    fail: str | None = None

    def commit(self, conn: Any) -> None:
        fail, self.fail = self.fail, None
        if fail == "before":
            raise sqlite3.OperationalError("disk I/O error (injected)")
        super().commit(conn)
        if fail == "after":
            raise sqlite3.OperationalError("connection lost after COMMIT (injected)")


def event(key: str, hour: int, value: int, event_id: str | None = None) -> Point:
    return (key, hour * HOUR + 1.0, float(value), "{}", None, event_id)


def table(conn: sqlite3.Connection) -> dict[tuple[str, int], tuple[int, float, float, float]]:
    rows = conn.execute("SELECT key, bucket, count, count * shift + s1, min, max FROM rollups")
    return {(k, b): (c, s, lo, hi) for k, b, c, s, lo, hi in rows}


def fold(events: list[Point]) -> dict[tuple[str, int], tuple[int, float, float, float]]:
    folded: dict[tuple[str, int], list[float]] = {}
    for key, ts, value, *_ in events:
        folded.setdefault((key, int(ts) // HOUR * HOUR), []).append(value)
    return {slot: (len(v), sum(v), min(v), max(v)) for slot, v in folded.items()}


def read(conn: sqlite3.Connection, heads: list[Head]) -> Counter[tuple[str, int]]:
    """Counts per slot as a read sees them: the table's, and the heads' on top."""
    counts: Counter[tuple[str, int]] = Counter()
    for (key, bucket), (count, *_) in table(conn).items():
        counts[(key, bucket)] += count
    for head in heads:
        for (key, bucket, _), rollup in head.rollups.items():
            counts[(key, bucket)] += rollup.count
    return counts


def test_a_read_during_a_rebuild_sees_the_whole_head_old_or_new() -> None:
    """A head rebuilt from its journal (another process took some of its rows): a
    read between two of the journal rows saw the head emptied and only the rows
    folded so far, missing acknowledged events for that answer."""
    head = Head()
    batches = [[event("a", 0, 1)], [event("a", 0, 2)], [event("b", 1, 3)]]
    for seq, batch in enumerate(batches):
        head.add(batch, seq, HOUR, POLICY.keeps_quantiles)
    seen = []

    def journal_rows() -> Any:
        for seq, batch in enumerate(batches):
            with head.lock:  # a read, between two rows of the rebuild
                seen.append(
                    sorted(row[:2] for row in head.overlay(["a", "b"], 0, 7200, sketches=False))
                )
            yield seq, batch

    generation = head.generation
    head.rebuild(journal_rows(), HOUR, POLICY.keeps_quantiles)
    assert seen == [[("a", 0), ("b", 3600)]] * 3
    assert head.generation == generation + 1 and head.journal == [0, 1, 2]
    assert {slot: rollup.count for slot, rollup in head.rollups.items()} == {
        ("a", 0, "{}"): 2,
        ("b", 3600, "{}"): 1,
    }
    assert (head.events, head.sketches) == (3, 0)


def test_a_journal_blob_holds_the_events_as_they_were_accepted() -> None:
    points = [event("a", 1, 5, "id-1"), ("b", 2.5, -1.0, '{"t":"x"}', "user", None)]
    assert decode_batch(encode_batch(points)) == points


events = st.lists(
    st.tuples(
        st.sampled_from(["a", "b", "c"]),
        st.integers(0, 3),
        st.integers(-50, 50),
        st.one_of(st.none(), st.sampled_from(["i1", "i2", "i3"])),
    ).map(lambda t: event(*t)),
    min_size=1,
    max_size=8,
)
operations = st.lists(
    st.one_of(
        st.tuples(st.just("append"), events),
        st.tuples(st.just("flush"), st.sampled_from([None, "before", "after"])),
        st.tuples(st.just("crash"), st.none()),
        st.tuples(st.just("steal"), st.none()),
    ),
    max_size=25,
)


@settings(max_examples=150, deadline=None)
@given(operations=operations)
def test_any_interleaving_stores_exactly_the_acknowledged_events(
    operations: list[tuple[str, Any]],
) -> None:
    with tempfile.TemporaryDirectory() as folder:
        check_interleaving(Path(folder) / "s.db", operations)


def check_interleaving(path: Path, operations: list[tuple[str, Any]]) -> None:
    backend = FailingBackend(str(path))
    conn = backend.connect(write=True)
    backend.prepare(conn, HOUR)
    other = SQLiteBackend(str(path))  # another process on the same file
    other_conn = other.connect(write=True)
    seen, other_seen = SeriesCache(), SeriesCache()
    generation = 0
    owner, head = f"p{generation}/0", Head()
    acknowledged: list[Point] = []
    claimed: set[str] = set()
    # Rows of a live process replayed by another (its lease lost) count twice in its
    # reads until its next flush finds them gone and rebuilds its head.
    stolen = False
    for operation, argument in operations:
        if operation == "append":
            appended = journal_batch(conn, backend, [argument], POLICY, owner, head)
            kept = []
            for point in argument:
                if point[5] is None or point[5] not in claimed:
                    kept.append(point)
                    claimed.add(point[5])
            assert appended.events == len(kept)
            acknowledged.extend(kept)
        elif operation == "flush":
            backend.fail = argument
            try:
                flush_head(conn, backend, head, owner, POLICY, seen)
            except (sqlite3.OperationalError, JournalTaken):
                backend.rollback(conn)
            else:
                stolen = False
            backend.fail = None  # unused when there was nothing to flush
        elif operation == "crash":  # the process dies; a new one starts on the file
            generation += 1
            dead, owner, head = owner, f"p{generation}/0", Head()
            while replay_journal(conn, backend, dead, POLICY, seen, 2)[0]:
                pass
            stolen = False
        elif operation == "steal":  # another process takes this live one for dead
            while replay_journal(other_conn, other, owner, POLICY, other_seen, 3)[0]:
                pass
            stolen = stolen or bool(head.journal)
        if not (head.stale or head.uncertain or stolen):
            # What a read sees between operations: every acknowledged event, once.
            assert read(conn, [head]) == Counter(
                {slot: count for slot, (count, *_) in fold(acknowledged).items()}
            )
    try:  # as the writer does: a flush that finds its rows taken rebuilds, and again
        flush_head(conn, backend, head, owner, POLICY, seen)
    except JournalTaken:
        backend.rollback(conn)
        flush_head(conn, backend, head, owner, POLICY, seen)
    assert conn.execute("SELECT count(*) FROM journal").fetchone() == (0,)
    assert table(conn) == fold(acknowledged)
    conn.close()
    other_conn.close()


def test_a_flush_whose_commit_failed_after_committing_is_not_written_twice(
    tmp_path: Path,
) -> None:
    backend = FailingBackend(str(tmp_path / "s.db"))
    conn = backend.connect(write=True)
    backend.prepare(conn, HOUR)
    head, seen = Head(), SeriesCache()
    journal_batch(conn, backend, [[event("a", 0, 3), event("a", 0, 4)]], POLICY, "p/0", head)
    backend.fail = "after"
    with pytest.raises(sqlite3.OperationalError):
        flush_head(conn, backend, head, "p/0", POLICY, seen)
    assert head.uncertain and head.committing  # reads wait until it is known
    assert flush_head(conn, backend, head, "p/0", POLICY, seen) is None  # found committed
    assert not head.committing and len(head) == 0
    assert table(conn) == {("a", 0): (2, 7.0, 3.0, 4.0)}


def test_a_head_partly_replayed_by_another_process_is_rebuilt_before_it_flushes(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "s.db")
    backend = SQLiteBackend(path)
    conn = backend.connect(write=True)
    backend.prepare(conn, HOUR)
    head, seen = Head(), SeriesCache()
    journal_batch(conn, backend, [[event("a", 0, 1)]], POLICY, "p/0", head)
    other = SQLiteBackend(path)
    other_conn = other.connect(write=True)
    assert replay_journal(other_conn, other, "p/0", POLICY, SeriesCache(), 10) == (1, 1)
    journal_batch(conn, backend, [[event("a", 0, 2)]], POLICY, "p/0", head)
    with pytest.raises(JournalTaken):
        flush_head(conn, backend, head, "p/0", POLICY, seen)
    assert head.stale
    flush_head(conn, backend, head, "p/0", POLICY, seen)
    assert table(conn) == {("a", 0): (2, 3.0, 1.0, 2.0)}
    other_conn.close()
    conn.close()


def test_ids_are_claimed_once_whether_all_some_or_none_of_a_batch_are_new(db_url: str) -> None:
    # The claim counts first and returns which ids only when some were claimed and some
    # not: each case, on each database, claims exactly the ids not seen in the window.
    backend = make_backend(Settings(db=db_url))
    conn = backend.connect(write=True)
    try:
        backend.prepare(conn, HOUR)
        now, window = 1_800_000_000.0, 86400.0

        def claim(ids: list[str], at: float) -> set[str]:
            backend.begin(conn)
            claimed = backend.claim_ids(conn, ids, at, at - window)
            backend.commit(conn)
            return claimed

        many = [f"id-{n:05d}" for n in range(1200)]  # several statements' worth
        assert claim(many, now) == set(many)  # all new
        assert claim(many, now + 1) == set()  # none
        assert claim(["id-00001", "new-1", "id-01199", "new-2"], now + 2) == {"new-1", "new-2"}
        later = now + window + 1.5  # the first claim has expired, the others not
        assert claim([*many[:3], "new-1", "new-3"], later) == {*many[:3], "new-3"}
        backend.begin(conn)
        try:  # an undone claim (a failed batch) claims nothing
            assert backend.claim_ids(conn, ["undone", "new-1"], later, later - window) == {"undone"}
        finally:
            backend.rollback(conn)
        assert claim(["undone"], later) == {"undone"}
    finally:
        backend.close(conn)


def test_new_sketched_rows_are_inserted_and_named_stored_ones_left_alone(db_url: str) -> None:
    # insert_new writes many rows per statement and returns the slots it inserted: over
    # several statements, in any order of rows, exactly the slots not stored yet, each
    # stored as given; a stored slot keeps its row.
    backend = make_backend(Settings(db=db_url))
    assert isinstance(backend, SQLBackend)
    conn = backend.connect(write=True)
    try:
        backend.prepare(conn, HOUR)
        backend.max_parameters = 13 * 3  # statements of three rows: several per call

        def row(key: str, hour: int, count: int) -> tuple[Any, ...]:
            sketch = bytes([count]) * 40
            last = 1.0 * count, float(hour * HOUR)
            return (key, hour * HOUR, "{}", count, 0.0, 0.0, 0.0, 1.0, 1.0, *last, sketch, None)

        def insert(rows: list[tuple[Any, ...]]) -> set[tuple[str, int, str]]:
            backend.begin(conn)
            inserted = backend.insert_new(conn, rows, "rollups")
            backend.commit(conn)
            return inserted

        first = [row(f"k{n}", n % 2, 1) for n in range(5)]
        assert insert(first) == {(f"k{n}", (n % 2) * HOUR, "{}") for n in range(5)}
        again = [row(f"k{n}", n % 2, 2) for n in range(8)][::-1]
        assert insert(again) == {(f"k{n}", (n % 2) * HOUR, "{}") for n in range(5, 8)}
        assert insert(again) == set()
        stored = conn.execute("SELECT key, bucket, count, quantiles_kll FROM rollups").fetchall()
        expected = [(f"k{n}", (n % 2) * HOUR, 1 if n < 5 else 2) for n in range(8)]
        assert sorted((k, b, c, bytes(kll)) for k, b, c, kll in stored) == [
            (k, b, c, bytes([c]) * 40) for k, b, c in expected
        ]
    finally:
        backend.close(conn)


def test_a_flush_reports_what_it_wrote_only_when_asked_and_sure(tmp_path: Path) -> None:
    """What a read cache follows: the head's rollups by key, sized in the flush's thread;
    nothing when no one asked (no cache: no walk of the rows), nor under tiers."""
    backend = SQLiteBackend(str(tmp_path / "s.db"))
    conn = backend.connect(write=True)
    backend.prepare(conn, HOUR)
    head, seen = Head(), SeriesCache()
    journal_batch(conn, backend, [[event("a", 0, 1), event("b", 1, 2)]], POLICY, "p/0", head)
    plan = flush_head(conn, backend, head, "p/0", POLICY, seen)
    assert plan is not None and plan.flushed is None
    journal_batch(conn, backend, [[event("a", 0, 3), event("a", 2, 4)]], POLICY, "p/0", head)
    plan = flush_head(conn, backend, head, "p/0", POLICY, seen, report=True)
    assert plan is not None and plan.flushed is not None
    rollups = plan.flushed.rollups
    assert {key: sorted(b // HOUR for b, _ in rows) for key, rows in rollups.items()} == {
        "a": [0, 2]
    }
    assert [rollup.count for rollup in rollups["a"].values()] == [1, 1]
    assert plan.flushed.sizes == {"a": 2 * ROW_BYTES}
    assert table(conn)[("a", 0)][0] == 2  # written all the same
    conn.close()
