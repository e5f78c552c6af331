"""The generation engine on the real tiny transformers model, in every batching mode."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from types import SimpleNamespace

import pytest
import torch

from services.common.errors import InvalidArgument
from services.worker.engine import (
    Batching,
    Engine,
    StepStat,
    admissible_within_budget,
    free_slots,
    prefill_groups,
)
from services.worker.jobs import FinishReason, GenerationRequest, Outcome, Sampling
from services.worker.model import LoadedModel, load_model

PROMPTS = [
    "Name three colours.",
    "Write a long poem about the sea, the sky and everything in between them.",
    "hi",
    "Explain quantum computing to a five year old, with an example or two.",
    "What is the capital of France?",
]
LENGTHS = [12, 30, 3, 20, 9]


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    # One thread: on a shared 2-core machine two intra-op threads stall on each other.
    torch.set_num_threads(1)
    return load_model("tiny-llama", device="cpu", dtype="float32")


def requests(model: LoadedModel, **sampling: object) -> list[GenerationRequest]:
    return [
        GenerationRequest(
            f"job-{index}", tuple(model.encode_prompt(prompt)), Sampling(length, **sampling)
        )
        for index, (prompt, length) in enumerate(zip(PROMPTS, LENGTHS, strict=True))
    ]


@dataclasses.dataclass
class Result:
    token_ids: list[int]
    indexes: list[int]
    text: str
    outcome: Outcome | None = None


def run(
    engine: Engine, jobs: Iterable[GenerationRequest], arrive_every: int = 0
) -> dict[str, Result]:
    """Submit jobs (all at once, or one every ``arrive_every`` steps) and step to the end."""
    waiting = list(jobs)
    results = {job.job_id: Result([], [], "") for job in waiting}
    step = 0
    while waiting or engine.has_work():
        if waiting and (arrive_every == 0 or step % arrive_every == 0):
            batch = waiting if arrive_every == 0 else waiting[:1]
            for job in batch:
                assert engine.submit(job) is None
            waiting = waiting[len(batch) :]
        for update in engine.step():
            result = results[update.job_id]
            result.token_ids += [token.token_id for token in update.tokens]
            result.indexes += [token.index for token in update.tokens]
            result.text += "".join(token.text for token in update.tokens)
            if update.outcome is not None:
                assert result.outcome is None, "one outcome per job"
                result.outcome = update.outcome
        step += 1
    return results


@pytest.fixture(scope="module")
def solo(model: LoadedModel) -> dict[str, Result]:
    """Each job's greedy answer generated alone."""
    results: dict[str, Result] = {}
    for job in requests(model):
        results.update(run(Engine(model, Batching.NONE), [job]))
    return results


def test_solo_answers_run_to_max_new_tokens(solo: dict[str, Result]):
    for index, length in enumerate(LENGTHS):
        result = solo[f"job-{index}"]
        assert result.indexes == list(range(length))
        assert result.outcome is not None
        assert result.outcome.finish_reason is FinishReason.LENGTH
        assert result.outcome.generated_tokens == length
        assert result.outcome.prompt_tokens > 0
        assert result.outcome.prefill_s > 0 and result.outcome.decode_s > 0


@pytest.mark.parametrize("batching", list(Batching))
@pytest.mark.parametrize("arrive_every", [0, 3])
def test_batched_greedy_tokens_equal_solo_tokens(
    model: LoadedModel, solo: dict[str, Result], batching: Batching, arrive_every: int
):
    """Jobs of different prompt and answer lengths batched together (and, for continuous
    batching, joining a running batch mid-flight) get exactly their solo greedy tokens."""
    steps: list[StepStat] = []
    engine = Engine(model, batching, max_batch_size=3, on_step=steps.append)
    batched = run(engine, requests(model), arrive_every)
    for job_id, alone in solo.items():
        assert batched[job_id].token_ids == alone.token_ids, job_id
        assert batched[job_id].text == alone.text
        assert batched[job_id].outcome.generated_tokens == alone.outcome.generated_tokens
    largest = max(step.batch_size for step in steps if step.kind == "decode")
    assert largest == (1 if batching is Batching.NONE else 3)
    if batching is Batching.CONTINUOUS and arrive_every:
        # Newcomers were prefilled while others were mid-decode, and merged into the batch.
        prefill_steps = [i for i, step in enumerate(steps) if step.kind == "prefill"]
        assert any(steps[i - 1].kind == "decode" for i in prefill_steps if i > 0)


def test_dynamic_batching_admits_nobody_until_the_batch_is_done(model: LoadedModel):
    steps: list[StepStat] = []
    engine = Engine(model, Batching.DYNAMIC, max_batch_size=2, on_step=steps.append)
    run(engine, requests(model)[:4])
    prefills = [step for step in steps if step.kind == "prefill"]
    assert [step.batch_size for step in prefills] == [2, 2]
    # Jobs 0 and 1 (12 and 30 tokens): the second batch starts after the 30th token.
    first_batch_decodes = steps.index(prefills[1]) - 1
    assert first_batch_decodes == 29


def run_all_at_once_as_solo(
    model: LoadedModel, solo: dict[str, Result], batching: Batching, **budget: int
) -> list[StepStat]:
    """Submit every job at once to an engine of batch size 5 under ``budget``; check that each
    job still gets its solo greedy tokens and runs to its length. Returns the steps taken."""
    steps: list[StepStat] = []
    engine = Engine(model, batching, max_batch_size=5, on_step=steps.append, **budget)
    batched = run(engine, requests(model))
    for job_id, alone in solo.items():
        assert batched[job_id].token_ids == alone.token_ids, job_id
        assert batched[job_id].outcome.finish_reason is FinishReason.LENGTH
    return steps


@pytest.mark.parametrize("batching", [Batching.DYNAMIC, Batching.CONTINUOUS])
def test_a_prefill_budget_splits_newcomers_and_keeps_their_solo_tokens(
    model: LoadedModel, solo: dict[str, Result], batching: Batching
):
    """Five newcomers admitted at once under a budget of two short prompts' padded tokens:
    several prefill passes, none over the budget unless it holds one prompt alone, and every
    job still gets its solo greedy tokens (dynamic batching still runs them as one batch)."""
    jobs = requests(model)
    lengths = [len(job.prompt_ids) for job in jobs]
    budget = 2 * max(sorted(lengths)[:2])
    steps = run_all_at_once_as_solo(model, solo, batching, max_prefill_tokens=budget)
    prefills = [step for step in steps if step.kind == "prefill"]
    assert len(prefills) > 1
    assert sum(step.batch_size for step in prefills) == len(jobs)
    for step in prefills:
        assert step.batch_size == 1 or step.batch_size * step.context <= budget
    first_decode = next(step for step in steps if step.kind == "decode")
    assert first_decode.batch_size == len(jobs)


def test_prefill_groups_keep_order_and_put_an_overlong_prompt_alone():
    rows = [SimpleNamespace(input_ids=[0] * length) for length in (10, 10, 30, 5, 100, 5, 5)]
    groups = prefill_groups(rows, max_tokens=60)
    assert [row for group in groups for row in group] == rows
    assert [[len(row.input_ids) for row in group] for group in groups] == [
        [10, 10],
        [30, 5],
        [100],
        [5, 5],
    ]
    with pytest.raises(InvalidArgument, match="prefill tokens"):
        Engine(SimpleNamespace(), max_prefill_tokens=0)


@pytest.mark.parametrize("batching", [Batching.DYNAMIC, Batching.CONTINUOUS])
def test_a_cache_budget_holds_jobs_back_and_keeps_their_solo_tokens(
    model: LoadedModel, solo: dict[str, Result], batching: Batching
):
    """Five jobs at once under a cache budget of about two rows: no decoding step's cache
    (rows x width) passes the budget unless one row runs alone, jobs wait their turn instead
    of failing, and every job still gets its solo greedy tokens."""
    jobs = requests(model)
    spans = sorted(len(job.prompt_ids) + job.sampling.answer_limit for job in jobs)
    budget = 2 * spans[-1]
    steps = run_all_at_once_as_solo(model, solo, batching, max_batch_total_tokens=budget)
    decodes = [step for step in steps if step.kind == "decode"]
    for step in decodes:
        assert step.batch_size == 1 or step.batch_size * step.context <= budget
    # The budget, not the batch size, held the batch: never all five, but more than one.
    assert 1 < max(step.batch_size for step in decodes) < len(jobs)


def test_cache_budget_admission_keeps_order_and_always_starts_an_empty_batch():
    # Running rows 100 and 50 wide; budget 400: a third row of width <= 133 fits.
    assert admissible_within_budget([100, 50], [120, 10, 10], slots=5, max_total_tokens=400) == 1
    # The first that does not fit stops admission: the short ones behind it do not overtake.
    assert admissible_within_budget([100, 50], [300, 10], slots=5, max_total_tokens=400) == 0
    # An empty batch takes a job wider than the budget alone (it would never run otherwise).
    assert admissible_within_budget([], [900, 10], slots=5, max_total_tokens=400) == 1
    assert admissible_within_budget([], [100] * 9, slots=3, max_total_tokens=10_000) == 3
    assert admissible_within_budget([], [100] * 9, slots=9, max_total_tokens=450) == 4
    assert admissible_within_budget([], [], slots=9, max_total_tokens=450) == 0
    with pytest.raises(InvalidArgument, match="max batch total tokens"):
        Engine(SimpleNamespace(), max_batch_total_tokens=0)


def test_free_slots_per_mode():
    assert free_slots(Batching.NONE, 8, 0) == 1
    assert free_slots(Batching.NONE, 8, 1) == 0
    assert free_slots(Batching.DYNAMIC, 8, 0) == 8
    assert free_slots(Batching.DYNAMIC, 8, 3) == 0
    assert free_slots(Batching.CONTINUOUS, 8, 3) == 5
    assert free_slots(Batching.CONTINUOUS, 8, 9) == 0


@pytest.mark.parametrize("batching", [Batching.DYNAMIC, Batching.CONTINUOUS])
def test_cancel_in_the_middle_of_a_batch(
    model: LoadedModel, solo: dict[str, Result], batching: Batching
):
    engine = Engine(model, batching, max_batch_size=4)
    jobs = requests(model)[:4]
    for job in jobs:
        engine.submit(job)
    streamed: dict[str, list[int]] = {job.job_id: [] for job in jobs}
    outcomes: dict[str, Outcome] = {}

    def collect(updates):
        for update in updates:
            streamed[update.job_id] += [token.token_id for token in update.tokens]
            if update.outcome:
                outcomes[update.job_id] = update.outcome

    for _ in range(5):
        collect(engine.step())
    cancelled = engine.cancel("job-1")
    assert cancelled is not None and cancelled.outcome is not None
    assert cancelled.outcome.finish_reason is FinishReason.CANCELLED
    assert cancelled.outcome.generated_tokens == len(streamed["job-1"]) == 5
    assert engine.cancel("job-1") is None  # already gone
    collect(engine.step())
    assert len(streamed["job-1"]) == 5, "no token after cancellation"
    while engine.has_work():
        collect(engine.step())
    assert "job-1" not in outcomes
    for job_id in ("job-0", "job-2", "job-3"):
        assert streamed[job_id] == solo[job_id].token_ids
        assert outcomes[job_id].finish_reason is FinishReason.LENGTH


def test_cancel_a_waiting_job(model: LoadedModel):
    engine = Engine(model, Batching.NONE)
    first, second = requests(model)[:2]
    engine.submit(first)
    engine.submit(second)
    engine.step()
    update = engine.cancel(second.job_id)
    assert update.outcome.finish_reason is FinishReason.CANCELLED
    assert update.outcome.generated_tokens == 0
    assert engine.active_jobs == 1


@pytest.mark.parametrize("batching", list(Batching))
def test_replay_generates_exactly_the_requested_lengths(model: LoadedModel, batching: Batching):
    targets = [1, 7, 40, 2, 15]
    jobs = [
        dataclasses.replace(
            job,
            sampling=Sampling(max_new_tokens=4, replay_output_tokens=target, stop=("the",)),
        )
        for job, target in zip(requests(model), targets, strict=True)
    ]
    # Even an end-of-sequence id does not end a replayed job.
    eos_everywhere = dataclasses.replace(
        model, eos_token_ids=frozenset(range(model.tokenizer.vocab_size))
    )
    results = run(Engine(eos_everywhere, batching, max_batch_size=4), jobs)
    for job, target in zip(jobs, targets, strict=True):
        result = results[job.job_id]
        assert result.indexes == list(range(target))
        assert result.outcome.finish_reason is FinishReason.REPLAY_LENGTH
        assert result.outcome.generated_tokens == target


def test_eos_ends_the_answer_without_streaming_it(model: LoadedModel, solo: dict[str, Result]):
    alone = solo["job-1"].token_ids
    # Pretend the first id that is new in the answer is the end-of-sequence id.
    end = next(i for i in range(1, len(alone)) if alone[i] not in alone[:i])
    eos_there = dataclasses.replace(model, eos_token_ids=frozenset({alone[end]}))
    result = run(Engine(eos_there, Batching.CONTINUOUS), [requests(model)[1]])["job-1"]
    assert result.token_ids == alone[:end]
    assert result.outcome.finish_reason is FinishReason.EOS
    assert result.outcome.generated_tokens == end


def test_stop_string_ends_the_answer_and_is_not_streamed(
    model: LoadedModel, solo: dict[str, Result]
):
    full_text = solo["job-1"].text
    words = full_text.split()
    stop = " ".join(words[4:6])
    before = full_text[: full_text.index(stop)]
    job = dataclasses.replace(requests(model)[1], sampling=Sampling(30, stop=("zzzz", stop)))
    result = run(Engine(model, Batching.CONTINUOUS), [job])["job-1"]
    assert result.outcome.finish_reason is FinishReason.STOP_SEQUENCE
    assert result.text == before
    assert stop not in result.text
    assert result.indexes == list(range(len(result.indexes)))
    assert result.outcome.generated_tokens == len(result.indexes)


def test_resumed_job_continues_after_the_streamed_tokens(
    model: LoadedModel, solo: dict[str, Result]
):
    alone = solo["job-1"]
    job = dataclasses.replace(requests(model)[1], resume_token_ids=tuple(alone.token_ids[:10]))
    result = run(Engine(model, Batching.CONTINUOUS), [job])["job-1"]
    assert result.indexes == list(range(10, 30))
    assert result.token_ids == alone.token_ids[10:]
    assert result.outcome.generated_tokens == 30


def test_resumed_job_that_is_already_complete_finishes_at_once(model: LoadedModel):
    job = GenerationRequest("done", (1, 2, 3), Sampling(4), resume_token_ids=(5, 6, 7, 8))
    update = Engine(model, Batching.CONTINUOUS).submit(job)
    assert update.outcome.finish_reason is FinishReason.LENGTH
    assert update.outcome.generated_tokens == 4


def test_sampling_with_a_seed_is_repeatable_whatever_the_batch(model: LoadedModel):
    sampled = dict(temperature=0.9, top_p=0.8, seed=1234)
    alone = run(Engine(model, Batching.NONE), requests(model, **sampled)[1:2])["job-1"]
    batched = run(Engine(model, Batching.CONTINUOUS, 4), requests(model, **sampled), 2)["job-1"]
    assert batched.token_ids == alone.token_ids
    other_seed = dict(sampled, seed=99)
    different = run(Engine(model, Batching.NONE), requests(model, **other_seed)[1:2])["job-1"]
    assert different.token_ids != alone.token_ids


def test_prompt_longer_than_the_context_is_refused(model: LoadedModel):
    too_long = GenerationRequest("long", tuple([1000] * model.max_context), Sampling(4))
    with pytest.raises(InvalidArgument, match="context"):
        Engine(model, Batching.NONE).submit(too_long)


def test_invalid_sampling_is_refused():
    with pytest.raises(InvalidArgument, match="temperature"):
        Sampling(4, temperature=-1)
    with pytest.raises(InvalidArgument, match="top_p"):
        Sampling(4, top_p=1.5)


@pytest.mark.slow
def test_model_saved_with_save_pretrained_loads_by_path(
    model: LoadedModel, solo: dict[str, Result], tmp_path
):
    model.model.save_pretrained(tmp_path)
    model.tokenizer.save_pretrained(tmp_path)
    reloaded = load_model(str(tmp_path), device="cpu", dtype="float32")
    assert reloaded.tokenizer.chat_template
    job = GenerationRequest(
        "job-0", tuple(reloaded.encode_prompt(PROMPTS[0])), Sampling(LENGTHS[0])
    )
    assert run(Engine(reloaded, Batching.NONE), [job])["job-0"].token_ids == solo["job-0"].token_ids
