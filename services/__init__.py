"""SSJF: speculative shortest-job-first LLM serving.

One package per service (predictor, scheduler, worker), code they share in ``common``,
generated protobuf stubs in ``pb`` and the ``ssjf`` command line in ``cli``.
"""
