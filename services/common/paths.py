"""Where SSJF keeps files it builds at run time (the built-in model, caches).

``SSJF_HOME`` when set (containers set it); else ``.cache`` in the source checkout when
running from one (so a fresh clone keeps everything inside itself); else ``~/.cache/ssjf``.
"""

from __future__ import annotations

import os
from pathlib import Path

CHECKOUT_ROOT = Path(__file__).resolve().parents[2]


def ssjf_home() -> Path:
    configured = os.environ.get("SSJF_HOME")
    if configured:
        return Path(configured)
    if (CHECKOUT_ROOT / "pyproject.toml").exists():
        return CHECKOUT_ROOT / ".cache"
    return Path.home() / ".cache" / "ssjf"
