"""Property-based requests generated from the OpenAPI document against the running embedded server:
no 5xx, and every response (status, content type, body) as the document says. A small budget runs in
the README's test command; a long run is `schemathesis run URL/openapi.json`."""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

EXAMPLES = 25  # per operation: about a minute in all on a 2-core machine
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def api_schema(embedded_server: str) -> Any:
    return schemathesis.openapi.from_url(embedded_server + "/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])
def test_generated_requests_get_no_5xx_and_match_the_schema(case: Any) -> None:
    case.call_and_validate(checks=CHECKS, timeout=60)
