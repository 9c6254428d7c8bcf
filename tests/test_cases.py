"""The use cases without sockets: a real service on a real SQLite file, and bodies
handed in as bytes. Accepting events stores them once and gives back every byte and
token it held, however it ends; answering reads them back, from the cache the second
time."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from werkzeug.datastructures import MultiDict

from trioagg.core.errors import Forbidden, InvalidEvents, InvalidQuery, Overloaded
from trioagg.core.settings import Settings
from trioagg.query.budget import DEFAULT_BUDGET
from trioagg.service.cases import (
    Aggregates,
    BodyReader,
    Stored,
    accept_events,
    answer_keys,
    answer_status,
    answer_top,
)
from trioagg.service.lifecycle import Service
from trioagg.service.metrics import Metrics

from . import clock


def body_of(*events: dict[str, object]) -> BodyReader:
    """A body reader that hands over ``events`` as one JSON array, holding its bytes."""
    data = json.dumps(list(events)).encode()

    async def read(*, keep: Callable[[int], None]) -> bytes:
        keep(len(data))
        return data

    return read


@pytest.fixture
def hour() -> int:
    """The start of an hour that has ended, at any hour of the day."""
    return clock.whole_hours_ago(2)


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[Service]:
    settings = Settings(db=str(tmp_path / "cases.db"))
    async with Service.running(settings, Metrics()) as running:
        yield running


def nothing_held(service: Service) -> bool:
    """No bytes in flight and every admission token back."""
    writers = service.writers
    tokens = service.settings.queue_size * service.settings.writers
    return writers.inflight.used == 0 and writers._admission.value == tokens


async def test_accepted_events_are_stored_once_and_answered(service: Service, hour: int) -> None:
    events = [{"key": "pay", "ts": hour + i, "value": i, "id": f"e{i}"} for i in range(3)]
    stored = await accept_events(service, body_of(*events), ndjson=False, durable=True, tenant=None)
    assert stored == Stored(3, 0)
    again = await accept_events(service, body_of(*events), ndjson=False, durable=True, tenant=None)
    assert again == Stored(3, 3)  # every id seen: counted once
    assert nothing_held(service)

    aggregates = Aggregates(service.metrics)
    args = MultiDict([("key", "pay"), ("from", str(hour)), ("to", str(hour + 3600))])
    text = f"key=pay&from={hour}&to={hour + 3600}".encode()
    answers = []
    for _ in range(2):
        found = await aggregates.answer(service, text, args, tenant=None, budget=DEFAULT_BUDGET)
        answers.append(json.loads(found if isinstance(found, bytes) else found.joined()))
    assert answers[0] == answers[1]
    (bucket,) = answers[0]["results"][0]["buckets"]
    assert (bucket["count"], bucket["sum"]) == (3, 3.0)
    hits = service.metrics.registry.get_sample_value("trioagg_read_cache_total", {"result": "hit"})
    assert hits == 1  # the second answer came from the read cache

    keys = json.loads(await answer_keys(service, MultiDict(), tenant=None))
    assert [entry["key"] for entry in keys["keys"]] == ["pay"]
    top = json.loads(
        await answer_top(
            service, MultiDict([("from", str(hour)), ("to", str(hour + 3600))]), tenant=None
        )
    )
    assert top["results"] == [{"key": "pay", "count": 3}]


async def test_an_invalid_batch_stores_nothing_and_holds_nothing(
    service: Service, hour: int
) -> None:
    with pytest.raises(InvalidEvents):
        await accept_events(
            service,
            body_of({"key": "pay", "ts": hour, "value": 1}, {"key": "", "ts": hour}),
            ndjson=False,
            durable=True,
            tenant=None,
        )
    assert nothing_held(service)
    keys = json.loads(await answer_keys(service, MultiDict(), tenant=None))
    assert keys["keys"] == []


async def test_a_body_past_max_inflight_is_overloaded_and_gives_every_byte_back(
    tmp_path: Path, hour: int
) -> None:
    settings = Settings(db=str(tmp_path / "small.db"), max_body=32 * 1024, max_inflight=64 * 1024)
    async with Service.running(settings, Metrics()) as service:
        big = [{"key": "pay", "ts": hour, "value": 1, "tags": {"t": "x" * 200}}] * 500
        with pytest.raises(Overloaded):
            await accept_events(service, body_of(*big), ndjson=False, durable=True, tenant=None)
        assert nothing_held(service)


async def test_a_body_that_fails_half_read_gives_back_what_it_held(
    service: Service, hour: int
) -> None:
    async def broken(*, keep: Callable[[int], None]) -> bytes:
        keep(10_000)
        raise ConnectionResetError("the client went away")

    with pytest.raises(ConnectionResetError):
        await accept_events(service, broken, ndjson=False, durable=True, tenant=None)
    assert nothing_held(service)
    stored = await accept_events(
        service, body_of({"key": "after", "ts": hour}), ndjson=False, durable=False, tenant=None
    )
    assert stored == Stored(1, 0)


async def test_the_status_is_the_whole_services_and_no_tenants(service: Service, hour: int) -> None:
    events = [{"key": "pay", "ts": hour + i, "value": i} for i in range(3)]
    await accept_events(service, body_of(*events), ndjson=False, durable=True, tenant=None)
    metrics = service.metrics
    status = json.loads(await answer_status(service, metrics, MultiDict(), tenant=None))
    assert (status["events_accepted"], status["events_committed"]) == (3, 3)
    assert status["bucket_seconds"] == service.store.bucket
    with pytest.raises(Forbidden):
        await answer_status(service, metrics, MultiDict(), tenant="acme")
    with pytest.raises(InvalidQuery):
        await answer_status(service, metrics, MultiDict([("key", "pay")]), tenant=None)
