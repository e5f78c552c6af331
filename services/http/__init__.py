"""The OpenAI-compatible HTTP front (``ssjf http``)."""
