"""Checks a real read-API response against the OpenAPI document: the body must match the schema
the document names for that path and status, component references resolved, with an independent
JSON Schema validator (not the pydantic models the document was generated from). And
:func:`exchange`: the real app served on a free loopback port, asked a list of requests."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
from aiohttp import ClientSession, web
from jsonschema import Draft202012Validator

from api.app import SERVER_OPTIONS, build_app
from api.settings import ApiSettings

Request = tuple[str, str, dict[str, str], bytes | None]
"""method, path, headers, body"""


async def exchange(
    settings: ApiSettings, requests: Sequence[Request]
) -> list[tuple[int, str, bytes]]:
    """Serve the API built from ``settings`` on a free port and send ``requests`` in order over
    real HTTP; each answer is ``(status, content type, body)``."""
    runner = web.AppRunner(build_app(settings), **SERVER_OPTIONS)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]  # bound server
    out = []
    try:
        async with ClientSession() as session:
            for method, path, headers, body in requests:
                url = f"http://127.0.0.1:{port}{path}"
                async with session.request(method, url, data=body, headers=headers) as resp:
                    content_type = resp.headers.get("Content-Type", "")
                    out.append((resp.status, content_type, await resp.read()))
    finally:
        await runner.cleanup()
    return out


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
