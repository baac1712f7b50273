"""The training loop: stages in order, each with its trained parameters, data mixture, AdamW and schedule;
progress bar, JSON Lines (and TensorBoard) metrics, atomic checkpoints and exact resumption."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError
from torch import nn

from groma_core.api import load_weights
from groma_core.errors import CheckpointError, GromaError, RecipeError, did_you_mean
from groma_core.model import GromaModel
from groma_core.schema import StageConfig, TrainingConfig
from groma_core.stages import DetectionLoss
from groma_core.training import checkpoint as ckpt
from groma_core.training.data import MixtureDataset, MixtureSampler, StepBatches, collate, to_device
from groma_core.training.distributed import (
    DistContext,
    barrier,
    clip_gradients,
    full_state,
    gradient_sync,
    init_distributed,
    is_sharded,
    load_optimizer_state,
    mean_across,
    optimizer_state,
    wrap,
)
from groma_core.training.objectives import Objective
from groma_core.training.params import apply_trainable, param_groups, pattern_problems, trainable_names
from groma_core.training.schedule import make_scheduler

LOG_FILE = "train_log.jsonl"
FINAL = "final"

logger = logging.getLogger("groma_core.training")


@dataclass
class StepInfo:
    """What ``on_step`` receives after every optimizer step (the same on every rank)."""

    stage: str
    stage_index: int
    step: int  # optimizer steps done in this stage
    total_steps: int
    loss: float
    lr: float
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainingResult:
    """Where a run left its results."""

    output_dir: Path
    final_dir: Path
    last_checkpoint: Path | None
    steps: dict[str, int]
    last_loss: dict[str, float]
    skipped_images: dict[str, int] = field(default_factory=dict)  # per stage: samples replaced (unreadable image)


def check_training(model: GromaModel, config: TrainingConfig, datasets: Mapping[str, Sequence[Any]]) -> list[str]:
    """Every problem of a training configuration for this model and these datasets, one line each, with its
    path under ``train``."""
    names = [n for n, _ in model.named_parameters()]
    modules = [n for n, _ in model.named_modules() if n]
    problems: list[str] = []
    for i, stage in enumerate(config.stages):
        where = f"stages.{i}"
        unmatched = pattern_problems(names, stage.train, f"{where}.train", modules, match_modules=False)
        # freezing a module without parameters (a proposer of user boxes only) is harmless
        unmatched += pattern_problems(names, stage.freeze, f"{where}.freeze", modules, match_modules=True)
        problems += unmatched
        if not unmatched and not trainable_names(model, stage):
            problems.append(f"{where}: trains no parameter (every `train` match is also frozen)")
        for j, source in enumerate(stage.data):
            if source.name not in datasets:
                hint = did_you_mean(source.name, datasets)
                given = ", ".join(sorted(datasets)) or "(none)"
                problems.append(f"{where}.data.{j}.name: no dataset {source.name!r}{hint}; given: {given}")
            elif len(datasets[source.name]) == 0:
                problems.append(f"{where}.data.{j}.name: dataset {source.name!r} is empty")
        if stage.objective == "detection" and not isinstance(model.region_proposer, DetectionLoss):
            problems.append(
                f"{where}.objective: 'detection' needs a region proposer with "
                f"detection_loss(proposals, targets, source); {type(model.region_proposer).__name__} has none"
            )
        if stage.objective == "crops" and not getattr(model.region_encoder, "crop_classes", 0):
            problems.append(
                f"{where}.objective: 'crops' needs a region encoder with a crop classifier (crop_classes > 0 and "
                f"crop_logits; mlvl-roialign with image_crop and crop_classes); {type(model.region_encoder).__name__} "
                "has none"
            )
        if stage.gradient_checkpointing and not _checkpointable(model):
            problems.append(f"{where}.gradient_checkpointing: no module of this model supports it")
    return problems


def run_training(
    model: GromaModel,
    config: TrainingConfig | Mapping[str, Any],
    datasets: Mapping[str, Sequence[Any]],
    out_dir: str | Path,
    resume: bool | str | Path = False,
    collate_fn: Callable[[Sequence[Mapping[str, Any]]], dict[str, Any]] = collate,
    on_step: Callable[[StepInfo], None] | None = None,
) -> TrainingResult:
    """Train ``model`` through the stages of ``config`` on ``datasets`` (name -> map-style dataset of sample
    mappings, see :mod:`groma_core.training.data`), writing checkpoints, logs and the final weights under
    ``out_dir``.

    ``resume``: False starts from the model as given (an ``out_dir`` that already holds checkpoints is an
    error); True continues from the newest complete checkpoint of ``out_dir`` (or starts when there is none);
    a path continues from that checkpoint folder. Resuming needs the same initial model, configuration and
    datasets, and reproduces the weights of an uninterrupted run. Launch with ``torchrun`` to use several
    processes; every process calls this function.

    On return the model holds the trained weights, ``requires_grad`` as the last stage set it; after an ``fsdp``
    stage its parameters stay sharded: load ``<out_dir>/final`` instead.

    A loss or gradient norm that is not finite stops the run with a :class:`GromaError` naming the stage, the step
    and the batch, before the optimizer step; a checkpoint is never written with non-finite weights, so the
    ``latest`` checkpoint stays the last good one. Samples that a dataset replaced because their image could not
    be read are counted (``skipped_images`` in the log and the result, a warning at the end of each stage).
    """
    if not isinstance(config, TrainingConfig):
        try:
            config = TrainingConfig.model_validate(config)
        except ValidationError as exc:
            raise RecipeError("train", [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]) from None
    problems = check_training(model, config, datasets)
    if problems:
        raise RecipeError("train", problems)
    out = Path(out_dir)
    ctx, created_group = init_distributed(config.device)
    try:
        return _Run(model, config, datasets, out, ctx, collate_fn, on_step).run(resume)
    finally:
        if created_group:
            torch.distributed.destroy_process_group()


class _Run:
    """One call of :func:`run_training`."""

    def __init__(self, model, config, datasets, out, ctx, collate_fn, on_step):
        self.model: GromaModel = model
        self.config: TrainingConfig = config
        self.datasets = datasets
        self.out: Path = out
        self.root = out / ckpt.CHECKPOINTS
        self.ctx: DistContext = ctx
        self.collate_fn = collate_fn
        self.on_step = on_step
        self.log = None
        self.tb = None
        self.last_checkpoint: Path | None = None

    # -- the run -------------------------------------------------------------------------------------------
    def run(self, resume: bool | str | Path) -> TrainingResult:
        ctx = self.ctx
        if ctx.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            ckpt.remove_partial(self.root)
        barrier(ctx)
        state, folder = self._resume_point(resume)
        self.model.to(ctx.device)
        start_stage = 0
        if state is not None:
            load_weights(self.model, folder / ckpt.WEIGHTS_FILE, subset=True, assign=False)
            start_stage = int(state["stage_index"])
            self.last_checkpoint = folder
        self._open_logs(state)
        steps, losses, skipped = {}, {}, {}
        wrapped: nn.Module = self.model
        try:
            self.model.train()
            for i in range(start_stage, len(self.config.stages)):
                resumed = state if state is not None and i == int(state["stage_index"]) else None
                stage = self.config.stages[i]
                result = self._run_stage(i, stage, resumed, folder)
                steps[stage.name], losses[stage.name], skipped[stage.name], wrapped = result
            final = self._export(wrapped)
        finally:
            if self.log is not None:
                self.log.close()
            if self.tb is not None:
                self.tb.close()
        return TrainingResult(self.out, final, self.last_checkpoint, steps, losses, skipped)

    def _resume_point(self, resume: bool | str | Path) -> tuple[dict[str, Any] | None, Path | None]:
        if resume is False:
            existing = ckpt.complete_checkpoints(self.root)
            if existing:
                raise CheckpointError(
                    f"{self.out} already holds checkpoints (newest: {existing[-1]}); resume from them or choose "
                    "another output directory"
                )
            return None, None
        folder = ckpt.latest_checkpoint(self.root) if resume is True else Path(resume)
        if folder is None:
            return None, None
        state = ckpt.read_trainer_state(folder)
        self._check_compatible(state, folder)
        return state, folder

    def _check_compatible(self, state: dict[str, Any], folder: Path) -> None:
        index = int(state["stage_index"])
        if index >= len(self.config.stages):
            raise CheckpointError(f"{folder}: stage {index} of the checkpoint is not in this configuration")
        problems = []
        if state["seed"] != self.config.seed:
            problems.append(f"seed: checkpoint {state['seed']}, now {self.config.seed}")
        for i, (old, new) in enumerate(zip(state["stages"], self.config.stages[: index + 1])):
            new_dump = new.model_dump(mode="json")
            for key in sorted(set(old) | set(new_dump)):
                if old.get(key) != new_dump.get(key):
                    problems.append(f"stages.{i}.{key}: checkpoint {old.get(key)!r}, now {new_dump.get(key)!r}")
        for name, size in state["dataset_sizes"].items():
            now = len(self.datasets[name]) if name in self.datasets else None
            if now != size:
                problems.append(f"dataset {name!r}: {size} samples at the checkpoint, now {now}")
        if problems:
            raise CheckpointError(
                f"{folder}: cannot resume, the data order or the optimisation would differ: " + "; ".join(problems)
            )

    # -- one stage -----------------------------------------------------------------------------------------
    def _run_stage(
        self, index: int, stage: StageConfig, resumed: dict[str, Any] | None, folder: Path | None
    ) -> tuple[int, float, int, nn.Module]:
        ctx, config = self.ctx, self.config
        stage_seed = int(np.random.SeedSequence([config.seed, index]).generate_state(1)[0])
        _seed_everything(stage_seed + ctx.rank)
        sampler = MixtureSampler(
            [len(self.datasets[d.name]) for d in stage.data],
            [d.ratio for d in stage.data],
            [d.name for d in stage.data],
            stage.batch_size,
            stage.grad_accum,
            ctx.world_size,
            ctx.rank,
            stage_seed,
        )
        if sampler.steps_per_epoch == 0:
            raise GromaError(
                f"stage {stage.name!r}: no dataset holds a full global batch of {sampler.global_batch} samples "
                f"(batch_size x grad_accum x {ctx.world_size} processes)"
            )
        total = stage.max_steps or max(1, math.ceil(stage.epochs * sampler.steps_per_epoch))
        start = int(resumed["step"]) if resumed is not None else 0
        skipped = int(resumed.get("skipped_images", 0)) if resumed is not None else 0
        if resumed is not None and int(resumed["global_batch"]) != sampler.global_batch:
            raise CheckpointError(
                f"{folder}: global batch was {resumed['global_batch']} ({resumed['world_size']} processes), now "
                f"{sampler.global_batch} ({ctx.world_size}): the data order would differ"
            )
        if start >= total:  # finished in the checkpoint: its weights are loaded already
            return start, float("nan"), skipped, self.model

        apply_trainable(self.model, stage)
        if stage.gradient_checkpointing:
            _enable_checkpointing(self.model)
        generator = torch.Generator().manual_seed(stage_seed + ctx.rank)
        objective = Objective(
            self.model, stage.objective, generator, stage.attribute_loss, stage.attribute_classes, stage.box_jitter
        )
        wrapped = wrap(objective, stage, ctx, config.find_unused_parameters)
        groups = param_groups(self.model, stage)
        optimizer = torch.optim.AdamW(groups, lr=stage.lr, betas=stage.betas, eps=stage.eps)
        scheduler = make_scheduler(optimizer, stage, total)
        if start > 0:
            self._restore(folder, wrapped, optimizer, scheduler, generator)
        params = [p for g in groups for p in g["params"]]
        trained = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

        loader = torch.utils.data.DataLoader(
            MixtureDataset(
                [self.datasets[d.name] for d in stage.data],
                [d.name for d in stage.data],
                [d.source or d.name for d in stage.data],
            ),
            batch_sampler=StepBatches(sampler, start, total),
            collate_fn=self.collate_fn,
            num_workers=config.num_workers,
            pin_memory=ctx.device.type == "cuda",
            generator=torch.Generator().manual_seed(stage_seed),
        )
        batches = iter(loader)
        bar = _progress(config.progress and ctx.is_main, stage.name, start, total)
        loss_value = float("nan")
        began = time.monotonic()
        try:
            for step in range(start, total):
                sums: dict[str, torch.Tensor] = {}
                dataset = ""
                micro: list[tuple[torch.Tensor, dict[str, Any]]] = []  # each micro-batch's loss and what it read
                step_skipped = 0
                for a in range(stage.grad_accum):
                    batch = to_device(next(batches), ctx.device)
                    dataset = batch["dataset"]
                    step_skipped += int(batch.get("skipped", 0))
                    with (
                        gradient_sync(wrapped, a == stage.grad_accum - 1),
                        torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=stage.bf16),
                    ):
                        loss, terms = wrapped(batch)
                    (loss / stage.grad_accum).backward()
                    micro.append((loss.detach().float(), _batch_names(batch)))
                    for k, v in {"loss": loss.detach().float(), **terms}.items():
                        sums[k] = sums.get(k, 0.0) + v / stage.grad_accum
                grad_norm = clip_gradients(params, stage.max_grad_norm)
                keys = sorted(sums)
                counts = sums["loss"].new_tensor([float(step_skipped)])
                means = mean_across(ctx, torch.cat([torch.stack([sums[k] for k in keys]), counts])).tolist()
                skipped += round(means.pop() * ctx.world_size)
                metrics = dict(zip(keys, means))
                loss_value = metrics.pop("loss")
                done = step + 1
                if not math.isfinite(loss_value) or (grad_norm is not None and not math.isfinite(grad_norm)):
                    raise self._diverged(stage, done, total, loss_value, grad_norm, micro)
                lr = optimizer.param_groups[0]["lr"] / optimizer.param_groups[0]["lr_factor"]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                self._log(
                    index, stage, done, total, sampler, loss_value, lr, grad_norm, dataset, metrics, skipped, began
                )
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.3g}", refresh=False)
                bar.update(1)
                if self.on_step is not None:
                    self.on_step(StepInfo(stage.name, index, done, total, loss_value, lr, metrics))
                if config.save_every and done % config.save_every == 0 and done < total:
                    self._check_weights(trained, stage, done, total)
                    self._save(index, stage, done, total, sampler, wrapped, optimizer, scheduler, generator, skipped)
        finally:
            bar.close()
        self._check_weights(trained, stage, total, total)
        self._save(index, stage, total, total, sampler, wrapped, optimizer, scheduler, generator, skipped)
        if skipped and ctx.is_main:
            logger.warning(
                "stage %r: %d sample(s) were replaced by the next one because their image could not be read (the "
                "files are named in the warnings above; skipped_images in %s counts them)",
                stage.name,
                skipped,
                self.out / LOG_FILE,
            )
        return total, loss_value, skipped, wrapped

    def _diverged(
        self,
        stage: StageConfig,
        step: int,
        total: int,
        loss: float,
        grad_norm: float | None,
        micro: list[tuple[torch.Tensor, dict[str, Any]]],
    ) -> GromaError:
        """The error that stops a run whose loss or gradient norm is not finite, naming the samples to blame: those
        of the micro-batches whose loss is not finite, else all of the step's."""
        what = f"the loss is {loss}" if not math.isfinite(loss) else f"the gradient norm is {grad_norm}"
        values = torch.stack([v for v, _ in micro]).tolist()
        blamed = [names for (_, names), v in zip(micro, values) if not math.isfinite(v)]
        batch = _describe_samples(blamed or [names for _, names in micro])
        if not blamed and not math.isfinite(loss):  # this process's losses are finite: another process diverged
            batch = f"another process's; this process read {batch}"
        rank = f" on process {self.ctx.rank}" if self.ctx.active else ""
        return GromaError(
            f"stage {stage.name!r}, step {step} of {total}{rank}: {what} (batch: {batch}); training stopped "
            f"before the optimizer step and nothing of this step was saved; {self._latest_text()}"
        )

    def _latest_text(self) -> str:
        if self.last_checkpoint is None:
            return "no checkpoint was written"
        return f"the latest checkpoint is still {self.last_checkpoint}"

    def _check_weights(
        self, trained: list[tuple[str, nn.Parameter]], stage: StageConfig, step: int, total: int
    ) -> None:
        """Refuse to checkpoint trained parameters that hold NaN or infinity (collective: every rank calls it)."""
        if not trained:
            return
        local = [p.to_local() if hasattr(p, "to_local") else p for _, p in trained]  # the shard under FSDP
        finite = torch.stack([torch.isfinite(t.detach()).all() for t in local]).float()
        finite = mean_across(self.ctx, finite).tolist()
        bad = [n for (n, _), f in zip(trained, finite) if f < 1.0]
        if bad:
            raise GromaError(
                f"stage {stage.name!r}, step {step} of {total}: {len(bad)} trained parameter(s) hold NaN or infinite "
                f"values ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); the checkpoint of this step is not "
                f"written; {self._latest_text()}"
            )

    def _restore(self, folder: Path, wrapped, optimizer, scheduler, generator) -> None:
        ctx = self.ctx
        if ctx.is_main or not is_sharded(wrapped):
            opt_state = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
        else:
            opt_state = {}
        load_optimizer_state(wrapped, optimizer, opt_state)
        scheduler.load_state_dict(torch.load(folder / "scheduler.pt", map_location="cpu", weights_only=True))
        rng_file = folder / f"rng-rank{ctx.rank}.pt"
        if rng_file.is_file():
            ckpt.restore_rng(torch.load(rng_file, map_location="cpu", weights_only=True), generator)

    def _save(self, index, stage, step, total, sampler, wrapped, optimizer, scheduler, generator, skipped) -> None:
        ctx, config = self.ctx, self.config
        weights = full_state(wrapped, self.model) if ctx.is_main or is_sharded(wrapped) else None
        if weights is not None and config.checkpoint_weights == "trained":
            keep = {n for s in config.stages[: index + 1] for n in trainable_names(self.model, s)}
            weights = {k: v for k, v in weights.items() if k in keep}
        opt = optimizer_state(wrapped, optimizer)
        trainer_state = {
            "stage_index": index,
            "stage": stage.name,
            "step": step,
            "total_steps": total,
            "steps_per_epoch": sampler.steps_per_epoch,
            "epoch": step // sampler.steps_per_epoch,
            "step_in_epoch": step % sampler.steps_per_epoch,
            "samples_seen": step * sampler.global_batch,
            "skipped_images": skipped,
            "global_batch": sampler.global_batch,
            "world_size": ctx.world_size,
            "seed": config.seed,
            "weights": config.checkpoint_weights,
            "dataset_sizes": {d.name: len(self.datasets[d.name]) for s in config.stages[: index + 1] for d in s.data},
            "stages": [s.model_dump(mode="json") for s in config.stages[: index + 1]],
        }
        self.last_checkpoint = ckpt.save_checkpoint(
            self.root,
            ckpt.checkpoint_name(stage.name, step),
            ctx,
            trainer_state,
            weights if ctx.is_main else None,
            opt if ctx.is_main else None,
            scheduler.state_dict(),
            ckpt.capture_rng(generator),
            config.keep_last,
        )

    def _export(self, wrapped: nn.Module) -> Path:
        """Write the full weights (and the model's recipe, when it was built from one) to ``out/final``."""
        ctx = self.ctx
        final = self.out / FINAL
        weights = full_state(wrapped, self.model) if ctx.is_main or is_sharded(wrapped) else None
        if ctx.is_main:
            tmp = self.out / f"{ckpt.TMP_PREFIX}{FINAL}"
            if tmp.exists():
                ckpt.shutil.rmtree(tmp)
            tmp.mkdir()
            ckpt.save_weights(weights, tmp / ckpt.WEIGHTS_FILE)
            recipe = _export_recipe(self.model)
            if recipe is not None:
                (tmp / "recipe.yaml").write_text(recipe, encoding="utf-8")
            for f in tmp.iterdir():
                ckpt.fsync_path(f)
            if final.exists():
                ckpt.shutil.rmtree(final)
            tmp.rename(final)
            ckpt.fsync_path(self.out)
        barrier(ctx)
        return final

    # -- logs ----------------------------------------------------------------------------------------------
    def _open_logs(self, state: dict[str, Any] | None) -> None:
        if not self.ctx.is_main:
            return
        path = self.out / LOG_FILE
        if path.is_file():  # drop lines of steps that a resumed run will redo
            lines = path.read_text(encoding="utf-8").splitlines()
            if state is None:
                lines = []
            else:
                mark = (int(state["stage_index"]), int(state["step"]))
                lines = [ln for ln in lines if ln.strip() and _log_position(ln) <= mark]
            ckpt.write_text_atomic(path, "".join(ln + "\n" for ln in lines))
        self.log = open(path, "a", encoding="utf-8")
        if self.config.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                return
            self.tb = SummaryWriter(str(self.out / "tensorboard"))

    def _log(self, index, stage, step, total, sampler, loss, lr, grad_norm, dataset, metrics, skipped, began) -> None:
        if not self.ctx.is_main or (step % self.config.log_every and step != total):
            return
        record = {
            "stage": stage.name,
            "stage_index": index,
            "step": step,
            "total_steps": total,
            "epoch": round(step / sampler.steps_per_epoch, 4),
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "dataset": dataset,
            "samples": step * sampler.global_batch,
            "skipped_images": skipped,
            "elapsed_s": round(time.monotonic() - began, 3),
            **metrics,
        }
        self.log.write(json.dumps(record) + "\n")
        self.log.flush()
        if self.tb is not None:
            for key in ("loss", "lr", "grad_norm", *metrics):
                if record[key] is not None:
                    self.tb.add_scalar(f"{stage.name}/{key}", record[key], step)


def _batch_names(batch: Mapping[str, Any]) -> dict[str, Any]:
    """What a micro-batch read: its dataset, source, sample indices and image files (None where unknown)."""
    return {
        "dataset": batch.get("dataset"),
        "source": batch.get("source"),
        "indices": list(batch.get("indices") or []),
        "files": list(batch.get("image_files") or []),
    }


def _describe_samples(micro: Sequence[Mapping[str, Any]]) -> str:
    """``dataset 'a', samples [3, 5], images x.png, y.png`` for micro-batches (one dataset per step)."""
    datasets = list(dict.fromkeys(str(m["dataset"]) for m in micro))
    sources = list(dict.fromkeys(str(m["source"]) for m in micro))
    text = "dataset " + ", ".join(map(repr, datasets))
    if sources != datasets:
        text += " (source " + ", ".join(map(repr, sources)) + ")"
    indices = [i for m in micro for i in m["indices"]]
    if any(i is not None for i in indices):
        text += f", samples {indices}"
    files = [f for m in micro for f in m["files"]]
    if any(f is not None for f in files):
        text += ", images " + ", ".join(str(f) for f in files)
    return text


def _log_position(line: str) -> tuple[int, int]:
    try:
        record = json.loads(line)
        return int(record["stage_index"]), int(record["step"])
    except (ValueError, KeyError, TypeError):
        return (-1, -1)


def _progress(enabled: bool, stage: str, start: int, total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc=stage, unit="step", disable=not enabled, dynamic_ncols=True)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


CHECKPOINTING_METHODS = ("activation_checkpointing_enable", "gradient_checkpointing_enable")


def _checkpointable(model: nn.Module) -> list[nn.Module]:
    """The outermost submodules that implement transformers' activation (gradient) checkpointing."""
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if any(hasattr(module, m) for m in CHECKPOINTING_METHODS) and not any(
            name.startswith(prefix + ".") for prefix, _ in found
        ):
            found.append((name, module))
    return [m for _, m in found]


def _enable_checkpointing(model: nn.Module) -> None:
    for module in _checkpointable(model):
        if hasattr(module, "activation_checkpointing_enable"):  # transformers >= 5.x
            module.activation_checkpointing_enable({"use_reentrant": False})
        else:
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _export_recipe(model: GromaModel) -> str | None:
    """The model's recipe pointing at the exported weights, with relative path options made absolute. The export
    holds every tensor, so the training recipe's ``weights_exclude`` and ``partial_weights`` (about the weights it
    started from) are cleared: kept, they would make loading the final model skip the parts it trained."""
    recipe = getattr(model, "recipe", None)
    if recipe is None:
        return None
    import yaml

    from groma_core.recipe import PATH_OPTIONS

    data = recipe.to_dict()
    data["weights"] = ckpt.WEIGHTS_FILE
    data["partial_weights"] = False
    data["weights_exclude"] = []
    for kind in ("image_tokenizer", "region_proposer", "region_encoder", "language_backbone"):
        for name in PATH_OPTIONS:
            value = data.get(kind, {}).get(name)
            relative = isinstance(value, str) and value and not Path(os.path.expanduser(value)).is_absolute()
            if relative and recipe.base_dir:
                data[kind][name] = str((recipe.base_dir / value).resolve())
    return yaml.safe_dump(data, sort_keys=False)
