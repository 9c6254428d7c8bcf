"""``trioagg ingest``, ``query``, ``series`` and ``top`` against a real server."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import trio
from click.testing import CliRunner, Result

from trioagg.cli import main
from trioagg.cli_tools import LineReader, Mapping, sparkline

from .conftest import Server, stored_counts, wait_until

TS = 1795514400  # 2026-11-24T10:00:00Z
DAY = ["--from", "2026-11-24T00:00:00Z", "--to", "2026-11-25T00:00:00Z"]
DAY_PARAMS = {"from": DAY[1], "to": DAY[3]}


async def run(server: Server, *args: str) -> Result:
    """The command in a worker thread: it runs its own trio loop, like a terminal would."""
    return await trio.to_thread.run_sync(
        lambda: CliRunner().invoke(main, [*args, "--url", server.url])
    )


def test_line_ids_depend_on_source_line_number_and_text() -> None:
    reader = LineReader("/data/a.ndjson", Mapping())
    line = b'{"key": "k"}\n'
    assert reader.line_id(1, line) == LineReader("/data/a.ndjson", Mapping()).line_id(1, line)
    others = {
        LineReader("/data/b.ndjson", Mapping()).line_id(1, line),
        reader.line_id(2, line),
        reader.line_id(1, b'{"key": "j"}\n'),
    }
    assert reader.line_id(1, line) not in others and len(others) == 3
    event = json.loads(reader.ndjson(1, b'{"key": "k", "value": 2}  \n'))
    assert event == {
        "key": "k",
        "value": 2,
        "id": reader.line_id(1, b'{"key": "k", "value": 2}  \n'),
    }
    assert json.loads(reader.ndjson(1, b'{"key": "k", "id": "mine"}\n'))["id"] == "mine"


def test_sparkline_scales_between_the_lowest_and_highest_value() -> None:
    assert sparkline([0, 2, None, 14]) == "▁▂ █"
    assert sparkline([]) == ""


async def test_ingest_twice_counts_once_and_reports_bad_lines(
    server: Server, tmp_path: Path
) -> None:
    lines = [json.dumps({"key": f"k{i % 3}", "ts": TS + i, "value": i}) for i in range(3000)]
    lines[10] = '{"key": "k0", "vaule": 1}'
    lines[20] = "not json"
    lines.insert(30, "")  # blank lines are skipped
    path = tmp_path / "events.ndjson"
    path.write_text("\n".join(lines) + "\n")

    first = await run(server, "ingest", str(path))
    assert first.exit_code == 1  # bad lines: not everything was stored
    assert "line 11: Object contains unknown field `vaule`" in first.stderr
    assert "line 21: JSON is malformed" in first.stderr
    assert "2,998 events read" in first.stderr and "2 bad lines" in first.stderr
    assert sum(stored_counts(server.db).values()) == 2998

    again = await run(server, "ingest", str(path), "--no-wait")
    assert again.exit_code == 1
    await wait_until(lambda: server.app.service.writers.queued() == 0)  # --no-wait
    rerun = await run(server, "ingest", str(path))
    assert "2,998 stored (2,998 already there)" in rerun.stderr
    assert sum(stored_counts(server.db).values()) == 2998


async def test_ingest_stops_after_max_errors(server: Server, tmp_path: Path) -> None:
    path = tmp_path / "bad.ndjson"
    path.write_text("x\n" * 5 + '{"key": "late"}\n')
    result = await run(server, "ingest", str(path), "--max-errors", "2")
    assert result.exit_code == 1
    assert "line 3:" in result.stderr and "line 4:" not in result.stderr
    assert "stopped after more than 2 errors" in result.stderr
    assert stored_counts(server.db) == {}


async def test_ingest_reports_what_the_server_refuses(server: Server, tmp_path: Path) -> None:
    path = tmp_path / "future.ndjson"
    path.write_text('{"key": "now"}\n{"key": "future", "ts": "2999-01-01T00:00:00Z"}\n')
    result = await run(server, "ingest", str(path))
    assert result.exit_code == 1
    assert "line 2: refused: invalid_events" in result.stderr
    assert "too far in the future" in result.stderr
    assert stored_counts(server.db) == {"now": 1}


async def test_ingest_csv_with_a_column_mapping_and_own_ids(server: Server, tmp_path: Path) -> None:
    path = tmp_path / "sales.csv"
    path.write_text(
        "name,when,amount,zone,ref\n"
        f"sale,{TS},10,eu,a\n"
        f"sale,2026-11-24T10:30:00Z,5,us,b\n"
        f"sale,{TS},oops,eu,c\n"
        f"sale,{TS},10,eu,a\n"  # the same ref: the same event
    )
    args = ["--key", "name", "--ts", "when", "--value", "amount", "--tag", "region=zone"]
    result = await run(server, "ingest", str(path), *args, "--id", "ref")
    assert "line 4: value 'oops' is not a number" in result.stderr
    answer = await server.client.get(
        "/v1/aggregates",
        params={"key": "sale", "group_by": "region", "granularity": "all", "stats": "count,sum"}
        | DAY_PARAMS,
    )
    totals = {s["tags"]["region"]: s["buckets"][0] for s in answer.json()["results"]}
    assert {r: (b["count"], b["sum"]) for r, b in totals.items()} == {
        "eu": (1, 10.0),
        "us": (1, 5.0),
    }


async def test_query_series_and_top_print_json_csv_and_tables(
    server: Server, tmp_path: Path
) -> None:
    path = tmp_path / "q.ndjson"
    path.write_text(
        "".join(
            json.dumps({"key": "q.a", "ts": TS + h * 3600, "value": h, "tags": {"r": "eu"}}) + "\n"
            for h in range(4)
        )
        + json.dumps({"key": "q.b", "ts": TS})
        + "\n"
    )
    assert (await run(server, "ingest", str(path))).exit_code == 0

    as_json = await run(server, "query", "q.a", *DAY, "--stats", "count,sum", "--format", "json")
    expected = await server.client.get(
        "/v1/aggregates",
        params={"key": "q.a", "stats": "count,sum"} | DAY_PARAMS,
    )
    assert json.loads(as_json.stdout) == expected.json()

    as_csv = await run(server, "query", "q.a", *DAY, "--group-by", "r", "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert [(r["key"], json.loads(r["tags"]), r["count"], r["sum"]) for r in rows][:2] == [
        ("q.a", {"r": "eu"}, "1", "0.0"),
        ("q.a", {"r": "eu"}, "1", "1.0"),
    ]
    assert len(rows) == 4

    table = await run(server, "query", "q.a", *DAY, "--stats", "sum", "--tag", "r=eu")
    assert table.exit_code == 0
    assert "sum: ▁▃▆█" in table.stdout and "2026-11-24T13:00:00Z" in table.stdout

    keys = await run(server, "series", "--format", "csv")
    assert [r["key"] for r in csv.DictReader(io.StringIO(keys.stdout))] == ["q.a", "q.b"]
    top = await run(server, "top", *DAY, "--format", "json")
    assert json.loads(top.stdout)["results"] == [
        {"key": "q.a", "count": 4},
        {"key": "q.b", "count": 1},
    ]
    top_table = await run(server, "top", *DAY)
    assert "q.a" in top_table.stdout and "rank" in top_table.stdout


async def test_tables_show_keys_and_tags_as_sent_never_as_markup_or_escapes(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "400")  # rich's width: no cell is wrapped
    # Keys and tag values are what clients sent: "[...]" is rich's markup, and a tag
    # value may carry ESC sequences (clear the screen, retitle it, forge a link).
    key = "[red]k[/red] [link=http://evil]x[/link]"
    value = "a\x1b]8;;http://evil\x1b\\b\x07\x1b[2J"
    event = {"key": key, "ts": TS, "tags": {"t": value}}
    assert (await server.client.post("/v1/events", json=event)).status_code == 200
    shown = "t=a\\x1b]8;;http://evil\\x1b\\b\\x07\\x1b[2J"
    for args in (["series"], ["query", key, *DAY, "--group-by", "t"], ["top", *DAY]):
        table = await run(server, *args)
        assert table.exit_code == 0, table.output
        assert "\x1b" not in table.stdout and "\x07" not in table.stdout
        assert "[red]k[/red]" in table.stdout, table.stdout
        if args[0] == "query":  # the others show tag names, or no tags
            assert shown in table.stdout, table.stdout


async def test_a_refused_query_prints_the_server_details(server: Server) -> None:
    result = await run(server, "query", "k", "--stats", "bogus")
    assert result.exit_code == 1
    assert "422 invalid_query" in result.stderr and '"parameter": "stats"' in result.stderr
    assert result.stderr.count("unknown or too many stat(s) bogus") == 1  # said once


async def test_ingest_reads_stdin_in_chunks_that_keep_quoted_csv_fields_whole(
    server: Server,
) -> None:
    rows = 12_000  # about 1.3 MiB: more than one chunk, each record over two lines
    text = "key,note\n" + "".join(f'multi,"{"x" * 50}\n{"y" * 50}"\n' for _ in range(rows))
    result = await trio.to_thread.run_sync(
        lambda: CliRunner().invoke(
            main, ["ingest", "-", "--format", "csv", "--url", server.url], input=text
        )
    )
    assert result.exit_code == 0, result.stderr
    assert stored_counts(server.db) == {"multi": rows}
