"""Sub-commands of the scheduler package (filled in by its owner)."""

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this package's sub-commands."""
