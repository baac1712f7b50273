"""Golden parity: run groma-core on a fixture set of the reference implementation and compare, stage by stage and
end to end.

    python -m groma_core.testing.golden FIXTURE_DIR [FIXTURE_DIR ...]

The fixture's reference weights are converted with the checkpoint converter (configuration from its ``meta.json``);
each stage is fed the fixture's own inputs for that stage. One line per compared tensor: name, shape, max abs diff,
tolerance, ok/FAIL. Exit status 1 on any failure. Format of the fixtures: ``shared/reference/golden/FORMAT.md``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from groma_core.boxes import cxcywh_to_xyxy, nms_with_threshold
from groma_core.model import GromaModel, decode
from groma_core.prompt import GromaTokenizer
from groma_core.testing.fixtures import GoldenSet, golden_sets
from groma_core.types import ImageFeatures, Proposals

FEATURE_TOL = 1e-4
BOX_TOL = 1e-5
LEVEL_NAMES = ("last-3", "last-2", "last-1", "last")


class IdsOnlyCodec:
    """The fixtures' ids are synthetic (no tokenizer was used): a codec that knows only the LLaMA special ids."""

    def __init__(self, vocab_size: int, bos_id: int = 1, eos_id: int = 2, unk_id: int = 0):
        self.vocab_size = vocab_size
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.special_tokens = {"<unk>": unk_id, "<s>": bos_id, "</s>": eos_id}

    def encode(self, text: str) -> list[int]:
        raise ValueError("the golden fixtures carry ids, not text")

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(f"[{i}]" for i in ids)

    def save(self, directory: Path) -> None:
        raise ValueError("nothing to save")


@dataclass
class Report:
    """The comparison lines of one run."""

    lines: list[str] = field(default_factory=list)
    failures: int = 0

    def add(self, name: str, ours: Tensor, ref: Tensor, tol: float) -> None:
        if tuple(ours.shape) != tuple(ref.shape):
            self.failures += 1
            self.lines.append(f"{name:<48} shape {tuple(ours.shape)} != reference {tuple(ref.shape)}  FAIL")
            return
        exact = tol == 0
        if exact:
            diff = float((ours.long() != ref.long()).sum()) if ours.numel() else 0.0
            ok = diff == 0
            shown = f"{int(diff)} differ"
        else:
            diff = float((ours.float() - ref.float()).abs().max()) if ours.numel() else 0.0
            ok = diff <= tol
            shown = f"{diff:.2e}"
        self.failures += not ok
        tol_text = "exact" if exact else f"{tol:.0e}"
        self.lines.append(
            f"{name:<48} {str(tuple(ref.shape)):<18} {shown:>10}  tol {tol_text:<6} {'ok' if ok else 'FAIL'}"
        )

    def note(self, text: str) -> None:
        self.lines.append(text)

    def check(self, name: str, ok: bool, detail: str) -> None:
        self.failures += not ok
        self.lines.append(f"{name:<48} {detail}  {'ok' if ok else 'FAIL'}")


def fixture_levels(hidden_last4: Tensor) -> dict[str, Tensor]:
    """The fixture's DINOv2 hidden states (4, B, 1+hw, C) as the four named level maps (B, C, h, w)."""
    _, batch, tokens, channels = hidden_last4.shape
    side = int(round((tokens - 1) ** 0.5))
    return {
        name: hidden_last4[k][:, 1:].reshape(batch, side, side, channels).permute(0, 3, 1, 2).contiguous()
        for k, name in enumerate(LEVEL_NAMES)
    }


def convert_fixture(gs: GoldenSet, workdir: Path) -> Path:
    """Convert the fixture's reference weights into a groma-core checkpoint directory (returns its path)."""
    from groma_core.convert import convert_checkpoint

    src = workdir / "reference"
    src.mkdir()
    shutil.copyfile(gs.dir / "weights.safetensors", src / "model.safetensors")
    dst = workdir / "converted"
    overrides = []
    patch = gs.meta["config"].get("region_dim_patch")
    if patch:
        region_dim = patch["region_dim"] if isinstance(patch, dict) else int(patch)
        overrides.append(f"region_encoder.region_dim={region_dim}")
    convert_checkpoint(src, dst, config=gs.groma_config, recipe_overrides=overrides)
    return dst


def load_fixture_model(gs: GoldenSet, workdir: Path) -> GromaModel:
    """The converted fixture model in eval mode, with an ids-only tokenizer of the fixture's vocabulary."""
    from groma_core.api import load

    model = load(convert_fixture(gs, workdir)).float().eval()
    llm_cfg = gs.groma_config["llm_cfg"]
    model.language_backbone.tokenizer = GromaTokenizer(
        IdsOnlyCodec(llm_cfg["vocab_size"], llm_cfg.get("bos_token_id", 1), llm_cfg.get("eos_token_id", 2))
    )
    return model


def image_batch(gs: GoldenSet, names: list[str]) -> dict[str, Tensor]:
    """Stack the image-level fixture tensors of several images along the batch dimension."""
    files = [gs.tensors(f"image_{n}") for n in names]
    return {
        key: torch.cat([f[key] for f in files], dim=1 if key == "vis_hidden_states_last4" else 0) for key in files[0]
    }


def fixture_features(gs: GoldenSet, names: Sequence[str]) -> ImageFeatures:
    """The reference's image features of images ``names`` (batched in that order): merged image tokens and the last
    four DINOv2 layers as the named level maps, ready to feed the proposer or the region encoder."""
    img = image_batch(gs, list(names))
    return ImageFeatures(img["image_tokens_merged"], fixture_levels(img["vis_hidden_states_last4"]))


def run_set(gs: GoldenSet, report: Report) -> None:
    """Every comparison for one fixture set."""
    with tempfile.TemporaryDirectory() as tmp:
        model = load_fixture_model(gs, Path(tmp))
    report.note(f"== {gs.name}: {gs.dir}")
    with torch.no_grad():
        for img in gs.images():
            tensors = gs.tensors(f"image_{img}")
            png = Image.open(gs.dir / gs.meta["images"][img]["png"])
            report.add(f"{img}/pixel_values", model.image_tokenizer.preprocess([png]), tensors["pixel_values"], BOX_TOL)
            feats = model.image_tokenizer(tensors["pixel_values"])
            fixture_feats = fixture_features(gs, [img])
            levels = fixture_feats.levels
            for name in LEVEL_NAMES:
                report.add(f"{img}/image_tokenizer.levels[{name}]", feats.levels[name], levels[name], FEATURE_TOL)
            report.add(f"{img}/image_tokenizer.tokens", feats.tokens, tensors["image_tokens_merged"], FEATURE_TOL)
            projected = model.image_projector(tensors["image_tokens_merged"])
            report.add(f"{img}/image_projector", projected, tensors["image_tokens_projected"], FEATURE_TOL)
            props = model.region_proposer(fixture_feats)
            report.add(
                f"{img}/proposer.boxes_xyxy", props.boxes[0][None], cxcywh_to_xyxy(tensors["ddetr_pred_boxes"]), BOX_TOL
            )
            report.add(f"{img}/proposer.scores", props.scores[0][None], tensors["scores_fused"], BOX_TOL)
        for case_name, case in gs.cases().items():
            run_case(gs, model, case_name, case, report)


def run_case(gs: GoldenSet, model: GromaModel, name: str, case: dict, report: Report) -> None:
    """Selection, region encoder, embedding assembly, language model and generation for one case."""
    t = gs.tensors(Path(case["file"]).stem)
    images = case.get("images") or [case["image"]]
    if isinstance(images, str):
        images = [images]
    batch = t["input_ids"].shape[0]
    if len(images) != batch:  # batch2 lists its images in order
        images = [gs.images()[i] for i in range(batch)]
    img = image_batch(gs, images)
    feats = fixture_features(gs, images)
    refer = [t.get(f"refer_boxes.{b}", torch.zeros(0, 4)) for b in range(batch)]
    refer_xyxy = [cxcywh_to_xyxy(r) for r in refer]
    sel = model.selection
    # region selection on the recorded candidates
    for b in range(batch):
        cand, scores = t[f"nms_candidates_xyxy.{b}"], t[f"nms_candidate_scores.{b}"]
        keep = nms_with_threshold(cand, scores, sel.nms_iou, sel.score_threshold, sel.max_regions)
        if keep.numel() == 0:
            keep = scores.argmax().reshape(1)
        report.add(f"{name}/selection.keep.{b}", keep, t[f"nms_keep.{b}"], 0)
    n_prop = [t[f"nms_candidates_xyxy.{b}"].shape[0] - refer[b].shape[0] for b in range(batch)]
    proposals = Proposals(
        [t[f"nms_candidates_xyxy.{b}"][: n_prop[b]] for b in range(batch)],
        [t[f"nms_candidate_scores.{b}"][: n_prop[b]] for b in range(batch)],
    )
    regions = model.select(proposals, refer_xyxy)
    for b in range(batch):
        report.add(f"{name}/selection.regions.{b}", regions.boxes[b], cxcywh_to_xyxy(t[f"regions_cxcywh.{b}"]), BOX_TOL)
    # region encoder on the recorded hidden states and regions
    region_feats = model.region_encoder(feats, [cxcywh_to_xyxy(t[f"regions_cxcywh.{b}"]) for b in range(batch)])
    for b in range(batch):
        report.add(f"{name}/region_encoder.{b}", region_feats[b], t[f"region_features.{b}"], FEATURE_TOL)
    # embedding assembly (the fixture's image tokens and proposals)
    inputs = model.prepare_inputs(
        img["pixel_values"], t["input_ids"], refer_boxes=refer_xyxy, features=feats, proposals=proposals
    )
    subst = t["input_ids_after_refer_subst"]
    for b in range(batch):
        row = subst[b].tolist()
        pad = model.tokenizer.pad_id
        row = row[: row.index(pad)] if pad in row else row
        report.add(f"{name}/prompt_ids_after_refer_subst.{b}", torch.tensor(inputs.prompt_ids[b]), torch.tensor(row), 0)
    report.add(f"{name}/ids_expanded", inputs.ids, t["ids_expanded"], 0)
    report.add(f"{name}/attention_mask", inputs.attention_mask, t["attention_mask"], 0)
    report.add(f"{name}/llm_inputs_embeds", inputs.inputs_embeds, t["llm_inputs_embeds"], FEATURE_TOL)
    # the language model on the recorded embeddings
    backbone = model.language_backbone
    mask = t["attention_mask"]
    positions = torch.arange(mask.shape[1])[None].expand(mask.shape[0], -1)
    out = backbone(t["llm_inputs_embeds"], mask, positions)
    report.add(f"{name}/llm_last_hidden", out.hidden_states, t["llm_last_hidden"], FEATURE_TOL)
    report.add(f"{name}/logits_last", out.logits[:, -1], t["logits_last"], FEATURE_TOL)
    rows = t["logits_rows_pos"]
    report.add(f"{name}/logits_rows", out.logits[:, rows], t["logits_rows"], FEATURE_TOL)
    report.add(f"{name}/logits_argmax", out.logits.argmax(-1), t["logits_argmax"], 0)
    report.add(f"{name}/logits_logsumexp", out.logits.logsumexp(-1), t["logits_logsumexp"], FEATURE_TOL)
    if "logits_last_per_sample" in t:
        last = mask.sum(1) - 1
        per = out.logits[torch.arange(batch), last]
        report.add(f"{name}/logits_last_per_sample", per, t["logits_last_per_sample"], FEATURE_TOL)
    if "gen_sequences" not in t:
        return
    # greedy generation from the recorded embeddings
    steps = t["gen_scores_logsumexp"].shape[1]
    prompt_len = t["input_ids"].shape[1]
    new_ref = t["gen_sequences"][:, prompt_len:]
    seqs, step_logits = decode(
        backbone,
        t["llm_inputs_embeds"],
        mask,
        positions,
        steps,
        eos_id=None,
        pad_id=model.tokenizer.pad_id,
        keep_step_logits=True,
    )
    report.add(f"{name}/generate.new_ids", torch.tensor(seqs), new_ref, 0)
    stacked = torch.stack(step_logits, 1)
    report.add(f"{name}/generate.step_logsumexp", stacked.logsumexp(-1), t["gen_scores_logsumexp"], FEATURE_TOL)
    report.add(f"{name}/generate.step_top10", stacked.topk(10, -1).values, t["gen_scores_top10_values"], FEATURE_TOL)
    # end to end from the PNG
    pngs = [Image.open(gs.dir / gs.meta["images"][i]["png"]) for i in images]
    gen = model.generate(
        model.image_tokenizer.preprocess(pngs),
        t["input_ids"],
        refer_boxes=refer_xyxy,
        max_new_tokens=steps,
        eos_id=None,
    )
    ours = gen.regions.boxes[0]
    ref = cxcywh_to_xyxy(t["regions_cxcywh.0"])
    same_set = ours.shape == ref.shape and bool((ours[:, None] - ref[None]).abs().amax(-1).min(1).values.max() <= 1e-4)
    report.check(f"{name}/end_to_end.region_set", same_set, f"{ours.shape[0]} regions vs {ref.shape[0]}")
    margins = case.get("decision_margins", {})
    order_stable = margins.get("score_order_min_gap", 1.0) > 1e-5
    if order_stable:
        report.add(f"{name}/end_to_end.regions_in_order", ours, ref, FEATURE_TOL)
        report.add(f"{name}/end_to_end.new_ids", torch.tensor(gen.sequences), new_ref, 0)
    else:
        report.note(f"{name}/end_to_end: region order not compared (score gap {margins['score_order_min_gap']:.1e})")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m groma_core.testing.golden", description=__doc__.split("\n\n")[0])
    parser.add_argument("fixtures", nargs="*", help="fixture set directories (default: every set found)")
    args = parser.parse_args(argv)
    dirs = [Path(d) for d in args.fixtures] or golden_sets()
    if not dirs:
        print("no golden fixture sets found (give a directory, or set GROMA_GOLDEN_DIR)", file=sys.stderr)
        return 1
    torch.manual_seed(0)
    report = Report()
    for d in dirs:
        if not (d / "meta.json").is_file():
            print(f"{d}: not a fixture set (no meta.json)", file=sys.stderr)
            return 1
        run_set(GoldenSet(d), report)
    print("\n".join(report.lines))
    total = sum(1 for line in report.lines if line.endswith(("ok", "FAIL")))
    print(f"{total - report.failures} passed, {report.failures} failed")
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
