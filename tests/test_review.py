"""Review flags relative to the corpus (common/review.py)."""
from __future__ import annotations

import numpy as np
import pytest

from common.review import review_flags, robust_z


def _corpus(n: int, seed: int = 0, per=75.0, conf=0.25):
    """Rows of a corpus whose recognizer is weak everywhere (PER ~75 %, confidence ~0.25: a fixed threshold
    flags them all) but whose HMM-GMM fit separates rows with a wrong transcript."""
    rng = np.random.default_rng(seed)
    return {f"l/{k:04d}": {"confidence": float(conf + 0.05 * rng.standard_normal()),
                           "greedy_per": float(per + 10 * rng.standard_normal()),
                           "hmm_fit": float(1.3 + 0.3 * rng.standard_normal()), "long_phone": False}
            for k in range(n)}


def test_robust_z_ignores_outliers_and_survives_a_constant_statistic():
    x = np.r_[np.random.default_rng(0).normal(10, 1, 200), [60.0, 80.0]]
    z = robust_z(x)
    assert z[-1] > 40 and z[-2] > 30 and np.all(np.abs(z[:-2]) < 4.5)
    assert np.all(np.isfinite(robust_z(np.full(50, 3.0))))


def test_a_weak_recognizer_flags_the_outliers_not_the_corpus():
    rows = _corpus(400)
    bad = ["l/0007", "l/0123", "l/0300"]
    for r in bad:
        rows[r]["hmm_fit"] += 3.0  # a wrong transcript forces frames into states that do not fit them
    rows["l/0042"]["long_phone"] = True
    flags, rule = review_flags(rows)
    flagged = {r for r, f in flags.items() if f}
    assert flagged == set(bad) | {"l/0042"}, flagged
    assert flags["l/0007"] == ["outlier_hmm_fit"] and flags["l/0042"] == ["long_phone"]
    assert rule["rule"] == "corpus" and set(rule["stats"]) == {"hmm_fit", "greedy_per", "confidence"}
    assert rule["stats"]["greedy_per"]["bad_side"] == "high" and rule["stats"]["confidence"]["bad_side"] == "low"
    # the fixed thresholds flag nearly every row of such a corpus
    fixed, rule = review_flags(rows, rule="fixed")
    assert sum(bool(f) for f in fixed.values()) > 350 and rule["rule"] == "fixed"


def test_rows_without_a_statistic_and_small_corpora():
    rows = _corpus(100, per=10.0, conf=0.6)
    for r in rows.values():
        r["hmm_fit"] = None  # no HMM-GMM refinement (--no_refine): the recognizer's statistics only
    rows["l/0005"]["greedy_per"] = 90.0
    rows["l/0006"]["confidence"] = 0.1
    flags, rule = review_flags(rows)
    assert {r for r, f in flags.items() if f} == {"l/0005", "l/0006"} and "hmm_fit" not in rule["stats"]
    assert flags["l/0005"] == ["outlier_greedy_per"] and flags["l/0006"] == ["outlier_confidence"]
    # too few rows for a distribution: the fixed thresholds, and the report says why
    small = {r: rows[r] for r in list(rows)[:10]}
    flags, rule = review_flags(small, min_rows=30)
    assert rule["rule"] == "fixed" and "fewer than 30 rows" in rule["why"] and flags["l/0005"] == ["high_per"]
    with pytest.raises(ValueError, match="flag_rule"):
        review_flags(rows, rule="loose")
