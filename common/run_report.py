"""What a training run reports: ``metrics.json``, ``model_card.json`` and one row of a sweep CSV (``--metrics_csv``),
plus the provenance every output records (project version and commit, package versions).

The sweep CSV has exactly the columns of ``METRICS_CSV_HEADER`` (docs/design.md "Sweep logging"); rows are appended
under an exclusive lock, the header written once, so concurrent runs can share one file.
"""
from __future__ import annotations

import csv
import datetime
import fcntl
import os
import platform
import resource
import subprocess
from collections import Counter
from functools import lru_cache
from pathlib import Path

import torch

from common.io import UserError, write_json

ROOT = Path(__file__).resolve().parents[1]
TASK = "phoneme_recognition"
METRICS_CSV_HEADER = [
    "timestamp", "run_id", "run_stage", "model", "output_dir", "dataset_part", "train_fraction",
    "validation_samples", "epochs", "wer", "train_runtime", "train_loss", "eval_loss", "device", "gpu",
    "per_device_train_batch_size", "grad_accum", "effective_batch_size", "lora_r", "lora_alpha", "lora_dropout",
    "quant_weights_dtype", "quant_compute_dtype", "inference_time_sec", "peak_memory_mb", "save_full_model",
    "language", "task", "learning_rate", "seed", "eval_strategy", "eval_steps",
]
PACKAGES = ("torch", "torchaudio", "speechbrain", "numpy", "numba", "soxr", "phonemizer", "praatio")


# --------------------------------------------------------------------------------------------------------------------
# Provenance
# --------------------------------------------------------------------------------------------------------------------
def _git(*args: str) -> str:
    try:
        r = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=10)
        return r.stdout.strip() if r.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


@lru_cache(maxsize=1)
def provenance() -> dict:
    """The project's version and git commit (``dirty`` when the checkout has uncommitted changes to tracked
    files), Python's and the main packages' versions."""
    from importlib.metadata import PackageNotFoundError, version

    from common import __version__

    pkgs = {}
    for name in PACKAGES:
        try:
            pkgs[name] = version(name)
        except PackageNotFoundError:
            pkgs[name] = None
    commit = _git("rev-parse", "HEAD")
    return {"project": "phone-durations", "version": __version__, "git_commit": commit or None,
            "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")) if commit else None,
            "python": platform.python_version(), **pkgs}


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# --------------------------------------------------------------------------------------------------------------------
# The sweep CSV
# --------------------------------------------------------------------------------------------------------------------
def check_metrics_csv(path) -> None:
    if path and os.path.isfile(path) and os.path.getsize(path) > 0:
        with open(path, newline="", encoding="utf-8") as fh:
            header = next(csv.reader(fh), [])
        if header != METRICS_CSV_HEADER:
            raise UserError(f"{path}: existing header differs from the sweep header; use another --metrics_csv")


def append_metrics_csv(path, row: dict) -> None:
    """Append one row under an exclusive lock; the header is written once, by whoever finds the file empty."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+", newline="", encoding="utf-8") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            fh.seek(0, os.SEEK_END)
            writer = csv.DictWriter(fh, fieldnames=METRICS_CSV_HEADER)
            if fh.tell() == 0:
                writer.writeheader()
            writer.writerow({k: row.get(k, "") for k in METRICS_CSV_HEADER})
            fh.flush()
            os.fsync(fh.fileno())
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _r(x):
    return "" if x is None else round(float(x), 4)


def _scalar_hparams(hparams) -> dict:
    return {k: v for k, v in hparams.items() if isinstance(v, (int, float, str, bool, list, type(None)))
            and not k.startswith("__")}


def _architecture(hparams, nparams: int) -> dict:
    if hparams.get("model_family") == "styletts2":
        from common.styletts2 import architecture

        return {**architecture(hparams), "n_params": nparams}
    return {"features": f"Fbank {hparams['n_mels']} mel, hop {hparams['hop_length']} ms, "
                        f"win {hparams['win_length']} ms, {hparams['sample_rate']} Hz, global CMVN",
            "encoder": type(hparams["enc"]).__name__, "frame_shift_ms": hparams["hop_length"],
            "ctc_blank_id": hparams["blank_index"], "bos_id": hparams["bos_index"],
            "eos_id": hparams["eos_index"], "decoder": "AttentionalRNNDecoder (location)", "n_params": nparams}


# --------------------------------------------------------------------------------------------------------------------
# metrics.json, model_card.json, the CSV row
# --------------------------------------------------------------------------------------------------------------------
def write_reports(brain, hparams, counts: Counter, vocab, run_id: str, runtime_s: float, resumed_epoch: int,
                  finetune: dict, languages: list[str], world_size: int) -> dict:
    """Write ``metrics.json`` and ``model_card.json`` into the run folder (and the sweep CSV row); returns the
    metrics. ``brain.results`` holds what the recipe's Brain collected while training."""
    from common.units import RATE_NAMES, TASKS, run_units

    res, out = brain.results, Path(hparams["output_folder"])
    unit_type = run_units(out)["units"]  # the error rates below are over these units: PER, CER or piece error rate
    task = TASKS[unit_type]
    device = str(brain.device)
    best = min(res["valid"], key=lambda v: v["PER"]) if res["valid"] else {}
    test = res.get("test") or {}
    nparams = sum(p.numel() for p in brain.modules.parameters())
    lora = finetune["peft"] == "lora"
    batch_utts = res.get("mean_batch_utts", 0.0)
    metrics = {
        "run_id": run_id, "model": hparams["model_name"], "task": task, "output_dir": str(out),
        "units": {"type": unit_type, "error_rate": RATE_NAMES[unit_type]},
        "data": dict(counts), "epochs": res.get("epochs_trained", hparams["epoch_counter"].current),
        "averaged_checkpoints": res.get("averaged"),
        "resumed_from_epoch": resumed_epoch,
        "train_loss": res["train_loss"][-1] if res["train_loss"] else None,
        "train_loss_history": res["train_loss"], "valid_history": res["valid"],
        "best_valid_PER": best.get("PER"), "best_epoch": best.get("epoch"),
        "valid_loss": res["valid"][-1]["loss"] if res["valid"] else None,
        "test_PER": test.get("PER"), "test_PER_beam": test.get("PER_beam"), "test_loss": test.get("loss"),
        "padding_ratio": (sum(res["padding_ratio"]) / len(res["padding_ratio"])) if res["padding_ratio"] else None,
        "padding_ratio_per_epoch": res["padding_ratio"], "mean_batch_utts": batch_utts,
        "nonfinite_batches_skipped": brain.nonfinite_total,
        "skipped": {k: v for k, v in counts.items() if "infeasible" in k or "empty" in k},
        "train_runtime_sec": round(runtime_s, 2), "train_stage_sec": round(res["train_time"], 2),
        "valid_inference_sec": round(res.get("valid_time", 0.0), 3),
        "peak_memory_mb": round(peak_memory_mb(device), 1), "device": device, "precision": brain.precision,
        "grad_accum": brain.grad_accumulation_factor, "n_params": nparams, "notes": hparams["notes"],
        "overfit_one_batch": bool(hparams["overfit_one_batch"]),
        "world_size": world_size, "batches_per_epoch": res.get("batches_per_epoch"),
        "pretrained_path": finetune.get("pretrained_path"),
        "peft": finetune["peft"], "lora_r": finetune.get("lora_r"), "lora_alpha": finetune.get("lora_alpha"),
        "lora_dropout": finetune.get("lora_dropout"), "save_full_model": bool(hparams["save_full_model"]),
        "finetune": finetune,
    }
    write_json(out / "metrics.json", metrics)
    card = {
        "task": task, "model": hparams["model_name"], "run_id": run_id,
        "architecture": _architecture(hparams, nparams),
        "data": {"data_folder": str(hparams["data_folder"]), "train_csv": str(hparams["train_csv"]),
                 "valid_csv": str(hparams["valid_csv"]), "test_csv": None if hparams["skip_test"] else
                 str(hparams["test_csv"]), **dict(counts)},
        "vocabulary": {"size": len(vocab), "tokens_file": "tokens.txt", "tokens": vocab.tokens,
                       "symbol_ids": vocab.symbol_ids},
        "hparams": _scalar_hparams(hparams), "versions": provenance(),
        "inference": "common.model.load_run(output_folder) -> TrainedModel(modules, hparams, vocab, ...); "
                     "common.model.forward_scores(...)",
        "results": {"best_valid_PER": metrics["best_valid_PER"], "test_PER": metrics["test_PER"],
                    "test_PER_beam": metrics["test_PER_beam"]},
        "finetuning": {**finetune, "saved_weights": ("merged (LoRA folded into plain weights)" if
                                                     hparams["save_full_model"] else
                                                     "LoRA adapters only (lora.ckpt) + lora.json -> base checkpoint")
                       if lora else "full model"},
    }
    write_json(out / "model_card.json", card)
    if hparams["metrics_csv"]:
        gpu = torch.cuda.get_device_name(brain.device) if device.startswith("cuda") else ""
        compute = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[brain.precision]
        langs = Counter(languages)
        append_metrics_csv(hparams["metrics_csv"], {
            "timestamp": datetime.datetime.now().isoformat(timespec="seconds"), "run_id": run_id,
            "run_stage": hparams["run_stage"], "model": hparams["model_name"], "output_dir": str(out),
            "dataset_part": hparams["dataset_part"], "train_fraction": hparams["train_fraction"],
            "validation_samples": hparams["validation_samples"], "epochs": metrics["epochs"],
            "wer": "" if best.get("PER") is None else round(best["PER"], 4),
            "train_runtime": metrics["train_runtime_sec"], "train_loss": _r(metrics["train_loss"]),
            "eval_loss": _r(metrics["valid_loss"]), "device": device, "gpu": gpu,
            "per_device_train_batch_size": round(batch_utts, 2), "grad_accum": brain.grad_accumulation_factor,
            "effective_batch_size": round(batch_utts * brain.grad_accumulation_factor * world_size, 2),
            "quant_weights_dtype": "fp32", "quant_compute_dtype": compute,
            "inference_time_sec": metrics["valid_inference_sec"], "peak_memory_mb": metrics["peak_memory_mb"],
            "save_full_model": hparams["save_full_model"],
            "lora_r": finetune.get("lora_r", ""), "lora_alpha": finetune.get("lora_alpha", ""),
            "lora_dropout": finetune.get("lora_dropout", ""),
            "language": hparams["language"] or (langs.most_common(1)[0][0] if langs else ""),
            "task": task, "learning_rate": hparams["lr"], "seed": hparams["seed"],
            "eval_strategy": hparams["eval_strategy"], "eval_steps": hparams["eval_steps"],
        })
    return metrics
