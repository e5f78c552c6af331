"""SSJF bench."""
