"""Frame-time arithmetic shared by every alignment pass (first pass, refinement, HMM-GMM, calibration).

Convention: an analysis frame ``t`` of a feature extractor with ``center=True`` (SpeechBrain's Fbank, torchaudio's
MelSpectrogram/MFCC as used here) is centred at ``t * hop`` seconds, and a signal of ``n`` samples has
``n // hop_samples + 1`` frames. So a unit that owns frames ``[a, b)`` of an alignment path ends half a frame
before frame ``b``'s centre, at ``(b - 0.5) * hop``; the last unit ends with the audio.

(Matcha's own mel frames use another convention, ``center=False``: see ``common/durations.py``.)
"""
from __future__ import annotations

import numpy as np


def num_feature_frames(num_samples: int, hop_samples: int) -> int:
    """Frames of a ``center=True`` extractor: ``num_samples // hop + 1``."""
    return int(num_samples) // int(hop_samples) + 1


def hop_samples(sample_rate: int, hop_ms: float) -> int:
    """Samples per frame shift (``sample_rate * hop_ms / 1000``, e.g. 160 at 16 kHz and 10 ms)."""
    return int(round(int(sample_rate) * float(hop_ms) / 1000.0))


def frame_ends_seconds(frames: np.ndarray, hop_s: float, duration_s: float) -> np.ndarray:
    """Per-unit frame counts -> unit end times (s) under the centred-frame convention."""
    return start_frames_to_ends(np.cumsum(np.asarray(frames, dtype=np.int64))[:-1], hop_s, duration_s)


def start_frames_to_ends(starts, hop_s: float, duration_s: float) -> np.ndarray:
    """The frame where each unit after the first begins (fractional where a posterior placed it) -> every unit's
    end time (s) under the centred-frame convention (a unit ends half a frame before its successor's first frame),
    the last unit ending with the audio."""
    ends = np.clip((np.append(np.asarray(starts, dtype=np.float64), np.inf) - 0.5) * hop_s, 0.0, duration_s)
    ends[-1] = duration_s
    return np.maximum.accumulate(ends)


def ends_to_counts(ends_s, n_frames: int, hop_s: float) -> np.ndarray:
    """Unit end times (s) -> frames per unit under the centred-frame convention: the inverse of
    ``frame_ends_seconds`` (a unit ends half a frame before its last cumulative frame), exact to half a frame."""
    cum = np.clip(np.floor(np.asarray(ends_s, dtype=np.float64) / hop_s + 1.0).astype(np.int64), 0, n_frames)
    cum[-1] = n_frames
    return np.diff(np.concatenate([[0], np.maximum.accumulate(cum)]))
