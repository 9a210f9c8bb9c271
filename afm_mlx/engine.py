"""The batch scheduler on its own thread, for front ends that serve many callers (afm_mlx.server).

    engine = Engine(model, tokenizer, max_batch=32, max_queue=64).start()
    ticket = engine.submit(request, sink)     # sink(piece) is called on the engine thread for every BatchResponse;
    engine.cancel(ticket)                     # the last piece has a finish_reason (or sink gets an exception)
    engine.stop(timeout=10)                   # finish in-flight requests within the bound, cancel the rest

Callers never touch the model: requests are checked in the caller's thread (BatchGenerator.check reads nothing the
step changes) and handed over through a queue; everything else runs on the engine thread, which blocks while
there is nothing to do.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import mlx.core as mx

from .batch import BatchGenerator, BatchRequest, BatchResponse
from .errors import AFMError
from .model import Model
from .prefix_cache import DEFAULT_PREFIX_CACHE_BYTES, PrefixCache

log = logging.getLogger(__name__)

Sink = Callable[[BatchResponse | BaseException], None]


class QueueFull(AFMError):
    """More requests wait than max_queue allows (a server answers 429)."""


class EngineStopped(AFMError):
    """The engine is shutting down and takes no new requests (a server answers 503)."""


@dataclass
class Ticket:
    request: BatchRequest
    sink: Sink
    uid: int | None = None  # the batch's id, set on the engine thread
    cancelled: bool = False
    done: bool = False


@dataclass
class Metrics:
    """Counters for /metrics; written on the engine thread, read anywhere (plain ints and floats)."""

    requests: dict[str, int] = field(default_factory=lambda: {"completed": 0, "cancelled": 0, "rejected": 0})
    prompt_tokens: int = 0
    generated_tokens: int = 0
    queue_depth: int = 0
    batch_size: int = 0
    steps: int = 0
    draft_proposed: int = 0  # draft tokens of finished speculative requests, proposed / accepted by the base
    draft_accepted: int = 0
    recent: list[tuple[float, int]] = field(default_factory=list)  # (time, tokens) per step, last WINDOW_S

    WINDOW_S = 10.0

    def record_step(self, now: float, tokens: int, batch_size: int, queue_depth: int) -> None:
        self.steps += 1
        self.generated_tokens += tokens
        self.batch_size, self.queue_depth = batch_size, queue_depth
        self.recent = [(t, n) for t, n in self.recent if now - t <= self.WINDOW_S] + [(now, tokens)]

    def tokens_per_second(self, now: float) -> float:
        recent = [(t, n) for t, n in self.recent if now - t <= self.WINDOW_S]
        if len(recent) < 2:
            return 0.0
        return sum(n for _, n in recent[1:]) / max(recent[-1][0] - recent[0][0], 1e-9)


class Engine:
    def __init__(self, model: Model, tokenizer, *, max_batch: int = 32, max_queue: int = 64,
                 prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES, draft: Model | None = None):
        cache = PrefixCache(model, prefix_cache_bytes) if prefix_cache_bytes > 0 else None
        self.batch = BatchGenerator(model, tokenizer, max_batch=max_batch, prefix_cache=cache, draft=draft)
        # A lazy array can only be evaluated on the thread whose stream it was built on: materialise the
        # model's lazy constants (RoPE periods, ...) and the K/V template here, before the engine thread runs.
        mx.eval(self.batch.template, model(mx.array([[0]], dtype=mx.int32), num_logits=1))
        if draft is not None:
            mx.eval(self.batch.drafter.template, draft(mx.array([[0]], dtype=mx.int32), num_logits=1))
        self.model, self.tokenizer, self.max_queue = model, tokenizer, max_queue
        self.metrics = Metrics()
        self._commands: queue.Queue = queue.Queue()
        self._tickets: dict[int, Ticket] = {}  # batch uid -> ticket, engine thread only
        self._queued = 0  # submitted, not yet admitted to the batch (guarded by _lock)
        self._lock = threading.Lock()
        self._accepting, self._stopping = True, False
        self._thread = threading.Thread(target=self._run, name="afm-mlx-engine", daemon=True)

    def start(self) -> "Engine":
        self._thread.start()
        return self

    # ---- any thread

    def submit(self, request: BatchRequest, sink: Sink) -> Ticket:
        """Queue a request; AFMError if it is invalid, QueueFull / EngineStopped if it cannot be taken now."""
        if not self._accepting:
            raise EngineStopped("the server is shutting down")
        self.batch.check(request)
        with self._lock:
            if self._queued >= self.max_queue:
                self.metrics.requests["rejected"] += 1
                raise QueueFull(f"the queue is full ({self.max_queue} requests wait): retry later")
            self._queued += 1
        ticket = Ticket(request, sink)
        self._commands.put(("submit", ticket))
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Free the request's row (or its place in the queue) at the next step; no-op once it is done."""
        self._commands.put(("cancel", ticket))

    @property
    def queue_depth(self) -> int:
        return self._queued

    @property
    def prefix_cache_bytes(self) -> int:
        cache = self.batch.prefix_cache
        return 0 if cache is None else cache.nbytes

    def stop(self, timeout: float = 10.0) -> None:
        """Take no new requests, let running ones finish for up to `timeout` seconds, cancel the rest, join."""
        self._accepting = False
        deadline = time.monotonic() + timeout
        while (self._tickets or self._queued) and time.monotonic() < deadline and self._thread.is_alive():
            time.sleep(0.02)
        self._stopping = True
        self._commands.put(("wake", None))
        self._thread.join(timeout=max(deadline - time.monotonic(), 0) + 5.0)

    # ---- the engine thread

    def _run(self) -> None:
        # MLX streams belong to the thread that made them: this thread decodes on its own (cpu.py's split
        # streams are thread-local for the same reason).
        with mx.stream(mx.new_thread_local_stream(mx.default_device())):
            self._loop()

    def _loop(self) -> None:
        while not self._stopping:
            self._take_commands(block=not self.batch.busy)
            if self.batch.busy and not self._stopping:
                try:
                    self._step()
                except Exception as err:  # a failed step fails its requests, never the engine
                    log.exception("decode step failed")
                    self._fail_all(err)
        for ticket in list(self._tickets.values()):
            self._cancel(ticket)
        self._fail_queued(EngineStopped("the server shut down before this request ran"))

    def _take_commands(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, ticket = command
            if kind == "submit":
                self._admit(ticket)
            elif kind == "cancel":
                self._cancel(ticket)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _admit(self, ticket: Ticket) -> None:
        if ticket.cancelled:
            self._dequeued()
            return
        try:
            ticket.uid = self.batch.submit(ticket.request)
        except AFMError as err:
            self._dequeued()
            ticket.sink(err)
            return
        self._tickets[ticket.uid] = ticket
        self.metrics.prompt_tokens += len(ticket.request.ids)

    def _cancel(self, ticket: Ticket) -> None:
        if ticket.done or ticket.cancelled:
            return
        ticket.cancelled = True
        if ticket.uid is not None:
            waiting = any(row.uid == ticket.uid for row in self.batch.waiting)
            self._deliver(ticket, self.batch.cancel(ticket.uid))
            if waiting:
                self._dequeued()

    def _step(self) -> None:
        waiting_before = len(self.batch.waiting)
        events = self.batch.step()
        admitted = waiting_before - len(self.batch.waiting)
        with self._lock:
            self._queued -= admitted
        tokens = 0
        for uid, piece in events:
            tokens += len(piece.tokens)
            ticket = self._tickets.get(uid)
            if ticket is not None:
                self._deliver(ticket, [piece])
        running = sum(not row.finished for row in self.batch.rows)
        self.metrics.record_step(time.monotonic(), tokens, running, self._queued)
        if self.metrics.steps % 256 == 0:
            mx.clear_cache()

    def _deliver(self, ticket: Ticket, pieces: list[BatchResponse]) -> None:
        for piece in pieces:
            if piece.finish_reason is not None:
                ticket.done = True
                self._tickets.pop(ticket.uid, None)
                self.metrics.requests["cancelled" if piece.finish_reason == "cancelled" else "completed"] += 1
                spec = piece.stats.speculative if piece.stats is not None else None
                if spec is not None:
                    self.metrics.draft_proposed += spec.proposed
                    self.metrics.draft_accepted += spec.accepted
            _safe_call(ticket.sink, piece)

    def _dequeued(self) -> None:
        with self._lock:
            self._queued -= 1

    def _fail_all(self, err: Exception) -> None:
        failure = AFMError(f"generation failed: {type(err).__name__}")
        for ticket in list(self._tickets.values()):
            self.batch.cancel(ticket.uid)
            ticket.done = True
            _safe_call(ticket.sink, failure)
        self._tickets.clear()
        with self._lock:
            self._queued -= len(self.batch.waiting)
        drafter = self.batch.drafter
        self.batch = BatchGenerator(self.model, self.tokenizer, max_batch=self.batch.max_batch,
                                    prefix_cache=self.batch.prefix_cache,
                                    draft=drafter.model if drafter is not None else None)

    def _fail_queued(self, err: AFMError) -> None:
        while True:
            try:
                kind, ticket = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "submit" and not ticket.cancelled:
                _safe_call(ticket.sink, err)


def _safe_call(sink: Sink, item) -> None:
    try:
        sink(item)
    except Exception:  # a caller that went away must not stop the engine
        pass
