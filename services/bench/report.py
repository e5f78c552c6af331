"""Turning per-job completion times into the numbers, table and plots a person reads.

The same code reports a real run (``ssjf bench``) and a simulated one (``ssjf simulate``), so
their ``summary.json`` files have one schema: a list ``runs``, one object per
(policy, batching, load).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from services.bench import stats
from services.bench.simulator import NO_GUARD_SUFFIX, asynchronous_twin, base_policy
from services.common.machine import describe_machine
from services.common.paths import CHECKOUT_ROOT

POLICY_ORDER = ("fcfs", "ssjf", "hrrn", "sjf-prompt", "sjf-oracle")
BASELINE, ORACLE = "fcfs", "sjf-oracle"
BATCHING_ORDER = ("none", "dynamic", "continuous")
# The paper's headline (Qiu et al., AIOps'24, arXiv:2404.08509), against FCFS.
PAPER = {
    "mean_jct_reduction": "30.5-39.6%",
    "throughput_gain": "2.2-3.6x",
    "source": "Qiu et al., AIOps'24, arXiv:2404.08509, abstract",
}
# The product's targets at about 90% load (BRIEF.md).
TARGETS = {
    "ssjf_over_fcfs_mean_jct": 0.62,
    "ssjf_over_oracle_mean_jct": 1.10,
    "ssjf_over_fcfs_p99_jct": 1.5,
}


def summarize(
    jct_s: Sequence[float],
    ttft_s: Sequence[float],
    span_s: float,
    failed: int = 0,
    queue_wait_s: Sequence[float] = (),
) -> dict[str, float | int]:
    """Completion-time statistics of one run's finished jobs.

    ``span_s`` is the run's length, first arrival to last completion; throughput is completed
    jobs per second of it.
    """
    jct = np.asarray(jct_s, dtype=float)
    ttft = np.asarray(ttft_s, dtype=float)
    if len(jct) == 0:
        return {"completed": 0, "failed": failed}
    waits = np.asarray(queue_wait_s, dtype=float)
    waits = waits[~np.isnan(waits)]
    return {
        **(
            {
                "max_queue_wait_s": float(waits.max()),
                "p99_queue_wait_s": float(np.percentile(waits, 99)),
            }
            if len(waits)
            else {}
        ),
        "completed": len(jct),
        "failed": failed,
        "mean_jct_s": float(jct.mean()),
        "p50_jct_s": float(np.percentile(jct, 50)),
        "p90_jct_s": float(np.percentile(jct, 90)),
        "p99_jct_s": float(np.percentile(jct, 99)),
        "max_jct_s": float(jct.max()),
        "mean_ttft_s": float(np.nanmean(ttft)) if len(ttft) else float("nan"),
        "p99_ttft_s": float(np.nanpercentile(ttft, 99)) if len(ttft) else float("nan"),
        "throughput_rps": len(jct) / span_s if span_s > 0 else float("nan"),
    }


def _policy_rank(policy: str) -> tuple[int, int, str]:
    """Policies in POLICY_ORDER, guard variants (``ssjf:guard=10``) right after theirs."""
    name = policy.split(":")[0]
    base = POLICY_ORDER.index(name) if name in POLICY_ORDER else 99
    return (base, 0 if name == policy else 1, policy)


def _sort_key(run: dict[str, Any]) -> tuple[int, float, tuple[int, int, str]]:
    batching = run["batching"]
    policy = run["policy"]
    return (
        BATCHING_ORDER.index(batching) if batching in BATCHING_ORDER else 99,
        float(run["load"]),
        _policy_rank(policy),
    )


Rounds = Sequence[Mapping[str, Sequence[float]]]


def interval_comparisons(
    points: Mapping[tuple[str, float], Rounds],
    resamples: int = stats.BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """For each (batching, load): every policy's mean and p99 JCT relative to FCFS and its
    fraction of the oracle's gain, each with a 95% paired block-bootstrap interval.

    ``points`` maps (batching, load) to its rounds: per round, each policy's per-job JCTs in
    arrival order (the same jobs for every policy; NaN for a failed job).
    """
    rows = []
    for (batching, load), rounds in sorted(
        points.items(),
        key=lambda item: _sort_key(
            {"batching": item[0][0], "load": item[0][1], "policy": BASELINE}
        ),
    ):
        present = list(rounds[0])
        if BASELINE not in present:
            continue
        statistics: dict[str, stats.Statistic] = {}
        for policy in present:
            if policy == BASELINE:
                continue
            statistics[f"{policy}|mean"] = stats.mean_ratio(policy, BASELINE)
            statistics[f"{policy}|p99"] = stats.quantile_ratio(policy, BASELINE, 99)
            if ORACLE in present and policy != ORACLE:
                statistics[f"{policy}|gain"] = stats.oracle_gain_fraction(policy, BASELINE, ORACLE)
            unguarded = f"{base_policy(policy)}{NO_GUARD_SUFFIX}"
            if policy != unguarded and unguarded in present:
                # What a guard or an aging rate costs: the share of the unguarded policy's
                # gain over FCFS it keeps (the starvation goal: at least three quarters).
                statistics[f"{policy}|kept"] = stats.oracle_gain_fraction(
                    policy, BASELINE, unguarded
                )
            twin = asynchronous_twin(policy)
            if twin != policy and twin in present:
                # The asynchronous submit path against the same policy waiting for every
                # prediction, paired job by job (< 1: async is faster).
                statistics[f"{policy}|async"] = stats.mean_ratio(twin, policy)
        unit = stats.bootstrap_unit(len(rounds))
        intervals = stats.paired_bootstrap(
            rounds, statistics, resamples=resamples, seed=seed, unit=unit
        )
        row: dict[str, Any] = {
            "batching": batching,
            "load": load,
            "rounds": len(rounds),
            "jobs_per_policy": int(sum(len(r[BASELINE]) for r in rounds)),
            "interval": (
                "95% paired bootstrap over whole rounds"
                if unit == "rounds"
                else "95% paired moving-block bootstrap over jobs within rounds"
            )
            + f", {resamples} resamples",
            "policies": {},
        }
        for key, interval in intervals.items():
            policy, what = key.split("|")
            name = {
                "mean": "mean_jct_over_fcfs",
                "p99": "p99_jct_over_fcfs",
                "gain": "oracle_gain_fraction",
                "async": "async_twin_mean_jct_over_this",
                "kept": "unguarded_gain_kept",
            }[what]
            row["policies"].setdefault(policy, {})[name] = interval.to_dict()
        if "ssjf" in row["policies"]:
            ssjf = row["policies"]["ssjf"]
            row["ssjf_over_fcfs_mean_jct"] = ssjf["mean_jct_over_fcfs"]["value"]
            row["ssjf_over_fcfs_p99_jct"] = ssjf["p99_jct_over_fcfs"]["value"]
            row["mean_jct_reduction_pct"] = 100 * (1 - row["ssjf_over_fcfs_mean_jct"])
            if "oracle_gain_fraction" in ssjf:
                row["ssjf_oracle_gain_fraction"] = ssjf["oracle_gain_fraction"]["value"]
        rows.append(row)
    return rows


def format_intervals(rows: Sequence[dict[str, Any]]) -> str:
    """The interval comparisons as a table: one line per (batching, load, policy)."""
    header = (
        f"{'batching':<10} {'load':>5} {'policy':<13} {'jobs':>6} "
        f"{'mean/FCFS [95% CI]':>22} {'p99/FCFS [95% CI]':>22} {'oracle gain [95% CI]':>24}"
    )
    lines = [header, "-" * len(header)]

    def cell(entry: dict[str, float] | None, width: int) -> str:
        if not entry:
            return f"{'-':>{width}}"
        text = f"{entry['value']:.2f} [{entry['ci_low']:.2f}, {entry['ci_high']:.2f}]"
        return f"{text:>{width}}"

    for row in rows:
        for policy in sorted(row["policies"], key=_policy_rank):
            entry = row["policies"][policy]
            lines.append(
                f"{row['batching']:<10} {row['load']:>5.2f} {policy:<13} "
                f"{row['jobs_per_policy']:>6} {cell(entry.get('mean_jct_over_fcfs'), 22)} "
                f"{cell(entry.get('p99_jct_over_fcfs'), 22)} "
                f"{cell(entry.get('oracle_gain_fraction'), 24)}"
            )
    lines.append(
        "oracle gain = (FCFS - policy) / (FCFS - oracle) on mean JCT: 1 = all of oracle SJF's "
        "gain, 0 = none, < 0 = worse than FCFS"
    )
    for row in rows:
        for policy in sorted(row["policies"], key=_policy_rank):
            kept = row["policies"][policy].get("unguarded_gain_kept")
            if kept:
                lines.append(
                    f"{row['batching']:<10} {row['load']:>5.2f} {policy} keeps "
                    f"{cell(kept, 0).strip()} of {base_policy(policy)}{NO_GUARD_SUFFIX}'s "
                    "mean-JCT gain over FCFS"
                )
    for row in rows:
        for policy, entry in row["policies"].items():
            twin = entry.get("async_twin_mean_jct_over_this")
            if twin:
                lines.append(
                    f"{row['batching']:<10} {row['load']:>5.2f} mean JCT of "
                    f"{asynchronous_twin(policy)} (prediction asynchronous) / {policy}: "
                    f"{cell(twin, 0).strip()}"
                )
    return "\n".join(lines)


def format_starvation(runs: Sequence[dict[str, Any]]) -> str:
    """Tails and the longest wait per policy, at each batching mode's highest load."""
    header = (
        f"{'batching':<10} {'load':>5} {'policy':<13} {'mean JCT':>9} {'p99 JCT':>9} "
        f"{'max JCT':>9} {'max wait':>9} {'p99/FCFS':>8}"
    )
    lines = [header, "-" * len(header)]
    for batching in BATCHING_ORDER:
        here = [r for r in runs if r["batching"] == batching and "mean_jct_s" in r]
        if not here:
            continue
        load = max(float(r["load"]) for r in here)
        at_load = sorted((r for r in here if float(r["load"]) == load), key=_sort_key)
        fcfs = next((r for r in at_load if r["policy"] == BASELINE), None)
        for run in at_load:
            ratio = run["p99_jct_s"] / fcfs["p99_jct_s"] if fcfs else float("nan")
            lines.append(
                f"{batching:<10} {load:>5.2f} {run['policy']:<13} {run['mean_jct_s']:>9.3f} "
                f"{run['p99_jct_s']:>9.3f} {run['max_jct_s']:>9.3f} "
                f"{run.get('max_queue_wait_s', float('nan')):>9.3f} {ratio:>8.2f}"
            )
    return "\n".join(lines)


def provenance(predictor_version: str | None) -> dict[str, Any]:
    """What a reader needs to reproduce (or distrust) a result: the exact command, the code's
    commit, the predictor, the machine and how busy it was."""

    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", *args], cwd=CHECKOUT_ROOT, capture_output=True, text=True, timeout=10
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    try:
        load = list(os.getloadavg())
    except OSError:
        load = []
    argv = [Path(sys.argv[0]).name, *sys.argv[1:]] if sys.argv and sys.argv[0] else []
    return {
        "command": shlex.join(argv),
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "predictor_version": predictor_version,
        "machine": {**describe_machine(), "load_average_1_5_15m": load},
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def load_average() -> list[float]:
    try:
        return list(os.getloadavg())
    except OSError:
        return []


def comparisons(runs: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each (batching, load): SSJF's mean and p99 JCT relative to FCFS and to the oracle."""
    by_key: dict[tuple[str, float], dict[str, dict[str, Any]]] = {}
    for run in runs:
        by_key.setdefault((run["batching"], float(run["load"])), {})[run["policy"]] = run
    rows = []
    for (batching, load), group in sorted(
        by_key.items(),
        key=lambda item: _sort_key({"batching": item[0][0], "load": item[0][1], "policy": "fcfs"}),
    ):
        ssjf, fcfs, oracle = group.get("ssjf"), group.get("fcfs"), group.get("sjf-oracle")
        if ssjf is None or "mean_jct_s" not in ssjf:
            continue
        row: dict[str, Any] = {"batching": batching, "load": load}
        if fcfs and "mean_jct_s" in fcfs:
            row["ssjf_over_fcfs_mean_jct"] = ssjf["mean_jct_s"] / fcfs["mean_jct_s"]
            row["ssjf_over_fcfs_p99_jct"] = ssjf["p99_jct_s"] / fcfs["p99_jct_s"]
            row["mean_jct_reduction_pct"] = 100 * (1 - row["ssjf_over_fcfs_mean_jct"])
            row["ssjf_over_fcfs_throughput"] = ssjf["throughput_rps"] / fcfs["throughput_rps"]
        if oracle and "mean_jct_s" in oracle:
            row["ssjf_over_oracle_mean_jct"] = ssjf["mean_jct_s"] / oracle["mean_jct_s"]
        rows.append(row)
    return rows


def format_table(runs: Sequence[dict[str, Any]]) -> str:
    """A fixed-width table, one line per run, sorted by batching, load, policy."""
    # (title, key, width, number format or None for text)
    columns = [
        ("batching", "batching", 10, None),
        ("load", "load", 5, ".2f"),
        ("policy", "policy", 13, None),
        ("done", "completed", 5, "d"),
        ("mean JCT", "mean_jct_s", 9, ".3f"),
        ("p50 JCT", "p50_jct_s", 8, ".3f"),
        ("p99 JCT", "p99_jct_s", 8, ".3f"),
        ("TTFT", "mean_ttft_s", 7, ".3f"),
        ("req/s", "throughput_rps", 6, ".2f"),
        ("util", "realized_utilization", 5, ".2f"),
        ("sim JCT", "simulated_mean_jct_s", 8, ".3f"),
    ]
    shown = [column for column in columns if any(column[1] in run for run in runs)]

    def cell(value: object, width: int, fmt: str | None) -> str:
        if fmt is None:
            return f"{value!s:<{width}}"
        return f"{value:>{width}{fmt}}" if value is not None else f"{'-':>{width}}"

    header = " ".join(
        f"{title:<{width}}" if fmt is None else f"{title:>{width}}"
        for title, _, width, fmt in shown
    )
    lines = [header, "-" * len(header)]
    for run in sorted(runs, key=_sort_key):
        lines.append(" ".join(cell(run.get(key), width, fmt) for _, key, width, fmt in shown))
    compare = comparisons(runs)
    if compare:
        lines += ["", "SSJF relative to FCFS and to oracle SJF (lower is better):"]
        for row in compare:
            parts = [f"  {row['batching']:<10} load {row['load']:.2f}:"]
            if "ssjf_over_fcfs_mean_jct" in row:
                parts.append(
                    f"mean JCT x{row['ssjf_over_fcfs_mean_jct']:.2f} of FCFS "
                    f"({_lower_or_higher(row['mean_jct_reduction_pct'])}), "
                    f"p99 x{row['ssjf_over_fcfs_p99_jct']:.2f}"
                )
            if "ssjf_over_oracle_mean_jct" in row:
                parts.append(f"x{row['ssjf_over_oracle_mean_jct']:.2f} of oracle")
            lines.append(" ".join(parts))
        lines.append(
            f"  paper: mean JCT {PAPER['mean_jct_reduction']} lower, throughput "
            f"{PAPER['throughput_gain']} ({PAPER['source']})"
        )
    return "\n".join(lines)


def format_validation(runs: Sequence[dict[str, Any]]) -> str:
    """Measured against simulated mean JCT, run by run, with the simulator's error."""
    lines = [
        f"{'batching':<10} {'load':>5} {'policy':<10} {'measured':>9} {'simulated':>9} "
        f"{'error':>7} {'speed':>6}",
    ]
    lines.append("-" * len(lines[0]))
    errors = []
    for run in sorted(runs, key=_sort_key):
        if "simulated_mean_jct_s" not in run:
            continue
        errors.append(abs(run["simulated_error_pct"]))
        lines.append(
            f"{run['batching']:<10} {run['load']:>5.2f} {run['policy']:<10} "
            f"{run['mean_jct_s']:>9.3f} {run['simulated_mean_jct_s']:>9.3f} "
            f"{run['simulated_error_pct']:>+6.1f}% {run['run_level_factor']:>6.2f}"
        )
    if errors:
        within = sum(error <= 10 for error in errors)
        lines.append(
            f"simulated mean JCT within 10% of measured in {within}/{len(errors)} runs; "
            f"median |error| {float(np.median(errors)):.1f}% (speed: the run's worker cost "
            "relative to the calibrated model)"
        )
    return "\n".join(lines)


def _lower_or_higher(reduction_pct: float) -> str:
    return f"{abs(reduction_pct):.1f}% {'lower' if reduction_pct >= 0 else 'higher'}"


def write_summary(
    out_dir: Path,
    runs: Sequence[dict[str, Any]],
    meta: dict[str, Any],
    compared: list[dict[str, Any]] | None = None,
) -> Path:
    """``summary.json``: the runs (sorted), the policies' ratios to FCFS (with intervals when
    ``compared`` is given), the paper's numbers, and ``meta``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "summary.json"
    summary = {
        **meta,
        "runs": sorted(runs, key=_sort_key),
        "comparisons": compared if compared is not None else comparisons(runs),
        "paper": PAPER,
        "targets": TARGETS,
    }
    path.write_text(json.dumps(summary, indent=2, default=_jsonable) + "\n")
    return path


def _jsonable(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def plot_jct_cdf(
    jcts: dict[tuple[str, str, float], Sequence[float]], path: Path, title: str
) -> Path:
    """One panel per batching mode at its highest load; one CDF line per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batchings = [b for b in BATCHING_ORDER if any(key[1] == b for key in jcts)]
    figure, axes = plt.subplots(1, len(batchings), figsize=(5 * len(batchings), 4), squeeze=False)
    for axis, batching in zip(axes[0], batchings, strict=True):
        load = max(key[2] for key in jcts if key[1] == batching)
        for policy in sorted({key[0] for key in jcts}, key=_policy_rank):
            values = jcts.get((policy, batching, load))
            if values is None or len(values) == 0:
                continue
            ordered = np.sort(np.asarray(values, dtype=float))
            fractions = np.arange(1, len(ordered) + 1) / len(ordered)
            axis.step(
                ordered, fractions, where="post", label=f"{policy} (mean {ordered.mean():.2f}s)"
            )
        axis.set_xscale("log")
        axis.set_title(f"batching={batching}, load={load:.2f}")
        axis.set_xlabel("job completion time (s, log scale)")
        axis.set_ylabel("fraction of jobs")
        axis.grid(True, alpha=0.3)
        axis.legend(loc="lower right")
    return _save(figure, title, path)


def plot_mean_jct_vs_load(runs: Sequence[dict[str, Any]], path: Path, title: str) -> Path:
    """One panel per batching mode; mean JCT against load, one line per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batchings = [b for b in BATCHING_ORDER if any(run["batching"] == b for run in runs)]
    figure, axes = plt.subplots(1, len(batchings), figsize=(5 * len(batchings), 4), squeeze=False)
    for axis, batching in zip(axes[0], batchings, strict=True):
        for policy in sorted({run["policy"] for run in runs}, key=_policy_rank):
            points = sorted(
                (float(run["load"]), run["mean_jct_s"])
                for run in runs
                if run["batching"] == batching and run["policy"] == policy and "mean_jct_s" in run
            )
            if points:
                loads, means = zip(*points, strict=True)
                axis.plot(loads, means, marker="o", label=policy)
        axis.set_title(f"batching={batching}")
        axis.set_xlabel("load (arrival rate / FCFS capacity)")
        axis.set_ylabel("mean job completion time (s)")
        axis.grid(True, alpha=0.3)
        axis.legend(loc="upper left")
    return _save(figure, title, path)


def _save(figure: Any, title: str, path: Path) -> Path:
    figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(figure)
    return path


def plot_ratios(rows: Sequence[dict[str, Any]], path: Path, title: str) -> Path:
    """Top row: each policy's mean JCT / FCFS against load; bottom row: its fraction of the
    oracle's gain; 95% intervals as error bars; one column per batching mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batchings = [b for b in BATCHING_ORDER if any(row["batching"] == b for row in rows)]
    figure, axes = plt.subplots(
        2, len(batchings), figsize=(5 * len(batchings), 7), squeeze=False, sharex=True
    )
    panels = (("mean_jct_over_fcfs", "mean JCT / FCFS"), ("oracle_gain_fraction", "oracle gain"))
    for column, batching in enumerate(batchings):
        here = sorted((r for r in rows if r["batching"] == batching), key=lambda r: r["load"])
        policies = sorted({p for r in here for p in r["policies"]}, key=_policy_rank)
        for row_index, (key, label) in enumerate(panels):
            axis = axes[row_index][column]
            for offset, policy in enumerate(policies):
                points = [
                    (r["load"], r["policies"][policy][key])
                    for r in here
                    if key in r["policies"].get(policy, {})
                ]
                if not points:
                    continue
                loads = np.array([load for load, _ in points]) + 0.004 * offset
                values = np.array([entry["value"] for _, entry in points])
                low = values - np.array([entry["ci_low"] for _, entry in points])
                high = np.array([entry["ci_high"] for _, entry in points]) - values
                axis.errorbar(loads, values, yerr=[low, high], marker="o", capsize=3, label=policy)
            axis.axhline(1.0 if key == "mean_jct_over_fcfs" else 0.0, color="grey", lw=0.8)
            if key == "oracle_gain_fraction":
                axis.axhline(1.0, color="grey", lw=0.8, ls="--")
            axis.set_title(f"batching={batching}")
            axis.set_ylabel(label)
            axis.grid(True, alpha=0.3)
            if row_index == 1:
                axis.set_xlabel("target load")
        axes[0][column].legend(loc="lower left", fontsize=8)
    return _save(figure, title, path)
