"""The OpenAPI 3 description of the read API, served at ``/openapi.json``."""

from __future__ import annotations

from typing import Any

from api.settings import ApiSettings

__all__ = ["openapi_document"]

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
        }
    },
}

_RECOMMENDATIONS = {
    "type": "object",
    "required": [
        "user_id",
        "items",
        "profile_version",
        "model",
        "variant",
        "source",
        "generated_at",
        "trigger_ts",
    ],
    "properties": {
        "schema_version": {"type": "integer", "const": 1},
        "user_id": {"type": "string", "minLength": 1, "maxLength": 64},
        "items": {
            "type": "array",
            "description": "Best first.",
            "items": {
                "type": "object",
                "required": ["item_id", "score"],
                "properties": {"item_id": {"type": "string"}, "score": {"type": "number"}},
            },
        },
        "profile_version": {"type": "integer", "minimum": 0},
        "model": {
            "type": "object",
            "required": ["name", "version"],
            "properties": {"name": {"type": "string"}, "version": {"type": "string"}},
        },
        "variant": {"type": "string"},
        "source": {"type": "string", "enum": ["model", "fallback"]},
        "generated_at": {"type": "string", "format": "date-time"},
        "trigger_ts": {"type": "string", "format": "date-time"},
    },
}


def _json(schema: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}


def openapi_document(settings: ApiSettings) -> dict[str, Any]:
    """The document, with the limits the settings configure."""
    errors = {
        "400": {"description": "Malformed user id or k.", "content": _json("Error")},
        "401": {"description": "Missing or wrong API key.", "content": _json("Error")},
    }
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "recstream read API",
            "version": "1",
            "description": "Fresh recommendations per user, from the Redis cache the streaming "
            "pipeline keeps current.",
        },
        "servers": [{"url": f"http://{settings.api_host}:{settings.api_port}"}],
        "components": {
            "schemas": {"Recommendations": _RECOMMENDATIONS, "Error": _ERROR},
            "securitySchemes": {"apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}},
        },
        "paths": {
            "/v1/users/{user_id}/recommendations": {
                "get": {
                    "summary": "A user's recommendations (popular items when none are cached).",
                    "security": [{"apiKey": []}] if settings.api_key else [],
                    "parameters": [
                        {
                            "name": "user_id",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string", "minLength": 1, "maxLength": 64},
                        },
                        {
                            "name": "k",
                            "in": "query",
                            "required": False,
                            "schema": {
                                "type": "integer",
                                "minimum": 1,
                                "maximum": settings.api_max_k,
                                "default": settings.api_default_k,
                            },
                        },
                    ],
                    "responses": {
                        "200": {"description": "The list.", "content": _json("Recommendations")},
                        **errors,
                    },
                }
            },
            "/healthz": {
                "get": {
                    "summary": "Whether the service and Redis answer.",
                    "responses": {
                        "200": {"description": "Healthy."},
                        "503": {"description": "Redis down."},
                    },
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics.",
                    "responses": {"200": {"description": "Prometheus text format."}},
                }
            },
        },
    }
