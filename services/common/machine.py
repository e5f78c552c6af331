"""What a benchmark ran on, recorded beside its timings.

Timings are comparable only on the same CPU: the predictor's int8 ONNX model ran at 314-361
prompts/s (batch 32) on one host of this project and at 130-148 on another, an AVX2 host
without AVX-512 VNNI, where int8 is no faster than fp32 (docs/predictor.md). So every
benchmark records the CPU model and the instruction-set extensions that decide that.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

# The extensions that change what int8 and fp32 inference cost on x86: VNNI (AVX-512 or
# AVX) runs int8 dot products in one instruction, AMX runs int8 tiles.
SPEED_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
CPUINFO = Path("/proc/cpuinfo")


def _cpuinfo_field(name: str, cpuinfo: str) -> str:
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == name:
            return value.strip()
    return ""


def describe_machine(cpuinfo: str | None = None) -> dict[str, object]:
    """Cores, CPU model, the speed-relevant instruction-set extensions, OS and Python.
    ``cpuinfo``: the text of /proc/cpuinfo (read when not given; empty off Linux)."""
    if cpuinfo is None:
        cpuinfo = CPUINFO.read_text() if CPUINFO.exists() else ""
    flags = set(_cpuinfo_field("flags", cpuinfo).split())
    return {
        "cpus": os.cpu_count(),
        "cpu_model": _cpuinfo_field("model name", cpuinfo)
        or platform.processor()
        or platform.machine(),
        "cpu_flags": [flag for flag in SPEED_FLAGS if flag in flags],
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
