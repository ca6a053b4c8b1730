"""The SDK against a careless user or an attacker: output dirs never lose a file codepmp did not write, and
inputs that used to give silent wrong results are one-line errors naming the culprit. Tiny random models."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch

import sdk.train
from sdk import RewardModel, best_of_n
from sdk.config import TrainConfig
from sdk.errors import DataError
from sdk.train import train
from tests.sdk_tiny import make_tiny_lm, planted_pairs

ROOT = Path(__file__).resolve().parents[1]
FAST = {"precision": "fp32", "weight_decay": 0.0, "warmup_ratio": 0.0, "learning_rate": 3e-3, "zero_stage": 0,
        "micro_batch_pairs": 4, "grad_accum_steps": 1}  # fmt: skip


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_lm(tmp_path_factory.mktemp("tiny") / "lm")


@pytest.fixture(scope="module")
def rm(lm_dir: Path) -> RewardModel:
    return RewardModel.from_pretrained(lm_dir)


def tree(root: Path) -> dict[str, bytes]:
    """Every file under `root` with its bytes, by relative path."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def plain_scores(path: Path) -> list[float]:
    """Scores from plain transformers: what a user of the saved dir gets."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    ids = tok(["A:abc<eos>", "B:xyz!<eos>"], padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**ids).logits.squeeze(-1).tolist()


# --------------------------------------------------------------------------- save_pretrained


def test_save_into_a_dir_with_a_user_file_is_refused_and_the_file_kept(rm: RewardModel, tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    with pytest.raises(DataError, match=r"mine holds files codepmp did not write \(notes.txt\).*overwrite=True"):
        rm.save_pretrained(out)
    assert tree(out) == {"notes.txt": b"my notes"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no temp dir left beside it


def test_overwrite_replaces_only_our_files_and_keeps_the_users(
    rm: RewardModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "mixed"
    (out / "data").mkdir(parents=True)
    (out / "notes.txt").write_text("my notes")
    (out / "data" / "rows.csv").write_text("a,b\n")
    rm.save_pretrained(out, overwrite=True)
    files = tree(out)
    assert files["notes.txt"] == b"my notes" and files["data/rows.csv"] == b"a,b\n"
    recorded = json.loads(files["codepmp.json"])["files"]
    assert "notes.txt" not in recorded and "model.safetensors" in recorded and "config.json" in recorded
    assert set(files) == {*recorded, "codepmp.json", "notes.txt", "data/rows.csv"}
    assert plain_scores(out) == pytest.approx(rm.score(["A:", "B:"], ["abc", "xyz!"]), abs=1e-5)

    with pytest.raises(DataError, match=r"notes.txt"):  # still mixed: refused without the flag
        rm.save_pretrained(out)
    classifier = rm.module.classifier
    monkeypatch.setattr(
        classifier, "save_pretrained", functools.partial(classifier.save_pretrained, max_shard_size="20KB")
    )
    rm.save_pretrained(out, overwrite=True)  # and again with it, sharded: the user's files still there
    assert tree(out)["notes.txt"] == b"my notes" and tree(out)["data/rows.csv"] == b"a,b\n"
    assert (out / "model.safetensors.index.json").is_file()
    monkeypatch.undo()
    rm.save_pretrained(out, overwrite=True)  # unsharded: the shards of the save before are ours, and go
    files = tree(out)
    assert set(files) == {*json.loads(files["codepmp.json"])["files"], "codepmp.json", "notes.txt", "data/rows.csv"}
    assert not [f for f in files if f.startswith("model-") or f.endswith(".index.json")], sorted(files)
    assert plain_scores(out) == pytest.approx(rm.score(["A:", "B:"], ["abc", "xyz!"]), abs=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mixed"]


def test_a_forged_marker_cannot_make_a_save_delete_files(rm: RewardModel, tmp_path: Path) -> None:
    out = tmp_path / "forged"
    out.mkdir()
    (tmp_path / "victim.txt").write_text("keep me")
    (out / "victim.txt").write_text("keep me too")
    (out / "codepmp.json").write_text(json.dumps({"files": ["../victim.txt", "victim.txt", "/etc/hostname"]}))
    with pytest.raises(DataError, match=r"forged holds files codepmp did not write \(codepmp.json, victim.txt\)"):
        rm.save_pretrained(out)
    rm.save_pretrained(out, overwrite=True)
    assert (tmp_path / "victim.txt").read_text() == "keep me" and (out / "victim.txt").read_text() == "keep me too"
    rm.save_pretrained(out, overwrite=True)  # the marker is ours now, and names only what the save wrote
    assert (out / "victim.txt").read_text() == "keep me too"


def test_a_second_save_replaces_our_dir_whole_no_stale_shard(
    rm: RewardModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "rm"
    classifier = rm.module.classifier
    monkeypatch.setattr(
        classifier, "save_pretrained", functools.partial(classifier.save_pretrained, max_shard_size="20KB")
    )
    rm.save_pretrained(out)
    assert (out / "model.safetensors.index.json").is_file()  # the first save is sharded
    monkeypatch.undo()
    rm.save_pretrained(out)  # ours and only ours: no overwrite flag needed
    files = tree(out)
    assert not [f for f in files if f.startswith("model-") or f.endswith(".index.json")], sorted(files)
    assert set(files) == {*json.loads(files["codepmp.json"])["files"], "codepmp.json"}
    assert plain_scores(out) == pytest.approx(rm.score(["A:", "B:"], ["abc", "xyz!"]), abs=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rm"]


@pytest.mark.parametrize("where", ["ours", "mixed"])
def test_a_save_that_dies_halfway_leaves_the_previous_one(
    rm: RewardModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    out = tmp_path / "rm"
    if where == "mixed":
        out.mkdir()
        (out / "notes.txt").write_text("my notes")
    rm.save_pretrained(out, overwrite=where == "mixed")
    before = tree(out)

    def die(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(rm.tokenizer, "save_pretrained", die)  # after the weights were written
    with pytest.raises(RuntimeError, match="disk full"):
        rm.save_pretrained(out, overwrite=where == "mixed")
    assert tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rm"]


def test_precious_dirs_are_refused_whatever_the_flag(
    rm: RewardModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("a precious dir got past the check")

    for name in ("rmtree", "move", "copytree"):  # should the check ever regress, nothing real is touched
        monkeypatch.setattr(f"shutil.{name}", never)
    for name in ("replace", "rename", "unlink", "rmdir", "mkdir"):
        monkeypatch.setattr(f"os.{name}", never)
    for precious in ("/", Path.home(), ROOT):  # the real ones: refused before anything is looked at
        with pytest.raises(DataError, match=r"refusing .* (root|home|checkout)"):
            rm.save_pretrained(precious)
    monkeypatch.undo()
    home = tmp_path / "home"  # an empty home would pass every other check: only its being home stops it
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    with pytest.raises(DataError, match=rf"refusing {home}: .*home"):
        rm.save_pretrained(home, overwrite=True)
    with pytest.raises(DataError, match=rf"refusing {home}: .*home"):
        rm.pretrain(planted_pairs(8), home, overwrite=True, max_steps=1, **FAST)
    assert list(home.iterdir()) == []


def test_a_file_where_the_dir_should_be_is_refused(rm: RewardModel, tmp_path: Path) -> None:
    (tmp_path / "rm").write_text("not a dir")
    with pytest.raises(DataError, match=r"rm is a file, not a directory"):
        rm.save_pretrained(tmp_path / "rm", overwrite=True)
    assert (tmp_path / "rm").read_text() == "not a dir"


# --------------------------------------------------------------------------- training output dirs


def _no_training(*args: object, **kwargs: object) -> None:
    raise AssertionError("training work started before the output dir was checked")


def test_pretrain_into_a_foreign_dir_is_refused_before_any_work(
    lm_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "project"
    out.mkdir()
    (out / "metrics.jsonl").write_text("my own metrics\n")
    monkeypatch.setattr(sdk.train, "load_pairs", _no_training)
    monkeypatch.setattr(sdk.train, "setup_distributed", _no_training)
    model = RewardModel.from_pretrained(lm_dir)
    for call in (model.pretrain, model.finetune):
        with pytest.raises(DataError, match=r"project is not empty and not a codepmp training dir.*overwrite=True"):
            call(planted_pairs(8), out, max_steps=1, **FAST)
    assert tree(out) == {"metrics.jsonl": b"my own metrics\n"}


def test_a_user_file_in_final_is_refused_before_training(
    lm_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    (out / "final").mkdir(parents=True)
    (out / "codepmp-train.json").write_text("{}")  # our training dir, but final/ holds a user's file
    (out / "final" / "eval.txt").write_text("mine")
    monkeypatch.setattr(sdk.train, "setup_distributed", _no_training)
    with pytest.raises(DataError, match=r"final holds files codepmp did not write \(eval.txt\)"):
        RewardModel.from_pretrained(lm_dir).pretrain(planted_pairs(8), out, max_steps=1, **FAST)
    assert (out / "final" / "eval.txt").read_text() == "mine"


def test_overwrite_trains_beside_the_users_files(lm_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "project"
    (out / "final").mkdir(parents=True)
    (out / "README.md").write_text("my project")
    (out / "final" / "eval.txt").write_text("mine")
    result = RewardModel.from_pretrained(lm_dir).pretrain(planted_pairs(16), out, overwrite=True, max_steps=2, **FAST)
    assert (out / "README.md").read_text() == "my project" and (out / "final" / "eval.txt").read_text() == "mine"
    assert (result.final_dir / "model.safetensors").is_file() and (out / "codepmp-train.json").is_file()


def test_the_stage_record_is_the_runners() -> None:
    from pipelines.runner import RECORD

    assert sdk.train.STAGE_RECORD == RECORD


def test_resume_in_our_own_dir_and_in_a_runner_stage_dir(lm_dir: Path, tmp_path: Path) -> None:
    """The runner makes the stage dir and writes its `_stage.json` (and finetune's `data/`) before training."""
    out = tmp_path / "pretrain"
    (out / "data").mkdir(parents=True)
    (out / "_stage.json").write_text('{"status": "running"}')
    cfg = TrainConfig(max_steps=4, save_every_steps=2, **FAST)

    def crash_at_3(step: int, row: dict[str, float]) -> None:
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(RewardModel.from_pretrained(lm_dir), planted_pairs(32), out, cfg, on_step=crash_at_3)
    assert (out / "codepmp-train.json").is_file() and (
        out / "checkpoints" / "latest"
    ).read_text().strip() == "step-0000002"
    result = train(RewardModel.from_pretrained(lm_dir), planted_pairs(32), out, cfg)
    assert result.resumed_from == 2 and result.steps == 4
    first = tree(result.final_dir)
    again = train(RewardModel.from_pretrained(lm_dir), planted_pairs(32), out, cfg)  # final/ is ours: replaced
    assert again.resumed_from == 2 and tree(again.final_dir).keys() == first.keys()
    assert (out / "_stage.json").read_text() == '{"status": "running"}'


# --------------------------------------------------------------------------- silent wrong results


def test_score_refuses_a_bare_string(rm: RewardModel) -> None:
    with pytest.raises(DataError, match=r"score: prompts is a str, expected a list of strings"):
        rm.score("abc", "xyz")
    with pytest.raises(DataError, match=r"score: responses is a str, expected a list of strings"):
        rm.score(["abc"], "x")
    with pytest.raises(DataError, match=r"score: responses\[1\] is a bytes"):
        rm.score(["a", "b"], ["x", b"y"])
    with pytest.raises(DataError, match=r"score: 2 prompts but 1 responses"):
        rm.score(["a", "b"], ["x"])


@pytest.mark.parametrize("max_length", [0, -5, 1, 2])
def test_a_max_length_that_holds_no_response_token_is_refused(rm: RewardModel, max_length: int) -> None:
    with pytest.raises(DataError, match=rf"max_length={max_length}\b.*at least 3"):
        rm.score(["A:", "A:"], ["good answer", "bad answer"], max_length=max_length)
    with pytest.raises(DataError, match=rf"max_length={max_length}\b"):
        rm.evaluate([{"prompt": "A:", "chosen": "good", "rejected": "bad"}], max_length=max_length)
    with pytest.raises(DataError, match=rf"max_length={max_length}\b"):
        best_of_n("A:", ["good", "bad"], reward_model=rm, max_length=max_length)
    assert len(set(rm.score(["A:", "A:"], ["good answer", "bad answez"], max_length=3))) == 2  # the smallest


def test_best_of_n_refuses_a_string_where_candidates_belong(rm: RewardModel) -> None:
    with pytest.raises(DataError, match=r"generator returned a str for prompt 1, expected a list of 2 strings"):
        best_of_n(["p", "q"], reward_model=rm, generator=lambda p, n: ["x", "y"] if p == "p" else "ab", n=2)
    with pytest.raises(DataError, match=r"candidates is a str, expected a list of strings"):
        best_of_n("p", "abc", reward_model=rm)
