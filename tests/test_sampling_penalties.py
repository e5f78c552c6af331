"""Repetition, presence and frequency penalties: their arithmetic, that each job's penalties
count only its own tokens (so batched equals solo), and that bad values are refused at
Submit with INVALID_ARGUMENT and by the worker."""

from __future__ import annotations

import grpc
import pytest
import torch

from services.common.errors import InvalidArgument
from services.pb import common_pb2
from services.scheduler.models import SamplingParams
from services.scheduler.servicer import sampling_from_pb, sampling_to_pb
from services.worker.engine import Batching, Engine
from services.worker.gateway import sampling_from_proto
from services.worker.jobs import GenerationRequest, Sampling
from services.worker.model import LoadedModel, load_model
from services.worker.sampling import TokenChooser, next_tokens
from tests.scheduler_support import request, start_scheduler
from tests.test_worker_engine import run

__all__ = ["start_scheduler"]  # fixture, imported for pytest

CPU = torch.device("cpu")


def chooser(answer=(), **penalties: float) -> TokenChooser:
    return TokenChooser(Sampling(8, **penalties), answer, vocab_size=6, device=CPU)


def test_repetition_penalty_scales_every_id_the_answer_holds():
    logits = torch.tensor([2.0, -2.0, 2.0, -2.0, 1.0, 0.5])
    state = chooser(answer=(0, 1), repetition_penalty=2.0)
    # Seen: 0 (positive: divided) and 1 (negative: multiplied); the rest unseen.
    assert state.adjust(logits).tolist() == [1.0, -4.0, 2.0, -2.0, 1.0, 0.5]
    state.observe(4)
    assert state.adjust(logits).tolist() == [1.0, -4.0, 2.0, -2.0, 0.5, 0.5]


def test_presence_and_frequency_penalties_count_occurrences_in_the_answer():
    logits = torch.zeros(6)
    state = chooser(answer=(1, 1, 2), presence_penalty=0.5, frequency_penalty=0.25)
    adjusted = state.adjust(logits)
    assert adjusted.tolist() == [0.0, -1.0, -0.75, 0.0, 0.0, 0.0]
    state.observe(3)
    assert state.adjust(logits)[3].item() == -0.75


def test_default_repetition_penalty_comes_from_the_model_and_one_is_off():
    assert chooser().penalised is False
    inherited = TokenChooser(Sampling(8), (0,), 6, CPU, default_repetition_penalty=1.3)
    assert inherited.repetition_penalty == 1.3 and inherited.penalised
    explicit = TokenChooser(Sampling(8, repetition_penalty=1.0), (0,), 6, CPU, 1.3)
    assert not explicit.penalised


def test_each_row_is_penalised_by_its_own_history():
    """The same logits in two rows: the row that already said token 0 moves off it, the
    other row (and an unpenalised row) keeps it."""
    logits = torch.tensor([[1.5, 1.4, 0.0, 0.0, 0.0, 0.0]] * 3)
    rows = [
        chooser(answer=(0,), presence_penalty=2.0),
        chooser(answer=(1,), presence_penalty=2.0),
        chooser(),
    ]
    assert next_tokens(logits, rows) == [1, 0, 0]
    # Each chooser recorded its own choice: now rows 0 and 1 have both said 0 and 1.
    assert next_tokens(logits[:2], rows[:2]) == [2, 2]


@pytest.mark.parametrize(
    "penalties, field",
    [
        ({"repetition_penalty": -1.0}, "repetition_penalty"),
        ({"repetition_penalty": 11.0}, "repetition_penalty"),
        ({"repetition_penalty": float("nan")}, "repetition_penalty"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3.0}, "frequency_penalty"),
        ({"frequency_penalty": float("inf")}, "frequency_penalty"),
    ],
)
def test_worker_refuses_out_of_range_penalties(penalties: dict[str, float], field: str):
    with pytest.raises(InvalidArgument, match=field):
        Sampling(8, **penalties)


def test_penalties_travel_through_every_translation():
    pb = common_pb2.SamplingParams(
        max_new_tokens=5, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=-0.5
    )
    domain = sampling_from_pb(pb)
    assert (domain.repetition_penalty, domain.presence_penalty, domain.frequency_penalty) == (
        pytest.approx(1.3),
        0.5,
        -0.5,
    )
    assert SamplingParams.from_json(domain.to_json()) == domain
    worker = sampling_from_proto(sampling_to_pb(domain), default_max_new_tokens=9)
    assert worker.repetition_penalty == pytest.approx(1.3)
    assert (worker.presence_penalty, worker.frequency_penalty) == (0.5, -0.5)


BAD_PENALTIES = [
    (common_pb2.SamplingParams(repetition_penalty=-0.5), "repetition_penalty must be within"),
    (common_pb2.SamplingParams(repetition_penalty=50), "repetition_penalty must be within"),
    (common_pb2.SamplingParams(presence_penalty=3), "presence_penalty must be within"),
    (common_pb2.SamplingParams(frequency_penalty=float("nan")), "frequency_penalty must be"),
]


def test_submit_refuses_bad_penalties_with_invalid_argument(start_scheduler) -> None:
    node = start_scheduler()
    for sampling, message in BAD_PENALTIES:
        with pytest.raises(grpc.RpcError) as caught:
            node.scheduler.Submit(request(sampling=sampling))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, message
        assert message in caught.value.details()


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    torch.set_num_threads(1)
    return load_model("tiny-llama", device="cpu", dtype="float32")


def penalised_jobs(model: LoadedModel) -> list[GenerationRequest]:
    """The random tiny model repeats itself; these penalties change what it says."""
    prompt = tuple(model.encode_prompt("Name three colours."))
    settings = [
        {},
        {"repetition_penalty": 1.5},
        {"presence_penalty": 2.0},
        {"frequency_penalty": 1.0, "presence_penalty": 0.5},
    ]
    return [
        GenerationRequest(f"job-{index}", prompt[: len(prompt) - index], Sampling(16, **extra))
        for index, extra in enumerate(settings)
    ]


@pytest.mark.parametrize("batching", list(Batching))
def test_penalised_jobs_batched_equal_solo(tiny: LoadedModel, batching: Batching):
    jobs = penalised_jobs(tiny)
    solo = {}
    for job in jobs:
        solo.update(run(Engine(tiny, Batching.NONE), [job]))
    plain = solo["job-0"].token_ids
    assert len(set(plain)) < len(plain)  # the unpenalised answer repeats tokens
    presence = solo["job-2"].token_ids
    assert len(set(presence)) == len(presence)  # presence 2 drives it to new tokens
    batched = run(Engine(tiny, batching, max_batch_size=4), jobs, arrive_every=2)
    for job_id, alone in solo.items():
        assert batched[job_id].token_ids == alone.token_ids, job_id
