"""The hostile soak: a real server process, on a SQLite store with small limits, under
a seeded random mix of honest and hostile clients (tests/soak_clients.py) for a
bounded time. Then it must still be up, stop cleanly, have logged no traceback and no
error, and hold exactly the events it acknowledged: no client may stop it, and none
may make it lose or double an event.

``TRIOAGG_SOAK_SECONDS`` (default 40) is how long the clients run, shared by the two
runs (one writer, two writers); ``TRIOAGG_SOAK_SEED`` picks the mix: by default the
same one on every run, so that CI is reproducible; ``random`` draws a fresh one, to
explore. Every failure names both, to be replayed.
"""

from __future__ import annotations

import os
import random
import re
from itertools import islice
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import trio

from . import clock
from .conftest import ServerProcess, assert_store_holds
from .soak_clients import (
    AGAIN,
    BEHAVIOUR_SECONDS,
    BEHAVIOURS,
    KEYS,
    SPAN_SECONDS,
    Ledger,
    Soak,
    plan,
    post_body,
)

pytestmark = pytest.mark.slow

SECONDS = float(os.environ.get("TRIOAGG_SOAK_SECONDS", "40"))
DEFAULT_SEED = "19"
SEED = os.environ.get("TRIOAGG_SOAK_SEED") or DEFAULT_SEED
if SEED == "random":
    SEED = str(random.SystemRandom().randrange(10**9))
#: Clients at once, each running one behaviour after another.
CLIENTS = 24
#: Small limits, so that the hostile paths are reached at once.
SERVER_FLAGS = (
    "--auth",
    "off",
    "--max-body",
    "64KiB",
    "--max-inflight",
    "2MiB",
    "--body-timeout",
    "2s",
    "--keep-alive-timeout",
    "1s",
)
#: After the clients, how long the bodies never acknowledged may take to be (sent again),
#: and then the writers to store every acknowledged event.
DRAIN_SECONDS = 30


def test_a_seed_replays_the_same_mix() -> None:
    def first(seed: str, client: int) -> list[tuple[str, float, float]]:
        return [(name, rng.random(), pause) for name, rng, pause in islice(plan(seed, client), 50)]

    assert first("7", 3) == first("7", 3)
    assert first("7", 3) != first("7", 4) != first("8", 4)
    assert {name for name, _, _ in first("7", 3) + first("7", 4)} >= {"write", "read"}


@pytest.mark.parametrize("writers", [1, 2])
async def test_no_client_stops_the_server_or_makes_it_lose_an_event(
    server_process: Any, writers: int
) -> None:
    replay = f"TRIOAGG_SOAK_SEED={SEED} TRIOAGG_SOAK_SECONDS={SECONDS:g}"
    print(f"soak of {SECONDS / 2:g} s, {writers} writer(s); replay with {replay}")
    server = server_process(*SERVER_FLAGS, "--writers", str(writers)).start()
    parts = urlsplit(server.url)
    assert parts.hostname and parts.port, server.output
    ledger = Ledger(start=clock.whole_days_ago(2))  # events over SPAN_SECONDS: two days
    limits = httpx.Limits(max_connections=CLIENTS, keepalive_expiry=0.5)  # under the server's 1 s
    async with httpx.AsyncClient(base_url=server.url, timeout=10, limits=limits) as client:
        soak = Soak(parts.hostname, parts.port, client, ledger)
        await mix(soak, server, f"{SEED}:{writers}", SECONDS / 2)
        print(summary(soak))
        assert server.proc is not None and server.proc.poll() is None, exited(server, replay)
        await resend_pending(soak)
        found = await totals_once_drained(soak)
        assert found == ledger.expected(), f"stored != acknowledged ({replay})"
        doomed = await client.get("/v1/keys", params={"prefix": "doomed."})
        assert doomed.json()["keys"] == [], f"refused requests were stored ({replay})"
        assert (await client.get("/healthz")).status_code == 200, replay
    assert soak.surprises == [], f"answers no client should get ({replay})"
    assert server.stop() == 0, f"{replay}: {server.output[-5000:]}"
    problems = logged_problems(server.output)
    assert problems == [], (
        f"the server logged errors under the soak ({replay}): {causes(server.output)}\n"
        + "\n".join(problems[:20])
    )
    assert_store_holds(server.db, {key: count for key, count in ledger.sent.items()})


async def mix(soak: Soak, server: ServerProcess, seed: str, seconds: float) -> None:
    """Run the clients for ``seconds``, each then finishing what it does; stop at once if
    the server process exits."""

    async def watch(stop: trio.CancelScope) -> None:
        assert server.proc is not None
        while server.proc.poll() is None:
            await trio.sleep(0.1)
        stop.cancel()

    async def client(number: int, until: float) -> None:
        for name, rng, pause in plan(seed, number):
            if trio.current_time() >= until:
                return
            behaviour, _ = BEHAVIOURS[name]
            with trio.move_on_after(BEHAVIOUR_SECONDS) as bound:
                await behaviour(soak, rng)
            if bound.cancelled_caught:
                soak.note(name, "cut off at BEHAVIOUR_SECONDS")
            await trio.sleep(pause)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch, nursery.cancel_scope)
        until = trio.current_time() + seconds
        async with trio.open_nursery() as clients:
            for number in range(CLIENTS):
                clients.start_soon(client, number, until)
        nursery.cancel_scope.cancel()


async def resend_pending(soak: Soak) -> None:
    """Send every body not acknowledged again, durably, until it is: its ids keep it
    counted once, whatever became of the sendings before."""
    rng = random.Random(0)
    with trio.move_on_after(DRAIN_SECONDS):
        for body in soak.ledger.pending():
            while (status := await post_body(soak, body, rng, durable=True)) != 200:
                if status not in (0, *AGAIN):  # refused: a surprise, noted
                    break
                await trio.sleep(0.5)
    assert soak.ledger.pending() == [], f"not acknowledged in {DRAIN_SECONDS} s of sending"


async def totals_once_drained(soak: Soak) -> dict[tuple[str, str | None], tuple[int, float]]:
    """(count, sum) per key and region read over HTTP, once they are what the ledger
    expects (202 events commit after their answers) or DRAIN_SECONDS have passed."""
    start = soak.ledger.start
    params = [("key", key) for key in KEYS]
    params += [("from", str(start)), ("to", str(start + SPAN_SECONDS))]
    params += [("granularity", "all"), ("group_by", "region"), ("stats", "count,sum")]
    found: dict[tuple[str, str | None], tuple[int, float]] = {}
    with trio.move_on_after(DRAIN_SECONDS):
        while found != soak.ledger.expected():
            response = await soak.client.get("/v1/aggregates", params=tuple(params))
            assert response.status_code == 200, response.text
            found = {
                (result["key"], result["tags"].get("region")): (bucket["count"], bucket["sum"])
                for result in response.json()["results"]
                for bucket in result["buckets"]
            }
            await trio.sleep(0.2)
    return found


def exited(server: ServerProcess, replay: str) -> str:
    """Why the server exited: the exceptions it logged, then the end of its log."""
    assert server.proc is not None
    return (
        f"the server exited ({server.proc.returncode}) under the soak ({replay}): "
        f"{causes(server.output)}\n{server.output[-3000:]}"
    )


def causes(output: str) -> str:
    """The exceptions a log's tracebacks end with, each once."""
    exceptions = re.findall(r"(?m)^[\s|+-]*((?:\w+\.)*\w+(?:Error|Exception)\b.*)$", output)
    found = dict.fromkeys(line for line in exceptions if "ExceptionGroup" not in line)
    return "; ".join(found) or "no exception logged"


def logged_problems(output: str) -> list[str]:
    """Lines of a tracebacks, and lines logged at ERROR or CRITICAL."""
    return [
        line
        for line in output.splitlines()
        if "Traceback" in line or re.search(r"\b(ERROR|CRITICAL)\b", line)
    ]


def summary(soak: Soak) -> str:
    seen = sorted(soak.seen.items())
    lines = [f"  {name}: {outcome} x {times}" for (name, outcome), times in seen]
    ledger = soak.ledger
    stored = sum(body.stored for body in ledger.bodies)
    head = f"{len(ledger.bodies)} bodies, {stored} answered 200, {len(ledger.pending())} pending"
    return "\n".join([head, *lines])
