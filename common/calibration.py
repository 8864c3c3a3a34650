"""Boundary calibration: learn the labelling convention of a few hand-checked utterances, apply it to the corpus.

An unsupervised aligner places a boundary where the acoustics change most; a human labeller (or festival's
synthesizer, for the built-in corpus) follows its own convention, e.g. a stop-vowel boundary at the release rather
than at the onset of voicing. Such a difference is systematic: on the built-in corpus about 40 % of the default
export's remaining error is a per (voice, left phone, right phone) mean offset. No aligner can learn it without
labels; a few labelled utterances are enough to estimate it.

``fit`` takes, for every boundary of the labelled utterances, ``(speaker, left, right, reference - exported)``
and estimates the mean offset of each boundary type with hierarchical shrinkage (every estimate is pulled towards
its parent by ``shrink`` pseudo-observations): all boundaries -> speaker -> (speaker, right phone) ->
(speaker, left phone, right phone); a speaker not in the labelled set uses the pooled chain all -> right phone ->
(left, right). ``apply`` moves every boundary of an utterance by its type's offset (a piecewise-linear time warp,
so tokens inside a segment -- blanks, modifiers -- move with it), keeping each segment at least ``min_s`` long.

Boundaries and labels are those of the scored segments (``common.boundary_eval.collapse_spans``: blanks and silence
tokens form ``pau`` segments, modifiers merge into their phone), as ``align/evaluate.py`` scores them, except that
word separators and stress marks (espeak IPA) are not pauses (``segments``).
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from common.boundary_eval import Segment, boundary_pairs, collapse_spans, reference_segments, spans_from_ends
from common.corpus import read_phones_tsv
from common.durations import STRESS_MARKS, WORD_SEP
from common.io import UserError, write_json

FORMAT = "phone-durations boundary calibration"
VERSION = 1
SEP = "\t"
LEVELS = ("all", "right", "pair", "speaker", "speaker_right", "speaker_pair")
SPLIT = STRESS_MARKS | {WORD_SEP, " "}  # tokens that hold time in an alignment but mark no pause (punctuation may)


def segments(tokens: Sequence[str], ends: Sequence[float]) -> list[Segment]:
    """The scored segments (``collapse_spans``) of an alignment, except that the time of a run of word separators
    and stress marks between two tokens is split at its middle between them: such a run marks a word or a stress,
    not a pause, so its edges are not boundaries to calibrate (on espeak IPA, moving them as pauses made things
    worse)."""
    spans = spans_from_ends(tokens, ends)
    out = list(spans)
    k = 0
    while k < len(spans):
        if spans[k].label.strip() not in SPLIT:
            k += 1
            continue
        j = k
        while j + 1 < len(spans) and spans[j + 1].label.strip() in SPLIT:
            j += 1
        if k > 0 and j + 1 < len(spans):
            mid = 0.5 * (spans[k].start + spans[j].end)
            out[k - 1] = out[k - 1]._replace(end=mid)
            out[j + 1] = out[j + 1]._replace(start=mid)
            for m in range(k, j + 1):
                out[m] = Segment(mid, mid, spans[m].label)
        k = j + 1
    return collapse_spans(out)


def boundary_samples(speaker: str, tokens: Sequence[str], ends: Sequence[float],
                     reference: Sequence[Segment]) -> list[tuple[str, str, str, float]]:
    """``(speaker, left label, right label, reference end - exported end in s)`` for every exported boundary that
    pairs with a reference boundary (one to one, or by edit distance as ``align/evaluate.py`` pairs them)."""
    hyp = segments(tokens, ends)
    pairs, _ = boundary_pairs(list(reference), hyp)
    return [(speaker, hyp[j].label, hyp[j + 1].label, float(reference[i].end - hyp[j].end)) for i, j in pairs]


@dataclass
class Calibration:
    """Offsets in seconds per boundary type, with the number of labelled boundaries behind each."""
    shrink: float = 1.0
    tables: dict[str, dict[tuple, tuple[float, int]]] = field(default_factory=lambda: {k: {} for k in LEVELS})
    info: dict = field(default_factory=dict)

    def offset(self, speaker: str, left: str, right: str) -> float:
        t = self.tables
        if (speaker,) in t["speaker"]:
            for level, key in (("speaker_pair", (speaker, left, right)), ("speaker_right", (speaker, right))):
                if key in t[level]:
                    return t[level][key][0]
            return t["speaker"][(speaker,)][0]
        for level, key in (("pair", (left, right)), ("right", (right,))):
            if key in t[level]:
                return t[level][key][0]
        return t["all"].get((), (0.0, 0))[0]

    @property
    def boundaries(self) -> int:
        return self.tables["all"].get((), (0.0, 0))[1]

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "shrink": self.shrink, "info": self.info,
                "offsets_ms": {level: {SEP.join(k): [round(v * 1000.0, 3), n] for k, (v, n) in sorted(tab.items())}
                               for level, tab in self.tables.items()}}

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "Calibration":
        path = Path(path)
        fix = "write it with align/calibrate.py"
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"{path}: calibration file not found; {fix}") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise UserError(f"{path}: cannot read the calibration ({err}); {fix}") from None
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise UserError(f"{path}: not a boundary calibration file; {fix}")
        if obj.get("version") != VERSION:
            raise UserError(f"{path}: calibration version {obj.get('version')!r}, this code reads {VERSION}; {fix}")
        cal = cls(shrink=float(obj.get("shrink", 1.0)), info=obj.get("info", {}))
        try:
            for level in LEVELS:
                for k, (ms, n) in obj["offsets_ms"][level].items():
                    value = float(ms) / 1000.0
                    if not math.isfinite(value):
                        raise ValueError(f"offset {ms!r}")
                    cal.tables[level][tuple(k.split(SEP)) if k else ()] = (value, int(n))
        except (KeyError, TypeError, ValueError) as err:
            raise UserError(f"{path}: malformed calibration offsets ({err}); {fix}") from None
        return cal


def fit(samples: Iterable[tuple[str, str, str, float]], shrink: float = 1.0,
        info: dict | None = None) -> Calibration:
    """Hierarchically shrunk mean offsets (see the module docstring) from ``boundary_samples``."""
    if shrink < 0:
        raise UserError(f"--shrink must be >= 0 (got {shrink})")
    sums: dict[str, dict[tuple, list[float]]] = {k: defaultdict(lambda: [0.0, 0]) for k in LEVELS}
    n = 0
    for spk, left, right, off in samples:
        n += 1
        for level, key in (("all", ()), ("right", (right,)), ("pair", (left, right)), ("speaker", (spk,)),
                           ("speaker_right", (spk, right)), ("speaker_pair", (spk, left, right))):
            acc = sums[level][key]
            acc[0] += off
            acc[1] += 1
    if n == 0:
        raise UserError("no labelled boundary paired with an exported one: are the reference rows in the export?")
    cal = Calibration(shrink=shrink, info=dict(info or {}))

    def level(name: str, parent) -> None:
        for key, (s, k) in sums[name].items():
            cal.tables[name][key] = ((s + shrink * parent(key)) / (k + shrink), k)

    level("all", lambda key: 0.0)
    top = cal.tables["all"][()][0]
    level("right", lambda key: top)
    level("pair", lambda key: cal.tables["right"][key[1:]][0])
    level("speaker", lambda key: top)
    level("speaker_right", lambda key: cal.tables["speaker"][key[:1]][0])
    level("speaker_pair", lambda key: cal.tables["speaker_right"][(key[0], key[2])][0])
    return cal


def cross_validate(samples: Sequence[tuple[str, str, str, float]], utt_of: Sequence[str], shrink: float = 1.0,
                   folds: int = 5, seed: int = 0) -> dict:
    """Mean |error| (ms) and % within 20 ms of the labelled boundaries before and after calibration, the offsets
    of each utterance estimated from the other folds' utterances only (what calibration gains on unseen rows)."""
    utts = sorted(set(utt_of))
    if len(utts) < folds:
        return {}
    order = np.random.default_rng(seed).permutation(len(utts))
    fold_of = {utts[i]: f % folds for f, i in enumerate(order)}
    fold = np.array([fold_of[u] for u in utt_of])
    off = np.array([s[3] for s in samples])
    res = np.empty_like(off)
    for f in range(folds):
        cal = fit((s for s, g in zip(samples, fold) if g != f), shrink)
        for k in np.nonzero(fold == f)[0]:
            spk, left, right, o = samples[k]
            res[k] = o - cal.offset(spk, left, right)

    def stats(err_s: np.ndarray) -> dict:
        ms = np.abs(err_s) * 1000.0
        return {"mean_ms": round(float(ms.mean()), 3), "within_20ms": round(float((ms <= 20).mean() * 100), 2)}

    return {"folds": folds, "boundaries": int(len(off)), "before": stats(off), "after": stats(res)}


def apply(tokens: Sequence[str], ends: Sequence[float], speaker: str, cal: Calibration,
          min_s: float) -> np.ndarray:
    """Unit end times (s, the last one = the utterance's end) -> calibrated end times.

    Every scored boundary moves by its type's offset; the segments are kept at least ``min_s`` long (and inside
    the utterance); unit ends inside a segment follow by linear interpolation."""
    segs = segments(tokens, ends)
    idx = list(range(len(segs) - 1))
    return _warp(ends, segs, idx, [segs[j].end + cal.offset(speaker, segs[j].label, segs[j + 1].label) for j in idx],
                 min_s)


def pin_to_reference(tokens: Sequence[str], ends: Sequence[float], reference: Sequence[Segment],
                     min_s: float) -> np.ndarray:
    """Unit end times moved onto a reference: each exported boundary paired with a reference boundary (as
    ``boundary_samples`` pairs them) goes to the reference's time, the others follow by interpolation."""
    segs = segments(tokens, ends)
    pairs, _ = boundary_pairs(list(reference), segs)
    return _warp(ends, segs, [j for _, j in pairs], [reference[i].end for i, _ in pairs], min_s)


def _warp(ends: Sequence[float], segs: list[Segment], idx: list[int], targets: list[float],
          min_s: float) -> np.ndarray:
    """Move the end of segment ``idx[k]`` to ``targets[k]`` (``idx`` increasing), keeping every non-empty segment at
    least ``min_s`` long, and map every unit end through the piecewise-linear warp so defined."""
    ends = np.asarray(ends, dtype=np.float64)
    if not idx:
        return ends.copy()
    total = float(ends[-1])
    nonempty = np.array([s.end > s.start for s in segs], dtype=np.float64)
    cuts = [0, *[j + 1 for j in idx], len(segs)]          # stretch k = segments cuts[k] .. cuts[k+1]-1
    min_len = [min_s * float(nonempty[a:b].sum()) for a, b in zip(cuts[:-1], cuts[1:])]
    old = np.array([segs[j].end for j in idx])
    new = _keep_apart(np.asarray(targets, dtype=np.float64), min_len, total)
    keep = np.concatenate([[True], np.diff(old) > 0])  # np.interp needs increasing knots (empty segments share one)
    xp = np.concatenate([[0.0], old[keep], [total]])
    fp = np.concatenate([[0.0], new[keep], [total]])
    if not (np.all(np.diff(xp) > 0) and np.all(np.diff(fp) >= 0)):
        return ends.copy()
    return np.interp(ends, xp, fp)


def load_reference(path: str | Path) -> dict[str, list[Segment]]:
    """Reference segments per row from a ``phones.tsv`` (file) or a folder of ``{rel_path}.TextGrid``."""
    from common.textgrid import read_textgrid_folder  # praatio: only when reading TextGrids

    path = Path(path)
    if path.is_dir():
        return read_textgrid_folder(path)
    if not path.is_file():
        raise UserError(f"{path}: reference not found (a phones.tsv file or a folder of TextGrids)")
    return {rel: reference_segments(*v, where=f"{path} ({rel})") for rel, v in read_phones_tsv(path).items()}


def _keep_apart(bounds: np.ndarray, min_len: Sequence[float], total: float) -> np.ndarray:
    """Clamp moved boundaries so that stretch k (ending at ``bounds[k]``, the last one at ``total``) keeps at least
    ``min_len[k]`` and the order is kept."""
    lo = np.cumsum(min_len)[:-1]                       # the least each boundary can be from the start
    hi = total - np.cumsum(min_len[::-1])[::-1][1:]    # ... and from the end
    if np.any(lo > hi + 1e-12):
        return bounds.copy()
    b = np.clip(bounds, lo, hi)
    for k in range(1, len(b)):                          # forward: each segment keeps its minimum
        b[k] = max(b[k], b[k - 1] + min_len[k])
    for k in range(len(b) - 2, -1, -1):                 # backward: room for the segments after it
        b[k] = min(b[k], b[k + 1] - min_len[k + 1])
    return b
