"""SpeechBrain's Checkpointer, made safe against a kill in the middle of a save.

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
