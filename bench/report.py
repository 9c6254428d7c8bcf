"""What a run leaves behind: the table on stdout, the JSON file, the PNG chart."""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
import os
import platform
import sqlite3
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .scenarios import Row, ScenarioResult, Target, parse_cell_key

_ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("trioagg", "trio", "hypercorn", "quart", "quart-trio", "msgspec", "h11", "werkzeug")
SYSTEMS = ("trioagg", "ceiling", "naive", "go")


# ---------------------------------------------------------------------- machine info


def machine_info(workdir: Path | None = None) -> dict[str, Any]:
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_model": _cpu_model(),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "sqlite": sqlite3.sqlite_version,
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    if workdir is not None:
        info["fsync_ms"] = fsync_ms(workdir)
    try:
        import psutil

        info["memory_bytes"] = psutil.virtual_memory().total
        if workdir is not None:
            info["workdir_filesystem"] = _filesystem(psutil, workdir)
    except ImportError:  # pragma: no cover - psutil is a bench dependency
        pass
    return info


def fsync_ms(directory: Path, rounds: int = 50) -> float | None:
    """Median time of a 4 KiB write + fsync where the stores live: what one durable
    commit costs at least (it decides how much group commit can win over naive)."""
    path = directory / "fsync.probe"
    times = []
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            for _ in range(rounds):
                started = time.perf_counter()
                os.write(fd, b"x" * 4096)
                os.fsync(fd)
                times.append(time.perf_counter() - started)
        finally:
            os.close(fd)
            path.unlink(missing_ok=True)
    except OSError:
        return None
    return round(sorted(times)[len(times) // 2] * 1000, 3)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _filesystem(psutil: Any, path: Path) -> str:
    best = None
    for part in psutil.disk_partitions(all=True):
        if str(path.resolve()).startswith(part.mountpoint) and (
            best is None or len(part.mountpoint) > len(best.mountpoint)
        ):
            best = part
    return f"{best.fstype} on {best.mountpoint}" if best else "unknown"


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def git_info() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        return {
            "commit": git("rev-parse", "HEAD"),
            "branch": git("rev-parse", "--abbrev-ref", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        }
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None}


def source_info(trioagg_src: str | None) -> dict[str, Any]:
    """Which trioagg the servers ran, with a digest of its sources (the working tree
    may hold uncommitted changes)."""
    root = Path(trioagg_src) if trioagg_src else _ROOT
    digest = hashlib.sha256()
    files = sorted((root / "trioagg").rglob("*.py"))
    for path in files:
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    info: dict[str, Any] = {
        "path": str(root / "trioagg"),
        "files": len(files),
        "sha256": digest.hexdigest(),
    }
    if (root / "COMMIT").is_file():
        info["commit"] = (root / "COMMIT").read_text().strip()
    if trioagg_src is None:
        try:
            changed = subprocess.run(
                ["git", "status", "--porcelain", "--", "trioagg"],
                cwd=_ROOT,
                capture_output=True,
                text=True,
                check=True,
            ).stdout.split("\n")
            info["uncommitted_changes"] = [line.strip() for line in changed if line.strip()]
        except (OSError, subprocess.CalledProcessError):
            pass
    return info


# ---------------------------------------------------------------------- table


def _num(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:,.{digits}f}"


def _stall(row: Row) -> str:
    """The loop stall column: the bound in ms and the count of long stalls if any;
    ``-`` for a server without a heartbeat (the baselines)."""
    if row.loop_stalls_over_10ms is None and row.loop_stall_ms is None:
        return "-"
    text = "> 2,500" if row.loop_stall_ms is None else _num(row.loop_stall_ms)
    if row.loop_stalls_over_10ms:
        text += f", {row.loop_stalls_over_10ms} >10ms"
    return text


def _step(row: Row) -> str:
    """The CPU step column: the bound in ms, "<1" under 1 ms; ``-`` where no step was
    timed (the baselines, or a server not sampling)."""
    if not row.loop_steps_timed:
        return "-"
    if row.loop_step_cpu_ms is None:
        return "> 2,500"
    return "<1" if row.loop_step_cpu_ms == 0 else _num(row.loop_step_cpu_ms)


def _ratio(ours: Row, rows: Sequence[Row], system: str) -> str:
    # a PostgreSQL matrix cell compares with the baseline of its worker count
    keys = {ours.key, ours.key.split(" writers=")[0]}
    other = next((r for r in rows if r.key in keys and r.system == system), None)
    if other is None or not other.rate:
        return ""
    return f"{ours.rate / other.rate:.2f}"


def table(
    header: str,
    results: Mapping[str, ScenarioResult],
    targets: Sequence[Target],
    verification: Mapping[str, Any],
    warnings: Sequence[str],
    files: Sequence[Path] = (),
) -> str:
    lines = [header, ""]
    columns = (
        f"{'scenario':<9} {'measurement':<30} {'system':<8} {'rate':>9} {'unit':<8} "
        f"{'time':>6} {'p50':>7} {'p95':>7} {'p99':>7} {'xceil':>6} {'xnaive':>6} {'xgo':>6} "
        f"{'CPU ms/req':>14} {'loop stall max (ms)':>19} {'CPU step (ms)':>13}  note"
    )
    lines.append(columns)
    lines.append("-" * len(columns))
    for name, result in results.items():
        if result.error:
            lines.append(f"{name:<9} FAILED: {result.error}")
            continue
        ordered = sorted(
            result.rows,
            key=lambda r: (
                [row.key for row in result.rows].index(r.key),
                SYSTEMS.index(r.system) if r.system in SYSTEMS else 9,
            ),
        )
        first = True
        previous_key = None
        for row in ordered:
            what = row.what if row.key != previous_key else ""
            previous_key = row.key
            lat = row.latency_ms
            cpu = "-"
            if row.server_cpu_1k is not None:
                cpu = f"{row.server_cpu_1k:.2f}/{row.client_cpu_1k or 0:.2f}"
                if row.db_cpu_1k is not None:
                    cpu = (
                        f"{row.server_cpu_1k:.2f}+{row.db_cpu_1k:.2f}/{row.client_cpu_1k or 0:.2f}"
                    )
            x_ceiling = _ratio(row, result.rows, "ceiling") if row.system == "trioagg" else ""
            x_naive = _ratio(row, result.rows, "naive") if row.system == "trioagg" else ""
            x_go = _ratio(row, result.rows, "go") if row.system == "trioagg" else ""
            lines.append(
                f"{name if first else '':<9} {what[:30]:<30} {row.system:<8} "
                f"{_num(row.rate):>9} {row.unit:<8} {row.elapsed_s:>5.1f}s "
                f"{_num(lat.get('p50')):>7} {_num(lat.get('p95')):>7} {_num(lat.get('p99')):>7} "
                f"{x_ceiling:>6} {x_naive:>6} {x_go:>6} {cpu:>14} {_stall(row):>19} "
                f"{_step(row):>13}  {row.note}"
            )
            first = False
    lines.append("latency in ms of acknowledged requests; CPU ms/req = server/client CPU seconds")
    lines.append("per 1,000 requests of the phase (server+PostgreSQL/client on --store postgres);")
    lines.append("xceil, xnaive, xgo = trioagg rate / baseline rate (go = the seed's Go design;")
    lines.append("its batch events/s are committed events/s, drain included); loop stall max =")
    lines.append("upper bound of the longest event-loop stall of trioagg in the phase (heartbeat")
    lines.append("histogram, or the workers' longest-stall gauges if lower); N >10ms = heartbeats")
    lines.append("> 10 ms late; CPU step = upper bound of the most event-loop CPU one task step")
    lines.append("used in the phase (while the server sampled, --loop-step-sampling): a stall")
    lines.append("without one is the process waiting for a core, not a task holding the loop.")
    lines.append("Absolute figures drift up to 2x between days on shared machines: compare")
    lines.append("ratios from one run only.")
    scaling = pg_scaling(results)
    if scaling:
        lines += ["", *scaling]
    facts = _facts(results)
    if facts:
        lines += ["", "FACTS"] + [f"  {line}" for line in facts]
    if targets:
        lines += ["", "TARGETS"]
        for target in targets:
            lines.append(
                f"  {target.status:<4}  {target.name:<46} {target.measured:>16}   {target.detail}"
            )
    lines.append("")
    if verification["ok"]:
        lines.append(
            f"VERIFY  PASS  {verification['checked']} servers: stored events == acknowledged "
            "events, SIGTERM exit 0, no unexpected answers"
        )
    else:
        lines.append(f"VERIFY  FAIL  {len(verification['failures'])} of {verification['checked']}")
        for failure in verification["failures"]:
            lines.append(f"  {failure}")
    for warning in warnings:
        lines.append(f"WARNING: {warning}")
    for path in files:
        lines.append(f"wrote {_display(path)}")
    return "\n".join(lines)


#: What the PostgreSQL matrix reports: (scenario, row key base, title).
PG_MEASURES = (
    ("batch", "json", "batch events/s (1,000-event JSON arrays, durable)"),
    ("seed", "writes", "seed writes req/s (single events, durable)"),
    ("seed", "reads", "seed reads req/s (1 key x 24 h)"),
)


def is_matrix(result: ScenarioResult) -> bool:
    return result.facts.get("store") == "postgres" and "cells" in result.facts


def pg_grid(
    results: Mapping[str, ScenarioResult], scenario: str, base: str
) -> tuple[dict[tuple[int, int], Row], dict[int, Row]]:
    """One measure of the matrix: trioagg rows by (workers, writers), ceilings by workers."""
    cells: dict[tuple[int, int], Row] = {}
    ceilings: dict[int, Row] = {}
    result = results.get(scenario)
    if result is None or result.error or not is_matrix(result):
        return cells, ceilings
    for row in result.rows:
        row_base, workers, writers = parse_cell_key(row.key)
        if row_base != base:
            continue
        if row.system == "trioagg" and writers is not None:
            cells[(workers, writers)] = row
        elif row.system == "ceiling":
            ceilings[workers] = row
    return cells, ceilings


def _cpu(row: Row) -> str:
    """Server + database CPU ms per request."""
    if row.server_cpu_1k is None:
        return "-"
    return f"{row.server_cpu_1k + (row.db_cpu_1k or 0):.2f}"


def pg_scaling(results: Mapping[str, ScenarioResult]) -> list[str]:
    """The PostgreSQL matrix as writers x workers tables, each rate also as a multiple
    of the 1 worker / 1 writer cell (how throughput grows with writers and workers)."""
    lines: list[str] = []
    for scenario, base, title in PG_MEASURES:
        cells, ceilings = pg_grid(results, scenario, base)
        if not cells:
            continue
        workers = sorted({w for w, _ in cells} | set(ceilings))
        writers = sorted({n for _, n in cells})
        first = cells.get((min(workers), min(writers)))
        unit_cell = f"{min(workers)} worker x {min(writers)} writer"
        if not lines:
            lines.append(
                "POSTGRES SCALING: rate, x the "
                f"{unit_cell} cell, p99 ms, server+PostgreSQL CPU ms per request"
            )
        head = f"  {title:<52}" + "".join(
            f"{f'{w} worker' + ('s' if w > 1 else '') + ': rate, x, p99, CPU':>36}" for w in workers
        )
        lines.append(head)
        for n in writers:
            text = f"  {f'{n} writer' + ('s' if n > 1 else ''):<52}"
            for w in workers:
                row = cells.get((w, n))
                if row is None:
                    text += f"{'-':>36}"
                    continue
                times = f"{row.rate / first.rate:.2f}x" if first and first.rate else ""
                p99 = _num(row.latency_ms.get("p99"))
                text += f"{_num(row.rate):>11} {times:>6} {p99:>7} {_cpu(row):>10}"
            lines.append(text)
        if ceilings:
            text = f"  {'ceiling (stores nothing)':<52}"
            for w in workers:
                row = ceilings.get(w)
                if row is None:
                    text += f"{'-':>36}"
                    continue
                p99 = _num(row.latency_ms.get("p99"))
                text += f"{_num(row.rate):>11} {'':>6} {p99:>7} {_cpu(row):>10}"
            lines.append(text)
    return lines


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _facts(results: Mapping[str, ScenarioResult]) -> list[str]:
    out = []
    seed = results.get("seed")
    if seed and not seed.error and seed.facts:
        f = seed.facts
        writes, reads = seed.row("writes", "trioagg"), seed.row("reads", "trioagg")
        if writes and reads:
            out.append(
                f"seed: {writes.requests:,} writes in {f['writes_s']:.1f} s condensed to "
                f"{f['rows']:,} rows; {reads.requests:,} reads in {f['reads_s']:.1f} s"
            )
    durable = results.get("durable")
    if durable and durable.facts.get("wait_false_over_durable"):
        out.append(
            f"durable: wait=false answers {durable.facts['wait_false_over_durable']:.2f} x "
            "the durable rate (what durability costs)"
        )
    mixed = results.get("mixed")
    if mixed and not mixed.error and mixed.facts:
        f = mixed.facts
        out.append(
            f"mixed: read p99 mixed/alone {f.get('read_p99_mixed_over_alone', 0):.2f} x, "
            f"write p99 mixed/alone {f.get('write_p99_mixed_over_alone', 0):.2f} x; "
            f"max read {_num(f.get('read_max_ms_mixed'))} ms, "
            f"max write {_num(f.get('write_max_ms_mixed'))} ms"
        )
    if mixed and not mixed.error and "reads_alone_x_ceiling" in mixed.facts:
        f = mixed.facts
        out.append(
            f"mixed: reads alone {f['reads_alone_x_ceiling']:.2f} x the ceiling's reads; reads "
            f"during a batch load {f.get('reads_during_batch_x_ceiling', 0):.2f} x, "
            f"read p99 during the batch load {_num(f.get('read_p99_ms_during_batch'))} ms"
        )
    for name in ("seed", "batch", "wrk"):
        result = results.get(name)
        ratios = result.facts.get("trioagg_over_go") if result and not result.error else None
        if ratios:
            listed = ", ".join(f"{key} {ratio:.2f} x" for key, ratio in ratios.items())
            out.append(f"{name}: trioagg / Go design: {listed}")
    wrk = results.get("wrk")
    for entry in wrk.facts.get("commands", []) if wrk and not wrk.error else []:
        out.append(f"wrk ({entry['system']}): {entry['command']}")
    auth = results.get("auth")
    if auth and not auth.error and auth.facts.get("check_us"):
        f = auth.facts
        out.append(
            f"auth: on/off {_num(f['single_on_over_off'], 2)} x single, "
            f"{_num(f['batch_on_over_off'], 2)} x batch; the key check costs "
            f"{f['check_us']:.1f} us of the event loop per request (in-process)"
        )
    tiers = results.get("tiers")
    if tiers and not tiers.error and tiers.facts:
        from .retention import summary

        out.extend(summary(tiers.facts))
    over = results.get("overload")
    if over and not over.error and over.facts:
        f = over.facts
        out.append(
            f"overload: offered {_num(f['offered_req_per_s'])} req/s, accepted "
            f"{_num(f['accepted_req_per_s'])} req/s, 503 share {f['share_503']:.0%} "
            f"(503 p99 {_num(f['latency_503_ms'].get('p99'))} ms), peak RSS "
            f"{f['peak_rss_mb']:.0f} MB, lost acknowledged events {f['lost_acked_events']}"
        )
        batch = results.get("batch")
        capacity = batch.row("json", "trioagg") if batch else None
        accepted = over.row("accepted", "trioagg")
        if capacity and accepted and capacity.rate:
            out.append(
                f"overload: accepted {accepted.rate:,.0f} events/s = "
                f"{accepted.rate / capacity.rate:.0%} of the batch scenario's "
                f"{capacity.rate:,.0f} events/s (goodput under overload)"
            )
    return out


# ---------------------------------------------------------------------- JSON


def write_json(path: Path, document: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=1, default=str) + "\n")


def now_utc() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


# ---------------------------------------------------------------------- chart


def chart_label(key: str) -> str:
    """A short x label: ``keys=100000 batch=1000`` -> ``100k keys\n1000/req``."""
    if key.startswith("keys="):
        keys, size = (part.split("=")[1] for part in key.split())
        count = int(keys)
        short = f"{count // 1000}k" if count >= 1000 else str(count)
        return f"{short} keys\n{size}/req"
    return key.replace(" ", "\n", 1)


def pg_chart(path: Path, results: Mapping[str, ScenarioResult], title: str) -> None:
    """The PostgreSQL matrix: rate and p99 against writers, one line per worker count,
    the ceiling of each worker count dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(m, pg_grid(results, m[0], m[1])) for m in PG_MEASURES]
    panels = [(m, grid) for m, grid in panels if grid[0]]
    if not panels:
        return
    figure, axes = plt.subplots(2, len(panels), figsize=(5.2 * len(panels), 8), squeeze=False)
    colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b"]
    for column, ((_, _, label), (cells, ceilings)) in enumerate(panels):
        top, bottom = axes[0][column], axes[1][column]
        writers = sorted({n for _, n in cells})
        off_scale: list[str] = []
        for index, workers in enumerate(sorted({w for w, _ in cells})):
            colour = colours[index % len(colours)]
            points = [(n, cells[(workers, n)]) for n in writers if (workers, n) in cells]
            xs = [n for n, _ in points]
            name = f"{workers} worker{'s' if workers > 1 else ''}"
            top.plot(xs, [r.rate for _, r in points], "o-", color=colour, label=name)
            for n, row in points:
                top.annotate(
                    f"{row.rate:,.0f}",
                    (n, row.rate),
                    fontsize=7,
                    ha="center",
                    va="bottom",
                    xytext=(0, 4),
                    textcoords="offset points",
                )
            bottom.plot(
                xs,
                [r.latency_ms.get("p99") or 0 for _, r in points],
                "o-",
                color=colour,
                label=name,
            )
            ceiling = ceilings.get(workers)
            highest = max(row.rate for row in cells.values())
            if ceiling is not None and ceiling.rate <= 3 * highest:
                top.axhline(
                    ceiling.rate,
                    color=colour,
                    linestyle="--",
                    linewidth=1,
                    label=f"ceiling, {name}",
                )
            elif ceiling is not None:  # far above: a dashed line would flatten the others
                off_scale.append(f"ceiling, {name}: {ceiling.rate:,.0f} (off scale)")
        if off_scale:
            top.text(
                0.02, 0.02, "\n".join(off_scale), transform=top.transAxes, fontsize=7, va="bottom"
            )
        top.set_title(label, fontsize=9)
        top.set_xticks(writers)
        top.set_ylim(bottom=0)
        top.set_ylabel("rate")
        top.grid(alpha=0.3)
        top.legend(fontsize=7)
        bottom.set_xticks(writers)
        bottom.set_xlabel("trioagg --writers")
        bottom.set_ylabel("p99 latency (ms)")
        bottom.set_ylim(bottom=0)
        bottom.grid(alpha=0.3)
    figure.suptitle(title, fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def chart(path: Path, results: Mapping[str, ScenarioResult], title: str) -> None:
    """Throughput and p99 per measurement, trioagg next to the baselines (log scales)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: list[tuple[str, dict[str, Row]]] = []
    for name, result in results.items():
        for row in result.rows:
            label = f"{name}\n{chart_label(row.key)}\n({row.unit})"
            for existing, systems in groups:
                if existing == label:
                    systems[row.system] = row
                    break
            else:
                groups.append((label, {row.system: row}))
    if not groups:
        return
    colours = {"trioagg": "#1f77b4", "ceiling": "#9e9e9e", "naive": "#d62728", "go": "#2ca02c"}
    width = 0.8 / len(SYSTEMS)
    figure, (top, bottom) = plt.subplots(
        2, 1, figsize=(max(10, len(groups) * 0.95), 9), sharex=True
    )
    for offset, system in enumerate(SYSTEMS):
        xs, rates, p99s = [], [], []
        for index, (_, systems) in enumerate(groups):
            bar = systems.get(system)
            if bar is None:
                continue
            xs.append(index + (offset - (len(SYSTEMS) - 1) / 2) * width)
            rates.append(max(bar.rate, 0.1))
            p99s.append(max(bar.latency_ms.get("p99") or 0.01, 0.01))
        if xs:
            top.bar(xs, rates, width, label=system, color=colours[system])
            bottom.bar(xs, p99s, width, label=system, color=colours[system])
    for index, (_, systems) in enumerate(groups):
        ours = systems.get("trioagg")
        ratios = [
            f"{ours.rate / other.rate:.2f}x {name.replace('ceiling', 'ceil')}"
            for name in ("ceiling", "naive", "go")
            if ours and (other := systems.get(name)) and other.rate
        ]
        if ours and ratios:
            top.annotate(
                "\n".join(ratios),
                (index - (len(SYSTEMS) - 1) / 2 * width, max(ours.rate, 0.1)),
                ha="center",
                va="bottom",
                fontsize=7,
            )
    top.set_yscale("log")
    top.set_ylabel("throughput (req/s or events/s, see label)")
    top.set_ylim(top=top.get_ylim()[1] * 3)
    top.legend()
    top.grid(axis="y", which="both", alpha=0.3)
    top.set_title(title, fontsize=10)
    bottom.set_yscale("log")
    bottom.set_ylabel("p99 latency (ms)")
    bottom.grid(axis="y", which="both", alpha=0.3)
    bottom.set_xticks(range(len(groups)))
    bottom.set_xticklabels([label for label, _ in groups], fontsize=7, rotation=0)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
