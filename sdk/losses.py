"""CodePMP losses: pairwise ranking on last-token rewards + next-token loss on chosen responses.

Kept free of model code so each term can be checked against hand-computed values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last non-padding position of each row; correct for left and right padding alike."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(-1)


def gather_last(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Per-row value (B, T) -> (B,) at the last non-padding token (the EOS appended to every sequence)."""
    return values[torch.arange(values.shape[0], device=values.device), last_token_index(attention_mask)]


def ranking_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """Bradley-Terry loss `-logsigmoid(r_c - r_r - margin)`, averaged over pairs."""
    return -F.logsigmoid(r_chosen - r_rejected - margin).mean()


def lm_loss(hidden: torch.Tensor, labels: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled positions (labels == -100 on prompt and padding).

    The head runs only on the positions that predict a labelled token: with a 50k-entry vocabulary the
    full (B, T, V) logits tensor would dominate memory, and the prompt positions would be thrown away anyway.
    Passing `head=lambda x: x` with `hidden` = full logits gives the textbook shifted loss.
    """
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    if not keep.any():
        return hidden.sum() * 0.0  # keeps the graph connected so every rank runs the same backward
    logits = head(hidden[:, :-1][keep])
    return F.cross_entropy(logits.float(), targets[keep])


@dataclass
class LossOutput:
    """Total loss plus its parts, detached where they are only for logging."""

    total: torch.Tensor
    ranking: torch.Tensor
    lm: torch.Tensor
    accuracy: torch.Tensor


def reward_model_loss(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    lm: torch.Tensor | None,
    *,
    rm_coef: float = 1.0,
    lm_coef: float = 1.0,
    margin: float = 0.0,
) -> LossOutput:
    """`rm_coef * ranking + lm_coef * lm` (CodePMP: 1.0/1.0 for pretraining, 1.0/0.0 for finetuning).

    Accuracy counts ties as half, matching `RewardModel.evaluate`.
    """
    ranking = ranking_loss(r_chosen.float(), r_rejected.float(), margin)
    lm = torch.zeros((), device=ranking.device) if lm is None else lm
    total = rm_coef * ranking + lm_coef * lm if lm_coef else rm_coef * ranking
    diff = (r_chosen - r_rejected).detach().float()
    accuracy = ((diff > 0).float() + 0.5 * (diff == 0).float()).mean()
    return LossOutput(total=total, ranking=ranking.detach(), lm=lm.detach(), accuracy=accuracy)
