"""The OpenAPI 3.1 description of the read API, generated from the models it serialises.

Component schemas come from the pydantic models (``Recommendations``, ``ErrorResponse``,
``Health``, ...; the clickstream events and :class:`~schemas.api.EventBatch` as request bodies)
through ``models_json_schema``, so the description cannot drift from what the API sends and
takes; paths, parameters and security are written here, with the user-id rule taken from the
event contract's :data:`~schemas.events.Id` type. OpenAPI 3.1 is the version whose schema dialect
is the JSON Schema 2020-12 that pydantic writes.

:data:`SCOPES` is the one statement of which scope each operation requires: the document's
per-operation ``security`` (the ``X-API-Key`` scheme with the scope as its role, which 3.1
allows for non-OAuth schemes) is generated from it, and the API enforces it (``api.app``).
A route must be listed there, or the API refuses to build.

:func:`openapi_document` without arguments is the deployment-independent contract that
``python -m schemas.export`` commits as ``schemas/json/openapi.json``; the API serves the same
document with its own limits, security and address filled in.
"""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter
from pydantic.json_schema import models_json_schema

from schemas.api import (
    ErrorResponse,
    EventBatch,
    EventsAccepted,
    EventsRejected,
    Health,
    Scope,
)
from schemas.conversation import ConversationReply, ConversationRequest
from schemas.erasure import ErasureReceipt, UserExport
from schemas.events import MAX_EVENT_BYTES, ClickEvent, DwellEvent, Id, ViewEvent
from schemas.messages import Recommendations

__all__ = [
    "ANONYMOUS_SCOPES",
    "CONVERSATION_PATH",
    "EVENTS_PATH",
    "EXPORT_PATH",
    "RECOMMENDATIONS_PATH",
    "SCOPES",
    "USER_PATH",
    "openapi_document",
]

RECOMMENDATIONS_PATH = "/v1/users/{user_id}/recommendations"
USER_PATH = "/v1/users/{user_id}"
EXPORT_PATH = "/v1/users/{user_id}/export"
EVENTS_PATH = "/v1/events"
CONVERSATION_PATH = "/v1/users/{user_id}/conversation"
_REF = "#/components/schemas/{model}"

# (method, path) -> the scope a key needs, or None for an open route (probes, this document).
SCOPES: dict[tuple[str, str], Scope | None] = {
    ("GET", RECOMMENDATIONS_PATH): Scope.READ,
    ("DELETE", USER_PATH): Scope.ADMIN,
    ("GET", EXPORT_PATH): Scope.ADMIN,
    ("POST", EVENTS_PATH): Scope.EVENTS,
    ("POST", CONVERSATION_PATH): Scope.CONVERSE,
    ("GET", "/healthz"): None,
    ("GET", "/openapi.json"): None,
}
# What a request without a key may do on a deployment with no keys configured (development on
# loopback, or `api_allow_anonymous`): read, never write or administer.
ANONYMOUS_SCOPES = frozenset({Scope.READ})


_RESPONSES = (
    Recommendations,
    ErrorResponse,
    Health,
    ErasureReceipt,
    UserExport,
    EventsAccepted,
    EventsRejected,
    ConversationReply,
)
_REQUESTS = (ClickEvent, ViewEvent, DwellEvent, EventBatch, ConversationRequest)


def _components() -> dict[str, Any]:
    # Responses in serialization mode (as the API writes them), request bodies in validation
    # mode (what the API takes); no model is both, so each has one schema.
    _, defs = models_json_schema(
        [(model, "serialization") for model in _RESPONSES]
        + [(model, "validation") for model in _REQUESTS],
        ref_template=_REF,
    )
    return dict(sorted(defs["$defs"].items()))


def _events_body(max_events: int | None) -> dict[str, Any]:
    """``POST /v1/events``' request body: one event, or a batch of at most ``max_events``."""
    batch: dict[str, Any] = {"$ref": _REF.format(model="EventBatch")}
    if max_events is not None:
        batch["properties"] = {"events": {"maxItems": max_events}}  # 3.1: $ref with siblings
    one = {"oneOf": [{"$ref": _REF.format(model=m.__name__)} for m in _REQUESTS[:3]]}
    return {
        "required": True,
        "description": "One clickstream event (`schemas/json/clickstream-event.json`), or "
        '`{"events": [...]}`. Each event must be exactly the contract the stream worker folds '
        f"(at most {MAX_EVENT_BYTES} bytes as compact JSON, `ts` at most the deployment's "
        "`event_max_future_s` ahead, not before 1970).",
        "content": {"application/json": {"schema": {"oneOf": [one, batch]}}},
    }


def _json(model: str, description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": _REF.format(model=model)}}},
    }


def _secure(paths: dict[str, Any], keys: bool | None) -> None:
    """Give every operation the security :data:`SCOPES` names, and its 401 and 403 answers.

    ``keys`` is whether the deployment has keys: with none, the anonymous scopes need no key
    (``security: []``); ``None`` (the contract) leaves that open with OpenAPI's empty
    requirement beside the key.
    """
    for path, operations in paths.items():
        for method, operation in operations.items():
            scope = SCOPES[(method.upper(), path)]  # an undeclared operation is a KeyError
            if scope is None:
                continue
            anonymous = scope in ANONYMOUS_SCOPES
            security: list[dict[str, list[str]]] = [{"apiKey": [scope.value]}]
            if anonymous and keys is None:
                security.append({})
            elif anonymous and keys is False:
                security = []
            operation["security"] = security
            if security:
                operation["responses"]["401"] = _json(
                    "ErrorResponse", "No key, or an unknown, wrong, revoked or expired one."
                )
                operation["responses"]["403"] = _json(
                    "ErrorResponse", f"The key is valid but lacks the `{scope.value}` scope."
                )
            operation["responses"] = dict(sorted(operation["responses"].items()))


def openapi_document(
    *,
    max_k: int | None = None,
    default_k: int | None = None,
    keys: bool | None = None,
    server: str | None = None,
    max_events: int | None = None,
) -> dict[str, Any]:
    """The document; each argument left ``None`` is a deployment choice the contract leaves open.

    ``max_k`` and ``default_k`` bound the ``k`` parameter, ``keys`` says whether the deployment
    has API keys (without, read routes are open; ``None``: a deployment may or may not), ``server``
    is the base URL, ``max_events`` bounds a batch of ``POST /v1/events``.
    """
    k_schema: dict[str, Any] = {"type": "integer", "minimum": 1}
    if max_k is not None:
        k_schema["maximum"] = max_k
    if default_k is not None:
        k_schema["default"] = default_k
    responses = {
        "200": _json("Recommendations", "The cached list, or popular items when none is cached."),
        "400": _json("ErrorResponse", "Malformed user id or k."),
        "500": _json("ErrorResponse", "The request failed; the service goes on."),
        "503": _json("ErrorResponse", "Redis does not answer."),
    }
    user_id = {
        "name": "user_id",
        "in": "path",
        "required": True,
        "description": "1-64 characters, no control characters.",
        "schema": TypeAdapter(Id).json_schema(),
    }
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
            "securitySchemes": {
                "apiKey": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "X-API-Key",
                    "description": "A key from `recstream api keys add`. Each operation names the "
                    "scope it needs (" + ", ".join(f"`{s.value}`" for s in Scope) + "); a "
                    "missing or invalid key is a 401, a valid key without the scope a 403.",
                }
            },
        },
        "paths": {
            RECOMMENDATIONS_PATH: {
                "get": {
                    "operationId": "getRecommendations",
                    "summary": "A user's recommendations (popular items when none are cached).",
                    "parameters": [
                        user_id,
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
            USER_PATH: {
                "delete": {
                    "operationId": "eraseUser",
                    "summary": "Erase every stored key of the user (GDPR art. 17) and record the "
                    "erasure on users.erased, so the user's older events are never folded again.",
                    "parameters": [user_id],
                    "responses": {
                        "200": _json("ErasureReceipt", "Erased (also when nothing was stored)."),
                        "400": _json("ErrorResponse", "Malformed user id."),
                        "500": _json("ErrorResponse", "The request failed; the service goes on."),
                        "503": _json(
                            "ErrorResponse",
                            "Erasure is not configured (no eraser credentials) or Kafka did not "
                            "take the erasure record: nothing was deleted, retry.",
                        ),
                    },
                }
            },
            EXPORT_PATH: {
                "get": {
                    "operationId": "exportUser",
                    "summary": "Everything stored about the user (GDPR art. 15).",
                    "parameters": [user_id],
                    "responses": {
                        "200": _json("UserExport", "Every key of the user, decoded."),
                        "400": _json("ErrorResponse", "Malformed user id."),
                        "500": _json("ErrorResponse", "The request failed; the service goes on."),
                        "503": _json("ErrorResponse", "Redis does not answer."),
                    },
                }
            },
            EVENTS_PATH: {
                "post": {
                    "operationId": "postEvents",
                    "summary": "Send clickstream events (clicks, views, dwells) to the pipeline: "
                    "each is produced to the clickstream topic keyed by its user id, and the "
                    "answer comes once Kafka acknowledged them all.",
                    "requestBody": _events_body(max_events),
                    "responses": {
                        "202": _json("EventsAccepted", "Every event is on the clickstream topic."),
                        "400": {
                            "description": "Nothing was produced: the body is not JSON or not an "
                            "event or batch (`bad_body`), the batch holds too many events "
                            "(`too_many_events`), or some events break the contract "
                            "(`invalid_events`: each one's index and reason code, in `invalid`).",
                            "content": {
                                "application/json": {
                                    "schema": {
                                        "anyOf": [
                                            {"$ref": _REF.format(model="EventsRejected")},
                                            {"$ref": _REF.format(model="ErrorResponse")},
                                        ]
                                    }
                                }
                            },
                        },
                        "413": _json(
                            "ErrorResponse", "The body is larger than the deployment allows."
                        ),
                        "500": _json("ErrorResponse", "The request failed; the service goes on."),
                        "503": _json(
                            "ErrorResponse",
                            "Ingestion is not configured on this deployment (no producer "
                            "credentials: `ingestion_unavailable`), or Kafka refused the events "
                            "or did not acknowledge them in time (`ingestion_failed`). Some may "
                            "have been written: retry with the same event ids, which the "
                            "pipeline folds once.",
                        ),
                    },
                }
            },
            CONVERSATION_PATH: {
                "post": {
                    "operationId": "postConversation",
                    "summary": "Refine the user's list in words (one turn of a conversation): the "
                    "list under the constraints understood so far, each item with the history "
                    "items behind it and the constraints it meets. A turn with `session_id` "
                    "refines that session's constraints; one without starts a new session.",
                    "parameters": [user_id],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {"$ref": _REF.format(model="ConversationRequest")}
                            }
                        },
                    },
                    "responses": {
                        "200": _json("ConversationReply", "The refined list and the session."),
                        "400": _json(
                            "ErrorResponse",
                            "Malformed user id, body or message (`bad_request`, `bad_message`).",
                        ),
                        "404": _json(
                            "ErrorResponse",
                            "The session expired or never existed (`unknown_session`).",
                        ),
                        "413": _json("ErrorResponse", "The body is larger than a turn may be."),
                        "500": _json("ErrorResponse", "The request failed; the service goes on."),
                        "503": _json(
                            "ErrorResponse",
                            "Redis does not answer, or this deployment serves no conversation "
                            "(`conversation_unavailable`).",
                        ),
                    },
                }
            },
            "/healthz": {
                "get": {
                    "operationId": "getHealth",
                    "summary": "Whether the service can answer reads.",
                    "responses": {
                        "200": _json("Health", "Healthy."),
                        "503": _json("Health", "It cannot (its store does not answer)."),
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
    _secure(document["paths"], keys)
    if server is not None:
        document["servers"] = [{"url": server}]
    return document
