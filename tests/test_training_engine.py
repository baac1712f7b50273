"""Training engine: what each stage trains, the data order, the schedule, logs, checkpoints and exact resumption,
on a tiny real pipeline (conv tokenizer, a learned grid proposer with a detection loss, RoI pooling, LLaMA)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from groma_core.api import load_weights
from groma_core.boxes import box_iou
from groma_core.errors import CheckpointError, GromaError, RecipeError
from groma_core.model import IGNORE_INDEX, GromaModel
from groma_core.prompt import TEMPLATES, GromaTokenizer, SentencePieceCodec
from groma_core.selection import SelectionConfig
from groma_core.stages import RegionProposer
from groma_core.testing.tiny import GridProposer, RoIPoolEncoder, TinyConvTokenizer, TinyLlamaBackbone
from groma_core.training import (
    MixtureSampler,
    StageConfig,
    TrainingConfig,
    apply_trainable,
    param_groups,
    run_training,
)
from groma_core.training.checkpoint import latest_checkpoint
from groma_core.training.objectives import Objective
from groma_core.training.schedule import lr_factor, warmup_steps
from groma_core.types import Proposals


class LearnedGridProposer(RegionProposer):
    """Grid cells moved by a learned offset and scored by a learned objectness, with a real detection loss."""

    def __init__(self, channels: int, cells: int = 3):
        super().__init__()
        self.cells = cells
        self.objectness = nn.Conv2d(channels, 1, 1)
        self.reference_points = nn.Linear(channels, 4)
        self.norm = nn.LayerNorm(channels)

    def forward(self, features):
        pooled = F.adaptive_avg_pool2d(features.level("last"), self.cells)  # (B, C, n, n)
        logits = self.objectness(pooled).flatten(1)
        n = self.cells
        ticks = torch.linspace(0, 1, n + 1)
        grid = torch.stack(
            [torch.stack([ticks[j], ticks[i], ticks[j + 1], ticks[i + 1]]) for i in range(n) for j in range(n)]
        )
        deltas = torch.tanh(self.reference_points(self.norm(pooled.flatten(2).transpose(1, 2)))) * 0.05
        boxes = grid.to(deltas) + deltas
        return Proposals(list(boxes), list(torch.sigmoid(logits)), extras={"logits": logits})

    def detection_loss(self, proposals, targets, source):
        logits = proposals.extras["logits"]
        objectness, regression = [], []
        for i, target in enumerate(targets):
            iou = box_iou(proposals.boxes[i], target)
            best, match = iou.max(dim=1)
            positive = best > 0.2
            objectness.append(F.binary_cross_entropy_with_logits(logits[i], positive.float()))
            if positive.any():
                regression.append(F.l1_loss(proposals.boxes[i][positive], target[match[positive]]))
        weight = 2.0 if source == "sa1b" else 1.0
        box = torch.stack(regression).mean() if regression else logits.sum() * 0.0
        return {"loss_objectness": weight * torch.stack(objectness).mean(), "loss_box": 5.0 * box}


def make_model(sp_dir, proposer: str = "learned") -> GromaModel:
    torch.manual_seed(0)
    tok = GromaTokenizer(SentencePieceCodec(sp_dir / "tokenizer.model"))
    tokenizer = TinyConvTokenizer(64, 8, 16)
    backbone = TinyLlamaBackbone(tok, 32, 2, 4)
    region_proposer = LearnedGridProposer(16) if proposer == "learned" else GridProposer(3)
    return GromaModel(
        tokenizer, region_proposer, RoIPoolEncoder(16, 32), backbone, SelectionConfig(score_threshold=0.0), "default"
    )


PHRASES = ["the red square", "a small dog", "the green tree", "a blue circle", "the man"]


def lm_samples(model: GromaModel, n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    template = TEMPLATES["default"]
    out = []
    for k in range(n):
        phrase = PHRASES[k % len(PHRASES)]
        question = f"Locate <p>{phrase}</p> in the image."
        prompt = model.tokenizer.encode(template.render([(question, None)]))
        ids = model.tokenizer.encode(template.render([(question, f"<p>{phrase}</p><roi><ground_box></roi>")]))
        labels = [IGNORE_INDEX if j < len(prompt) else t for j, t in enumerate(ids)]
        xy = torch.rand(2, generator=g) * 0.5
        box = torch.cat([xy, xy + 0.2 + 0.3 * torch.rand(2, generator=g)])[None]
        out.append(
            {
                "pixel_values": torch.randn(3, 64, 64, generator=g),
                "input_ids": ids,
                "labels": labels,
                "ground_boxes": box,
            }
        )
    return out


def det_samples(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        xy = torch.rand(2, 2, generator=g) * 0.6
        boxes = torch.cat([xy, xy + 0.1 + 0.3 * torch.rand(2, 2, generator=g)], dim=1)
        out.append({"pixel_values": torch.randn(3, 64, 64, generator=g), "boxes": boxes})
    return out


STAGE1 = {
    "name": "detection",
    "objective": "detection",
    "train": ["region_proposer"],
    "data": [{"name": "boxes_a", "source": "coco"}, {"name": "boxes_b", "source": "sa1b"}],
    "batch_size": 2,
    "lr": 2e-3,
    "weight_decay": 1e-4,
    "no_decay_bias_norm": False,
    "lr_multipliers": {"reference_points": 0.1},
    "warmup_steps": 1,
    "max_steps": 3,
}
STAGE2 = {
    "name": "alignment",
    "train": [
        "image_projector",
        "region_encoder",
        "language_backbone.new_input_embs",
        "language_backbone.extra_lm_head",
    ],
    "freeze": ["image_tokenizer", "region_proposer"],
    "data": [{"name": "grounding"}, {"name": "captions", "ratio": 0.5}],
    "batch_size": 1,
    "grad_accum": 2,
    "lr": 1e-3,
    "warmup_ratio": 0.03,
    "max_steps": 3,
}
STAGE3 = {**STAGE2, "name": "instruction", "train": [*STAGE2["train"], "language_backbone.llm.*"], "lr": 1e-4}

INTENDED = {
    "detection": ("region_proposer.",),
    "alignment": (
        "image_projector.",
        "region_encoder.",
        "language_backbone.new_input_embs.",
        "language_backbone.extra_lm_head.",
    ),
    "instruction": (
        "image_projector.",
        "region_encoder.",
        "language_backbone.new_input_embs.",
        "language_backbone.extra_lm_head.",
        "language_backbone.llm.",
    ),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from groma_core.testing.tiny import make_sentencepiece

    sp = tmp_path_factory.mktemp("sp")
    make_sentencepiece(sp)
    model = make_model(sp)
    datasets = {
        "boxes_a": det_samples(6, 1),
        "boxes_b": det_samples(5, 2),
        "grounding": lm_samples(model, 6, 3),
        "captions": lm_samples(model, 8, 4),
    }
    return sp, datasets


def config(*stages, **top) -> TrainingConfig:
    return TrainingConfig.model_validate({"stages": list(stages), "progress": False, **top})


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def intended(model: nn.Module, stage: str) -> set[str]:
    return {n for n, _ in model.named_parameters() if n.startswith(INTENDED[stage])}


@pytest.mark.parametrize("stage", [STAGE1, STAGE2, STAGE3], ids=lambda s: s["name"])
def test_exactly_the_stage_parameters_get_gradients(tiny, stage):
    sp, datasets = tiny
    model = make_model(sp)
    cfg = StageConfig.model_validate(stage)
    apply_trainable(model, cfg)
    objective = Objective(model, cfg.objective)
    from groma_core.training.data import MixtureDataset, collate

    names = [d.name for d in cfg.data]
    data = MixtureDataset([datasets[n] for n in names], names, [d.source or d.name for d in cfg.data])
    loss, _ = objective(collate([data[(0, 0, 0)], data[(0, 1, 1)]]))
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad == intended(model, cfg.name)
    assert not any(p.requires_grad for p in model.image_tokenizer.parameters())


class WeightedLossProposer(LearnedGridProposer):
    """A proposer whose detection_loss returns raw terms and their weighted total as ``loss``."""

    def detection_loss(self, proposals, targets, source):
        terms = super().detection_loss(proposals, targets, source)
        return {**terms, "loss": 3.0 * terms["loss_objectness"] + terms["loss_box"]}


def test_detection_objective_sums_the_terms_unless_the_proposer_gives_the_total(tiny):
    sp, datasets = tiny
    from groma_core.training.data import collate

    model = make_model(sp)
    batch = collate([{**s, "dataset": "boxes_a", "source": "coco"} for s in datasets["boxes_a"][:2]])
    loss, terms = Objective(model, "detection")(batch)
    assert set(terms) == {"loss_objectness", "loss_box"}
    torch.testing.assert_close(loss, terms["loss_objectness"] + terms["loss_box"])
    weighted = WeightedLossProposer(16)
    weighted.load_state_dict(model.region_proposer.state_dict())
    model.region_proposer = weighted
    loss, terms = Objective(model, "detection")(batch)
    assert set(terms) == {"loss_objectness", "loss_box"}
    torch.testing.assert_close(loss, 3.0 * terms["loss_objectness"] + terms["loss_box"])


def test_three_stages_update_exactly_their_parameters(tiny, tmp_path):
    sp, datasets = tiny
    model = make_model(sp)
    before = snapshot(model)
    after: dict[str, dict[str, torch.Tensor]] = {}

    def keep(info):
        if info.step == info.total_steps:
            after[info.stage] = snapshot(model)

    result = run_training(model, config(STAGE1, STAGE2, STAGE3), datasets, tmp_path, on_step=keep)
    assert result.steps == {"detection": 3, "alignment": 3, "instruction": 3}
    previous = before
    for stage in ("detection", "alignment", "instruction"):
        changed = {n for n, v in after[stage].items() if not torch.equal(v, previous[n])}
        assert changed == intended(model, stage), stage
        previous = after[stage]
    assert all(torch.equal(before[n], p) for n, p in model.image_tokenizer.named_parameters(prefix="image_tokenizer"))


def test_parameter_groups_follow_the_reference(tiny):
    sp, _ = tiny
    model = make_model(sp)
    stage1 = StageConfig.model_validate(STAGE1)
    apply_trainable(model, stage1)
    groups = param_groups(model, stage1)
    by_name = {n: g for g in groups for n in g["names"]}
    assert set(by_name) == intended(model, "detection")
    assert by_name["region_proposer.reference_points.weight"]["lr"] == pytest.approx(2e-4)
    assert by_name["region_proposer.objectness.weight"]["lr"] == pytest.approx(2e-3)
    assert all(g["weight_decay"] == 1e-4 for g in groups)  # stage 1 decays biases and norms too

    stage2 = StageConfig.model_validate({**STAGE3, "weight_decay": 0.1})
    apply_trainable(model, stage2)
    by_name = {n: g for g in param_groups(model, stage2) for n in g["names"]}
    assert by_name["image_projector.layers.0.bias"]["weight_decay"] == 0.0
    assert by_name["language_backbone.llm.model.layers.0.input_layernorm.weight"]["weight_decay"] == 0.0
    assert by_name["image_projector.layers.0.weight"]["weight_decay"] == 0.1
    assert by_name["language_backbone.llm.model.layers.0.self_attn.q_proj.weight"]["weight_decay"] == 0.1


def test_every_step_reads_one_dataset_in_a_seeded_order_shared_by_all_ranks():
    sizes, ratios, names = [10, 7, 30], [1.0, 1.0, 0.5], ["a", "b", "c"]
    single = MixtureSampler(sizes, ratios, names, batch_size=1, grad_accum=4, world_size=1, rank=0, seed=7)
    ranks = [MixtureSampler(sizes, ratios, names, 2, 1, 2, r, seed=7) for r in range(2)]
    assert single.steps_per_epoch == 10 // 4 + 7 // 4 + 15 // 4 == ranks[0].steps_per_epoch
    seen_c = set()
    for step in range(2 * single.steps_per_epoch):
        micro = single.micro_batches(step)
        assert len(micro) == 4 and all(len(m) == 1 for m in micro)
        keys = [k[:2] for m in micro for k in m]
        assert len({d for d, _ in keys}) == 1  # one dataset per optimizer step
        split = [k[:2] for r in ranks for k in r.micro_batches(step)[0]]
        assert sorted(split) == sorted(keys)  # ranks share the step's samples
        assert len(set(keys)) == 4  # no repeat inside a step
        seen_c |= {i for d, i in keys if d == 2}
    assert len(single.pools[2]) == 15 and seen_c <= set(single.pools[2].tolist())  # ratio 0.5: drawn once
    again = MixtureSampler(sizes, ratios, names, 1, 4, 1, 0, seed=7)
    assert [again.micro_batches(s) for s in range(6)] == [single.micro_batches(s) for s in range(6)]
    other = MixtureSampler(sizes, ratios, names, 1, 4, 1, 0, seed=8)
    assert [other.micro_batches(s) for s in range(6)] != [single.micro_batches(s) for s in range(6)]
    epochs = [[single.block(e * single.steps_per_epoch + p).indices.tolist() for p in range(4)] for e in range(2)]
    assert epochs[0] != epochs[1]  # reshuffled every epoch


def test_warmup_then_cosine():
    stage = StageConfig.model_validate({**STAGE2, "warmup_ratio": 0.03})
    assert warmup_steps(stage, 1000) == 30
    assert lr_factor(0, 1000, 30, "cosine") == 0.0
    assert lr_factor(15, 1000, 30, "cosine") == pytest.approx(0.5)
    assert lr_factor(30, 1000, 30, "cosine") == pytest.approx(1.0)
    assert lr_factor(30 + 485, 1000, 30, "cosine") == pytest.approx(0.5)
    assert lr_factor(999, 1000, 30, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 969 / 970)))


def test_logs_progress_and_final_weights(tiny, tmp_path, capsys):
    sp, datasets = tiny
    model = make_model(sp)
    result = run_training(model, config(STAGE1, {**STAGE2, "max_steps": 2}, progress=True), datasets, tmp_path)
    lines = [json.loads(x) for x in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [(x["stage"], x["step"]) for x in lines] == [("detection", s) for s in (1, 2, 3)] + [
        ("alignment", 1),
        ("alignment", 2),
    ]
    first = lines[0]
    assert first["lr"] == 0.0 and lines[1]["lr"] == pytest.approx(2e-3)  # warmup 1 step, then cosine
    assert {"loss", "grad_norm", "dataset", "samples", "epoch", "loss_objectness"} <= set(first)
    assert first["loss"] == pytest.approx(first["loss_objectness"] + first["loss_box"], rel=1e-5)
    assert all(math.isfinite(x["loss"]) for x in lines)
    err = capsys.readouterr().err
    assert "detection" in err and "loss=" in err and "lr=" in err
    from safetensors.torch import load_file

    final = load_file(str(result.final_dir / "model.safetensors"))
    for name, p in model.state_dict().items():
        assert torch.equal(final[name], p), name


def test_resumed_runs_end_with_the_weights_of_an_uninterrupted_run(tiny, tmp_path):
    sp, datasets = tiny
    stages = (STAGE1, {**STAGE2, "max_steps": 5})
    straight = make_model(sp)
    straight.selection.shuffle = True  # region order drawn from the training's generator: restored on resume
    run_training(straight, config(*stages, save_every=2), datasets, tmp_path / "straight")

    class Killed(Exception):
        pass

    def kill_at(stage, step):
        def on_step(info):
            if (info.stage, info.step) == (stage, step):
                raise Killed

        return on_step

    out = tmp_path / "resumed"
    for stop in [("detection", 3), ("alignment", 3), None]:
        model = make_model(sp)  # a fresh process: the same initial model
        model.selection.shuffle = True
        if stop is None:
            result = run_training(model, config(*stages, save_every=2), datasets, out, resume=True)
        else:
            with pytest.raises(Killed):
                run_training(model, config(*stages, save_every=2), datasets, out, resume=True, on_step=kill_at(*stop))
    expected = straight.state_dict()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-6, msg=name)
    assert result.steps == {"alignment": 5}  # the detection stage was complete in the checkpoint
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [(x["stage"], x["step"]) for x in log] == [("detection", s) for s in (1, 2, 3)] + [
        ("alignment", s) for s in range(1, 6)
    ]
    straight_log = [json.loads(x) for x in (tmp_path / "straight" / "train_log.jsonl").read_text().splitlines()]
    assert [x["loss"] for x in log] == pytest.approx([x["loss"] for x in straight_log], abs=1e-6)


def test_a_half_written_checkpoint_is_never_the_latest(tiny, tmp_path):
    sp, datasets = tiny
    stage = {**STAGE2, "max_steps": 4}
    model = make_model(sp, "grid")
    run_training(model, config(stage, save_every=2, keep_last=3), datasets, tmp_path)
    root = tmp_path / "checkpoints"
    good = latest_checkpoint(root)
    assert good == root / "alignment" / "step-0000004"
    assert (root / "alignment" / "step-0000002" / "trainer_state.json").is_file()

    # a run killed while writing step 6: its temporary folder holds a complete-looking state but half the files
    partial = root / "alignment" / ".tmp-step-0000006-0badc0de"
    partial.mkdir()
    (partial / "trainer_state.json").write_text(json.dumps({"stage_index": 0, "step": 6}))
    (partial / "model.safetensors").write_bytes(b"\0" * 10)
    assert latest_checkpoint(root) == good
    # a pointer naming a folder that never appeared is ignored too
    (root / "latest").write_text("alignment/step-0000008\n")
    assert latest_checkpoint(root) == good

    resumed = make_model(sp, "grid")
    result = run_training(
        resumed, config({**stage, "max_steps": 4}, save_every=2, keep_last=3), datasets, tmp_path, resume=True
    )
    assert result.steps == {"alignment": 4} and not partial.exists()
    for name, value in resumed.state_dict().items():
        assert torch.equal(value, model.state_dict()[name]), name


def test_checkpoints_hold_the_trained_weights_and_the_run_state(tiny, tmp_path):
    sp, datasets = tiny
    model = make_model(sp)
    run_training(model, config(STAGE1, {**STAGE2, "max_steps": 2}), datasets, tmp_path)
    folder = latest_checkpoint(tmp_path / "checkpoints")
    from safetensors.torch import load_file

    weights = load_file(str(folder / "model.safetensors"))
    assert set(weights) == intended(model, "detection") | intended(model, "alignment")
    state = json.loads((folder / "trainer_state.json").read_text())
    assert (state["stage"], state["step"], state["global_batch"], state["world_size"]) == ("alignment", 2, 2, 1)
    assert {p.name for p in folder.iterdir()} == {
        "model.safetensors",
        "optimizer.pt",
        "scheduler.pt",
        "rng-rank0.pt",
        "trainer_state.json",
    }
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        run_training(make_model(sp), config(STAGE1), datasets, tmp_path)
    changed = config(STAGE1, {**STAGE2, "max_steps": 2, "lr": 5e-4})
    with pytest.raises(CheckpointError, match=r"stages\.1\.lr: checkpoint 0\.001, now 0\.0005"):
        run_training(make_model(sp), changed, datasets, tmp_path, resume=True)


def test_gradient_checkpointing_gives_the_same_weights(tiny, tmp_path):
    sp, datasets = tiny
    stage = {**STAGE3, "max_steps": 2}
    plain, recomputed = make_model(sp, "grid"), make_model(sp, "grid")
    run_training(plain, config(stage), datasets, tmp_path / "a")
    run_training(recomputed, config({**stage, "gradient_checkpointing": True}), datasets, tmp_path / "b")
    llm = recomputed.language_backbone.llm
    assert getattr(llm, "is_activation_checkpointing", None) or llm.is_gradient_checkpointing
    for name, value in recomputed.state_dict().items():
        torch.testing.assert_close(value, plain.state_dict()[name], rtol=0, atol=1e-6, msg=name)


def test_configuration_problems_are_reported_together(tiny, tmp_path):
    sp, datasets = tiny
    model = make_model(sp, "grid")
    bad = config(
        {**STAGE1, "train": ["region_proposr"]},
        {**STAGE2, "data": [{"name": "grounding"}, {"name": "caption"}], "freeze": ["image_tokenizer", "nothing.*"]},
    )
    with pytest.raises(RecipeError) as err:
        run_training(model, bad, datasets, tmp_path)
    text = str(err.value)
    assert "stages.0.train.0: 'region_proposr' matches no parameter (did you mean 'region_proposer'?)" in text
    assert "stages.0.objective: 'detection' needs a region proposer with detection_loss" in text
    assert "stages.1.data.1.name: no dataset 'caption' (did you mean 'captions'?)" in text
    assert "stages.1.freeze.1: 'nothing.*' matches no parameter" in text
    with pytest.raises(RecipeError, match="stages.0.lr"):
        run_training(model, {"stages": [{**STAGE2, "lr": -1}]}, datasets, tmp_path)
    with pytest.raises(ValueError, match="only the last stage may use distributed: fsdp"):
        config({**STAGE2, "distributed": "fsdp"}, STAGE3)
    with pytest.raises(ValueError, match="extra"):
        config({**STAGE2, "epoch": 2})


def test_exported_model_loads_with_its_recipe(tiny_model, manager, tmp_path):
    from groma_core.api import load

    data = lm_samples(tiny_model, 4, 5)
    stage = {**STAGE2, "data": [{"name": "grounding"}], "max_steps": 2}
    result = run_training(tiny_model, config(stage), {"grounding": data}, tmp_path)
    loaded = load(result.final_dir, manager=manager)
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, tiny_model.state_dict()[name]), name


def finite_checkpoint_weights(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    weights = load_file(str(folder / "model.safetensors"))
    assert weights and all(torch.isfinite(t).all() for t in weights.values()), folder
    return weights


def test_a_nan_loss_stops_the_run_naming_the_sample_and_keeps_the_last_good_checkpoint(tiny, tmp_path):
    sp, _ = tiny
    model = make_model(sp)
    samples = lm_samples(model, 8, 5)
    stage = {**STAGE2, "data": [{"name": "poisoned"}], "max_steps": 4}  # batch_size 1, grad_accum 2
    cfg = config(stage, save_every=1)
    stage_seed = int(np.random.SeedSequence([cfg.seed, 0]).generate_state(1)[0])
    order = MixtureSampler([8], [1.0], ["poisoned"], 1, 2, 1, 0, stage_seed)
    bad = order.micro_batches(2)[1][0][1]  # step 3, second micro-batch
    samples[bad]["pixel_values"] = torch.full_like(samples[bad]["pixel_values"], float("nan"))

    with pytest.raises(GromaError) as err:
        run_training(model, cfg, {"poisoned": samples}, tmp_path)
    latest = tmp_path / "checkpoints" / "alignment" / "step-0000002"
    assert str(err.value) == (
        f"stage 'alignment', step 3 of 4: the loss is nan (batch: dataset 'poisoned', samples [{bad}]); training "
        f"stopped before the optimizer step and nothing of this step was saved; the latest checkpoint is still {latest}"
    )
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "alignment/step-0000002"
    assert latest_checkpoint(tmp_path / "checkpoints") == latest
    assert not (tmp_path / "final").exists()
    weights = finite_checkpoint_weights(latest)
    state = model.state_dict()
    for name, value in weights.items():  # the failed step changed nothing
        assert torch.equal(state[name], value), name
    log = [json.loads(x) for x in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log] == [1, 2]


def test_a_diverging_lr_stops_the_run_and_no_checkpoint_holds_non_finite_weights(tiny, tmp_path):
    sp, datasets = tiny
    model = make_model(sp)
    stage = {**STAGE2, "data": [{"name": "grounding"}], "lr": 1e30, "warmup_ratio": 0.0, "max_steps": 6}
    with pytest.raises(GromaError, match=r"^stage 'alignment', step \d of 6: the (loss|gradient norm) is (nan|inf)"):
        run_training(model, config(stage, save_every=1), datasets, tmp_path)
    folders = sorted((tmp_path / "checkpoints" / "alignment").glob("step-*"))
    assert folders and latest_checkpoint(tmp_path / "checkpoints") == folders[-1]
    for folder in folders:
        finite_checkpoint_weights(folder)
    assert load_weights(make_model(sp), folders[-1] / "model.safetensors", subset=True)
