"""Instructions per event of the pure parts of a durable batch, under callgrind.

    valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        python -m bench.percost --keys 10 --stage all --repeat 10

Builds the bench's 1,000-event JSON requests (``bench.loadgen.render_event``, the
batch scenario's events: a key of ``keys``, an RFC 3339 time in the last 24 h, a
value, no tags), folds the pool into a head first (the steady state of a flush
window, where most events land in slots the head holds), then runs ``stage``
``repeat`` times on one request: ``decode`` (:func:`trioagg.ingest.decode.decode_events`),
``encode`` (the journal blob), ``fold`` (:meth:`trioagg.store.head.Head.add`), or
``all`` three; ``fold-new`` folds into an empty head (every slot new, as after a
flush). Run it at 0 and 10 repeats: the difference of the totals callgrind prints,
divided by 10 and by 1,000, is the instructions per event, start-up and set-up
cancelled out (``python -m bench.percost --callgrind`` does exactly that).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import random
import re
import subprocess
import sys

EVENTS = 1000
#: A fixed clock and hash seed: the same run gives the same count (to the instruction).
NOW = 1_765_000_000.0
STAGES = ("all", "decode", "encode", "fold", "fold-new")
POOL = 16


def bodies(keys: int, now: float) -> list[bytes]:
    from bench.loadgen import render_event

    rng = random.Random(7)
    template = {"keys": keys, "start": now - 86400, "span": 86400 - 60}
    return [
        b"[%s]" % b",".join(render_event(rng, template) for _ in range(EVENTS)) for _ in range(POOL)
    ]


def run(keys: int, stage: str, repeat: int) -> None:
    from trioagg.ingest.decode import Limits, decode_events
    from trioagg.store.head import Head, encode_batch

    now = NOW
    limits = Limits(max_batch=10_000, max_future=300.0, max_age=None)
    pool = [decode_events(body, ndjson=False, limits=limits, now=now) for body in bodies(keys, now)]
    body = bodies(keys, now)[0]
    head = Head()

    def keeps(key: str) -> bool:
        return False

    for seq, points in enumerate(pool):
        head.add(points, seq, 3600, keeps)
    points = pool[0]
    for seq in range(repeat):
        if stage in ("decode", "all"):
            points = decode_events(body, ndjson=False, limits=limits, now=now)
        if stage in ("encode", "all"):
            encode_batch(points)
        if stage in ("fold", "all"):
            head.add(points, POOL + seq, 3600, keeps)
        if stage == "fold-new":
            Head().add(points, POOL + seq, 3600, keeps)


def instructions(keys: int, stage: str, repeat: int) -> int:
    done = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            sys.executable,
            "-m",
            "bench.percost",
            "--keys",
            str(keys),
            "--stage",
            stage,
            "--repeat",
            str(repeat),
        ],
        env={**os.environ, "PYTHONHASHSEED": "0"},
        capture_output=True,
        text=True,
        check=True,
    )
    found = re.search(r"Collected : (\d+)", done.stderr)
    assert found is not None, done.stderr
    return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, nargs="+", default=[10, 1000])
    parser.add_argument("--stage", choices=STAGES, nargs="+", default=list(STAGES))
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument(
        "--callgrind",
        action="store_true",
        help="run each stage under callgrind at 0 and 10 repeats (two at a time) and "
        "print instructions per event",
    )
    args = parser.parse_args()
    if not args.callgrind:
        run(args.keys[0], args.stage[0], args.repeat)
        return
    # One run at 0 repeats per key count (the set-up, the same for every stage).
    runs = [(keys, "all", 0) for keys in args.keys]
    runs += [(keys, stage, 10) for keys in args.keys for stage in args.stage]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        totals = dict(zip(runs, pool.map(lambda run: instructions(*run), runs), strict=True))
    for keys in args.keys:
        for stage in args.stage:
            per_event = (totals[(keys, stage, 10)] - totals[(keys, "all", 0)]) / 10 / EVENTS
            print(f"keys={keys:<6} {stage:<8} {per_event:8,.0f} instructions per event")


if __name__ == "__main__":
    main()
