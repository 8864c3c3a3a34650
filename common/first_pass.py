"""From model scores to per-token frame counts and boundary times (one screen of logic).

Scores for monotonic alignment search, per utterance, rows = aligned tokens, columns = encoder frames (10 ms):

- ``ctc``: the CTC log-posterior of each target token at each frame;
- ``attention``: the log of the decoder's location-aware attention (StyleTTS2 style; row ``u`` is the attention
  while predicting token ``u``);
- ``joint``: ``ctc_weight * ctc + (1 - ctc_weight) * attention``.

Edge silence: when a token sequence does not start (end) with a silence token, a ``pau`` (``common.vocab.SIL``)
slot scored by the CTC blank log-posterior is put in front (behind), so leading/trailing silence is not glued to the
first/last phone.
MAS gives each row >= 1 frame.

CTC anchoring: MAS over raw CTC posteriors is fragile, because CTC is peaky: in the many blank-dominated frames
every token is improbable, and a frequent token (or a blank-scored silence slot) can swallow whole stretches.
So each token is first pinned to the frames where CTC emits it, by CTC forced alignment (Viterbi over the CTC
topology, ``torchaudio.functional.forced_align``): no other row may take those frames. MAS then only decides
where, between two consecutive emissions, one token ends and the next begins.

Frame time convention: encoder frame ``t`` is centred at ``t * hop`` (SpeechBrain's Fbank pads the signal,
``center=True``), so the boundary between frames ``t-1`` and ``t`` lies at ``(t - 0.5) * hop`` seconds; the last
boundary is the end of the audio.
"""
from __future__ import annotations

import numpy as np
import torch

from common.vocab import SIL, SILENCE_TOKENS
from common.mas import LOG_FLOOR, mas_frames

SCORE_KINDS = ("ctc", "attention", "joint")
FORBID = -1e4  # a cell no path may use (another token's CTC emission)


def alignment_units(tokens: list[str], edge_silence: bool = True) -> tuple[list[str], bool, bool]:
    """Tokens to align, with ``pau`` slots added at the edges that lack silence; (units, lead, trail)."""
    lead = edge_silence and (not tokens or tokens[0] not in SILENCE_TOKENS)
    trail = edge_silence and (not tokens or tokens[-1] not in SILENCE_TOKENS)
    return ([SIL] if lead else []) + list(tokens) + ([SIL] if trail else []), lead, trail


def score_matrix(ctc_logp: torch.Tensor, attn: torch.Tensor | None, ids: list[int], lead: bool, trail: bool,
                 kind: str, ctc_weight: float, blank_id: int = 0, attn_edges: bool = False) -> torch.Tensor:
    """[U', T] scores of one utterance. ``ctc_logp`` [T, V]; ``attn`` [>=U, T] (rows beyond U ignored), or with
    ``attn_edges`` [U+2, T]: rows for the two edge tokens around the U tokens (StyleTTS2's ``0 ... 0``), which then
    score the edge silence slots too (with the CTC blank in ``joint``)."""
    idx = torch.as_tensor(ids, dtype=torch.long, device=ctc_logp.device)
    rows = []
    if kind in ("ctc", "joint"):
        ctc = ctc_logp[:, idx].t()
    if kind in ("attention", "joint"):
        log_attn = torch.log(attn.float().clamp_min(1e-8))
        att = log_attn[1: len(ids) + 1] if attn_edges else log_attn[: len(ids)]
    if kind == "ctc":
        tok = ctc
    elif kind == "attention":
        tok = att
    elif kind == "joint":
        tok = ctc_weight * ctc + (1.0 - ctc_weight) * att
    else:
        raise ValueError(f"scores must be one of {SCORE_KINDS}, got {kind!r}")
    blank = ctc_logp[:, blank_id][None, :]
    edges = (blank, blank)
    if attn_edges and kind != "ctc":
        first, last = log_attn[0][None, :], log_attn[len(ids) + 1][None, :]
        edges = (first, last) if kind == "attention" else \
            (ctc_weight * blank + (1.0 - ctc_weight) * first, ctc_weight * blank + (1.0 - ctc_weight) * last)
    if lead:
        rows.append(edges[0])
    rows.append(tok)
    if trail:
        rows.append(edges[1])
    return torch.cat(rows, 0).float().clamp_min(LOG_FLOOR)


def ctc_emissions(ctc_logp: torch.Tensor, ids: list[int], blank_id: int = 0) -> list[tuple[int, int] | None] | None:
    """Frames [start, end) where CTC forced alignment emits each token, or None when it cannot align. A token whose
    id is the blank (AuxiliaryASR-trained models: the word space) is not a CTC label: it gets no span (None)."""
    import torchaudio.functional as taf

    labels = [i for i in ids if i != blank_id]
    if not labels:
        return None
    try:
        lp = ctc_logp.detach().float().cpu()[None]
        ali = taf.forced_align(lp, torch.as_tensor([labels], dtype=torch.int32), blank=blank_id)[0][0].numpy()
    except (RuntimeError, ValueError):  # infeasible (too few frames for the repeats)
        return None
    # runs of one non-blank label (torchaudio's merge_tokens, without a Python object per frame)
    new = np.flatnonzero(np.diff(ali, prepend=-1) != 0)
    ends = np.append(new[1:], len(ali))
    keep = ali[new] != blank_id
    if int(keep.sum()) != len(labels):
        return None
    spans = iter(zip(new[keep].tolist(), ends[keep].tolist()))
    return [None if i == blank_id else next(spans) for i in ids]


def anchor(score: torch.Tensor, spans: list[tuple[int, int]], lead: bool) -> torch.Tensor:
    """Forbid every other row at each token's CTC-emission frames."""
    off = 1 if lead else 0
    owner = torch.full((score.shape[1],), -1, dtype=torch.long)  # the row whose emission each frame is, or -1
    for k, span in enumerate(spans):
        if span is not None:
            owner[span[0]:span[1]] = k + off
    owner = owner.to(score.device)
    rows = torch.arange(score.shape[0], device=score.device)[:, None]
    return score.masked_fill((owner[None, :] >= 0) & (rows != owner[None, :]), FORBID)


def align_batch(ctc_logp: torch.Tensor, attn: torch.Tensor | None, tokens: list[list[str]], ids: list[list[int]],
                frame_lens: list[int], kind: str, ctc_weight: float, blank_id: int = 0, anchor_ctc: bool = True,
                edge_silence: bool = True, attn_edges: bool = False, ctc_out: list | None = None
                ) -> tuple[list[tuple[list[str], bool, bool]], list[torch.Tensor], list[np.ndarray]]:
    """The first pass of a batch: per row (units, lead, trail), its [U', T] MAS scores and its frame counts.
    ``ctc_logp`` [B, T, V]; ``attn`` [B, >=U, T] or None (``kind`` ctc). ``ctc_out``: a list that receives each
    row's frame counts from the CTC scores alone, with the same anchoring (with ``kind`` ctc: the frames above)."""
    units, scores, ctc_scores = [], [], []
    for k, (tok, row_ids) in enumerate(zip(tokens, ids)):
        u, lead, trail = alignment_units(tok, edge_silence or attn_edges)
        units.append((u, lead, trail))
        ctc_k = ctc_logp[k, : frame_lens[k]]
        att_k = None if attn is None else attn[k, :, : frame_lens[k]]
        spans = ctc_emissions(ctc_k, row_ids, blank_id) if anchor_ctc else None
        sc = score_matrix(ctc_k, att_k, row_ids, lead, trail, kind, ctc_weight, blank_id, attn_edges)
        scores.append(anchor(sc, spans, lead) if spans else sc)
        if ctc_out is not None and kind != "ctc":
            sc = score_matrix(ctc_k, None, row_ids, lead, trail, "ctc", ctc_weight, blank_id, attn_edges)
            ctc_scores.append(anchor(sc, spans, lead) if spans else sc)
    frames = mas_frames(scores, frame_lens)
    if ctc_out is not None:
        ctc_out.extend(mas_frames(ctc_scores, frame_lens) if ctc_scores else frames)
    return units, scores, frames


class BoundaryDrift:
    """How far the first pass's boundaries moved between two validations: per row (by id), the mean absolute
    change of its token end times, averaged over the rows both validations aligned with the same tokens. The
    training's ``align_shift_ms`` (and its ``stop_align_shift_ms`` rule): the recognizer has stopped moving the
    durations when this is small, whatever its PER still does."""

    def __init__(self):
        self.prev: dict = {}
        self.cur: dict = {}

    def start(self) -> None:
        self.cur = {}

    def add(self, row_id, frames: np.ndarray, hop_s: float) -> None:
        self.cur[row_id] = np.cumsum(np.asarray(frames, dtype=np.float64)) * hop_s

    def finish(self) -> float | None:
        """Mean shift in ms since the previous validation (None at the first one); this validation becomes the
        reference of the next."""
        moves = [np.abs(v - self.prev[k]).mean() for k, v in self.cur.items()
                 if k in self.prev and len(self.prev[k]) == len(v)]
        self.prev, self.cur = self.cur, {}
        return round(1000.0 * float(np.mean(moves)), 3) if moves else None


def token_confidence(ctc_logp: torch.Tensor, ids: list[int], frames: np.ndarray, lead: bool,
                     blank_id: int = 0) -> np.ndarray:
    """Per-token confidence: mean over its frames of p(token | frame, not blank) (1 = certain); a token whose id is
    the blank (AuxiliaryASR's word space): of p(blank | frame)."""
    off = 1 if lead else 0
    frames = np.asarray(frames, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(frames)[:-1]])[off: off + len(ids)]
    n = frames[off: off + len(ids)]
    nb = ctc_logp.detach().float().cpu().clone()
    nb[:, blank_id] = -float("inf")
    lse = torch.logsumexp(nb, -1).numpy()  # [T]: log-normaliser of the non-blank posterior
    # each token's frames, gathered flat: (frame, token) pairs -> p(token | frame, not blank)
    frame_idx = np.repeat(starts, n) + (np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n))
    tok_idx = np.repeat(np.asarray(ids, dtype=np.int64), n)
    p = np.exp(nb.numpy()[frame_idx, tok_idx] - lse[frame_idx])
    is_blank = tok_idx == blank_id
    if is_blank.any():
        p[is_blank] = np.exp(ctc_logp.detach().float().cpu().numpy()[frame_idx[is_blank], blank_id])
    sums = np.bincount(np.repeat(np.arange(len(ids)), n), weights=p, minlength=len(ids))
    return np.where(n > 0, sums / np.maximum(n, 1), 0.0)
