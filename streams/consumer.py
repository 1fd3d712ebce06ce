"""A Faust consumer whose fetch loop hands over records without a task per record.

Faust's ``Consumer._drain_messages`` delivers every record with
``wait_first(callback(message), suspend_flow.wait())``: two tasks and an ``asyncio.wait`` per
record, a large share of a worker's CPU time at thousands of records per second. The callback
normally completes without suspending (it puts onto the stream's queue with ``put_nowait``), so
this loop awaits it directly and only falls back to ``wait_first`` while flow is suspended
(rebalancing). If a delivery is blocked on a full buffer when a rebalance starts, the record may
still reach the stream after the rebalance; the fold's seen-set makes such a late duplicate a
no-op, and folding is order-independent. Everything else (offset bookkeeping, gaps, periodic
commits, yielding to the loop every 100 records) is as in faust-streaming 0.15.

Batch delivery (``streams_delivery = "batch"``) goes further for the clickstream topic: each poll's
records skip the conductor, the stream and its per-record acks and go to the fold handler as one
list, up to ``MAX_IN_FLIGHT`` polls at a time, acked when their handler returns.

Both (and the plain consumer, :class:`ResumingConsumer`) resume from the offsets the fold stored in
Redis: after Faust seeks each assigned partition to its Kafka commit, a resume hook
(:meth:`streams.folder.ProfileFolder.resume`) says where each clickstream partition really
resumes, and the consumer seeks there before the flow of records starts.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar, cast

from faust.transport.consumer import CONSUMER_FETCHING
from faust.transport.drivers.aiokafka import Consumer as AIOKafkaConsumer

__all__ = ["FastDrainConsumer", "ResumingConsumer"]


BatchHandler = Callable[[Sequence[Any]], Awaitable[None]]
ResumeHook = Callable[[Mapping[tuple[str, int], int | None]], Awaitable[Mapping[Any, int | None]]]
"""Given each assigned partition's Kafka commit (None: none), where partitions resume instead:
an offset, or None for the earliest retained record; partitions it leaves out keep the commit."""
MAX_IN_FLIGHT = 2


class ResumingConsumer(AIOKafkaConsumer):
    """aiokafka consumer that seeks assigned partitions where its resume hook says."""

    resume_hook: ClassVar[tuple[ResumeHook, ...]] = ()

    @classmethod
    def resuming(cls, hook: ResumeHook) -> type[ResumingConsumer]:
        """A subclass that asks ``hook`` where partitions resume."""
        return type(cls.__name__, (cls,), {"resume_hook": (hook,)})

    async def perform_seek(self) -> None:
        # Faust calls this once a rebalance is done, before the flow resumes (and when a fetch
        # finds the flow stopped): first its own seek to the Kafka commits, then ours.
        await super().perform_seek()
        if not self.resume_hook:
            return
        (hook,) = self.resume_hook
        assigned = self.assignment()
        plan = await hook({tp: self._committed_offset.get(tp) for tp in assigned})
        earliest = [tp for tp, offset in plan.items() if offset is None]
        lows = await self.earliest_offsets(*earliest) if earliest else {}
        for tp, planned in plan.items():
            offset = lows[tp] if planned is None else planned
            await self.seek(tp, offset)
            # Faust commits only offsets past what it takes as committed, and only in an
            # unbroken run from it: the resume point is the new base, ahead of or behind Kafka.
            self._committed_offset[tp] = offset or None


class FastDrainConsumer(ResumingConsumer):
    """aiokafka consumer with a cheaper per-record delivery path (see module docstring).

    With batch topics (:meth:`with_batches`), the records of those topics in each poll skip the
    conductor and streams: they are tracked as in flight, handed to the batch handler as one
    list, then acked, so offsets are committed only after the handler returns.
    """

    _slots: asyncio.Semaphore | None = None
    _batch_tasks: set[asyncio.Future[Any]]
    batch_topics: ClassVar[frozenset[str]] = frozenset()
    # A one-element tuple rather than a bare callable, which Python would bind as a method.
    batch_handler: ClassVar[tuple[BatchHandler, ...]] = ()

    @classmethod
    def with_batches(cls, topics: Iterable[str], handler: BatchHandler) -> type[FastDrainConsumer]:
        """A subclass that delivers ``topics`` to ``handler`` one poll at a time."""
        return type(
            "BatchDrainConsumer",
            (cls,),
            {"batch_topics": frozenset(topics), "batch_handler": (handler,)},
        )

    async def _drain_messages(self, fetcher: Any) -> None:  # pragma: no cover - hot loop
        callback = self.callback
        getmany = self.getmany
        consumer_should_stop = self._stopped.is_set
        fetcher_should_stop = fetcher._stopped.is_set
        suspended = self.suspend_flow.is_set
        get_read_offset = self._read_offset.__getitem__
        set_read_offset = self._read_offset.__setitem__
        set_flag = self.diag.set_flag
        unset_flag = self.diag.unset_flag
        commit_every = self._commit_every
        acks_enabled_for = self.app.topics.acks_enabled_for
        yield_every = 100
        since_yield = 0
        sleep = asyncio.sleep
        batch_topics = self.batch_topics
        batch: list[Any] = []
        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                set_flag(CONSUMER_FETCHING)
                records = cast(AsyncIterator[Any], getmany(timeout=1.0))
                await sleep(0)
                if self.should_stop:
                    continue
                async for tp, message in records:
                    since_yield += 1
                    if since_yield > yield_every:
                        await sleep(0)
                        since_yield = 0
                    offset = message.offset
                    read = get_read_offset(tp)
                    if read is not None and offset < read:
                        continue
                    gap = offset - (read or 0)
                    if gap > 1 and read and acks_enabled_for(message.topic):
                        await self._add_gap(tp, read + 1, offset)
                    if commit_every is not None and self._n_acked >= commit_every:
                        self._n_acked = 0
                        await self.commit()
                    if message.topic in batch_topics:
                        if not suspended():
                            self.track_message(message)
                            batch.append(message)
                        set_read_offset(tp, offset)
                        continue
                    if suspended():
                        await self.wait_first(callback(message), self.suspend_flow.wait())
                    else:
                        await callback(message)
                    set_read_offset(tp, offset)
                if batch:
                    await self._deliver_batch(batch)
                    batch = []
                unset_flag(CONSUMER_FETCHING)
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                self.log.info("Broker stopped consumer, shutting down...")
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                self.log.info("Consumer shutting down for user cancel.")
                return
            raise
        finally:
            unset_flag(CONSUMER_FETCHING)

    async def _deliver_batch(self, batch: list[Any]) -> None:
        """Start handling ``batch`` and return, so the next poll overlaps its Redis round trip.

        At most ``MAX_IN_FLIGHT`` batches are in the handler at once; a batch's records are
        acked when its handler returns. A handler that fails crashes the consumer, leaving its
        records unacked (so uncommitted).
        """
        if self._slots is None:
            self._slots = asyncio.Semaphore(MAX_IN_FLIGHT)
            self._batch_tasks = set()
        slots = self._slots
        await slots.acquire()
        (handler,) = self.batch_handler
        task = asyncio.ensure_future(handler(batch))
        # The loop holds tasks weakly: keep a reference until each is done.
        self._batch_tasks.add(task)

        def finished(done: asyncio.Future[None]) -> None:
            self._batch_tasks.discard(done)
            slots.release()
            if done.cancelled():
                return
            error = done.exception()
            if error is not None:
                self.log.error("batch handler failed: %r", error)
                crash = asyncio.ensure_future(self.crash(error))
                self._batch_tasks.add(crash)
                crash.add_done_callback(self._batch_tasks.discard)
                return
            ack = self.ack
            for message in batch:
                ack(message)

        task.add_done_callback(finished)
