"""Micro-batching: concurrent single requests become one model call.

Requests wait at most ``max_wait_s`` for company, and a batch never exceeds
``max_batch_size``. The model runs in one worker thread, so the event loop keeps accepting
requests while a batch computes; what arrives meanwhile forms the next batch at once.

Every caller's future is resolved, whatever happens: with its result; with the batch's
error when the model fails; with Unavailable when the batcher stops (after a bounded drain)
or when its loop dies unexpectedly. A dead loop also sets :attr:`MicroBatcher.failed`, which
the service turns into health NOT_SERVING, so nobody waits on a batcher that will never run.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

from services.common.errors import Unavailable

log = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")


class MicroBatcher(Generic[Item, Result]):
    def __init__(
        self,
        run_batch: Callable[[list[Item]], Sequence[Result]],
        *,
        max_batch_size: int = 32,
        max_wait_s: float = 0.002,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self._queue: asyncio.Queue[tuple[Item, asyncio.Future[Result]]] = asyncio.Queue()
        self._in_flight: list[tuple[Item, asyncio.Future[Result]]] = []
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="predict")
        self._loop_task: asyncio.Task[None] | None = None
        self._stopping = False
        self.failed = asyncio.Event()  # set when the loop died (not on a normal stop)
        self.failure: BaseException | None = None
        self.batches_run = 0

    def start(self) -> None:
        if self._loop_task is None:
            self._loop_task = asyncio.create_task(self._serve(), name="micro-batcher")
            self._loop_task.add_done_callback(self._loop_ended)

    @property
    def running(self) -> bool:
        return self._loop_task is not None and not self._loop_task.done()

    async def stop(self, drain_timeout_s: float = 5.0) -> None:
        """Refuse new requests, finish what is queued for up to ``drain_timeout_s``, then stop
        the loop; any caller still waiting gets Unavailable."""
        self._stopping = True
        deadline = time.monotonic() + drain_timeout_s
        while (not self._queue.empty() or self._in_flight) and self.running:
            if time.monotonic() >= deadline:
                log.warning("micro-batcher stopped before its queue drained")
                break
            await asyncio.sleep(self.max_wait_s or 0.001)
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        self._fail_waiting(Unavailable("the predictor is shutting down; retry on another"))
        # A batch still computing finishes in its thread; nobody waits for it any more.
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _loop_ended(self, task: asyncio.Task[None]) -> None:
        if self._stopping:
            return
        error = (
            task.exception()
            if not task.cancelled()
            else RuntimeError("the batch loop was cancelled")
        )
        self.failure = error or RuntimeError("the batch loop returned")
        log.error("micro-batcher loop died", exc_info=self.failure)
        self._fail_waiting(Unavailable(f"the predictor's batch loop died ({self.failure!r})"))
        self.failed.set()

    def _fail_waiting(self, error: Exception) -> None:
        waiting = list(self._in_flight)
        self._in_flight = []
        while not self._queue.empty():
            waiting.append(self._queue.get_nowait())
        for _, future in waiting:
            if not future.done():
                future.set_exception(error)

    async def submit(self, item: Item) -> Result:
        return (await self.submit_many([item]))[0]

    async def submit_many(self, items: Sequence[Item]) -> list[Result]:
        """Queue every item (they may be split over several batches); results in order."""
        if self._loop_task is None:
            # The server takes calls while the model warms up (health says NOT_SERVING):
            # a caller that did not wait for SERVING hears a retryable status, not UNKNOWN.
            raise Unavailable("the predictor is still loading its model; retry shortly")
        if self._stopping:
            raise Unavailable("the predictor is shutting down; retry on another")
        if not self.running:
            raise Unavailable(f"the predictor's batch loop died ({self.failure!r})")
        loop = asyncio.get_running_loop()
        futures = []
        for item in items:
            future: asyncio.Future[Result] = loop.create_future()
            self._queue.put_nowait((item, future))
            futures.append(future)
        return list(await asyncio.gather(*futures))

    async def _collect(self) -> list[tuple[Item, asyncio.Future[Result]]]:
        # Taken requests live in ``_in_flight`` from the moment they leave the queue, so a
        # stop (or a dying loop) finds and answers them even while the batch is forming.
        batch = self._in_flight = [await self._queue.get()]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        # A caller that went away (cancelled RPC) costs no model time.
        self._in_flight = [(item, future) for item, future in batch if not future.done()]
        return self._in_flight

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            if not batch:
                continue
            items = [item for item, _ in batch]
            try:
                results = await loop.run_in_executor(self._executor, self._run_batch, items)
                if len(results) != len(batch):
                    raise RuntimeError(f"{len(results)} results for a batch of {len(batch)}")
            except Exception as error:  # the batch failed: every caller in it hears why
                log.exception("batch failed", extra={"size": len(items)})
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                self._in_flight = []
                continue
            self.batches_run += 1
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)
            self._in_flight = []
