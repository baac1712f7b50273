"""Fixtures of the vicuna plugin tests: a SentencePiece model trained here, tiny LLaMA models saved to disk."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from groma_core.prompt import IMAGE_TURN, IMAGE_TURN_REPLY, SYSTEM
from groma_core.testing.tiny import make_sentencepiece

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TRAINING_LINES = [
    SYSTEM,
    IMAGE_TURN.replace("<image>", "").replace("<region>", ""),
    IMAGE_TURN_REPLY,
    "Locate the man in a red shirt in the image.",
    "What is this? Please describe the region in details.",
    "A dog runs on the grass next to a small red car.",
    "USER: ASSISTANT: Can you spot the woman in the photograph?",
    "Which region matches the description of a cat sleeping on a sofa?",
    "There are two people and a bicycle near the tree.",
    "Give me a concise description of the image. Locate all the objects in this image.",
]
SP_VOCAB_SIZE = 400


def train_sentencepiece(directory: Path, vocab_size: int = SP_VOCAB_SIZE) -> Path:
    """Train a tiny LLaMA-like SentencePiece model (BPE) and save it as ``directory/tokenizer.model``."""
    return make_sentencepiece(directory, vocab_size, lines=TRAINING_LINES, repeat=20, split_digits=True, num_threads=1)


def vocabulary_fingerprint(model_file: Path) -> str:
    """sha256 of the pieces and scores of a SentencePiece model (its file bytes also hold the training paths)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    lines = "\n".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i)}" for i in range(sp.get_piece_size()))
    return hashlib.sha256(lines.encode()).hexdigest()


def tiny_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    """A random two-layer LlamaForCausalLM (H=32) in eval mode."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def make_tiny_llama():
    """The :func:`tiny_llama` builder."""
    return tiny_llama


@pytest.fixture(scope="session")
def sp_tokenizer_dir(tmp_path_factory) -> Path:
    """A directory holding only the trained ``tokenizer.model``."""
    directory = tmp_path_factory.mktemp("sp")
    train_sentencepiece(directory)
    return directory


@pytest.fixture(scope="session")
def sp_fingerprint(sp_tokenizer_dir) -> str:
    """:func:`vocabulary_fingerprint` of the trained model."""
    return vocabulary_fingerprint(sp_tokenizer_dir / "tokenizer.model")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, sp_tokenizer_dir) -> Path:
    """A saved tiny LlamaForCausalLM whose vocabulary is the trained tokenizer's, with its ``tokenizer.model``."""
    directory = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(SP_VOCAB_SIZE).save_pretrained(directory)
    (directory / "tokenizer.model").write_bytes((sp_tokenizer_dir / "tokenizer.model").read_bytes())
    return directory
