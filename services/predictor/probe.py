"""The served LLM's own hidden state as the proxy model's input: a linear probe, rated out of fold.

The LLM that will answer a prompt has read it once it has prefilled it; its hidden state at the
last prompt token (where it starts to answer) is what it decides its answer from. A ridge
regression from that state, after one of the LLM's middle decoder layers, to each LLM's log
answer length is a proxy model with no fine-tuning at all (the idea of TRAIL, Shahout et al.
2024, which reads the served LLM's own embeddings). This module measures that lever against
the fine-tuned MiniLM recipes of ``make bench-predictor-crossval``, on the same five folds of
all labelled prompts, rated the same way (tau over every prompt with a bootstrap interval, the
simulated fraction of oracle SJF's gain, the capped-answer bounds), and times the truncated LLM
that would have to run per prompt.

The layer is chosen inside each fold, by an inner cross-validation on that fold's training
prompts alone (mean tau over the reported LLMs), so the held-out fifth never picks it.

``python -m services.predictor.probe [--model smollm2-135m-instruct] [--layers 8,11,...]
[--folds 5] [--artifact runs/predictor-probe] [--out bench/results/predictor_probe.json]``
prints the crossval table, leave-one-source-out and the speed of each candidate depth (and of
the artifact beside the shipped MiniLM's), and writes the JSON.

``train_probe_artifact`` (``ssjf train-probe``) exports the probe at one layer as an ordinary
predictor artifact (``ProbeGraph``: the truncated LLM, the last-token gather and every LLM's
ridge head in one ONNX graph), which ``ssjf predictor --artifact`` serves unchanged.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import RidgeCV
from sklearn.preprocessing import StandardScaler
from torch import nn
from tqdm import tqdm

from services.common.alpaca import load_dataset
from services.common.paths import SERVED_MODEL_ARENA_LABELS
from services.predictor.bench import (
    finish_record,
    latency_in_turns,
    prompts_per_second,
    run_record,
)
from services.predictor.crossval import FoldSetting, print_table
from services.predictor.export import TOKENIZER_FILE, write_artifact
from services.predictor.pipeline import score_artifact, training_data
from services.predictor.runtime import DEFAULT_ARTIFACT, ArtifactRuntime
from services.predictor.sweep import parse_rating_args
from services.predictor.tokenization import PromptTemplate, PromptTokenizer
from services.predictor.training import DEFAULT_LLM, EVAL_LLMS, known_tau, split_dataset
from services.worker.chat import render_conversation
from services.worker.model import resolve_model_path

DEFAULT_LAYERS = (8, 11, 14, 17, 20, 23)
# ``ssjf train-probe``'s default layer: 20 and 23 tie in the folds' inner choice (mean inner
# tau 0.521 both), and 20 runs three fewer layers.
SERVED_LAYER = 20
RIDGE_ALPHAS = np.logspace(-1, 5, 13)  # chosen per fit by leave-one-out (RidgeCV's default)
INNER_FOLDS = 4
# Tokens of the user's text kept (head and tail) inside the chat template.
PROBE_MAX_PROMPT_TOKENS = 512
BATCH_SIZE = 16
PROBE_NAME = "llm-probe"
# A stand-in user turn whose rendering splits the chat template into the text before and
# after the user's words.
_SENTINEL = "\u2063SSJF-PROMPT\u2063"


def last_token_states(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``[batch, hidden]``: each row's state at its last real (unpadded) position of the
    right-padded ``[batch, sequence, hidden]`` states."""
    last = attention_mask.sum(dim=1) - 1
    return hidden[torch.arange(hidden.shape[0]), last]


class LlmStates:
    """A causal LM's residual-stream state at the last token of its chat-templated prompt,
    after each decoder layer in ``layers`` (1 = the first). The layers above the deepest one
    asked for are dropped, and so is the final norm: states are read as the layers write them.
    """

    def __init__(
        self,
        model: str,
        layers: Sequence[int],
        *,
        max_prompt_tokens: int = PROBE_MAX_PROMPT_TOKENS,
        threads: int = 2,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        source = resolve_model_path(model)
        if source.gguf_file:
            raise ValueError("give the probe a prepared model directory, not a GGUF file")
        self.model_dir = Path(source.path)
        if not (self.model_dir / TOKENIZER_FILE).is_file():
            raise ValueError(
                f"{model}: not a model directory with a {TOKENIZER_FILE} (give a worker --model "
                "name such as smollm2-135m-instruct, or a save_pretrained directory)"
            )
        tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        # Eager attention: the graph exports to ONNX (an artifact) exactly as it runs here.
        causal_lm = AutoModelForCausalLM.from_pretrained(
            self.model_dir, dtype=torch.float32, attn_implementation="eager"
        )
        decoder = getattr(causal_lm, "model", None)
        if not hasattr(decoder, "layers"):
            raise ValueError(f"{model}: the probe reads Llama-style decoders (model.layers)")
        depth = len(decoder.layers)
        if not layers or min(layers) < 1 or max(layers) > depth:
            raise ValueError(f"layers must lie in 1..{depth} (the model's decoder layers)")
        self.layers = sorted(set(layers))
        self.full_layers = decoder.layers
        decoder.norm = torch.nn.Identity()
        self.decoder = decoder.eval()
        self.truncate(max(self.layers))
        prefix, suffix = render_conversation(tokenizer, (("user", _SENTINEL),)).split(_SENTINEL)
        self.template = PromptTemplate(
            tuple(tokenizer(prefix, add_special_tokens=False)["input_ids"]),
            tuple(tokenizer(suffix, add_special_tokens=False)["input_ids"]),
            tokenizer.pad_token_id or 0,
        )
        self.tokenizer = PromptTokenizer(
            self.model_dir / TOKENIZER_FILE,
            len(self.template.prefix_ids) + max_prompt_tokens + len(self.template.suffix_ids),
            self.template,
        )
        torch.set_num_threads(threads)

    def truncate(self, depth: int) -> None:
        """Run only the first ``depth`` decoder layers from now on."""
        self.decoder.layers = self.full_layers[:depth]
        self.decoder.config.num_hidden_layers = depth

    def token_ids(self, text: str) -> list[int]:
        """The user turn as the served model reads it, the user's words cut to head and tail."""
        return self.tokenizer.token_ids([text])[0]

    def batch_states(self, rows: list[list[int]]) -> torch.Tensor:
        """``[len(rows), hidden_states, hidden]`` states at each row's last token."""
        input_ids, mask = (torch.from_numpy(array) for array in self.tokenizer.pad(rows))
        with torch.no_grad():
            hidden = self.decoder(
                input_ids=input_ids, attention_mask=mask, output_hidden_states=True
            ).hidden_states
        return torch.stack([last_token_states(states, mask) for states in hidden], dim=1)

    def __call__(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        """``[len(texts), len(layers), hidden]`` float32 states."""
        rows = self.tokenizer.token_ids(texts)
        # Similar lengths together: a batch computes its longest row's width for every row.
        order = sorted(range(len(rows)), key=lambda index: len(rows[index]))
        out: np.ndarray | None = None
        starts = range(0, len(order), BATCH_SIZE)
        for start in tqdm(starts, desc="LLM states", unit="batch", disable=not progress):
            chosen = order[start : start + BATCH_SIZE]
            states = self.batch_states([rows[index] for index in chosen])[:, self.layers]
            if out is None:
                out = np.zeros((len(rows), len(self.layers), states.shape[-1]), np.float32)
            out[chosen] = states.numpy()
        assert out is not None, "no texts"
        return out


class ProbeGraph(nn.Module):
    """What a probe artifact exports: the served LLM's first layers, its state at the last
    prompt token, and one affine map per LLM head to log answer length, as tokens."""

    formulation = "llm-probe"

    def __init__(self, decoder: nn.Module, weights: np.ndarray, bias: np.ndarray) -> None:
        super().__init__()
        self.decoder = decoder
        self.head = nn.Linear(weights.shape[1], weights.shape[0])
        with torch.no_grad():
            self.head.weight.copy_(torch.from_numpy(weights))
            self.head.bias.copy_(torch.from_numpy(bias))

    def predict_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.decoder(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state
        log_tokens = self.head(last_token_states(hidden, attention_mask))
        # exp - 1: the ONNX exporter has no expm1.
        return (torch.exp(log_tokens) - 1.0).clamp(min=0.0)


def fit_ridge(features: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, float]:
    """A ridge regression on standardised features (alpha by leave-one-out among
    RIDGE_ALPHAS), over the rows with a known ``target``, folded back into one affine map of
    the raw features: ``features @ weights + bias``."""
    known = ~np.isnan(target)
    scaler = StandardScaler().fit(features[known])
    ridge = RidgeCV(alphas=RIDGE_ALPHAS).fit(scaler.transform(features[known]), target[known])
    weights = ridge.coef_ / scaler.scale_
    return weights, float(ridge.intercept_ - scaler.mean_ @ weights)


def ridge_predictions(
    features: np.ndarray, target: np.ndarray, train: np.ndarray, test: np.ndarray
) -> np.ndarray:
    """``fit_ridge`` on the ``train`` rows, predicting the ``test`` rows."""
    weights, bias = fit_ridge(features[train], target[train])
    return features[test] @ weights + bias


def choose_layer(
    states: np.ndarray, targets: np.ndarray, train: np.ndarray, rng: np.random.Generator
) -> tuple[int, list[float]]:
    """The index into ``states``' layer axis whose probe ranks the ``train`` rows best in an
    inner cross-validation among them (mean tau over the target rows), and each layer's score."""
    inner = np.array_split(rng.permutation(train), INNER_FOLDS)
    scores = []
    for layer in range(states.shape[1]):
        taus = []
        for target in targets:
            predicted = np.full(len(target), np.nan)
            for held in inner:
                predicted[held] = ridge_predictions(
                    states[:, layer], target, np.setdiff1d(train, held), held
                )
            tau = known_tau(predicted[train], target[train])
            taus.append(np.nan if tau is None else tau)
        scores.append(float(np.nanmean(taus)))
    return int(np.argmax(scores)), scores


def out_of_fold_log_tokens(
    states: np.ndarray, targets: np.ndarray, fold_columns: list[list[int]], seed: int = 0
) -> tuple[np.ndarray, list[int], list[list[float]]]:
    """``targets``-shaped predictions (log1p tokens, one row per LLM), each fold's columns
    from probes fitted on the other folds at the layer those folds chose; and per fold the
    layer index chosen and every layer's inner score."""
    rng = np.random.default_rng(seed)
    predicted = np.full(targets.shape, np.nan)
    chosen, scores = [], []
    everything = np.arange(targets.shape[1])
    for index, columns in enumerate(fold_columns):
        test = np.asarray(columns)
        train = np.setdiff1d(everything, test)
        layer, layer_scores = choose_layer(states, targets, train, rng)
        for row, target in enumerate(targets):
            predicted[row, test] = ridge_predictions(states[:, layer], target, train, test)
        chosen.append(layer)
        scores.append(layer_scores)
        print(f"fold {index + 1}/{len(fold_columns)}: layer index {layer}", flush=True)
    return predicted, chosen, scores


def fit_probe_heads(features: np.ndarray, log_tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One affine map per row of ``log_tokens`` (an LLM's log1p tokens, NaN where it did not
    answer), plus the all-LLM head on each prompt's mean over the LLMs that answered it:
    ``[n_llms + 1, hidden]`` weights and ``[n_llms + 1]`` biases. The all-LLM head learns only
    from prompts at least half as many LLMs answered as the most-answered one: another prompt
    set labelled by one LLM would teach it that LLM's lengths."""
    answered = (~np.isnan(log_tokens)).sum(axis=0)
    pooled = np.where(
        answered >= answered.max() / 2,
        np.nansum(log_tokens, axis=0) / np.maximum(answered, 1),
        np.nan,
    )
    fitted = [fit_ridge(features, target) for target in [*log_tokens, pooled]]
    weights = np.stack([row for row, _ in fitted]).astype(np.float32)
    return weights, np.array([bias for _, bias in fitted], dtype=np.float32)


def train_probe_artifact(
    *,
    data_dir: Path,
    label_dirs: Sequence[Path],
    model: str,
    layer: int,
    out: Path,
    name: str,
    max_prompt_tokens: int = PROBE_MAX_PROMPT_TOKENS,
    threads: int = 2,
) -> dict[str, Any]:
    """Fit the probe on the seed-0 split's training and dev prompts (ridge needs no epoch
    chosen), export it as a predictor artifact the service runs like any other, and score it
    on the held-out test prompts. Returns the artifact's metadata."""
    started = time.monotonic()
    dataset = training_data(data_dir, label_dirs)
    split = split_dataset(dataset)
    fitted_on = dataset.subset(split.train + split.dev)
    llms = [llm for llm in dataset.llms if len(fitted_on.lengths_for(llm)) >= 2]
    states = LlmStates(model, [layer], max_prompt_tokens=max_prompt_tokens, threads=threads)
    texts = [prompt.text for prompt in fitted_on.prompts]
    features = states(texts, progress=True)[:, 0]
    print(f"fitting {len(llms) + 1} heads on {len(texts)} prompts", flush=True)
    weights, bias = fit_probe_heads(features, np.log1p(fitted_on.length_matrix(llms)))
    default_llm = DEFAULT_LLM if DEFAULT_LLM in llms else llms[0]
    metadata = write_artifact(
        ProbeGraph(states.decoder, weights, bias).eval(),
        llms,
        default_llm,
        states.tokenizer.max_tokens,
        out,
        name=name,
        # fp32: int8 dynamic quantization scales each activation tensor as a whole, and an
        # LLM's residual stream has a few huge channels; it cost the probe 0.1-0.2 of tau.
        quantize=False,
        training_summary={
            "model": model,
            "layer": layer,
            "trained_on_prompts": len(texts),
            "split": {"train": len(split.train), "dev": len(split.dev), "test": len(split.test)},
            "ridge_alphas": [float(alpha) for alpha in RIDGE_ALPHAS],
            "minutes": (time.monotonic() - started) / 60,
        },
        tokenizer_file=states.model_dir / TOKENIZER_FILE,
        template=states.template,
        encoder=f"{model}: its first {layer} decoder layers, state at the last prompt token",
    )
    print("scoring the held-out test prompts", flush=True)
    eval_llms = [llm for llm in EVAL_LLMS if llm in llms]
    score_artifact(out, metadata, dataset, split, eval_llms)
    return metadata


def leave_one_source_out(
    features: np.ndarray, targets: np.ndarray, sources: Sequence[str], llms: Sequence[str]
) -> dict[str, Any]:
    """Tau of probes fitted on four prompt sources, on every prompt of the fifth, per LLM, and
    each LLM's mean over the sources weighted by their prompts."""
    source_of = np.asarray(sources)
    everything = np.arange(len(source_of))
    by_source: dict[str, dict[str, Any]] = {}
    for source in sorted(set(sources)):
        test = everything[source_of == source]
        train = everything[source_of != source]
        taus = {
            llm: known_tau(ridge_predictions(features, target, train, test), target[test])
            for llm, target in zip(llms, targets, strict=True)
        }
        by_source[source] = {"test_prompts": len(test), "tau": taus}
    weighted = {}
    for llm in llms:
        rated = [(fold["test_prompts"], fold["tau"][llm]) for fold in by_source.values()]
        rated = [(count, tau) for count, tau in rated if tau is not None]
        weighted[llm] = sum(count * tau for count, tau in rated) / sum(c for c, _ in rated)
    return {"by_source": by_source, "prompt_weighted_tau": weighted}


def out_of_fold_tau(
    features: np.ndarray,
    target: np.ndarray,
    folds: Sequence[Sequence[int] | np.ndarray],
    extra: tuple[np.ndarray, np.ndarray] | None = None,
) -> float | None:
    """Tau of ``target`` predicted fold by fold, each fold by a probe fitted on the other
    folds' rows, plus every row of ``extra`` (features, target) when given."""
    everything = np.arange(len(target))
    predicted = np.full(len(target), np.nan)
    for held in folds:
        train = np.setdiff1d(everything, held)
        x, y = features[train], target[train]
        if extra is not None:
            x, y = np.concatenate([x, extra[0]]), np.concatenate([y, extra[1]])
        weights, bias = fit_ridge(x, y)
        predicted[np.asarray(held)] = features[held] @ weights + bias
    return known_tau(predicted, target)


def with_other_prompt_set(
    features: np.ndarray,
    target: np.ndarray,
    fold_columns: list[list[int]],
    other_features: np.ndarray,
    other_target: np.ndarray,
    seed: int = 0,
) -> dict[str, Any]:
    """What another prompt set's labels of one LLM do to its probe: tau on the main prompts
    out of fold, fitted on each fold's training prompts without and with every prompt of the
    other set; and tau on the other set, fitted on the main prompts alone, and out of fold (as
    many folds) on its other prompts without and with the main prompts."""
    shuffled = np.random.default_rng(seed).permutation(len(other_target))
    other_folds = np.array_split(shuffled, len(fold_columns))
    main, other = (features, target), (other_features, other_target)
    weights, bias = fit_ridge(features, target)
    return {
        "main_set_prompts": len(target),
        "other_set_prompts": len(other_target),
        "main_set_tau": {
            "main_set_only": out_of_fold_tau(*main, fold_columns),
            "with_other_set": out_of_fold_tau(*main, fold_columns, other),
        },
        "other_set_tau": {
            "fitted_on_main_set": known_tau(other_features @ weights + bias, other_target),
            "other_set_folds_only": out_of_fold_tau(*other, other_folds),
            "other_set_folds_and_main_set": out_of_fold_tau(*other, other_folds, main),
        },
    }


def speed_row(latency_ms: list[float], per_second: float, batch: int) -> dict[str, float]:
    return {
        "p50_ms": float(np.percentile(latency_ms, 50)),
        "p99_ms": float(np.percentile(latency_ms, 99)),
        f"batch_{batch}_prompts_per_s": per_second,
    }


def measure_speed(
    states: LlmStates, texts: Sequence[str], depths: Sequence[int], prompts: int = 100
) -> list[dict[str, Any]]:
    """Single-prompt latency and batched throughput of the truncated LLM at each depth
    (PyTorch eager, float32, this process's threads), on the first ``prompts`` texts (batches
    of similar lengths)."""
    rows = sorted((states.token_ids(text) for text in texts[:prompts]), key=len)
    results = []
    for depth in depths:
        states.truncate(depth)
        (latency,) = latency_in_turns({"probe": states.batch_states}, rows).values()
        per_second = prompts_per_second(states.batch_states, rows, BATCH_SIZE)
        results.append(
            {
                "layers": depth,
                "prompts": len(rows),
                "median_tokens": float(np.median([len(row) for row in rows])),
                **speed_row(latency, per_second, BATCH_SIZE),
            }
        )
        print(
            f"{depth:>3} layers: 1 prompt p50 {results[-1]['p50_ms']:.1f} ms, p99"
            f" {results[-1]['p99_ms']:.1f} ms; batch {BATCH_SIZE} {per_second:.1f} prompts/s",
            flush=True,
        )
    states.truncate(max(states.layers))
    return results


def time_artifacts(
    artifacts: dict[str, Path], texts: list[str], threads: int, batch: int = 32
) -> dict[str, dict[str, Any]]:
    """Each artifact as the service runs it (ONNX Runtime, ``threads`` intra-op threads):
    single-prompt latency over ``texts``, the artifacts taking turns per prompt so that load
    from other processes falls on all alike, and batched throughput."""
    runtimes = {
        name: ArtifactRuntime(path, intra_op_threads=threads) for name, path in artifacts.items()
    }
    for runtime in runtimes.values():
        runtime.warm_up()
    latency = latency_in_turns({name: r.predict_all for name, r in runtimes.items()}, texts)
    return {
        name: {
            "version": runtime.version,
            "prompts": len(texts),
            **speed_row(
                latency[name], prompts_per_second(runtime.predict_all, texts, batch), batch
            ),
        }
        for name, runtime in runtimes.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        default="smollm2-135m-instruct",
        help="the served LLM whose states are read (a worker --model value)",
    )
    parser.add_argument(
        "--layers",
        default=",".join(map(str, DEFAULT_LAYERS)),
        help="candidate decoder layers (1 = first), chosen among inside each fold",
    )
    parser.add_argument("--folds", type=int, default=5, help="parts the prompts are cut into")
    parser.add_argument(
        "--artifact",
        default="",
        help="a probe artifact (ssjf train-probe) to time as the service runs it, in turns "
        "with the shipped MiniLM artifact, on the seed-0 split's held-out prompts",
    )
    parser.add_argument(
        "--other-labels",
        default=str(SERVED_MODEL_ARENA_LABELS) if SERVED_MODEL_ARENA_LABELS.exists() else "",
        help="an ssjf collect directory of another prompt set, labelled by one LLM of the "
        "data: its probe rated with and without those labels ('' to skip)",
    )
    args = parse_rating_args(parser, argv, "predictor_probe.json")
    try:
        layers = sorted({int(layer) for layer in args.layers.split(",")})
    except ValueError:
        parser.error(f"--layers takes comma-separated integers, not {args.layers!r}")
    started = time.monotonic()
    result = run_record("services.predictor.probe", argv)
    setting = FoldSetting.of(args)
    texts = [prompt.text for prompt in setting.dataset.subset(setting.gain.test_ids).prompts]
    try:
        states = LlmStates(args.model, layers, threads=args.threads)
    except ValueError as error:
        parser.error(str(error))
    features = states(texts, progress=True)
    targets = np.log1p(setting.true)
    log_tokens, chosen, scores = out_of_fold_log_tokens(features, targets, setting.fold_columns)
    # Saved beside the JSON, as the cross-validation saves its recipes' predictions.
    predictions_dir = Path(args.out).with_suffix("")
    predictions_dir.mkdir(parents=True, exist_ok=True)
    np.save(predictions_dir / f"{PROBE_NAME}.npy", np.expm1(log_tokens))
    entry = {
        "model": args.model,
        "candidate_layers": layers,
        "layer_by_fold": [layers[index] for index in chosen],
        "inner_tau_by_fold": scores,
        "max_prompt_tokens": PROBE_MAX_PROMPT_TOKENS,
        "folds": args.folds,
        **setting.rate(np.expm1(log_tokens)),
    }
    result["variants"] = {PROBE_NAME: entry}
    # The served artifact's depth when it is a candidate, else the one chosen most often.
    picked = entry["layer_by_fold"]
    served = SERVED_LAYER if SERVED_LAYER in layers else max(set(picked), key=picked.count)
    prompts = setting.dataset.subset(setting.gain.test_ids).prompts
    result["leave_one_source_out"] = {
        "layer": served,
        **leave_one_source_out(
            features[:, layers.index(served)],
            targets,
            [str(prompt.extra.get("source", "")) for prompt in prompts],
            setting.llms,
        ),
    }
    if args.other_labels:
        other = load_dataset(args.other_labels)
        if len(other.llms) != 1 or other.llms[0] not in setting.llms:
            parser.error(f"--other-labels: want one of {setting.llms}'s lengths, not {other.llms}")
        llm = other.llms[0]
        other_features = states([prompt.text for prompt in other.prompts], progress=True)
        result["other_prompt_set"] = {
            "labels": args.other_labels,
            "llm": llm,
            "layer": served,
            **with_other_prompt_set(
                features[:, layers.index(served)],
                targets[setting.llms.index(llm)],
                setting.fold_columns,
                other_features[:, layers.index(served)],
                np.log1p(other.length_matrix([llm])[0]),
            ),
        }
    result["oracle_gain_setting"] = setting.gain.setting()
    result["speed"] = measure_speed(states, texts, layers)
    if args.artifact:
        held_out = setting.dataset.subset(split_dataset(setting.dataset).test).prompts
        result["served_speed"] = time_artifacts(
            {"minilm (shipped)": DEFAULT_ARTIFACT, "llm-probe": Path(args.artifact)},
            [prompt.text for prompt in held_out],
            args.threads,
        )
        for name, timing in result["served_speed"].items():
            print(
                f"{name} ({timing['version']}), ONNX Runtime: 1 prompt p50 {timing['p50_ms']:.1f}"
                f" ms, p99 {timing['p99_ms']:.1f} ms; batch 32"
                f" {timing['batch_32_prompts_per_s']:.1f} prompts/s"
            )
    finish_record(args.out, result, started)
    print_table(result, setting.llms)
    loso = result["leave_one_source_out"]
    print(
        f"\nleave one source out (layer {loso['layer']}), prompt-weighted tau on the unseen source:"
    )
    for llm, tau in loso["prompt_weighted_tau"].items():
        print(f"  {llm:<28}{tau:.3f}")
    if "other_prompt_set" in result:
        other_set = result["other_prompt_set"]
        print(f"\n{other_set['llm']}'s probe with {other_set['labels']} (tau):")
        for part in ("main_set_tau", "other_set_tau"):
            for name, tau in other_set[part].items():
                print(f"  {part:<16}{name:<32}{tau:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
