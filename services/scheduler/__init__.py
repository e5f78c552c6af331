"""SSJF scheduler."""
