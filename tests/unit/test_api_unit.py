"""The read API's input rule and its OpenAPI description, without a server."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from pydantic import SecretStr

from api import ApiSettings, build_app
from api.app import valid_user_id
from api.openapi import openapi_document

# The event contract's identifier alphabet: anything but C0/C1 control characters.
CONTROL = [chr(c) for c in (*range(0x00, 0x20), *range(0x7F, 0xA0))]
PRINTABLE = st.characters(blacklist_characters=CONTROL, blacklist_categories=["Cs"])


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


def test_openapi_describes_every_route_and_the_key_only_when_set() -> None:
    open_doc = openapi_document(ApiSettings(api_key=None))
    keyed_doc = openapi_document(ApiSettings(api_key=SecretStr("s")))
    route = "/v1/users/{user_id}/recommendations"
    assert set(open_doc["paths"]) == {route, "/healthz", "/metrics"}
    assert open_doc["paths"][route]["get"]["security"] == []
    assert keyed_doc["paths"][route]["get"]["security"] == [{"apiKey": []}]
    assert {"200", "400", "401"} <= set(keyed_doc["paths"][route]["get"]["responses"])
    assert "s" not in str(keyed_doc["components"]["securitySchemes"])


def test_app_routes() -> None:
    app = build_app(ApiSettings(), popular=[])
    paths = {r.resource.canonical for r in app.router.routes() if r.resource is not None}
    assert paths == {
        "/v1/users/{user_id}/recommendations",
        "/healthz",
        "/metrics",
        "/openapi.json",
    }
