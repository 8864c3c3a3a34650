"""Praat TextGrids of an alignment: a ``phones`` tier and, when word boundaries are known, a ``words`` tier.

Silence is written as unlabelled (blank) intervals, the Praat/MFA convention; zero-length intervals cannot be
represented and are left out. Reading fills the blanks back in as ``""`` segments so the file covers
``[0, duration]`` without holes (``common.boundary_eval.normalize_label`` maps ``""`` to ``pau``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from praatio import textgrid

from common.boundary_eval import Segment, collapse_spans, normalize_label, token_spans
from common.durations import PUNCTUATION, is_acoustic
from common.io import UserError, atomic_path
from common.vocab import SIL, WORD_SEP

PHONES, WORDS = "phones", "words"


def _intervals(segments: Sequence[Segment]) -> list[tuple[float, float, str]]:
    return [(float(s), float(e), lab) for s, e, lab in segments if e > s and normalize_label(lab) != SIL]


def write_textgrid(path: str | os.PathLike, phones: Sequence[Segment], words: Sequence[Segment] | None = None,
                   duration: float | None = None) -> Path:
    """Write ``phones`` (and ``words``) as interval tiers, atomically; ``duration`` defaults to the last end."""
    ends = [s.end for s in phones] + [s.end for s in words or []]
    duration = float(duration if duration is not None else max(ends, default=0.0))
    if duration <= 0:
        raise UserError(f"{path}: an empty alignment cannot be written as a TextGrid")
    tg = textgrid.Textgrid()
    tg.addTier(textgrid.IntervalTier(PHONES, _intervals(phones), 0.0, duration))
    if words is not None:
        tg.addTier(textgrid.IntervalTier(WORDS, _intervals(words), 0.0, duration))
    with atomic_path(path) as tmp:
        tg.save(str(tmp), format="long_textgrid", includeBlankSpaces=True, minTimestamp=0.0, maxTimestamp=duration)
    return Path(path)


def words_from_spans(spans: Sequence[Segment]) -> list[Segment] | None:
    """Word intervals from per-token spans split at ``|`` tokens; None when the tokens have no word boundary.

    A word spans its acoustic tokens (first start to last end); its label joins its tokens without punctuation.
    """
    if not any(s.label in (WORD_SEP, " ") for s in spans):
        return None
    words, cur = [], []

    def flush() -> None:
        ac = [s for s in cur if is_acoustic(s.label)]
        label = "".join(s.label for s in cur if s.label not in PUNCTUATION and normalize_label(s.label) != SIL)
        if ac and label and ac[-1].end > ac[0].start:
            words.append(Segment(ac[0].start, ac[-1].end, label))

    for s in spans:
        if s.label in (WORD_SEP, " "):
            flush()
            cur = []
        else:
            cur.append(s)
    flush()
    return words


def write_alignment_textgrid(path: str | os.PathLike, tokens: Sequence[str], durations: Sequence[int],
                             sample_rate: int, hop_length: int) -> Path:
    """TextGrid of a Matcha sequence + durations (an ``alignments.jsonl`` record's fields)."""
    spans = token_spans(tokens, durations, sample_rate, hop_length)
    phones = [s for s in spans if is_acoustic(s.label)]
    duration = spans[-1].end if spans else 0.0
    return write_textgrid(path, phones, words_from_spans(spans), duration)


def read_textgrid(path: str | os.PathLike, tier: str = PHONES) -> list[Segment]:
    """Intervals of ``tier`` covering ``[0, duration]``; blanks come back as ``""`` segments."""
    path = Path(path)
    try:
        tg = textgrid.openTextgrid(str(path), includeEmptyIntervals=False)
    except (OSError, ValueError, IndexError, KeyError) as err:
        raise UserError(f"{path}: cannot read TextGrid ({err})") from None
    if tier not in tg.tierNames:
        raise UserError(f"{path}: no tier {tier!r} (tiers: {', '.join(tg.tierNames)})")
    entries = sorted(tg.getTier(tier).entries, key=lambda e: e.start)
    out, t = [], float(tg.minTimestamp)
    for e in entries:
        if e.start > t:
            out.append(Segment(t, float(e.start), ""))
        out.append(Segment(float(e.start), float(e.end), e.label))
        t = float(e.end)
    if tg.maxTimestamp > t:
        out.append(Segment(t, float(tg.maxTimestamp), ""))
    return out


def read_textgrid_folder(folder: str | os.PathLike) -> dict[str, list[Segment]]:
    """``{rel_path: scored segments}`` of every ``folder/{rel_path}.TextGrid`` (tier ``phones``; blanks and silence
    -> ``pau``, as ``common.boundary_eval.collapse_spans``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: TextGrid folder not found")
    files = sorted(folder.rglob("*.TextGrid"))
    if not files:
        raise UserError(f"{folder}: no *.TextGrid files")
    return {p.relative_to(folder).with_suffix("").as_posix(): collapse_spans(read_textgrid(p)) for p in files}
