"""The live-worker registry: Lease registers a worker's LLMs, Report keeps a busy worker
registered, registrations expire, and ListModels names each LLM's predictor head. A real
scheduler process on a real Redis, driven through its gRPC API."""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
import pytest

from services.pb import predictor_pb2, scheduler_pb2
from services.scheduler.registry import PredictorInfo, RegistrationCache
from tests.scheduler_support import (
    ReportSession,
    WordCountPredictor,
    progress,
    request,
    start_predictor,
    start_scheduler,
)

__all__ = ["start_predictor", "start_scheduler"]  # fixtures, imported for pytest


def lease(node, worker_id: str, llms: list[str], wait_ms: int = 0):
    return node.gateway.Lease(
        scheduler_pb2.LeaseRequest(worker_id=worker_id, llms=llms, max_jobs=1, wait_ms=wait_ms)
    )


def served(node, include_offline: bool = False) -> dict[str, scheduler_pb2.ServedModel]:
    reply = node.scheduler.ListModels(
        scheduler_pb2.ListModelsRequest(include_offline=include_offline)
    )
    return {model.llm: model for model in reply.models}


def wait_until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_lease_registers_workers_until_their_registration_expires(start_scheduler) -> None:
    node = start_scheduler("--lease-ttl-s", "1")
    assert served(node) == {}
    lease(node, "w-1", ["llm-a", "llm-b"])
    lease(node, "w-2", ["llm-b"])
    models = served(node)
    assert sorted(models) == ["llm-a", "llm-b"]
    assert models["llm-a"].workers == 1 and models["llm-b"].workers == 2
    # No predictor configured: no head orders these queues.
    assert models["llm-a"].predictor_head == "" and models["llm-a"].predictor_version == ""
    # Both workers stop calling: gone after the lease TTL, but still known as offline.
    wait_until(lambda: served(node) == {}, timeout=20)
    offline = served(node, include_offline=True)
    assert sorted(offline) == ["llm-a", "llm-b"]
    assert all(model.workers == 0 for model in offline.values())


def test_a_busy_worker_stays_registered_through_its_report_heartbeats(start_scheduler) -> None:
    node = start_scheduler("--lease-ttl-s", "1")
    job_id = node.scheduler.Submit(request(llm="busy-llm")).job_id
    [job] = lease(node, "busy", ["busy-llm"]).jobs
    assert job.job_id == job_id
    session = ReportSession(node.gateway, "busy")
    try:
        # Heartbeats (a third of the TTL apart) for three TTLs, and no Lease call.
        for _ in range(9):
            session.send(progress(job))
            assert "busy-llm" in served(node)
            time.sleep(0.33)
    finally:
        session.close()
    wait_until(lambda: "busy-llm" not in served(node), timeout=20)


def model_info_with_one_head(self, request, context) -> predictor_pb2.ModelInfo:
    """GetModelInfo of a word-count predictor with its own head for "headed-llm" only."""
    return predictor_pb2.ModelInfo(model_version="word-count-test", llms=["headed-llm"])


def test_list_models_names_the_predictor_head_of_each_llm(
    start_scheduler, start_predictor, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(WordCountPredictor, "GetModelInfo", model_info_with_one_head, raising=False)
    address, _ = start_predictor()
    node = start_scheduler("--predictor", address, "--policy", "ssjf")
    lease(node, "w-1", ["headed-llm", "other-llm"])
    models = served(node)
    assert models["headed-llm"].predictor_head == "headed-llm"
    assert models["other-llm"].predictor_head == "*"  # answered by the all-LLM head
    assert models["headed-llm"].predictor_version == "word-count-test"


def test_lease_refuses_an_overlong_worker_id(start_scheduler) -> None:
    node = start_scheduler()
    with pytest.raises(grpc.RpcError) as error:
        lease(node, "w" * 300, ["llm-a"])
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert served(node) == {}


def test_registration_cache_writes_only_when_a_registration_nears_expiry() -> None:
    cache = RegistrationCache()
    assert cache.needs_register("w", ("a",), needed_until=10.0)
    cache.remember("w", ("a",), until=20.0)
    assert not cache.needs_register("w", ("a",), needed_until=15.0)
    assert cache.needs_register("w", ("a",), needed_until=25.0)  # would lapse
    assert cache.needs_register("w", ("a", "b"), needed_until=15.0)  # serves other LLMs
    assert not cache.needs_refresh("w", needed_until=15.0)
    cache.remember("w", None, until=30.0)  # a refresh keeps the LLMs
    assert not cache.needs_register("w", ("a",), needed_until=25.0)
    assert cache.needs_refresh("unknown", needed_until=0.0)


def test_predictor_info_resolves_heads_like_the_predictor() -> None:
    info = PredictorInfo(version="v", heads=("vicuna-13b",))
    assert info.head_for("vicuna-13b") == "vicuna-13b"
    assert info.head_for("smollm2") == "*"
