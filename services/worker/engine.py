"""The generation engine: no, dynamic and continuous batching over a transformers model.

A plain, single-threaded class (no gRPC, no asyncio): ``submit`` jobs, call ``step`` until
``has_work`` is false, read the per-job token events each step returns, ``cancel`` between
steps. ``EngineRunner`` drives it from one model thread for the service.

Batching modes (``--batching``), all over the same KV-cache batch:
- ``none``: one job at a time.
- ``dynamic``: when idle, take up to B waiting jobs and run them as one batch until the last
  finishes; finished rows leave the batch (saving compute) but nobody joins it.
- ``continuous``: iteration-level (Orca-style). After each decoding step, free rows are
  refilled from the waiting jobs: newcomers are prefilled as their own left-padded batch and
  their KV cache is merged into the running one, so they join at the next decoding step.

Exactness: rows are left-padded; the 2-D attention mask hides padding from every query and
each row's position ids count only its own tokens, so a job's logits do not depend on its
neighbours (up to float rounding of different matmul shapes). Merging pads the shorter cache
on the left with masked zeros; removing rows drops their cache entries and then any leading
columns that only padding still uses, so the cache never grows beyond the longest live row.
"""

from __future__ import annotations

import enum
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from services.common.errors import InvalidArgument
from services.worker.jobs import (
    DEFAULT_MAX_BATCH_TOTAL_TOKENS,
    DEFAULT_MAX_PREFILL_TOKENS,
    FinishReason,
    GeneratedToken,
    GenerationRequest,
    JobUpdate,
    Outcome,
    Sampling,
)
from services.worker.kv_cache import GrowingCache
from services.worker.model import LoadedModel
from services.worker.sampling import TokenChooser, next_tokens
from services.worker.text import TextStream

log = logging.getLogger(__name__)


class Batching(enum.Enum):
    NONE = "none"
    DYNAMIC = "dynamic"
    CONTINUOUS = "continuous"


def free_slots(batching: Batching, max_batch_size: int, active_jobs: int) -> int:
    """How many more jobs may be taken now, given the jobs already held (waiting or running).

    The one place the three modes differ in what they accept, used both by the engine's
    admission and by the client deciding how many jobs to lease."""
    if batching is Batching.NONE:
        return 0 if active_jobs else 1
    if batching is Batching.DYNAMIC:
        return 0 if active_jobs else max_batch_size
    return max(0, max_batch_size - active_jobs)


def admissible_within_budget(
    running_spans: list[int], waiting_spans: list[int], slots: int, max_total_tokens: int
) -> int:
    """How many waiting jobs, taken in order, may join the running ones without the batch's
    worst-case cache (rows x the widest row's prompt + answer cap) passing ``max_total_tokens``.

    The first job that does not fit stops admission, so a long job is not overtaken by the
    short ones behind it (the scheduler's order holds); a job admitted into an empty batch
    always fits, or a job wider than the budget would never run."""
    rows, widest, admitted = len(running_spans), max(running_spans, default=0), 0
    for span in waiting_spans[:slots]:
        if rows and (rows + 1) * max(widest, span) > max_total_tokens:
            break
        rows, widest, admitted = rows + 1, max(widest, span), admitted + 1
    return admitted


def prefill_groups(newcomers: list[_Sequence], max_tokens: int) -> list[list[_Sequence]]:
    """Split newcomers, in order, into groups whose padded size stays within ``max_tokens``."""
    groups: list[list[_Sequence]] = []
    longest = 0
    for row in newcomers:
        length = len(row.input_ids)
        if groups and (len(groups[-1]) + 1) * max(longest, length) <= max_tokens:
            groups[-1].append(row)
            longest = max(longest, length)
        else:
            groups.append([row])
            longest = length
    return groups


@dataclass(frozen=True)
class StepStat:
    """Cost of one forward pass, for benchmarks and the simulator's latency model."""

    kind: str  # "prefill" or "decode"
    batch_size: int
    # prefill: prompt tokens of the rows (padding excluded); decode: one per row.
    tokens: int
    # Longest row (prompt + answer so far), i.e. the padded KV length attended to.
    context: int
    seconds: float


class _Sequence:
    """One job inside the engine: its sampling state, text stream and timings."""

    def __init__(self, request: GenerationRequest, model: LoadedModel) -> None:
        self.request = request
        self.sampling = request.sampling
        self.input_ids = [*request.prompt_ids, *request.resume_token_ids]
        self.prompt_tokens = len(request.prompt_ids)
        room = model.max_context - len(self.input_ids)
        if room < 1 and len(request.resume_token_ids) < self.sampling.answer_limit:
            raise InvalidArgument(
                f"prompt of {len(self.input_ids)} tokens leaves no room in the model's "
                f"context of {model.max_context} tokens"
            )
        # The context window cuts every job short, replayed ones too (a replay length past
        # the context used to run on beyond it until cancelled): it then ends with LENGTH.
        self.answer_limit = min(self.sampling.answer_limit, len(request.resume_token_ids) + room)
        self.cut_by_context = self.answer_limit < self.sampling.answer_limit
        # The most cache columns this row can ever need: its prompt and its whole answer.
        self.span = self.prompt_tokens + self.answer_limit
        self.answer_tokens = len(request.resume_token_ids)
        self.stream = TextStream(
            model.decode,
            stop=() if self.sampling.replay else self.sampling.stop,
            already_streamed=request.resume_token_ids,
        )
        self.chooser = TokenChooser(
            self.sampling,
            request.resume_token_ids,
            model.vocab_size,
            model.device,
            model.default_repetition_penalty,
        )
        self.prefill_s = 0.0
        self.decode_s = 0.0
        self.failure = ""  # why its sampling failed, when it did

    @property
    def job_id(self) -> str:
        return self.request.job_id

    def outcome(self, reason: FinishReason, error: str = "") -> Outcome:
        return Outcome(
            finish_reason=reason,
            generated_tokens=self.stream.next_index,
            prompt_tokens=self.prompt_tokens,
            prefill_s=self.prefill_s,
            decode_s=self.decode_s,
            error=error,
        )


class _KVBatch:
    """Rows sharing one left-padded KV cache, with the mask and positions that keep them
    independent."""

    def __init__(
        self,
        rows: list[_Sequence],
        cache: GrowingCache,
        attention_mask: torch.Tensor,
        positions: torch.Tensor,
        next_input: list[int],
    ) -> None:
        self.rows = rows
        self.cache = cache
        self.attention_mask = attention_mask  # (rows, cached length), 1 = real token
        self.positions = positions  # (rows,), position id of each row's next token
        self.next_input = next_input  # each row's last sampled token, fed at the next step

    @property
    def size(self) -> int:
        return len(self.rows)

    @property
    def context(self) -> int:
        return self.attention_mask.shape[1]

    @classmethod
    @torch.inference_mode()
    def prefill(cls, model: LoadedModel, rows: list[_Sequence]) -> tuple[_KVBatch, torch.Tensor]:
        """Run the rows' prompts; returns the batch and each row's next-token logits."""
        longest = max(len(row.input_ids) for row in rows)
        ids = torch.full((len(rows), longest), model.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for index, row in enumerate(rows):
            ids[index, longest - len(row.input_ids) :] = torch.tensor(row.input_ids)
            mask[index, longest - len(row.input_ids) :] = 1
        ids, mask = ids.to(model.device), mask.to(model.device)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = GrowingCache()
        output = model.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        batch = cls(rows, cache, mask, mask.sum(-1), [])
        return batch, output.logits[:, -1, :]

    @torch.inference_mode()
    def decode(self, model: LoadedModel) -> torch.Tensor:
        """Feed each row's last token; returns next-token logits (rows, vocab)."""
        ids = torch.tensor(self.next_input, dtype=torch.long, device=model.device)[:, None]
        ones = torch.ones((self.size, 1), dtype=torch.long, device=model.device)
        self.attention_mask = torch.cat([self.attention_mask, ones], dim=1)
        output = model.model(
            input_ids=ids,
            attention_mask=self.attention_mask,
            position_ids=self.positions[:, None],
            past_key_values=self.cache,
            use_cache=True,
        )
        self.positions = self.positions + 1
        return output.logits[:, -1, :]

    def keep(self, indices: list[int]) -> None:
        """Keep only these rows, then drop leading columns no remaining row uses."""
        if len(indices) == self.size:
            return
        index = torch.tensor(indices, dtype=torch.long, device=self.attention_mask.device)
        self.rows = [self.rows[i] for i in indices]
        self.next_input = [self.next_input[i] for i in indices]
        self.attention_mask = self.attention_mask[index]
        self.positions = self.positions[index]
        self.cache.batch_select_indices(index)
        if not self.rows:
            return
        used = self.attention_mask.any(dim=0)
        unused_prefix = int(used.int().argmax())
        if unused_prefix:
            self.attention_mask = self.attention_mask[:, unused_prefix:]
            for layer in self.cache.layers:
                layer.keys = layer.keys[..., unused_prefix:, :]
                layer.values = layer.values[..., unused_prefix:, :]

    def merge(self, other: _KVBatch) -> None:
        """Append ``other``'s rows, left-padding the shorter cache with masked zeros.

        Every new tensor is built before any is assigned, so a merge that raises (out of
        memory) leaves this batch exactly as it was."""
        length = max(self.context, other.context)

        def left_pad(tensor: torch.Tensor, seq_dim_from_end: int, current: int) -> torch.Tensor:
            pad = [0, 0] * (seq_dim_from_end - 1) + [length - current, 0]
            return F.pad(tensor, pad)

        layers = []
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            keys = torch.cat(
                [left_pad(mine.keys, 2, self.context), left_pad(theirs.keys, 2, other.context)]
            )
            values = torch.cat(
                [left_pad(mine.values, 2, self.context), left_pad(theirs.values, 2, other.context)]
            )
            layers.append((keys, values))
        attention_mask = torch.cat(
            [
                left_pad(self.attention_mask, 1, self.context),
                left_pad(other.attention_mask, 1, other.context),
            ]
        )
        positions = torch.cat([self.positions, other.positions])
        self.cache = GrowingCache.from_tensors(layers)
        self.attention_mask = attention_mask
        self.positions = positions
        self.rows += other.rows
        self.next_input += other.next_input


class Engine:
    """Generates jobs with one of the three batching modes; call ``step`` repeatedly."""

    def __init__(
        self,
        model: LoadedModel,
        batching: Batching = Batching.CONTINUOUS,
        max_batch_size: int = 8,
        on_step: Callable[[StepStat], None] | None = None,
        max_prefill_tokens: int = DEFAULT_MAX_PREFILL_TOKENS,
        max_batch_total_tokens: int = DEFAULT_MAX_BATCH_TOTAL_TOKENS,
    ) -> None:
        for name, value in (
            ("max batch size", max_batch_size),
            ("max prefill tokens", max_prefill_tokens),
            ("max batch total tokens", max_batch_total_tokens),
        ):
            if value < 1:
                raise InvalidArgument(f"{name} must be at least 1, got {value}")
        self.model = model
        self.batching = batching
        self.max_batch_size = 1 if batching is Batching.NONE else max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.max_batch_total_tokens = max_batch_total_tokens
        self.on_step = on_step
        self._waiting: deque[_Sequence] = deque()
        self._batch: _KVBatch | None = None
        # Every job held, from submit until its outcome is produced: whatever fails, a job in
        # here gets an outcome (``fail_all``), so none is ever left without one.
        self._held: dict[str, _Sequence] = {}

    @property
    def running(self) -> int:
        return self._batch.size if self._batch else 0

    @property
    def active_jobs(self) -> int:
        """Jobs held: waiting to start or running."""
        return len(self._held)

    def has_work(self) -> bool:
        return self.active_jobs > 0

    def submit(self, request: GenerationRequest) -> JobUpdate | None:
        """Queue a job. Returns its final update at once when there is nothing to generate
        (a resumed job already complete); raises InvalidArgument when it cannot run."""
        sequence = _Sequence(request, self.model)
        if sequence.answer_tokens >= sequence.answer_limit:
            reason = FinishReason.REPLAY_LENGTH if sequence.sampling.replay else FinishReason.LENGTH
            return JobUpdate(request.job_id, outcome=sequence.outcome(reason))
        self._waiting.append(sequence)
        self._held[sequence.job_id] = sequence
        return None

    def cancel(self, job_id: str) -> JobUpdate | None:
        """Stop a job now (call between steps); None when the engine does not hold it."""
        sequence = self._held.get(job_id)
        if sequence is None:
            return None
        if sequence in self._waiting:
            self._waiting.remove(sequence)
        elif self._batch is not None and sequence in self._batch.rows:
            index = self._batch.rows.index(sequence)
            self._batch.keep([i for i in range(self._batch.size) if i != index])
        return self._end(sequence, FinishReason.CANCELLED)

    def fail_all(self, error: str) -> list[JobUpdate]:
        """End every held job with an error (the last resort after an unexpected failure)."""
        held = list(self._held.values())
        self._waiting.clear()
        self._batch = None
        return [self._end(sequence, FinishReason.ERROR, error) for sequence in held]

    def _end(self, sequence: _Sequence, reason: FinishReason, error: str = "") -> JobUpdate:
        """The job's final update; it is no longer held."""
        self._held.pop(sequence.job_id, None)
        return JobUpdate(sequence.job_id, outcome=sequence.outcome(reason, error))

    def step(self) -> list[JobUpdate]:
        """One iteration: a decoding step for the running rows, then admission (prefill) of
        waiting jobs into free rows as the batching mode allows. Returns the new tokens and
        outcomes of every job that has any.

        Exception-safe: a failure is confined to the jobs it concerns (a failed decoding pass
        ends the running rows, a failed prefill or merge ends only the newcomers, a failed
        sampling or detokenization ends only its row), each with an ERROR outcome and the
        reason; nothing raised here leaves a job without an outcome."""
        updates: list[JobUpdate] = []
        self._decode_running(updates)
        self._admit(updates)
        return updates

    # --- decoding ------------------------------------------------------------------------

    def _decode_running(self, updates: list[JobUpdate]) -> None:
        batch = self._batch
        if batch is None or not batch.size:
            return
        started = time.perf_counter()
        context = batch.context + 1
        try:
            logits = batch.decode(self.model)
        except Exception as error:
            # The shared KV cache can no longer be trusted: its rows end, waiting jobs stay.
            log.exception("decoding step failed; failing the running jobs")
            self._batch = None
            updates += self._fail(batch.rows, f"worker decoding step failed: {error}")
            return
        tokens = self._sample(logits, batch.rows)
        elapsed = time.perf_counter() - started
        for row in batch.rows:
            row.decode_s += elapsed
        self._record("decode", batch.size, batch.size, context, elapsed)
        self._advance(batch, tokens, updates)

    # --- admission and cache handling ----------------------------------------------------

    def _admit(self, updates: list[JobUpdate]) -> None:
        """Prefill as many waiting jobs as the mode and the cache budget allow and join them
        to the batch; the others keep waiting, in order, for rows to finish."""
        free = free_slots(self.batching, self.max_batch_size, self.running)
        slots = min(len(self._waiting), free)
        if not slots:  # every decoding step passes here: nothing to weigh
            return
        admit = admissible_within_budget(
            [row.span for row in self._batch.rows] if self._batch else [],
            [self._waiting[index].span for index in range(slots)],
            slots,
            self.max_batch_total_tokens,
        )
        newcomers = [self._waiting.popleft() for _ in range(admit)]
        for group in prefill_groups(newcomers, self.max_prefill_tokens):
            self._admit_group(group, updates)

    def _admit_group(self, newcomers: list[_Sequence], updates: list[JobUpdate]) -> None:
        """Prefill ``newcomers`` as one left-padded batch and join it to the running one."""
        try:
            joining = self._prefill(newcomers, updates)
        except Exception as error:
            if len(newcomers) == 1:
                log.exception("prefill failed", extra={"job_id": newcomers[0].job_id})
                updates += self._fail(newcomers, f"worker prefill failed: {error}")
                return
            # One bad prompt (or a batch too big for memory) must not fail the others:
            # prefill them one at a time, so only the job that fails alone ends.
            log.warning("batched prefill failed; retrying each job alone", exc_info=True)
            for newcomer in newcomers:
                try:
                    self._join(self._prefill([newcomer], updates), updates)
                except Exception as alone:
                    log.exception("prefill failed", extra={"job_id": newcomer.job_id})
                    updates += self._fail([newcomer], f"worker prefill failed: {alone}")
            return
        self._join(joining, updates)

    def _prefill(self, newcomers: list[_Sequence], updates: list[JobUpdate]) -> _KVBatch:
        """Prefill and sample the first token of ``newcomers``; raises only when the forward
        pass fails (before any of their state changed)."""
        started = time.perf_counter()
        joining, logits = _KVBatch.prefill(self.model, newcomers)
        tokens = self._sample(logits, newcomers)
        elapsed = time.perf_counter() - started
        for row in newcomers:
            row.prefill_s = elapsed
        prompt_tokens = sum(len(row.input_ids) for row in newcomers)
        self._record("prefill", len(newcomers), prompt_tokens, joining.context, elapsed)
        self._advance(joining, tokens, updates)
        return joining

    def _join(self, joining: _KVBatch, updates: list[JobUpdate]) -> None:
        """Merge newly prefilled rows into the running batch; a failed merge (which leaves
        the running batch intact) ends only the newcomers."""
        if not joining.size:
            return
        if self._batch is None or not self._batch.size:
            self._batch = joining
            return
        try:
            self._batch.merge(joining)
        except Exception as error:
            log.exception("merging new jobs into the batch failed")
            updates += self._fail(joining.rows, f"worker cache merge failed: {error}")

    def _fail(self, rows: list[_Sequence], error: str) -> list[JobUpdate]:
        return [
            self._end(row, FinishReason.ERROR, error) for row in rows if row.job_id in self._held
        ]

    # --- sampling ------------------------------------------------------------------------

    def _sample(self, logits: torch.Tensor, rows: list[_Sequence]) -> list[int | None]:
        """Each row's next token; None for a row whose sampling raised (it alone fails)."""
        try:
            return list(self._choose(logits, rows))
        except Exception:
            log.warning("batched sampling failed; sampling each row alone", exc_info=True)
        chosen: list[int | None] = []
        for index, row in enumerate(rows):
            try:
                [token] = self._choose(logits[index : index + 1], [row])
            except Exception as error:
                log.exception("sampling failed", extra={"job_id": row.job_id})
                row.failure = f"worker sampling failed: {error}"
                token = None
            chosen.append(token)
        return chosen

    def warm_up(self, tokens: int = 4) -> None:
        """Run a short batch through prefill, merge and decode once, so the first real job
        does not pay for lazy initialisation (kernels, allocator, tokenizer caches)."""
        rows = min(2, self.max_batch_size)
        prompt_ids = tuple(self.model.encode_prompt("Warm up."))
        for index in range(rows):
            request = GenerationRequest(
                f"warm-up-{index}", prompt_ids[: len(prompt_ids) - index], Sampling(tokens)
            )
            self.submit(request)
        while self.has_work():
            self.step()

    def _choose(self, logits: torch.Tensor, rows: list[_Sequence]) -> list[int]:
        return next_tokens(logits, [row.chooser for row in rows])

    def _advance(self, batch: _KVBatch, tokens: list[int | None], updates: list[JobUpdate]) -> None:
        """Give each row its new token, report it, and drop the rows that finished (or
        failed: no token, or its detokenization raised)."""
        keep: list[int] = []
        # A failed row's placeholder is dropped with the row below.
        batch.next_input = [0 if token_id is None else token_id for token_id in tokens]
        for index, (row, token_id) in enumerate(zip(batch.rows, tokens, strict=True)):
            update = JobUpdate(row.job_id)
            try:
                if token_id is None:
                    raise RuntimeError(row.failure)
                reason = self._append(row, token_id, update)
                if reason is not None:
                    update.tokens += _tokens(row.stream.flush())
            except Exception as error:
                if token_id is not None:
                    log.exception("streaming a token failed", extra={"job_id": row.job_id})
                update.outcome = self._end(row, FinishReason.ERROR, str(error)).outcome
            else:
                if reason is not None:
                    update.outcome = self._end(row, reason).outcome
                else:
                    keep.append(index)
            if update.tokens or update.outcome:
                updates.append(update)
        batch.keep(keep)

    def _append(self, row: _Sequence, token_id: int, update: JobUpdate) -> FinishReason | None:
        """Add one generated token to the row's answer; the reason it ended, if it did."""
        if not row.sampling.replay and token_id in self.model.eos_token_ids:
            return FinishReason.EOS
        row.answer_tokens += 1
        update.tokens += _tokens(row.stream.push(token_id))
        if row.sampling.replay:
            if row.answer_tokens < row.answer_limit:
                return None
            return FinishReason.LENGTH if row.cut_by_context else FinishReason.REPLAY_LENGTH
        if row.stream.stopped:
            return FinishReason.STOP_SEQUENCE
        if row.answer_tokens >= row.answer_limit:
            return FinishReason.LENGTH
        return None

    def _record(self, kind: str, batch_size: int, tokens: int, context: int, s: float) -> None:
        if self.on_step is not None:
            self.on_step(StepStat(kind, batch_size, tokens, context, s))


def _tokens(released: list[tuple[int, int, str]]) -> list[GeneratedToken]:
    return [GeneratedToken(index, token_id, text) for index, token_id, text in released]
