"""Acoustic landmarks: boundaries that a 2.5 ms energy envelope places better than 10 ms MFCC frames do.

A vowel followed by a stop ends where the closure begins: the voicing and the formants stop and the energy falls
abruptly (Stevens' "closure landmark"). The HMM-GMMs see 25 ms windows of cepstra normalised per utterance, in
which the vowel's decaying tail still looks like the vowel: on real speech (VoxAngeles, human-corrected) the
fused vowel|stop boundaries are +10 ms late at the median and 74 % within 20 ms, against 92 % for stop|vowel.
``snap_closures`` moves each vowel|stop boundary towards the steepest fall of the log energy near it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

HOP_S = 0.0025  # the envelope's step
WIN_S = 0.010  # its window (centred)


@dataclass(frozen=True)
class ClosureSnap:
    """``fraction`` of the way from a fused vowel|stop boundary to the closure landmark (0 = off): the steepest
    fall of the energy envelope within ``before_ms`` before and ``after_ms`` after the boundary, less
    ``offset_ms`` (the log energy of a centred ``WIN_S`` window falls fastest as the window leaves the vowel, about
    half a window after the closure begins)."""

    fraction: float = 0.5
    before_ms: float = 20.0
    after_ms: float = 10.0
    offset_ms: float = 5.0

    def __post_init__(self):
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"closure_snap must be in [0, 1], got {self.fraction}")
        if self.before_ms < 0 or self.after_ms < 0 or self.before_ms + self.after_ms <= 0:
            raise ValueError(f"closure_window_ms must be two values >= 0, not both 0, got "
                             f"[{self.before_ms}, {self.after_ms}]")

    @property
    def active(self) -> bool:
        return self.fraction > 0


def energy_envelope(wav: torch.Tensor, sample_rate: int) -> np.ndarray:
    """Log energy (dB) of ``WIN_S`` windows centred every ``HOP_S`` (window k centred at k * HOP_S), smoothed over
    3 steps: float32 [1 + len // hop]."""
    hop, win = max(1, int(round(HOP_S * sample_rate))), max(2, int(round(WIN_S * sample_rate)))
    x = torch.nn.functional.pad(wav.float().reshape(1, 1, -1), (win // 2, win // 2)).reshape(-1)
    frames = x.unfold(0, win, hop)  # the padding makes x at least one window long
    db = 10.0 * torch.log10(frames.pow(2).mean(1) + 1e-10)
    db = torch.nn.functional.avg_pool1d(db.reshape(1, 1, -1), 3, 1, 1, count_include_pad=False).reshape(-1)
    return db.numpy().astype(np.float32)


def snap_closures(ends: np.ndarray, is_vowel: np.ndarray, is_stop: np.ndarray, env: np.ndarray,
                  cfg: ClosureSnap) -> int:
    """In place: each boundary ``ends[j]`` between a vowel (``is_vowel[j]``) and a stop (``is_stop[j + 1]``) moves
    ``cfg.fraction`` of the way to the closure landmark in ``env`` (``energy_envelope``), staying strictly between
    its neighbouring boundaries. Returns how many moved."""
    if not cfg.active or len(env) < 3:
        return 0
    slope = np.gradient(env.astype(np.float64))
    moved = 0
    for j in range(len(ends) - 1):
        if not (is_vowel[j] and is_stop[j + 1]):
            continue
        b = float(ends[j])
        lo = max(1, int(round((b - cfg.before_ms / 1000.0) / HOP_S)))
        hi = min(len(slope) - 1, int(round((b + cfg.after_ms / 1000.0) / HOP_S)) + 1)
        if hi <= lo:
            continue
        landmark = (lo + int(np.argmin(slope[lo:hi]))) * HOP_S - cfg.offset_ms / 1000.0
        new = b + cfg.fraction * (landmark - b)
        left = float(ends[j - 1]) if j > 0 else 0.0
        new = min(max(new, left + HOP_S), float(ends[j + 1]) - HOP_S)
        if new != b and left < new < ends[j + 1]:
            ends[j] = new
            moved += 1
    return moved
