"""The worker's gateway client under broken streams and late directives (issue 11 items 2,
4): its per-lease state machine and its acknowledged outbox, driven in-process with a
recording engine runner (the protocol logic, not the model, is under test here)."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from services.pb import common_pb2, scheduler_pb2
from services.worker.engine import Engine
from services.worker.gateway import GatewayClient, Outbox, Phase, lease_key
from services.worker.jobs import GeneratedToken, JobUpdate
from services.worker.model import load_model


class RecordingRunner:
    """Stands in for EngineRunner: records what the gateway asks of the engine."""

    def __init__(self) -> None:
        self.submitted: list[str] = []
        self.cancelled: list[str] = []
        self.active_jobs = 0
        self.slot_freed = asyncio.Event()
        self.updates: asyncio.Queue[list[JobUpdate]] = asyncio.Queue()

    def submit(self, key, prompt, sampling, resume_token_ids, conversation=()) -> None:
        self.submitted.append(key)

    def cancel(self, key: str) -> None:
        self.cancelled.append(key)

    def free_slots(self) -> int:
        return 1


def leased(job_id: str, lease_id: str) -> scheduler_pb2.LeasedJob:
    return scheduler_pb2.LeasedJob(job_id=job_id, lease_id=lease_id, llm="m", prompt="p")


def tokens(*indexes: int) -> list[GeneratedToken]:
    return [GeneratedToken(i, 100 + i, f"t{i}") for i in indexes]


def test_a_stop_meant_for_an_old_lease_leaves_the_new_lease_running() -> None:
    async def scenario() -> None:
        runner = RecordingRunner()
        client = GatewayClient(runner, "127.0.0.1:1", "w", ["m"], 16)
        client._start(leased("job", "old"))
        client._start(leased("job", "new"))  # leased again: the old run is stopped here
        assert runner.cancelled == [lease_key("job", "old")]
        # The scheduler's LEASE_LOST for the old lease arrives late.
        client._stop("job", "old", scheduler_pb2.StopJob.REASON_LEASE_LOST)
        assert runner.cancelled == [lease_key("job", "old")]
        assert client._leases[lease_key("job", "new")].phase is Phase.RUNNING
        # A stop for the new lease stops it.
        client._stop("job", "new", scheduler_pb2.StopJob.REASON_CANCELLED)
        assert runner.cancelled[-1] == lease_key("job", "new")
        await client._channel.close()

    asyncio.run(scenario())


def test_a_report_lost_with_its_stream_is_sent_again_before_newer_progress() -> None:
    outbox = Outbox("w")
    outbox.entry("job", "L").tokens.extend(
        common_pb2.Token(index=t.index, text=t.text, token_id=t.token_id) for t in tokens(0, 1)
    )
    first = outbox.take()
    outbox.entry("job", "L").tokens.extend(
        common_pb2.Token(index=t.index, text=t.text, token_id=t.token_id) for t in tokens(2, 3)
    )
    second = outbox.take()
    outbox.acknowledge(first.sequence)  # the scheduler applied the first report only
    outbox.entry("job", "L").tokens.append(common_pb2.Token(index=4, text="t4", token_id=104))
    assert second.sequence > first.sequence
    assert not outbox.empty
    outbox.requeue(stopped=lambda key: False)  # the stream broke
    resent = outbox.take()
    assert [t.index for e in resent.progress for t in e.tokens] == [2, 3, 4]
    outbox.acknowledge(resent.sequence)
    assert outbox.empty


def test_a_directive_without_a_sequence_acknowledges_the_oldest_report() -> None:
    outbox = Outbox("w")
    outbox.entry("a", "L")
    first = outbox.take()
    outbox.entry("b", "L")
    outbox.take()
    outbox.acknowledge(0)  # an older scheduler
    assert list(outbox.in_flight) == [first.sequence + 1]


def test_progress_of_a_stopped_lease_is_not_resent() -> None:
    outbox = Outbox("w")
    outbox.entry("job", "L").tokens.append(common_pb2.Token(index=0, text="x", token_id=1))
    outbox.take()
    outbox.requeue(stopped=lambda key: key == lease_key("job", "L"))
    assert outbox.empty


@pytest.mark.parametrize("replay", [True, False])
def test_a_replay_longer_than_the_context_ends_at_the_context(replay: bool) -> None:
    """replay_output_tokens had no upper limit: a job ran on past the model's context."""
    from services.worker.jobs import GenerationRequest, Sampling

    model = dataclasses.replace(load_model("tiny-llama", device="cpu", dtype="float32"))
    model = dataclasses.replace(model, max_context=40)
    engine = Engine(model)
    prompt = tuple(model.encode_prompt("hi"))
    sampling = Sampling(10_000, replay_output_tokens=10_000 if replay else 0)
    assert engine.submit(GenerationRequest("long", prompt, sampling)) is None
    outcome = None
    for _ in range(200):
        for update in engine.step():
            outcome = update.outcome or outcome
        if not engine.has_work():
            break
    assert outcome is not None and not engine.has_work()
    assert outcome.generated_tokens <= 40 - len(prompt)
    assert outcome.finish_reason.value in ("length", "eos")
