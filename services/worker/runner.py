"""Driving the engine from one model thread, so the asyncio loop stays free to heartbeat.

Torch calls block for a whole forward pass (seconds for a long prefill on a CPU); run on the
event loop they would starve the gRPC streams and let leases expire. The model thread owns
the engine and the tokenizer outright: commands (submit, cancel) reach it through a queue and
are applied between steps, which is what bounds cancellation to one decoding step; every
step's updates go back to the loop through ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass

from services.common.errors import ServiceError
from services.worker.chat import Turn, encode_conversation
from services.worker.engine import Engine, free_slots
from services.worker.jobs import FinishReason, GenerationRequest, JobUpdate, Outcome, Sampling

log = logging.getLogger(__name__)

# How long an idle model thread sleeps between looks at its command queue.
_IDLE_POLL_S = 0.05


@dataclass(frozen=True)
class _Submit:
    job_id: str
    prompt: str
    sampling: Sampling
    resume_token_ids: tuple[int, ...]
    conversation: tuple[Turn, ...] = ()  # a chat job's turns, rendered instead of prompt


@dataclass(frozen=True)
class _Cancel:
    job_id: str


class EngineRunner:
    """Owns the model thread. Call ``submit``/``cancel`` from the event loop; read results
    from ``updates``. Counts jobs held so the client knows how many slots to lease."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.updates: asyncio.Queue[list[JobUpdate]] = asyncio.Queue()
        self.slot_freed = asyncio.Event()
        self.active_jobs = 0
        self.completed_jobs = 0
        self.generated_tokens = 0
        self._loop = asyncio.get_running_loop()
        self._commands: queue.SimpleQueue[_Submit | _Cancel] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="model", daemon=True)

    def start(self) -> None:
        self._thread.start()

    async def stop(self) -> None:
        """Stop the thread after its current step (jobs still held are abandoned)."""
        self._stopping.set()
        await asyncio.to_thread(self._thread.join)

    def free_slots(self) -> int:
        return free_slots(self.engine.batching, self.engine.max_batch_size, self.active_jobs)

    def submit(
        self,
        job_id: str,
        prompt: str,
        sampling: Sampling,
        resume_token_ids: tuple[int, ...],
        conversation: tuple[Turn, ...] = (),
    ) -> None:
        """Queue a job; the model thread tokenizes it (it alone touches the tokenizer)."""
        self.active_jobs += 1
        self._commands.put(_Submit(job_id, prompt, sampling, resume_token_ids, conversation))

    def cancel(self, job_id: str) -> None:
        """Stop a job before the engine's next step; its CANCELLED outcome follows."""
        self._commands.put(_Cancel(job_id))

    def _run(self) -> None:
        while not self._stopping.is_set():
            # Busy: only look at commands between steps. Idle: wait a little for one.
            command = self._next_command(wait=not self.engine.has_work())
            updates: list[JobUpdate] = []
            while command is not None:
                updates += self._apply(command)
                command = self._next_command(wait=False)
            if self.engine.has_work():
                try:
                    updates += self.engine.step()
                except Exception as error:  # a failed forward pass must not kill the worker
                    log.exception("engine step failed; failing its jobs")
                    updates += self.engine.fail_all(f"worker engine error: {error}")
            if updates:
                self._loop.call_soon_threadsafe(self._deliver, updates)

    def _next_command(self, wait: bool) -> _Submit | _Cancel | None:
        try:
            return self._commands.get(timeout=_IDLE_POLL_S) if wait else self._commands.get_nowait()
        except queue.Empty:
            return None

    def _apply(self, command: _Submit | _Cancel) -> list[JobUpdate]:
        if isinstance(command, _Cancel):
            update = self.engine.cancel(command.job_id)
            return [update] if update else []
        try:
            model = self.engine.model
            prompt_ids = tuple(
                encode_conversation(model.tokenizer, command.conversation)
                if command.conversation
                else model.encode_prompt(command.prompt)
            )
            request = GenerationRequest(
                command.job_id, prompt_ids, command.sampling, command.resume_token_ids
            )
            update = self.engine.submit(request)
        except Exception as error:  # a job that cannot start fails alone, with a reason
            if not isinstance(error, ServiceError):
                log.exception("cannot start job", extra={"job_id": command.job_id})
            outcome = Outcome(
                FinishReason.ERROR, len(command.resume_token_ids), 0, 0.0, 0.0, error=str(error)
            )
            update = JobUpdate(command.job_id, outcome=outcome)
        return [update] if update else []

    def _deliver(self, updates: list[JobUpdate]) -> None:
        """On the event loop: count, then hand the updates to the client."""
        for update in updates:
            self.generated_tokens += len(update.tokens)
            if update.outcome is not None:
                self.active_jobs -= 1
                self.completed_jobs += 1
                self.slot_freed.set()
        self.updates.put_nowait(updates)
