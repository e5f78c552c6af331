"""Predictor sub-commands: predictor (the service), predict, train-predictor, train-probe,
eval-predictor."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from services.common.config import add_flag, add_option, add_server_options
from services.common.paths import default_labels, label_dirs, probe_default_labels, ssjf_home

PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_ARTIFACT = PACKAGE_DIR / "artifacts" / "default"
DEFAULT_FORMULATION = "regression-mse"  # best dev Kendall tau of the four: docs/predictor.md
# Where `ssjf train-probe` writes the probe, and where `ssjf teacher-label` finds it as a teacher.
DEFAULT_PROBE_DIR = ssjf_home() / "predictors" / "llm-probe"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this package's sub-commands."""
    serve = subparsers.add_parser(
        "predictor", help="run the Predictor gRPC service (ONNX Runtime, micro-batching)"
    )
    add_server_options(serve, default_port=50052, what="predictor")
    add_option(serve, "--artifact", default=str(DEFAULT_ARTIFACT), help="artifact directory")
    add_option(
        serve,
        "--max-batch-size",
        default=32,
        type=int,
        help="most prompts run through the model together",
    )
    add_option(
        serve,
        "--max-wait-ms",
        default=2.0,
        type=float,
        help="longest a request waits for others to batch with",
    )
    add_option(
        serve,
        "--max-batch-request",
        default=256,
        type=int,
        help="most prompts one PredictBatch call may carry",
    )
    add_option(
        serve,
        "--cache-size",
        default=10_000,
        type=int,
        help="prompts whose predictions are kept (by prompt hash) and answered without the "
        "model (0: no cache)",
    )
    add_option(
        serve,
        "--threads",
        default=0,
        type=int,
        help="ONNX Runtime intra-op threads (0: number of cores, at most 4)",
    )
    serve.set_defaults(run=_serve)

    predict = subparsers.add_parser(
        "predict",
        help="predict a prompt's output length (via --server, else with the local artifact)",
    )
    predict.add_argument("prompt", help="the prompt text")
    add_option(predict, "--llm", default="", help="serving LLM (empty: the model's default)")
    add_option(
        predict,
        "--server",
        default="",
        help="HOST:PORT of a predictor service; empty runs the artifact in-process",
    )
    add_option(
        predict,
        "--artifact",
        default=str(DEFAULT_ARTIFACT),
        help="artifact directory (without --server)",
    )
    predict.set_defaults(run=_predict)

    train = subparsers.add_parser(
        "train-predictor", help="fine-tune the proxy model and export an ONNX artifact"
    )
    _add_data_options(train)
    add_option(
        train,
        "--formulation",
        default=DEFAULT_FORMULATION,
        choices=["regression-l1", "regression-mse", "classification", "ranking", "listwise"],
        help="learning formulation",
    )
    add_flag(
        train,
        "--compare",
        help="train every formulation into OUT/<formulation> and print their held-out metrics",
    )
    add_option(
        train,
        "--llm",
        default="",
        help="comma-separated LLMs to train heads for "
        "(one: a per-LLM predictor); empty: every LLM in the data (all-LLM)",
    )
    add_option(train, "--epochs", default=4, type=int, help="training epochs")
    add_option(train, "--batch-size", default=32, type=int, help="prompts per step")
    add_option(
        train,
        "--max-prompt-tokens",
        default=256,
        type=int,
        help="training window in word pieces: longer prompts keep their head and tail",
    )
    add_option(
        train,
        "--serve-max-prompt-tokens",
        default=0,
        type=int,
        help="serving window written into the artifact (0: the training window); a model "
        "trained at 256 serves at 128 with the same held-out tau and half the cost of long "
        "prompts (docs/predictor.md)",
    )
    add_option(
        train,
        "--trainable-layers",
        default=2,
        type=int,
        help="top encoder layers fine-tuned (of 6); the rest and the embeddings stay frozen",
    )
    add_option(
        train,
        "--encoder-layers",
        default=6,
        type=int,
        help="keep the encoder's first N of 6 layers (a smaller, faster student; 6: all)",
    )
    add_option(train, "--seed", default=0, type=int, help="random seed (training)")
    add_option(train, "--threads", default=2, type=int, help="torch threads")
    add_option(
        train,
        "--max-train-prompts",
        default=0,
        type=int,
        help="use only this many training prompts (smoke runs; 0: all)",
    )
    add_option(train, "--out", default=str(DEFAULT_ARTIFACT), help="artifact directory to write")
    add_option(train, "--name", default="minilm-length", help="artifact name (in its version)")
    add_flag(
        train,
        "--first-stage-only",
        help="only fit the scheduler's first-stage model (hashed n-gram ridge) into the "
        "existing artifact --out (seconds)",
    )
    add_flag(train, "--fp32", help="ship the fp32 graph instead of int8 dynamic quantization")
    add_flag(
        train,
        "--keep-fp32",
        help="also keep model.fp32.onnx and the PyTorch weights "
        "(for benchmarks; ~90 MB each, never shipped)",
    )
    train.set_defaults(run=_train)

    probe = subparsers.add_parser(
        "train-probe",
        help="fit a linear probe on the served LLM's own hidden state and export it as an "
        "ONNX predictor artifact (fp32: int8 loses the ranking; better than MiniLM out of fold "
        "at ~10x its cost: docs/predictor.md)",
    )
    _add_data_options(
        probe,
        probe_default_labels(),
        "the served model's committed AlpacaEval and Arena labels (the probe keeps its "
        "AlpacaEval tau with the Arena prompts and ranks Arena's far better: docs/predictor.md)",
    )
    add_option(
        probe,
        "--model",
        default="smollm2-135m-instruct",
        help="the served LLM whose states are read (a worker --model name or directory)",
    )
    add_option(
        probe,
        "--layer",
        default=20,
        type=int,
        help="read the state after this decoder layer (1 = the first); the graph runs only "
        "the layers up to it. 20 of SmolLM2's 30: as good as 23 in the cross-validation's "
        "inner choice (docs/predictor.md) and cheaper",
    )
    add_option(
        probe,
        "--max-prompt-tokens",
        default=512,
        type=int,
        help="the user's tokens kept (head and tail) inside the chat template",
    )
    add_option(probe, "--threads", default=2, type=int, help="torch threads")
    add_option(
        probe,
        "--out",
        default=str(DEFAULT_PROBE_DIR),
        help="artifact directory to write (serve it: ssjf predictor --artifact DIR)",
    )
    add_option(probe, "--name", default="llm-probe", help="artifact name (in its version)")
    probe.set_defaults(run=_train_probe)

    teach = subparsers.add_parser(
        "teacher-label",
        help="label a prompt set with a slower, better predictor artifact (the probe) as "
        "training data for MiniLM: ssjf train-predictor --labels DIR (distillation)",
    )
    add_option(
        teach,
        "--teacher",
        default=str(DEFAULT_PROBE_DIR),
        help="the teacher's artifact directory (ssjf train-probe --out)",
    )
    add_option(teach, "--prompts", default="", help="prompts.jsonl to label (prompt_id, prompt)")
    add_option(
        teach,
        "--out",
        default="",
        help="directory written in the ssjf collect format; its name becomes the prompt set's",
    )
    add_option(teach, "--threads", default=2, type=int, help="ONNX Runtime threads")
    teach.set_defaults(run=_teacher_label)

    evaluate = subparsers.add_parser(
        "eval-predictor", help="score an artifact on shared-format prompts and lengths"
    )
    add_option(evaluate, "--prompts", default="", help="prompts.jsonl")
    add_option(evaluate, "--lengths", default="", help="lengths.csv")
    add_option(
        evaluate,
        "--llm",
        default="",
        help="LLM whose lengths are scored (empty: the artifact's default LLM)",
    )
    add_option(evaluate, "--artifact", default=str(DEFAULT_ARTIFACT), help="artifact directory")
    add_flag(evaluate, "--held-out", help="score only the training split's test prompts")
    add_flag(
        evaluate,
        "--by-source",
        help="also print tau per prompt source (the 'source' field of prompts.jsonl)",
    )
    evaluate.set_defaults(run=_evaluate)


def _serve(args: argparse.Namespace) -> int:
    import asyncio

    from services.predictor.server import serve

    asyncio.run(serve(args))
    return 0


def _predict(args: argparse.Namespace) -> int:
    if args.server:
        import grpc

        from services.common.channels import dial
        from services.pb import predictor_pb2, predictor_pb2_grpc

        with dial(args.server) as channel:  # TLS from SSJF_TLS_* when set
            stub = predictor_pb2_grpc.PredictorStub(channel)
            try:
                reply = stub.Predict(
                    predictor_pb2.PredictRequest(prompt=args.prompt, llm=args.llm), timeout=30
                )
            except grpc.RpcError as error:
                print(f"error: {error.code().name}: {error.details()}")
                return 1
            tokens, head, version = reply.predicted_output_tokens, reply.llm, reply.model_version
    else:
        from services.common.errors import ServiceError
        from services.predictor.runtime import ArtifactRuntime

        runtime = ArtifactRuntime(Path(args.artifact))
        try:
            (prediction,) = runtime.predict([args.prompt], [args.llm])
        except ServiceError as error:
            print(f"error: {error.status}: {error}")
            return 1
        tokens, head, version = prediction.tokens, prediction.llm, runtime.version
    print(f"predicted_output_tokens={tokens:.1f} llm={head} model_version={version}")
    return 0


def _add_data_options(
    parser: argparse.ArgumentParser,
    labels: str | None = None,
    labels_meaning: str = "the served model's committed AlpacaEval labels",
) -> None:
    add_option(
        parser,
        "--data",
        default="",
        help="shared-format data directory "
        "(default: ../shared/data/alpaca_eval beside the repository)",
    )
    add_option(
        parser,
        "--labels",
        default=default_labels() if labels is None else labels,
        help="comma-separated ssjf collect directories: another LLM's lengths of the same "
        "prompts (one more head), or another prompt set's lengths (more training prompts, ids "
        "namespaced '<directory name>:<id>', split 70/10/20 on their own and scored apart); "
        f"default: {labels_meaning}; '' for none",
    )


def _train_probe(args: argparse.Namespace) -> int:
    if args.layer < 1 or args.max_prompt_tokens < 2:
        raise SystemExit("--layer must be at least 1 and --max-prompt-tokens at least 2")
    from services.predictor.probe import train_probe_artifact

    try:
        metadata = train_probe_artifact(
            data_dir=_data_dir(args),
            label_dirs=label_dirs(args.labels),
            model=args.model,
            layer=args.layer,
            out=Path(args.out),
            name=args.name,
            max_prompt_tokens=args.max_prompt_tokens,
            threads=args.threads,
        )
    except (ValueError, OSError) as error:  # a bad --layer, or a model that will not load
        raise SystemExit(f"error: {error}") from None
    print(
        json.dumps(
            {"version": metadata["version"], "held_out_test": metadata["held_out_test"]}, indent=2
        )
    )
    print(f"serve it: ssjf predictor --artifact {args.out}")
    return 0


def _teacher_label(args: argparse.Namespace) -> int:
    if not args.prompts or not args.out:
        raise SystemExit("--prompts and --out are required")
    from services.predictor.distill import write_teacher_labels

    try:
        record = write_teacher_labels(
            Path(args.teacher), Path(args.prompts), Path(args.out), args.threads
        )
    except (ValueError, OSError) as error:  # no artifact, no prompts file, bad prompts
        raise SystemExit(f"error: {error}") from None
    print(json.dumps(record, indent=2))
    print(f"train on it: ssjf train-predictor --labels <your other labels>,{args.out}")
    return 0


def _data_dir(args: argparse.Namespace) -> Path:
    from services.common.alpaca import default_data_dir

    data = Path(args.data) if args.data else default_data_dir()
    if data is None:
        raise SystemExit("no training data: pass --data DIR (prompts.jsonl + lengths.csv)")
    return data


def _train(args: argparse.Namespace) -> int:
    # Checked before torch is imported: a typo costs a second, not a model load.
    window = args.serve_max_prompt_tokens
    if window < 0 or 0 < window < 8:
        raise SystemExit(f"--serve-max-prompt-tokens must be 0 or at least 8, got {window}")
    from services.predictor import pipeline

    if args.first_stage_only:
        summary = pipeline.add_first_stage(_data_dir(args), Path(args.out), label_dirs(args.labels))
        print(json.dumps(summary, indent=2))
        return 0
    formulations = pipeline.FORMULATIONS if args.compare else (args.formulation,)
    results = pipeline.train_and_export(
        data_dir=_data_dir(args),
        label_dirs=label_dirs(args.labels),
        formulations=formulations,
        out=Path(args.out),
        nested=args.compare,
        llms=[llm for llm in args.llm.split(",") if llm],
        epochs=args.epochs,
        batch_size=args.batch_size,
        max_prompt_tokens=args.max_prompt_tokens,
        serve_max_prompt_tokens=window or None,
        trainable_layers=args.trainable_layers,
        encoder_layers=args.encoder_layers,
        seed=args.seed,
        threads=args.threads,
        max_train_prompts=args.max_train_prompts or None,
        name=args.name,
        quantize=not args.fp32,
        keep_fp32=args.keep_fp32,
    )
    print(pipeline.format_table(results))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from services.common.alpaca import load_dataset
    from services.predictor.evaluate import ALL_SOURCES, evaluate_by_source
    from services.predictor.runtime import ArtifactRuntime
    from services.predictor.training import split_dataset

    if not args.prompts or not args.lengths:
        raise SystemExit("give --prompts P.jsonl and --lengths L.csv")
    dataset = load_dataset(prompts=args.prompts, lengths=args.lengths)
    if args.held_out:
        dataset = dataset.subset(split_dataset(dataset).test)
    runtime = ArtifactRuntime(Path(args.artifact))
    llm = args.llm or runtime.default_llm
    try:
        groups, head = evaluate_by_source(runtime, dataset, llm)
    except KeyError as error:
        raise SystemExit(f"error: {error.args[0]}") from None
    metrics, baseline = groups[ALL_SOURCES]
    if args.by_source:
        print(f"{'source':<24}{'prompts':>8}{'tau':>8}{'prompt-length tau':>19}")
        for source, (by_model, by_length) in groups.items():
            print(
                f"{source:<24}{by_model.n:>8}{by_model.kendall_tau:>8.3f}"
                f"{by_length.kendall_tau:>19.3f}"
            )
    print(f"artifact={runtime.version} llm={llm} head={head} prompts={metrics.n}")
    print("baseline (prompt length): " + json.dumps(baseline.as_dict()))
    print(f"spearman_rho={metrics.spearman_rho:.4f}")
    print(f"mae_tokens={metrics.mae_tokens:.1f}")
    print(f"bucket_accuracy={metrics.bucket_accuracy:.4f}")
    print(f"kendall_tau={metrics.kendall_tau:.4f}")
    return 0
