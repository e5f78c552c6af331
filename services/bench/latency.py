"""A latency model of one worker, fitted to measurements of the real one.

What a job costs, as the simulator needs it (the worker's engine works this way: see
services/worker/engine.py):

- ``step_s(b)``: one decoding step of a batch of ``b`` sequences (every sequence gains one
  token; finished sequences leave the batch).
- ``prefill_s(k)``: admitting ``k`` jobs at once: their prompts' forward pass as one batch,
  which yields each job's first token. The running batch waits meanwhile.
- ``overhead_s``: latency a job sees outside the worker's compute: submission, the
  predictor's answer, the lease hand-off and the relay of the last token to the client. It
  adds to every job's completion time but occupies no worker.

Both costs are measured at a few batch sizes and interpolated linearly in between (and
extrapolated along the last segment beyond). So a job of ``n`` tokens alone on an idle
worker completes in ``overhead_s + prefill_s(1) + (n - 1) * step_s(1)``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np


def _piecewise_linear(table: dict[int, float], batch: int) -> float:
    sizes = np.array(list(table), dtype=float)
    times = np.array(list(table.values()), dtype=float)
    if len(sizes) == 1 or batch <= sizes[-1]:
        return float(np.interp(batch, sizes, times))
    slope = (times[-1] - times[-2]) / (sizes[-1] - sizes[-2])
    return float(times[-1] + max(slope, 0.0) * (batch - sizes[-1]))


@dataclass
class LatencyModel:
    # Seconds per decoding step, keyed by batch size (at least the key 1).
    step_by_batch: dict[int, float]
    # Seconds to prefill this many newly admitted jobs together (at least the key 1).
    prefill_by_batch: dict[int, float]
    overhead_s: float
    # Where the numbers came from (command, worker settings), for the record.
    source: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("step_by_batch", "prefill_by_batch"):
            table = {int(b): float(s) for b, s in sorted(getattr(self, name).items())}
            if 1 not in table:
                raise ValueError(f"the latency model's {name} needs batch size 1")
            setattr(self, name, table)
        # Memoised: the simulator asks for the same few batch sizes millions of times.
        self._steps: dict[int, float] = {}
        self._prefills: dict[int, float] = {}

    def step_s(self, batch: int) -> float:
        """One decoding step of ``batch`` sequences."""
        if batch not in self._steps:
            self._steps[batch] = _piecewise_linear(self.step_by_batch, batch)
        return self._steps[batch]

    def prefill_s(self, jobs: int) -> float:
        """Prefilling ``jobs`` newly admitted jobs together."""
        if jobs not in self._prefills:
            self._prefills[jobs] = _piecewise_linear(self.prefill_by_batch, jobs)
        return self._prefills[jobs]

    def scaled(self, factor: float, **source: object) -> LatencyModel:
        """The same model with every worker cost (steps, prefills) times ``factor``."""
        return LatencyModel(
            step_by_batch={b: t * factor for b, t in self.step_by_batch.items()},
            prefill_by_batch={b: t * factor for b, t in self.prefill_by_batch.items()},
            overhead_s=self.overhead_s,
            source={**self.source, **source},
        )

    def solo_jct_s(self, tokens: int) -> float:
        """Completion time of a job of ``tokens`` tokens alone on an idle worker."""
        return self.overhead_s + self.prefill_s(1) + (tokens - 1) * self.step_s(1)

    def to_dict(self) -> dict[str, object]:
        data = asdict(self)
        for name in ("step_by_batch", "prefill_by_batch"):
            data[name] = {str(b): s for b, s in getattr(self, name).items()}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> LatencyModel:
        return cls(
            step_by_batch=dict(data["step_by_batch"]),  # type: ignore[arg-type]
            prefill_by_batch=dict(data["prefill_by_batch"]),  # type: ignore[arg-type]
            overhead_s=float(data["overhead_s"]),  # type: ignore[arg-type]
            source=dict(data.get("source", {})),  # type: ignore[arg-type]
        )

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> LatencyModel:
        return cls.from_dict(json.loads(path.read_text()))


def fit_line(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Least-squares ``y = intercept + slope * x``; returns (intercept, slope)."""
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(set(xs.tolist())) < 2:
        raise ValueError("fitting a line needs at least two distinct x values")
    slope, intercept = np.polyfit(xs, ys, 1)
    return float(intercept), float(slope)


@dataclass(frozen=True)
class TimedRun:
    """One measurement: ``batch`` jobs of ``tokens`` tokens each, started together on an idle
    worker; ``seconds`` is how long the worker spent on them (first lease to last token)."""

    batch: int
    tokens: int
    seconds: float


def fit_step_times(runs: Sequence[TimedRun]) -> tuple[dict[int, float], dict[int, float]]:
    """Per batch size ``b``: the decoding step time and the cost of prefilling ``b`` jobs.

    The runs of one batch size give ``seconds = prefill(b) + (tokens - 1) * step(b)``: a line
    in ``tokens`` whose slope is ``step(b)`` and whose value at one token is ``prefill(b)``
    (floored at zero, as noise may push a tiny intercept below it).
    """
    by_batch: dict[int, list[TimedRun]] = {}
    for run in runs:
        by_batch.setdefault(run.batch, []).append(run)
    steps: dict[int, float] = {}
    prefills: dict[int, float] = {}
    for batch, group in sorted(by_batch.items()):
        intercept, slope = fit_line([r.tokens for r in group], [r.seconds for r in group])
        steps[batch] = max(slope, 1e-6)
        prefills[batch] = max(intercept + slope, 0.0)
    return steps, prefills
