"""``POST /v1/events`` on the secure stack: the API produces as the ``producer`` principal when
its credentials are configured, answers 503 when they are not, and its own ``api`` principal
cannot produce through the route.

Reuses the secure stack of ``test_secure_stack.py`` (its module fixture: one stack per module).
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import orjson
import pytest

from api.keys import add_key, new_key
from api.settings import ApiSettings
from schemas.api import ErrorResponse, EventsAccepted, Scope
from tests.integration.streams_support import Consumed, consume, event
from tests.integration.test_api_events import _posts
from tests.integration.test_secure_stack import Secure, secure

pytestmark = pytest.mark.integration

__all__ = ["secure"]  # the fixture, imported for this module


def test_the_api_produces_as_the_producer_only_when_given_its_credentials(
    secure: Secure, tmp_path: Path
) -> None:
    s = secure.settings
    keys_file = tmp_path / "keys"
    key, record = new_key([Scope.EVENTS], "web")
    add_key(keys_file, record)
    settings = ApiSettings(**s.model_dump(), api_keys_file=keys_file, api_events_ack_timeout_s=5)
    headers = {"X-API-Key": key}
    batch = [event(f"secure-{n}", f"su{n}", "a", 1_767_225_600.0 + n) for n in range(3)]
    body = orjson.dumps({"events": batch})

    # The secrets dir holds every principal's files, the producer's among them.
    ((status, answer),) = asyncio.run(_posts(settings, [(body, headers)]))
    assert status == 202, answer
    assert EventsAccepted.model_validate_json(answer).accepted == 3
    ours = {e["event_id"] for e in batch}

    def mine(got: list[Consumed]) -> list[tuple[bytes | None, bytes]]:
        return sorted((r.key, r.value) for r in got if orjson.loads(r.value)["event_id"] in ours)

    records = consume(s.topic_clickstream, s, lambda got: len(mine(got)) >= len(batch))
    assert mine(records) == sorted((e["user_id"].encode(), orjson.dumps(e)) for e in batch)

    # Services have credentials, the API none for the producer: it says so, produces nothing.
    assert s.secrets_dir is not None
    partial = tmp_path / "secrets"
    shutil.copytree(s.secrets_dir, partial)
    (partial / "kafka" / "producer").unlink()
    without = settings.model_copy(update={"secrets_dir": partial})
    ((status, answer),) = asyncio.run(_posts(without, [(body, headers)]))
    assert status == 503
    assert ErrorResponse.model_validate_json(answer).error.code == "ingestion_unavailable"

    # Given the api principal's own credentials instead, the broker refuses the clickstream.
    as_api = settings.model_copy(
        update={"kafka_username": "api", "kafka_password_file": s.secrets_dir / "kafka" / "api"}
    )
    ((status, answer),) = asyncio.run(_posts(as_api, [(body, headers)]))
    assert status == 503
    error = ErrorResponse.model_validate_json(answer).error
    assert error.code == "ingestion_failed"
