"""API keys and scopes without Redis: who is refused, with what, and what the logs and files hold.

The app points at a Redis address nobody listens on, so a request that passes the key check ends
in a 503 (the store does not answer): a 503 here means "let in", a 401 or 403 "refused before
any read".
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from aiohttp import ClientSession, web
from aiohttp.test_utils import TestClient, TestServer
from click.testing import CliRunner
from pydantic import SecretStr

from api import ApiSettings, build_app
from api.app import SERVER_OPTIONS, _scopes, build_metrics_app, check_exposure
from api.exceptions import KeysFileError, UnsafeExposureError
from api.keys import KeyRing, add_key, new_key, read_keys_file, revoke_key
from cli.main import main
from schemas.api import ErrorResponse, Scope
from schemas.openapi import RECOMMENDATIONS_PATH, SCOPES

NOBODY_LISTENS = SecretStr("redis://127.0.0.1:1/0")
READ = "/v1/users/42/recommendations"


def _keys(
    tmp_path: Path, *specs: tuple[Scope, ...], expires_at: datetime | None = None
) -> list[str]:
    path = tmp_path / "api-keys.jsonl"
    made: list[str] = []
    for scopes in specs:
        key, record = new_key(scopes, f"test-{len(made)}", expires_at=expires_at)
        add_key(path, record)
        made.append(key)
    return made


def _settings(tmp_path: Path) -> ApiSettings:
    return ApiSettings(redis_url=NOBODY_LISTENS, api_keys_file=tmp_path / "api-keys.jsonl")


async def _get(
    app: web.Application, calls: list[tuple[str, dict[str, str]]]
) -> list[tuple[int, bytes]]:
    out = []
    async with TestClient(TestServer(app)) as client:
        for path, headers in calls:
            response = await client.get(path, headers=headers)
            out.append((response.status, await response.read()))
    return out


def test_keys_are_refused_with_401_or_403_by_scope_and_let_in_otherwise(tmp_path: Path) -> None:
    reader, admin, events = _keys(tmp_path, (Scope.READ,), (Scope.ADMIN,), (Scope.EVENTS,))
    (expired,) = _keys(tmp_path, (Scope.READ,), expires_at=datetime.now(UTC) - timedelta(1))
    key_id = reader.split("_")[1]
    wrong_secret = f"rs_{key_id}_{'A' * 43}"
    unknown_id = f"rs_{'0' * 12}_{reader.split('_', 2)[2]}"
    calls = [
        (READ, {"X-API-Key": reader}),
        (READ, {}),
        (READ, {"X-API-Key": ""}),
        (READ, {"X-API-Key": wrong_secret}),
        (READ, {"X-API-Key": unknown_id}),
        (READ, {"X-API-Key": "not even a key"}),
        (READ, {"X-API-Key": expired}),
        (READ, {"X-API-Key": admin}),
        (READ, {"X-API-Key": events}),
        ("/healthz", {}),
        ("/openapi.json", {}),
    ]
    results = asyncio.run(_get(build_app(_settings(tmp_path)), calls))
    assert [status for status, _ in results] == [
        503,
        401,
        401,
        401,
        401,
        401,
        401,
        403,
        403,
        503,
        200,
    ]
    unauthorized = {body for status, body in results if status == 401}
    assert len(unauthorized) == 1, "every 401 must have the same body"
    assert ErrorResponse.model_validate_json(unauthorized.pop()).error.code == "unauthorized"
    forbidden = ErrorResponse.model_validate_json(results[7][1]).error
    assert (forbidden.code, forbidden.message) == (
        "forbidden",
        "this key does not have the read scope",
    )


def test_a_revoked_key_is_refused_by_a_running_api(tmp_path: Path) -> None:
    keep, drop = _keys(tmp_path, (Scope.READ,), (Scope.READ,))
    path = tmp_path / "api-keys.jsonl"

    async def calls() -> list[int]:
        app = build_app(_settings(tmp_path))
        async with TestClient(TestServer(app)) as client:
            before = (await client.get(READ, headers={"X-API-Key": drop})).status
            revoke_key(path, drop.split("_")[1])
            await asyncio.sleep(1.1)  # the ring checks the file at most once a second
            after = (await client.get(READ, headers={"X-API-Key": drop})).status
            kept = (await client.get(READ, headers={"X-API-Key": keep})).status
            return [before, after, kept]

    assert asyncio.run(calls()) == [503, 401, 503]


def test_key_ring_reloads_changes_and_fails_closed_on_a_bad_file(tmp_path: Path) -> None:
    (first,) = _keys(tmp_path, (Scope.READ,))
    path = tmp_path / "api-keys.jsonl"
    clock = [0.0]
    ring = KeyRing(path, clock=lambda: clock[0])
    now = datetime.now(UTC)
    assert ring.authenticate(first, now) is not None
    (second,) = _keys(tmp_path, (Scope.ADMIN,))
    assert ring.authenticate(second, now) is None  # not re-read before the interval
    clock[0] = 2.0
    record = ring.authenticate(second, now)
    assert record is not None and record.scopes == (Scope.ADMIN,)
    path.chmod(0o666)  # anyone could now add a key: refuse every key
    clock[0] = 4.0
    assert ring.authenticate(first, now) is None
    path.chmod(0o600)
    clock[0] = 6.0
    assert ring.authenticate(first, now) is not None


def test_keys_file_that_others_may_write_or_that_is_malformed_is_refused(tmp_path: Path) -> None:
    (key,) = _keys(tmp_path, (Scope.READ,))
    path = tmp_path / "api-keys.jsonl"
    assert os.stat(path).st_mode & 0o777 == 0o600
    path.chmod(0o620)
    with pytest.raises(KeysFileError, match="chmod go-w"):
        build_app(_settings(tmp_path))
    path.chmod(0o600)
    path.write_text(path.read_text() + key + "\n")  # a plain key pasted into the file
    with pytest.raises(KeysFileError, match="line 2: not a key record") as refused:
        read_keys_file(path)
    assert key not in str(refused.value)
    with pytest.raises(KeysFileError, match="No such file"):
        build_app(ApiSettings(api_keys_file=tmp_path / "missing"))


def test_keys_add_prints_the_key_once_and_stores_only_its_digest(tmp_path: Path) -> None:
    path = tmp_path / "keys.jsonl"
    runner = CliRunner()
    added = runner.invoke(
        main,
        [
            "api",
            "keys",
            "add",
            "--scope",
            "read",
            "--scope",
            "admin",
            "--name",
            "web",
            "--file",
            str(path),
        ],
    )
    assert added.exit_code == 0, added.output
    (key,) = added.stdout.splitlines()
    assert key.startswith("rs_") and len(key) == 3 + 12 + 1 + 43
    stored = path.read_text()
    assert key not in stored and key.split("_", 2)[2] not in stored
    (record,) = read_keys_file(path)
    assert record.sha256 == hashlib.sha256(key.encode()).hexdigest()
    assert (record.key_id, record.scopes, record.name) == (
        key.split("_")[1],
        ("admin", "read"),
        "web",
    )
    assert os.stat(path).st_mode & 0o777 == 0o600
    listed = runner.invoke(main, ["api", "keys", "list", "--file", str(path)])
    assert listed.exit_code == 0
    assert record.key_id in listed.stdout and "admin,read" in listed.stdout
    assert record.sha256 not in listed.output and key not in listed.output
    revoked = runner.invoke(main, ["api", "keys", "revoke", record.key_id, "--file", str(path)])
    assert revoked.exit_code == 0 and read_keys_file(path) == []
    again = runner.invoke(main, ["api", "keys", "revoke", record.key_id, "--file", str(path)])
    assert again.exit_code == 1 and "no key" in again.output


def test_a_non_loopback_start_without_keys_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    refused = CliRunner().invoke(main, ["serve", "api", "--host", "0.0.0.0", "--port", "1"])
    assert refused.exit_code == 1
    assert "without keys" in refused.output
    with pytest.raises(UnsafeExposureError):
        check_exposure(ApiSettings(api_host="10.1.2.3"))
    with caplog.at_level(logging.WARNING, logger="api.app"):
        check_exposure(ApiSettings(api_host="0.0.0.0", api_allow_anonymous=True))
        check_exposure(ApiSettings(api_host="127.0.0.1"))
        check_exposure(ApiSettings(api_host="::1"))
    assert len([r for r in caplog.records if "open to anyone" in r.getMessage()]) == 3
    caplog.clear()
    _keys(tmp_path, (Scope.READ,))
    with caplog.at_level(logging.WARNING, logger="api.app"):
        check_exposure(ApiSettings(api_host="0.0.0.0", api_keys_file=tmp_path / "api-keys.jsonl"))
    assert not caplog.records
    # The removed plain key is refused, not silently ignored, and never printed.
    monkeypatch.setenv("RECSTREAM_API_KEY", "hunter2")
    legacy = CliRunner().invoke(main, ["serve", "api", "--port", "1"])
    assert legacy.exit_code == 1
    assert "RECSTREAM_API_KEY is no longer read" in legacy.output
    assert "hunter2" not in legacy.output


def test_without_keys_only_the_anonymous_scopes_are_open() -> None:
    """Development without a keys file: reads need no key (a 503 here: let in)."""
    ((status, _),) = asyncio.run(
        _get(build_app(ApiSettings(redis_url=NOBODY_LISTENS)), [(READ, {})])
    )
    assert status == 503


def test_every_route_must_declare_its_scope() -> None:
    app = build_app(ApiSettings())
    declared = {(r.method, r.resource.canonical) for r in app.router.routes() if r.resource}
    assert {(m, p) for m, p in declared if m != "HEAD"} == set(SCOPES)
    assert SCOPES[("GET", RECOMMENDATIONS_PATH)] is Scope.READ

    async def handler(_request: web.Request) -> web.Response:
        return web.Response()

    undeclared = web.Application()
    undeclared.router.add_put("/v1/users/{user_id}", handler)
    with pytest.raises(LookupError, match=r"PUT /v1/users/\{user_id\} has no scope"):
        _scopes(undeclared)


def test_metrics_are_served_by_their_own_app_only(tmp_path: Path) -> None:
    (admin,) = _keys(tmp_path, (Scope.ADMIN,))
    ((status, body),) = asyncio.run(_get(build_metrics_app(), [("/metrics", {})]))
    assert status == 200 and b"recs_api_requests_total" in body
    ((status, _),) = asyncio.run(
        _get(build_app(_settings(tmp_path)), [("/metrics", {"X-API-Key": admin})])
    )
    assert status == 404


def test_no_user_id_key_or_digest_reaches_the_logs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every logger at DEBUG while requests fail with 400, 401, 403, 404, 500 and 503."""
    reader, admin = _keys(tmp_path, (Scope.READ,), (Scope.ADMIN,))
    (record, _) = read_keys_file(tmp_path / "api-keys.jsonl")
    user = "secret-user-7f3a"
    wrong = f"rs_{reader.split('_')[1]}_{'B' * 43}"
    calls = [
        (f"/v1/users/{user}/recommendations", {"X-API-Key": reader}),  # 503: Redis is down
        (f"/v1/users/{user}/recommendations?k=0", {"X-API-Key": reader}),  # 400
        (f"/v1/users/{user}/recommendations", {"X-API-Key": wrong}),  # 401
        (f"/v1/users/{user}/recommendations", {"X-API-Key": admin}),  # 403
        (f"/v1/users/{user}/nothing", {"X-API-Key": reader}),  # 404
        (f"/v1/users/{user}x/recommendations", {"X-API-Key": reader}),  # 500, below
    ]
    import api.app

    real = api.app.valid_user_id

    def failing(user_id: str) -> bool:
        if user_id.endswith("x"):
            raise ValueError(f"cannot handle {user_id}")  # a message that quotes the user id
        return real(user_id)

    monkeypatch.setattr(api.app, "valid_user_id", failing)

    async def run() -> list[tuple[int, str]]:
        # Served as `recstream serve api` serves it (its runner options), not by TestServer,
        # which would add an access log the service does not have.
        runner = web.AppRunner(build_app(_settings(tmp_path)), **SERVER_OPTIONS)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]  # bound
        out = []
        try:
            async with ClientSession() as session:
                for path, headers in calls:
                    url = f"http://127.0.0.1:{port}{path}"
                    async with session.get(url, headers=headers) as response:
                        out.append((response.status, response.headers["X-Request-Id"]))
        finally:
            await runner.cleanup()
        return out

    with caplog.at_level(logging.DEBUG):
        results = asyncio.run(run())
    assert [status for status, _ in results] == [503, 400, 401, 403, 404, 500]
    logged = "\n".join(
        f"{r.name} {r.getMessage()} {r.exc_text or ''} {r.stack_info or ''}" for r in caplog.records
    )
    for secret in (user, reader, admin, wrong, reader.split("_", 2)[2], record.sha256):
        assert secret not in logged
    # The failures are still traceable: route pattern and the request id the client saw.
    assert f"request {results[0][1]} on {RECOMMENDATIONS_PATH}: Redis failed" in logged
    assert f"request {results[5][1]} on {RECOMMENDATIONS_PATH} failed: ValueError" in logged
