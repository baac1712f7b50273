"""Several processes (``torchrun``): the process group, the wrapped objective (DDP or FSDP) and the collectives
that checkpoints and logs need. A single process runs the same code with every collective a no-op."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from groma_core.api import resolve_device
from groma_core.schema import StageConfig


@dataclass
class DistContext:
    """This process's place in the run."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def process_device(name: str, local_rank: int) -> torch.device:
    """The device of this training process: ``auto`` is its GPU (``cuda:LOCAL_RANK``) when CUDA exists, else the
    CPU; any other name is checked as :func:`groma_core.api.resolve_device` checks it (a device this machine lacks
    is refused in one line)."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    return resolve_device(name)


def init_distributed(device_name: str) -> tuple[DistContext, bool]:
    """Join the process group that ``torchrun`` describes (``WORLD_SIZE`` > 1), or use the one already
    initialised; NCCL for CUDA devices, gloo otherwise. Also says whether this call created the group."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = process_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    created = False
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        created = True
    if dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device), created
    return DistContext(0, 1, 0, device), created


def barrier(ctx: DistContext) -> None:
    if ctx.active:
        dist.barrier()


def broadcast_object(ctx: DistContext, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not ctx.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean_across(ctx: DistContext, values: Tensor) -> Tensor:
    """The mean of ``values`` over all ranks (for logging)."""
    if not ctx.active:
        return values
    values = values.detach().to(ctx.device, copy=True)
    dist.all_reduce(values)
    return values / ctx.world_size


def wrap(objective: nn.Module, stage: StageConfig, ctx: DistContext, find_unused_parameters: bool) -> nn.Module:
    """The objective as the training loop calls it: itself in one process, else under DDP or FSDP (the trained
    parameters must be chosen before: DDP and FSDP read ``requires_grad`` once)."""
    if not ctx.active:
        return objective
    if stage.distributed == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for module in list(objective.modules()):
            if type(module).__name__ in stage.fsdp_wrap:
                fully_shard(module)
        fully_shard(objective)
        return objective
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(objective, device_ids=device_ids, find_unused_parameters=find_unused_parameters)


def is_sharded(wrapped: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(wrapped, FSDPModule)


@contextlib.contextmanager
def gradient_sync(wrapped: nn.Module, sync: bool) -> Iterator[None]:
    """Skip the gradient all-reduce of accumulation micro-batches that do not end an optimizer step."""
    if sync:
        yield
    elif is_sharded(wrapped):
        wrapped.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            wrapped.set_requires_gradient_sync(True)
    elif hasattr(wrapped, "no_sync"):
        with wrapped.no_sync():
            yield
    else:
        yield


def full_state(wrapped: nn.Module, model: nn.Module) -> dict[str, Tensor]:
    """The model's full state dict, keyed by the model's own names. Under FSDP gathering it is collective (call
    it on every rank) and only rank 0 receives the tensors, on CPU."""
    if not is_sharded(wrapped):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}


def optimizer_state(wrapped: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state dict (gathered to full tensors under FSDP: a collective)."""
    if is_sharded(wrapped):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(
            wrapped, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
    return optimizer.state_dict()


def load_optimizer_state(wrapped: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Restore what :func:`optimizer_state` returned (under FSDP, rank 0's copy is scattered to the shards)."""
    if is_sharded(wrapped):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(
            wrapped, optimizer, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        )
        return
    optimizer.load_state_dict(state)


def clip_gradients(parameters: list[nn.Parameter], max_norm: float | None) -> float | None:
    """Clip the global gradient norm; return the norm before clipping (None without clipping)."""
    if max_norm is None:
        return None
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP
        norm = norm.full_tensor()
    return float(norm)
