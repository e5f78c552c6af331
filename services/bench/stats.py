"""The statistics behind every number ``ssjf bench`` and ``ssjf simulate`` report.

Confidence intervals: a paired bootstrap, over whole rounds when there are many independent
ones (the simulator: ``ROUNDS_FOR_ROUND_BOOTSTRAP`` or more), else over jobs within rounds
(the real stack's few long rounds): stratified, moving-block.

- *Paired*: within a round every policy serves the same jobs (same prompts, same arrival
  times: common random numbers), so one resample of job positions is applied to every
  policy at once. The ratio SSJF/FCFS then varies only with what differs between the
  policies, not with which jobs happened to be drawn twice.
- *Stratified*: rounds (independent arrival streams, and on the real stack separate minutes
  of a drifting machine) are resampled separately and pooled, as the point estimate pools
  them.
- *Moving blocks*: completion times of consecutive jobs are correlated (a queue that builds
  up delays every job behind it), and resampling single jobs would understate the spread.
  Blocks of ``block`` consecutive arrivals are resampled instead; ``default_block`` grows
  with the round's length, and a test checks on simulated queues that the interval's
  half-width matches the spread of independent replications.

Throughput at a latency SLO: ``max_rate_under_slo`` finds, by bisection over the arrival
rate, the highest rate whose latency statistic stays under the SLO.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 2000
# With at least this many independent rounds, resample rounds rather than jobs: on the
# simulator's queues at load 0.9 with dynamic batching, job blocks understated the spread of
# independent replications by about a third (bench/results/sizing).
ROUNDS_FOR_ROUND_BOOTSTRAP = 10


def bootstrap_unit(rounds: int) -> str:
    return "rounds" if rounds >= ROUNDS_FOR_ROUND_BOOTSTRAP else "jobs"


@dataclass(frozen=True)
class Interval:
    """A point estimate and its bootstrap confidence interval."""

    value: float
    low: float
    high: float

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def to_dict(self) -> dict[str, float]:
        return {"value": self.value, "ci_low": self.low, "ci_high": self.high}

    def __str__(self) -> str:
        return f"{self.value:.2f} [{self.low:.2f}, {self.high:.2f}]"


def default_block(jobs: int) -> int:
    """Block length for a round of ``jobs`` consecutive jobs: about its square root, which
    spans a busy period of a queue at high load (tens of jobs) yet leaves many blocks."""
    return max(1, round(math.sqrt(jobs)))


def block_indices(jobs: int, block: int, rng: np.random.Generator) -> np.ndarray:
    """One moving-block resample of positions ``0 .. jobs-1``: random blocks of ``block``
    consecutive positions (wrapping around) until ``jobs`` positions are drawn."""
    block = max(1, min(block, jobs))
    starts = rng.integers(0, jobs, size=math.ceil(jobs / block))
    positions = (starts[:, None] + np.arange(block)[None, :]) % jobs
    return positions.ravel()[:jobs]


class Pooled(dict[str, np.ndarray]):
    """Each policy's pooled values (NaN dropped), with each policy's mean and percentiles
    computed once however many statistics ask for them (a bootstrap asks thousands of
    times)."""

    def __init__(self, values: Mapping[str, np.ndarray]) -> None:
        super().__init__(values)
        self._cache: dict[tuple[str, float], float] = {}

    def mean(self, name: str) -> float:
        key = (name, -1.0)
        if key not in self._cache:
            self._cache[key] = float(self[name].mean())
        return self._cache[key]

    def percentile(self, name: str, q: float) -> float:
        key = (name, q)
        if key not in self._cache:
            self._cache[key] = float(np.percentile(self[name], q))
        return self._cache[key]


def _pooled(values: Mapping[str, np.ndarray]) -> Pooled:
    return values if isinstance(values, Pooled) else Pooled(values)


Statistic = Callable[[Mapping[str, np.ndarray]], float]


def paired_bootstrap(
    rounds: Sequence[Mapping[str, Sequence[float]]],
    statistics: Mapping[str, Statistic],
    resamples: int = BOOTSTRAP_RESAMPLES,
    block: int | None = None,
    confidence: float = CONFIDENCE,
    seed: int = 0,
    unit: str = "jobs",
) -> dict[str, Interval]:
    """Each of ``statistics`` on the pooled jobs, with a percentile bootstrap interval (the
    same resamples for every statistic).

    ``unit="jobs"``: moving blocks of jobs within each round (for few, long rounds: the real
    stack). ``unit="rounds"``: whole rounds drawn with replacement (for many independent
    rounds: the simulator), which needs no assumption about how far correlation reaches.

    ``rounds``: one mapping per round from a policy to its jobs' values in arrival order,
    the same jobs for every policy (NaN marks a job that failed: it is left out of that
    policy's numbers). A statistic maps each policy's pooled values to one number.
    """
    arrays = [{name: np.asarray(values, dtype=float) for name, values in r.items()} for r in rounds]
    if not arrays:
        raise ValueError("no rounds to bootstrap")
    for one_round in arrays:
        lengths = {len(values) for values in one_round.values()}
        if len(lengths) != 1:
            raise ValueError(f"the policies of a round must have the same jobs, got {lengths}")
    names = list(arrays[0])
    # Rounds resampled whole need their failed jobs dropped only once.
    finite = [{name: v[~np.isnan(v)] for name, v in one_round.items()} for one_round in arrays]

    def pooled(selections: Sequence[np.ndarray | None]) -> Pooled:
        out = {}
        for name in names:
            parts = [
                one_round[name] if chosen is None else one_round[name][chosen]
                for one_round, chosen in zip(arrays, selections, strict=True)
            ]
            joined = np.concatenate(parts)
            out[name] = joined[~np.isnan(joined)]
        return Pooled(out)

    whole = pooled([None] * len(arrays))
    values = {key: statistic(whole) for key, statistic in statistics.items()}
    rng = np.random.default_rng(seed)
    replicates = {key: np.empty(resamples) for key in statistics}
    if unit not in ("jobs", "rounds"):
        raise ValueError(f"unit must be jobs or rounds, got {unit!r}")
    for i in range(resamples):
        if unit == "rounds":
            drawn = rng.integers(0, len(arrays), size=len(arrays))
            sample = {name: np.concatenate([arrays[k][name] for k in drawn]) for name in names}
            sample = {name: values[~np.isnan(values)] for name, values in sample.items()}
        else:
            selections: list[np.ndarray | None] = []
            for one_round in arrays:
                jobs = len(next(iter(one_round.values())))
                selections.append(block_indices(jobs, block or default_block(jobs), rng))
            sample = pooled(selections)
        for key, statistic in statistics.items():
            replicates[key][i] = statistic(sample)
    tail = 100 * (1 - confidence) / 2
    intervals = {}
    for key, draws in replicates.items():
        finite = draws[np.isfinite(draws)]
        if len(finite) < resamples / 2:
            intervals[key] = Interval(values[key], math.nan, math.nan)
            continue
        low, high = np.percentile(finite, [tail, 100 - tail])
        intervals[key] = Interval(float(values[key]), float(low), float(high))
    return intervals


def mean_ratio(numerator: str, denominator: str) -> Statistic:
    """mean(numerator) / mean(denominator), e.g. SSJF's mean JCT over FCFS's."""

    def statistic(values: Mapping[str, np.ndarray]) -> float:
        pooled = _pooled(values)
        return pooled.mean(numerator) / pooled.mean(denominator)

    return statistic


def quantile_ratio(numerator: str, denominator: str, q: float) -> Statistic:
    """The ratio of the two policies' ``q``-th percentiles (e.g. p99 JCT)."""

    def statistic(values: Mapping[str, np.ndarray]) -> float:
        pooled = _pooled(values)
        return pooled.percentile(numerator, q) / pooled.percentile(denominator, q)

    return statistic


def oracle_gain_fraction(
    policy: str, baseline: str = "fcfs", oracle: str = "sjf-oracle"
) -> Statistic:
    """``(baseline - policy) / (baseline - oracle)`` on mean JCT: the share of the oracle's
    gain over the baseline that ``policy`` captures (1: all of it, 0: none, < 0: worse than
    the baseline). Comparable across workloads whose length spread (and so the room for any
    reordering) differs. Undefined (NaN) when the oracle gains nothing."""

    def statistic(values: Mapping[str, np.ndarray]) -> float:
        pooled = _pooled(values)
        base = pooled.mean(baseline)
        room = base - pooled.mean(oracle)
        return (base - pooled.mean(policy)) / room if room > 0 else math.nan

    return statistic


@dataclass(frozen=True)
class SloTargets:
    """The latency SLOs of the throughput search, each on its own statistic's scale: mean JCT
    under ``mean_factor`` x the unloaded mean JCT, p99 JCT under ``p99_factor`` x the unloaded
    p99 JCT (a job's JCT alone on an idle worker, over the workload). With heavy-tailed
    lengths the slowest 1% alone take several times the mean, so a p99 SLO on the mean's
    scale is missed by every policy at almost any load and compares nothing."""

    unloaded_mean_s: float
    unloaded_p99_s: float
    mean_factor: float
    p99_factor: float

    @classmethod
    def from_solo_jcts(
        cls, solo_jcts_s: Sequence[float], mean_factor: float, p99_factor: float
    ) -> SloTargets:
        solo = np.asarray(solo_jcts_s, dtype=float)
        return cls(float(solo.mean()), float(np.percentile(solo, 99)), mean_factor, p99_factor)

    def statistics(self) -> dict[str, tuple[Callable[[np.ndarray], float], float]]:
        """Per statistic name: how to compute it from JCTs, and the limit it must stay under."""
        return {
            "mean": (lambda jct: float(np.mean(jct)), self.mean_factor * self.unloaded_mean_s),
            "p99": (
                lambda jct: float(np.percentile(jct, 99)),
                self.p99_factor * self.unloaded_p99_s,
            ),
        }

    def describe(self) -> dict[str, Any]:
        """The SLOs as a summary records them."""
        limits = {name: limit for name, (_, limit) in self.statistics().items()}
        return {
            "slo": {
                "mean": f"{self.mean_factor:g} x unloaded mean JCT",
                "p99": f"{self.p99_factor:g} x unloaded p99 JCT",
            },
            "slo_s": limits,
            "unloaded_mean_jct_s": self.unloaded_mean_s,
            "unloaded_p99_jct_s": self.unloaded_p99_s,
        }


@dataclass
class SloSearch:
    """The outcome of ``max_rate_under_slo``: the rate found and every rate tried."""

    max_rate: float
    slo: float
    # (rate, statistic) of every evaluation, in the order made.
    evaluations: list[tuple[float, float]] = field(default_factory=list)
    # True when even the lowest rate tried broke the SLO (max_rate is then 0).
    infeasible: bool = False
    # True when the highest rate tried still met it (max_rate is then a lower bound).
    unbounded: bool = False

    def to_dict(self) -> dict[str, object]:
        return {
            "max_rate_rps": self.max_rate,
            "slo_s": self.slo,
            "infeasible": self.infeasible,
            "lower_bound_only": self.unbounded,
            "evaluations": [{"rate_rps": r, "value_s": v} for r, v in self.evaluations],
        }


def max_rate_under_slo(
    evaluate: Callable[[float], float],
    slo: float,
    low: float,
    high: float,
    relative_tolerance: float = 0.02,
    max_evaluations: int = 30,
    max_expansions: int = 6,
) -> SloSearch:
    """The highest arrival rate at which ``evaluate(rate)`` (a latency statistic that grows
    with the rate, e.g. mean or p99 JCT) is at most ``slo``, to ``relative_tolerance``.

    Bisection between a rate that meets the SLO and one that breaks it. ``high`` is doubled
    (at most ``max_expansions`` times) while it still meets the SLO; if ``low`` already
    breaks it, the answer is 0 (``infeasible``). The statistic of a finite run is noisy, so
    give ``evaluate`` common random numbers (the same jobs at every rate, only stretched in
    time) to keep it monotone.
    """
    if not 0 < low < high:
        raise ValueError(f"need 0 < low < high, got low={low}, high={high}")
    search = SloSearch(max_rate=0.0, slo=slo)

    def meets(rate: float) -> bool:
        value = evaluate(rate)
        search.evaluations.append((rate, value))
        return value <= slo

    if not meets(low):
        search.infeasible = True
        return search
    good, bad = low, high
    expansions = 0
    while meets(bad):
        good = bad
        expansions += 1
        if expansions > max_expansions or len(search.evaluations) >= max_evaluations:
            search.max_rate, search.unbounded = good, True
            return search
        bad *= 2
    while bad - good > relative_tolerance * good and len(search.evaluations) < max_evaluations:
        middle = (good + bad) / 2
        if meets(middle):
            good = middle
        else:
            bad = middle
    search.max_rate = good
    return search


def half_width_t(values: Sequence[float], confidence: float = CONFIDENCE) -> float:
    """Half-width of the t-interval of the mean of independent ``values``."""
    from scipy.stats import t

    data = np.asarray(values, dtype=float)
    if len(data) < 2:
        return math.nan
    return float(
        t.ppf(0.5 + confidence / 2, len(data) - 1) * data.std(ddof=1) / math.sqrt(len(data))
    )
