"""Closure landmarks (common/landmarks.py): a late vowel|stop boundary comes back to where the energy falls."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from common.landmarks import HOP_S, ClosureSnap, energy_envelope, snap_closures

SR = 16000


def _word(rng):
    """silence, vowel, stop (60 ms closure + 10 ms burst), vowel, stop, vowel, silence: (wav, unit kinds, true ends)"""
    kinds, parts = [], []

    def add(kind, dur):
        t = np.arange(int(dur * SR)) / SR
        if kind == "V":  # a voiced vowel: harmonics of 120 Hz
            x = sum(0.3 / k * np.sin(2 * np.pi * 120 * k * t) for k in range(1, 8))
        elif kind == "S":  # closure, then a burst
            x = np.zeros_like(t)
            x[-int(0.010 * SR):] = 0.2 * rng.standard_normal(int(0.010 * SR))
        else:
            x = np.zeros_like(t)
        kinds.append(kind)
        parts.append(x)

    add("sil", 0.15)
    for _ in range(2):
        add("V", rng.uniform(0.10, 0.18))
        add("S", rng.uniform(0.06, 0.09))
    add("V", 0.15)
    add("sil", 0.2)
    w = np.concatenate(parts)
    w = w + 0.002 * rng.standard_normal(len(w))
    return torch.from_numpy(w.astype(np.float32)), kinds, np.cumsum([len(p) for p in parts]) / SR


def test_energy_envelope_is_centred_every_2_5_ms():
    w = torch.full((SR,), 0.05)
    w[SR // 2:] = 0.5
    env = energy_envelope(w, SR)
    assert len(env) == 1 + SR // int(HOP_S * SR) and env.dtype == np.float32
    rise = int(np.argmax(np.gradient(env.astype(np.float64))))
    assert abs(rise * HOP_S - 0.5) <= HOP_S + 1e-9  # the step is at the window centre


def test_late_vowel_stop_boundaries_move_to_the_closure_and_nothing_else_moves():
    rng = np.random.default_rng(0)
    for _ in range(5):
        w, kinds, true = _word(rng)
        env = energy_envelope(w, SR)
        vowel, stop = np.array([k == "V" for k in kinds]), np.array([k == "S" for k in kinds])
        vs = np.array([vowel[j] and stop[j + 1] for j in range(len(kinds) - 1)] + [False])
        late = true.copy()
        late[vs] += 0.015
        full = late.copy()
        # the landmark, less half the envelope's window (its log energy falls fastest as it leaves the vowel)
        assert snap_closures(full, vowel, stop, env, ClosureSnap(fraction=1.0)) == 2
        assert np.all(np.abs(full[vs] - true[vs]) <= 0.003), (full - true)[vs]
        assert np.array_equal(full[~vs], late[~vs])  # stop|vowel, edges: untouched
        half = late.copy()
        snap_closures(half, vowel, stop, env, ClosureSnap())  # the default: half way
        assert np.all(np.abs(half[vs] - (true[vs] + 0.0075)) <= 0.003), (half - true)[vs]
        off = late.copy()
        assert snap_closures(off, vowel, stop, env, ClosureSnap(fraction=0.0)) == 0 and np.array_equal(off, late)


def test_a_snapped_boundary_stays_between_its_neighbours():
    rng = np.random.default_rng(1)
    w, kinds, true = _word(rng)
    env = energy_envelope(w, SR)
    vowel, stop = np.array([k == "V" for k in kinds]), np.array([k == "S" for k in kinds])
    ends = true.copy()
    ends[1] = ends[0] + 0.004  # a 4 ms vowel: its end cannot go back 15 ms
    snap_closures(ends, vowel, stop, env, ClosureSnap(fraction=1.0, before_ms=40.0, offset_ms=20.0))
    assert np.all(np.diff(ends) > 0) and ends[1] > ends[0]


@pytest.mark.parametrize("kw", [{"fraction": 1.5}, {"before_ms": -1.0}, {"before_ms": 0.0, "after_ms": 0.0}])
def test_closure_snap_rejects_bad_settings(kw):
    with pytest.raises(ValueError, match="closure"):
        ClosureSnap(**kw)
