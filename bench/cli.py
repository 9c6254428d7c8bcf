"""``python -m bench``: run the scenarios, print the table, write the JSON and the chart.

Examples::

    just bench                          # every scenario, a few minutes (trioagg serve -w 2)
    just bench --quick                  # reduced sizes, under two minutes
    just bench --scenario seed          # one scenario (repeat or comma-separate for more)
    just bench --server-arg '--sync normal' --server-arg --batch-size=2000
    just bench --deploy hypercorn       # every app on the hypercorn CLI, --workers 2
    just bench --workers 1 --keep-alive 30   # one process each
    just bench --store postgres         # seed + batch on PostgreSQL, 1/2/4 writers x 1/2 workers

Exit status: 0 when every measurement verified (stored events == acknowledged
events, clean shutdown), 1 when one did not or a scenario failed, 2 for bad
arguments, 3 with ``--fail-on-miss`` when a target was missed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import pgstore, report
from .runner import Bench, BenchError, Options, Progress
from .scenarios import (
    FULL,
    PG_MATRIX,
    QUICK,
    QUICK_SCENARIOS,
    RUNNERS,
    SCENARIOS,
    ScenarioResult,
    evaluate_targets,
    runner_for,
    scaled,
)
from .server import (
    DEFAULT_DEPLOY,
    DEFAULT_WORKERS,
    Deployment,
    ServerError,
    flag_value,
    split_args,
)

#: Options whose value is itself a flag (``--server-arg --sync=normal``).
_PASS_THROUGH = ("--server-arg", "--hypercorn-arg")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Stress harness of trioagg: scenarios against real servers, with baselines.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1] if __doc__ else None,
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="reduced sizes (under 2 minutes); leaves out the wrk cross-check unless named",
    )
    parser.add_argument(
        "--scenario",
        action="append",
        default=[],
        metavar="NAME",
        help=f"run only these scenarios: {', '.join(SCENARIOS)} (repeatable, or a,b)",
    )
    parser.add_argument(
        "--deploy",
        choices=("serve", "hypercorn"),
        default=DEFAULT_DEPLOY,
        help="serve (default): trioagg's recommended deployment, `trioagg serve --workers N`; "
        "the Quart baselines, which have no supervisor, on the hypercorn CLI (trio worker "
        "class, --workers N), or in one process with --workers 1. hypercorn: every app on the "
        "hypercorn CLI with --worker-class trio --workers N",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=DEFAULT_WORKERS,
        metavar="N",
        help=f"worker processes of every server but the Go design (default {DEFAULT_WORKERS})",
    )
    parser.add_argument(
        "--keep-alive",
        type=float,
        default=None,
        metavar="SECONDS",
        help="idle keep-alive timeout of every server but the Go design (trioagg serve's "
        "--keep-alive-timeout, hypercorn's --keep-alive)",
    )
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="a `trioagg serve` flag for every trioagg server, e.g. --server-arg '--sync normal' "
        "(TRIOAGG_* variables under --deploy hypercorn; the naive baseline follows --sync)",
    )
    parser.add_argument(
        "--hypercorn-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="an extra hypercorn CLI argument for every server (--deploy hypercorn)",
    )
    parser.add_argument(
        "--store",
        choices=("sqlite", "postgres"),
        default="sqlite",
        help="where trioagg servers store: a fresh SQLite file per measurement (default), or "
        "a fresh schema per measurement on PostgreSQL; postgres runs seed and batch as a "
        "workers x writers matrix",
    )
    parser.add_argument(
        "--pg-dsn",
        default=None,
        metavar="URL",
        help=f"PostgreSQL server for --store postgres (default ${pgstore.ENV_DSN} or "
        f"{pgstore.DEFAULT_DSN})",
    )
    parser.add_argument(
        "--pg-writers",
        default=None,
        metavar="N,N",
        help="trioagg --writers values of the PostgreSQL matrix (default 1,2,4)",
    )
    parser.add_argument(
        "--pg-workers",
        default=None,
        metavar="N,N",
        help="worker counts of the PostgreSQL matrix (default 1,2)",
    )
    parser.add_argument(
        "--trioagg-src",
        type=Path,
        default=None,
        metavar="DIR",
        help="run the trioagg package found in DIR (e.g. an exported commit) instead of "
        "the installed one",
    )
    parser.add_argument(
        "--trioagg-ref",
        default=None,
        metavar="REF",
        help="run trioagg as committed at git REF (e.g. HEAD), exported with git archive, "
        "instead of the working tree",
    )
    parser.add_argument(
        "--connections", type=int, default=64, help="concurrent keep-alive connections (default 64)"
    )
    parser.add_argument(
        "--no-baselines", action="store_true", help="skip the ceiling and naive apps"
    )
    parser.add_argument("--no-chart", action="store_true", help="do not draw the PNG chart")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent / "results",
        help="directory for the JSON and PNG (default bench/results)",
    )
    parser.add_argument(
        "--workdir", type=Path, default=None, help="where stores and server logs go"
    )
    parser.add_argument("--keep-stores", action="store_true", help="keep the SQLite files")
    parser.add_argument(
        "--fail-on-miss", action="store_true", help="exit 3 when a target is missed"
    )
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="multiply every request count and duration (e.g. 0.1 for a smoke run)",
    )
    parser.add_argument(
        "--tiers-series",
        type=int,
        default=None,
        metavar="N",
        help="series of the tiers scenario's simulated year (default 20; issue 22's 1,000 "
        "writes 525.6 M events per store, hours on a 2-core machine)",
    )
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    return parser


def _join_pass_through(argv: Sequence[str]) -> list[str]:
    """Let ``--server-arg --sync=normal`` mean ``--server-arg=--sync=normal``."""
    out: list[str] = []
    tokens = list(argv)
    index = 0
    while index < len(tokens):
        token = tokens[index]
        if token in _PASS_THROUGH and index + 1 < len(tokens):
            out.append(f"{token}={tokens[index + 1]}")
            index += 2
        else:
            out.append(token)
            index += 1
    return out


def export_ref(ref: str) -> Path:
    """``git archive`` the trioagg package at ``ref`` into a temporary directory."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--verify", f"{ref}^{{commit}}"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError) as error:
        raise ValueError(f"--trioagg-ref {ref!r} is not a commit of this repository") from error
    target = Path(tempfile.gettempdir()) / f"trioagg-src-{commit[:12]}"
    if not (target / "trioagg").is_dir():
        target.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(
            ["git", "archive", commit, "trioagg"], cwd=root, capture_output=True, check=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    (target / "COMMIT").write_text(commit + "\n")
    return target


def parse_scenarios(values: Sequence[str], default: Sequence[str] = SCENARIOS) -> tuple[str, ...]:
    """Scenario names from ``--scenario`` values, in run order; ``all`` = every one, none
    given = ``default``."""
    names: list[str] = []
    for value in values:
        for name in value.split(","):
            name = name.strip().lower()
            if not name:
                continue
            if name == "all":
                names.extend(SCENARIOS)
            elif name not in SCENARIOS:
                raise ValueError(f"unknown scenario {name!r} (choose from {', '.join(SCENARIOS)})")
            else:
                names.append(name)
    chosen = set(names) or set(default)
    return tuple(name for name in SCENARIOS if name in chosen)


def parse_counts(text: str, flag: str) -> tuple[int, ...]:
    """``"1,2,4"`` -> ``(1, 2, 4)``: distinct positive counts, in the order given."""
    counts: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if not part.isdigit() or int(part) < 1:
            raise ValueError(f"{flag} takes positive integers separated by commas, not {text!r}")
        if int(part) not in counts:
            counts.append(int(part))
    if not counts:
        raise ValueError(f"{flag} needs at least one count")
    return tuple(counts)


def parse_args(argv: Sequence[str] | None = None) -> tuple[Options, argparse.Namespace]:
    parser = build_parser()
    args = parser.parse_args(_join_pass_through(sys.argv[1:] if argv is None else argv))
    try:
        if args.store == "postgres" and not args.scenario:
            args.scenario = list(PG_MATRIX)
        scenarios = parse_scenarios(args.scenario, QUICK_SCENARIOS if args.quick else SCENARIOS)
        postgres = args.store == "postgres"
        for flag, value in (
            ("--pg-dsn", args.pg_dsn),
            ("--pg-writers", args.pg_writers),
            ("--pg-workers", args.pg_workers),
        ):
            if value is not None and not postgres:
                raise ValueError(f"{flag} needs --store postgres")
        pg_dsn = pgstore.resolve_dsn(args.pg_dsn) if postgres else pgstore.DEFAULT_DSN
        pg_writers = parse_counts(args.pg_writers or "1,2,4", "--pg-writers")
        pg_workers = parse_counts(args.pg_workers or "1,2", "--pg-workers")
        user_writers = flag_value(split_args(args.server_arg), "--writers")
        if postgres and user_writers is not None and set(scenarios) & set(PG_MATRIX):
            raise ValueError(
                "--server-arg --writers would override the PostgreSQL matrix: use --pg-writers"
            )
        if args.trioagg_ref is not None:
            if args.trioagg_src is not None:
                raise ValueError("give --trioagg-src or --trioagg-ref, not both")
            args.trioagg_src = export_ref(args.trioagg_ref)
        if args.trioagg_src is not None and not (args.trioagg_src / "trioagg").is_dir():
            raise ValueError(f"--trioagg-src {args.trioagg_src} holds no trioagg package")
        deployment = Deployment(
            deploy=args.deploy,
            workers=args.workers,
            keep_alive=args.keep_alive,
            server_args=split_args(args.server_arg),
            hypercorn_args=split_args(args.hypercorn_arg),
            trioagg_src=None if args.trioagg_src is None else str(args.trioagg_src.resolve()),
        )
        if not 0 < args.scale <= 10:
            raise ValueError("--scale must be in (0, 10]")
        if args.connections < 1:
            raise ValueError("--connections must be at least 1")
        if args.tiers_series is not None and args.tiers_series < 1:
            raise ValueError("--tiers-series must be at least 1")
    except ValueError as error:
        parser.error(str(error))
    options = Options(
        quick=args.quick,
        scenarios=scenarios,
        deployment=deployment,
        connections=args.connections,
        out=args.out,
        workdir=args.workdir,
        chart=not args.no_chart,
        baselines=not args.no_baselines,
        keep_stores=args.keep_stores,
        store=args.store,
        pg_dsn=pg_dsn,
        pg_writers=pg_writers,
        pg_workers=pg_workers,
    )
    return options, args


def matrix_deployment_text(options: Options) -> str:
    """How the PostgreSQL matrix deploys: the run's deployment, every worker count."""
    most = max(options.pg_workers)
    text = dataclasses.replace(options.deployment, workers=most).describe()
    return text.replace(f"--workers {most}", "--workers " + ",".join(map(str, options.pg_workers)))


def summarize_verification(bench: Bench) -> dict[str, Any]:
    failures = [
        f"{m.label} ({m.app}): {'; '.join(m.verdict['problems'])}"
        for m in bench.measurements
        if not m.verdict["ok"]
    ]
    return {"ok": not failures, "checked": len(bench.measurements), "failures": failures}


def main(argv: Sequence[str] | None = None) -> int:
    options, args = parse_args(argv)
    if args.list:
        for name in SCENARIOS:
            doc = (RUNNERS[name].__doc__ or "").strip().splitlines()[0]
            print(f"{name:<9} {doc}")
        print("--store postgres: seed and batch run for every --pg-workers x --pg-writers cell")
        return 0
    postgres: dict[str, Any] | None = None
    if options.store == "postgres":
        try:
            postgres = pgstore.server_info(options.pg_dsn)
        except pgstore.PostgresError as error:
            print(f"python -m bench: error: {error}", file=sys.stderr)
            return 2
    sizes = scaled(QUICK if options.quick else FULL, args.scale)
    if args.tiers_series is not None:
        sizes = dataclasses.replace(sizes, tiers_series=args.tiers_series)
    progress = Progress()
    bench = Bench(options, progress)
    if postgres is not None:
        postgres["cpu_measured"] = bench.postmaster_pid is not None
    started = report.now_utc()
    t0 = time.perf_counter()
    machine_start = report.machine_info(bench.workdir)
    results: dict[str, ScenarioResult] = {}
    try:
        for number, name in enumerate(options.scenarios, start=1):
            progress.set(f"[{number}/{len(options.scenarios)}] {name}")
            try:
                results[name] = runner_for(bench, name)(bench, sizes)
            except (ServerError, BenchError) as error:
                results[name] = ScenarioResult(name, error=str(error))
                progress.note(f"SCENARIO {name} FAILED: {error}")
    except KeyboardInterrupt:
        progress.note("interrupted: reporting what was measured")
    progress.clear()
    wall = time.perf_counter() - t0
    targets = evaluate_targets(results)
    verification = summarize_verification(bench)
    failed = [name for name, r in results.items() if r.error]
    if failed:
        verification["ok"] = False
        verification["failures"] += [
            f"scenario {name} failed: {results[name].error}" for name in failed
        ]

    stamp = started.strftime("%Y%m%d-%H%M%S")
    mode = "quick" if options.quick else "full"
    json_path = options.out / f"bench-{stamp}-{mode}.json"
    png_path = json_path.with_suffix(".png")
    if postgres is None:
        store = f"SQLite {machine_start['sqlite']}"
    else:
        store = (
            f"PostgreSQL {postgres['version']} "
            f"(synchronous_commit {postgres['synchronous_commit']})"
            f" | workers {','.join(map(str, options.pg_workers))} x writers "
            f"{','.join(map(str, options.pg_writers))}"
        )
    deploy = options.deployment.describe()
    if postgres is not None and set(options.scenarios) & set(PG_MATRIX):
        deploy = "matrix: " + matrix_deployment_text(options)
    header = (
        f"trioagg bench {started:%Y-%m-%d %H:%M} UTC | {mode} | "
        f"deploy {deploy}"
        f" | {options.connections} connections | {machine_start['cpus']} x "
        f"{machine_start['cpu_model']} | Python {machine_start['python']} | {store}"
        f" | fsync {machine_start.get('fsync_ms')} ms | {wall:.0f} s"
    )
    files = [json_path]
    pg_png = None
    if options.chart and results:
        matrix = {n: r for n, r in results.items() if report.is_matrix(r)}
        others = {n: r for n, r in results.items() if n not in matrix}
        try:
            if others:
                report.chart(png_path, others, header)
                files.append(png_path)
            if matrix:
                pg_png = (
                    png_path if not others else png_path.with_name(png_path.stem + "-postgres.png")
                )
                report.pg_chart(pg_png, matrix, header)
                files.append(pg_png)
        except Exception as error:  # a chart problem must not lose the figures
            bench.warn(f"chart not drawn: {error}")
    document = {
        "schema": "trioagg-bench/1",
        "started": started.isoformat(),
        "wall_s": round(wall, 1),
        "mode": mode,
        "argv": ["python", "-m", "bench", *(sys.argv[1:] if argv is None else argv)],
        "command": shlex.join(sys.argv),
        "options": {
            "scenarios": list(options.scenarios),
            "deploy": options.deployment.deploy,
            "workers": options.deployment.workers,
            "keep_alive": options.deployment.keep_alive,
            "server_args": list(options.deployment.server_args),
            "hypercorn_args": list(options.deployment.hypercorn_args),
            "connections": options.connections,
            "baselines": options.baselines,
            "store": options.store,
            "pg_writers": list(options.pg_writers) if postgres else None,
            "pg_workers": list(options.pg_workers) if postgres else None,
        },
        "postgres": postgres,
        "sizes": dataclasses.asdict(sizes),
        "scale": args.scale,
        "machine": machine_start,
        "machine_end": {"load_average": [round(x, 2) for x in os.getloadavg()]},
        "versions": report.versions(),
        "git": report.git_info(),
        "trioagg_source": report.source_info(options.deployment.trioagg_src),
        "day_start": bench.day_start,
        "targets": [t.to_json() for t in targets],
        "verification": verification,
        "warnings": bench.warnings,
        "scenarios": {name: result.to_json() for name, result in results.items()},
        "png": str(png_path) if png_path in files else None,
        "png_postgres": str(pg_png) if pg_png in files else None,
    }
    report.write_json(json_path, document)
    print(report.table(header, results, targets, verification, bench.warnings, files))
    if not options.keep_stores and verification["ok"] and options.workdir is None:
        for leftover in bench.workdir.glob("*.log"):
            leftover.unlink()
        with contextlib.suppress(OSError):
            bench.workdir.rmdir()
    elif not verification["ok"]:
        print(f"server logs: {bench.workdir}", file=sys.stderr)
    if not verification["ok"]:
        return 1
    if args.fail_on_miss and any(t.status == "MISS" for t in targets):
        return 3
    return 0
