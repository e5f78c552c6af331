"""Worker.GetWorkerInfo: what this worker serves and how busy it is (for operators, probes)."""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc

from services.pb import worker_pb2, worker_pb2_grpc
from services.worker.runner import EngineRunner


@dataclass
class WorkerIdentity:
    """What a worker is; device and dtype are filled in once the model is loaded."""

    worker_id: str
    llms: list[str]
    model: str
    batching: str
    max_batch_size: int
    device: str = ""
    dtype: str = ""
    runner: EngineRunner | None = field(default=None, repr=False)


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    def __init__(self, identity: WorkerIdentity) -> None:
        self.identity = identity

    async def GetWorkerInfo(
        self, request: worker_pb2.GetWorkerInfoRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.WorkerInfo:
        identity, runner = self.identity, self.identity.runner
        return worker_pb2.WorkerInfo(
            worker_id=identity.worker_id,
            llms=identity.llms,
            model=identity.model,
            batching=identity.batching,
            max_batch_size=identity.max_batch_size,
            device=identity.device,
            dtype=identity.dtype,
            active_jobs=runner.active_jobs if runner else 0,
            completed_jobs=runner.completed_jobs if runner else 0,
            generated_tokens=runner.generated_tokens if runner else 0,
        )
