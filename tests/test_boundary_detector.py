"""The boundary detector (common/boundary_detector.py): trained on noisy fused boundaries, it finds the sound change."""
from __future__ import annotations

import numpy as np
import pytest

from common.boundary_detector import DetectorConfig, detect, train_detector
from common.refine import Features
from tests.utils import TONE_SR as SR, mean_inner_error_ms, tone_corpus


def _noisy(true_ends, rng, late_share: float, late_s: float = 0.035, scale_s: float = 0.006):
    """Members' end times: every inner boundary off by a Laplacian error (scale 6 ms), a share of them grossly late
    (as a member that disagrees)."""
    out = []
    for e in true_ends:
        f = e.copy()
        n = len(f) - 1
        f[:-1] = f[:-1] + rng.laplace(0.0, scale_s, n) + late_s * (rng.random(n) < late_share)
        out.append(np.maximum.accumulate(np.minimum(f, e[-1])))
    return out


def test_detector_trained_on_noisy_boundaries_finds_the_sound_change():
    wavs, units, true_ends = tone_corpus(60, seed=5)
    fx = Features(SR, 5.0)
    feats = [fx(w).half() for w in wavs]
    # manner classes: silence 0, two kinds of tone (the detector is told the kinds, never which tone)
    classes = [np.array([0 if u == 0 else 1 + u % 2 for u in us]) for us in units]
    rng = np.random.default_rng(0)
    targets = _noisy(true_ends, rng, 0.2)  # what the members' fusion gave: ~6 ms off, a fifth 35 ms late
    before = mean_inner_error_ms(targets, true_ends)
    # a few epochs: the detector learns what the boundaries share (the sound change) before it could learn each
    # one's own error (measured: 3 epochs 2.1 ms; 10 epochs of a 2x wider model 8.1 ms, it memorises the noise)
    cfg = DetectorConfig(epochs=3, channels=16)
    model, losses = train_detector(feats, classes, targets, 3, 0.005, cfg)
    assert len(losses) == 3 and losses[-1] < losses[0]
    # two members that disagree: one late on half the boundaries, one jittered
    proposals = [_noisy(true_ends, rng, 0.5), _noisy(true_ends, rng, 0.0)]
    durations = [len(w) / SR for w in wavs]
    found = detect(model, feats, classes, proposals, durations, 0.005, cfg)
    after = mean_inner_error_ms(found, true_ends)
    assert before > 10 and after < 5, (before, after)  # measured: 11.9 -> 2.1 ms
    for f, p0, p1, d in zip(found, *proposals, durations):
        assert f[-1] == pytest.approx(d) and np.all(np.diff(f) >= 0)
        # each boundary stays between the members' earliest - search and latest + search (to the frame)
        lo, hi = np.minimum(p0, p1)[:-1] - 0.030 - 0.005, np.maximum(p0, p1)[:-1] + 0.030 + 0.005
        assert np.all((f[:-1] >= lo) & (f[:-1] <= hi))


def test_detector_search_zero_keeps_one_frame_and_rows_without_proposals():
    wavs, units, true_ends = tone_corpus(8, seed=1)
    fx = Features(SR, 5.0)
    feats = [fx(w).half() for w in wavs]
    classes = [np.array([0 if u == 0 else 1 for u in us]) for us in units]
    cfg = DetectorConfig(epochs=1, channels=8, search_ms=0.0)
    model, _ = train_detector(feats, classes, true_ends, 2, 0.005, cfg)
    proposals = [[e if i != 3 else None for i, e in enumerate(true_ends)]]
    found = detect(model, feats, classes, proposals, [len(w) / SR for w in wavs], 0.005, cfg)
    assert found[3] is None
    for i, (f, e) in enumerate(zip(found, true_ends)):
        if i != 3:  # with no search margin: the frame nearest each proposal
            assert np.all(np.abs(f[:-1] - e[:-1]) <= 0.0051)


@pytest.mark.parametrize("field,value,msg", [("weight", -1.0, "weight must be >= 0"),
                                             ("epochs", 0, "epochs must be > 0"),
                                             ("search_ms", -5.0, "search_ms must be >= 0"),
                                             ("precision", "fp8", "precision must be fp32 or bf16")])
def test_detector_config_errors(field, value, msg):
    with pytest.raises(ValueError, match=msg):
        DetectorConfig(**{field: value}).check()
    DetectorConfig(weight=0.0, epochs=0).check()  # off: the other knobs are not looked at
