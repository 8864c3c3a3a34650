"""Long recordings (audiobook chapters, long studio takes): a row longer than ``long_row_s`` is aligned in pieces,
so memory follows the piece, not the row (the attention, MAS and the refiner's and the HMM's alignments are all
quadratic in a row's length).

1. CTC posteriors of the whole row on overlapping windows (``window_s``, ``context_s`` more audio on each side: the
   encoder is bidirectional, so each window keeps only its centre frames);
2. anchors: the CTC best path's tokens paired with the transcript's by a banded edit-distance alignment; a token that
   matches is anchored at the frames where the best path emits it;
3. cuts: between two consecutive transcript tokens that are both anchored, in the middle of the gap between their
   emissions; once a piece holds half of ``piece_s`` the widest gap before it would pass ``piece_s`` wins (a pause,
   where the cut lands in silence), a word separator or a silence token after the gap breaking ties;
4. each piece (its audio span, its tokens) goes through the export as a row of its own (first pass, refinement),
   and ``join`` puts the pieces' unit end times back together as one alignment of the row, whose Matcha durations
   then sum to the row's mel length like any row's. A cut adds a silence slot on each side of it (``pau`` units).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from common import frames as F
from common.vocab import BLANK_ID, SILENCE_TOKENS, WORD_SEP


@dataclass(frozen=True)
class LongRowConfig:
    long_row_s: float = 20.0  # rows longer than this are aligned in pieces
    piece_s: float = 10.0  # longest piece
    window_s: float = 20.0  # CTC windows over the whole row
    context_s: float = 2.0  # extra audio on each side of a window


@torch.inference_mode()
def windowed_ctc_logp(scorer, wav: torch.Tensor, window_s: float, context_s: float) -> torch.Tensor:
    """CTC log-posteriors [T, V] of a 1-D waveform at ``scorer.sample_rate``, computed window by window (``scorer``:
    the export's model interface, common/export.py)."""
    hop = int(round(scorer.sample_rate * scorer.hop_s))
    n_frames = scorer.num_frames(len(wav))
    win, ctx = max(1, int(round(window_s / scorer.hop_s))), int(round(context_s / scorer.hop_s))
    parts = []
    for a in range(0, n_frames, win):
        b = min(a + win, n_frames)
        lo, hi = max(0, a - ctx), min(n_frames, b + ctx)
        lp, _, _ = scorer.scores(wav[lo * hop: hi * hop][None], torch.ones(1), [[]], False, False)
        parts.append(lp[0, a - lo: a - lo + (b - a)].float().cpu())
    out = torch.cat(parts)
    if out.shape[0] < n_frames:  # a window's own frame count can fall a frame short
        out = torch.cat([out, out[-1:].expand(n_frames - out.shape[0], -1)])
    return out[:n_frames]


def best_path_runs(ctc_logp: torch.Tensor, blank_id: int = BLANK_ID) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The CTC best path's emitted tokens: (ids, first frame, end frame) of each run of one non-blank label."""
    lab = ctc_logp.argmax(-1).numpy()
    new = np.flatnonzero(np.diff(lab, prepend=-1) != 0)
    ends = np.append(new[1:], len(lab))
    keep = lab[new] != blank_id
    return lab[new][keep], new[keep], ends[keep]


def match_tokens(ref: list[int], hyp: np.ndarray, band: int | None = None) -> list[tuple[int, int]]:
    """Pairs (i, j) with ``ref[i] == hyp[j]`` on a minimum edit-distance alignment of the two sequences, searched
    in a band around the diagonal (both follow the audio, so the alignment stays near it)."""
    n, m = len(ref), len(hyp)
    if n == 0 or m == 0:
        return []
    band = band or max(50, int(0.15 * max(n, m)) + abs(n - m))
    big = 1 << 30
    r = np.asarray(ref, dtype=np.int64)
    h = np.asarray(hyp, dtype=np.int64)
    # row i holds columns j in [lo_i, hi_i) around the diagonal j ~ i * m / n
    centre = (np.arange(n + 1) * m / n).astype(np.int64)
    lo = np.clip(centre - band, 0, m)
    hi = np.clip(centre + band + 1, 0, m + 1)
    back = []  # per row: 0 diagonal, 1 up (deletion of ref), 2 left (insertion of hyp), over its column range
    prev = np.full(m + 1, big, dtype=np.int64)
    prev[lo[0]:hi[0]] = np.arange(lo[0], hi[0])
    back.append(np.full(hi[0] - lo[0], 2, dtype=np.int8))
    for i in range(1, n + 1):
        cols = np.arange(lo[i], hi[i])
        diag = np.where(cols > 0, prev[np.maximum(cols - 1, 0)] + (h[np.maximum(cols - 1, 0)] != r[i - 1]), big)
        up = prev[cols] + 1
        best = np.minimum(diag, up)
        arg = np.where(diag <= up, 0, 1).astype(np.int8)
        # insertions (left neighbour + 1): a running minimum over the row
        run = np.minimum.accumulate(best - cols) + cols
        left = run < best
        cur = np.full(m + 1, big, dtype=np.int64)
        cur[cols] = np.minimum(best, run)
        arg[left] = 2
        back.append(arg)
        prev = cur
    pairs, i, j = [], n, m
    if prev[m] >= big:  # the band missed the corner: nothing reliable
        return []
    while i > 0 and j > 0:
        k = j - lo[i]
        if k < 0 or k >= len(back[i]):
            break
        move = back[i][k]
        if move == 0:
            if ref[i - 1] == hyp[j - 1]:
                pairs.append((i - 1, j - 1))
            i, j = i - 1, j - 1
        elif move == 1:
            i -= 1
        else:
            j -= 1
    return pairs[::-1]


def cut_after(tokens: list[str], anchors: dict[int, tuple[int, int]], hop_s: float, piece_s: float,
              duration_s: float) -> list[tuple[int, float]]:
    """(k, t): cut after transcript token ``k`` at ``t`` seconds, pieces at most about ``piece_s`` long."""
    cands = []
    for k in sorted(anchors):
        if k + 1 in anchors and anchors[k + 1][0] >= anchors[k][1]:
            e, s = anchors[k][1], anchors[k + 1][0]
            t = (0.5 * (e + s) - 0.5) * hop_s
            nice = tokens[k + 1] in SILENCE_TOKENS or tokens[k + 1] == WORD_SEP or tokens[k] == WORD_SEP
            cands.append((t, (s - e) * hop_s + (0.01 if nice else 0.0), k))
    cuts, start = [], 0.0
    while duration_s - start > piece_s:
        window = [c for c in cands if start + 0.5 * piece_s <= c[0] <= start + piece_s]
        if not window:  # no anchored gap in reach: the first one after it (a longer piece), or stop
            later = [c for c in cands if c[0] > start + piece_s]
            if not later:
                break
            window = later[:1]
        t, _, k = max(window, key=lambda c: c[1])
        cuts.append((k, t))
        start = t
    return cuts


@dataclass
class Piece:
    """Where a piece of a long row sits: its row, its first token, its start in the row (s)."""
    rel: str
    first_token: int
    start_s: float


def split(items: list, scorer, cfg: LongRowConfig) -> tuple[list, dict[str, list[Piece]]]:
    """Replace each row longer than ``cfg.long_row_s`` by its pieces (``Item``s with an audio ``span``); returns
    (the rows to align, {rel: pieces} for ``join``). A row whose CTC path anchors no cut stays whole."""
    from common.audio import load_audio

    out, plan = [], {}
    for it in items:
        if it.duration_s <= cfg.long_row_s:
            out.append(it)
            continue
        wav = load_audio(it.wav, scorer.sample_rate)[0]
        ids_hyp, starts, ends = best_path_runs(windowed_ctc_logp(scorer, wav, cfg.window_s, cfg.context_s),
                                               scorer.blank_id)
        anchors = {i: (int(starts[j]), int(ends[j])) for i, j in match_tokens(it.ids, ids_hyp)}
        cuts = cut_after(it.tokens, anchors, scorer.hop_s, cfg.piece_s, it.duration_s)
        if not cuts:
            out.append(it)
            continue
        bounds = [(0, 0.0)] + [(k + 1, t) for k, t in cuts] + [(len(it.tokens), it.duration_s)]
        pieces = []
        for (k0, t0), (k1, t1) in zip(bounds, bounds[1:]):
            a, b = int(round(t0 * it.sr)), int(round(t1 * it.sr)) if k1 < len(it.tokens) else it.num_samples
            out.append(dataclasses.replace(it, tokens=it.tokens[k0:k1], ids=it.ids[k0:k1], num_samples=b - a,
                                           span=(a, b), where=f"{it.where} (piece at {t0:.2f}s)"))
            pieces.append(Piece(it.rel, k0, a / it.sr))
        plan[it.rel] = pieces
    return out, plan


def join(item, parts: list, pieces: list[Piece], grid_s: float = 0.001):
    """One ``Alignment`` of the whole row from its pieces' (same order as ``pieces``): units and end times
    concatenated (shifted by each piece's start), on a ``grid_s`` frame grid; per-token confidences concatenated;
    the greedy PER weighted by tokens."""
    units, ends, conf, rconf = [], [], [], []
    for a, p in zip(parts, pieces):
        units += list(a.units)
        ends.append(a.unit_ends() + p.start_s)
        conf.append(a.confidence)
        if a.refine_confidence is not None:
            rc = np.asarray(a.refine_confidence)
            lo = 1 if a.lead else 0
            rconf.append(rc[:lo] if a is parts[0] else rc[:0])
            rconf.append(rc[lo: lo + len(a.item.ids)])
    e = np.maximum.accumulate(np.concatenate(ends))
    e[-1] = item.duration_s
    first, last = parts[0], parts[-1]
    n_tok = sum(len(a.item.ids) for a in parts)
    per = sum(a.greedy_per * len(a.item.ids) for a in parts) / max(n_tok, 1)
    secs = max(sum(a.item.duration_s for a in parts), 1e-9)
    gap = sum(a.ctc_gap * a.item.duration_s for a in parts) / secs
    fit = None if any(a.hmm_fit is None for a in parts) else \
        round(sum(a.hmm_fit * a.item.duration_s for a in parts) / secs, 4)
    frames = F.ends_to_counts(e, int(round(item.duration_s / grid_s)), grid_s)
    return dataclasses.replace(first, item=item, units=units, lead=first.lead, trail=last.trail, frames=frames,
                               hop_s=grid_s, confidence=np.concatenate(conf), greedy_per=per, ctc_gap=round(gap, 4),
                               hmm_fit=fit,
                               refine_confidence=np.concatenate(rconf) if rconf else None)


def rejoin(alignments: list, pieces: dict[str, list[Piece]], rows: dict) -> list:
    """The alignments in row order with each long row's pieces (consecutive, as ``split`` left them) joined."""
    out, k = [], 0
    while k < len(alignments):
        rel = alignments[k].item.rel
        if rel in pieces and alignments[k].item.span is not None:
            n = len(pieces[rel])
            out.append(join(rows[rel], alignments[k: k + n], pieces[rel]))
            k += n
        else:
            out.append(alignments[k])
            k += 1
    return out
