"""SSJF predictor."""
