"""RewardModel: scoring (batch invariance, padding sides), save -> plain transformers, evaluate, bad input."""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from sdk import RewardModel
from sdk.errors import CodepmpError, DataError
from sdk.losses import reward_model_loss
from tests.sdk_tiny import make_tiny_lm, planted_pairs


@pytest.fixture(scope="module", params=["untied", "tied"])
def lm_dir(request, tmp_path_factory) -> Path:
    return make_tiny_lm(tmp_path_factory.mktemp(request.param) / "lm", tie=request.param == "tied")


@pytest.fixture(scope="module")
def untied_dir(tmp_path_factory) -> Path:
    return make_tiny_lm(tmp_path_factory.mktemp("plain") / "lm")


def _mixed(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    prompts = ["".join(rng.choices(string.ascii_letters, k=rng.randint(0, 40))) for _ in range(n)]
    responses = ["".join(rng.choices(string.ascii_letters + " ", k=rng.randint(1, 90))) for _ in range(n)]
    return prompts, responses


def test_score_is_batch_invariant_over_mixed_lengths_and_padding_sides(lm_dir: Path) -> None:
    rm = RewardModel.from_pretrained(lm_dir)
    prompts, responses = _mixed(23)
    alone = rm.score(prompts, responses, max_batch=1)
    assert len(set(alone)) == len(alone)  # distinct inputs, distinct rewards: the test can see a mix-up
    for side in ("right", "left"):
        batched = rm.score(prompts, responses, max_batch=16, padding_side=side)
        assert max(abs(a - b) for a, b in zip(alone, batched, strict=True)) < 1e-4
    reversed_scores = rm.score(prompts[::-1], responses[::-1], max_batch=7)
    assert max(abs(a - b) for a, b in zip(alone[::-1], reversed_scores, strict=True)) < 1e-4  # input order kept


def _shared_prompt_batch(seed: int = 0) -> tuple[list[str], list[str]]:
    """Two prompts with 3 and 2 responses, a singleton, a 10-character prompt (too short to share) with 2,
    and a 100-character prompt with 2 responses long enough that `max_length=80` keeps the same last 40
    prompt characters for both: interleaved, so results must come back in input order."""
    rng = random.Random(seed)
    text = lambda k: "".join(rng.choices(string.ascii_letters + " ", k=k))  # noqa: E731
    a, b, single, short, long = text(30), text(25), text(40), text(10), text(100)
    rows = [(a, 5), (b, 12), (long, 45), (a, 30), (short, 8), (single, 20), (b, 1), (long, 60), (a, 17)]
    rows.append((short, 25))
    return [p for p, _ in rows], [text(k) for _, k in rows]


@pytest.mark.parametrize("max_batch", [1, 16])
def test_shared_prompt_scores_equal_each_sequence_scored_alone(
    lm_dir: Path, max_batch: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prefix sharing (one prompt forward, its KV cache repeated over the responses) changes no score and
    keeps input order; the spy checks the shared path ran on exactly the groups that qualify."""
    rm = RewardModel.from_pretrained(lm_dir)
    prompts, responses = _shared_prompt_batch()
    sequences, prompt_lens = rm._encode_responses(prompts, responses, max_length=80)
    assert prompt_lens[2] == prompt_lens[7] == 40 < len(prompts[2])  # the long prompt was cut, the same way
    alone = [rm.score_ids([s], max_batch=1)[0] for s in sequences]
    assert len(set(alone)) == len(alone)  # distinct inputs, distinct rewards: the test can see a mix-up

    calls: list[tuple[int, int]] = []
    score_shared = RewardModel._score_shared

    def spy(self, prefix, suffixes, *args):
        calls.append((len(prefix), len(suffixes)))
        return score_shared(self, prefix, suffixes, *args)

    monkeypatch.setattr(RewardModel, "_score_shared", spy)
    shared = rm.score(prompts, responses, max_batch=max_batch, max_length=80)
    assert sorted(calls) == [(25, 2), (30, 3), (40, 2)]  # not the singleton, not the 10-token prompt
    assert max(abs(a - b) for a, b in zip(alone, shared, strict=True)) < 1e-4
    reordered = rm.score(prompts[::-1], responses[::-1], max_batch=max_batch, max_length=80)
    assert max(abs(a - b) for a, b in zip(alone[::-1], reordered, strict=True)) < 1e-4
    assert not rm.module.training


def test_identical_sequences_get_exactly_equal_scores(untied_dir: Path) -> None:
    """A duplicated response (a tie in RM accuracy) scores bit-for-bit the same, wherever it lands in a batch
    with the shared-prompt path: scored once, not twice in differently shaped batches."""
    rm = RewardModel.from_pretrained(untied_dir)
    prompts, responses = _shared_prompt_batch(seed=1)
    prompts, responses = prompts + prompts[:3], responses + responses[:3]
    scores = rm.score(prompts, responses, max_batch=2, max_length=80)
    assert scores[-3:] == scores[:3]


def test_padded_loss_equals_per_sequence_hand_computation(lm_dir: Path) -> None:
    """The full model loss on a padded batch (left or right) equals the value assembled by hand from each
    sequence run alone, without padding."""
    rm = RewardModel.from_pretrained(lm_dir)
    encoded = rm.encode(pa.Table.from_pylist(planted_pairs(3, seed=5)), max_length=64).pairs
    hand_r, nll, count = [], 0.0, 0
    with torch.no_grad():
        for seq in [p.chosen for p in encoded] + [p.rejected for p in encoded]:
            ids = torch.tensor([seq])
            hand_r.append(rm.module(ids, torch.ones_like(ids))[0].item())
        for p in encoded:
            hidden = rm.module.backbone(input_ids=torch.tensor([p.chosen])).last_hidden_state[0]
            logp = torch.log_softmax(rm.module.lm_head(hidden).double(), -1)
            for t in range(p.prompt_len, len(p.chosen)):
                nll -= logp[t - 1, p.chosen[t]].item()
                count += 1
    n = len(encoded)
    pairs_r = zip(hand_r[:n], hand_r[n:], strict=True)
    hand_rank = sum(torch.nn.functional.softplus(torch.tensor(r - c)).item() for c, r in pairs_r)
    hand = hand_rank / n + nll / count
    for side in ("left", "right"):
        batch = rm.collate(encoded, padding_side=side)
        with torch.no_grad():
            rewards, lm = rm.module(batch["input_ids"], batch["attention_mask"], batch["lm_labels"])
        out = reward_model_loss(rewards[:n], rewards[n:], lm, rm_coef=1.0, lm_coef=1.0)
        assert rewards.tolist() == pytest.approx(hand_r, abs=1e-5)
        assert out.total.item() == pytest.approx(hand, abs=1e-5)


def test_save_then_plain_transformers_gives_identical_scores(lm_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rm = RewardModel.from_pretrained(lm_dir)
    with torch.no_grad():  # make the heads distinctive so a lost or re-initialised head shows
        rm.module.classifier.score.weight.mul_(3.0)
        rm.module.lm_head.weight.add_(0.01)
    out = rm.save_pretrained(tmp_path / "rm")
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    prompts, responses = _mixed(9, seed=1)
    ours = rm.score(prompts, responses)

    plain = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert plain.config.num_labels == 1 and plain.config.pad_token_id != tok.eos_token_id
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    seqs = [ids(p) + ids(r) + [tok.eos_token_id] for p, r in zip(prompts, responses, strict=True)]
    batch = tok.pad({"input_ids": seqs}, return_tensors="pt")  # the saved tokenizer pads on the right
    with torch.no_grad():
        theirs = plain(**batch).logits[:, 0].tolist()
    assert theirs == pytest.approx(ours, abs=1e-5)

    again = RewardModel.from_pretrained(out)  # our own reload restores both heads
    assert again.score(prompts, responses) == pytest.approx(ours, abs=1e-6)
    assert torch.equal(again.module.lm_head.weight, rm.module.lm_head.weight)
    assert json.loads((out / "codepmp.json").read_text())["lm_head"] == (not plain.config.tie_word_embeddings)


def test_evaluate_counts_ties_half_and_groups_by_language(untied_dir: Path) -> None:
    rm = RewardModel.from_pretrained(untied_dir)
    rows = planted_pairs(6, language=True)
    rows[0]["rejected"] = rows[0]["chosen"]  # a tie: counts half
    res = rm.evaluate(rows)
    scores_c = rm.score([r["prompt"] for r in rows], [r["chosen"] for r in rows])
    scores_r = rm.score([r["prompt"] for r in rows], [r["rejected"] for r in rows])
    wins = [1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(scores_c, scores_r, strict=True)]
    assert wins[0] == 0.5
    assert res["n"] == 6 and res["accuracy"] == pytest.approx(sum(wins) / 6)
    margins = [c - r for c, r in zip(scores_c, scores_r, strict=True)]
    assert res["mean_margin"] == pytest.approx(sum(margins) / 6, abs=1e-5)
    python = res["by_language"]["python"]
    assert python["accuracy"] == pytest.approx(sum(wins[0::2]) / 3) and python["n"] == 3
    assert python["mean_margin"] == pytest.approx(sum(margins[0::2]) / 3, abs=1e-5)
    assert set(res["by_language"]) == {"python", "rust"}


def test_pairs_sources_parquet_glob_jsonl_dataset_and_list(untied_dir: Path, tmp_path: Path) -> None:
    import datasets

    rm = RewardModel.from_pretrained(untied_dir)
    rows = planted_pairs(6)
    pq.write_table(pa.Table.from_pylist(rows[:4]), tmp_path / "train-0.parquet")
    pq.write_table(pa.Table.from_pylist(rows[4:]), tmp_path / "train-1.parquet")
    (tmp_path / "all.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    expected = rm.evaluate(rows)
    assert rm.evaluate(str(tmp_path / "train-*.parquet")) == expected
    assert rm.evaluate(tmp_path / "all.jsonl") == expected
    assert rm.evaluate(datasets.Dataset.from_list(rows)) == expected
    selected = datasets.Dataset.from_list(rows).select([0, 3])  # an indices mapping, not the full table
    assert rm.evaluate(selected) == rm.evaluate([rows[0], rows[3]])


# --------------------------------------------------------------------------- bad input


def test_pairs_errors_name_the_culprit(untied_dir: Path, tmp_path: Path) -> None:
    rm = RewardModel.from_pretrained(untied_dir)
    good = {"prompt": "p", "chosen": "a", "rejected": "b"}

    def expect(pairs, *fragments: str) -> None:
        with pytest.raises(DataError) as err:
            rm.evaluate(pairs)
        for fragment in fragments:
            assert fragment in str(err.value)
        assert isinstance(err.value, CodepmpError)

    expect(str(tmp_path / "missing.parquet"), "missing.parquet", "not found")
    expect(str(tmp_path / "nothing-*.parquet"), "no pairs file matches")
    (tmp_path / "empty.jsonl").write_text("")
    expect(str(tmp_path / "empty.jsonl"), "empty.jsonl", "empty")
    pq.write_table(pa.Table.from_pylist([{"prompt": "p", "chosen": "a"}]), tmp_path / "nocol.parquet")
    expect(str(tmp_path / "nocol.parquet"), "nocol.parquet", "rejected")
    (tmp_path / "int.jsonl").write_text(json.dumps(good) + "\n" + json.dumps({**good, "chosen": 5}) + "\n")
    expect(str(tmp_path / "int.jsonl"), "int.jsonl", "'chosen'", "row 1", "int")
    pq.write_table(pa.Table.from_pylist([good, {**good, "rejected": None}]), tmp_path / "null.parquet")
    expect(str(tmp_path / "null.parquet"), "null.parquet", "'rejected'", "row 1")
    (tmp_path / "bad.jsonl").write_text(json.dumps(good) + "\n{oops\n")
    expect(str(tmp_path / "bad.jsonl"), "bad.jsonl:2", "invalid JSON")
    expect([good, {"prompt": "p", "chosen": ["x"], "rejected": "b"}], "pairs list", "'chosen'", "row 1", "list")
    expect([], "empty")


def test_model_and_output_dir_errors(untied_dir: Path, tmp_path: Path) -> None:
    no_tok = tmp_path / "no_tokenizer"
    no_tok.mkdir()
    (no_tok / "config.json").write_text((untied_dir / "config.json").read_text())
    with pytest.raises(DataError, match=r"no_tokenizer has no tokenizer"):
        RewardModel.from_pretrained(no_tok)
    with pytest.raises(CodepmpError, match="not found"):
        RewardModel.from_pretrained(tmp_path / "does-not-exist")
    rm = RewardModel.from_pretrained(untied_dir)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(DataError, match=r"a_file.* not writable"):
        rm.save_pretrained(tmp_path / "a_file" / "rm")
    with pytest.raises(DataError, match="2 prompts but 1 responses"):
        rm.score(["a", "b"], ["c"])


@pytest.mark.slow
def test_bundled_model_by_registry_name_scores_and_round_trips(tmp_path: Path) -> None:
    """The real SmolLM2 through its registry name: invariant scores, pad distinct from EOS, plain reload."""
    from transformers import AutoModelForSequenceClassification

    rm = RewardModel.from_pretrained("smollm2-135m-instruct")
    assert rm.tokenizer.pad_token_id != rm.tokenizer.eos_token_id
    prompts = ["Write a function that adds two numbers.\n", "Reverse a list in Python.\n", "Say hi.\n"]
    responses = ["def add(a, b):\n    return a + b\n", "xs[::-1]", "def hi():\n    print('hi')\n    return None\n"]
    alone = rm.score(prompts, responses, max_batch=1)
    batched = rm.score(prompts, responses, padding_side="left")
    assert max(abs(a - b) for a, b in zip(alone, batched, strict=True)) < 1e-4
    out = rm.save_pretrained(tmp_path / "rm")
    plain = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tok = rm.tokenizer
    ids = (
        tok(prompts[0], add_special_tokens=False)["input_ids"]
        + tok(responses[0], add_special_tokens=False)["input_ids"]
    )
    with torch.no_grad():
        plain_score = plain(torch.tensor([[*ids, tok.eos_token_id]])).logits[0, 0].item()
    assert plain_score == pytest.approx(alone[0], abs=1e-4)
