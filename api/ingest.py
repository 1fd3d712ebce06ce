"""Clickstream ingestion over HTTP (``POST /v1/events``): the body's checks and the producer.

Web frontends send their users' events here instead of to Kafka. Two rules shape the module:

- **The API accepts exactly what the fold accepts.** Each event is serialised once, as compact
  JSON, and those bytes are what :func:`schemas.parse_event` checks and what Kafka gets, keyed by
  the event's ``user_id``; the record-level rules of ``streams.folder`` (key = ``user_id``, no
  ``ts`` before 1970) hold by construction or are checked here too, with the same reason codes.
  ``max_future`` comes from ``event_max_future_s``, the setting the stream worker reads, so an
  event accepted now is not dead-lettered for its ``ts`` later. A batch with any invalid event is
  refused whole (:class:`Refused`), naming each invalid event by index and reason code only.
- **The API holds Kafka rights only as the ``producer`` principal, and only when configured.**
  :func:`ingestion_refusal` says why a deployment cannot ingest (services have credentials but
  none were given to the API for ``producer``); on the plain development stack (no credentials
  anywhere) the producer connects like every other client.

:class:`EventSink` keeps one idempotent producer (``recstream.kafka.idempotent_producer``, so a
user maps to the partition every other producer picks) with a poll thread that serves delivery
reports and resolves them onto the event loop: a request waits for the broker's acks without
blocking the loop, and a broker that does not ack within the timeout is an
:class:`~api.exceptions.IngestFailed`. The producer's own message timeout is the same, so events
of a request answered 503 are not retried behind the client's back for minutes; a retry with the
same event ids is folded once (the fold de-duplicates event ids).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import orjson
from confluent_kafka import KafkaError, KafkaException

from api.exceptions import IngestFailed
from recstream.errors import ConfigError
from recstream.kafka import idempotent_producer
from recstream.security import credentials
from recstream.settings import CommonSettings
from schemas.api import InvalidEvent
from schemas.events import parse_event
from schemas.exceptions import Reason, ValidationFailed

__all__ = ["PRODUCER", "EventSink", "Record", "Refused", "ingestion_refusal", "parse_events"]

log = logging.getLogger(__name__)

PRODUCER: Final = "producer"
"""The principal the API produces clickstream events as (``ops.access``: write ``clickstream``)."""

Record = tuple[bytes, bytes]
"""A clickstream record: key (the user id, UTF-8) and value (the event, compact JSON)."""


class Refused(Exception):  # noqa: N818 - a verdict on the body, answered as a 400
    """The body is refused: ``code`` and ``message`` for the error, ``invalid`` per event,
    ``events``: how many the body held (0 when it could not tell)."""

    def __init__(
        self, code: str, message: str, *, events: int = 0, invalid: tuple[InvalidEvent, ...] = ()
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.events = events
        self.invalid = invalid


def parse_events(
    body: bytes,
    *,
    max_events: int,
    max_future: timedelta,
    now: datetime | None = None,
) -> list[Record]:
    """The records to produce for a request body (one event or ``{"events": [...]}``).

    Raises :class:`Refused` for a body that is not JSON or not one of those shapes
    (``bad_body``), a batch of more than ``max_events`` (``too_many_events``), or any invalid
    event (``invalid_events``, every invalid one listed). Messages never quote the body.
    """
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise Refused("bad_body", "the body is not UTF-8 JSON") from None
    if type(document) is not dict:
        raise Refused("bad_body", 'the body must be one event or {"events": [...]}')
    # An event has no "events" field (the contract forbids unknown fields): a body with one is a
    # batch, and a batch has nothing else.
    if "events" in document:
        events = document["events"]
        if len(document) != 1 or type(events) is not list or not events:
            raise Refused("bad_body", 'a batch is {"events": [...]} with at least one event')
        if len(events) > max_events:
            raise Refused(
                "too_many_events",
                f"a batch holds at most {max_events} events",
                events=len(events),
            )
    else:
        events = [document]
    now = now or datetime.now(UTC)
    records: list[Record] = []
    invalid: list[InvalidEvent] = []
    for index, item in enumerate(events):
        value = orjson.dumps(item)  # the bytes checked are the bytes produced
        try:
            event = parse_event(value, now=now, max_future=max_future)
            if event.ts.timestamp() < 0:  # the fold refuses it too (streams.folder)
                raise ValidationFailed(Reason.BAD_TS, "ts is before 1970")
        except ValidationFailed as failure:
            invalid.append(InvalidEvent(index=index, reason=failure.reason))
            continue
        records.append((event.user_id.encode(), value))
    if invalid:
        raise Refused(
            "invalid_events",
            f"{len(invalid)} of {len(events)} events break the clickstream contract; "
            "nothing was produced",
            events=len(events),
            invalid=tuple(invalid),
        )
    return records


def ingestion_refusal(settings: CommonSettings) -> str | None:
    """Why this deployment cannot ingest events (its services have credentials, but none are
    configured for the ``producer`` principal), or ``None`` when it can."""
    try:
        credentials(settings, "kafka", PRODUCER)
    except ConfigError as exc:
        # The detail (a secrets path) is for the operator's log, not for the API's clients.
        log.warning("event ingestion is not configured: %s", exc)
        return "event ingestion is not configured on this API (no producer credentials)"
    return None


class EventSink:
    """One idempotent producer, as ``principal`` (``producer`` for the clickstream), to ``topic``
    (default the clickstream), whose deliveries resolve asyncio futures.

    A daemon thread polls the producer (serving delivery reports); each report is handed to the
    event loop with ``call_soon_threadsafe``. :meth:`send` enqueues a request's records and
    waits for every ack, at most ``timeout_s``.
    """

    def __init__(
        self,
        settings: CommonSettings,
        timeout_s: float,
        *,
        topic: str | None = None,
        principal: str = PRODUCER,
    ) -> None:
        self.topic = topic or settings.topic_clickstream
        self.timeout_s = timeout_s
        self.broken = False  # a fatal producer error: the app makes a new sink
        self._producer = idempotent_producer(
            settings, principal, message_timeout_ms=max(1, int(timeout_s * 1000))
        )
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="events-producer", daemon=True)
        self._poller.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                self._producer.poll(0.1)
            except KafkaException as exc:
                # An error the producer cannot recover from (e.g. the broker refuses this
                # principal an idempotent producer id) is raised here once; its queued events
                # are then reported as failed by the next polls, and the app makes a new sink.
                error: KafkaError = exc.args[0]
                self.broken = self.broken or error.fatal()
                log.warning("events producer: %s", error.name())
                self._stop.wait(0.1)

    async def send(self, records: Sequence[Record]) -> None:
        """Produce ``records`` and wait for the broker's acks; :class:`IngestFailed` when one is
        refused or not acknowledged in time (some may have been written: retry is safe)."""
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[KafkaError | None]] = []
        for key, value in records:
            future: asyncio.Future[KafkaError | None] = loop.create_future()

            def delivered(
                error: KafkaError | None,
                _message: Any,
                future: asyncio.Future[KafkaError | None] = future,
            ) -> None:
                # RuntimeError: the loop closed (shutdown), nobody waits any more.
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(_settle, future, error)

            try:
                self._producer.produce(self.topic, key=key, value=value, on_delivery=delivered)
            except BufferError:
                raise IngestFailed("the producer's queue is full; retry later") from None
            except KafkaException as exc:
                error: KafkaError = exc.args[0]
                self.broken = self.broken or error.fatal()
                raise IngestFailed(f"Kafka refused the events ({error.name()})") from None
            futures.append(future)
        try:
            async with asyncio.timeout(self.timeout_s):
                errors = await asyncio.gather(*futures)
        except TimeoutError:
            raise IngestFailed(
                f"Kafka did not acknowledge the events within {self.timeout_s:g} s"
            ) from None
        refused = [error for error in errors if error is not None]
        if refused:
            self.broken = self.broken or any(error.fatal() for error in refused)
            raise IngestFailed(
                f"Kafka refused {len(refused)} of {len(records)} events ({refused[0].name()})"
            )

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop polling and give queued events a last chance to be delivered (blocks)."""
        self._stop.set()
        self._poller.join()
        try:
            left = self._producer.flush(timeout_s)
        except KafkaException as exc:  # a producer the broker refused (fatal): nothing to flush
            log.warning("events producer closed with %s", type(exc).__name__)
            return
        if left:
            log.warning("events producer closed with %d events undelivered", left)


def _settle(future: asyncio.Future[KafkaError | None], error: KafkaError | None) -> None:
    if not future.done():  # a request that timed out no longer waits
        future.set_result(error)
