"""`text` stages and the synthetic `recall` format: what the samples say, what such a stage trains, how recipes
name them."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from groma_core import tokens as T
from groma_core.schema import DatasetSpec, RecipeTraining, dataset_path_problems
from groma_core.training import StageConfig, TrainingConfig, apply_trainable, run_training
from groma_core.training.data import MixtureDataset, collate, seeded
from groma_core.training.datasets import open_dataset
from groma_core.training.objectives import Objective
from groma_core.training.synthetic import COPY_WORDS, RecallDataset, ordinary_ids

TEXT_STAGE = {
    "name": "language",
    "objective": "text",
    "train": ["language_backbone"],
    "freeze": [],
    "data": [{"name": "recall"}],
    "batch_size": 4,
    "max_steps": 3,
    "lr": 1e-3,
}


def samples(dataset: RecallDataset, n: int) -> list[dict]:
    out = []
    for i in range(n):
        with seeded(1000 + i):
            out.append(dataset[i])
    return out


def test_binding_samples_answer_with_the_index_of_the_named_region(tiny_model):
    tok = tiny_model.tokenizer
    data = RecallDataset(tok, 50, regions=6, queries=3, copy_fraction=0.0)
    words = set(ordinary_ids(tok))
    p_open, p_close = tok.token_id(T.P_OPEN), tok.token_id(T.P_CLOSE)
    checked = 0
    for s in samples(data, 20):
        ids, labels = s["input_ids"], s["labels"]
        assert len(ids) == len(labels)
        assert tok.token_id(T.REGION) not in ids and tok.token_id(T.REFER_FEAT) not in ids
        # the region list: <r0> w0 <r1> w1 ... in order, never supervised
        start = ids.index(tok.region_ids[0])
        listing = {}
        j = start
        while tok.region_index(ids[j]) == len(listing):
            assert ids[j + 1] in words and labels[j] == labels[j + 1] == -100
            listing[ids[j + 1]] = len(listing)
            j += 2
        assert 1 <= len(listing) <= 6
        # every question names one listed word; its supervised answer is <roi><rK></roi></s> for that word
        asked = [ids[k + 1] for k in range(j, len(ids) - 2) if ids[k] == p_open and ids[k + 2] == p_close]
        answers = [tok.region_index(t) for t in labels if t != -100 and tok.region_index(t) is not None]
        assert len(asked) == len(answers) == 3
        assert answers == [listing[w] for w in asked]
        supervised = [t for t in labels if t != -100]
        assert supervised == [
            x for k in answers for x in (tok.token_id(T.ROI_OPEN), tok.region_ids[k], tok.token_id(T.ROI_CLOSE), 2)
        ]
        checked += 1
    assert checked == 20


def test_copy_samples_supervise_the_word_before_each_repeated_word(tiny_model):
    tok = tiny_model.tokenizer
    data = RecallDataset(tok, 10, copy_fraction=1.0)
    for s in samples(data, 5):
        ids, labels = s["input_ids"], s["labels"]
        seq = ids[1 : 1 + COPY_WORDS]
        assert ids[0] == tok.bos_id and len(set(seq)) == COPY_WORDS
        tail, tail_labels = ids[1 + COPY_WORDS :], labels[1 + COPY_WORDS :]
        assert len(tail) == 2 * (COPY_WORDS - 1)
        for q, a, la in zip(tail[::2], tail[1::2], tail_labels[1::2]):
            assert a == la == seq[seq.index(q) - 1]
        assert sorted(tail[::2]) == sorted(seq[1:])


def test_samples_repeat_under_the_engines_seeds_and_mix_as_asked(tiny_model):
    tok = tiny_model.tokenizer
    data = RecallDataset(tok, 200, copy_fraction=0.25)
    first, again = samples(data, 40), samples(data, 40)
    assert first == again
    copying = sum(tok.region_ids[0] not in s["input_ids"] for s in first)
    assert 3 <= copying <= 20  # about a quarter of 40
    assert len(data) == 200
    with pytest.raises(IndexError):
        data[200]


def test_words_leave_out_special_byte_and_groma_tokens(tiny_model):
    tok = tiny_model.tokenizer
    words = ordinary_ids(tok)
    sp = tok.codec.sp
    assert words and all(0 <= w < tok.offset for w in words)
    assert not any(sp.is_byte(w) or sp.is_control(w) or sp.is_unknown(w) for w in words)
    assert tok.bos_id not in words and tok.eos_id not in words


def test_a_text_stage_trains_exactly_the_language_backbone(tiny_model, tmp_path):
    model = tiny_model.train()
    cfg = StageConfig.model_validate(TEXT_STAGE)
    apply_trainable(model, cfg)
    data = RecallDataset(model.tokenizer, 16, regions=4, queries=2)
    mixture = MixtureDataset([data], ["recall"], ["recall"])
    batch = collate([mixture[(0, i, i)] for i in range(4)])
    assert batch["pixel_values"] is None
    loss, _ = Objective(model, "text")(batch)
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad and all(n.startswith("language_backbone.") for n in with_grad)
    model.zero_grad()

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = TrainingConfig.model_validate({"stages": [TEXT_STAGE], "progress": False, "tensorboard": False})
    result = run_training(model, config, {"recall": data}, tmp_path)
    assert result.steps == {"language": 3}
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith("language_backbone.") for n in changed)


def test_an_image_stage_refuses_text_samples_by_name(tiny_model):
    data = RecallDataset(tiny_model.tokenizer, 4)
    batch = collate([{**data[i], "dataset": "recall", "source": "recall"} for i in range(2)])
    with pytest.raises(Exception, match="'recall': a lm stage needs samples with pixel_values"):
        Objective(tiny_model, "lm")(batch)


def test_recipes_pair_recall_with_text_stages_and_need_no_files(tiny_model, tmp_path):
    stage = {**TEXT_STAGE}
    good = RecipeTraining.model_validate(
        {"stages": [stage], "datasets": {"recall": {"format": "recall", "size": 8, "regions": 5}}}
    )
    assert dataset_path_problems(good, tmp_path) == []
    opened = open_dataset(good.datasets["recall"], tiny_model, tmp_path, "recall")
    assert isinstance(opened, RecallDataset) and len(opened) == 8 and opened.regions == 5
    with pytest.raises(ValidationError, match=r"data.0.name: objective .lm. cannot read .recall. \(format recall\)"):
        RecipeTraining.model_validate(
            {"stages": [{**stage, "objective": "lm"}], "datasets": {"recall": {"format": "recall"}}}
        )
    with pytest.raises(ValidationError, match="objective 'text' cannot read 'rec' \\(format rec\\)"):
        RecipeTraining.model_validate(
            {
                "stages": [{**stage, "data": [{"name": "rec"}]}],
                "datasets": {"rec": {"format": "rec", "ann": "a.json", "images": "img"}},
            }
        )
    with pytest.raises(ValidationError, match="format recall is generated, it reads no files: remove ann"):
        DatasetSpec.model_validate({"format": "recall", "ann": "a.json"})
    with pytest.raises(ValidationError, match="format rec needs ann and images"):
        DatasetSpec.model_validate({"format": "rec"})


def test_the_final_model_loads_what_training_changed_even_when_the_recipe_excluded_it(tiny_recipe, manager, tmp_path):
    """A run that starts from weights with ``weights_exclude`` (e.g. a fresh language model next to trained vision
    stages) exports every tensor: loading ``final`` gives the trained model, not the excluded parts re-initialised."""
    import yaml

    from groma_core.api import build, load
    from groma_core.training.checkpoint import save_weights

    start = build(yaml_file(tmp_path / "start.yaml", tiny_recipe), manager=manager)
    save_weights({k: v.detach().clone() for k, v in start.state_dict().items()}, tmp_path / "start.safetensors")
    recipe = {
        **tiny_recipe,
        "weights": str(tmp_path / "start.safetensors"),
        "weights_exclude": ["language_backbone"],
        "init_seed": 7,
        "train": {"stages": [TEXT_STAGE], "datasets": {"recall": {"format": "recall", "size": 64}}, "progress": False},
    }
    model = build(yaml_file(tmp_path / "train.yaml", recipe), manager=manager)
    run_training(model, model.recipe.core.train, {"recall": RecallDataset(model.tokenizer, 64)}, tmp_path / "out")
    exported = yaml.safe_load((tmp_path / "out" / "final" / "recipe.yaml").read_text())
    assert exported["weights_exclude"] == [] and exported["partial_weights"] is False
    final = load(tmp_path / "out" / "final", manager=manager)
    trained = model.state_dict()
    for name, value in final.state_dict().items():
        torch.testing.assert_close(value, trained[name], msg=name)


def yaml_file(path, data):
    import yaml

    path.write_text(yaml.safe_dump(data))
    return path
