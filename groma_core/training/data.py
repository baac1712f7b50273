"""Data order and batching: one dataset per optimizer step (the reference's ``RandomBatchSampler``), seeded,
sharded by rank, resumable at any step.

A sample is a mapping. The ``lm`` and ``detection`` objectives read ``pixel_values`` (3, H, W) (a ``text`` sample
has none: it reads ``input_ids`` and ``labels`` alone). The ``lm`` objective reads
``input_ids`` and ``labels`` (equal-length int sequences, -100 = not supervised) and optionally ``refer_boxes``
(n, 4) and ``ground_boxes`` (m, 4); the ``detection`` objective reads ``boxes`` (n, 4). Boxes are normalized xyxy.
Optional, for the logs and error messages: ``image_file`` (the image the sample was read from) and ``skipped``
(1 when the sample stands in for one whose image could not be read).

A dataset is read under a seed that depends only on the step and the sample's place in it (Python's ``random``,
NumPy's and torch's global generators are seeded, then restored): random augmentations repeat exactly after a
resume, whatever the number of data-loader workers.
"""

from __future__ import annotations

import contextlib
import random
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

Key = tuple[int, int, int]  # (dataset index in the mixture, sample index in that dataset, sample seed)


@dataclass
class Block:
    """The samples of one optimizer step: all from one dataset."""

    dataset: int
    indices: np.ndarray  # global_batch indices into that dataset


class MixtureSampler:
    """Deterministic data order of one stage.

    Each dataset is subsampled once (``ratio`` < 1), then every epoch: shuffled, its remainder dropped, cut into
    blocks of ``global_batch = batch_size * grad_accum * world_size`` samples, and all datasets' blocks shuffled
    together. Block ``s`` is optimizer step ``s``; its micro-batch ``a`` on rank ``r`` is the slice
    ``[(a * world_size + r) * batch_size, ... + batch_size)``, so the samples of a step do not depend on how the
    global batch is split across processes and micro-batches.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        ratios: Sequence[float],
        names: Sequence[str],
        batch_size: int,
        grad_accum: int,
        world_size: int,
        rank: int,
        seed: int,
    ):
        self.batch_size = batch_size
        self.grad_accum = grad_accum
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.global_batch = batch_size * grad_accum * world_size
        self._keys = [zlib.crc32(n.encode()) for n in names]
        self.pools: list[np.ndarray] = []
        for n, ratio, key in zip(sizes, ratios, self._keys):
            keep = int(n * ratio)
            if keep < n:
                rng = np.random.default_rng([seed, key, 0])
                self.pools.append(np.sort(rng.choice(n, keep, replace=False)))
            else:
                self.pools.append(np.arange(n))
        self.steps_per_epoch = sum(len(p) // self.global_batch for p in self.pools)
        self._epoch: int | None = None
        self._blocks: list[Block] = []

    def blocks(self, epoch: int) -> list[Block]:
        """The blocks (optimizer steps) of ``epoch`` in order."""
        if self._epoch != epoch:
            out: list[Block] = []
            for d, (pool, key) in enumerate(zip(self.pools, self._keys)):
                order = np.random.default_rng([self.seed, key, 1, epoch]).permutation(pool)
                usable = len(order) // self.global_batch * self.global_batch
                out += [Block(d, chunk) for chunk in order[:usable].reshape(-1, self.global_batch)]
            perm = np.random.default_rng([self.seed, 2, epoch]).permutation(len(out))
            self._epoch, self._blocks = epoch, [out[i] for i in perm]
        return self._blocks

    def block(self, step: int) -> Block:
        """The block of optimizer step ``step`` (counted from the start of the stage, across epochs)."""
        epoch, position = divmod(step, self.steps_per_epoch)
        return self.blocks(epoch)[position]

    def micro_batches(self, step: int) -> list[list[Key]]:
        """This rank's ``grad_accum`` micro-batches of optimizer step ``step``."""
        block = self.block(step)
        seeds = np.random.default_rng([self.seed, 3, step]).integers(0, 2**31, size=self.global_batch)
        out = []
        for a in range(self.grad_accum):
            start = (a * self.world_size + self.rank) * self.batch_size
            part = range(start, start + self.batch_size)
            out.append([(block.dataset, int(block.indices[j]), int(seeds[j])) for j in part])
        return out


class StepBatches:
    """A ``batch_sampler`` for ``DataLoader``: this rank's micro-batches of steps ``start`` to ``stop - 1``."""

    def __init__(self, sampler: MixtureSampler, start: int, stop: int):
        self.sampler, self.start, self.stop = sampler, start, stop

    def __iter__(self) -> Iterator[list[Key]]:
        for step in range(self.start, self.stop):
            yield from self.sampler.micro_batches(step)

    def __len__(self) -> int:
        return (self.stop - self.start) * self.sampler.grad_accum


class MixtureDataset(torch.utils.data.Dataset):
    """Reads ``(dataset, index)`` keys from the stage's datasets and tags each sample with its dataset, source
    and index."""

    def __init__(self, datasets: Sequence[Any], names: Sequence[str], sources: Sequence[str]):
        self.datasets, self.names, self.sources = list(datasets), list(names), list(sources)

    def __len__(self) -> int:
        return sum(len(d) for d in self.datasets)

    def __getitem__(self, key: Key) -> dict[str, Any]:
        d, i, seed = key
        with seeded(seed):
            sample = self.datasets[d][i]
        if not isinstance(sample, Mapping):
            raise TypeError(f"dataset {self.names[d]!r}: sample {i} is a {type(sample).__name__}, expected a mapping")
        return {**sample, "dataset": self.names[d], "source": self.sources[d], "index": i}


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed Python's, NumPy's and torch's (CPU) global generators for the block, then restore their states."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def collate(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack ``pixel_values``; keep ids, labels, box lists and original ``images`` per sample (the model pads them).
    Optional box fields are None when no sample of the batch has them. ``indices`` and ``image_files`` (None
    where unknown) name the samples, ``skipped`` counts the samples that stand in for an unreadable one."""
    images = [s.get("pixel_values") for s in samples]
    out: dict[str, Any] = {
        "pixel_values": torch.stack([torch.as_tensor(x) for x in images]) if images[0] is not None else None,
        "dataset": samples[0]["dataset"],
        "source": samples[0]["source"],
        "indices": [s.get("index") for s in samples],
        "image_files": [s.get("image_file") for s in samples],
        "skipped": sum(int(s.get("skipped", 0)) for s in samples),
    }
    for key in ("input_ids", "labels"):
        if key in samples[0]:
            out[key] = [list(map(int, s[key])) for s in samples]
    for key in ("boxes", "refer_boxes", "ground_boxes"):
        if any(key in s for s in samples):
            out[key] = [_boxes(s.get(key)) for s in samples]
        else:
            out[key] = None
    if all("image" in s for s in samples):  # the original (augmented) images, for stages that read them
        out["images"] = [s["image"] for s in samples]
    if all("box_labels" in s for s in samples):  # the category of each of ``boxes`` (detection files that have one)
        out["box_labels"] = [torch.as_tensor(s["box_labels"], dtype=torch.long).reshape(-1) for s in samples]
    if all("box_heads" in s for s in samples):  # the head word of each box's category name (-1: none)
        out["box_heads"] = [torch.as_tensor(s["box_heads"], dtype=torch.long).reshape(-1) for s in samples]
    return out


def _boxes(value: Any) -> Tensor:
    if value is None:
        return torch.zeros(0, 4)
    return torch.as_tensor(value, dtype=torch.float32).reshape(-1, 4)


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Move the tensors (and tensor lists) of a collated batch to ``device``."""
    out = {}
    for key, value in batch.items():
        if isinstance(value, Tensor):
            value = value.to(device, non_blocking=True)
        elif isinstance(value, list) and value and isinstance(value[0], Tensor):
            value = [v.to(device, non_blocking=True) for v in value]
        out[key] = value
    return out
