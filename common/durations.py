"""Phoneme durations for Matcha-TTS: aligned tokens (ASR frames) -> Matcha mel-frame counts, and their files.

Frame arithmetic (docs/design.md "Matcha frame arithmetic")
-----------------------------------------------------------
* Matcha's mel (``mel_spectrogram``, ``center=False``, reflect pad ``(n_fft - hop) / 2`` each side) has
  ``T = floor(num_samples / hop)`` frames; frame ``j`` covers samples ``[j*hop, (j+1)*hop)``.
* An alignment gives each token a count of analysis frames (``center=True``, ``common/frames.py``): token ``k``
  ends at ``t_k = (cumsum(token_frames)[k] - 0.5) * asr_frame_s`` seconds, the last one with the audio. Matcha
  boundary ``B_k = clip(round_half_up(t_k * sr / hop), 0, T)``, the last one set to ``T``; durations are
  ``diff([0, B])``. Rounding the *cumulative* times keeps every boundary within half a hop of the aligned one,
  the sum exactly ``T``, and no count negative (zeros appear when ``T`` is smaller than the number of tokens).

Matcha token layout and the blank / non-acoustic rule
-----------------------------------------------------
Tokens are classified as

* *silence*: ``pau sil sp <sil>`` (an explicit pause the aligner inserted). Matcha's symbol table has no silence
  symbol, so silence tokens are dropped from Matcha's text (``keep_silence=True`` keeps them as ordinary tokens).
* *non-acoustic*: the word boundary ``|`` (space), stress marks ``ˈ ˌ`` and punctuation. They stay in Matcha's text.
* *phones*: everything else (including length marks and other modifiers). A phone keeps exactly its own frames.

THE RULE: a maximal run of consecutive silence / non-acoustic tokens is a *gap*. A gap is a *pause* when it can
be one: at either end of the utterance, or containing a silence token, punctuation or a word boundary. A gap that
cannot be a pause (only stress marks, inside a word) gives its frames to the next phone and every one of its
tokens gets 0. A pause's frames are silence: with ``add_blank`` (sequence ``[b0, p1, b1, ..., pN, bN]``, as
Matcha's ``intersperse(seq, 0)``) they all go to one blank and its non-acoustic tokens get 0 -- the pause before
the first phone -> ``b0`` (leading silence), after the last phone -> ``bN`` (trailing silence), between phones ->
the blank right before the next phone; every other blank gets 0. Without blanks a pause's frames go to its last
non-acoustic token (``,`` or ``|`` carries the pause, as Matcha's own MAS would do); a pause without one (only
dropped silence) extends the preceding phone, or the following phone at the start. Every count is an integer
>= 0 (``torch.long``).

Files
-----
* ``.pt`` (a Matcha fork): ``corpus/durations/{rel_path}.pt`` holding a 1-D ``torch.long`` tensor.
* ``.npy`` (upstream Matcha ``TextMelDataset.get_durations``): ``wav.parent.parent / "durations" / f"{stem}.npy"``;
  rows whose wavs share a stem under the same grand-parent collide, which is a ``UserError``.
* ``alignments.jsonl`` beside the duration files, one JSON object per line (see ``ALIGNMENT_KEYS``)::

    {"rel_path": "kal/0001", "tokens": ["<blank>", "h", "<blank>", ...], "durations": [12, 5, 0, ...],
     "add_blank": true, "sample_rate": 22050, "hop_length": 256}

  ``tokens`` is the Matcha sequence (blanks written as ``<blank>``), ``durations`` its Matcha-frame counts (the same
  numbers as the duration file). Writers give every key; readers need the first four. Extra keys are allowed.
  When a ``rel_path`` repeats (a re-run appended), the last line wins.
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from common.frames import frame_ends_seconds
from common.io import UserError, atomic_path, atomic_write, safe_join
from common.vocab import BLANK, SILENCE_TOKENS, WORD_SEP

STRESS_MARKS = frozenset({"ˈ", "ˌ"})
PUNCTUATION = frozenset(';:,.!?¡¿—…"«»“”()[]{}-–')
NON_ACOUSTIC = frozenset({WORD_SEP, " "}) | STRESS_MARKS | PUNCTUATION
ALIGNMENT_KEYS = ("rel_path", "tokens", "durations", "add_blank", "sample_rate", "hop_length")
REQUIRED_KEYS = ALIGNMENT_KEYS[:4]   # a reader may take sample_rate / hop_length from elsewhere (evaluate's CLI)
FORMATS = ("pt", "npy")


def is_silence(token: str) -> bool:
    return token in SILENCE_TOKENS


def is_acoustic(token: str) -> bool:
    """True for phones: tokens that are neither blank, silence nor non-acoustic."""
    return token != BLANK and token not in SILENCE_TOKENS and token not in NON_ACOUSTIC


# ---------------------------------------------------------------- frame arithmetic
def matcha_num_frames(num_samples: int, hop_length: int = 256) -> int:
    """Frames of Matcha's mel for ``num_samples`` samples: ``floor(num_samples / hop)``."""
    if num_samples < 0 or hop_length <= 0:
        raise ValueError(f"num_samples must be >= 0 and hop_length > 0, got {num_samples}, {hop_length}")
    return int(num_samples) // int(hop_length)


def boundaries_to_matcha(ends_s: Sequence[float], num_frames: int, sample_rate: int, hop_length: int) -> torch.Tensor:
    """Token end times (seconds, non-decreasing) -> Matcha-frame durations summing exactly to ``num_frames``."""
    ends = np.asarray(ends_s, dtype=np.float64)
    if ends.ndim != 1 or ends.size == 0:
        raise ValueError("need a non-empty 1-D sequence of end times")
    if num_frames < 0:
        raise ValueError(f"num_frames must be >= 0, got {num_frames}")
    if np.any(np.diff(ends) < -1e-9) or not np.all(np.isfinite(ends)):
        raise ValueError("token end times must be finite and non-decreasing")
    bounds = np.floor(ends * sample_rate / hop_length + 0.5).astype(np.int64)  # round half up, cumulative
    bounds = np.clip(bounds, 0, num_frames)
    bounds = np.maximum.accumulate(bounds)
    bounds[-1] = num_frames
    return torch.from_numpy(np.diff(bounds, prepend=0)).long()


def to_matcha_durations(token_frames: Sequence[int], asr_frame_s: float, num_frames: int, sample_rate: int,
                        hop_length: int = 256, duration_s: float | None = None) -> torch.Tensor:
    """Per-token analysis-frame counts (``center=True`` frames of ``asr_frame_s``) -> per-token Matcha-frame counts
    (``torch.long``, sum == ``num_frames``). ``duration_s``: the audio's length (default: the frames' own)."""
    frames = np.asarray(token_frames)
    if frames.ndim != 1 or frames.size == 0:
        raise ValueError("token_frames must be a non-empty 1-D sequence of counts")
    if not np.issubdtype(frames.dtype, np.integer) or np.any(frames < 0):
        raise ValueError("token_frames must be integer counts >= 0")
    total = float(frames.sum()) * float(asr_frame_s) if duration_s is None else float(duration_s)
    return boundaries_to_matcha(frame_ends_seconds(frames, float(asr_frame_s), total), num_frames, sample_rate,
                                hop_length)


# ---------------------------------------------------------------- Matcha token layout
def intersperse_durations(token_durs: Sequence[int], blank_durs: Sequence[int]) -> torch.Tensor:
    """``[b0, p1, b1, ..., pN, bN]`` (length 2N+1), the layout of Matcha's ``intersperse(seq, 0)``."""
    tok = torch.as_tensor(list(token_durs), dtype=torch.long)
    blk = torch.as_tensor(list(blank_durs), dtype=torch.long)
    if blk.numel() != tok.numel() + 1:
        raise ValueError(f"need N+1 blank durations for N tokens, got {blk.numel()} for {tok.numel()}")
    out = torch.empty(2 * tok.numel() + 1, dtype=torch.long)
    out[0::2], out[1::2] = blk, tok
    return out


def matcha_layout(tokens: Sequence[str], token_frames: Sequence[int], add_blank: bool = True,
                  keep_silence: bool = False) -> tuple[list[str], list[int]]:
    """Aligned tokens + their frame counts -> (Matcha sequence, counts per Matcha token), by the module's rule.

    Counts keep their unit (ASR frames in, ASR frames out) and their total; silence tokens are dropped from the
    sequence unless ``keep_silence``. Blanks are written as ``common.vocab.BLANK``.
    """
    if len(tokens) != len(token_frames):
        raise ValueError(f"{len(tokens)} tokens but {len(token_frames)} frame counts")
    frames = [int(f) for f in token_frames]
    if any(f < 0 for f in frames):
        raise ValueError("frame counts must be >= 0")

    def phone(t: str) -> bool:
        return is_acoustic(t) or (keep_silence and is_silence(t))

    text: list[str] = []          # Matcha's text: every token but dropped silence
    pos: list[int] = []           # index in `text` of each input token, -1 when dropped
    for t in tokens:
        kept = phone(t) or not is_silence(t)
        pos.append(len(text) if kept else -1)
        if kept:
            text.append(t)
    counts = [0] * len(text)
    # pauses: (first, last) input indices of runs of consecutive non-phone tokens
    i, n = 0, len(tokens)
    gaps = []
    while i < n:
        if phone(tokens[i]):
            counts[pos[i]] += frames[i]
            i += 1
            continue
        j = i
        while j < n and not phone(tokens[j]):
            j += 1
        a, b = i, j - 1
        if a > 0 and b < n - 1 and all(tokens[k] in STRESS_MARKS for k in range(a, b + 1)):
            counts[pos[b + 1]] += sum(frames[a:b + 1])      # not a pause: frames go to the next phone
        else:
            gaps.append((a, b))
        i = j
    if not add_blank:
        for a, b in gaps:
            carriers = [pos[k] for k in range(a, b + 1) if pos[k] >= 0 and tokens[k] not in STRESS_MARKS]
            if carriers:
                dst = carriers[-1]
            elif a > 0:
                dst = pos[a - 1]
            elif b + 1 < n:
                dst = pos[b + 1]
            elif any(pos[k] >= 0 for k in range(a, b + 1)):   # no phone at all: the last kept (stress) token
                dst = max(pos[a:b + 1])
            else:
                raise UserError("utterance has only silence tokens: without add_blank nothing in Matcha's text "
                                "can carry its frames")
            counts[dst] += sum(frames[a:b + 1])
        return text, counts
    blanks = [0] * (len(text) + 1)
    for a, b in gaps:
        total = sum(frames[a:b + 1])
        if a == 0:
            blanks[0] += total                  # leading silence -> b0
        elif b == n - 1:
            blanks[-1] += total                 # trailing silence -> bN
        else:
            blanks[pos[b + 1]] += total         # blank right before the next phone
    seq = [BLANK] * (2 * len(text) + 1)
    seq[1::2] = text
    return seq, intersperse_durations(counts, blanks).tolist()


def export_durations(tokens: Sequence[str], token_frames: Sequence[int], *, asr_frame_s: float, num_frames: int,
                     sample_rate: int, hop_length: int = 256, add_blank: bool = True, keep_silence: bool = False,
                     duration_s: float | None = None) -> tuple[list[str], torch.Tensor]:
    """Aligned tokens + their analysis-frame counts -> (Matcha sequence, Matcha-frame durations summing to
    ``num_frames``): the layout rule above, then ``to_matcha_durations``. What the export writes for every row."""
    seq, counts = matcha_layout(tokens, token_frames, add_blank=add_blank, keep_silence=keep_silence)
    return seq, to_matcha_durations(np.asarray(counts, dtype=np.int64), asr_frame_s, num_frames, sample_rate,
                                    hop_length, duration_s)


# ---------------------------------------------------------------- files
def pt_duration_path(corpus_dir: str | os.PathLike, rel_path: str) -> Path:
    """``corpus/durations/{rel_path}.pt`` (refuses ``..`` and absolute rel_paths)."""
    return safe_join(Path(corpus_dir) / "durations", f"{rel_path}.pt", where=rel_path)


def npy_duration_path(wav_path: str | os.PathLike) -> Path:
    """Where upstream Matcha's ``TextMelDataset.get_durations`` looks: ``wav.parent.parent/durations/{stem}.npy``."""
    wav_path = Path(wav_path)
    return wav_path.parent.parent / "durations" / f"{wav_path.stem}.npy"


def npy_duration_paths(rows: Iterable[tuple[str, str | os.PathLike]]) -> dict[str, Path]:
    """``{row_id: npy path}`` for ``(row_id, wav_path)`` rows; a ``UserError`` when two rows share one file."""
    out: dict[str, Path] = {}
    owner: dict[Path, str] = {}
    for row_id, wav in rows:
        path = npy_duration_path(wav)
        key = Path(os.path.abspath(path))
        if key in owner:
            raise UserError(
                f"rows {owner[key]!r} and {row_id!r} would both write {path}: upstream Matcha finds durations by "
                f"file stem only (wav.parent.parent/durations/<stem>.npy); give the wavs unique names, or use the "
                f".pt layout (durations/{{rel_path}}.pt)")
        owner[key] = row_id
        out[row_id] = path
    return out


def write_durations(path: str | os.PathLike, durations, fmt: str = "pt") -> Path:
    """Write a 1-D integer duration vector atomically as ``.pt`` (``torch.long``) or ``.npy`` (int64)."""
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    tensor = torch.as_tensor(durations)
    if tensor.ndim != 1 or tensor.dtype.is_floating_point or tensor.dtype == torch.bool:
        raise ValueError(f"durations must be a 1-D integer vector, got {tuple(tensor.shape)} {tensor.dtype}")
    if bool((tensor < 0).any()):
        raise ValueError("durations must be >= 0")
    tensor = tensor.long().cpu()
    path = Path(path)
    with atomic_path(path) as tmp:
        if fmt == "pt":  # saved through a buffer: torch names the zip's records after the file (here a temp name),
            buf = io.BytesIO()  # which would make two exports of the same durations differ in bytes
            torch.save(tensor, buf)
            tmp.write_bytes(buf.getvalue())
        else:
            with open(tmp, "wb") as fh:          # np.save(str) would append ".npy" to the temp name
                np.save(fh, tensor.numpy())
    return path


def read_durations(path: str | os.PathLike) -> torch.Tensor:
    """Load a ``.pt`` or ``.npy`` duration file as a 1-D ``torch.long`` tensor."""
    path = Path(path)
    try:
        if path.suffix == ".npy":
            data = torch.from_numpy(np.load(path).astype(np.int64))
        else:
            data = torch.as_tensor(torch.load(path, map_location="cpu", weights_only=True)).long()
    except (OSError, ValueError, RuntimeError) as err:
        raise UserError(f"{path}: cannot read durations ({err})") from None
    return data.reshape(-1)


# ---------------------------------------------------------------- alignments.jsonl
def alignment_record(rel_path: str, tokens: Sequence[str], durations, *, add_blank: bool, sample_rate: int,
                     hop_length: int, **extra) -> dict:
    """One ``alignments.jsonl`` object (validated)."""
    rec = {"rel_path": rel_path, "tokens": list(tokens), "durations": [int(d) for d in torch.as_tensor(durations)],
           "add_blank": bool(add_blank), "sample_rate": int(sample_rate), "hop_length": int(hop_length), **extra}
    check_alignment(rec, rel_path)
    return rec


def check_alignment(rec: dict, where: str, keys: Sequence[str] = ALIGNMENT_KEYS) -> None:
    missing = [k for k in keys if k not in rec]
    if missing:
        raise UserError(f"{where}: alignment record lacks {', '.join(missing)}")
    toks, durs = rec["tokens"], rec["durations"]
    if not isinstance(toks, list) or not isinstance(durs, list) or len(toks) != len(durs):
        raise UserError(f"{where}: 'tokens' and 'durations' must be lists of equal length "
                        f"({len(toks) if isinstance(toks, list) else '?'} vs "
                        f"{len(durs) if isinstance(durs, list) else '?'})")
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in durs):
        raise UserError(f"{where}: 'durations' must be integers >= 0")
    if rec["add_blank"] and (len(toks) % 2 != 1 or any(t != BLANK for t in toks[0::2])):
        raise UserError(f"{where}: add_blank is true but tokens are not [{BLANK}, p1, {BLANK}, ..., pN, {BLANK}]")


def append_alignment(path: str | os.PathLike, record: dict) -> None:
    """Append one record as one line (a single write to an O_APPEND file)."""
    check_alignment(record, str(record.get("rel_path", path)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, ensure_ascii=False) + "\n"
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(line)


def write_alignments(path: str | os.PathLike, records: Iterable[dict]) -> int:
    """Write all records atomically (replacing the file); returns the count."""
    n = 0
    with atomic_write(path) as fh:
        for rec in records:
            check_alignment(rec, str(rec.get("rel_path", path)))
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
            n += 1
    return n


def read_alignments(path: str | os.PathLike) -> dict[str, dict]:
    """``{rel_path: record}`` from an ``alignments.jsonl``; the last line wins for a repeated rel_path."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: alignments.jsonl not found; run align/export_durations.py first")
    out: dict[str, dict] = {}
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{n}: not valid JSON ({err.msg})") from None
            if not isinstance(rec, dict):
                raise UserError(f"{path}:{n}: expected a JSON object")
            check_alignment(rec, f"{path}:{n}", REQUIRED_KEYS)
            out[rec["rel_path"]] = rec
    if not out:
        raise UserError(f"{path}: no alignment records")
    return out
