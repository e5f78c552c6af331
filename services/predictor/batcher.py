"""Micro-batching: concurrent single requests become one model call.

Requests wait at most ``max_wait_s`` for company, and a batch never exceeds
``max_batch_size``. The model runs in one worker thread, so the event loop keeps accepting
requests while a batch computes; what arrives meanwhile forms the next batch at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

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
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="predict")
        self._loop_task: asyncio.Task[None] | None = None
        self.batches_run = 0

    def start(self) -> None:
        if self._loop_task is None:
            self._loop_task = asyncio.create_task(self._serve(), name="micro-batcher")

    async def stop(self) -> None:
        """Finish what is queued, then stop the loop and the worker thread."""
        while not self._queue.empty():
            await asyncio.sleep(self.max_wait_s)
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
            self._loop_task = None
        self._executor.shutdown(wait=True)

    async def submit(self, item: Item) -> Result:
        return (await self.submit_many([item]))[0]

    async def submit_many(self, items: Sequence[Item]) -> list[Result]:
        """Queue every item (they may be split over several batches); results in order."""
        if self._loop_task is None:
            raise RuntimeError("MicroBatcher.start() was not called")
        loop = asyncio.get_running_loop()
        futures = []
        for item in items:
            future: asyncio.Future[Result] = loop.create_future()
            self._queue.put_nowait((item, future))
            futures.append(future)
        return list(await asyncio.gather(*futures))

    async def _collect(self) -> list[tuple[Item, asyncio.Future[Result]]]:
        batch = [await self._queue.get()]
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
        return [(item, future) for item, future in batch if not future.done()]

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            if not batch:
                continue
            items = [item for item, _ in batch]
            try:
                results = await loop.run_in_executor(self._executor, self._run_batch, items)
            except Exception as error:  # the batch failed: every caller in it hears why
                log.exception("batch failed", extra={"size": len(items)})
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            self.batches_run += 1
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)
