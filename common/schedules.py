"""Training clock and a learning-rate schedule tied to the run's length (epochs or wall-clock budget).

``TrainClock`` counts the seconds spent in ``fit`` across resumes (it is a checkpoint recoverable), so a run killed
and resumed keeps its ``max_train_minutes`` budget instead of starting the budget again.

``cosine_lr`` decays the learning rate from ``lr`` to ``lr * final_ratio`` over the run: progress is the larger of
the epoch fraction and the fraction of the time budget already spent, so a budget-bound run ends at the low rate
whichever limit ends it first (NewBob only reacts after a bad epoch, which a short run rarely has).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from speechbrain.utils.checkpoints import mark_as_loader, mark_as_saver, register_checkpoint_hooks


@register_checkpoint_hooks
class TrainClock:
    """Seconds of training so far, including the runs before a resume."""

    def __init__(self):
        self.before = 0.0  # seconds of earlier (checkpointed) runs
        self.t0 = time.time()

    def start(self) -> None:
        self.t0 = time.time()

    def elapsed(self) -> float:
        return self.before + time.time() - self.t0

    @mark_as_saver
    def _save(self, path) -> None:
        Path(path).write_text(json.dumps({"elapsed_s": self.elapsed()}), encoding="utf-8")

    @mark_as_loader
    def _load(self, path, end_of_epoch=True) -> None:
        self.before = float(json.loads(Path(path).read_text(encoding="utf-8"))["elapsed_s"])
        self.t0 = time.time()


def run_progress(epoch: int, batch: int, batches_per_epoch: int, epochs: int, elapsed_s: float,
                 budget_s: float) -> float:
    """Fraction of the run done, in [0, 1]: the larger of the epoch fraction and the spent time budget."""
    frac = (max(epoch, 1) - 1 + batch / max(batches_per_epoch, 1)) / max(epochs, 1)
    if budget_s > 0:
        frac = max(frac, elapsed_s / budget_s)
    return min(max(frac, 0.0), 1.0)


def cosine_lr(lr: float, progress: float, final_ratio: float = 0.05) -> float:
    """Half-cosine from ``lr`` (progress 0) to ``lr * final_ratio`` (progress 1)."""
    low = lr * final_ratio
    return low + (lr - low) * 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


def batch_lr(hp, clock: TrainClock, epoch: int, step: int, batches_per_epoch: int, optimizer_step: int,
             newbob_lr: float) -> float | None:
    """The learning rate for the next optimizer step, or None to keep the optimizer's (NewBob after warm-up).

    ``hp``: the recipe's hparams (``lr``, ``lr_schedule`` newbob|cosine, ``lr_final_ratio``, ``warmup_steps``,
    ``max_train_minutes``, ``epoch_counter``). A linear warm-up over the first ``warmup_steps`` optimizer steps
    (none in ``overfit_one_batch`` mode) scales either schedule; cosine decays to ``lr * lr_final_ratio`` at the
    end of the epochs or of the time budget, whichever ends the run."""
    # the overfit sanity check (a few hundred steps on one batch) runs at the full rate from its first step
    warmup = 0 if getattr(hp, "overfit_one_batch", False) else int(hp.warmup_steps)
    scale = min(1.0, (optimizer_step + 1) / warmup) if warmup > 0 else 1.0
    if hp.lr_schedule == "cosine":
        progress = run_progress(epoch, step, batches_per_epoch, hp.epoch_counter.limit, clock.elapsed(),
                                float(hp.max_train_minutes) * 60)
        return cosine_lr(float(hp.lr), progress, float(hp.lr_final_ratio)) * scale
    if warmup > 0 and optimizer_step <= warmup:
        return newbob_lr * scale
    return None


def aligned_stop(valid: list[dict], hp, epoch: int) -> bool:
    """``stop_align_shift_ms`` > 0: stop when each of the last ``stop_align_patience`` validations moved the valid
    rows' first-pass boundaries less than that (``align_shift_ms``, common.first_pass.BoundaryDrift) with a valid
    PER under ``stop_align_max_per`` (the recognizer has left CTC's all-blank plateau, where alignments can sit
    still), once ``stop_align_min_epochs`` epochs ran. A resumed run has no shift at its first validation, so it
    waits one more."""
    limit, k = float(hp.stop_align_shift_ms), max(int(hp.stop_align_patience), 1)
    if getattr(hp, "overfit_one_batch", False):  # the sanity check runs its epochs (PER must reach ~0)
        return False
    if limit <= 0 or epoch < int(hp.stop_align_min_epochs) or len(valid) < k:
        return False
    return all(v.get("align_shift_ms") is not None and v["align_shift_ms"] < limit
               and v.get("PER", 100.0) < float(hp.stop_align_max_per) for v in valid[-k:])
