"""Training that survives bad batches: a ``Brain`` mixin whose ``fit_batch`` skips a batch with a non-finite input
or loss (no backward, no update) and stops with a clear error after ``max_nonfinite_batches`` in a row.

Under DDP every rank decides together (``common.ddp.all_ranks``): a rank that skipped alone would leave the others
waiting in the gradient all-reduce. Counters: ``nonfinite_run`` (in a row) and ``nonfinite_total`` (the run).
"""
from __future__ import annotations

import speechbrain as sb
import torch
from speechbrain.utils.logger import get_logger

from common.ddp import all_ranks
from common.io import UserError

logger = get_logger(__name__)


class TrainingDiverged(UserError):
    """Too many consecutive non-finite losses."""


class SkipNonFiniteBatches:
    """Mixin for ``sb.Brain`` subclasses (before ``sb.Brain`` in the bases); needs ``max_nonfinite_batches`` in the
    hparams."""

    nonfinite_run = 0
    nonfinite_total = 0

    def fit_batch(self, batch):
        """SpeechBrain's fit_batch, but a non-finite input or loss skips the batch (no backward, no update) and
        ``max_nonfinite_batches`` consecutive ones stop training with a clear error."""
        should_step = (self.step % self.grad_accumulation_factor) == 0
        self.on_fit_batch_start(batch, should_step)
        loss = None
        if all_ranks(torch.isfinite(batch.sig[0]).all()):  # under DDP every rank skips together (no hang)
            with self.no_sync(not should_step):
                with self.training_ctx:
                    out = self.compute_forward(batch, sb.Stage.TRAIN)
                    loss = self.compute_objectives(out, batch, sb.Stage.TRAIN)
                if all_ranks(torch.isfinite(loss)):
                    self.scaler.scale(loss / self.grad_accumulation_factor).backward()
                else:
                    loss = torch.tensor(float("nan"))
        if loss is None or not torch.isfinite(loss):
            self.nonfinite_run += 1
            self.nonfinite_total += 1
            logger.warning(f"non-finite loss/input in batch {list(batch.id)}; batch skipped")
            self.zero_grad(set_to_none=True)
            if self.nonfinite_run >= self.hparams.max_nonfinite_batches:
                raise TrainingDiverged(
                    f"{self.nonfinite_run} consecutive batches had a non-finite loss or input (epoch "
                    f"{self.hparams.epoch_counter.current}, last batch {list(batch.id)[:4]}); check those wavs for "
                    f"NaN/inf samples or lower --lr (now {self.optimizer.param_groups[0]['lr']:g})")
            return torch.tensor(float("nan"))
        self.nonfinite_run = 0
        if should_step:
            self.optimizers_step()
        self.on_fit_batch_end(batch, out, loss, should_step)
        return loss.detach().cpu()
