"""Tiny random models and planted-preference pairs for the SDK tests (mechanics, not quality).

A character-level tokenizer built in code (no download) and a 2-block Llama with hidden size 32.
"""

from __future__ import annotations

import random
import string
from pathlib import Path

CHARS = string.ascii_letters + string.digits + string.punctuation + " \n"
SPECIALS = ["<pad>", "<eos>", "<unk>"]


def build_tokenizer():
    """Character-level fast tokenizer: one id per character, so lengths are easy to reason about."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + list(CHARS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


def make_tiny_lm(directory: Path, *, tie: bool = False, layers: int = 2, seed: int = 0) -> Path:
    """Save a random causal LM + tokenizer as a normal HF dir."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tie,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _answer(rng: random.Random, marker: str) -> str:
    text = rng.choices(string.ascii_lowercase, k=rng.randint(3, 40))
    text.insert(rng.randint(0, len(text)), marker)
    return "".join(text)


def planted_pairs(n: int, seed: int = 0, language: bool = False) -> list[dict]:
    """Answers are random lowercase text of 4-41 characters; the chosen one hides a `!`, the rejected one a
    `?`, anywhere: the model must carry one token's information to the EOS where the reward is read."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt = "".join(rng.choices(string.ascii_uppercase + " ", k=rng.randint(3, 30)))
        row = {"prompt": prompt + ":", "chosen": _answer(rng, "!"), "rejected": _answer(rng, "?")}
        if language:
            row["language"] = ["python", "rust"][i % 2]
        rows.append(row)
    return rows
