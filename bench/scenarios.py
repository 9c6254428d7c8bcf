"""The scenarios of ``just bench``, the baselines they run, and the targets.

Each scenario function takes the :class:`~bench.runner.Bench`, makes its
measurements (a fresh store each) and returns a :class:`ScenarioResult`:
rows for the table and chart, facts (rows condensed, 503 share, ...) and the
raw measurements. The baseline measurements (ceiling, naive) are cached per
run, so two scenarios that compare against the same baseline load share it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from trioagg.keys.admin import new_secret

from . import authcost, godesign, stalls
from .runner import Bench, Measurement, client_share, cpu_per_1k, db_cpu_per_1k
from .server import Deployment

SCENARIOS = (
    "seed",
    "batch",
    "durable",
    "mixed",
    "overload",
    "scaling",
    "sketches",
    "client",
    "wrk",
    "auth",
    "protocols",
    "tiers",
)
#: what ``--quick`` runs unless told otherwise: all but the wrk cross-check (its three
#: servers and the Go design's drain) and auth (four servers), which would take more
#: than the quick run's two minutes
QUICK_SCENARIOS = tuple(name for name in SCENARIOS if name not in ("wrk", "auth"))


@dataclass(frozen=True)
class Sizes:
    """How much each scenario does: the full run and ``--quick``."""

    seed_writes: int = 30_000
    seed_reads: int = 100_000
    baseline_requests: int = 30_000
    baseline_s: float = 8.0
    naive_s: float = 5.0
    batch_s: float = 8.0
    ndjson_s: float = 5.0
    durable_requests: int = 30_000
    mixed_s: float = 6.0
    overload_s: float = 10.0
    scaling_s: float = 4.0
    scaling_keys: tuple[int, ...] = (10, 1_000, 100_000)
    scaling_batches: tuple[int, ...] = (1, 10, 100)
    #: key counts of the batch scenario (1,000 = the issue's shape, with NDJSON too)
    batch_keys: tuple[int, ...] = (10, 1_000, 100_000)
    #: the wrk cross-check: seconds of wrk per server
    wrk_s: float = 8.0
    # --store postgres: every cell of the workers x writers matrix
    pg_batch_s: float = 6.0
    pg_seed_writes: int = 30_000
    pg_seed_s: float = 6.0
    pg_reads_s: float = 3.0
    pg_baseline_s: float = 3.0
    # the client path: the seed's single events through trioagg.client; trioagg ingest
    client_events: int = 30_000
    ingest_lines: int = 1_000_000
    #: events of each protocol (JSON arrays, OTLP exports, StatsD datagrams)
    protocol_events: int = 200_000
    #: the tiers scenario: series and simulated days of 1-minute data. Not issue 22's
    #: 1,000 series: the store takes about 100,000 events/s here, so a year of 1,000
    #: series (525.6 M events per store) would take hours; the size per series and the
    #: roll per simulated day grow with the series, and are also given per 1,000 series
    tiers_series: int = 20
    tiers_days: int = 365


def scaled(sizes: Sizes, factor: float) -> Sizes:
    """``sizes`` with every count and duration multiplied by ``factor`` (``--scale``)."""
    if factor == 1:
        return sizes
    changes: dict[str, Any] = {}
    for name, value in asdict(sizes).items():
        if isinstance(value, (bool, tuple)):
            continue
        if isinstance(value, int):
            changes[name] = max(1, round(value * factor))
        elif isinstance(value, float):
            changes[name] = max(0.2, value * factor)
    return replace(sizes, **changes)


FULL = Sizes()
QUICK = Sizes(
    seed_writes=2_000,
    seed_reads=2_500,
    baseline_requests=2_000,
    baseline_s=1.5,
    naive_s=1.0,
    batch_s=1.5,
    ndjson_s=1.0,
    durable_requests=2_000,
    mixed_s=1.2,
    overload_s=2.0,
    scaling_s=1.0,
    scaling_keys=(10, 1_000),
    scaling_batches=(10,),
    batch_keys=(1_000,),
    wrk_s=3.0,
    pg_batch_s=2.5,
    pg_seed_writes=5_000,
    pg_seed_s=2.5,
    pg_reads_s=1.5,
    pg_baseline_s=1.5,
    client_events=2_000,
    ingest_lines=30_000,
    protocol_events=20_000,
    tiers_series=2,
    tiers_days=14,
)

KEYS = 1_000
DAY = 86_400
BATCH_EVENTS = 1_000
BATCH_CONNECTIONS = 16
NAIVE_BATCH_CONNECTIONS = 4
#: the batch load under which reads are measured (mixed scenario): a steady stream,
#: not a saturating one
READS_BATCH_CONNECTIONS = 4
OVERLOAD_CONNECTIONS = 256
OVERLOAD_FLAGS = ("--queue-size", "4", "--enqueue-timeout", "100ms")


@dataclass
class Row:
    """One line of the table: one system's result for one measurement of a scenario."""

    scenario: str
    key: str
    what: str
    system: str
    unit: str
    rate: float
    elapsed_s: float
    requests: int
    events: int
    latency_ms: dict[str, float | None]
    server_cpu_1k: float | None
    client_cpu_1k: float | None
    client_share: float | None
    note: str = ""
    #: PostgreSQL's CPU seconds per 1,000 requests (``--store postgres``)
    db_cpu_1k: float | None = None
    #: the longest event-loop stall of the phase, an upper bound in ms (``bench.stalls``);
    #: None for the baselines, which have no heartbeat
    loop_stall_ms: float | None = None
    #: heartbeats of the phase more than 10 ms late
    loop_stalls_over_10ms: int | None = None
    #: the most CPU one task step used on the event loop in the phase, an upper bound
    #: in ms (0: under 1 ms); None if beyond the histogram or nothing was timed
    loop_step_cpu_ms: float | None = None
    #: task steps the server timed in the phase (None: no step timer)
    loop_steps_timed: int | None = None


@dataclass
class ScenarioResult:
    name: str
    rows: list[Row] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)
    measurements: list[Measurement] = field(default_factory=list)
    error: str | None = None

    def row(self, key: str, system: str) -> Row | None:
        return next((r for r in self.rows if r.key == key and r.system == system), None)

    def to_json(self) -> dict[str, Any]:
        return {
            "rows": [asdict(row) for row in self.rows],
            "facts": self.facts,
            "error": self.error,
            "measurements": [m.to_json() for m in self.measurements],
        }


# ---------------------------------------------------------------------- request templates


def events_request(
    bench: Bench,
    *,
    events: int = 1,
    keys: int = KEYS,
    fmt: str = "json",
    wait: bool = True,
    bearer: str | None = None,
) -> dict[str, Any]:
    """Events over ``keys`` keys with timestamps spread over one whole past day, sent
    with ``Authorization: Bearer <bearer>`` when given."""
    return {
        "bearer": bearer,
        "kind": "events",
        "events": events,
        "array": events > 1,
        "keys": keys,
        "start": bench.day_start,
        "span": DAY,
        "format": fmt,
        "wait": wait,
    }


def reads_request(bench: Bench, keys: int = KEYS) -> dict[str, Any]:
    """One key's day of hourly buckets (24 of them)."""
    return {
        "kind": "aggregates",
        "keys": keys,
        "from": bench.day_start,
        "to": bench.day_start + DAY,
        "granularity": "hour",
    }


def stream(
    name: str,
    mix: list[tuple[str, float, dict[str, Any]]],
    *,
    connections: int,
    requests: int | None = None,
    duration: float | None = None,
    pool: int = 1_000,
) -> dict[str, Any]:
    return {
        "name": name,
        "connections": connections,
        "requests": requests,
        "duration": duration,
        "pool": pool,
        "mix": [{"class": cls, "weight": weight, "request": req} for cls, weight, req in mix],
    }


def phase(name: str, *streams: dict[str, Any], max_seconds: float = 300.0) -> dict[str, Any]:
    return {"name": name, "streams": list(streams), "max_seconds": max_seconds}


def writes_phase(
    bench: Bench,
    requests: int,
    *,
    duration: float | None = None,
    pool: int | None = None,
    wait: bool = True,
    bearer: str | None = None,
) -> dict[str, Any]:
    """Single-event writes over 1,000 keys and 24 h (the seed design's load);
    ``pool`` distinct requests, by default one per request."""
    return phase(
        "writes",
        stream(
            "w",
            [("write", 1, events_request(bench, wait=wait, bearer=bearer))],
            connections=bench.options.connections,
            requests=requests,
            duration=duration,
            pool=pool or requests,
        ),
    )


def reads_phase(
    bench: Bench, requests: int | None, *, duration: float | None = None
) -> dict[str, Any]:
    """Random reads of one key's day of hourly buckets."""
    return phase(
        "reads",
        stream(
            "r",
            [("read", 1, reads_request(bench))],
            connections=bench.options.connections,
            requests=requests,
            duration=duration,
            pool=5_000,
        ),
    )


def make_row(
    scenario: str,
    key: str,
    what: str,
    m: Measurement,
    phase_name: str,
    stream_name: str,
    cls: str,
    unit: str = "req/s",
    note: str = "",
) -> Row:
    data = m.stream_class(phase_name, stream_name, cls)
    ph = m.phases[phase_name]
    elapsed = m.phases[phase_name]["streams"][stream_name]["elapsed_s"]
    server_1k, client_1k = cpu_per_1k(ph)
    rate = data["acked_events_per_s"] if unit == "events/s" else data["ok_per_s"]
    phase_stalls = ph.get("loop_stalls")
    return Row(
        scenario=scenario,
        key=key,
        what=what,
        system=m.app,
        unit=unit,
        rate=float(rate or 0.0),
        elapsed_s=float(elapsed),
        requests=int(data["requests"]),
        events=int(data["acked_events"]),
        latency_ms=data["ok_latency_ms"],
        server_cpu_1k=server_1k,
        client_cpu_1k=client_1k,
        client_share=None if client_share(ph) is None else round(client_share(ph) or 0.0, 3),
        note=note,
        db_cpu_1k=db_cpu_per_1k(ph),
        loop_stall_ms=stalls.bound_ms(phase_stalls, m.server.get("loop_stalls")),
        loop_stalls_over_10ms=phase_stalls["over_10ms"] if phase_stalls else None,
        loop_step_cpu_ms=stalls.step_bound_ms(phase_stalls, m.server.get("loop_stalls")),
        loop_steps_timed=phase_stalls.get("cpu_steps_timed") if phase_stalls else None,
    )


def _baseline(bench: Bench, name: str, make: Callable[[], Measurement]) -> Measurement:
    if name not in bench.cache:
        bench.cache[name] = make()
    measurement: Measurement = bench.cache[name]
    return measurement


def ceiling_single(bench: Bench, sizes: Sizes) -> Measurement:
    """The ceiling with the seed load: single-event POSTs, then one key's day of reads."""

    def make() -> Measurement:
        writes = min(sizes.baseline_requests, sizes.seed_writes)
        return bench.measure(
            "ceiling single+reads",
            "ceiling",
            [
                writes_phase(bench, writes, duration=sizes.baseline_s, pool=sizes.seed_writes),
                reads_phase(bench, sizes.seed_reads, duration=sizes.baseline_s),
            ],
        )

    return _baseline(bench, "ceiling single", make)


def naive_single(bench: Bench, sizes: Sizes) -> Measurement:
    def make() -> Measurement:
        return bench.measure(
            "naive single",
            "naive",
            [writes_phase(bench, sizes.seed_writes, duration=sizes.naive_s)],
        )

    return _baseline(bench, "naive single", make)


def go_design(bench: Bench, label: str, phases: list[dict[str, Any]]) -> Measurement | None:
    """The Go design under ``phases`` (a fresh store), or None when baselines are off or
    it cannot be built here (the skip line is printed once per run)."""
    if not bench.options.baselines or bench.go_binary() is None:
        return None
    return bench.measure(label, godesign.APP, phases)


def committed_row(row: Row, m: Measurement) -> Row:
    """A Go design row in committed events/s: its last phase's acknowledged events over
    the phase plus the drain after SIGTERM (it answers before it commits)."""
    drain = float(m.server.get("stop_s") or 0.0)
    return replace(
        row,
        rate=godesign.committed_rate(row.events, row.elapsed_s, drain),
        note=f"committed, incl. {drain:.2f} s drain; answered {row.rate:,.0f}/s before commit",
    )


def go_ratios(result: ScenarioResult) -> dict[str, float]:
    """trioagg rate / Go design rate for every row key both measured."""
    ratios = {}
    for row in result.rows:
        go = result.row(row.key, godesign.APP)
        if row.system == "trioagg" and go is not None and go.rate:
            ratios[row.key] = round(row.rate / go.rate, 3)
    return ratios


# ---------------------------------------------------------------------- scenarios


def seed(bench: Bench, sizes: Sizes) -> ScenarioResult:
    """30 K single-event writes over 1,000 keys and 24 h, then 100 K random reads."""
    result = ScenarioResult("seed")
    m = bench.measure(
        "seed",
        "trioagg",
        [writes_phase(bench, sizes.seed_writes), reads_phase(bench, sizes.seed_reads)],
    )
    result.measurements.append(m)
    writes = f"{sizes.seed_writes:,} single writes"
    reads = f"{sizes.seed_reads:,} reads, 1 key x 24 h"
    rows = m.store["rows"] if m.store else None
    result.rows.append(
        make_row("seed", "writes", writes, m, "writes", "w", "write", note=f"{rows:,} rows")
    )
    result.rows.append(make_row("seed", "reads", reads, m, "reads", "r", "read"))
    result.facts.update(
        writes_s=m.phases["writes"]["elapsed_s"],
        reads_s=m.phases["reads"]["elapsed_s"],
        events=m.store["events"] if m.store else None,
        rows=rows,
    )
    if bench.options.baselines:
        ceiling = ceiling_single(bench, sizes)
        naive = naive_single(bench, sizes)
        result.measurements += [ceiling, naive]
        result.rows.append(make_row("seed", "writes", writes, ceiling, "writes", "w", "write"))
        result.rows.append(make_row("seed", "writes", writes, naive, "writes", "w", "write"))
        result.rows.append(make_row("seed", "reads", reads, ceiling, "reads", "r", "read"))
    go = go_design(
        bench,
        "seed",
        [writes_phase(bench, sizes.seed_writes), reads_phase(bench, sizes.seed_reads)],
    )
    if go is not None:
        result.measurements.append(go)
        note = "202 before commit"
        result.rows.append(
            make_row("seed", "writes", writes, go, "writes", "w", "write", note=note)
        )
        result.rows.append(make_row("seed", "reads", reads, go, "reads", "r", "read"))
        result.facts["trioagg_over_go"] = go_ratios(result)
    return result


def batch_key(keys: int) -> str:
    """Row key of the batch scenario's JSON measurement over ``keys`` keys."""
    return "json" if keys == KEYS else f"json keys={keys}"


def batch(bench: Bench, sizes: Sizes) -> ScenarioResult:
    """1,000-event requests, durable: JSON arrays and NDJSON; 10, 1 K, 100 K keys; Go design.

    The Go design's events/s are committed events/s (its drain after SIGTERM included)."""
    result = ScenarioResult("batch")

    def json_phase(seconds: float, conns: int, keys: int = KEYS) -> dict[str, Any]:
        # enough distinct requests that repeats do not hide new keys
        pool = max(64, min(256, keys // BATCH_EVENTS))
        request = events_request(bench, events=BATCH_EVENTS, keys=keys)
        return phase(
            "json",
            stream("json", [("write", 1, request)], connections=conns, duration=seconds, pool=pool),
        )

    def ndjson_phase(seconds: float, conns: int) -> dict[str, Any]:
        request = events_request(bench, events=BATCH_EVENTS, fmt="ndjson")
        return phase(
            "ndjson",
            stream("ndjson", [("write", 1, request)], connections=conns, duration=seconds, pool=64),
        )

    def json_row(m: Measurement, keys: int = KEYS, note: str = "") -> Row:
        what = f"1,000-event JSON, {keys:,} keys"
        return make_row(
            "batch", batch_key(keys), what, m, "json", "json", "write", "events/s", note
        )

    m = bench.measure(
        "batch",
        "trioagg",
        [
            json_phase(sizes.batch_s, BATCH_CONNECTIONS),
            ndjson_phase(sizes.ndjson_s, BATCH_CONNECTIONS),
        ],
    )
    result.measurements.append(m)
    nd_what = "1,000-event NDJSON"
    result.rows.append(json_row(m))
    result.rows.append(
        make_row("batch", "ndjson", nd_what, m, "ndjson", "ndjson", "write", "events/s")
    )
    result.facts["rows"] = m.store["rows"] if m.store else None
    if bench.options.baselines:
        half = sizes.baseline_s / 2
        ceiling = bench.measure(
            "batch",
            "ceiling",
            [json_phase(half, BATCH_CONNECTIONS), ndjson_phase(half, BATCH_CONNECTIONS)],
        )
        naive = bench.measure(
            "batch", "naive", [json_phase(sizes.naive_s / 2, NAIVE_BATCH_CONNECTIONS)]
        )
        result.measurements += [ceiling, naive]
        result.rows.append(json_row(ceiling))
        result.rows.append(
            make_row("batch", "ndjson", nd_what, ceiling, "ndjson", "ndjson", "write", "events/s")
        )
        result.rows.append(json_row(naive, note=f"{NAIVE_BATCH_CONNECTIONS} connections"))
    for keys in sizes.batch_keys:
        seconds = sizes.batch_s if keys == KEYS else sizes.scaling_s
        if keys != KEYS:
            variant = bench.measure(
                f"batch {keys} keys", "trioagg", [json_phase(seconds, BATCH_CONNECTIONS, keys)]
            )
            result.measurements.append(variant)
            rows = variant.store["rows"] if variant.store else 0
            result.rows.append(json_row(variant, keys, note=f"{rows:,} rows"))
        go = go_design(bench, f"batch {keys} keys", [json_phase(seconds, BATCH_CONNECTIONS, keys)])
        if go is not None:
            result.measurements.append(go)
            result.rows.append(committed_row(json_row(go, keys), go))
    ratios = go_ratios(result)
    if ratios:
        result.facts["trioagg_over_go"] = ratios
    return result


def durable(bench: Bench, sizes: Sizes) -> ScenarioResult:
    """The same single-event load with ?wait=false and durable, each on a fresh store."""
    result = ScenarioResult("durable")
    c = bench.options.connections
    n = sizes.durable_requests
    for wait, key in ((False, "wait=false"), (True, "durable")):
        m = bench.measure(
            f"durable {key}",
            "trioagg",
            [
                phase(
                    key,
                    stream(
                        "w",
                        [("write", 1, events_request(bench, wait=wait))],
                        connections=c,
                        requests=n,
                        pool=n,
                    ),
                )
            ],
        )
        result.measurements.append(m)
        result.rows.append(make_row("durable", key, f"{n:,} single, {key}", m, key, "w", "write"))
    fast, slow = result.row("wait=false", "trioagg"), result.row("durable", "trioagg")
    if fast and slow and slow.rate:
        result.facts["wait_false_over_durable"] = round(fast.rate / slow.rate, 3)
    if bench.options.baselines:
        ceiling = ceiling_single(bench, sizes)
        if ceiling not in result.measurements:
            result.measurements.append(ceiling)
        for key in ("wait=false", "durable"):
            result.rows.append(
                make_row("durable", key, "single (ceiling)", ceiling, "writes", "w", "write")
            )
    return result


def mixed(bench: Bench, sizes: Sizes) -> ScenarioResult:
    """Reads alone, writes alone, 80/20 read/write, then reads during a batch load.

    On a filled store; both read rates are compared with the ceiling's reads alone."""
    result = ScenarioResult("mixed")
    c = bench.options.connections
    read = ("read", 4.0, reads_request(bench))
    write = ("write", 1.0, events_request(bench))
    batch_write = ("batch", 1.0, events_request(bench, events=BATCH_EVENTS))
    reads_alone = phase("reads alone", stream("r", [read], connections=c, duration=sizes.mixed_s))
    # reads on their connections while 1,000-event arrays stream in on a few others
    reads_batch = phase(
        "reads+batch",
        stream("r", [read], connections=c, duration=sizes.mixed_s),
        stream(
            "b",
            [batch_write],
            connections=READS_BATCH_CONNECTIONS,
            duration=sizes.mixed_s,
            pool=64,
        ),
    )
    m = bench.measure(
        "mixed",
        "trioagg",
        [
            phase(
                "prefill",
                stream(
                    "fill",
                    [("write", 1, events_request(bench, events=BATCH_EVENTS))],
                    connections=8,
                    requests=30,
                    pool=30,
                ),
            ),
            reads_alone,
            phase("writes alone", stream("w", [write], connections=c, duration=sizes.mixed_s)),
            phase(
                "80/20",
                stream("rw", [read, write], connections=c, duration=sizes.mixed_s, pool=5_000),
            ),
            reads_batch,
        ],
    )
    result.measurements.append(m)
    during = f"reads, {READS_BATCH_CONNECTIONS} conns of batches"
    batch_what = f"batch under reads ({READS_BATCH_CONNECTIONS} conns)"
    result.rows += [
        make_row("mixed", "reads alone", "reads alone", m, "reads alone", "r", "read"),
        make_row("mixed", "reads mixed", "reads, 80/20 mix", m, "80/20", "rw", "read"),
        make_row("mixed", "writes alone", "writes alone", m, "writes alone", "w", "write"),
        make_row("mixed", "writes mixed", "writes, 80/20 mix", m, "80/20", "rw", "write"),
        make_row("mixed", "reads batch", during, m, "reads+batch", "r", "read"),
        make_row("mixed", "batch reads", batch_what, m, "reads+batch", "b", "batch", "events/s"),
    ]
    for kind, alone_key, mix_key in (
        ("read", "reads alone", "reads mixed"),
        ("write", "writes alone", "writes mixed"),
    ):
        alone, mix = result.row(alone_key, "trioagg"), result.row(mix_key, "trioagg")
        assert alone is not None and mix is not None
        a99, m99 = alone.latency_ms.get("p99"), mix.latency_ms.get("p99")
        if a99 and m99:
            result.facts[f"{kind}_p99_mixed_over_alone"] = round(m99 / a99, 3)
        result.facts[f"{kind}_max_ms_mixed"] = mix.latency_ms.get("max")
    during_row = result.row("reads batch", "trioagg")
    assert during_row is not None
    result.facts["read_p99_ms_during_batch"] = during_row.latency_ms.get("p99")
    if bench.options.baselines:
        ceiling = bench.measure("mixed", "ceiling", [reads_alone])
        result.measurements.append(ceiling)
        result.rows.append(
            make_row("mixed", "reads alone", "reads alone", ceiling, "reads alone", "r", "read")
        )
        ratios = read_ratios(result)
        result.facts.update(ratios)
        if "reads_during_batch_x_ceiling" in ratios:
            during_row.note = (
                f"{ratios['reads_during_batch_x_ceiling']:.2f} x the ceiling's reads alone"
            )
    return result


def read_ratios(result: ScenarioResult) -> dict[str, float]:
    """trioagg's reads alone and during a batch load over the ceiling's reads alone."""
    ratios: dict[str, float] = {}
    ceiling = result.row("reads alone", "ceiling")
    for name, key in (
        ("reads_alone_x_ceiling", "reads alone"),
        ("reads_during_batch_x_ceiling", "reads batch"),
    ):
        ours = result.row(key, "trioagg")
        if ours and ceiling and ceiling.rate:
            ratios[name] = round(ours.rate / ceiling.rate, 3)
    return ratios


def overload(bench: Bench, sizes: Sizes) -> ScenarioResult:
    """Far more 1,000-event requests than the writer takes, into a 4-request queue."""
    result = ScenarioResult("overload")
    m = bench.measure(
        "overload",
        "trioagg",
        [
            phase(
                "overload",
                stream(
                    "o",
                    [("write", 1, events_request(bench, events=BATCH_EVENTS))],
                    connections=OVERLOAD_CONNECTIONS,
                    duration=sizes.overload_s,
                    pool=64,
                ),
            )
        ],
        server_flags=OVERLOAD_FLAGS,
        allowed_statuses=frozenset({503}),
    )
    result.measurements.append(m)
    data = m.stream_class("overload", "o", "write")
    total = data["requests"] or 1
    rejected = data["statuses"].get("503", 0)
    peak = m.server["peak_rss_bytes"]["max"]
    share = rejected / total
    result.rows.append(
        make_row(
            "overload",
            "accepted",
            f"{OVERLOAD_CONNECTIONS} conns x 1,000 events",
            m,
            "overload",
            "o",
            "write",
            "events/s",
            note=f"503: {share:.0%}, RSS {peak / 2**20:.0f} MB",
        )
    )
    result.facts.update(
        offered_req_per_s=data["req_per_s"],
        accepted_req_per_s=data["ok_per_s"],
        rejected_503=rejected,
        share_503=round(share, 4),
        latency_503_ms=percentiles_of_other(m, "overload", "o", "write"),
        peak_rss_mb=round(peak / 2**20, 1),
        lost_acked_events=(m.verdict["acked_events"] - (m.verdict["stored_events"] or 0)),
        server_flags=list(OVERLOAD_FLAGS),
    )
    return result


def percentiles_of_other(m: Measurement, ph: str, st: str, cls: str) -> dict[str, Any]:
    """Latency of every answer (2xx and not) of a class: for 503s under overload."""
    return dict(m.stream_class(ph, st, cls)["latency_ms"])


def scaling(bench: Bench, sizes: Sizes) -> ScenarioResult:
    """Events/s and rows as distinct keys grow, and as the request batch size varies."""
    result = ScenarioResult("scaling")
    points = [(keys, BATCH_EVENTS) for keys in sizes.scaling_keys]
    points += [(KEYS, size) for size in sizes.scaling_batches if (KEYS, size) not in points]
    for keys, size in points:
        conns = BATCH_CONNECTIONS if size >= 100 else bench.options.connections
        # enough distinct requests that repeats do not hide new keys
        pool = min(256, max(64, keys // size)) if size > 1 else 20_000
        m = bench.measure(
            f"scaling {keys} keys x {size}",
            "trioagg",
            [
                phase(
                    "ingest",
                    stream(
                        "s",
                        [("write", 1, events_request(bench, events=size, keys=keys))],
                        connections=conns,
                        duration=sizes.scaling_s,
                        pool=pool,
                    ),
                )
            ],
        )
        result.measurements.append(m)
        rows = m.store["rows"] if m.store else 0
        events = m.store["events"] if m.store else 0
        cpu = m.phases["ingest"]["cpu"]["server_s"]
        per_event_us = cpu / events * 1e6 if events else None
        note = f"{rows:,} rows"
        if per_event_us is not None:
            note += f", {per_event_us:.1f} us CPU/event"
        key = f"keys={keys} batch={size}"
        result.rows.append(
            make_row(
                "scaling",
                key,
                f"{keys:,} keys, {size:,}/request",
                m,
                "ingest",
                "s",
                "write",
                "events/s",
                note=note,
            )
        )
        result.facts[key] = {
            "rows": rows,
            "events": events,
            "server_cpu_us_per_event": per_event_us,
        }
    return result


def sketches(bench: Bench, sizes: Sizes) -> ScenarioResult:
    """What sketches cost: the batch load plain, then with a quantile sketch for every
    key (--quantiles '*') and a distinct_id on every event, each on a fresh store."""
    result = ScenarioResult("sketches")
    variants = [
        ("plain", "no sketches", (), events_request(bench, events=BATCH_EVENTS)),
        (
            "sketched",
            "KLL + HLL on every event",
            ("--quantiles", "*"),
            {**events_request(bench, events=BATCH_EVENTS), "distinct_ids": 100_000},
        ),
    ]
    for key, what, flags, request in variants:
        m = bench.measure(
            f"sketches {key}",
            "trioagg",
            [
                phase(
                    "ingest",
                    stream(
                        "s",
                        [("write", 1, request)],
                        connections=BATCH_CONNECTIONS,
                        duration=sizes.scaling_s,
                        pool=64,
                    ),
                )
            ],
            server_flags=flags,
        )
        result.measurements.append(m)
        rows = m.store["rows"] if m.store else 0
        result.rows.append(
            make_row(
                "sketches", key, what, m, "ingest", "s", "write", "events/s", note=f"{rows:,} rows"
            )
        )
    plain, sketched = (row.rate for row in result.rows)
    if plain and sketched:
        result.facts["sketched / plain"] = round(sketched / plain, 3)
    return result


# ---------------------------------------------------------------------- PostgreSQL matrix

#: The scenarios ``--store postgres`` runs as a workers x writers matrix.
PG_MATRIX = ("seed", "batch")


def cell_key(base: str, workers: int, writers: int | None = None) -> str:
    """Row key of one matrix cell (``writes workers=2 writers=4``); a baseline has no writers."""
    key = f"{base} workers={workers}"
    return key if writers is None else f"{key} writers={writers}"


def parse_cell_key(key: str) -> tuple[str, int, int | None]:
    """``writes workers=2 writers=4`` -> ``("writes", 2, 4)``."""
    base, *pairs = key.split()
    values = dict(pair.split("=", 1) for pair in pairs)
    writers = values.get("writers")
    return base, int(values["workers"]), None if writers is None else int(writers)


def matrix_deployment(bench: Bench, workers: int) -> Deployment:
    """The run's deployment with ``workers`` worker processes."""
    return replace(bench.options.deployment, workers=workers)


def _cell_facts(m: Measurement, row: Row, workers: int, writers: int | None) -> dict[str, Any]:
    return {
        "workers": workers,
        "writers": writers,
        "system": m.app,
        "rate": row.rate,
        "unit": row.unit,
        "p99_ms": row.latency_ms.get("p99"),
        "server_cpu_ms_per_req": row.server_cpu_1k,
        "db_cpu_ms_per_req": row.db_cpu_1k,
        "rows": m.store["rows"] if m.store else None,
    }


def pg_seed(bench: Bench, sizes: Sizes) -> ScenarioResult:
    """seed on PostgreSQL: single-event writes, then reads, for every workers x writers cell."""
    result = ScenarioResult("seed")
    writes = f"{sizes.pg_seed_writes:,} single writes (<= {sizes.pg_seed_s:g} s)"
    reads = f"reads, 1 key x 24 h ({sizes.pg_reads_s:g} s)"

    def phases(writes_s: float, reads_s: float) -> list[dict[str, Any]]:
        return [
            writes_phase(bench, sizes.pg_seed_writes, duration=writes_s),
            reads_phase(bench, None, duration=reads_s),
        ]

    def add_rows(m: Measurement, workers: int, writers: int | None, note: str) -> None:
        for base, what, ph, st, cls in (
            ("writes", writes, "writes", "w", "write"),
            ("reads", reads, "reads", "r", "read"),
        ):
            row = make_row(
                "seed", cell_key(base, workers, writers), what, m, ph, st, cls, note=note
            )
            result.rows.append(row)
            cells.append({"measure": base, **_cell_facts(m, row, workers, writers)})

    cells: list[dict[str, Any]] = []
    for workers in bench.options.pg_workers:
        deployment = matrix_deployment(bench, workers)
        for writers in bench.options.pg_writers:
            m = bench.measure(
                f"pg seed {workers} worker(s) {writers} writer(s)",
                "trioagg",
                phases(sizes.pg_seed_s, sizes.pg_reads_s),
                server_flags=("--writers", str(writers)),
                deployment=deployment,
            )
            result.measurements.append(m)
            add_rows(m, workers, writers, f"{workers} worker(s) x {writers} writer(s)")
        if bench.options.baselines:
            ceiling = bench.measure(
                f"pg seed ceiling {workers} worker(s)",
                "ceiling",
                phases(sizes.pg_baseline_s, sizes.pg_baseline_s),
                deployment=deployment,
            )
            result.measurements.append(ceiling)
            add_rows(ceiling, workers, None, f"{workers} worker(s), stores nothing")
    result.facts["store"] = "postgres"
    result.facts["cells"] = cells
    return result


def pg_batch(bench: Bench, sizes: Sizes) -> ScenarioResult:
    """batch on PostgreSQL: 1,000-event JSON arrays, durable, for every workers x writers cell."""
    result = ScenarioResult("batch")
    what = f"1,000-event JSON arrays ({sizes.pg_batch_s:g} s)"

    def phases(seconds: float) -> list[dict[str, Any]]:
        return [
            phase(
                "json",
                stream(
                    "json",
                    [("write", 1, events_request(bench, events=BATCH_EVENTS))],
                    connections=BATCH_CONNECTIONS,
                    duration=seconds,
                    pool=64,
                ),
            )
        ]

    cells: list[dict[str, Any]] = []
    for workers in bench.options.pg_workers:
        deployment = matrix_deployment(bench, workers)
        for writers in bench.options.pg_writers:
            m = bench.measure(
                f"pg batch {workers} worker(s) {writers} writer(s)",
                "trioagg",
                phases(sizes.pg_batch_s),
                server_flags=("--writers", str(writers)),
                deployment=deployment,
            )
            result.measurements.append(m)
            row = make_row(
                "batch",
                cell_key("json", workers, writers),
                what,
                m,
                "json",
                "json",
                "write",
                "events/s",
                note=f"{workers} worker(s) x {writers} writer(s)",
            )
            result.rows.append(row)
            cells.append({"measure": "json", **_cell_facts(m, row, workers, writers)})
        if bench.options.baselines:
            ceiling = bench.measure(
                f"pg batch ceiling {workers} worker(s)",
                "ceiling",
                phases(sizes.pg_baseline_s),
                deployment=deployment,
            )
            result.measurements.append(ceiling)
            row = make_row(
                "batch",
                cell_key("json", workers),
                what,
                ceiling,
                "json",
                "json",
                "write",
                "events/s",
                note=f"{workers} worker(s), stores nothing",
            )
            result.rows.append(row)
            cells.append({"measure": "json", **_cell_facts(ceiling, row, workers, None)})
    result.facts["store"] = "postgres"
    result.facts["cells"] = cells
    return result


def client(bench: Bench, sizes: Sizes) -> ScenarioResult:
    """30 K single events through trioagg.client (1 thread; 64 tasks) vs 1 per request; ingest."""
    from .clientpath import client_scenario

    return client_scenario(bench, sizes)


def wrk(bench: Bench, sizes: Sizes) -> ScenarioResult:
    """wrk cross-check: 1,000-event arrays, 16 conns; trioagg serve, hypercorn, Go; committed/s.

    Committed events/s include the drain after SIGTERM (``bench.crosscheck``)."""
    from .crosscheck import wrk_scenario

    return wrk_scenario(bench, sizes)


def protocols(bench: Bench, sizes: Sizes) -> ScenarioResult:
    """The same events by JSON arrays, OTLP/HTTP exports and StatsD over UDP; committed/s."""
    from .protocols import protocols_scenario

    return protocols_scenario(bench, sizes)


#: Rounds of the auth scenario; each runs both modes, in turns (off first, then on first).
AUTH_ROUNDS = 2


def tiers(bench: Bench, sizes: Sizes) -> ScenarioResult:
    """A simulated year of 1-minute data written into a store with tiers and one
    without: size on disk, a year-long query, the roll per simulated day."""
    from .retention import tiers_scenario

    return tiers_scenario(bench, sizes)


def auth(bench: Bench, sizes: Sizes) -> ScenarioResult:
    """The seed's single-event writes, then 1,000-event JSON arrays, with ``--auth off``
    and with ``--auth on`` (every request carrying a key), each on a fresh store: what
    checking keys costs (the issue's goal: at most 3 % of throughput). The modes take
    turns for AUTH_ROUNDS rounds and each row is the mode's best, so that a neighbour's
    load during one measurement does not pass for the cost of keys. ``/metrics`` is
    public on both (the harness scrapes it for the loop stalls)."""
    result = ScenarioResult("auth")
    measured: dict[str, list[Measurement]] = {"off": [], "on": []}
    for round_number in range(AUTH_ROUNDS):
        for mode in ("off", "on") if round_number % 2 == 0 else ("on", "off"):
            secret = new_secret() if mode == "on" else None
            batches = stream(
                "b",
                [("write", 1, events_request(bench, events=BATCH_EVENTS, bearer=secret))],
                connections=BATCH_CONNECTIONS,
                duration=sizes.batch_s,
                pool=64,
            )
            m = bench.measure(
                f"auth {mode} {round_number + 1}",
                "trioagg",
                [writes_phase(bench, sizes.seed_writes, bearer=secret), phase("batch", batches)],
                server_flags=["--auth", mode, "--metrics-public", "true"],
                api_key=secret,
            )
            result.measurements.append(m)
            measured[mode].append(m)
    best = f"best of {AUTH_ROUNDS}"
    for mode, ms in measured.items():
        writes = f"auth {mode}: {sizes.seed_writes:,} single writes"
        rows = [make_row("auth", f"single {mode}", writes, m, "writes", "w", "write") for m in ms]
        result.rows.append(replace(max(rows, key=lambda row: row.rate), note=best))
        arrays = f"auth {mode}: 1,000-event arrays"
        rows = [
            make_row("auth", f"batch {mode}", arrays, m, "batch", "b", "write", "events/s")
            for m in ms
        ]
        result.rows.append(replace(max(rows, key=lambda row: row.rate), note=best))
    for kind in ("single", "batch"):
        off = _rate({"auth": result}, "auth", f"{kind} off", "trioagg")
        on = _rate({"auth": result}, "auth", f"{kind} on", "trioagg")
        result.facts[f"{kind}_on_over_off"] = round(on / off, 4) if on and off else None
    result.facts["check_us"] = round(authcost.check_microseconds(), 2)
    return result


PG_RUNNERS: dict[str, Callable[[Bench, Sizes], ScenarioResult]] = {
    "seed": pg_seed,
    "batch": pg_batch,
}


def runner_for(bench: Bench, name: str) -> Callable[[Bench, Sizes], ScenarioResult]:
    """The scenario function: the PostgreSQL matrix for seed and batch on ``--store postgres``."""
    if bench.options.store == "postgres" and name in PG_RUNNERS:
        return PG_RUNNERS[name]
    return RUNNERS[name]


RUNNERS: dict[str, Callable[[Bench, Sizes], ScenarioResult]] = {
    "seed": seed,
    "batch": batch,
    "durable": durable,
    "mixed": mixed,
    "overload": overload,
    "scaling": scaling,
    "sketches": sketches,
    "client": client,
    "wrk": wrk,
    "auth": auth,
    "protocols": protocols,
    "tiers": tiers,
}


# ---------------------------------------------------------------------- targets


@dataclass
class Target:
    name: str
    status: str  # PASS, MISS or SKIP
    measured: str
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _rate(results: dict[str, ScenarioResult], scenario: str, key: str, system: str) -> float | None:
    result = results.get(scenario)
    row = result.row(key, system) if result else None
    return row.rate if row else None


def _ratio_target(
    name: str, ours: float | None, theirs: float | None, factor: float, unit: str
) -> Target:
    if not ours or not theirs:
        return Target(name, "SKIP", "-", "not measured in this run")
    ratio = ours / theirs
    status = "PASS" if ratio >= factor else "MISS"
    return Target(name, status, f"{ratio:.3f} x", f"{ours:,.0f} vs {theirs:,.0f} {unit}")


def evaluate_targets(results: dict[str, ScenarioResult]) -> list[Target]:
    """The issue's targets, each PASS, MISS or SKIP (when its scenario did not run)."""
    ceiling_writes = _rate(results, "seed", "writes", "ceiling") or _rate(
        results, "durable", "durable", "ceiling"
    )
    targets = [
        _ratio_target(
            "single durable (seed writes) >= 0.9 x ceiling",
            _rate(results, "seed", "writes", "trioagg"),
            ceiling_writes,
            0.9,
            "req/s",
        ),
        _ratio_target(
            "single wait=false >= 0.9 x ceiling",
            _rate(results, "durable", "wait=false", "trioagg"),
            ceiling_writes,
            0.9,
            "req/s",
        ),
        _ratio_target(
            "single durable (seed writes) >= 5 x naive",
            _rate(results, "seed", "writes", "trioagg"),
            _rate(results, "seed", "writes", "naive"),
            5.0,
            "req/s",
        ),
    ]
    batch_rate = _rate(results, "batch", "json", "trioagg")
    if batch_rate is None:
        targets.append(Target("batch durable >= 200,000 events/s", "SKIP", "-", "not run"))
    else:
        targets.append(
            Target(
                "batch durable >= 200,000 events/s",
                "PASS" if batch_rate >= 200_000 else "MISS",
                f"{batch_rate / 200_000:.3f} x",
                f"{batch_rate:,.0f} events/s (1,000-event arrays, 1,000 keys, 24 h)",
            )
        )
    targets.append(
        _ratio_target(
            "batch durable >= 2 x Go design (committed)",
            batch_rate,
            _rate(results, "batch", "json", godesign.APP),
            2.0,
            "events/s",
        )
    )
    targets.append(
        _ratio_target(
            "reads >= 1.0 x ceiling GET",
            _rate(results, "seed", "reads", "trioagg"),
            _rate(results, "seed", "reads", "ceiling"),
            1.0,
            "req/s",
        )
    )
    targets.append(
        _ratio_target(
            "reads during batch ingest >= 0.8 x ceiling GET",
            _rate(results, "mixed", "reads batch", "trioagg"),
            _rate(results, "mixed", "reads alone", "ceiling"),
            0.8,
            "req/s",
        )
    )
    targets += client_targets(results)
    for kind in ("single", "batch"):
        targets.append(
            _ratio_target(
                f"auth on >= 0.97 x auth off ({kind})",
                _rate(results, "auth", f"{kind} on", "trioagg"),
                _rate(results, "auth", f"{kind} off", "trioagg"),
                0.97,
                "req/s" if kind == "single" else "events/s",
            )
        )
    over = results.get("overload")
    if over is None or over.error or not over.facts:
        targets.append(Target("overload: 0 lost, peak RSS < 300 MB", "SKIP", "-", "not run"))
    else:
        lost = over.facts["lost_acked_events"]
        peak = over.facts["peak_rss_mb"]
        ok = lost == 0 and peak < 300 and over.measurements[0].verdict["ok"]
        targets.append(
            Target(
                "overload: 0 lost, peak RSS < 300 MB",
                "PASS" if ok else "MISS",
                f"{lost} lost, {peak:.0f} MB",
                f"503 share {over.facts['share_503']:.0%}",
            )
        )
    return targets


def client_targets(results: dict[str, ScenarioResult]) -> list[Target]:
    """The client path: >= 20 x one request per event, all committed before the Go
    design's own one-request-per-event run of the same events (same run) had committed
    them, and trioagg ingest above 150 K events/s under 200 MB."""
    result = results.get("client")
    if result is None or result.error or not result.facts:
        return [Target("client path >= 20 x one per request", "SKIP", "-", "not run")]
    per_request = result.facts["per_request_events_per_s"]
    go_s = result.facts.get("go_design_s")
    targets = []
    for mode in ("thread", "tasks"):
        facts = result.facts[mode]
        targets.append(
            _ratio_target(
                f"client ({mode}) >= 20 x one per request",
                facts["events_per_s"],
                per_request,
                20.0,
                "events/s",
            )
        )
        name = f"client ({mode}) all committed before the Go design"
        total = facts["total_s"]
        if go_s is None:
            targets.append(Target(name, "SKIP", f"{total:.2f} s", "Go design not built here"))
            continue
        targets.append(
            Target(
                name,
                "PASS" if total < go_s else "MISS",
                f"{total:.2f} s vs {go_s:.2f} s",
                "all sent events committed, both in this run",
            )
        )
    ingest = result.facts["ingest"]
    ok = ingest["events_per_s"] > 150_000 and ingest["peak_rss_mb"] < 200
    targets.append(
        Target(
            "trioagg ingest > 150,000 events/s, client RSS < 200 MB",
            "PASS" if ok else "MISS",
            f"{ingest['events_per_s']:,} events/s, {ingest['peak_rss_mb']:.0f} MB",
        )
    )
    return targets
