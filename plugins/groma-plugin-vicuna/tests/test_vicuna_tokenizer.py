"""The Groma tokenizer on a SentencePiece model trained here gives the transformers-4.32 slow LLaMA tokenizer ids."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sentencepiece as spm

from groma_core import tokens as T
from groma_core.prompt import TEMPLATES, GromaTokenizer

RECORDED = Path(__file__).parent / "data" / "llama_tokenizer_4_32_ids.json"
REC_PROMPT = TEMPLATES["llava"].render([("Locate <p>the man in a red shirt</p> in the image.", None)])


@pytest.fixture(scope="module")
def tokenizer(sp_tokenizer_dir) -> GromaTokenizer:
    return GromaTokenizer.from_directory(sp_tokenizer_dir)


@pytest.fixture(scope="module")
def sp(sp_tokenizer_dir) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(sp_tokenizer_dir / "tokenizer.model"))


def test_trained_model_has_llama_special_ids(sp):
    assert sp.get_piece_size() == 400
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2)


def test_new_tokens_follow_the_base_vocabulary_in_reference_order(tokenizer):
    offset = tokenizer.offset
    assert offset == 400
    assert tokenizer.vocab_size == offset + 114
    for index, token in enumerate(T.NEW_TOKENS):
        assert tokenizer.encode(token, add_bos=False) == [offset + index], token
    assert tokenizer.token_id("[PAD]") == tokenizer.pad_id == offset
    assert tokenizer.token_id("<image>") == offset + 8
    assert tokenizer.token_id("<r0>") == offset + 14
    assert tokenizer.token_id("<r99>") == offset + 113


def test_whitespace_around_new_tokens_is_stripped(tokenizer):
    assert tokenizer.encode("Locate <p> a dog </p> in") == tokenizer.encode("Locate<p>a dog</p>in")
    assert tokenizer.encode("a  b   <p>  c  </p>  d") == tokenizer.encode("a  b<p>c</p>d")


def test_each_chunk_after_a_new_token_gets_its_own_dummy_prefix(tokenizer, sp):
    ids = tokenizer.encode("Locate <p>dog</p> in", add_bos=False)
    p_open, p_close = tokenizer.token_id("<p>"), tokenizer.token_id("</p>")
    assert ids == sp.encode("Locate") + [p_open] + sp.encode("dog") + [p_close] + sp.encode("in")
    after_open = sp.id_to_piece(ids[ids.index(p_open) + 1])
    after_close = sp.id_to_piece(ids[ids.index(p_close) + 1])
    assert after_open.startswith("\u2581") and after_close.startswith("\u2581")


def test_eos_is_one_id_and_keeps_the_spaces_around_it(tokenizer, sp):
    eos = sp.eos_id()
    spaced = tokenizer.encode("it? </s> USER: x", add_bos=False)
    assert spaced == sp.encode("it? ") + [eos] + sp.encode(" USER: x")
    assert spaced.count(eos) == 1
    assert spaced != tokenizer.encode("it?</s>USER: x", add_bos=False)


def test_rec_prompt_has_bos_one_image_and_one_region(tokenizer):
    ids = tokenizer.encode(REC_PROMPT)
    assert ids[0] == tokenizer.bos_id == 1
    assert ids.count(tokenizer.token_id("<image>")) == 1
    assert ids.count(tokenizer.token_id("<region>")) == 1
    assert ids.count(tokenizer.eos_id) == 1
    assert ids.count(tokenizer.token_id("<p>")) == ids.count(tokenizer.token_id("</p>")) == 1


def test_ids_equal_those_recorded_from_transformers_4_32(tokenizer, sp_fingerprint):
    """The recorded ids came from transformers 4.32.0's slow LlamaTokenizer with Groma's tokens added, on the same
    trained model; a different sentencepiece release may train another vocabulary, which the fingerprint detects."""
    recorded = json.loads(RECORDED.read_text())
    if sp_fingerprint != recorded["vocabulary_sha256"]:
        pytest.skip("this sentencepiece release trained a different vocabulary than the recorded one")
    assert any(case["text"] == REC_PROMPT for case in recorded["cases"])
    for case in recorded["cases"]:
        assert tokenizer.encode(case["text"]) == case["ids"], case["text"]
