"""Boundary refinement (common/refine.py): frame labels, and the loop moving biased boundaries to the sound."""
from __future__ import annotations

import numpy as np
import pytest

from common.refine import IGNORE, RefineConfig, frame_labels, refine, unit_label_ids
from tests.utils import TONE_FREQS as FREQS, TONE_SR as SR, mean_inner_error_ms, tone_corpus


def test_frame_labels_centre_convention():
    # units end at 12 ms and 30 ms; 5 ms frames are centred at 0, 5, 10, ...
    lab = frame_labels([7, 8], [0.012, 0.030], 7, 0.005)
    assert lab.tolist() == [7, 7, 7, 8, 8, 8, 8]


def test_frame_labels_margin_leaves_out_frames_near_boundaries():
    ends = [0.100, 0.300, 0.400]
    lab = frame_labels([1, 2, 3], ends, 81, 0.005, margin_s=0.020, margin_frac=0.3)
    centres = np.arange(81) * 0.005
    # inner boundaries at 100 and 300 ms: +-20 ms ignored; the short last unit (100 ms) keeps its middle 40 %
    assert all(lab[(centres > 0.081) & (centres < 0.119)] == IGNORE)
    assert all(lab[(centres > 0.281) & (centres < 0.319)] == IGNORE)
    assert lab[0] == 1 and lab[-1] == 3  # the audio's start and end are no boundaries
    assert lab[int(0.2 / 0.005)] == 2 and lab[int(0.35 / 0.005)] == 3
    assert set(lab[lab != IGNORE].tolist()) == {1, 2, 3}
    # without a margin every frame has a label
    assert IGNORE not in frame_labels([1, 2, 3], ends, 81, 0.005).tolist()


def test_unit_label_ids_edge_slots():
    assert unit_label_ids([5, 6], True, True, 0) == [0, 5, 6, 0]
    assert unit_label_ids([5, 6], False, True, 0) == [5, 6, 0]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_refine_moves_biased_boundaries_to_the_sound(precision):
    # bf16: the classifier under autocast (the export's default where the CPU has native bf16): same result
    wavs, units, true_ends = tone_corpus(40, seed=3)
    # a first pass that is 30 ms late at every boundary (and noisy), as a biased recognizer gives
    rng = np.random.default_rng(0)
    first = []
    for e in true_ends:
        f = e.copy()
        f[:-1] = np.maximum.accumulate(f[:-1] + 0.030 + rng.uniform(-0.01, 0.01, len(f) - 1))
        f[:-1] = np.minimum(f[:-1], f[-1] - 0.01)
        first.append(f)
    before = mean_inner_error_ms(first, true_ends)
    cfg = RefineConfig(rounds=4, epochs=4, epochs_later=3, channels=64, sample_rate=SR, precision=precision)
    counts, confs, stats = refine(lambda i: wavs[i], len(wavs), units, first, len(FREQS) + 1, cfg)
    hop = cfg.hop_ms / 1000
    after_ends = []
    for c, w, u in zip(counts, wavs, units):
        assert len(c) == len(u) and all(c >= 1) and c.sum() == 1 + len(w) // int(SR * hop)
        after_ends.append(np.minimum((np.cumsum(c) - 0.5) * hop, len(w) / SR))
    after = mean_inner_error_ms(after_ends, true_ends)
    assert before > 25 and after < 12, (before, after, stats)  # measured 7.7 ms; a wide classifier without margin: 30
    assert len(stats["rounds"]) == 4 and stats["rounds"][0]["mean_boundary_move_ms"] > 15
    assert all(len(cf) == len(u) and np.all((cf >= 0) & (cf <= 1)) for cf, u in zip(confs, units))


def test_refine_rejects_an_unknown_precision():
    wavs, units, true_ends = tone_corpus(2, seed=4)
    cfg = RefineConfig(rounds=1, epochs=1, channels=8, sample_rate=SR, precision="fp16")
    with pytest.raises(ValueError, match="precision must be fp32 or bf16"):
        refine(lambda i: wavs[i], len(wavs), units, true_ends, len(FREQS) + 1, cfg)


def test_refine_stops_at_the_time_cap():
    wavs, units, true_ends = tone_corpus(6, seed=4)
    cfg = RefineConfig(rounds=50, epochs=1, epochs_later=1, channels=16, max_minutes=1e-9, sample_rate=SR)
    counts, _, stats = refine(lambda i: wavs[i], len(wavs), units, true_ends, len(FREQS) + 1, cfg)
    assert len(stats["rounds"]) == 1 and len(counts) == len(wavs)  # one round, still a full re-alignment


def test_fixed_rows_teach_the_labelling_convention():
    """Hand-checked rows whose boundaries sit 15 ms after the sound change (a labeller's convention): pinned as the
    refiner's labels, they move the other rows' boundaries to that convention (measured 14.0 -> 4.9 ms)."""
    wavs, units, true_ends = tone_corpus(40, seed=3)
    rng = np.random.default_rng(0)
    convention, first = [], []
    for e in true_ends:
        c = e.copy()
        c[:-1] = np.minimum(c[:-1] + 0.015, c[-1] - 0.01)
        convention.append(c)
        f = e.copy()
        f[:-1] = np.maximum.accumulate(f[:-1] + 0.030 + rng.uniform(-0.01, 0.01, len(f) - 1))
        f[:-1] = np.minimum(f[:-1], f[-1] - 0.01)
        first.append(f)
    cfg = RefineConfig(rounds=4, epochs=4, epochs_later=3, channels=64, sample_rate=SR)
    hop = cfg.hop_ms / 1000
    labelled = set(range(0, 40, 4))
    others = [i for i in range(40) if i not in labelled]
    errors = []
    for fixed in ({}, {i: convention[i] for i in labelled}):
        counts, _, stats = refine(lambda i: wavs[i], len(wavs), units, first, len(FREQS) + 1, cfg, fixed_ends_s=fixed)
        ends = [np.minimum((np.cumsum(c) - 0.5) * hop, len(w) / SR) for c, w in zip(counts, wavs)]
        errors.append(mean_inner_error_ms([ends[i] for i in others], [convention[i] for i in others]))
        assert stats["fixed_utts"] == len(fixed)
    assert errors[0] > 10 and errors[1] < 0.6 * errors[0], errors


def test_median_fusion_ignores_one_far_off_member_and_the_final_cap():
    from common.refine import cap_final_phone, fuse_boundaries

    truth = [np.array([0.1, 0.25, 0.4, 1.0]), np.array([0.2, 0.3, 0.9])]
    good1 = [t + np.r_[0.004 * np.ones(len(t) - 1), 0] for t in truth]
    good2 = [t - np.r_[0.006 * np.ones(len(t) - 1), 0] for t in truth]
    late = [t + np.r_[0.05 * np.ones(len(t) - 1), 0] for t in truth]  # a flat start that learnt silence as phones
    members = [(1.0, good1), (1.0, good2), (1.0, late)]
    mean = fuse_boundaries(members, truth, "mean")
    med = fuse_boundaries(members, truth, "median")
    err = lambda f: max(float(np.max(np.abs(a[:-1] - b[:-1]))) for a, b in zip(f, truth))  # noqa: E731
    assert err(mean) > 0.015 and err(med) <= 0.004 + 1e-9
    assert fuse_boundaries([(1.0, [None, good1[1]]), (0.0, late)], truth, "median")[0] is truth[0]  # no member
    # per-boundary weights (the HMM-GMMs' posterior precisions): row by row an array, None where a member lacks it
    sure = [np.r_[np.ones(len(t) - 1), 1.0] for t in truth]
    unsure = [np.r_[1e-3 * np.ones(len(t) - 1), 1.0] for t in truth]
    for how in ("mean", "gated"):
        f = fuse_boundaries([(sure, good1), (unsure, late)], truth, how, 0.1)
        assert err(f) <= 0.0045, how  # the late member barely counts
    f = fuse_boundaries([([sure[0], None], good1), (1.0, good2)], truth, "mean")
    assert np.allclose(f[1], good2[1])  # the first member has no weights for row 1: left out there
    # the final cap: the phone before the trailing silence may not outlast k x its median elsewhere
    units = [["pau", "a", "t", "pau"], ["t", "a", "pau"], ["a", "t", "a", "pau"], ["t", "t", "pau"]]
    ends = [np.array([0.1, 0.2, 0.9, 1.2]), np.array([0.05, 0.15, 0.5]), np.array([0.1, 0.15, 0.25, 0.6]),
            np.array([0.05, 0.1, 0.4])]
    n = cap_final_phone(units, ends, 2.0, frozenset({"pau"}))
    assert n == 1 and ends[0][2] == pytest.approx(0.2 + 2 * 0.05)  # 't' elsewhere: 0.05 0.05 0.05 -> cap 0.1
