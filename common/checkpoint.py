"""Checkpoints: SpeechBrain's Checkpointer made safe against a kill in the middle of a save, and averaging of the
last epochs' weights.

``speechbrain.utils.checkpoints.Checkpointer.save_checkpoint`` writes ``CKPT.yaml`` first and the parameter files
after it, and a folder counts as a checkpoint as soon as its ``CKPT.yaml`` exists. A run killed during a save
therefore leaves a "checkpoint" with a truncated ``model.ckpt`` that the next start picks as the most recent one
and fails to load. Here ``CKPT.yaml`` is written under a hidden name and renamed into place only after every
parameter file is written, so an interrupted save is invisible; its leftover folder is removed by
``remove_incomplete``.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from speechbrain.utils.checkpoints import CKPT_PREFIX, METAFNAME, Checkpointer
from speechbrain.utils.distributed import ddp_barrier

PENDING = "." + METAFNAME + ".pending"


class AtomicCheckpointer(Checkpointer):
    """Drop-in ``Checkpointer`` (same arguments) whose checkpoints appear only once complete."""

    def _save_checkpoint_metafile(self, fpath, meta_to_include={}, end_of_epoch=True):  # noqa: B006 (as upstream)
        pending = Path(fpath).with_name(PENDING)
        meta = super()._save_checkpoint_metafile(pending, meta_to_include, end_of_epoch)
        self._pending = pending
        return meta

    def save_checkpoint(self, *args, **kwargs):
        self._pending = None
        ckpt = super().save_checkpoint(*args, **kwargs)
        if self._pending is not None:  # main process: all parameter files are written, publish the checkpoint
            os.replace(self._pending, self._pending.with_name(METAFNAME))
            self._pending = None
        # Under DDP the other processes leave super().save_checkpoint before the rename above; without this barrier
        # one of them could list the checkpoints (delete_checkpoints does, on every process) before the new one
        # appears, pick a different set to delete, and wait forever in a collective that rank 0 never joins.
        ddp_barrier()
        return ckpt

    def remove_incomplete(self) -> list[Path]:
        """Delete checkpoint folders of an interrupted save (no ``CKPT.yaml``); returns them."""
        gone = []
        root = Path(self.checkpoints_dir)
        if root.is_dir():
            for d in root.iterdir():
                if d.is_dir() and d.name.startswith(CKPT_PREFIX) and not (d / METAFNAME).exists():
                    shutil.rmtree(d, ignore_errors=True)
                    gone.append(d)
        return gone


def average_last_checkpoints(brain, k: int, valid_set, loader_kwargs: dict) -> dict | None:
    """Average the model weights of the last ``k`` (>= 2) end-of-epoch checkpoints (SpeechBrain's
    ``average_checkpoints``), score the average on the validation set with the Brain's own valid stage, and save
    it as a checkpoint when its valid PER beats every epoch (test and export then load it as the best). Returns
    what was done (None when there were fewer than two checkpoints)."""
    import speechbrain as sb
    import torch
    from speechbrain.utils.checkpoints import average_checkpoints

    ckpts = brain.checkpointer.find_checkpoints(
        ckpt_predicate=lambda c: c.meta.get("end-of-epoch") and "averaged" not in c.meta, max_num_checkpoints=k)
    if len(ckpts) < 2:
        return None
    best = min((v["PER"] for v in brain.results["valid"]), default=float("inf"))
    last = max(c.meta.get("epoch", 0) for c in ckpts)
    brain.hparams.model.load_state_dict(average_checkpoints(ckpts, "model"))
    loader = brain.make_dataloader(valid_set, sb.Stage.VALID, **loader_kwargs)
    brain.on_stage_start(sb.Stage.VALID)
    brain.modules.eval()
    with torch.no_grad():
        for batch in loader:
            brain.evaluate_batch(batch, stage=sb.Stage.VALID)
    per = brain.per_metrics.summarize("error_rate")
    kept = per < best
    info = {"checkpoints": len(ckpts), "epochs": sorted(c.meta.get("epoch") for c in ckpts),
            "valid_PER": round(per, 3), "best_epoch_valid_PER": round(best, 3), "used": kept}
    brain.hparams.train_logger.log_stats(stats_meta={"averaged last": len(ckpts), "epoch": last},
                                         valid_stats={"PER": per, "used": int(kept)})
    if kept:
        brain.checkpointer.save_checkpoint(meta={"PER": per, "epoch": last, "averaged": len(ckpts)})
    return info
