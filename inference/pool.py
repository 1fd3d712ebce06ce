"""A pool of warmed-up recommender worker processes behind a bounded, batching request queue.

Callers submit one user's history at a time and get a :class:`concurrent.futures.Future` back (or
await :meth:`WorkerPool.recommend`); model code never runs in the caller's thread, so neither a
Kafka poll loop nor an event loop ever executes torch. One I/O thread in the parent owns every
worker pipe and does all the bookkeeping:

- **Dynamic batching**: when a worker is idle, queued requests go to it as one batch, up to
  ``max_batch_size``; a partial batch waits at most ``max_wait_ms`` for company.
- **Bounded queue**: :meth:`WorkerPool.submit` raises :class:`PoolSaturatedError` when
  ``queue_size`` requests are waiting, so callers apply backpressure instead of growing memory.
- **Timeouts and failures**: a request not answered within ``request_timeout_s``, or whose batch
  raised in the model, is answered by the fallback recommender (popularity, in the parent) with
  ``source="fallback"``.
- **Crashes**: a worker that dies is noticed through its process sentinel, replaced, and the
  requests it held are queued again at the front (up to ``max_attempts``), so none is lost.
- **Validation**: every returned item must be in the catalog; others are dropped and counted.
- **A failing I/O thread**: an answer the bookkeeping cannot read gets the fallback (a fallback
  that fails sets the error on the future: no caller is left waiting); any other error inside
  one round of the thread answers the requests workers held with the fallback, is logged and
  counted, and the thread goes on. If it dies anyway (the error repeats round after round), the
  pool is *broken*: every waiting request is answered, :meth:`WorkerPool.health` reports not ok
  and :meth:`WorkerPool.submit` raises :class:`PoolBrokenError`, so the service fails its health
  check and exits for its supervisor instead of hanging while it looks healthy.

Workers are ``spawn``-ed (safe with torch and CUDA): the ``workers`` setting, or else one per GPU
when CUDA is present and two on a CPU (one on a single core), with torch threads
(``threads_per_worker``, clamped so that workers * threads <= CPU cores).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import multiprocessing as mp
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any, Literal

from prometheus_client import Counter, Gauge, Histogram
from pydantic import BaseModel, ConfigDict, Field

from inference.exceptions import InferenceError
from inference.reasons import MAX_REASONS, ListReasons
from inference.recommender import Recommender
from inference.worker import worker_main
from schemas.messages import POPULAR_MIN_USERS

__all__ = [
    "PoolBrokenError",
    "PoolClosedError",
    "PoolConfig",
    "PoolResult",
    "PoolSaturatedError",
    "PoolStartError",
    "WorkerPool",
]

log = logging.getLogger(__name__)

QUEUE_DEPTH = Gauge("recs_pool_queue_depth", "Requests waiting for a worker.")
INFLIGHT = Gauge("recs_pool_inflight_requests", "Requests being computed by a worker.")
WORKERS_READY = Gauge("recs_pool_workers_ready", "Workers warmed up and taking work.")
BATCH_SIZE = Histogram(
    "recs_pool_batch_size",
    "Requests per batch sent to a worker.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
LATENCY = Histogram(
    "recs_pool_request_latency_seconds",
    "Submit to answer, per request (model or fallback).",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
FALLBACKS = Counter(
    "recs_pool_fallbacks_total", "Requests answered by the fallback recommender.", ["reason"]
)
REJECTED_ITEMS = Counter(
    "recs_pool_rejected_items_total", "Items a model returned that are not in the catalog."
)
UNEXPLAINED = Counter(
    "recs_pool_unexplained_requests_total",
    "Model answers served without reasons because explaining them raised.",
)
RESTARTS = Counter("recs_pool_worker_restarts_total", "Workers replaced after they died.")
RETRIES = Counter("recs_pool_retried_requests_total", "Requests re-queued after a worker died.")
IO_ERRORS = Counter(
    "recs_pool_io_errors_total", "Rounds of the pool's I/O thread that raised (contained)."
)

# Rounds in a row that may fail before the I/O thread gives up: one bad answer is contained,
# an error that repeats every round would otherwise spin forever.
_MAX_IO_FAILURES = 5
# How long the I/O thread waits when nothing is due. Only a safety net: a submit wakes it at once.
IDLE_ROUND_S = 0.5


class PoolSaturatedError(InferenceError):
    """The request queue is full; retry later (callers should pause their input)."""


class PoolClosedError(InferenceError):
    """The pool is shut down or shutting down."""


class PoolStartError(InferenceError):
    """Workers did not become ready."""


class PoolBrokenError(PoolClosedError):
    """The pool's I/O thread died: no request would ever be answered; restart the service."""


class PoolConfig(BaseModel):
    """How the pool runs: the regeneration settings carry it as their ``regen_pool`` sub-model."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    workers: int | None = Field(
        None,
        ge=1,
        description="Worker processes; unset = one per GPU when CUDA is present, else 2 (1 on "
        "a single core): a crashed worker's replacement loads for seconds, while its twin serves.",
    )
    max_batch_size: int = Field(32, ge=1, description="Largest batch a worker gets.")
    max_wait_ms: float = Field(2.0, ge=0, description="Longest wait to fill a partial batch.")
    queue_size: int = Field(256, ge=1, description="Request queue bound.")
    request_timeout_s: float = Field(
        2.0, gt=0, description="A request unanswered this long gets the fallback list."
    )
    max_attempts: int = Field(
        3, ge=1, description="Tries of a request whose worker died before it is given up."
    )
    start_timeout_s: float = Field(
        180.0, gt=0, description="How long workers may take to load and warm up."
    )
    # One intra-op thread by default: on a shared CPU, torch's spinning OpenMP threads fight
    # the consumers and each other (measured: 2 threads were 10x slower under load than 1).
    threads_per_worker: int = Field(
        1, ge=1, description="torch threads per worker (clamped to cores / workers)."
    )


@dataclass(frozen=True)
class PoolResult:
    """One request's answer: catalog items best first, and where they came from."""

    items: list[tuple[str, float]]
    source: Literal["model", "fallback"]
    model_name: str
    model_version: str
    latency_s: float
    reason: str | None = None  # why a fallback was used
    reasons: ListReasons = field(default_factory=lambda: ListReasons({}))
    """Why the listed items are there, when the model explains its lists (``inference.reasons``):
    the history items behind each (ids, largest contribution first; items without any are left
    out) and the items recent popularity brought into the list."""


@dataclass(eq=False)
class _Request:
    history: list[str]
    k: int
    future: Future[PoolResult]
    submitted: float
    deadline: float
    attempts: int = 0
    returning: bool = False  # made again for a user who has been away (inference.trending)


@dataclass(eq=False)
class _Worker:
    slot: int
    process: BaseProcess
    conn: Connection
    send_lock: threading.Lock = field(default_factory=threading.Lock)
    ready: bool = False
    alive: bool = True
    info: dict[str, Any] = field(default_factory=dict)
    batch: tuple[int, list[_Request]] | None = None
    pings: dict[int, Future[dict[str, Any]]] = field(default_factory=dict)
    recent: int = 0  # which of the pool's recent-popularity counts its model holds

    def send(self, message: tuple[Any, ...]) -> None:
        with self.send_lock:
            self.conn.send(message)


def _settle(future: Future[Any], value: Any) -> bool:
    """Set a future's result unless it is already settled (timeouts race with late answers)."""
    try:
        future.set_result(value)
    except InvalidStateError:
        return False
    return True


def _cuda_devices() -> int:
    import torch

    return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0


class WorkerPool:
    """Worker processes serving ``recommend(histories, k)`` from a bounded batching queue."""

    def __init__(
        self,
        loader: Callable[[], Recommender],
        fallback: Recommender,
        catalog: Iterable[str] | None,
        config: PoolConfig | None = None,
        warmup_history: list[str] | None = None,
    ) -> None:
        self.config = config or PoolConfig()
        self._loader = loader
        self._fallback = fallback
        self._fallback_name = str(getattr(fallback, "name", "fallback"))
        self._fallback_version = str(getattr(fallback, "version", "1"))
        self._catalog = frozenset(catalog) if catalog is not None else None
        self._warmup = warmup_history or []
        gpus = _cuda_devices() if self.config.workers is None else 0
        self._gpus = gpus
        cores = os.cpu_count() or 1
        # On a CPU, two workers: one crash leaves a warm worker serving while the replacement
        # loads (importing transformers alone takes seconds), instead of every request waiting.
        self._n_workers = self.config.workers or gpus or min(2, cores)
        # workers x threads never exceeds the cores.
        self._threads = max(1, min(self.config.threads_per_worker, cores // self._n_workers))
        self._ctx = mp.get_context("spawn")
        self._queue: deque[_Request] = deque()
        self._lock = threading.Lock()
        self._workers: list[_Worker] = []
        self._wake_r, self._wake_w = self._ctx.Pipe(duplex=False)
        self._woken = False
        self._batch_ids = itertools.count(1)
        self._ping_ids = itertools.count(1)
        self._stopping = False
        self._closed = False
        self._thread: threading.Thread | None = None
        self._broken: str | None = None  # why the I/O thread died, once it has
        self._start_failures: list[str] = []
        self._later: list[int] = []  # slots still to start, one load at a time
        # The latest recent-popularity counts (set_recent) and their number: a worker is sent
        # them before its next batch when it holds an older number.
        self._recent: tuple[int, dict[str, float] | None] = (0, None)
        self.model_name = "unknown"
        self.model_version = "unknown"
        # Days of recent popularity the model blends (its ``recent_days``; 0: none): what the
        # caller should hand it with set_recent. When the blend is for returning users only,
        # how long they must have been away and the history length it stops at (0: for every
        # list of a short history; the caller then makes no list again).
        self.recent_days = 0
        self.recent_idle_s = 0
        self.recent_below = 0

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> WorkerPool:
        """Start the workers and return once the first is warmed up (or raise PoolStartError).

        The others are started after it, one load at a time, and take work once ready: a
        restarted service serves after one model load, not after several competing for the
        CPU. (On GPUs, where each worker has its own device, all start at once.)
        """
        deadline = time.monotonic() + self.config.start_timeout_s
        together = self._n_workers if self._gpus else 1
        self._workers = [self._spawn(slot) for slot in range(together)]
        for worker in self._workers:
            self._await_ready(worker, deadline)
        first = self._workers[0].info
        self.model_name = str(first.get("model", "unknown"))
        self.model_version = str(first.get("version", "unknown"))
        self.recent_days = int(first.get("recent_days", 0))
        self.recent_idle_s = int(first.get("recent_idle_s", 0))
        self.recent_below = int(first.get("recent_below", 0))
        WORKERS_READY.set(len(self._workers))
        self._later = list(range(together, self._n_workers))
        self._start_next()  # later ones: by the I/O thread, as each is ready
        self._thread = threading.Thread(target=self._run, name="pool-io", daemon=True)
        self._thread.start()
        log.info(
            "pool ready: %d of %d worker(s) × %d thread(s), model %s %s",
            together,
            self._n_workers,
            self._threads,
            self.model_name,
            self.model_version,
        )
        return self

    def _start_next(self) -> None:
        """Spawn the next worker still to start, once no other one is loading."""
        loading = any(w.alive and not w.ready for w in self._workers)
        if self._later and not loading and not self._stopping:
            self._workers.append(self._spawn(self._later.pop(0)))

    def _spawn(self, slot: int) -> _Worker:
        parent, child = self._ctx.Pipe(duplex=True)
        device = slot if self._gpus else None
        process = self._ctx.Process(
            target=worker_main,
            args=(child, self._loader, self._threads, self._warmup, device),
            name=f"recstream-pool-{slot}",
            daemon=True,
        )
        process.start()
        child.close()
        return _Worker(slot=slot, process=process, conn=parent)

    def _await_ready(self, worker: _Worker, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if not worker.conn.poll(max(remaining, 0.0)):
            self._kill_all()
            raise PoolStartError(f"worker {worker.slot} not ready in time")
        try:
            kind, payload = worker.conn.recv()
        except EOFError:
            self._kill_all()
            raise PoolStartError(f"worker {worker.slot} exited while starting") from None
        if kind != "ready":
            self._kill_all()
            raise PoolStartError(f"worker {worker.slot} failed to start:\n{payload}")
        worker.ready = True
        worker.info = payload

    def close(self, timeout: float = 30.0) -> None:
        """Stop taking requests, finish queued and in-flight ones, then stop the workers.

        Requests still unanswered after ``timeout`` get the fallback answer.
        """
        if self._closed:
            return
        self._stopping = True
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._lock:
            leftovers = list(self._queue)
            self._queue.clear()
        for worker in self._workers:
            if worker.batch is not None:
                leftovers.extend(worker.batch[1])
        for req in leftovers:
            self._answer_fallback(req, "shutdown")
        for worker in self._workers:
            if worker.alive:
                with contextlib.suppress(OSError):  # already gone
                    worker.send(("stop",))
        for worker in self._workers:
            worker.process.join(5.0)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join(5.0)
            worker.conn.close()
        self._wake_r.close()
        self._wake_w.close()
        self._closed = True
        WORKERS_READY.set(0)

    def _kill_all(self) -> None:
        for worker in self._workers:
            if worker.process.is_alive():
                worker.process.kill()
            worker.process.join(5.0)

    def __enter__(self) -> WorkerPool:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the public surface ----------------------------------------------------------------

    def submit(
        self, history: list[str], k: int = 10, *, returning: bool = False
    ) -> Future[PoolResult]:
        """Queue one history (item ids, oldest → newest); raises PoolSaturatedError when full.
        ``returning``: the list is made again for a user who has been away ``recent_idle_s``,
        which a model whose recent popularity is for returning users blends it into."""
        if self._stopping:
            raise PoolClosedError("the pool is shutting down")
        now = time.monotonic()
        req = _Request(
            history=list(history),
            k=k,
            future=Future(),
            submitted=now,
            deadline=now + self.config.request_timeout_s,
            returning=returning,
        )
        with self._lock:
            # Checked under the lock that a dying I/O thread takes to drain the queue, so no
            # request can slip in after the drain and wait forever.
            if self._broken is not None:
                raise PoolBrokenError(f"the pool's I/O thread died: {self._broken}")
            if len(self._queue) >= self.config.queue_size:
                raise PoolSaturatedError(f"{len(self._queue)} requests already queued")
            self._queue.append(req)
            QUEUE_DEPTH.set(len(self._queue))
        self._wake()
        return req.future

    def set_recent(self, counts: Mapping[str, float] | None) -> None:
        """Recent popularity for the workers' models from now on (interactions per item id in the
        window the artifact blends; ``None``: unknown): each worker gets it before its next
        batch, a replacement before its first. Models without a recent-popularity blend ignore
        it."""
        held = None if counts is None else dict(counts)
        with self._lock:
            self._recent = (self._recent[0] + 1, held)

    async def recommend(self, history: list[str], k: int = 10) -> PoolResult:
        """Awaitable :meth:`submit` for asyncio callers (the model runs in a worker process)."""
        return await asyncio.wrap_future(self.submit(history, k))

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def inflight(self) -> int:
        return sum(len(w.batch[1]) for w in self._workers if w.batch is not None)

    @property
    def capacity(self) -> int:
        """Queue slots still free; callers pause their input when this reaches zero."""
        return max(self.config.queue_size - len(self._queue), 0)

    @property
    def broken(self) -> str | None:
        """Why the I/O thread is gone (``None`` while it runs or after a normal close)."""
        thread = self._thread
        if self._broken is None and thread is not None and not thread.is_alive():
            return None if self._stopping else "the I/O thread is not running"
        return self._broken

    def worker_pids(self) -> list[int]:
        return [w.process.pid for w in self._workers if w.alive and w.process.pid is not None]

    def health(self, timeout: float = 5.0) -> dict[str, Any]:
        """Ask every warmed-up worker to compute on its device.

        ``ok`` when at least one is warmed up and every warmed-up one answered: a worker still
        loading (started after the first, or replacing a crashed one) is listed as starting,
        not as a failure, since the others serve meanwhile. A pool whose I/O thread died is
        never ok: nothing would read the workers' answers.
        """
        if self.broken is not None:
            return {
                "ok": False,
                "io_thread": self.broken,
                "workers": [],
                "queued": self.queued,
                "inflight": self.inflight,
                "model": {"name": self.model_name, "version": self.model_version},
            }
        pending: list[tuple[_Worker, Future[dict[str, Any]]]] = []
        answers: list[dict[str, Any]] = []
        for worker in list(self._workers):
            if not worker.alive:  # failed to start: its model may fail the others too
                answers.append({"slot": worker.slot, "ok": False, "error": "failed to start"})
                continue
            if not worker.ready:
                answers.append({"slot": worker.slot, "ok": True, "starting": True})
                continue
            token = next(self._ping_ids)
            fut: Future[dict[str, Any]] = Future()
            worker.pings[token] = fut
            try:
                worker.send(("ping", token))
            except OSError:
                continue
            pending.append((worker, fut))
        deadline = time.monotonic() + timeout
        for worker, fut in pending:
            try:
                info = fut.result(max(deadline - time.monotonic(), 0.0))
                answers.append({"slot": worker.slot, "ok": True, **info})
            except TimeoutError:
                answers.append({"slot": worker.slot, "ok": False, "error": "timeout"})
        ok = bool(pending) and all(a["ok"] for a in answers)
        return {
            "ok": ok and not self._stopping,
            "workers": sorted(answers, key=lambda a: int(a["slot"])),
            "queued": self.queued,
            "inflight": self.inflight,
            "model": {"name": self.model_name, "version": self.model_version},
        }

    # -- the I/O thread ------------------------------------------------------------------

    def _wake(self) -> None:
        if not self._woken:
            self._woken = True
            with contextlib.suppress(OSError):  # closed during shutdown
                self._wake_w.send_bytes(b"!")

    def _run(self) -> None:
        failures = 0
        try:
            while True:
                try:
                    if self._round():
                        return
                    failures = 0
                except Exception:
                    failures += 1
                    IO_ERRORS.inc()
                    log.exception("pool I/O round failed (%d in a row)", failures)
                    if failures >= _MAX_IO_FAILURES:
                        raise
                    self._fail_held("io_error")
        except BaseException as exc:
            self._die(f"{type(exc).__name__}: {exc}")

    def _round(self) -> bool:
        """One round of the I/O thread; True once it may end (stopping and nothing left)."""
        with self._lock:
            idle = not self._queue
        if self._stopping and idle and all(w.batch is None for w in self._workers):
            return True
        timeout = self._next_timeout()
        watched: list[Any] = [self._wake_r]
        by_handle: dict[Any, _Worker] = {}
        for worker in self._workers:
            if worker.alive:
                watched += [worker.conn, worker.process.sentinel]
                by_handle[worker.conn] = worker
                by_handle[worker.process.sentinel] = worker
        for ready in wait(watched, timeout):
            if ready is self._wake_r:
                # Drain, then clear: a submit that still sees the flag set queued its request
                # before this, so this round's dispatch takes it; one that sees it cleared sends
                # a byte the next wait wakes on. (Clearing first would let a byte be drained
                # with the flag left set, and later submits would wait for the idle round.)
                while self._wake_r.poll():
                    self._wake_r.recv_bytes()
                self._woken = False
                continue
            worker = by_handle[ready]
            if not worker.alive:
                continue
            if ready is worker.conn:
                self._receive(worker)
            else:
                self._replace(worker)
        self._expire()
        self._dispatch()
        QUEUE_DEPTH.set(len(self._queue))
        INFLIGHT.set(self.inflight)
        return False

    def _fail_held(self, reason: str) -> None:
        """After a failed round: answer what the workers held (their answers may be lost)."""
        for worker in self._workers:
            if worker.batch is not None:
                held = worker.batch[1]
                worker.batch = None  # a late answer carries the old batch id: ignored
                for req in held:
                    self._answer_fallback(req, reason)

    def _die(self, why: str) -> None:
        """The I/O thread is ending abnormally: refuse new work and answer every waiting one."""
        with self._lock:
            self._broken = why
            waiting = list(self._queue)
            self._queue.clear()
        log.critical("pool I/O thread died (%s); the pool is broken", why)
        for worker in self._workers:
            if worker.batch is not None:
                waiting.extend(worker.batch[1])
                worker.batch = None
        for req in waiting:
            self._answer_fallback(req, "pool_broken")
        WORKERS_READY.set(0)

    def _next_timeout(self) -> float:
        now = time.monotonic()
        horizon = now + IDLE_ROUND_S
        with self._lock:
            if self._queue:
                oldest = self._queue[0]
                horizon = min(horizon, oldest.submitted + self.config.max_wait_ms / 1000.0)
                horizon = min(horizon, *(r.deadline for r in self._queue))
        for worker in self._workers:
            if worker.batch is not None:
                horizon = min(horizon, *(r.deadline for r in worker.batch[1]))
        return max(horizon - now, 0.0)

    def _receive(self, worker: _Worker) -> None:
        while worker.alive and worker.conn.poll():
            try:
                message = worker.conn.recv()
            except (EOFError, OSError):
                self._replace(worker)
                return
            kind = message[0]
            if kind == "pong":
                fut = worker.pings.pop(message[1], None)
                if fut is not None:
                    _settle(fut, message[2])
            elif kind == "ready":  # a later or replacement worker finished warming up
                worker.ready = True
                worker.info = message[1]
                WORKERS_READY.set(sum(w.ready for w in self._workers))
                self._start_next()
            elif kind == "failed":
                log.error("worker %d failed to start:\n%s", worker.slot, message[1])
                worker.alive = False
                WORKERS_READY.set(sum(w.ready for w in self._workers))
                self._start_next()
            elif kind in ("result", "error"):
                self._complete(worker, message)

    def _complete(self, worker: _Worker, message: tuple[Any, ...]) -> None:
        if worker.batch is None or worker.batch[0] != message[1]:
            return
        requests = worker.batch[1]
        worker.batch = None
        if message[0] == "error":
            log.error("model raised on a batch of %d:\n%s", len(requests), message[2])
            for req in requests:
                self._answer_fallback(req, "model_error")
            return
        try:
            _, _, lists, explained, failure = message
            if failure is not None:  # the lists stand; their reasons do not
                UNEXPLAINED.inc(len(requests))
                log.error("model could not explain a batch of %d:\n%s", len(requests), failure)
            answers = []
            for n, (req, ranked) in enumerate(zip(requests, lists, strict=True)):
                if req.future.done():  # timed out already and got the fallback
                    continue
                items = self._validate(ranked, req)
                reasons = (
                    self._validate_reasons(explained[n], req, items)
                    if explained
                    else ListReasons({})
                )
                answers.append((req, items, reasons))
        except Exception:  # an answer of the wrong shape: the batch gets the fallback
            log.exception("unreadable answer for a batch of %d", len(requests))
            for req in requests:
                self._answer_fallback(req, "bad_answer")
            return
        now = time.monotonic()
        for req, items, reasons in answers:
            latency = now - req.submitted
            result = PoolResult(
                items, "model", self.model_name, self.model_version, latency, reasons=reasons
            )
            if _settle(req.future, result):
                LATENCY.observe(latency)

    def _validate(self, ranked: list[tuple[str, float]], req: _Request) -> list[tuple[str, float]]:
        seen = set(req.history)
        out: list[tuple[str, float]] = []
        rejected = 0
        for item, score in ranked:
            if self._catalog is not None and item not in self._catalog:
                rejected += 1
                continue
            if item in seen:
                continue
            seen.add(item)
            out.append((str(item), float(score)))
            if len(out) == req.k:
                break
        if rejected:
            REJECTED_ITEMS.inc(rejected)
        return out

    @staticmethod
    def _validate_reasons(
        given: ListReasons, req: _Request, items: list[tuple[str, float]]
    ) -> ListReasons:
        """The reasons of listed items only, each naming distinct items of the request's own
        history (at most three): a reason is never another user's item or a stranger. An item
        is popular only with a whole count of at least the schema's minimum of users, over a
        window of 1 to 366 days."""
        history = set(req.history)
        out: dict[str, list[str]] = {}
        popular: dict[str, int] = {}
        days = given.days if isinstance(given.days, int) and 1 <= given.days <= 366 else 0
        for item, _ in items:
            reasons = list(
                dict.fromkeys(str(r) for r in given.history.get(item, ()) if r in history)
            )
            if reasons:
                out[item] = reasons[:MAX_REASONS]
            users = given.popular.get(item)
            if days and isinstance(users, int) and users >= POPULAR_MIN_USERS:
                popular[item] = users
        return ListReasons(out, popular, days if popular else 0)

    def _answer_fallback(self, req: _Request, reason: str) -> None:
        if req.future.done():
            return
        try:
            items = self._validate(self._fallback.recommend([req.history], req.k)[0], req)
        except Exception as exc:  # never leave a caller waiting: it hears the error instead
            log.exception("the fallback failed (%s)", reason)
            with contextlib.suppress(InvalidStateError):
                req.future.set_exception(
                    InferenceError(f"{reason}, and the fallback failed: {exc!r}")
                )
            return
        latency = time.monotonic() - req.submitted
        result = PoolResult(
            items, "fallback", self._fallback_name, self._fallback_version, latency, reason
        )
        if _settle(req.future, result):
            FALLBACKS.labels(reason).inc()
            LATENCY.observe(latency)

    def _replace(self, worker: _Worker) -> None:
        """A worker died: requeue what it held (front of the queue) and start a successor."""
        worker.alive = False
        worker.ready = False
        worker.process.join(1.0)
        if self._stopping and worker.process.exitcode == 0:  # asked to stop, and it did
            log.info("worker %d (pid %s) stopped", worker.slot, worker.process.pid)
        else:
            log.warning("worker %d (pid %s) died", worker.slot, worker.process.pid)
        held = worker.batch[1] if worker.batch is not None else []
        worker.batch = None
        retry = []
        for req in held:
            if req.future.done():
                continue
            req.attempts += 1
            if req.attempts >= self.config.max_attempts:
                self._answer_fallback(req, "worker_crash")
            else:
                retry.append(req)
        if retry:
            RETRIES.inc(len(retry))
            with self._lock:
                self._queue.extendleft(reversed(retry))
        for fut in worker.pings.values():
            _settle(fut, {"error": "worker died"})
        worker.conn.close()
        WORKERS_READY.set(sum(w.ready for w in self._workers))
        if self._stopping:
            return
        RESTARTS.inc()
        self._workers[self._workers.index(worker)] = self._spawn(worker.slot)

    def _expire(self) -> None:
        now = time.monotonic()
        expired: list[_Request] = []
        with self._lock:
            if any(r.deadline <= now or r.future.done() for r in self._queue):
                keep: deque[_Request] = deque()
                for r in self._queue:
                    if r.future.done():
                        continue
                    (expired if r.deadline <= now else keep).append(r)
                self._queue = keep
        for worker in self._workers:
            if worker.batch is not None:
                expired.extend(r for r in worker.batch[1] if r.deadline <= now)
        for req in expired:
            self._answer_fallback(req, "timeout")

    def _dispatch(self) -> None:
        idle = [w for w in self._workers if w.alive and w.ready and w.batch is None]
        if not idle:
            return
        now = time.monotonic()
        with self._lock:
            for worker in idle:
                if not self._queue:
                    return
                partial = len(self._queue) < self.config.max_batch_size
                waited = now - self._queue[0].submitted
                if partial and waited < self.config.max_wait_ms / 1000.0 and not self._stopping:
                    return
                batch: list[_Request] = []
                while self._queue and len(batch) < self.config.max_batch_size:
                    batch.append(self._queue.popleft())
                batch_id = next(self._batch_ids)
                worker.batch = (batch_id, batch)
                BATCH_SIZE.observe(len(batch))
                k = max(r.k for r in batch)
                try:
                    if worker.recent != self._recent[0]:
                        worker.send(("recent", self._recent[1]))
                        worker.recent = self._recent[0]
                    histories = [r.history for r in batch]
                    if any(r.returning for r in batch):
                        flags = [r.returning for r in batch]
                        worker.send(("batch", batch_id, histories, k, flags))
                    else:
                        worker.send(("batch", batch_id, histories, k))
                except OSError:  # died between checks: its sentinel fires next round
                    continue
