"""``ssjf bench`` (the policy grid on the real stack) and ``ssjf simulate`` (the same grid in
a discrete-event simulator, at scales this machine cannot serve)."""

from __future__ import annotations

import argparse
from pathlib import Path

from services.bench.simulator import known_policy
from services.common.config import add_flag, add_option, milliseconds
from services.common.paths import SHARED_DATA_DIR

# The scheduler's policy registry and the worker's modes: a new one is benchmarked as is.
from services.scheduler.policies import POLICIES as SCHEDULER_POLICIES
from services.worker.cli import BATCHING_MODES

POLICIES = list(SCHEDULER_POLICIES)
# The simulator also serves policies no static score can express (HRRN).
SIMULATED_POLICIES = [*POLICIES, "hrrn"]
# What `ssjf bench` / `ssjf simulate` run when --policies is not given.
DEFAULT_POLICIES = ["fcfs", "ssjf", "sjf-prompt", "sjf-oracle"]
BATCHINGS = BATCHING_MODES
ARRIVALS = ["poisson", "azure-conversation", "azure-code"]
LENGTHS = ["alpaca", "azure-conversation", "azure-code"]


def _names(allowed: list[str]):
    """A comma-separated list of ``allowed`` names."""

    def parse(text: str) -> list[str]:
        names = [name.strip() for name in text.split(",") if name.strip()]
        unknown = [name for name in names if name not in allowed]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"unknown {', '.join(unknown) or 'empty list'}; choose from {', '.join(allowed)}"
            )
        return names

    return parse


def _policies(simulated: bool):
    """A comma-separated list of grid entries: policies, each optionally ``:noguard`` or
    ``:guard=SECONDS``, ``:aging=RATE``."""
    allowed = SIMULATED_POLICIES if simulated else POLICIES

    def parse(text: str) -> list[str]:
        names = [name.strip() for name in text.split(",") if name.strip()]
        unknown = [name for name in names if not known_policy(name, simulated)]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"unknown {', '.join(unknown) or 'empty list'}; choose from {', '.join(allowed)}, "
                "each optionally with :noguard or :guard=SECONDS, :aging=RATE (and, on the "
                "real stack, :sync)"
            )
        if len(set(names)) != len(names):
            raise argparse.ArgumentTypeError(f"a policy is listed twice in {text!r}")
        return names

    return parse


def _number_list(convert: type, example: str):
    """A comma-separated list of positive numbers (``convert``: float or int)."""

    def parse(text: str) -> list:
        try:
            values = [convert(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected numbers, got {text!r}") from None
        if not values or any(value <= 0 for value in values):
            raise argparse.ArgumentTypeError(f"expected positive numbers, e.g. {example}")
        return values

    return parse


_loads = _number_list(float, "0.5,0.9")
_positive_ints = _number_list(int, "500,1000,2000")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {value}")
    return value


def _add_workload_options(
    parser: argparse.ArgumentParser, out_default: str, simulated: bool
) -> None:
    add_option(
        parser,
        "--out",
        type=Path,
        default=Path(out_default),
        help="directory for summary.json, per-job files and plots",
    )
    add_option(
        parser,
        "--policies",
        type=_policies(simulated),
        default=DEFAULT_POLICIES,
        help="comma-separated scheduling policies, of "
        f"{', '.join(SIMULATED_POLICIES if simulated else POLICIES)}; NAME:noguard runs "
        "NAME without the starvation guard, NAME:guard=SECONDS with its own (e.g. "
        "ssjf:noguard,ssjf:guard=10 side by side), NAME:aging=RATE with its own aging rate "
        "(tokens of credit per second waited, at most 10); on the real stack NAME:sync makes every "
        "job wait for its prediction before it is queued (--prediction-mode sync)",
    )
    add_option(
        parser,
        "--batching",
        type=_names(BATCHINGS),
        default=BATCHINGS,
        help="comma-separated worker batching modes",
    )
    add_option(
        parser,
        "--loads",
        type=_loads,
        default=[0.5, 0.9],
        help="comma-separated loads: arrival rate / FCFS capacity of the batching mode",
    )
    add_option(
        parser,
        "--llm",
        default="vicuna-13b",
        help="LLM whose real answer lengths are replayed (and served as); several, "
        "comma-separated, make a mixed stream (one queue per LLM, requests split equally)",
    )
    add_option(
        parser,
        "--lengths",
        default="alpaca",
        choices=LENGTHS,
        help="alpaca: the LLM's real AlpacaEval answer lengths; azure-*: the same prompts, "
        "lengths mapped by quantile onto that Azure trace's GeneratedTokens distribution",
    )
    add_option(
        parser,
        "--resamples",
        type=int,
        default=1000,
        help="bootstrap resamples behind every 95%% interval",
    )
    add_option(
        parser,
        "--slo-factor",
        type=float,
        default=5.0,
        help="mean-JCT SLO of the throughput search: this many times the unloaded mean JCT",
    )
    add_option(
        parser,
        "--p99-slo-factor",
        type=float,
        default=3.0,
        help="p99-JCT SLO of the throughput search: this many times the unloaded p99 JCT "
        "(a job's JCT alone on an idle worker, 99th percentile over the workload)",
    )
    add_option(
        parser,
        "--length-scale",
        type=float,
        default=16.0,
        help="replayed length = the LLM's real length / this (at least 1 token)",
    )
    add_option(parser, "--max-batch-size", type=int, default=4, help="sequences per batch")
    add_option(
        parser,
        "--arrivals",
        default="poisson",
        choices=ARRIVALS,
        help="arrival process: Poisson, or an Azure trace's timestamps rescaled",
    )
    add_option(parser, "--seed", type=int, default=0, help="seed of prompts and arrivals")
    add_option(
        parser,
        "--aging-rate",
        type=float,
        default=0.0,
        help="scheduler aging, predicted tokens per second waited",
    )
    add_option(
        parser,
        "--max-wait-s",
        type=float,
        default=0.0,
        help="starvation guard: a job waiting longer goes first (0: off)",
    )
    add_option(
        parser,
        "--data",
        type=Path,
        default=SHARED_DATA_DIR if SHARED_DATA_DIR.is_dir() else None,
        help="shared data directory (alpaca_eval/, azure_llm_2023/); unset: the "
        "slices vendored in bench/workloads",
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser(
        "bench",
        help="measure FCFS vs SSJF vs oracle SJF on the real stack",
        description=(
            "Replay AlpacaEval prompts with one LLM's real answer lengths against the real "
            "stack, open loop (Poisson or Azure-trace arrivals at a target load), for each "
            "policy, batching mode and load. Starts a stack per (policy, batching) unless "
            "--server is given. Writes summary.json, per-job JSONL and PNG plots to --out."
        ),
    )
    _add_workload_options(bench, "bench/results", simulated=False)
    add_option(bench, "--requests", type=int, default=150, help="requests per run")
    add_option(
        bench,
        "--duration-s",
        type=float,
        help="instead of --requests: each run sends this many seconds of arrivals",
    )
    add_option(
        bench,
        "--rounds",
        type=int,
        default=1,
        help="split each run into this many rounds (seeds seed, seed+1, ...), the policies "
        "taking turns round by round (reversed every other round), so a shared machine's "
        "drift hits all alike",
    )
    add_option(bench, "--workers", type=int, default=1, help="worker processes per stack")
    add_option(
        bench,
        "--saturation-jobs",
        type=_positive_int,
        default=40,
        help="workload jobs sent at once to measure the worker's speed under load (each "
        "calibration); more jobs measure the capacity, and so the load, more precisely",
    )
    add_option(
        bench,
        "--recalibrate",
        default="round",
        choices=["round", "pooled", "once"],
        help="round: re-measure the worker's speed under load before every round and set "
        "that round's arrival rate from it (holds the load while the machine drifts); "
        "pooled: re-measure every round but set the rate from the lower median of all "
        "measurements so far (damps a noisy measurement; where the machine's speed really "
        "moves, as on a shared 2-core host, use round); once: one calibration per batching "
        "mode",
    )
    add_flag(
        bench,
        "--slo-search",
        help="instead of the load grid: per policy, search the highest arrival rate whose "
        "mean JCT stays under --slo-factor x the unloaded mean JCT, and p99 JCT under "
        "--p99-slo-factor x the unloaded p99 JCT (real stack; "
        "slow: several runs per policy)",
    )
    add_option(
        bench,
        "--server",
        help="scheduler HOST:PORT of a running stack (one policy and batching mode, "
        "which must match --policies/--batching); unset: start stacks",
    )
    add_option(bench, "--timeout-s", type=float, default=600.0, help="per-request timeout")
    add_option(
        bench,
        "--generation",
        default="replay",
        choices=["replay", "real"],
        help="replay: workers generate exactly the replayed lengths; real: smollm2-135m-instruct "
        "answers each prompt to EOS, greedy (sets --llm smollm2-135m-instruct and "
        "--length-scale 1; oracle SJF gets the greedy lengths of --labels)",
    )
    add_option(
        bench,
        "--labels",
        type=Path,
        help="with --generation real: a greedy ssjf collect directory (default: "
        "data/smollm2-135m-instruct/alpaca_eval-greedy)",
    )
    bench.add_argument(
        "--export-workload",
        action="store_true",
        help="write --llm's held-out prompts and lengths from --data to "
        "bench/workloads/alpaca_<llm>.jsonl (the vendored slice) and exit",
    )
    bench.set_defaults(run=_run_bench)

    simulate = subparsers.add_parser(
        "simulate",
        help="the same grid in a discrete-event simulator (many workers, millions of jobs)",
        description=(
            "Simulate the scheduler's own queue and policies with workers following the "
            "latency model ssjf bench fitted to the real worker. SSJF's scores are the proxy "
            "model's predictions (its ONNX artifact) or noisy true lengths."
        ),
    )
    _add_workload_options(simulate, "bench/results/simulated", simulated=True)
    add_option(simulate, "--requests", type=int, default=100_000, help="jobs per point")
    add_option(
        simulate,
        "--rounds",
        type=int,
        default=10,
        help="independent job streams per point (seeds seed, seed+1, ...), requests split "
        "equally; the intervals resample within each",
    )
    add_flag(
        simulate,
        "--slo-search",
        help="also find each policy's highest arrival rate under the latency SLO",
    )
    add_option(
        simulate,
        "--slo-requests",
        type=int,
        default=20_000,
        help="jobs per evaluation of the SLO search",
    )
    add_option(
        simulate, "--slo-seeds", type=int, default=3, help="job streams the SLO search repeats on"
    )
    add_option(
        simulate,
        "--size-study",
        type=_positive_ints,
        help="instead of the grid: for these jobs-per-point counts, the 95%% half-width of "
        "SSJF/FCFS at load 0.9 (over replications, and the bootstrap's); writes "
        "sizing.json to --out",
    )
    add_option(simulate, "--workers", type=int, default=1, help="simulated workers")
    add_option(
        simulate,
        "--latency-dir",
        type=Path,
        default=Path("bench/results"),
        help="directory with latency_<batching>.json from ssjf bench (falls back to "
        "the models shipped in bench/workloads)",
    )
    add_option(
        simulate,
        "--predictor-artifact",
        type=Path,
        help="proxy model artifact scoring SSJF (default: the predictor's default artifact)",
    )
    add_option(
        simulate,
        "--prediction-noise",
        type=float,
        default=0.0,
        help="> 0: score SSJF by true length x exp(N(0, this)) instead of the proxy model",
    )
    add_option(
        simulate,
        "--prediction-cpu-ms",
        type=milliseconds,
        default=0.0,
        help="CPU milliseconds each SSJF (and HRRN) prediction takes from the workers, as "
        "when the predictor shares their host (about 5 ms per job on the 2-core reference "
        "machine: predictor and scheduler, docs/bench.md); 0: the predictor has CPU of its own",
    )
    add_option(
        simulate,
        "--validate",
        type=Path,
        help="instead of the grid: replay every run of this ssjf bench output (e.g. "
        "bench/results) in the simulator and compare mean JCT with the measured one",
    )
    simulate.set_defaults(run=_run_simulate)


def exit_on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM unwinds like Ctrl-C, so the stacks this command started are stopped, not
    orphaned. Later SIGTERMs are ignored: a second one (a supervisor repeating itself)
    would otherwise interrupt that cleanup half way and orphan the rest."""
    import signal
    import sys

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(143)


def _run_bench(args: argparse.Namespace) -> int:
    import signal

    from services.bench import report
    from services.bench.runner import BenchConfig, run_bench

    signal.signal(signal.SIGTERM, exit_on_sigterm)

    if args.export_workload:
        return _export_workload(args)
    if args.server and (len(args.policies) > 1 or len(args.batching) > 1):
        print("--server runs one stack: give exactly one --policies and one --batching")
        return 2
    from services.bench.realgen import REAL_MODEL

    real = args.generation == "real"
    config = BenchConfig(
        out_dir=args.out,
        policies=args.policies,
        batchings=args.batching,
        loads=args.loads,
        requests=args.requests,
        duration_s=args.duration_s,
        rounds=args.rounds,
        length_scale=1.0 if real else args.length_scale,
        llm=REAL_MODEL if real else args.llm,
        lengths=args.lengths,
        generation=args.generation,
        labels=args.labels,
        model=REAL_MODEL if real else "tiny-llama",
        max_batch_size=args.max_batch_size,
        workers=args.workers,
        saturation_jobs=args.saturation_jobs,
        recalibrate=args.recalibrate,
        resamples=args.resamples,
        slo_search=args.slo_search,
        slo_factor=args.slo_factor,
        p99_slo_factor=args.p99_slo_factor,
        arrivals=args.arrivals,
        seed=args.seed,
        aging_rate=args.aging_rate,
        max_wait_s=args.max_wait_s,
        data_dir=args.data,
        server=args.server,
        timeout_s=args.timeout_s,
    )
    if config.slo_search:
        from services.bench.runner import run_slo_search
        from services.bench.simulate import format_slo

        result = run_slo_search(config)
        print(format_slo(result["slo_throughput"]))
        print(f"\nwrote {args.out}/summary.json")
        return 0
    result = run_bench(config)
    print(report.format_table(result["runs"]))
    print("\nEvery policy against FCFS, 95% intervals:")
    print(report.format_intervals(result["comparisons"]))
    print("\nStarvation: tails and the longest queue wait at the highest load:")
    print(report.format_starvation(result["runs"]))
    print("\nThe simulator replaying each run (ssjf simulate --validate):")
    print(report.format_validation(result["runs"]))
    print(f"\nwrote {args.out}/summary.json, jct_cdf.png, mean_jct_vs_load.png, ratios.png")
    return 0 if all(run.get("failed", 0) == 0 for run in result["runs"]) else 1


def _export_workload(args: argparse.Namespace) -> int:
    from services.bench.workload import load_from_data, vendored_workload_path, write_workload_slice

    if args.data is None:
        print("--export-workload needs --data (the shared data directory)")
        return 2
    path = vendored_workload_path(args.llm)
    items = load_from_data(args.data, args.llm)
    write_workload_slice(items, path)
    print(f"wrote {len(items)} prompts with {args.llm}'s lengths to {path}")
    return 0


def _run_simulate(args: argparse.Namespace) -> int:
    from services.bench import report
    from services.bench.simulate import SimulateConfig, run_simulations

    if args.validate is not None:
        from services.bench.runner import revalidate

        print(report.format_validation(revalidate(args.validate)))
        print(f"\nupdated {args.validate}/summary.json")
        return 0

    config = SimulateConfig(
        out_dir=args.out,
        policies=args.policies,
        batchings=args.batching,
        loads=args.loads,
        requests=args.requests,
        rounds=args.rounds,
        workers=args.workers,
        max_batch_size=args.max_batch_size,
        length_scale=args.length_scale,
        llm=args.llm,
        lengths=args.lengths,
        latency_dir=args.latency_dir,
        predictor_artifact=args.predictor_artifact,
        prediction_noise=args.prediction_noise,
        prediction_cpu_ms=args.prediction_cpu_ms,
        arrivals=args.arrivals,
        seed=args.seed,
        aging_rate=args.aging_rate,
        max_wait_s=args.max_wait_s,
        data_dir=args.data,
        resamples=args.resamples,
        slo_search=args.slo_search,
        slo_factor=args.slo_factor,
        p99_slo_factor=args.p99_slo_factor,
        slo_requests=args.slo_requests,
        slo_seeds=args.slo_seeds,
    )
    if args.size_study:
        import json

        from services.bench.simulate import size_study

        study = size_study(config, args.size_study)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "sizing.json").write_text(json.dumps(study, indent=2, default=str) + "\n")
        print(f"wrote {args.out}/sizing.json")
        return 0
    result = run_simulations(config)
    print(report.format_table(result["runs"]))
    print("\nEvery policy against FCFS, 95% intervals:")
    print(report.format_intervals(result["comparisons"]))
    print("\nStarvation: tails and the longest queue wait at the highest load:")
    print(report.format_starvation(result["runs"]))
    if result["slo_throughput"]:
        from services.bench.simulate import format_slo

        print("\nThroughput at the latency SLO:")
        print(format_slo(result["slo_throughput"]))
    print("\nThroughput with every job queued at once (jobs/s):")
    for batching, by_policy in result["saturated_throughput_rps"].items():
        cells = ", ".join(f"{policy} {rps:.2f}" for policy, rps in by_policy.items())
        print(f"  {batching:<10} {cells}")
    print(f"\nSSJF scores: {result['ssjf_scores']}")
    print(f"wrote {args.out}/summary.json, jct_cdf.png, mean_jct_vs_load.png, ratios.png")
    return 0
