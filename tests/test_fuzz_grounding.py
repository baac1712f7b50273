"""Fuzzing the grounded-answer parser and the prompt's limits: any ids an output layer can produce parse into an
answer whose phrases lie inside its text; tokenizer files of any content load or fail with one line; prompts longer
than the language model's positions and more regions than there are ``<rK>`` tokens are refused before the model
runs (the campaign's defects)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from groma_core import tokens as T
from groma_core.errors import CheckpointError, InputError
from groma_core.grounding import parse_grounded
from groma_core.inference import REFER, Groma, Request, boxes_from_text
from groma_core.prompt import GromaTokenizer, SentencePieceCodec, max_positions
from groma_core.selection import SelectionConfig
from groma_core.testing.tiny import make_sentencepiece

FUZZ = settings(
    max_examples=80,
    deadline=5000,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
GAP = 5  # ids between the base vocabulary and the new tokens (an embedding table wider than the tokenizer)


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> GromaTokenizer:
    codec = SentencePieceCodec(make_sentencepiece(tmp_path_factory.mktemp("tok")))
    return GromaTokenizer(codec, offset=codec.vocab_size + GAP)


def ids_for(tok: GromaTokenizer):
    """Ids an output layer may produce: text pieces (spaces included), Groma's tokens, ids in the gap, ids past the
    vocabulary (an output layer wider than the tokenizer) and negative ones."""
    specials = [tok.token_id(t) for t in (T.P_OPEN, T.P_CLOSE, T.ROI_OPEN, T.ROI_CLOSE, T.IMAGE, T.PAD)]
    spaces = tok.codec.encode("a dog   ") + tok.codec.encode("  ")
    return st.lists(
        st.sampled_from(specials + spaces + tok.region_ids[:8] + [tok.region_ids[-1], tok.eos_id])
        | st.integers(0, tok.codec.vocab_size - 1)
        | st.integers(tok.codec.vocab_size, tok.offset - 1)
        | st.integers(tok.vocab_size, tok.vocab_size + 1000)
        | st.integers(-5, -1),
        max_size=40,
    )


@FUZZ
@given(
    data=st.data(), n_regions=st.integers(0, 6), size=st.none() | st.tuples(st.integers(1, 5000), st.integers(1, 5000))
)
def test_any_ids_parse_into_phrases_inside_the_text(tok, data, n_regions, size):
    ids = data.draw(ids_for(tok))
    regions = torch.rand(n_regions, 4, generator=torch.Generator().manual_seed(n_regions))
    answer = parse_grounded(ids, tok, regions, size)
    assert answer.text == answer.text.strip()
    for phrase in answer.phrases:
        start, end = phrase.span
        assert 0 <= start <= end <= len(answer.text)
        assert answer.text[start:end] == phrase.phrase == phrase.phrase.strip()
        assert phrase.region_ids and all(0 <= k < n_regions for k in phrase.region_ids)
        assert len(phrase.boxes) == len(phrase.boxes_px) == len(phrase.region_ids)
    assert isinstance(answer.raw_text, str) and isinstance(tok.decode(ids), str)


def test_ids_past_the_vocabulary_are_dropped_with_a_warning(tok):
    p, pc = tok.token_id(T.P_OPEN), tok.token_id(T.P_CLOSE)
    roi, roc = tok.token_id(T.ROI_OPEN), tok.token_id(T.ROI_CLOSE)
    dog = tok.codec.encode("a dog")
    answer = parse_grounded([p, *dog, tok.vocab_size + 3, pc, roi, tok.region_ids[0], roc, -1], tok, torch.rand(1, 4))
    assert answer.text == "a dog" and [ph.phrase for ph in answer.phrases] == ["a dog"]
    assert any("outside the tokenizer's vocabulary" in w for w in answer.warnings)
    assert tok.decode([tok.vocab_size + 7, *dog, tok.codec.vocab_size + 1]) == "a dog"


def test_a_phrase_ending_in_spaces_gets_a_span_inside_the_text(tok):
    p, pc = tok.token_id(T.P_OPEN), tok.token_id(T.P_CLOSE)
    roi, roc = tok.token_id(T.ROI_OPEN), tok.token_id(T.ROI_CLOSE)
    spaced = tok.codec.encode("a dog   ")
    assert tok.codec.decode(spaced).endswith("   ")
    answer = parse_grounded([p, *spaced, pc, roi, tok.region_ids[0], roc], tok, torch.rand(1, 4))
    (phrase,) = answer.phrases
    assert answer.text == "a dog" and phrase.phrase == "a dog" and phrase.span == (0, 5)


# -- tokenizer files -------------------------------------------------------------------------------------------
@settings(FUZZ, max_examples=40)
@given(content=st.binary(max_size=200))
def test_a_tokenizer_model_of_any_bytes_loads_or_fails_with_one_line(tmp_path_factory, content):
    folder = tmp_path_factory.mktemp("tok")
    (folder / "tokenizer.model").write_bytes(content)
    try:
        GromaTokenizer.from_directory(folder)
    except CheckpointError as exc:
        assert "\n" not in str(exc) and "tokenizer.model" in str(exc)


def test_an_empty_or_damaged_tokenizer_model_is_named(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"tokenizer\.model: the tokenizer model is empty"):
        GromaTokenizer.from_directory(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"\x0a\x05hello" * 20)
    with pytest.raises(CheckpointError, match=r"tokenizer\.model: not a SentencePiece model"):
        GromaTokenizer.from_directory(tmp_path)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("groma_tokens.json", "[1, 2]", "expected a JSON object"),
        ("groma_tokens.json", "{not json", "not a readable JSON file"),
        ("groma_tokens.json", '{"new_tokens": "abc"}', "new_tokens must be a list of strings"),
        ("groma_tokens.json", '{"new_tokens": ["<p>"]}', "new_tokens lacks"),
        ("groma_tokens.json", '{"offset": "12"}', "offset must be a whole number"),
        ("tokenizer_config.json", '"legacy"', "expected a JSON object"),
    ],
)
def test_tokenizer_side_files_of_the_wrong_type_are_named(tmp_path, name, content, message):
    make_sentencepiece(tmp_path)
    (tmp_path / name).write_text(content)
    with pytest.raises(CheckpointError, match=message) as info:
        GromaTokenizer.from_directory(tmp_path)
    assert name in str(info.value)


# -- prompt limits ---------------------------------------------------------------------------------------------
def count_image_encodings(model) -> list[int]:
    calls: list[int] = []
    model.image_tokenizer.register_forward_pre_hook(lambda module, args: calls.append(1))
    return calls


def test_a_prompt_longer_than_the_model_positions_is_refused_before_the_model_runs(tiny_model):
    limit = max_positions(tiny_model.language_backbone)
    assert limit == 2048
    calls = count_image_encodings(tiny_model)
    image = Image.new("RGB", (40, 30), (200, 30, 30))
    long_prompt = "a red circle and a blue square " * 1000
    with pytest.raises(InputError, match=f"but the language model takes {limit}") as info:
        Groma(tiny_model).answer([Request(image, [(long_prompt, None)])], max_new_tokens=2)
    assert "\n" not in str(info.value) and calls == []
    # near the limit, the expansion (image tokens and regions) decides: still refused before generation
    n_image = tiny_model.image_tokenizer.num_tokens
    words = "a " * (limit - n_image - 60)
    with pytest.raises(InputError, match="positions"):
        Groma(tiny_model).answer([Request(image, [(words, None)])], max_new_tokens=2)


def test_more_regions_than_region_tokens_is_refused_at_build_and_at_expansion(tiny_recipe, manager):
    from groma_core.api import build
    from groma_core.errors import RecipeError
    from groma_core.recipe import validate_recipe

    tiny_recipe["region_selection"] = {"score_threshold": 0.0, "max_regions": 500}
    with pytest.raises(RecipeError, match="max_regions: 500 regions"):
        validate_recipe(tiny_recipe, manager)
    tiny_recipe["region_selection"]["max_regions"] = 100
    model = build(validate_recipe(tiny_recipe, manager), manager=manager).eval()
    model.selection = SelectionConfig(score_threshold=0.0, max_regions=500, nms_iou=1.0)  # set in Python
    image = Image.new("RGB", (200, 200), (10, 10, 10))
    boxes = [[x, y, x + 5, y + 5] for x in range(0, 190, 16) for y in range(0, 190, 16)]
    assert len(boxes) == 144
    prompt = "What are " + " and ".join([REFER] * len(boxes)) + "?"
    with pytest.raises(InputError, match=r"regions, but the tokenizer has 100 region tokens"):
        Groma(model).answer([Request(image, [(prompt, None)], boxes)], max_new_tokens=1)


@settings(FUZZ, max_examples=60)
@given(text=st.text(alphabet="<>,0123456789. -x\n", max_size=400))
def test_boxes_in_text_parse_or_fail_with_one_line(text):
    try:
        rest, boxes = boxes_from_text(text)
    except InputError as exc:
        assert "\n" not in str(exc) and len(str(exc)) < 200
    else:
        assert rest.count(REFER) - text.count(REFER) == len(boxes)


def test_a_long_unclosed_box_in_text_is_not_a_hang():
    """``<`` followed by 100,000 commas took minutes in the old pattern (it backtracked over every comma)."""
    text, boxes = boxes_from_text("<" + "," * 100_000)
    assert boxes == [] and text.startswith("<,")
