"""`groma eval grounded-caption`: phrase-grounding precision and recall of grounded captions (Flickr30k-Entities
style) and the caption scores."""

from __future__ import annotations

import json

import numpy as np
import pytest

from groma_core.cli import main
from groma_core.data.shapes import ShapesConfig, write_shapes_dataset
from groma_core.evaluation.metrics import phrase_grounding, phrase_key

RED_CIRCLE = [10.0, 10.0, 50.0, 50.0]
BLUE_1 = [100.0, 10.0, 140.0, 50.0]
BLUE_2 = [200.0, 10.0, 240.0, 50.0]
TRUTH = [("a small red circle", [RED_CIRCLE]), ("two blue squares", [BLUE_1, BLUE_2])]


def boxes(*b):
    return np.asarray(b, dtype=np.float64).reshape(-1, 4)


def test_phrase_keys_ignore_articles_counts_plurals_and_the_given_words():
    assert phrase_key("Two red squares") == phrase_key("a red square") == {"red", "square"}
    assert phrase_key("three ellipses") == {"ellipse"} and phrase_key("a cross") == {"cross"}
    assert phrase_key("a small red circle") != phrase_key("a red circle")
    assert phrase_key("a small red circle", {"small"}) == phrase_key("the red circle")


def test_precision_counts_predicted_phrases_and_recall_counts_ground_truth_boxes():
    truth = [[(t, boxes(*b)) for t, b in TRUTH]]
    shifted = [RED_CIRCLE[0] + 30, RED_CIRCLE[1], RED_CIRCLE[2] + 30, RED_CIRCLE[3]]  # IoU 0.14 with the circle
    predicted = [[
        ("a red circle", boxes(RED_CIRCLE)),  # right
        ("a blue square", boxes(BLUE_2)),  # right: one of the two blue squares
        ("a circle", boxes(RED_CIRCLE)),  # names no colour: matches no ground-truth phrase
        ("a red circle", boxes(shifted)),  # the right name on the wrong place
        ("a blue square", boxes()),  # no box
    ]]  # fmt: skip
    result = phrase_grounding(predicted, truth, ignore_words={"small"})
    assert result.predicted_phrases == 5 and result.ground_truth_boxes == 3
    assert result.precision == pytest.approx(2 / 5)
    assert result.recall == pytest.approx(2 / 3)  # the circle and one blue square; the other square is missed
    assert result.f1 == pytest.approx(2 * 0.4 * (2 / 3) / (0.4 + 2 / 3))
    # without ignoring "small", "a red circle" names something else than "a small red circle"
    assert phrase_grounding(predicted, truth).precision == pytest.approx(1 / 5)


def test_iou_threshold_is_inclusive_at_one_half():
    half = [10.0, 10.0, 50.0, 30.0]  # inside the circle's box, half its area: IoU exactly 0.5
    truth = [[("a red circle", boxes(RED_CIRCLE))]]
    assert phrase_grounding([[("a red circle", boxes(half))]], truth).precision == 1.0
    assert phrase_grounding([[("a red circle", boxes(half))]], truth, iou_threshold=0.51).precision == 0.0


def test_an_image_with_no_prediction_scores_zero_recall_and_mismatched_lengths_are_refused():
    truth = [[(t, boxes(*b)) for t, b in TRUTH]]
    result = phrase_grounding([[]], truth)
    assert (result.precision, result.recall, result.predicted_phrases) == (0.0, 0.0, 0)
    with pytest.raises(ValueError, match="2 predictions for 1 images"):
        phrase_grounding([[], []], truth)


def test_groma_eval_grounded_caption_on_shapes(tmp_path, capsys):
    data = tmp_path / "shapes"
    write_shapes_dataset(data, ShapesConfig(images=12, seed=7))
    out = tmp_path / "run"
    ann = data / "annotations" / "flickr_val.json"
    code = main(["eval", "grounded-caption", "--ann", str(ann), "--images", str(data / "images"), "--out", str(out),
                 "--ignore-words", "small,large", "--batch-size", "4"])  # fmt: skip
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    metrics = summary["metrics"]
    for key in ("phrase_precision", "phrase_recall", "phrase_f1", "CIDEr", "Bleu_4"):
        assert 0.0 <= metrics[key] <= (10.0 if key == "CIDEr" else 1.0)
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    references = json.loads(ann.read_text())["images"]
    assert len(predictions) == len(references) == summary["num_samples"]
    assert metrics["predicted_phrases"] == sum(len(p["phrases"]) for p in predictions)
    # the summary's figures are those of the written predictions, rescored
    truth = [[(t, boxes(*b)) for t, b in p["gt_phrases"]] for p in predictions]
    mine = [[(t, boxes(*b)) for t, b in p["phrases"]] for p in predictions]
    assert metrics["phrase_precision"] == pytest.approx(
        phrase_grounding(mine, truth, ignore_words={"small", "large"}).precision
    )
    assert "grounded-caption: phrase_precision" in capsys.readouterr().out


def test_ignore_words_belongs_to_the_grounded_caption_task(tmp_path, capsys):
    data = tmp_path / "shapes"
    write_shapes_dataset(data, ShapesConfig(images=4, seed=8))
    code = main(["eval", "rec", "--ann", str(data / "annotations" / "rec_val.json"), "--images", str(data / "images"),
                 "--ignore-words", "small", "--out", str(tmp_path / "run")])  # fmt: skip
    assert code != 0
    assert "--ignore-words: only the grounded-caption task" in capsys.readouterr().err
