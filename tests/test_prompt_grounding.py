"""The reference prompt format, the tokenizer's added-token rules and the grounded-answer parser."""

from __future__ import annotations

import pytest
import torch

from groma_core import tokens as T
from groma_core.grounding import parse_grounded
from groma_core.prompt import TEMPLATES, GromaTokenizer, SentencePieceCodec

REFERENCE_REC_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, "
    "and polite answers to the user's questions. USER: Here is an image with region crops from it. Image: <image>. "
    "Regions: <region>. ASSISTANT: Thank you for the image! How can I assist you with it?</s>USER: Locate <p>the man "
    "in a red shirt</p> in the image. ASSISTANT:"
)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from groma_core.testing.tiny import make_sentencepiece

    d = tmp_path_factory.mktemp("tok")
    return GromaTokenizer(SentencePieceCodec(make_sentencepiece(d)))


def test_llava_template_renders_the_reference_prompt():
    rendered = TEMPLATES["llava"].render([("Locate <p>the man in a red shirt</p> in the image.", None)])
    assert rendered == REFERENCE_REC_PROMPT


def test_default_template_has_no_eos_and_multi_turn_closes_answers():
    two = TEMPLATES["llava"].render([("Hi.", "Hello."), ("Where?", None)])
    assert two.endswith("USER: Hi. ASSISTANT: Hello.</s>USER: Where? ASSISTANT:")
    assert "</s>" not in TEMPLATES["default"].render([("Hi.", "Hello.")])


def test_new_token_ids_follow_the_reference_order(tok):
    assert tok.token_id(T.PAD) == tok.offset and tok.token_id(T.IMAGE) == tok.offset + 8
    assert tok.token_id("<r0>") == tok.offset + 14 and tok.token_id("<r99>") == tok.offset + 113
    assert tok.vocab_size == tok.offset + 114
    assert tok.region_index(tok.offset + 14 + 7) == 7 and tok.region_index(5) is None


def test_whitespace_around_new_tokens_is_stripped(tok):
    assert tok.encode("Locate <p> a dog </p> in") == tok.encode("Locate<p>a dog</p>in")
    ids = tok.encode("Locate<p>a dog</p>in", add_bos=False)
    # every chunk after a new token starts with its own dummy-prefix piece
    after = ids[ids.index(tok.token_id(T.P_CLOSE)) + 1]
    assert tok.codec.sp.id_to_piece(after).startswith("\u2581")


def test_base_special_tokens_split_without_stripping(tok):
    ids = tok.encode("it?</s>USER: hi", add_bos=False)
    assert tok.eos_id in ids
    spaced = tok.encode("it? </s> USER: hi", add_bos=False)
    assert spaced != ids  # the spaces around </s> are kept and encoded


def test_reference_prompt_has_one_image_and_one_region(tok):
    ids = tok.encode(REFERENCE_REC_PROMPT)
    assert ids[0] == tok.bos_id
    assert ids.count(tok.token_id(T.IMAGE)) == 1 and ids.count(tok.token_id(T.REGION)) == 1
    assert ids.count(tok.eos_id) == 1


def answer_ids(tok, text):
    return tok.encode(text, add_bos=False)


REGIONS = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0], [0.25, 0.0, 0.75, 1.0]])


def test_parse_grounded_caption(tok):
    ids = answer_ids(tok, "<p>A red circle</p><roi><r1></roi> and <p>two trees</p><roi><r0><r2></roi> here.</s>")
    ans = parse_grounded(ids, tok, REGIONS, image_size=(200, 100))
    assert ans.text == "A red circle and two trees here."
    assert [p.phrase for p in ans.phrases] == ["A red circle", "two trees"]
    for p in ans.phrases:
        assert ans.text[p.span[0] : p.span[1]] == p.phrase
    assert ans.phrases[1].region_ids == [0, 2]
    assert ans.phrases[0].boxes_px == [(100.0, 50.0, 200.0, 100.0)]
    assert ans.warnings == []


def test_parse_rec_answer_without_phrase(tok):
    ans = parse_grounded(answer_ids(tok, "<roi><r2></roi></s>"), tok, REGIONS)
    assert ans.text == "" and len(ans.phrases) == 1
    assert ans.phrases[0].region_ids == [2] and ans.boxes == [tuple(REGIONS[2].tolist())]


@pytest.mark.parametrize(
    "text, warning, n_phrases",
    [
        ("<p>a dog</p><roi><r0>", "not closed by </roi>", 1),
        ("<p>a dog</p><roi><r7></roi>", "only 3 regions", 0),
        ("<p>a dog", "not closed by </p>", 0),
        ("a dog</roi> there", "</roi> without <roi>", 0),
        ("<p>a dog</p> runs", "has no <roi>", 0),
        ("<r1> alone", "outside <roi>", 0),
    ],
)
def test_malformed_output_warns_instead_of_crashing(tok, text, warning, n_phrases):
    ans = parse_grounded(answer_ids(tok, text), tok, REGIONS)
    assert any(warning in w for w in ans.warnings), ans.warnings
    assert len(ans.phrases) == n_phrases
    assert isinstance(ans.to_dict()["text"], str)
