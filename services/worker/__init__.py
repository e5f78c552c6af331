"""SSJF worker."""
