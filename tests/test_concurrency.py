"""Many concurrent clients against one server: every acknowledged event counted once."""

from __future__ import annotations

import random
from typing import Any

import httpx
import pytest
import trio

from .conftest import Server, StartServer, stored_counts

#: One client's requests: (events, the wait parameter) each.
Plan = list[tuple[list[dict[str, Any]], str]]


@pytest.mark.slow
async def test_many_concurrent_clients_exact_totals(server: Server) -> None:
    clients, requests_each = 40, 15
    expected: dict[str, int] = {}
    sums: dict[str, float] = {}
    rng = random.Random(7)
    plans: list[Plan] = []
    for number in range(clients):
        plan: Plan = []
        for _ in range(requests_each):
            key = f"k{rng.randrange(5)}"
            values = [rng.randrange(100) for _ in range(rng.choice([1, 1, 3, 50]))]
            expected[key] = expected.get(key, 0) + len(values)
            sums[key] = sums.get(key, 0) + sum(values)
            wait = "false" if number % 4 == 0 else "true"
            plan.append(([{"key": key, "value": v} for v in values], wait))
        plans.append(plan)

    async def run(plan: Plan, client: httpx.AsyncClient) -> None:
        for body, wait in plan:
            response = await client.post("/v1/events", json=body, params={"wait": wait})
            assert response.status_code in (200, 202)
            assert response.json()["accepted"] == len(body)

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=30) as client:
        async with trio.open_nursery() as nursery:
            for plan in plans:
                nursery.start_soon(run, plan, client)
        assert (await client.post("/v1/events", json={"key": "witness"})).status_code == 200
        doc = (
            await client.get(
                "/v1/aggregates",
                params={"key": sorted(expected), "granularity": "all", "stats": "count,sum"},
            )
        ).json()
    assert stored_counts(server.db) == {**expected, "witness": 1}
    for result in doc["results"]:
        (bucket,) = result["buckets"]
        assert bucket["count"] == expected[result["key"]]
        assert bucket["sum"] == sums[result["key"]]


async def test_reads_run_beside_writes(start_server: StartServer) -> None:
    server = await start_server(readers="2")
    async with trio.open_nursery() as nursery:

        async def write() -> None:
            for _ in range(30):
                await server.client.post("/v1/events", json=[{"key": "rw"}] * 10)

        async def read() -> None:
            for _ in range(30):
                response = await server.client.get("/v1/aggregates", params={"key": "rw"})
                assert response.status_code == 200

        for _ in range(3):
            nursery.start_soon(write)
            nursery.start_soon(read)
    assert stored_counts(server.db) == {"rw": 900}
