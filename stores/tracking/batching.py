"""Micro-batching of concurrent requests for a served model.

``mlflow models serve`` runs each request's ``predict`` in its own thread (``asyncio.to_thread``): eight clients
mean eight encoder forwards of one sample each, fighting over the same cores. ``MicroBatcher`` gives them one
worker thread that runs every request queued at that moment as one batch, so the encoders see a batch of eight
and the cores run one forward at a time. A lone request runs at once (no added latency); under load, requests
that arrive during a forward form the next batch, and a batch smaller than the last one waits up to ``max_wait_s``
for the callers the last batch just answered (their next requests are on the way): without that wait, six
clients settled into alternating batches of five and one, and a batch of one costs the encoders almost what a
batch of two does (measured on 2 cores: 36 ms vs 42 ms). Triton's dynamic batcher has the same knob
(``max_queue_delay_microseconds``), there applied to every batch. (The scoring server's threads come from
asyncio's default pool, min(32, cores + 4): on 2 cores at most six requests of a worker are in a batch at once.)

Kept here rather than taken from Ray Serve (``@serve.batch``, the same idea) because the model is served by
MLflow's own scoring server: this is the only part of Ray Serve it would need."""
from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable

Samples = list[dict[str, Any]]


class MicroBatcher:
    """``submit(samples)`` returns ``fn(samples)``'s answers for those samples, computed in one call of ``fn``
    with whatever other requests were waiting (whole requests, added until the batch holds ``max_batch``
    samples). ``fn`` maps a list of samples to one answer per sample. A failing batch is retried request by
    request, so one request's error is its own."""

    def __init__(self, fn: Callable[[Samples], list[Any]], max_batch: int = 32, idle_s: float = 10.0,
                 max_wait_s: float = 0.02):
        self.fn, self.max_batch, self.idle_s, self.max_wait_s = fn, max(1, max_batch), idle_s, max_wait_s
        self.pending: queue.SimpleQueue[tuple[Samples, Future]] = queue.SimpleQueue()
        self.batches = 0  # calls of fn, for tests and benchmarks
        self.last_size = 1  # samples in the last batch: how many callers are likely to send again soon
        # the worker thread runs while there is work and exits after ``idle_s`` without any: a model loaded once
        # (MLflow checks the input example when it logs one) leaves no thread holding it and its encoders
        self.lock, self.worker = threading.Lock(), None

    def submit(self, samples: Samples) -> list[Any]:
        if not samples:
            return []
        done: Future = Future()
        with self.lock:
            self.pending.put((samples, done))
            if self.worker is None:
                self.worker = threading.Thread(target=self._serve, name="micro-batcher", daemon=True)
                self.worker.start()
        return done.result()

    def _take(self) -> list[tuple[Samples, Future]] | None:
        """The next batch: the oldest request (waiting up to ``idle_s`` for one), then every queued request that
        still fits, then, while the batch is smaller than the last one, requests arriving within ``max_wait_s``;
        None after ``idle_s`` without a request (the worker then ends, under the lock that ``submit`` starts a
        new one with)."""
        try:
            batch = [self.pending.get(timeout=self.idle_s)]
        except queue.Empty:
            with self.lock:
                if self.pending.empty():
                    self.worker = None
                    return None
            batch = [self.pending.get()]
        size, target = len(batch[0][0]), min(self.max_batch, self.last_size)
        deadline = time.monotonic() + self.max_wait_s
        while size < self.max_batch:
            wait = deadline - time.monotonic() if size < target else 0.0
            try:
                item = self.pending.get(timeout=wait) if wait > 0 else self.pending.get_nowait()
            except queue.Empty:
                break
            batch.append(item)
            size += len(item[0])
        self.last_size = size
        return batch

    def _serve(self) -> None:
        while (batch := self._take()) is not None:
            self._run(batch)

    def _run(self, batch: list[tuple[Samples, Future]]) -> None:
        self.batches += 1
        try:
            answers = self.fn([s for samples, _ in batch for s in samples])
        except BaseException as e:  # noqa: BLE001 - the requests' own: re-run each alone to keep errors apart
            if len(batch) == 1:
                batch[0][1].set_exception(e)
                return
            for one in batch:
                self._run([one])
            return
        start = 0
        for samples, done in batch:
            done.set_result(answers[start : start + len(samples)])
            start += len(samples)
