"""The OpenAPI 3.1 description of the read API, generated from the models it serialises.

Component schemas come from the pydantic models (``Recommendations``, ``ErrorResponse``,
``Health``) through ``models_json_schema``, so the description cannot drift from what the API
sends; paths, parameters and security are written here, with the user-id rule taken from the
event contract's :data:`~schemas.events.Id` type. OpenAPI 3.1 is the version whose schema dialect
is the JSON Schema 2020-12 that pydantic writes.

:func:`openapi_document` without arguments is the deployment-independent contract that
``python -m schemas.export`` commits as ``schemas/json/openapi.json``; the API serves the same
document with its own limits, security and address filled in.
"""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter
from pydantic.json_schema import models_json_schema

from schemas.api import ErrorResponse, Health
from schemas.events import Id
from schemas.messages import Recommendations

__all__ = ["RECOMMENDATIONS_PATH", "openapi_document"]

RECOMMENDATIONS_PATH = "/v1/users/{user_id}/recommendations"
_REF = "#/components/schemas/{model}"


def _components() -> dict[str, Any]:
    # Serialization mode: these are response bodies, described as the API writes them.
    _, defs = models_json_schema(
        [(model, "serialization") for model in (Recommendations, ErrorResponse, Health)],
        ref_template=_REF,
    )
    return dict(defs["$defs"])


def _json(model: str, description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": _REF.format(model=model)}}},
    }


def openapi_document(
    *,
    max_k: int | None = None,
    default_k: int | None = None,
    api_key: bool | None = None,
    server: str | None = None,
) -> dict[str, Any]:
    """The document; each argument left ``None`` is a deployment choice the contract leaves open.

    ``max_k`` and ``default_k`` bound the ``k`` parameter, ``api_key`` says whether ``/v1``
    requests must carry the key (``None``: a deployment may or may not ask for it), ``server`` is
    the base URL.
    """
    k_schema: dict[str, Any] = {"type": "integer", "minimum": 1}
    if max_k is not None:
        k_schema["maximum"] = max_k
    if default_k is not None:
        k_schema["default"] = default_k
    security: list[dict[str, list[str]]] = [] if api_key is False else [{"apiKey": []}]
    if api_key is None:  # an empty requirement beside the key is OpenAPI's "the key is optional"
        security.append({})
    responses = {
        "200": _json("Recommendations", "The cached list, or popular items when none is cached."),
        "400": _json("ErrorResponse", "Malformed user id or k."),
        "401": _json("ErrorResponse", "Missing or wrong API key."),
        "500": _json("ErrorResponse", "The request failed; the service goes on."),
        "503": _json("ErrorResponse", "Redis does not answer."),
    }
    if api_key is False:
        del responses["401"]
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "recstream read API",
            "version": "1",
            "description": "Fresh recommendations per user, from the Redis cache the streaming "
            "pipeline keeps current.",
        },
        "components": {
            "schemas": _components(),
            "securitySchemes": {"apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}},
        },
        "paths": {
            RECOMMENDATIONS_PATH: {
                "get": {
                    "operationId": "getRecommendations",
                    "summary": "A user's recommendations (popular items when none are cached).",
                    "security": security,
                    "parameters": [
                        {
                            "name": "user_id",
                            "in": "path",
                            "required": True,
                            "description": "1-64 characters, no control characters.",
                            "schema": TypeAdapter(Id).json_schema(),
                        },
                        {
                            "name": "k",
                            "in": "query",
                            "required": False,
                            "description": "How many items, best first (ASCII digits).",
                            "schema": k_schema,
                        },
                    ],
                    "responses": responses,
                }
            },
            "/healthz": {
                "get": {
                    "operationId": "getHealth",
                    "summary": "Whether the service and Redis answer.",
                    "responses": {
                        "200": _json("Health", "Healthy."),
                        "503": _json("Health", "Redis does not answer."),
                    },
                }
            },
            "/metrics": {
                "get": {
                    "operationId": "getMetrics",
                    "summary": "Prometheus metrics.",
                    "responses": {
                        "200": {
                            "description": "Prometheus text exposition format.",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "operationId": "getOpenApi",
                    "summary": "This description, with the deployment's limits.",
                    "responses": {
                        "200": {
                            "description": "OpenAPI 3.1 document.",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        }
                    },
                }
            },
        },
    }
    if server is not None:
        document["servers"] = [{"url": server}]
    return document
