"""The OpenAPI document is true: a valid OpenAPI 3.1 document, and a fuzzer driven by it
(schemathesis, every check) finds no answer of a real server that disagrees with it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from openapi_spec_validator import validate
from schemathesis.config import SchemathesisConfig
from schemathesis.generation import GenerationMode

from trioagg.http.openapi import openapi_document

from .conftest import Server, ServerProcess

#: Inputs per operation; the README says how many the whole run tries.
EXAMPLES = 100


def test_the_document_is_valid_openapi_3_1() -> None:
    validate(openapi_document())


async def test_the_served_document_is_the_document(server: Server) -> None:
    response = await server.client.get("/openapi.json")
    assert response.status_code == 200
    validate(response.json())
    assert response.json()["paths"].keys() == openapi_document()["paths"].keys()


def test_every_example_in_the_document_fits_its_schema() -> None:
    from openapi_schema_validator import OAS31Validator

    for path in openapi_document()["paths"].values():
        for operation in path.values():
            for parameter in operation.get("parameters", []):
                OAS31Validator(parameter["schema"]).validate(parameter["example"])


@pytest.fixture(scope="module")
def fuzzed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder: Path = tmp_path_factory.mktemp("fuzz")
    process = ServerProcess(folder / "trioagg.db", "--log-level", "warning").start()
    assert process.url, process.output
    yield process
    process.stop()


#: Where a request that fits the schema can still be refused for what JSON Schema cannot
#: say: from before to and the query budget (aggregates, top); a ts within --max-future of
#: the server's clock (events). Those answers are 422; everywhere else, valid means 2xx.
CROSS_CHECKED = {"/v1/aggregates", "/v1/top", "/v1/events"}


@pytest.fixture(scope="module")
def api(fuzzed_server: ServerProcess) -> dict[bool, schemathesis.schemas.BaseSchema]:
    """The served document, loaded with positive data expected to pass (False) or to
    pass or be 422 (True)."""
    url = f"{fuzzed_server.url}/openapi.json"
    schemas: dict[bool, schemathesis.schemas.BaseSchema] = {}
    for cross_checked in (False, True):
        accepted = ["2xx", "422"] if cross_checked else ["2xx"]
        config = SchemathesisConfig.from_dict(
            {"checks": {"positive_data_acceptance": {"expected-statuses": accepted}}}
        )
        schemas[cross_checked] = schemathesis.openapi.from_url(url, config=config)
    return schemas


OPERATIONS = [
    (method.upper(), path, mode)
    for path, item in openapi_document()["paths"].items()
    for method, operation in item.items()
    for mode in GenerationMode
    # an operation without parameters or body has no invalid requests to make
    if mode is GenerationMode.POSITIVE or "parameters" in operation
]


# schemathesis' own pytest loader (from_fixture) fails under pytest 9 (it reads a removed
# node attribute), so each operation is driven through its hypothesis strategy here.
@pytest.mark.slow
@pytest.mark.parametrize(("method", "path", "mode"), OPERATIONS)
def test_the_server_keeps_the_documents_promises(
    api: dict[bool, schemathesis.schemas.BaseSchema], method: str, path: str, mode: GenerationMode
) -> None:
    operation = api[path in CROSS_CHECKED][path][method]

    @settings(
        max_examples=EXAMPLES,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(mode))
    def fuzz(case: schemathesis.Case[Any]) -> None:
        case.call_and_validate()

    fuzz()


async def test_the_documents_examples_are_answered_by_a_default_server(server: Server) -> None:
    for path, item in openapi_document()["paths"].items():
        operation = item.get("get", {})
        params: dict[str, Any] = {p["name"]: p["example"] for p in operation.get("parameters", [])}
        if not params:
            continue
        response = await server.client.get(path, params=params)
        assert response.status_code == 200, (path, response.text)
