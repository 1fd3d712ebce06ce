"""Checks a real read-API response against the OpenAPI document: the body must match the schema
the document names for that path and status, component references resolved, with an independent
JSON Schema validator (not the pydantic models the document was generated from)."""

from __future__ import annotations

from typing import Any

import orjson
from jsonschema import Draft202012Validator


def assert_conforms(
    document: dict[str, Any], path: str, status: int, body: bytes, method: str = "get"
) -> None:
    """Raise ``jsonschema.ValidationError`` unless ``body`` is what ``document`` promises."""
    answer = document["paths"][path][method]["responses"][str(status)]
    schema = answer["content"]["application/json"]["schema"]
    # Component references point into the document, so the schema is checked as part of it.
    Draft202012Validator({**schema, "components": document["components"]}).validate(
        orjson.loads(body)
    )


def assert_request_conforms(document: dict[str, Any], path: str, method: str, body: Any) -> None:
    """Raise ``jsonschema.ValidationError`` unless ``body`` is a request ``document`` describes."""
    schema = document["paths"][path][method]["requestBody"]["content"]["application/json"]
    Draft202012Validator({**schema["schema"], "components": document["components"]}).validate(body)
