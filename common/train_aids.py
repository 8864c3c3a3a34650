"""AuxiliaryASR's training aids (seed 000) for the phoneme recognizer, each switched in ``hparams/phoneme.yaml``.

Input aids (training batches only, never in validation, test or the export):

- ``mixup``: with probability ``mixup_prob`` a batch's features become ``lam * x + (1 - lam) * x[perm]``
  (``lam ~ Beta(mixup_alpha, mixup_alpha)``, ``perm`` a permutation of the batch, lengths the longer of each pair);
  the CTC and decoder losses are mixed the same way over both rows' transcripts (the decoder is teacher-forced with
  the first row's, which ``lam >= 0.5`` makes the dominant one).
- ``phoneme_dropout``: each decoder-input token (not ``<bos>``) becomes ``<unk>`` with this probability, so the
  decoder leans on the audio rather than on the previous phone (teacher forcing's shortcut).
- ``frame_dropout``: each feature frame is zeroed (the normalized features' mean) with this probability.
- ``vtlp``: vocal-tract-length perturbation: each utterance's mel axis is stretched by a factor drawn from
  ``[vtlp_low, vtlp_high]`` (linear interpolation of the log-mel bins, before normalization).
- ``adaptive_masking``: SpecAugment masks sized by each utterance: ``num_time_masks`` time masks of up to
  ``min(time_mask_param, max_time_mask_ratio * T_i)`` frames and ``num_freq_masks`` frequency masks of up to
  ``min(freq_mask_param, max_freq_mask_ratio * F)`` bins, with probability ``adaptive_mask_prob`` per batch.

Loss aids (training loss only; the model's posteriors are unchanged, so the export reads them as before):

- ``ctc_blank_bias`` / ``ctc_temperature``: the CTC loss sees ``log_softmax((logp - bias * [blank]) / temperature)``.
- blank-rate hinge (``blank_rate``): ``w * relu(mean blank posterior - target - tolerance)`` over the real frames,
  ``w`` ramped linearly from ``blank_rate_weight`` to ``blank_rate_weight_final`` over ``blank_rate_warmup_steps``.
- coverage (``coverage``): the non-blank posterior mass of a row, ``m = sum_t (1 - p_blank(t))``, should cover its
  ``U`` tokens: ``weight * [relu(U - m - margin) / U + locked_weight * soft(relu(m - U - locked_margin)) / U]``
  (under-coverage; overshoot once covered, softened by ``locked_softness``) + ``tv_weight * mean_t sum_k
  |p_k(t+1) - p_k(t)|`` over the non-blank symbols (smoothness).
- CTC entropy (``ctc_entropy_weight``): minus the mean per-frame entropy of the CTC posteriors (the loss rewards
  flatter posteriors, keeping non-blank symbols alive).
- attention duration (``attn_duration``): a token's attention duration is the effective width of its attention
  row, ``exp(entropy)`` frames; ``weight * mean_u relu(min_frames - tolerance - dur_u)`` keeps tokens from
  collapsing to 1-frame spikes.
- ``ctc_aids_warmup_epochs`` / ``attn_duration_warmup_epochs``: the loss aids start after that many epochs.

Checkpoint selection (``joint_score``): AuxiliaryASR's ``best_joint``, a score that blends the valid PER with the
attention's diagonality and the CTC length gap, lower is better.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from common.model import abs_lengths, diagonal_offsets
from common.vocab import BLANK_ID, UNK_ID

LOSS_AIDS = ("blank_rate", "coverage", "entropy", "attn_duration")  # the names loss_aids() gives its terms


# --------------------------------------------------------------------------------------------------------------------
# input aids
# --------------------------------------------------------------------------------------------------------------------
def input_aids(hp, feats: torch.Tensor, wav_lens: torch.Tensor, tokens_bos: torch.Tensor):
    """A training batch's feature and decoder-input aids, each as switched in ``hp`` (``hparams/phoneme.yaml``):
    SpeechBrain's SpecAugment (``hp.fea_augment``, only with ``spec_augment``), then ``adaptive_masking``,
    ``frame_dropout``, ``mixup`` and ``phoneme_dropout``. Returns (feats, wav_lens, tokens_bos, mixup: None or
    (perm, lam) for the losses)."""
    mixup = None
    if hp.spec_augment:
        feats, _ = hp.fea_augment(feats, wav_lens)
    if hp.adaptive_masking and float(torch.rand(())) < float(hp.adaptive_mask_prob):
        feats = adaptive_masks(feats, wav_lens, hp)
    if float(hp.frame_dropout) > 0:
        feats = frame_dropout(feats, float(hp.frame_dropout))
    if hp.mixup:
        mixup = draw_mixup(feats.shape[0], float(hp.mixup_alpha), float(hp.mixup_prob))
        if mixup is not None:
            feats, wav_lens = mix(feats, wav_lens, *mixup)
    if float(hp.phoneme_dropout) > 0:
        tokens_bos = phoneme_dropout(tokens_bos, float(hp.phoneme_dropout))
    return feats, wav_lens, tokens_bos, mixup


def vtlp(feats: torch.Tensor, low: float, high: float, generator=None) -> torch.Tensor:
    """Stretch each row's mel axis by a factor in [low, high]: bin ``f`` reads the input at ``f * alpha`` (linear
    interpolation, clamped at the top bin). ``feats`` [B, T, F] log-mel."""
    B, _, nF = feats.shape
    alpha = torch.empty(B, device=feats.device).uniform_(low, high, generator=generator)
    src = (torch.arange(nF, device=feats.device, dtype=feats.dtype)[None, :] * alpha[:, None]).clamp(max=nF - 1)
    lo = src.floor().long()
    hi = (lo + 1).clamp(max=nF - 1)
    w = (src - lo.to(src.dtype))[:, None, :]
    g_lo = feats.gather(2, lo[:, None, :].expand(-1, feats.shape[1], -1))
    g_hi = feats.gather(2, hi[:, None, :].expand(-1, feats.shape[1], -1))
    return g_lo * (1 - w) + g_hi * w


def frame_dropout(feats: torch.Tensor, prob: float) -> torch.Tensor:
    """Zero each frame with probability ``prob`` (``feats`` are normalized: zero is the mean)."""
    keep = (torch.rand(feats.shape[:2], device=feats.device) >= prob).to(feats.dtype)
    return feats * keep[:, :, None]


def adaptive_masks(feats: torch.Tensor, rel_lens: torch.Tensor, hp) -> torch.Tensor:
    """SpecAugment time and frequency masks whose widths follow each row's length (see the module docstring)."""
    B, T, nF = feats.shape
    frames = abs_lengths(rel_lens, T).tolist()
    keep = torch.ones(B, T, nF, device=feats.device, dtype=feats.dtype)
    fmax = int(min(float(hp.freq_mask_param), float(hp.max_freq_mask_ratio) * nF))
    for b in range(B):
        tmax = int(min(float(hp.time_mask_param), float(hp.max_time_mask_ratio) * frames[b]))
        for _ in range(int(hp.num_time_masks)):
            w = int(torch.randint(0, tmax + 1, ()).item()) if tmax > 0 else 0
            if w > 0:
                t0 = int(torch.randint(0, max(frames[b] - w, 0) + 1, ()).item())
                keep[b, t0 : t0 + w, :] = 0
        for _ in range(int(hp.num_freq_masks)):
            w = int(torch.randint(0, fmax + 1, ()).item()) if fmax > 0 else 0
            if w > 0:
                f0 = int(torch.randint(0, nF - w + 1, ()).item())
                keep[b, :, f0 : f0 + w] = 0
    return feats * keep


def phoneme_dropout(tokens_bos: torch.Tensor, prob: float) -> torch.Tensor:
    """Decoder input with each token after ``<bos>`` replaced by ``<unk>`` with probability ``prob`` (padding too;
    it is masked out of the loss anyway)."""
    drop = torch.rand(tokens_bos.shape, device=tokens_bos.device) < prob
    drop[:, 0] = False
    return torch.where(drop, torch.full_like(tokens_bos, UNK_ID), tokens_bos)


def draw_mixup(batch_size: int, alpha: float, prob: float):
    """``(perm, lam)`` for this batch, or None (no mixup: probability ``1 - prob``, or a single row)."""
    if batch_size < 2 or prob <= 0 or float(torch.rand(())) >= prob:
        return None
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    perm = torch.randperm(batch_size)
    if bool((perm == torch.arange(batch_size)).all()):
        perm = torch.roll(perm, 1)
    return perm, max(lam, 1.0 - lam)  # the first row dominates: the decoder is taught its transcript


def mix(feats: torch.Tensor, rel_lens: torch.Tensor, perm: torch.Tensor, lam: float):
    """Mixed features and the pair's longer relative lengths."""
    perm = perm.to(feats.device)
    return lam * feats + (1.0 - lam) * feats[perm], torch.maximum(rel_lens, rel_lens[perm])


# --------------------------------------------------------------------------------------------------------------------
# loss aids
# --------------------------------------------------------------------------------------------------------------------
def loss_logp(logp: torch.Tensor, blank_bias: float, temperature: float, blank: int = BLANK_ID) -> torch.Tensor:
    """The CTC loss' view of the posteriors: blank logit lowered by ``blank_bias``, divided by ``temperature``
    (``logp`` are log-softmax outputs, which differ from the logits by a per-frame constant only)."""
    if blank_bias == 0 and temperature == 1:
        return logp
    z = logp.clone() if blank_bias else logp
    if blank_bias:
        z[..., blank] = z[..., blank] - blank_bias
    return F.log_softmax(z / temperature, dim=-1)


def _frame_mask(T: int, frames: torch.Tensor, dtype) -> torch.Tensor:
    return (torch.arange(T, device=frames.device)[None, :] < frames[:, None]).to(dtype)


def blank_rate_hinge(logp: torch.Tensor, frames: torch.Tensor, target: float, tolerance: float,
                     blank: int = BLANK_ID) -> torch.Tensor:
    """``relu(mean blank posterior - target - tolerance)`` per row (real frames), averaged over the batch."""
    mask = _frame_mask(logp.shape[1], frames, logp.dtype)
    rate = (logp[..., blank].exp() * mask).sum(1) / frames.to(logp.dtype)
    return F.relu(rate - target - tolerance).mean()


def coverage_loss(logp: torch.Tensor, frames: torch.Tensor, n_tokens: torch.Tensor, weight: float, margin: float,
                  tv_weight: float, locked_weight: float, locked_margin: float, locked_softness: float,
                  blank: int = BLANK_ID) -> torch.Tensor:
    """Non-blank mass against the transcript length (see the module docstring), averaged over the batch:
    ``weight * mean_b(under + locked_weight * over) + tv_weight * TV``."""
    p = logp.exp()
    mask = _frame_mask(logp.shape[1], frames, logp.dtype)
    mass = ((1.0 - p[..., blank]) * mask).sum(1)
    U = n_tokens.to(logp.dtype).clamp(min=1)
    under = F.relu(U - mass - margin) / U
    over = F.relu(mass - U - locked_margin)
    s = float(locked_softness)
    if s > 0:  # smooth near zero, linear beyond
        over = F.relu(s * F.softplus(over / s) - s * math.log(2.0))
    nonblank = torch.cat([p[..., :blank], p[..., blank + 1:]], dim=-1)
    pairs = mask[:, 1:]
    diff = (nonblank[:, 1:] - nonblank[:, :-1]).abs().sum(-1) * pairs
    tv = diff.sum(1) / pairs.sum(1).clamp(min=1)
    return weight * (under + locked_weight * over / U).mean() + tv_weight * tv.mean()


def ctc_entropy(logp: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
    """Mean per-frame entropy of the CTC posteriors over the real frames (nats)."""
    mask = _frame_mask(logp.shape[1], frames, logp.dtype)
    ent = -(logp.exp() * logp).sum(-1)
    return (ent * mask).sum() / mask.sum().clamp(min=1)


def attention_duration_loss(attn: torch.Tensor, token_lens: torch.Tensor, frame_lens: torch.Tensor,
                            min_frames: float, tolerance: float) -> torch.Tensor:
    """``mean_u relu(min_frames - tolerance - dur_u)`` over the real decoder steps of the batch, ``dur_u`` the
    effective width of step ``u``'s attention over the real frames (10 ms), ``exp(entropy)``: 1 for a one-frame
    spike, k for mass spread evenly over k frames. (AuxiliaryASR sums each attention row over the frames, which is 1
    for any softmax row: a constant without gradient.) ``attn`` [B, U, T]; absolute lengths."""
    B, U, T = attn.shape
    fmask = _frame_mask(T, frame_lens, torch.float32)
    a = attn.float() * fmask[:, None, :]
    a = a / a.sum(-1, keepdim=True).clamp(min=1e-9)
    dur = torch.exp(-(a * a.clamp(min=1e-9).log()).sum(-1))  # [B, U]
    umask = _frame_mask(U, token_lens, attn.dtype)
    pen = F.relu(min_frames - tolerance - dur)
    return (pen * umask).sum() / umask.sum().clamp(min=1)


def ramp(start: float, end: float, step: int, steps: int) -> float:
    """Linear ramp from ``start`` to ``end`` over ``steps`` optimizer steps (``end`` after them)."""
    if steps <= 0:
        return end
    return start + (end - start) * min(max(step, 0) / steps, 1.0)


def loss_aids(hp, logp: torch.Tensor, frames: torch.Tensor, n_tokens: torch.Tensor, attn, attn_tokens,
              epoch: int, step: int) -> dict:
    """The switched-on loss aids for one training batch, weighted: ``{name: loss}`` (empty when none is on).

    ``logp`` [B, T, V] CTC log-posteriors, ``frames`` / ``n_tokens`` absolute lengths; ``attn`` [B, U+1, T] or None
    (a batch without the decoder), ``attn_tokens`` its absolute decoder steps."""
    out = {}
    ctc_on = epoch > int(hp.ctc_aids_warmup_epochs)
    if ctc_on and hp.blank_rate:
        w = ramp(float(hp.blank_rate_weight), float(hp.blank_rate_weight_final), step, int(hp.blank_rate_warmup_steps))
        out["blank_rate"] = w * blank_rate_hinge(logp, frames, float(hp.blank_rate_target),
                                                 float(hp.blank_rate_tolerance))
    if ctc_on and hp.coverage:
        out["coverage"] = coverage_loss(
            logp, frames, n_tokens, float(hp.coverage_weight), float(hp.coverage_margin), float(hp.coverage_tv_weight),
            float(hp.coverage_locked_weight), float(hp.coverage_locked_margin), float(hp.coverage_locked_softness))
    if ctc_on and float(hp.ctc_entropy_weight) > 0:
        out["entropy"] = -float(hp.ctc_entropy_weight) * ctc_entropy(logp, frames)
    if attn is not None and hp.attn_duration and epoch > int(hp.attn_duration_warmup_epochs):
        out["attn_duration"] = float(hp.attn_duration_weight) * attention_duration_loss(
            attn, attn_tokens, frames, float(hp.attn_min_frames), float(hp.attn_duration_tolerance))
    return out


# --------------------------------------------------------------------------------------------------------------------
# checkpoint selection (AuxiliaryASR's best_joint)
# --------------------------------------------------------------------------------------------------------------------
def diagonality(attn: torch.Tensor, token_lens: torch.Tensor, frame_lens: torch.Tensor, band: float = 0.1) -> list:
    """Per row: the share of the attention mass within ``band`` (fraction of the row's length) of the diagonal
    ``t/T = u/U``, over its real decoder steps and frames (1 = perfectly diagonal)."""
    offset, valid = diagonal_offsets(attn, token_lens, frame_lens)
    a = attn.float() * valid
    return ((a * (offset.abs() <= band)).sum((1, 2)) / a.sum((1, 2)).clamp(min=1e-9)).tolist()


def length_gap(hyp_lens, ref_lens) -> list:
    """Per row: ``len(CTC greedy hypothesis) - len(transcript)`` in tokens (negative: tokens dropped)."""
    return [int(h) - int(r) for h, r in zip(hyp_lens, ref_lens)]


def joint_score(per: float, diag: float | None, gap: float | None, lambda_diag: float, lambda_length: float,
                target_length_diff: float) -> float:
    """AuxiliaryASR's ``best_joint`` score, lower is better (a missing term counts 0):
    ``PER/100 + lambda_diag * (1 - diagonality) + lambda_length * relu(|mean length gap| - target)``."""
    score = per / 100.0
    if diag is not None and not math.isnan(diag):
        score += lambda_diag * (1.0 - diag)
    if gap is not None and not math.isnan(gap):
        score += lambda_length * max(abs(gap) - target_length_diff, 0.0)
    return score
