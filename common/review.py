"""Which exported rows a user should look at: review flags in ``export_report.json``.

Fixed thresholds (a mean phone confidence below 0.3, a greedy PER above 60 %) suit a recognizer that hears the
corpus well; trained on half an hour of many languages it reaches 75 % PER on every row, and fixed thresholds flag
almost everything (1,570 of 1,976 VoxAngeles rows). So by default a row is flagged when it is an outlier *for this
corpus*: a statistic lies more than ``z`` robust standard deviations (1.4826 x the median absolute deviation) on
the bad side of the corpus' median. A wrong transcript stands out against the corpus however weak the recognizer
is, because every other row shares that weakness.

Statistics, per row, in the report: ``hmm_fit`` (when refined by the HMM-GMMs: how much worse the row's forced
alignment explains its frames than the model's best state does, ``common.hmm.fit_gaps``; high is bad),
``confidence`` (mean per-phone CTC confidence, low is bad), ``greedy_per`` (the CTC best path's PER against the
transcript, high is bad), ``ctc_gap`` (nats per frame by which the transcript's CTC likelihood falls short of the
best path's, high is bad) and, when refined by the frame classifier, ``refine_confidence`` (its mean posterior of
the aligned phones, low is bad). The flags use ``FLAG_STATS``; a phone longer than ``max_phone_s`` is always
flagged (``long_phone``).

Measured with 6 transcripts swapped between words of one language (``benchmarks/real_speech.py --swap 6``, and
``benchmarks/accuracy.py``'s cleaning check): on VoxAngeles' development languages (recognizer PER 75 %) only
``hmm_fit`` separates them (z 4.6-7.9 for 5 of the 6; the sixth, a 3-phone word given a 7-phone transcript whose
extra phones the aligner squeezed into its last vowel, z 1.4), while the recognizer's statistics stay inside the
corpus' spread (|z| < 1.2); on the festival corpus every statistic puts the 6 far out (z > 6). ``ctc_gap`` and
``refine_confidence`` are reported but not used: a good recognizer's ``ctc_gap`` barely varies (MAD 0.01 nats), so
its z-scores flag clean rows.
"""
from __future__ import annotations

import numpy as np

RULES = ("corpus", "fixed")
# statistic -> +1 when high is bad, -1 when low is bad
DIRECTION = {"confidence": -1, "greedy_per": +1, "ctc_gap": +1, "hmm_fit": +1, "refine_confidence": -1}
FLAG_STATS = ("hmm_fit", "greedy_per", "confidence")
MAD_SCALE = 1.4826  # MAD -> standard deviation for a normal distribution


def robust_z(values: np.ndarray) -> np.ndarray:
    """(x - median) / (1.4826 MAD); a corpus whose values barely vary gets a floor on the spread instead of a
    division by ~0 (1 % of the median's magnitude, at least 1e-6)."""
    x = np.asarray(values, dtype=np.float64)
    med = np.median(x)
    spread = MAD_SCALE * np.median(np.abs(x - med))
    return (x - med) / max(spread, 0.01 * abs(med), 1e-6)


def review_flags(rows: dict[str, dict], rule: str = "corpus", z: float = 4.0, min_rows: int = 30,
                 low_conf: float = 0.3, high_per: float = 60.0, stats=FLAG_STATS) -> tuple[dict, dict]:
    """Flags per row (``rows[rel]``: the statistics above, ``long_phone`` a bool) -> (``{rel: [flag, ...]}``, a
    description of the rule applied for the report). ``corpus``: the robust z-score rule over ``stats`` (with fewer
    than ``min_rows`` rows there is no distribution to speak of: the fixed thresholds apply); ``fixed``: mean phone
    confidence below ``low_conf`` or greedy PER above ``high_per``."""
    if rule not in RULES:
        raise ValueError(f"flag_rule must be one of {RULES}, got {rule!r}")
    rels = sorted(rows)
    flags: dict[str, list[str]] = {r: (["long_phone"] if rows[r].get("long_phone") else []) for r in rels}
    if rule == "corpus" and len(rels) >= min_rows:
        desc = {"rule": "corpus", "z": z, "stats": {}}
        for name in stats:
            have = [r for r in rels if rows[r].get(name) is not None]  # e.g. no HMM-GMM fit without refinement
            if len(have) < min_rows:
                continue
            x = np.asarray([rows[r][name] for r in have], dtype=np.float64)
            zs = DIRECTION[name] * robust_z(x)
            med = float(np.median(x))
            desc["stats"][name] = {"median": round(med, 4), "mad": round(float(np.median(np.abs(x - med))), 4),
                                   "bad_side": "high" if DIRECTION[name] > 0 else "low", "rows": len(have)}
            for r, v in zip(have, zs):
                if v > z:
                    flags[r].append(f"outlier_{name}")
    else:
        desc = {"rule": "fixed", "low_confidence": f"mean phone confidence < {low_conf}",
                "high_per": f"CTC greedy PER vs the transcript > {high_per}%"}
        if rule == "corpus":
            desc["why"] = f"fewer than {min_rows} rows: no corpus distribution to compare with"
        for r in rels:
            if rows[r]["confidence"] < low_conf:
                flags[r].append("low_confidence")
            if rows[r]["greedy_per"] > high_per:
                flags[r].append("high_per")
    return flags, desc
