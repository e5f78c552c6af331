"""SSJF stack."""
