"""Phone-boundary accuracy: hypothesis segments (Matcha durations or TextGrids) vs a reference (``phones.tsv``).

Hypothesis segments from a Matcha sequence (``hyp_segments``) follow the export rule of ``common.durations``:
blanks, silence tokens and non-acoustic tokens (``|``, stress marks, punctuation) form gaps; a gap with frames is one
``pau`` segment, a gap without frames vanishes. Modifier tokens (length marks ``ː ˑ``, ``ʰ ʲ ʷ``..., combining
diacritics) are merged into the phone before them for scoring, so ``ɜ ː`` is one segment ``ɜː``.

Scoring. A boundary is the end of a segment that is not the last one. When the normalized label sequences are equal
the boundaries are paired one to one. Otherwise the segments are aligned by edit distance with a mapping-agnostic
cost (no phone-set mapping is needed, so espeak IPA can be scored against festival phones): substitution
``0.25 * (labels differ) + (1 - IoU)`` of the two time spans, silence <-> speech forbidden, insertion/deletion 0.75;
a reference boundary ``i|i+1`` is scored when segments ``i`` and ``i+1`` are paired with consecutive hypothesis
segments ``j`` and ``j+1``. Speech/silence edges are the boundaries with ``pau`` on either side (in the reference).
"""
from __future__ import annotations

import json
import statistics
import unicodedata
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

from common.durations import NON_ACOUSTIC
from common.io import UserError
from common.vocab import BLANK, SIL, SILENCE_TOKENS

SILENCE_LABELS = SILENCE_TOKENS | {"", "<blank>", "SIL", "sil", "silence"}
MODIFIERS = frozenset("ːˑʰʱʲʷˠˤ˞ʼ̩")
THRESHOLDS_MS = (10, 20, 25, 50)
EDGE_TYPES = ("speech-speech", "speech-silence")


class Segment(NamedTuple):
    start: float
    end: float
    label: str


def normalize_label(label: str) -> str:
    label = label.strip()
    return SIL if label in SILENCE_LABELS else label


def _is_modifier(token: str) -> bool:
    return bool(token) and all(ch in MODIFIERS or unicodedata.combining(ch) for ch in token)


def merge_silence(segments: Sequence[Segment]) -> list[Segment]:
    """Normalize labels and merge consecutive ``pau`` segments."""
    out: list[Segment] = []
    for s in segments:
        lab = normalize_label(s.label)
        if lab == SIL and out and out[-1].label == SIL:
            out[-1] = Segment(out[-1].start, s.end, SIL)
        else:
            out.append(Segment(s.start, s.end, lab))
    return out


def spans_from_ends(labels: Sequence[str], ends: Sequence[float]) -> list[Segment]:
    """One segment per label: the first starts at 0, each ends at its end time (seconds), the next starts there."""
    starts = [0.0, *ends[:-1]]
    return [Segment(float(s), float(e), lab) for s, e, lab in zip(starts, ends, labels)]


def reference_segments(phones: Sequence[str], ends: Sequence[float], where: str = "") -> list[Segment]:
    """festival ``phones`` + ``end times`` (seconds) -> segments starting at 0, silence merged."""
    if len(phones) != len(ends) or not phones:
        raise UserError(f"{where}: {len(phones)} phones but {len(ends)} end times")
    starts = [0.0, *ends[:-1]]
    if any(e < s - 1e-9 for s, e in zip(starts, ends)):
        raise UserError(f"{where}: end times must be non-decreasing")
    return merge_silence(spans_from_ends(phones, ends))


def token_spans(tokens: Sequence[str], durations: Sequence[int], sample_rate: int, hop_length: int) -> list[Segment]:
    """One span per Matcha token (blanks included): frame counts -> seconds."""
    if len(tokens) != len(durations):
        raise UserError(f"{len(tokens)} tokens but {len(durations)} durations")
    bounds = np.concatenate([[0], np.cumsum(np.asarray(durations, dtype=np.int64))]) * hop_length / sample_rate
    return [Segment(float(bounds[k]), float(bounds[k + 1]), t) for k, t in enumerate(tokens)]


def _is_gap(label: str) -> bool:
    return label == BLANK or label in SILENCE_TOKENS or label in NON_ACOUSTIC or normalize_label(label) == SIL


def collapse_spans(spans: Sequence[Segment], merge_modifiers: bool = True) -> list[Segment]:
    """Per-token spans -> scored segments: gap runs with time -> one ``pau``, empty gaps vanish, modifiers merged."""
    out: list[Segment] = []
    gap: list[float] | None = None           # [start, end] of the open gap
    for span in spans:
        tok = span.label.strip()
        if _is_gap(tok):
            gap = [span.start, span.end] if gap is None else [gap[0], span.end]
            continue
        if gap is not None and gap[1] > gap[0]:
            out.append(Segment(gap[0], gap[1], SIL))
        gap = None
        if merge_modifiers and _is_modifier(tok) and out and out[-1].label != SIL and out[-1].end == span.start:
            out[-1] = Segment(out[-1].start, span.end, out[-1].label + tok)
        else:
            out.append(Segment(span.start, span.end, tok))
    if gap is not None and gap[1] > gap[0]:
        out.append(Segment(gap[0], gap[1], SIL))
    return merge_silence(out)


def hyp_segments(tokens: Sequence[str], durations: Sequence[int], sample_rate: int, hop_length: int,
                 merge_modifiers: bool = True) -> list[Segment]:
    """Matcha sequence + durations -> scored segments (gaps -> ``pau``; modifiers merged into their phone)."""
    return collapse_spans(token_spans(tokens, durations, sample_rate, hop_length), merge_modifiers)


# ---------------------------------------------------------------- pairing
def _iou(a: Segment, b: Segment) -> float:
    inter = min(a.end, b.end) - max(a.start, b.start)
    union = max(a.end, b.end) - min(a.start, b.start)
    if union <= 0:
        return 1.0 if a.start == b.start else 0.0
    return max(inter, 0.0) / union


def _sub_cost(r: Segment, h: Segment) -> float:
    if (r.label == SIL) != (h.label == SIL):
        return 1e6
    return 0.25 * (r.label != h.label) + (1.0 - _iou(r, h))


def align_segments(ref: Sequence[Segment], hyp: Sequence[Segment], indel: float = 0.75) -> list[tuple[int, int]]:
    """Edit-distance alignment; returns the paired (ref index, hyp index) in order."""
    n, m = len(ref), len(hyp)
    cost = np.zeros((n + 1, m + 1))
    cost[1:, 0] = indel * np.arange(1, n + 1)
    cost[0, 1:] = indel * np.arange(1, m + 1)
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            cost[i, j] = min(cost[i - 1, j - 1] + _sub_cost(ref[i - 1], hyp[j - 1]),
                             cost[i - 1, j] + indel, cost[i, j - 1] + indel)
    pairs, i, j = [], n, m
    while i > 0 and j > 0:
        if np.isclose(cost[i, j], cost[i - 1, j - 1] + _sub_cost(ref[i - 1], hyp[j - 1])):
            pairs.append((i - 1, j - 1))
            i, j = i - 1, j - 1
        elif np.isclose(cost[i, j], cost[i - 1, j] + indel):
            i -= 1
        else:
            j -= 1
    return pairs[::-1]


def boundary_pairs(ref: Sequence[Segment], hyp: Sequence[Segment]) -> tuple[list[tuple[int, int]], bool]:
    """(ref boundary i, hyp boundary j) pairs -- boundary k is the end of segment k -- and whether one to one."""
    if [s.label for s in ref] == [s.label for s in hyp]:
        return [(i, i) for i in range(len(ref) - 1)], True
    al = align_segments(ref, hyp)
    pairs = [(i, j) for (i, j), (i2, j2) in zip(al, al[1:]) if i2 == i + 1 and j2 == j + 1]
    return pairs, False


# ---------------------------------------------------------------- metrics
def summarize(abs_err_ms: Sequence[float]) -> dict:
    """n, mean and median |error| (ms), % within each threshold."""
    if not len(abs_err_ms):
        return {"n": 0, "mean_ms": None, "median_ms": None, **{f"within_{t}ms": None for t in THRESHOLDS_MS}}
    a = np.asarray(abs_err_ms, dtype=np.float64)
    return {"n": int(a.size), "mean_ms": round(float(a.mean()), 3), "median_ms": round(float(np.median(a)), 3),
            **{f"within_{t}ms": round(float(100.0 * np.mean(a <= t + 1e-9)), 2) for t in THRESHOLDS_MS}}


def _rate_key(rate) -> str:
    return "unknown" if rate is None else f"{float(rate):g}"


def evaluate(reference: dict[str, tuple[list[str], list[float]]], hyps: dict[str, list[Segment]],
             rates: dict[str, float] | None = None, worst_n: int = 10) -> tuple[dict, dict[str, np.ndarray]]:
    """Score every hypothesis utterance; returns (report dict, {group: signed errors in ms}) for plots."""
    unknown = sorted(set(hyps) - set(reference))
    if unknown:
        raise UserError(f"{len(unknown)} hypothesis row(s) are not in the reference, e.g. {unknown[:3]}; "
                        f"is it the phones.tsv of this corpus?")
    rates = rates or {}
    rows, utts = [], []
    n_ref_bounds = n_one_to_one = 0
    for rel in sorted(hyps):
        ref = reference_segments(*reference[rel], where=rel)
        hyp = hyps[rel]
        pairs, one_to_one = boundary_pairs(ref, hyp)
        n_one_to_one += one_to_one
        n_ref_bounds += len(ref) - 1
        voice = rel.split("/")[0] if "/" in rel else "-"
        rate = _rate_key(rates.get(rel))
        errs = []
        for i, j in pairs:
            err = (hyp[j].end - ref[i].end) * 1000.0
            edge = "speech-silence" if SIL in (ref[i].label, ref[i + 1].label) else "speech-speech"
            rows.append((voice, rate, edge, err))
            errs.append(abs(err))
        utts.append({"rel_path": rel, "voice": voice, "rate": rate, "one_to_one": one_to_one,
                     "ref_boundaries": len(ref) - 1, "scored": len(pairs),
                     "mean_ms": round(statistics.fmean(errs), 3) if errs else None,
                     "max_ms": round(max(errs), 3) if errs else None,
                     "length_diff_ms": round((hyp[-1].end - ref[-1].end) * 1000.0, 3) if hyp else None})
    signed = np.asarray([r[3] for r in rows], dtype=np.float64)
    absolute = np.abs(signed)

    def group(idx: int) -> dict:
        keys = sorted({r[idx] for r in rows})
        return {k: summarize(absolute[[r[idx] == k for r in rows]]) for k in keys}

    scored = [u for u in utts if u["mean_ms"] is not None]
    report = {
        "utterances": len(hyps),
        "reference_utterances": len(reference),
        "missing_hypotheses": len(set(reference) - set(hyps)),
        "one_to_one_utterances": n_one_to_one,
        "edit_distance_utterances": len(hyps) - n_one_to_one,
        "reference_boundaries": n_ref_bounds,
        "scored_boundaries": len(rows),
        "overall": summarize(absolute),
        "mean_signed_ms": round(float(signed.mean()), 3) if rows else None,
        "by_edge": group(2),
        "by_voice": group(0),
        "by_rate": group(1),
        "worst_utterances": sorted(scored, key=lambda u: -u["mean_ms"])[:worst_n],
    }
    errors = {"all": signed, **{e: signed[[r[2] == e for r in rows]] for e in EDGE_TYPES}}
    return report, errors


def format_table(report: dict) -> str:
    """A readable table of the report's groups."""
    head = f"{'group':<28}{'n':>7}{'mean':>9}{'median':>9}" + "".join(f"{'<=' + str(t):>8}" for t in THRESHOLDS_MS)
    lines = [head, "-" * len(head)]

    def row(name: str, s: dict) -> None:
        if not s["n"]:
            lines.append(f"{name:<28}{0:>7}")
            return
        lines.append(f"{name:<28}{s['n']:>7}{s['mean_ms']:>9.2f}{s['median_ms']:>9.2f}"
                     + "".join(f"{s[f'within_{t}ms']:>7.1f}%" for t in THRESHOLDS_MS))

    row("overall", report["overall"])
    for title, key in (("edge", "by_edge"), ("voice", "by_voice"), ("rate", "by_rate")):
        for k, s in report[key].items():
            row(f"{title} {k}", s)
    lines.append(f"scored {report['scored_boundaries']} of {report['reference_boundaries']} reference boundaries "
                 f"in {report['utterances']} utterance(s) ({report['one_to_one_utterances']} one-to-one, "
                 f"{report['edit_distance_utterances']} paired by edit distance); errors in ms")
    if report["worst_utterances"]:
        lines.append("worst: " + ", ".join(f"{u['rel_path']} ({u['mean_ms']:.1f} ms)"
                                           for u in report["worst_utterances"][:5]))
    return "\n".join(lines)


def plot_histogram(errors: dict[str, np.ndarray], path: str | Path) -> None:
    """Histogram of signed boundary errors (ms), all boundaries and speech/silence edges; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common.io import atomic_path

    fig, ax = plt.subplots(figsize=(7, 4))
    allerr = errors.get("all", np.zeros(0))
    lim = float(np.clip(np.percentile(np.abs(allerr), 99) if allerr.size else 50.0, 25.0, 500.0))
    bins = np.linspace(-lim, lim, 61)
    for name, color in (("speech-speech", "tab:blue"), ("speech-silence", "tab:orange")):
        e = errors.get(name, np.zeros(0))
        if e.size:
            ax.hist(np.clip(e, -lim, lim), bins=bins, alpha=0.6, color=color, label=f"{name} (n={e.size})")
    ax.set_xlabel("boundary error, hypothesis - reference (ms)")
    ax.set_ylabel("boundaries")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def read_rates(corpus_info: str | Path) -> dict[str, float]:
    """Speaking rate per rel_path from ``corpus_info.json``; {} when absent or without rates.

    Accepted: ``{"utterances": {rel_path: {"rate": x} | x}}``, ``{"utterances": [{"rel_path": .., "rate": x}]}``
    or a top-level ``{"rates" | "speaking_rate" | "duration_stretch": {rel_path: x}}``; the per-utterance key may be
    ``rate``, ``speaking_rate``, ``duration_stretch`` or ``stretch``.
    """
    path = Path(corpus_info)
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None
    keys = ("rate", "speaking_rate", "duration_stretch", "stretch")
    out: dict[str, float] = {}

    def take(rel, val) -> None:
        if isinstance(val, dict):
            val = next((val[k] for k in keys if k in val), None)
        if isinstance(val, (int, float)) and not isinstance(val, bool):
            out[str(rel)] = float(val)

    if not isinstance(info, dict):
        return {}
    utts = info.get("utterances")
    if isinstance(utts, dict):
        for rel, val in utts.items():
            take(rel, val)
    elif isinstance(utts, list):
        for item in utts:
            if isinstance(item, dict) and "rel_path" in item:
                take(item["rel_path"], item)
    for k in ("rates", "speaking_rate", "duration_stretch"):
        if isinstance(info.get(k), dict):
            for rel, val in info[k].items():
                take(rel, val)
    return out
