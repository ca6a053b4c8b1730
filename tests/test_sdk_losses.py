"""Losses, truncation, batching and schedules: hand-computed values, no model needed."""

from __future__ import annotations

import math

import pytest
import torch

from sdk.config import TrainConfig
from sdk.data import EncodedPair, collate_pairs, fit, length_grouped_batches
from sdk.losses import IGNORE_INDEX, gather_last, lm_loss, ranking_loss, reward_model_loss
from sdk.train import ladder_steps, lr_factor

PAD = 0


def _log_softmax(row: list[float], k: int) -> float:
    return row[k] - math.log(sum(math.exp(x) for x in row))


def test_ranking_loss_matches_hand_computation_with_margin() -> None:
    r_c, r_r = torch.tensor([2.0, 0.5]), torch.tensor([1.0, 1.5])
    softplus = lambda x: math.log1p(math.exp(-x))  # noqa: E731  -logsigmoid(x)
    assert ranking_loss(r_c, r_r).item() == pytest.approx((softplus(1.0) + softplus(-1.0)) / 2, abs=1e-6)
    assert ranking_loss(r_c, r_r, margin=0.5).item() == pytest.approx((softplus(0.5) + softplus(-1.5)) / 2, abs=1e-6)


@pytest.mark.parametrize("side", ["left", "right"])
def test_full_loss_hand_computed_on_a_tiny_batch(side: str) -> None:
    """Two pairs of different lengths, padded on either side: rewards are read at the EOS and the LM term
    averages -log p over chosen response tokens only."""
    pairs = [EncodedPair(chosen=[5, 6, 7, 1], rejected=[5, 6, 8, 9, 1], prompt_len=2, index=0),
             EncodedPair(chosen=[4, 2, 1], rejected=[4, 3, 1], prompt_len=1, index=1)]  # fmt: skip
    batch = collate_pairs(pairs, PAD, side)
    mask, labels = batch["attention_mask"], batch["lm_labels"]
    # Per-token values: the EOS position of each row holds that row's reward, every other position junk.
    rewards = {0: 2.0, 1: -1.0, 2: 0.25, 3: 0.75}  # rows: chosen0, chosen1, rejected0, rejected1
    values = torch.full(mask.shape, 99.0)
    for row, r in rewards.items():
        last = max(i for i in range(mask.shape[1]) if mask[row, i])
        values[row, last] = r
    r = gather_last(values, mask)
    assert r.tolist() == [2.0, -1.0, 0.25, 0.75]
    # Logits over a vocabulary of 10: position t predicts token t+1; fixed pseudo-random numbers.
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, mask.shape[1], 10, generator=gen)
    lm = lm_loss(logits, labels, head=lambda x: x)
    out = reward_model_loss(r[:2], r[2:], lm, rm_coef=1.0, lm_coef=0.5)

    offset = [mask.shape[1] - len(p.chosen) if side == "left" else 0 for p in pairs]
    terms = [
        -_log_softmax(logits[i, offset[i] + t - 1].tolist(), p.chosen[t])
        for i, p in enumerate(pairs)
        for t in range(p.prompt_len, len(p.chosen))
    ]
    assert len(terms) == 2 + 2  # response tokens incl. EOS: [7, 1] and [2, 1]
    hand_lm = sum(terms) / len(terms)
    hand_rank = (math.log1p(math.exp(-(2.0 - 0.25))) + math.log1p(math.exp(-(-1.0 - 0.75)))) / 2
    assert out.lm.item() == pytest.approx(hand_lm, abs=1e-5)
    assert out.ranking.item() == pytest.approx(hand_rank, abs=1e-6)
    assert out.total.item() == pytest.approx(hand_rank + 0.5 * hand_lm, abs=1e-5)
    assert out.accuracy.item() == 0.5


def test_lm_term_ignores_prompt_and_padding_logits() -> None:
    pairs = [EncodedPair(chosen=[5, 6, 7, 8, 1], rejected=[5, 6, 9, 1], prompt_len=3, index=0),
             EncodedPair(chosen=[4, 2, 1], rejected=[4, 3, 3, 3, 1], prompt_len=1, index=1)]  # fmt: skip
    batch = collate_pairs(pairs, PAD, "right")
    logits = torch.randn(2, batch["input_ids"].shape[1], 10, generator=torch.Generator().manual_seed(1))
    base = lm_loss(logits, batch["lm_labels"], head=lambda x: x)
    changed = logits.clone()
    # Positions whose next token is a prompt token, and the padding tail: none is a prediction we train.
    changed[0, 0, 6] += 100.0  # the logit of prompt token 6 where it is predicted (position 0 -> token 1)
    changed[0, 1, 7] -= 50.0  # the logit of prompt token 7 where it is predicted
    changed[1, 3:] = torch.randn(changed[1, 3:].shape)  # padding and EOS position of the shorter row
    changed[:, -1] = 1e4  # the last position predicts nothing
    assert lm_loss(changed, batch["lm_labels"], head=lambda x: x).item() == pytest.approx(base.item(), abs=1e-6)
    changed[0, 2, 8] += 10.0  # raises the logit of response token 8 where it is predicted: must matter
    assert lm_loss(changed, batch["lm_labels"], head=lambda x: x).item() != pytest.approx(base.item(), abs=1e-3)


def test_collate_labels_cover_chosen_response_only_both_sides() -> None:
    pair = EncodedPair(chosen=[5, 6, 7, 1], rejected=[5, 6, 8, 9, 9, 1], prompt_len=2, index=0)
    for side in ("left", "right"):
        batch = collate_pairs([pair], PAD, side)
        assert batch["input_ids"].shape == (2, 6)
        labelled = [t for t in batch["lm_labels"][0].tolist() if t != IGNORE_INDEX]
        assert labelled == [7, 1]
        assert batch["attention_mask"].sum().item() == 10


def test_truncation_keeps_response_end_and_shared_prompt_end() -> None:
    prompt, chosen, rejected = list(range(100, 120)), list(range(200, 230)), list(range(300, 310))
    keep, (c, r) = fit(prompt, [chosen, rejected], eos=1, max_length=32)
    assert keep == 16  # max(32 // 2, 32 - 31)
    assert c[:keep] == r[:keep] == prompt[-16:]  # same prompt tokens on both sides, its end
    assert c[keep:] == [*chosen[-15:], 1] and len(c) == 32  # end of the response + EOS
    assert r[keep:] == [*rejected, 1]  # short response untouched
    keep, (c,) = fit([7, 8], [list(range(50))], eos=1, max_length=16)
    assert keep == 2 and c == [7, 8, *range(37, 50), 1]  # short prompt kept whole, room goes to the response
    assert fit([7, 8], [[9]], eos=1, max_length=16) == (2, [[7, 8, 9, 1]])


def test_length_grouped_batches_are_deterministic_and_grouped() -> None:
    lengths = [(i * 37) % 101 for i in range(500)]
    a = length_grouped_batches(lengths, 8, seed=3, epoch=0)
    assert a == length_grouped_batches(lengths, 8, seed=3, epoch=0)
    assert a != length_grouped_batches(lengths, 8, seed=3, epoch=1)
    assert sorted(i for b in a for i in b) == list(range(500))
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in a) / len(a)
    assert spread < 10  # random batches of 8 would spread ~75


def test_schedules() -> None:
    wsd = TrainConfig(schedule="wsd", warmup_ratio=0.1, decay_ratio=0.2, min_lr_ratio=0.0)
    f = [lr_factor(s, 100, wsd) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == 1.0 and f[79] == 1.0
    assert f[80] == pytest.approx(0.95) and f[99] == pytest.approx(0.0)
    assert lr_factor(100, 100, wsd) == f[99]  # stepped past the end: stays at the floor
    cos = TrainConfig(schedule="cosine", warmup_ratio=0.0, min_lr_ratio=0.1)
    g = [lr_factor(s, 11, cos) for s in range(11)]
    assert g[0] == 1.0 and g[5] == pytest.approx(0.55) and g[10] == pytest.approx(0.1)
    assert ladder_steps(40) == {1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 13, 16, 19, 23, 27, 32, 38}
