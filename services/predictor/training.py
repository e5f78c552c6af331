"""Fine-tuning the proxy model on shared-format data (prompts + per-LLM answer lengths).

One step encodes each prompt of the batch once and trains every LLM head on it (multi-task):
the 227 LLMs of alpaca_eval give ~180k length labels for 805 prompts, where one LLM gives 805.
Prompts are split (train / dev / test) by prompt with a fixed seed; the epoch kept is the one
with the best mean Kendall's tau on dev over the evaluation LLMs; test is never looked at here.
"""

from __future__ import annotations

import copy
import logging
import math
import random
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.stats import kendalltau
from tqdm import tqdm

from services.common.alpaca import LengthDataset, PromptId, ids_by_prompt_set, split_by_prompt
from services.predictor.model import (
    NUM_BUCKETS,
    SCORE_FORMULATIONS,
    LengthModel,
    LengthStats,
    bucket_of,
    encoder_dir,
)
from services.predictor.tokenization import PromptTokenizer

log = logging.getLogger(__name__)

# The six LLMs whose answer texts ship with the data: the ones we report and ship for.
EVAL_LLMS = (
    "vicuna-13b",
    "gpt4_0314",
    "llama-2-13b-chat-hf",
    "gpt-3.5-turbo-0613",
    "Mistral-7B-Instruct-v0.2",
    "Meta-Llama-3-8B-Instruct",
)
DEFAULT_LLM = "vicuna-13b"
SPLIT_FRACTIONS = (0.7, 0.1, 0.2)  # train, dev, test
SPLIT_SEED = 0
ENCODER_LAYERS = 6  # MiniLM-L6


@dataclass
class TrainConfig:
    formulation: str = "regression-mse"
    llms: list[str] | None = None  # heads to train; None: every LLM in the data (all-LLM)
    epochs: int = 4
    batch_size: int = 32
    encoder_lr: float = 8e-5
    head_lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1
    max_prompt_tokens: int = 256
    # The embeddings and the lower layers stay as pretrained (their states are computed once);
    # only the top ``trainable_layers`` of the 6 and the heads learn.
    trainable_layers: int = 2
    # A student keeps only the encoder's first ``encoder_layers`` of 6 (half the layers: about
    # half the serving cost) and is fine-tuned like the full model.
    encoder_layers: int = ENCODER_LAYERS
    # Sweep levers (services/predictor/sweep.py); the exported artifacts use the defaults.
    pooling: str = "mean"
    head: str = "mlp"
    # Each prompt's squared error weighted by exp(tail_weight * z): with 1, roughly in
    # proportion to its answer's length, which is what a misplaced job costs SJF (regression
    # formulations only; 0: unweighted).
    tail_weight: float = 0.0
    seed: int = 0
    threads: int = 2
    max_train_prompts: int | None = None  # smoke runs only
    eval_llms: list[str] = field(default_factory=lambda: list(EVAL_LLMS))

    def __post_init__(self) -> None:
        if self.tail_weight and not self.formulation.startswith("regression"):
            raise ValueError(
                f"tail_weight weighs a regression loss, not {self.formulation}: use "
                "regression-mse or regression-l1"
            )


@dataclass
class Split:
    train: list[PromptId]
    dev: list[PromptId]
    test: list[PromptId]


def split_dataset(dataset: LengthDataset, seed: int = SPLIT_SEED) -> Split:
    """Train/dev/test by prompt, drawn within each prompt set (``add_prompt_set``): the main
    set's split does not move when another set is added, and every set is in every part."""
    by_set = ids_by_prompt_set(dataset.prompts)
    parts = [split_by_prompt(ids, SPLIT_FRACTIONS, seed) for ids in by_set.values()]
    return Split(*([pid for part in column for pid in part] for column in zip(*parts, strict=True)))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def length_stats(log_lengths: np.ndarray) -> LengthStats:
    """Statistics of ``log1p(tokens)`` ``[n_llms, n_prompts]`` (NaN: unknown) per LLM."""
    mean = np.nanmean(log_lengths, axis=1)
    std = np.nanstd(log_lengths, axis=1).clip(min=1e-3)
    z = (log_lengths - mean[:, None]) / std[:, None]
    quantiles = np.linspace(0, 1, NUM_BUCKETS + 1)[1:-1]
    edges = np.stack([np.nanquantile(row, quantiles) for row in z])
    centers = np.zeros((len(z), NUM_BUCKETS))
    for llm, row in enumerate(z):
        known = row[~np.isnan(row)]
        bucket = np.searchsorted(edges[llm], known, side="left")
        for index in range(NUM_BUCKETS):
            members = known[bucket == index]
            centers[llm, index] = members.mean() if len(members) else 0.0
    as_tensor = lambda array: torch.tensor(array, dtype=torch.float32)  # noqa: E731
    return LengthStats(as_tensor(mean), as_tensor(std), as_tensor(edges), as_tensor(centers))


def known_tau(predicted: np.ndarray, true: np.ndarray) -> float | None:
    """Kendall's tau over the prompts with a known length (None below 5 of them)."""
    known = ~np.isnan(true)
    if known.sum() < 5:
        return None
    return float(kendalltau(predicted[known], true[known]).statistic)


def mean_kendall_tau(predicted_z: np.ndarray, true_tokens: np.ndarray) -> float:
    """Mean over LLMs (rows) of Kendall's tau on the prompts each LLM answered."""
    taus = []
    for predicted, true in zip(predicted_z, true_tokens, strict=True):
        known = ~np.isnan(true)
        taus.append(kendalltau(predicted[known], true[known]).statistic)
    return float(np.mean(taus))


class LowerStates:
    """Token states after the frozen lower layers, computed once per prompt and reused by every
    epoch (and every formulation trained in one process): the frozen layers would compute
    exactly the same states each time, so training pays only for the layers it updates."""

    def __init__(self, tokenizer: PromptTokenizer, frozen_layers: int) -> None:
        self.tokenizer = tokenizer
        self.frozen_layers = frozen_layers
        self._states: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def get(self, model: LengthModel, texts: list[str], batch_size: int = 64) -> list[torch.Tensor]:
        missing = sorted({text for text in texts if text not in self._states}, key=len)
        if missing:
            was_training = model.training
            model.eval()
            for start in tqdm(
                range(0, len(missing), batch_size),
                desc="encode frozen layers",
                unit="batch",
                leave=False,
            ):
                chunk = missing[start : start + batch_size]
                input_ids, mask = self.tokenizer(chunk)
                mask_tensor = torch.from_numpy(mask)
                states = model.lower_states(
                    torch.from_numpy(input_ids), mask_tensor, self.frozen_layers
                )
                for text, row, length in zip(chunk, states, mask.sum(1), strict=True):
                    self._states[text] = row[:length].clone()
            model.train(was_training)
        return [self._states[text] for text in texts]


def pad_states(states: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``[batch, longest, hidden]`` zero-padded states and their int64 attention mask."""
    padded = torch.nn.utils.rnn.pad_sequence(states, batch_first=True)
    lengths = torch.tensor([len(row) for row in states])
    mask = (torch.arange(padded.shape[1])[None, :] < lengths[:, None]).long()
    return padded, mask


class Trainer:
    def __init__(
        self,
        dataset: LengthDataset,
        config: TrainConfig,
        lower: LowerStates | None = None,
        split: Split | None = None,
    ) -> None:
        self.config = config
        self.dataset = dataset
        self.split = split or split_dataset(dataset)
        self.llms = config.llms or dataset.llms
        self.eval_llms = [llm for llm in config.eval_llms if llm in self.llms] or self.llms[:1]
        train_ids = self.split.train
        if config.max_train_prompts:
            train_ids = train_ids[: config.max_train_prompts]
        self.train_set = dataset.subset(train_ids)
        self.dev_set = dataset.subset(self.split.dev)
        self.tokenizer = PromptTokenizer(encoder_dir() / "tokenizer.json", config.max_prompt_tokens)
        if not 1 <= config.encoder_layers <= ENCODER_LAYERS:
            raise ValueError(f"encoder_layers must be within [1, {ENCODER_LAYERS}]")
        frozen_layers = max(0, config.encoder_layers - config.trainable_layers)
        self.lower = lower or LowerStates(self.tokenizer, frozen_layers)
        if self.lower.frozen_layers != frozen_layers:
            raise ValueError("shared LowerStates freeze a different number of layers")
        train_log = np.log1p(self.train_set.length_matrix(self.llms))
        self.stats = length_stats(train_log)
        self.train_z = (train_log - self.stats.log_mean.numpy()[:, None]) / (
            self.stats.log_std.numpy()[:, None]
        )
        self.history: list[dict[str, Any]] = []

    def _batches(self, lengths: list[int], generator: random.Random) -> list[list[int]]:
        """Batches of similar-length prompts (little padding), different every epoch: prompts
        are sorted by a jittered length, cut into batches, and the batches shuffled."""
        order = sorted(
            range(len(lengths)), key=lambda index: lengths[index] * generator.uniform(0.8, 1.25)
        )
        size = self.config.batch_size
        batches = [order[start : start + size] for start in range(0, len(order), size)]
        generator.shuffle(batches)
        return batches

    def _raw(self, model: LengthModel, states: list[torch.Tensor]) -> torch.Tensor:
        padded, mask = pad_states(states)
        return model.forward_from(padded, mask, self.lower.frozen_layers)

    @torch.no_grad()
    def predict_raw(
        self, model: LengthModel, texts: list[str], batch_size: int = 64
    ) -> torch.Tensor:
        """Raw head outputs ``[len(texts), n_llms, outputs_per_llm]``, in eval mode."""
        model.eval()
        states = self.lower.get(model, texts)
        order = sorted(range(len(texts)), key=lambda index: len(states[index]))
        result = torch.zeros(len(texts), model.n_llms, model.outputs_per_llm)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            result[chunk] = self._raw(model, [states[index] for index in chunk])
        return result

    @torch.no_grad()
    def predict_z(self, model: LengthModel, texts: list[str]) -> np.ndarray:
        """``[n_llms, len(texts)]`` estimated z, in eval mode."""
        return model.raw_to_z(self.predict_raw(model, texts)).T.double().numpy()

    @torch.no_grad()
    def predict_expected_tokens_z(self, model: LengthModel, texts: list[str]) -> np.ndarray:
        """A classification model read out as the expected *length* rather than the expected
        log length (``raw_to_z``): each bucket stands for the mean tokens of the training
        answers in it, and the probability-weighted sum of those is mapped back to z.
        Non-preemptive SJF with uncertain sizes is best served by the shortest expected size;
        the two readouts differ most for a prompt with a small chance of a very long answer."""
        if model.formulation != "classification":
            raise ValueError(f"only a classification model has buckets, not {model.formulation}")
        probabilities = self.predict_raw(model, texts).softmax(-1).double().numpy()
        tokens = self.train_set.length_matrix(self.llms)  # [n_llms, n_train], NaN: unknown
        z = torch.from_numpy(np.nan_to_num(self.train_z.T)).float()
        buckets = bucket_of(z, model.bucket_edges).T.numpy()
        bucket_tokens = np.ones((model.n_llms, model.outputs_per_llm))
        for llm in range(model.n_llms):
            known = ~np.isnan(tokens[llm])
            for index in range(model.outputs_per_llm):
                members = tokens[llm][known & (buckets[llm] == index)]
                bucket_tokens[llm, index] = members.mean() if len(members) else 1.0
        expected = (probabilities * bucket_tokens[None]).sum(-1).T  # [n_llms, len(texts)]
        log_mean, log_std = self.stats.log_mean.numpy(), self.stats.log_std.numpy()
        return (np.log1p(expected) - log_mean[:, None]) / log_std[:, None]

    def dev_tau(self, model: LengthModel) -> float:
        texts = [prompt.text for prompt in self.dev_set.prompts]
        predicted = self.predict_z(model, texts)
        rows = [self.llms.index(llm) for llm in self.eval_llms]
        return mean_kendall_tau(predicted[rows], self.dev_set.length_matrix(self.eval_llms))

    def fit_calibration(self, model: LengthModel) -> None:
        """Ranking scores -> z by a least-squares line per LLM over the training prompts."""
        model.score_scale.fill_(1.0)
        model.score_shift.fill_(0.0)
        scores = self.predict_z(model, [prompt.text for prompt in self.train_set.prompts])
        for llm, (score, target) in enumerate(zip(scores, self.train_z, strict=True)):
            known = ~np.isnan(target)
            slope, intercept = np.polyfit(score[known], target[known], 1)
            model.score_scale[llm] = float(slope)
            model.score_shift[llm] = float(intercept)

    def train(self) -> LengthModel:
        config = self.config
        torch.set_num_threads(config.threads)
        seed_everything(config.seed)
        model = LengthModel.from_pretrained_encoder(
            config.formulation,
            self.stats,
            layers=config.encoder_layers,
            pooling=config.pooling,
            head=config.head,
        )
        frozen = [
            model.encoder.embeddings,
            *model.encoder.encoder.layer[: self.lower.frozen_layers],
        ]
        for module in frozen:
            module.requires_grad_(False)
        states = self.lower.get(model, [prompt.text for prompt in self.train_set.prompts])
        targets = torch.tensor(np.nan_to_num(self.train_z.T), dtype=torch.float32)
        known = torch.tensor(~np.isnan(self.train_z.T))
        generator = random.Random(config.seed)
        steps_per_epoch = math.ceil(len(states) / config.batch_size)
        total_steps = steps_per_epoch * config.epochs
        encoder_parameters = [p for p in model.encoder.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            [
                {"params": encoder_parameters, "lr": config.encoder_lr},
                {"params": model.head.parameters(), "lr": config.head_lr},
            ],
            weight_decay=config.weight_decay,
        )
        warmup = max(1, int(config.warmup_fraction * total_steps))
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: min(
                (step + 1) / warmup, max(0.0, (total_steps - step) / max(1, total_steps - warmup))
            ),
        )
        best_tau, best_state = -math.inf, None
        progress = tqdm(total=total_steps, desc=f"train {config.formulation}", unit="step")
        for epoch in range(1, config.epochs + 1):
            model.train()
            losses = []
            for batch in self._batches([len(row) for row in states], generator):
                raw = self._raw(model, [states[index] for index in batch])
                weights = (
                    torch.exp(config.tail_weight * targets[batch]) if config.tail_weight else None
                )
                loss = model.loss(raw, targets[batch], known[batch], weights)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                schedule.step()
                losses.append(loss.item())
                progress.update()
                progress.set_postfix(epoch=epoch, loss=f"{np.mean(losses):.4f}")
            if config.formulation in SCORE_FORMULATIONS:
                self.fit_calibration(model)
            tau = self.dev_tau(model)
            self.history.append({"epoch": epoch, "loss": float(np.mean(losses)), "dev_tau": tau})
            progress.write(f"epoch {epoch}: loss {np.mean(losses):.4f}  dev tau {tau:.4f}")
            if tau > best_tau:
                best_tau, best_state = tau, copy.deepcopy(model.state_dict())
        progress.close()
        model.load_state_dict(best_state)
        model.eval()
        return model

    def summary(self) -> dict[str, Any]:
        return {
            "config": asdict(self.config),
            "split": {
                "seed": SPLIT_SEED,
                "fractions": SPLIT_FRACTIONS,
                "train": len(self.split.train),
                "dev": len(self.split.dev),
                "test": len(self.split.test),
            },
            "history": self.history,
            "best_dev_tau": max(entry["dev_tau"] for entry in self.history),
        }
