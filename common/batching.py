"""Batch size that follows the hardware: the yaml's ``max_batch_length`` is the CPU choice (small batches, many
updates: measured best on 2 cores); on CUDA the dynamic batches grow with the GPU's memory, and the learning rate
grows with them, so a GPU run on hours of audio is not stepping a few seconds of audio at a time.

    seconds = max_batch_length_cuda, or cuda_batch_seconds_per_gb x GPU memory (GB), at most cuda_max_batch_length,
              and small enough for min_batches_per_epoch steps per epoch (never below the CPU batch)
    lr      = lr x (seconds / max_batch_length) ** {none: 0, sqrt: 1/2, linear: 1}[lr_batch_scaling]

``device_overrides`` returns these as yaml overrides, so every object built from ``lr`` (the optimizer, NewBob, the
cosine schedule) sees the same value and the run folder's hyperparams.yaml records it.
"""
from __future__ import annotations

SCALING = {"none": 0.0, "sqrt": 0.5, "linear": 1.0}


def cuda_batch_seconds(hparams, gpu_memory_gb: float, train_seconds: float) -> float:
    explicit = float(hparams["max_batch_length_cuda"])
    seconds = explicit if explicit > 0 else min(float(hparams["cuda_max_batch_length"]),
                                                float(hparams["cuda_batch_seconds_per_gb"]) * gpu_memory_gb)
    per_epoch = train_seconds / max(int(hparams["min_batches_per_epoch"]), 1)
    return round(max(float(hparams["max_batch_length"]), min(seconds, per_epoch)), 1)


def device_overrides(hparams, device: str, given: dict, train_seconds: float,
                     gpu_memory_gb: float | None = None) -> dict:
    """``{"max_batch_length": s, "lr": lr}`` for a CUDA run with dynamic batching ({} otherwise, or for what the
    command line ``given`` already set). ``gpu_memory_gb`` defaults to the device's total memory."""
    from common.io import UserError

    if not str(device).startswith("cuda") or not hparams["dynamic_batching"] or "max_batch_length" in given:
        return {}
    scaling = str(hparams["lr_batch_scaling"])
    if scaling not in SCALING:
        raise UserError(f"--lr_batch_scaling must be one of {', '.join(SCALING)}, got {scaling!r}")
    if gpu_memory_gb is None:
        import torch

        gpu_memory_gb = torch.cuda.get_device_properties(torch.device(device)).total_memory / 2**30
    seconds = cuda_batch_seconds(hparams, gpu_memory_gb, train_seconds)
    out = {"max_batch_length": seconds}
    if "lr" not in given:
        out["lr"] = float(hparams["lr"]) * (seconds / float(hparams["max_batch_length"])) ** SCALING[scaling]
    return out
