"""Training in more than one process: torchrun's environment, the process group, and the few
collectives the trainers use.

``torchrun`` starts one process per device and tells each its place (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``); without it a trainer is one process and nothing here talks to the network. The
conventions are torchvision's ``references/classification``: DistributedDataParallel, the global
batch split evenly, metrics reduced over every process, and every side effect (MLflow, checkpoints,
exports) from rank 0 alone. Every collective must be called at the same points on every process:
the helpers here are written so that the trainers' loops do exactly that.
"""
from __future__ import annotations

import atexit
import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from . import interrupts, tracking

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Processes:
    """This process's place in the run (rank 0 of 1 without torchrun), its device and its share of
    the global batch."""

    device: torch.device
    batch_size: int
    rank: int = 0
    world_size: int = 1
    backend: str = "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def params(self) -> dict[str, object]:
        """What MLflow records about the processes."""
        return {"world_size": self.world_size, "backend": self.backend, "batch_size_per_process": self.batch_size}


def setup(device: torch.device, batch_size: int) -> Processes:
    """Join torchrun's process group (nccl on CUDA, one GPU per local rank; gloo on the CPU), or
    stay one plain process. ``batch_size`` is the global batch, whatever the process count: each
    process takes an equal share. The group lives until the process exits, so that studies may
    train several models in one torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if batch_size % world_size:
        raise ValueError(f"--batch-size {batch_size} (the global batch) does not split evenly among "
                         f"{world_size} processes: give a multiple of {world_size}")
    if world_size == 1:
        return Processes(device, batch_size)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
        atexit.register(dist.destroy_process_group)
    return Processes(device, batch_size // world_size, dist.get_rank(), world_size, dist.get_backend())


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def wrap(model: nn.Module, processes: Processes, find_unused_parameters: bool = False) -> nn.Module:
    """The model DistributedDataParallel trains (gradients averaged over the processes; the weights
    start as rank 0's), or the model itself in one process."""
    if processes.world_size == 1:
        return model
    device_ids = [processes.device.index] if processes.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=find_unused_parameters)


def progress(iterable, desc: str):
    """A progress bar on rank 0 when it writes to a terminal; the other processes stay quiet."""
    return tqdm(iterable, desc=desc, leave=False, disable=None if not _active() or dist.get_rank() == 0 else True)


def raise_if_interrupted() -> None:
    """``interrupts.raise_if_pending``, decided by all processes together: a signal that any of them
    holds stops every one at this same step (one stopping alone would leave the others waiting in a
    collective until a timeout)."""
    if not _active():
        interrupts.raise_if_pending()
        return
    held = torch.tensor([float(interrupts.pending())], device=_collective_device())
    dist.all_reduce(held, op=dist.ReduceOp.MAX)
    if held.item():
        interrupts.raise_if_pending()  # this process's own signal, when it holds one
        raise KeyboardInterrupt("signal in another process of the run")


def sum_over_processes(values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum of ``values`` over every process (float64, on the CPU)."""
    values = values.to(torch.float64)
    if not _active():
        return values
    values = values.to(_collective_device())
    dist.all_reduce(values)
    return values.cpu()


def shard(items: Sequence | torch.Tensor):
    """This process's contiguous share of ``items``, every share equally long (a short last share
    repeats the final item), so that loops over shares call collectives equally often and
    ``gather`` can put the shares back in order."""
    if not _active():
        return items
    per = -(-len(items) // dist.get_world_size())
    share = items[dist.get_rank() * per:][:per]
    missing = per - len(share)
    if isinstance(items, torch.Tensor):
        return torch.cat([share, items[-1:].expand(missing, *items.shape[1:])]) if missing else share
    return list(share) + [items[-1]] * missing


def gather(share: torch.Tensor, total: int) -> torch.Tensor:
    """The rows every process computed on its ``shard`` of ``total`` items, in order, on every process."""
    if not _active():
        return share
    shares = [torch.empty_like(share, device=_collective_device()) for _ in range(dist.get_world_size())]
    dist.all_gather(shares, share.to(_collective_device()))
    return torch.cat(shares)[:total].to(share.device)


def merge(mapping: dict) -> dict:
    """The union of every process's ``mapping`` (small picklable values), on every process."""
    if not _active():
        return mapping
    mappings: list[dict | None] = [None] * dist.get_world_size()
    dist.all_gather_object(mappings, mapping)
    return {key: value for part in mappings for key, value in part.items()}


def union(items: list[int]) -> list[int]:
    """The sorted union of every process's ``items``, on every process."""
    if not _active():
        return items
    parts: list[list[int] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, items)
    return sorted(set().union(*parts))


def broadcast_from_main(*tensors: torch.Tensor) -> None:
    """Overwrite ``tensors`` with rank 0's values on every process."""
    if _active():
        for tensor in tensors:
            dist.broadcast(tensor.data, src=0)


@contextlib.contextmanager
def tracked_run(processes: Processes, cfg, task: str, run_id: str | None, nested: bool) -> Iterator[tuple[str, Path]]:
    """``tracking.tracked_run`` for a training config on rank 0; the other processes track nothing
    but hold signals alike (see ``interrupts``). Yields the MLflow run id and the run's checkpoint
    path on every process."""
    if processes.is_main:
        with tracking.tracked_run(cfg.experiment, cfg.run_name or cfg.net, run_id=run_id, nested=nested,
                                  tags={"task": task, "net": cfg.net}) as run:
            checkpoint = Path(cfg.checkpoint_dir) / run.info.run_id / "last.pt"
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            log.info("%d process(es), %s: global batch %d, %d per process", processes.world_size, processes.device,
                     cfg.batch_size, processes.batch_size)
            yield _broadcast_object(run.info.run_id), checkpoint
    else:
        with interrupts.deferred():
            tracked_id = _broadcast_object(None)
            yield tracked_id, Path(cfg.checkpoint_dir) / tracked_id / "last.pt"


def _broadcast_object(value):
    if not _active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
