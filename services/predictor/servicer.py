"""gRPC Predictor service: protobuf <-> the domain core, nothing more."""

from __future__ import annotations

import grpc

from services.pb import predictor_pb2, predictor_pb2_grpc
from services.predictor.core import LengthPredictor, PredictionRequest
from services.predictor.runtime import Prediction

SERVICE_NAME = predictor_pb2.DESCRIPTOR.services_by_name["Predictor"].full_name


class PredictorServicer(predictor_pb2_grpc.PredictorServicer):
    def __init__(self, predictor: LengthPredictor) -> None:
        self.predictor = predictor

    def _response(self, prediction: Prediction) -> predictor_pb2.PredictResponse:
        return predictor_pb2.PredictResponse(
            predicted_output_tokens=prediction.tokens,
            model_version=self.predictor.runtime.version,
            llm=prediction.llm,
        )

    async def Predict(
        self, request: predictor_pb2.PredictRequest, context: grpc.aio.ServicerContext
    ) -> predictor_pb2.PredictResponse:
        prediction = await self.predictor.predict(PredictionRequest(request.prompt, request.llm))
        return self._response(prediction)

    async def PredictBatch(
        self, request: predictor_pb2.PredictBatchRequest, context: grpc.aio.ServicerContext
    ) -> predictor_pb2.PredictBatchResponse:
        predictions = await self.predictor.predict_batch(
            [PredictionRequest(item.prompt, item.llm) for item in request.requests]
        )
        return predictor_pb2.PredictBatchResponse(
            responses=[self._response(prediction) for prediction in predictions]
        )

    async def GetModelInfo(
        self, request: predictor_pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> predictor_pb2.ModelInfo:
        info = self.predictor.describe()
        return predictor_pb2.ModelInfo(
            model_version=info.version,
            llms=info.llms,
            default_llm=info.default_llm,
            formulation=info.formulation,
            execution_provider=info.execution_provider,
            max_prompt_tokens=info.max_prompt_tokens,
        )

    def register(self, server: grpc.aio.Server) -> None:
        predictor_pb2_grpc.add_PredictorServicer_to_server(self, server)
