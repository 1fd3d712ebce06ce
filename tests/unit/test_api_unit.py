"""The read API without Redis: its input rules, its errors and its generated OpenAPI document.

The app here points at a Redis address nobody listens on, so every answer below comes from the
API's own checks before any read, or from how it reports an unreachable store.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import given
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from pydantic import SecretStr

from api import ApiSettings, build_app
from api.app import served_openapi, valid_user_id
from schemas.api import ErrorResponse, Health
from schemas.export import JSON_DIR, render
from schemas.openapi import (
    CONVERSATION_PATH,
    EVENTS_PATH,
    EXPORT_PATH,
    RECOMMENDATIONS_PATH,
    SCOPES,
    USER_PATH,
    openapi_document,
)
from tests.api_contract import assert_conforms

# The event contract's identifier alphabet: anything but C0/C1 control characters.
CONTROL = [chr(c) for c in (*range(0x00, 0x20), *range(0x7F, 0xA0))]
PRINTABLE = st.characters(blacklist_characters=CONTROL, blacklist_categories=["Cs"])

NOBODY_LISTENS = SecretStr("redis://127.0.0.1:1/0")


@given(st.text(PRINTABLE, min_size=1, max_size=64))
def test_printable_ids_up_to_64_chars_are_valid(user_id: str) -> None:
    assert valid_user_id(user_id)


@given(st.text(PRINTABLE, max_size=20), st.sampled_from(CONTROL))
def test_ids_with_control_characters_are_not(prefix: str, control: str) -> None:
    assert not valid_user_id(prefix + control)


def test_empty_and_overlong_ids_are_not_valid() -> None:
    assert not valid_user_id("")
    assert not valid_user_id("u" * 65)
    assert valid_user_id("u" * 64)


def test_committed_openapi_document_is_the_generated_one() -> None:
    committed = (JSON_DIR / "openapi.json").read_text("utf-8")
    assert committed == render(openapi_document()), "run `python -m schemas.export`"


def test_openapi_components_are_the_models_json_schemas() -> None:
    schemas = openapi_document()["components"]["schemas"]
    assert {"Recommendations", "ScoredItem", "ModelRef", "ErrorResponse", "Health"} <= set(schemas)
    for schema in schemas.values():
        Draft202012Validator.check_schema(schema)
    assert schemas["Health"]["required"] == sorted(Health.model_fields)
    assert schemas["ErrorResponse"]["required"] == list(ErrorResponse.model_fields)


def test_served_document_is_the_contract_with_the_deployment_filled_in(tmp_path: Path) -> None:
    committed = json.loads((JSON_DIR / "openapi.json").read_text("utf-8"))
    deployment = ApiSettings(api_max_k=50, api_default_k=7, api_port=8123, api_events_max_batch=20)
    open_doc = served_openapi(deployment)
    keyed_doc = served_openapi(ApiSettings(api_keys_file=tmp_path / "keys"))
    assert open_doc["components"] == committed["components"]
    assert set(open_doc["paths"]) == set(committed["paths"])
    assert set(open_doc["paths"]) == {
        RECOMMENDATIONS_PATH,
        USER_PATH,
        EXPORT_PATH,
        EVENTS_PATH,
        CONVERSATION_PATH,
        "/healthz",
        "/openapi.json",
    }
    # Erasure and export need the admin scope, events the events scope, a conversation turn the
    # converse scope, with or without keys on the deployment.
    for doc in (committed, open_doc, keyed_doc):
        turn = doc["paths"][CONVERSATION_PATH]["post"]
        assert turn["security"] == [{"apiKey": ["converse"]}]
        assert doc["paths"][USER_PATH]["delete"]["security"] == [{"apiKey": ["admin"]}]
        assert doc["paths"][EXPORT_PATH]["get"]["security"] == [{"apiKey": ["admin"]}]
        post = doc["paths"][EVENTS_PATH]["post"]
        assert post["security"] == [{"apiKey": ["events"]}]
        assert set(post["responses"]) == {"202", "400", "401", "403", "413", "500", "503"}
    # The batch bound is the deployment's; the contract leaves it open.
    batch = open_doc["paths"][EVENTS_PATH]["post"]["requestBody"]["content"]["application/json"]
    assert batch["schema"]["oneOf"][1]["properties"] == {"events": {"maxItems": 20}}
    committed_body = committed["paths"][EVENTS_PATH]["post"]["requestBody"]
    assert "properties" not in committed_body["content"]["application/json"]["schema"]["oneOf"][1]
    route, keyed_route = (
        open_doc["paths"][RECOMMENDATIONS_PATH]["get"],
        keyed_doc["paths"][RECOMMENDATIONS_PATH]["get"],
    )
    committed_route = committed["paths"][RECOMMENDATIONS_PATH]["get"]
    assert committed_route["security"] == [{"apiKey": ["read"]}, {}]
    assert route["security"] == []
    assert keyed_route["security"] == [{"apiKey": ["read"]}]
    assert not {"401", "403"} & set(route["responses"])
    assert {"200", "400", "401", "403", "503"} <= set(keyed_route["responses"])
    k = next(p for p in route["parameters"] if p["name"] == "k")
    assert k["schema"] == {"type": "integer", "minimum": 1, "maximum": 50, "default": 7}
    assert open_doc["servers"] == [{"url": "http://127.0.0.1:8123"}]


def test_every_operation_names_the_scope_it_needs() -> None:
    """The document's security is generated from SCOPES: open routes have none, the others
    require the X-API-Key scheme with their scope."""
    paths = openapi_document()["paths"]
    operations = {(m.upper(), p): op for p, ops in paths.items() for m, op in ops.items()}
    assert set(operations) == set(SCOPES)
    for where, operation in operations.items():
        scope = SCOPES[where]
        if scope is None:
            assert "security" not in operation
        else:
            assert {"apiKey": [scope.value]} in operation["security"]


async def _get(settings: ApiSettings, paths: list[str]) -> list[tuple[int, bytes]]:
    out = []
    async with TestClient(TestServer(build_app(settings))) as client:
        for path in paths:
            response = await client.get(path)
            out.append((response.status, await response.read()))
    return out


BAD_K = ["%C2%B2", "9" * 5000, "-1", "0", "101", "1.5", "", "+5", "%EF%BC%95", " 5", "0x10", "1%00"]
BAD_IDS = ["x" * 65, "a%01b", "a%7Fb", "a%C2%85b", "%09", "a%00"]


@pytest.mark.parametrize("k", BAD_K)
def test_a_bad_k_is_a_400_with_the_error_model(k: str) -> None:
    path = f"/v1/users/42/recommendations?k={k}"
    ((status, body),) = asyncio.run(_get(ApiSettings(redis_url=NOBODY_LISTENS), [path]))
    assert status == 400
    assert ErrorResponse.model_validate_json(body) == ErrorResponse.of(
        "bad_k", "k must be an integer from 1 to 100"
    )
    assert_conforms(openapi_document(), RECOMMENDATIONS_PATH, 400, body)


@pytest.mark.parametrize("user_id", BAD_IDS)
def test_a_bad_user_id_is_a_400_with_the_error_model(user_id: str) -> None:
    path = f"/v1/users/{user_id}/recommendations?k=5"
    ((status, body),) = asyncio.run(_get(ApiSettings(redis_url=NOBODY_LISTENS), [path]))
    assert status == 400
    assert ErrorResponse.model_validate_json(body).error.code == "bad_user_id"
    assert_conforms(openapi_document(), RECOMMENDATIONS_PATH, 400, body)


def test_an_unreachable_store_is_a_503_not_a_500() -> None:
    (read, health) = asyncio.run(
        _get(
            ApiSettings(redis_url=NOBODY_LISTENS),
            ["/v1/users/42/recommendations", "/healthz"],
        )
    )
    assert read[0] == 503
    assert ErrorResponse.model_validate_json(read[1]).error.code == "unavailable"
    assert_conforms(openapi_document(), RECOMMENDATIONS_PATH, 503, read[1])
    assert health[0] == 503
    assert Health.model_validate_json(health[1]) == Health(ok=False)
    assert_conforms(openapi_document(), "/healthz", 503, health[1])


def test_app_routes_are_the_documented_ones() -> None:
    app = build_app(ApiSettings())
    paths = {r.resource.canonical for r in app.router.routes() if r.resource is not None}
    assert paths == set(openapi_document()["paths"])
    assert "/metrics" not in paths  # its own port: build_metrics_app


def test_aiohttp_own_errors_answer_the_error_model() -> None:
    async def calls() -> list[tuple[int, bytes]]:
        app = build_app(ApiSettings(redis_url=NOBODY_LISTENS))
        async with TestClient(TestServer(app)) as client:
            missing = await client.get("/v2/nothing")
            wrong_method = await client.post("/v1/users/42/recommendations")
            return [(r.status, await r.read()) for r in (missing, wrong_method)]

    (missing, wrong_method) = asyncio.run(calls())
    assert missing[0] == 404
    assert ErrorResponse.model_validate_json(missing[1]).error.code == "not_found"
    assert wrong_method[0] == 405
    assert ErrorResponse.model_validate_json(wrong_method[1]).error.code == "method_not_allowed"
