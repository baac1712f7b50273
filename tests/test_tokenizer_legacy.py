"""GromaTokenizer against ids recorded from transformers 4.32.0's slow LlamaTokenizer, legacy=True and legacy=False."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from groma_core import tokens as T
from groma_core.grounding import parse_grounded
from groma_core.prompt import (
    IMAGE_TURN,
    IMAGE_TURN_REPLY,
    SYSTEM,
    TEMPLATES,
    GromaTokenizer,
    HFTokenizerCodec,
    SentencePieceCodec,
)
from groma_core.testing.tiny import make_sentencepiece

TRAINING_LINES = [
    SYSTEM,
    IMAGE_TURN.replace("<image>", "").replace("<region>", ""),
    IMAGE_TURN_REPLY,
    "Locate the man in a red shirt in the image.",
    "What is this? Please describe the region in details.",
    "A dog runs on the grass next to a small red car.",
    "USER: ASSISTANT: Can you spot the woman in the photograph?",
    "Give me a concise description of the image. Locate all the objects in this image.",
    'He wrote ">> see above" and x>y, then a>>b and >the end>>.',
    "Numbers 12345 and 678, tabs\tand  double  spaces.",
]


def train_sentencepiece(directory: Path, model_type: str = "bpe", vocab_size: int = 380) -> Path:
    """Train a tiny LLaMA-like SentencePiece model into ``directory/tokenizer.model``."""
    return make_sentencepiece(
        directory, vocab_size, lines=TRAINING_LINES, repeat=20, model_type=model_type, split_digits=True, num_threads=1
    )


def vocabulary_fingerprint(model_file: Path) -> str:
    """sha256 of the pieces and scores of a SentencePiece model."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    lines = "\n".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i)}" for i in range(sp.get_piece_size()))
    return hashlib.sha256(lines.encode()).hexdigest()


RECORDED = Path(__file__).parent / "data" / "llama_tokenizer_4_32_legacy_ids.json"
MODEL_TYPES = ("bpe", "unigram")
LLAVA = TEMPLATES["llava"]
REC_PROMPT = LLAVA.render([("Locate <p>the man in a red shirt</p> in the image.", None)])
REFER_PROMPT = LLAVA.render(
    [("What is <roi><refer_box></roi><refer_feat>? Please describe the region in details.", None)]
)


@pytest.fixture(scope="module")
def recorded() -> dict:
    return json.loads(RECORDED.read_text())


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    """One directory per model type holding the trained ``tokenizer.model``."""
    root = tmp_path_factory.mktemp("sp-legacy")
    return {kind: train_sentencepiece(root / kind, kind).parent for kind in MODEL_TYPES}


@pytest.fixture(scope="module")
def bpe(model_dirs) -> SentencePieceCodec:
    return SentencePieceCodec(model_dirs["bpe"] / "tokenizer.model")


def piece(codec: SentencePieceCodec, token_id: int) -> str:
    return codec.sp.id_to_piece(token_id)


# -- the recorded ids ----------------------------------------------------------------------------------------------
def test_recordings_cover_the_reference_prompts_and_the_edge_cases(recorded):
    texts = recorded["texts"]
    assert REC_PROMPT in texts and REFER_PROMPT in texts
    assert any(t.count("</s>USER:") >= 3 for t in texts)  # a multi-turn conversation
    for edge in (
        "<s>Hello there",
        "</s>USER: hi",
        "<p>the man</p>",
        "<r3>the man",
        "a\u2581<p>b\u2581c</p>\u2581",
        "  ",
    ):
        assert any(t.startswith(edge) for t in texts), edge


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy_true", "legacy_false"])
@pytest.mark.parametrize("kind", MODEL_TYPES)
def test_ids_equal_those_of_transformers_4_32(recorded, model_dirs, kind, legacy):
    """The recorded ids came from transformers 4.32.0's slow LlamaTokenizer on the same trained models; another
    sentencepiece release may train another vocabulary, which the fingerprint detects."""
    model = model_dirs[kind] / "tokenizer.model"
    if vocabulary_fingerprint(model) != recorded["vocabulary_sha256"][kind]:
        pytest.skip(f"this sentencepiece release trained a different {kind} vocabulary than the recorded one")
    tokenizer = GromaTokenizer(SentencePieceCodec(model), legacy=legacy)
    expected = recorded["ids"][kind]["legacy_true" if legacy else "legacy_false"]
    for text, ids in zip(recorded["texts"], expected, strict=True):
        if ids is None:  # 4.32 raised on the empty text with legacy=False; here it is the bos id alone
            assert text == "" and tokenizer.encode(text) == [tokenizer.bos_id]
            continue
        assert tokenizer.encode(text) == ids, text


# -- what legacy=False changes -------------------------------------------------------------------------------------
def test_text_after_a_new_token_has_no_leading_space_piece(bpe):
    old, new = GromaTokenizer(bpe), GromaTokenizer(bpe, legacy=False)
    for tokenizer, prefixed in ((old, True), (new, False)):
        ids = tokenizer.encode("Locate <p>the man</p> in the image", add_bos=False)
        for token in ("<p>", "</p>"):
            after = ids[ids.index(tokenizer.token_id(token)) + 1]
            assert piece(bpe, after).startswith("\u2581") is prefixed, (tokenizer.legacy, token)
    # the whitespace around new tokens is stripped in both modes
    assert new.encode("Locate <p> the man </p> in") == new.encode("Locate<p>the man</p>in")


def test_text_after_a_base_special_token_keeps_only_its_own_spaces(bpe):
    new = GromaTokenizer(bpe, legacy=False)
    eos = new.eos_id
    glued = new.encode("it?</s>USER: x", add_bos=False)
    spaced = new.encode("it? </s> USER: x", add_bos=False)
    assert piece(bpe, glued[glued.index(eos) + 1]) == "U"
    assert piece(bpe, spaced[spaced.index(eos) + 1]) == "\u2581"
    # legacy=True adds a dummy prefix on top of the space: two "▁" after </s>
    old = GromaTokenizer(bpe).encode("it? </s> USER: x", add_bos=False)
    assert [piece(bpe, i) for i in old[old.index(eos) + 1 : old.index(eos) + 3]] == ["\u2581", "\u2581"]


def test_text_starting_with_a_token_keeps_a_lone_prefix_piece_except_before_special_tokens(bpe):
    new = GromaTokenizer(bpe, legacy=False)
    underline = bpe.sp.piece_to_id("\u2581")
    assert new.encode("<p>dog", add_bos=False)[:2] == [underline, new.token_id("<p>")]
    assert new.encode("<r3>dog", add_bos=False)[:2] == [underline, new.token_id("<r3>")]
    for special in ("<s>", "</s>", "<unk>", "[PAD]"):
        assert new.encode(special + "dog", add_bos=False)[0] == new.token_id(special), special
    assert GromaTokenizer(bpe).encode("<p>dog", add_bos=False)[0] == new.token_id("<p>")


def test_underline_characters_are_spaces(bpe):
    new = GromaTokenizer(bpe, legacy=False)
    assert new.encode("a\u2581b\u2581<p>c") == new.encode("a b <p>c") == new.encode("a b<p>c")
    old = GromaTokenizer(bpe)
    assert old.encode("a\u2581b\u2581<p>c") != old.encode("a b<p>c")  # legacy=True does not strip a "▁"


def test_chunks_are_encoded_after_unk_and_lose_what_merges_with_it(bpe):
    """4.32 encodes "<unk>" + chunk and cuts the pieces of "<unk>": the trained ">>" piece eats one ">"."""
    assert bpe.sp.piece_to_id(">>") != bpe.sp.unk_id()
    new = GromaTokenizer(bpe, legacy=False)
    ids = new.encode("<p>>> quoted</p>", add_bos=False)
    text = ids[ids.index(new.token_id("<p>")) + 1 : ids.index(new.token_id("</p>"))]
    assert bpe.decode(text) == "> quoted"
    assert bpe.decode(new.encode("the end>> x", add_bos=False)).endswith("end>> x")  # untouched inside a chunk


def test_decoded_text_after_new_tokens_is_spaced_as_with_legacy_true(bpe):
    regions = torch.tensor([[0.1, 0.2, 0.5, 0.6]])
    answers = []
    for legacy in (True, False):
        tokenizer = GromaTokenizer(bpe, legacy=legacy)
        ids = tokenizer.encode("There is <p>a dog</p><roi><r0></roi> on the grass.", add_bos=False)
        answers.append(parse_grounded(ids, tokenizer, regions))
    old, new = answers
    assert new.text == old.text == "There is a dog on the grass."
    assert [(p.phrase, p.span, p.region_ids) for p in new.phrases] == [("a dog", (9, 14), [0])]
    assert [(p.phrase, p.span) for p in old.phrases] == [(p.phrase, p.span) for p in new.phrases]


# -- where legacy comes from ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("config", "legacy"),
    [(None, True), ({}, True), ({"legacy": None}, True), ({"legacy": True}, True), ({"legacy": False}, False)],
)
def test_from_directory_reads_legacy_from_tokenizer_config(tmp_path, model_dirs, config, legacy):
    (tmp_path / "tokenizer.model").write_bytes((model_dirs["bpe"] / "tokenizer.model").read_bytes())
    if config is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", **config}))
    tokenizer = GromaTokenizer.from_directory(tmp_path)
    assert tokenizer.legacy is legacy
    reference = GromaTokenizer(SentencePieceCodec(tmp_path / "tokenizer.model"), legacy=legacy)
    assert tokenizer.encode(REC_PROMPT) == reference.encode(REC_PROMPT)
    assert GromaTokenizer.from_directory(tmp_path, legacy=not legacy).legacy is not legacy  # the argument wins


def test_save_keeps_legacy_and_offset(tmp_path, bpe):
    tokenizer = GromaTokenizer(bpe, legacy=False, offset=bpe.vocab_size + 7)
    tokenizer.save(tmp_path)
    back = GromaTokenizer.from_directory(tmp_path)
    assert (back.legacy, back.offset, back.new_tokens) == (False, bpe.vocab_size + 7, T.NEW_TOKENS)
    assert back.encode(REFER_PROMPT) == tokenizer.encode(REFER_PROMPT)
    assert GromaTokenizer.from_directory(tmp_path, offset=bpe.vocab_size).offset == bpe.vocab_size


def test_legacy_false_needs_a_sentencepiece_model(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "dog": 2}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]")
    with pytest.raises(ValueError, match="legacy=False needs a SentencePiece model"):
        GromaTokenizer(HFTokenizerCodec(fast), legacy=False)
    fast.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "legacy": False}))
    tokenizer = GromaTokenizer.from_directory(tmp_path)  # the HF tokenizer applies its own settings
    assert tokenizer.legacy is True and tokenizer.encode("a <p>dog", add_bos=False) == [1, tokenizer.offset + 6, 2]


# -- an explicit offset ----------------------------------------------------------------------------------------------
def test_offset_places_the_new_tokens_after_a_larger_embedding_table(bpe):
    base = GromaTokenizer(bpe)
    rows = bpe.vocab_size + 20  # e.g. Qwen2: 151936 embedding rows for 151665 tokens
    tokenizer = GromaTokenizer(bpe, offset=rows)
    assert tokenizer.offset == tokenizer.pad_id == rows and tokenizer.vocab_size == rows + T.NUM_NEW_TOKENS
    assert tokenizer.token_id("<image>") == rows + 8 and tokenizer.token_id("<r99>") == rows + 113
    assert tokenizer.region_ids == [rows + 14 + k for k in range(T.MAX_REGIONS)]
    assert tokenizer.region_index(rows + 14 + 5) == 5 and tokenizer.region_index(base.token_id("<r5>")) is None
    assert tokenizer.token_id("</s>") == base.token_id("</s>")
    ids, base_ids = tokenizer.encode(REC_PROMPT), base.encode(REC_PROMPT)
    shift = rows - bpe.vocab_size
    assert ids == [i + shift if i >= bpe.vocab_size else i for i in base_ids]
    assert tokenizer.decode(ids) == base.decode(base_ids)
    assert all(tokenizer.is_new_token(i) for i in ids if i >= rows)


def test_ids_between_the_vocabulary_and_the_offset_decode_to_nothing(bpe):
    tokenizer = GromaTokenizer(bpe, offset=bpe.vocab_size + 20)
    ids = tokenizer.encode("<p>a dog</p><roi><r1></roi>", add_bos=False)
    gap = bpe.vocab_size + 3
    noisy = ids[:2] + [gap] + ids[2:]
    assert tokenizer.decode(noisy) == tokenizer.decode(ids) == "<p> a dog </p> <roi> <r1> </roi>"
    regions = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]])
    answer = parse_grounded(noisy, tokenizer, regions)
    assert answer.text == "a dog" and answer.phrases[0].region_ids == [1]


def test_offset_inside_the_vocabulary_is_refused(bpe):
    with pytest.raises(ValueError, match="offset"):
        GromaTokenizer(bpe, offset=bpe.vocab_size - 1)
