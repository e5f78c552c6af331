"""Where SSJF finds its checkout and shared data, and keeps files it builds at run time.

``SSJF_HOME`` when set (containers set it); else ``.cache`` in the source checkout when
running from one (so a fresh clone keeps everything inside itself); else ``~/.cache/ssjf``.
"""

from __future__ import annotations

import os
from pathlib import Path

CHECKOUT_ROOT = Path(__file__).resolve().parents[2]
# The shared data sits beside a developer's or CI's checkout, never beside a user's clone:
# training and full benchmarks default to it when it exists and take --data otherwise.
SHARED_DATA_DIR = CHECKOUT_ROOT.parent / "shared" / "data"
# The default served model's own greedy answer lengths on the AlpacaEval prompts (committed,
# see data/smollm2-135m-instruct/README.md): its predictor head's labels, the real-generation
# benchmark's oracle.
SERVED_MODEL_LABELS = CHECKOUT_ROOT / "data" / "smollm2-135m-instruct" / "alpaca_eval-greedy"
# Its greedy answer lengths on another prompt set (Chatbot Arena's hard prompts). Not in the
# fine-tuned MiniLM's default: mixed into its training they cost its head more on AlpacaEval
# than they buy on Arena (docs/predictor.md, "Training on Arena labels"). The probe's default
# (``probe_default_labels``): its ridge keeps its AlpacaEval tau and gains on Arena.
SERVED_MODEL_ARENA_LABELS = SERVED_MODEL_LABELS.parent / "arena_hard_v2-greedy"


def default_labels() -> str:
    """``--labels`` default of every trainer: the served model's committed labels, if here."""
    return str(SERVED_MODEL_LABELS) if SERVED_MODEL_LABELS.exists() else ""


def probe_default_labels() -> str:
    """``ssjf train-probe``'s ``--labels`` default: the served model's committed AlpacaEval and
    Arena labels, those that are here."""
    present = [path for path in (SERVED_MODEL_LABELS, SERVED_MODEL_ARENA_LABELS) if path.exists()]
    return ",".join(map(str, present))


def label_dirs(labels: str) -> list[Path]:
    """``--labels DIR[,DIR]`` as paths ('' for none)."""
    return [Path(directory) for directory in labels.split(",") if directory]


def ssjf_home() -> Path:
    configured = os.environ.get("SSJF_HOME")
    if configured:
        return Path(configured)
    if (CHECKOUT_ROOT / "pyproject.toml").exists():
        return CHECKOUT_ROOT / ".cache"
    return Path.home() / ".cache" / "ssjf"
