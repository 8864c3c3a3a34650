"""Distributed training helpers for the recipe (``torchrun --nproc_per_node N recipes/train.py ...``).

SpeechBrain handles DDP; three things need care here:

- ``DistributedBatchSamplerWrapper``: SpeechBrain's wrapper hands each rank a share of the ``DynamicBatchSampler``'s
  batches, but with one batch per rank ``itemgetter(i)`` returns the batch itself, which the loader then iterates
  as single indices;
- ``LocalBatchNormDDP`` (a ``Brain`` mixin): SpeechBrain converts BatchNorm to SyncBatchNorm under DDP, which runs
  only on CUDA; with gloo on CPU each process keeps its own BatchNorm statistics instead. It also installs the
  batch wrapper above;
- ``gloo_without_cuda``: torchrun's default backend is nccl, which needs GPUs.

``world_size`` and ``all_ranks`` are the small collectives the recipe uses; ``close_process_group`` leaves the group
before the interpreter exits and ``exit_process`` ends a torchrun worker without the interpreter's teardown (there,
gloo's threads sometimes abort a rank after a good run).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import sys

import torch
from speechbrain.dataio.sampler import DistributedSamplerWrapper

logger = logging.getLogger(__name__)


def world_size() -> int:
    """Processes of this run (torchrun's WORLD_SIZE; 1 without DDP)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def all_ranks(flag) -> bool:
    """``flag`` on this process AND on every other DDP process (one all_reduce; plain bool without DDP)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return bool(flag)
    t = torch.tensor([1 if bool(flag) else 0], dtype=torch.int32)
    if torch.distributed.get_backend() == "nccl":
        t = t.cuda()
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return bool(t.item())


class DistributedBatchSamplerWrapper(DistributedSamplerWrapper):
    """SpeechBrain's wrapper (DDP share of a batch sampler's batches) that always yields whole batches."""

    def __iter__(self):
        batches = list(self.sampler.__iter__())
        return iter([batches[i] for i in super(DistributedSamplerWrapper, self).__iter__()])


class LocalBatchNormDDP:
    """Mixin for ``sb.Brain`` subclasses (put it first): whole-batch DDP shares of a batch sampler, and no
    SyncBatchNorm conversion on the gloo backend (CPU)."""

    def _train_loader_specifics(self, dataset, loader_kwargs):
        loader_kwargs = super()._train_loader_specifics(dataset, loader_kwargs)
        wrapped = loader_kwargs.get("batch_sampler")
        if isinstance(wrapped, DistributedSamplerWrapper) and not isinstance(wrapped, DistributedBatchSamplerWrapper):
            self.train_sampler = DistributedBatchSamplerWrapper(wrapped.sampler, rank=self.rank,
                                                                shuffle=wrapped.shuffle)
            loader_kwargs["batch_sampler"] = self.train_sampler
        return loader_kwargs

    def _wrap_distributed(self):
        if not (self.distributed_launch and self.distributed_backend == "gloo"):
            return super()._wrap_distributed()
        from torch.nn.parallel import DistributedDataParallel as DDP

        for name, module in self.modules.items():
            if any(p.requires_grad for p in module.parameters()):
                self.modules[name] = DDP(module, device_ids=None, find_unused_parameters=self.find_unused_parameters)
        return None


def gloo_without_cuda(run_opts):
    """torchrun without CUDA: the gloo backend instead of nccl, unless the user chose one."""
    if (os.environ.get("LOCAL_RANK") is not None and run_opts["distributed_backend"] == "nccl"
            and "distributed_backend" not in run_opts.overridden_args and not torch.cuda.is_available()):
        logger.info("torchrun without CUDA: using the gloo backend")
        return dataclasses.replace(run_opts, distributed_backend="gloo",
                                   overridden_args=run_opts.overridden_args | {"distributed_backend"})
    return run_opts


def close_process_group() -> None:
    """Leave the DDP process group (if any) before the interpreter exits."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def exit_process(rc: int) -> None:
    """``sys.exit(rc)``; under torchrun, after flushing the output and the logs, ``os._exit(rc)``. A gloo rank
    sometimes aborts in the interpreter's teardown after a good run, even with the process group destroyed
    ("terminate called without an active exception", SIGABRT: 2-3 runs of 12 of the 2-process training test
    under CPU load), which torchrun reports as a failed job; skipping the teardown leaves nothing unwritten, since
    every file is closed and the logs are flushed here."""
    if world_size() == 1:
        sys.exit(rc)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    logging.shutdown()
    os._exit(rc)


class Shard:
    """Work split over the processes of a torchrun job that does not train a Brain (the export): whole batches go
    round-robin to the processes (so each batch is exactly the batch one process would run: identical numbers),
    ``gather`` merges every process's results, ``broadcast`` hands rank 0's object to all. With one process every
    method is a no-op, so the code path is the same."""

    def __init__(self, rank: int = 0, world: int = 1):
        self.rank, self.world = rank, world

    @classmethod
    def from_env(cls, device: str) -> "Shard":
        """The current torchrun job (joining its process group: gloo on CPU, nccl on CUDA), or one process."""
        world = world_size()
        if world == 1:
            return cls()
        if not torch.distributed.is_initialized():
            if device.startswith("cuda"):
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        return cls(torch.distributed.get_rank(), world)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def take(self, batches: list) -> list:
        return batches[self.rank::self.world]

    def gather(self, local: dict) -> dict:
        """Every process's ``{key: result}`` merged (keys are disjoint: indices of the items each one did)."""
        if self.world == 1:
            return local
        parts: list = [None] * self.world
        torch.distributed.all_gather_object(parts, local)
        out: dict = {}
        for p in parts:
            out.update(p)
        return out

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every process."""
        if self.world == 1:
            return obj
        box = [obj if self.main else None]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


SINGLE = Shard()
