"""Chat jobs: a conversation travels as messages from the client through the scheduler to
the worker, which renders it with its own model's chat template; the predictor and the job
record see its last user turn."""

from __future__ import annotations

import grpc
import pytest

from services.pb import common_pb2, scheduler_pb2
from services.worker.chat import encode_conversation, render_conversation
from services.worker.model import LoadedModel, load_model
from tests.scheduler_support import start_scheduler

__all__ = ["start_scheduler"]  # fixture, imported for pytest

CONVERSATION = [
    ("system", "You are a pirate. Answer in one word."),
    ("user", "What is the sea?"),
    ("assistant", "Home."),
    ("user", "And the sky?"),
]


def chat_request(turns=CONVERSATION, **fields: object) -> scheduler_pb2.GenerateRequest:
    return scheduler_pb2.GenerateRequest(
        messages=[common_pb2.ChatMessage(role=role, content=content) for role, content in turns],
        **fields,
    )


def test_a_conversation_reaches_the_worker_as_messages(start_scheduler) -> None:
    node = start_scheduler()
    submitted = node.scheduler.Submit(chat_request(llm="chat-llm"))
    # The record keeps the last user turn as its prompt: what the predictor scored.
    assert submitted.job.prompt_chars == len("And the sky?")
    [job] = node.gateway.Lease(
        scheduler_pb2.LeaseRequest(worker_id="w", llms=["chat-llm"], max_jobs=1)
    ).jobs
    assert job.job_id == submitted.job_id
    assert [(m.role, m.content) for m in job.messages] == CONVERSATION
    assert job.prompt == "And the sky?"
    # A prompt job carries no messages: old workers and clients see no difference.
    node.scheduler.Submit(scheduler_pb2.GenerateRequest(prompt="hi", llm="chat-llm"))
    [plain] = node.gateway.Lease(
        scheduler_pb2.LeaseRequest(worker_id="w", llms=["chat-llm"], max_jobs=1)
    ).jobs
    assert plain.prompt == "hi" and not plain.messages


@pytest.mark.parametrize(
    ("request_", "complaint"),
    [
        (chat_request(prompt="also a prompt"), "either prompt or messages"),
        (chat_request([("robot", "hi"), ("user", "hi")]), "messages[0].role"),
        (chat_request([("user", "hi"), ("assistant", "hello")]), "must be a user turn"),
        (chat_request([("system", "be brief"), ("user", "  ")]), "must not be empty"),
        (chat_request([("user", "x" * 200)]), "--max-prompt-chars"),
    ],
)
def test_a_malformed_conversation_is_refused_with_a_reason(
    start_scheduler, request_: scheduler_pb2.GenerateRequest, complaint: str
) -> None:
    node = start_scheduler("--max-prompt-chars", "100")
    with pytest.raises(grpc.RpcError) as error:
        node.scheduler.Submit(request_)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert complaint in error.value.details()


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    return load_model("tiny-llama", device="cpu", dtype="float32")


def test_the_worker_renders_every_turn_with_its_models_chat_template(tiny) -> None:
    rendered = render_conversation(tiny.tokenizer, tuple(CONVERSATION))
    assert rendered == (
        "### system: You are a pirate. Answer in one word.\n"
        "### user: What is the sea?\n"
        "### assistant: Home.\n"
        "### user: And the sky?\n"
        "### assistant:"
    )
    ids = encode_conversation(tiny.tokenizer, tuple(CONVERSATION))
    # The same ids the single-turn path gives for a one-turn conversation.
    assert encode_conversation(tiny.tokenizer, (("user", "hi"),)) == tiny.encode_prompt("hi")
    assert "pirate" in tiny.tokenizer.decode(ids)


def test_a_model_without_a_chat_template_reads_a_plain_transcript(tiny) -> None:
    class NoTemplate:
        chat_template = None

    assert render_conversation(NoTemplate(), (("system", "S"), ("user", "U"))) == (
        "system: S\nuser: U\nassistant:"
    )
