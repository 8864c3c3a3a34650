"""Phoneme decoding for the CTC + attention recognizer, on top of SpeechBrain's decoders.

Three decoders (``DECODERS``), all returning model token ids (specials included; ``Vocab.decode`` drops them):

- ``ctc_greedy``: best path (``speechbrain.decoders.ctc_greedy_decode``): per-frame argmax, collapse repeats,
  drop blanks. With an insertion bonus it becomes ``best_path``: the single best CTC path when every emitted token
  (a label that starts after a blank or another label) earns ``insertion_bonus`` -- a small Viterbi over
  "label of the last frame"; with bonus 0 the two are the same.
- ``ctc_beam``: CTC prefix beam search (``speechbrain.decoders.CTCPrefixBeamSearcher``, Hannun et al. 2014),
  ``beam_size`` prefixes; the insertion bonus is added to a prefix's ranking score once per token
  (``PhonemePrefixBeamSearcher``).
- ``attention``: the location-attention decoder's beam search with joint CTC prefix scoring
  (``S2SRNNBeamSearcher`` + ``ScorerBuilder([CTCScorer])``, the TIMIT seq2seq recipe's test searcher):
  score = (1 - ctc_weight) * attention + ctc_weight * CTC prefix score (+ insertion_bonus per token via
  ``LengthScorer``, which replaces length normalization when the bonus is not 0).

Decoding knobs (StyleTTS2 AuxiliaryASR's ``decoding.beam_search``; all neutral by default):

- ``temperature`` T: logits are divided by T before the log-softmax (T > 1 flattens the posteriors). For the
  attention decoder T applies to both its own logits and the CTC scorer's.
- ``blank_penalty`` b: subtracted from the CTC blank log-probability, then renormalized (the same as
  subtracting b from the blank logit after the temperature); b > 0 means fewer blanks -> more (inserted) tokens.
- ``insertion_bonus`` c: added to a hypothesis score once per emitted token; c < 0 gives shorter hypotheses.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from common import model as M
from common.io import UserError
from common.vocab import BLANK_ID, BOS_ID, EOS_ID

DECODERS = ("ctc_greedy", "ctc_beam", "attention")
_PUA = 0xE000  # token id i <-> one private-use character, so a prefix string is exactly its id sequence


# --------------------------------------------------------------------------------------------------------------------
# Knobs on CTC posteriors
# --------------------------------------------------------------------------------------------------------------------
def adjust_log_probs(
    log_probs: torch.Tensor, temperature: float = 1.0, blank_penalty: float = 0.0, blank_id: int = BLANK_ID
) -> torch.Tensor:
    """``log_softmax(log_probs / T)`` with ``blank_penalty`` taken off the blank, renormalized.

    ``log_probs`` may be logits or log-probabilities (``[..., V]``); the result is a normalized log-distribution.
    With T = 1 and b = 0 normalized input comes back unchanged.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    x = log_probs.float() / float(temperature)
    if blank_penalty:
        x = x.clone()
        x[..., blank_id] = x[..., blank_id] - float(blank_penalty)
    return torch.log_softmax(x, dim=-1)


# --------------------------------------------------------------------------------------------------------------------
# CTC greedy / best path
# --------------------------------------------------------------------------------------------------------------------
def best_path(log_probs: torch.Tensor | np.ndarray, insertion_bonus: float = 0.0,
              blank_id: int = BLANK_ID) -> list[int]:
    """Token ids of the best CTC path of one utterance ``[T, V]`` where each emitted token earns ``insertion_bonus``.

    A path is one label per frame; it emits a token at frame t when the label is not blank and differs from the
    label at t-1. Viterbi over the label of the previous frame:
    ``S[t, k] = lp[t, k] + max(S[t-1, k], max_{s != k} S[t-1, s] + c * [k != blank])``.
    """
    lp = (log_probs.detach().cpu().double().numpy() if isinstance(log_probs, torch.Tensor)
          else np.asarray(log_probs, float))
    T, V = lp.shape
    if T == 0:
        return []
    bonus = np.full(V, float(insertion_bonus))
    bonus[blank_id] = 0.0
    score = lp[0] + bonus
    back = np.zeros((T, V), dtype=np.int64)
    cols = np.arange(V)
    for t in range(1, T):
        order = np.argsort(score)
        best, second = order[-1], order[-2] if V > 1 else order[-1]
        other = np.where(cols == best, second, best)  # best previous label other than k
        jump = score[other] + bonus
        stay = score
        use_stay = stay >= jump
        back[t] = np.where(use_stay, cols, other)
        score = lp[t] + np.where(use_stay, stay, jump)
    labels = [int(np.argmax(score))]
    for t in range(T - 1, 0, -1):
        labels.append(int(back[t, labels[-1]]))
    labels.reverse()
    out, prev = [], None
    for lab in labels:
        if lab != blank_id and lab != prev:
            out.append(lab)
        prev = lab
    return out


def ctc_greedy_decode(
    log_probs: torch.Tensor, wav_lens: torch.Tensor, insertion_bonus: float = 0.0, blank_id: int = BLANK_ID
) -> list[list[int]]:
    """Best-path decoding of ``[B, T, V]`` log-probs with relative lengths; SpeechBrain's when the bonus is 0."""
    if not insertion_bonus:
        from speechbrain.decoders import ctc_greedy_decode as sb_greedy

        return [list(map(int, h)) for h in sb_greedy(log_probs, wav_lens, blank_id=blank_id)]
    frames = M.abs_lengths(wav_lens, log_probs.shape[1])
    return [best_path(lp[: int(n)], insertion_bonus, blank_id) for lp, n in zip(log_probs, frames)]


# --------------------------------------------------------------------------------------------------------------------
# CTC prefix beam search
# --------------------------------------------------------------------------------------------------------------------
def _prefix_searcher_base():
    from speechbrain.decoders.ctc import CTCPrefixBeamSearcher

    return CTCPrefixBeamSearcher


class PhonemePrefixBeamSearcher(_prefix_searcher_base()):
    """SpeechBrain's ``CTCPrefixBeamSearcher`` for a phoneme vocabulary, plus a per-token insertion bonus.

    The library keys prefixes by their text (``prefix + token``), which is ambiguous for multi-character phone
    names (``a`` + ``b`` vs ``ab``) and splits words at spaces; so each token id is given one private-use character
    and hypotheses are mapped back to ids. The ranking score (``lm_score``, used for pruning and the final choice)
    is the CTC prefix log-probability plus ``insertion_bonus`` per token, like a word-insertion term of an LM.
    """

    def __init__(self, vocab_size: int, blank_index: int = BLANK_ID, beam_size: int = 8,
                 insertion_bonus: float = 0.0, **kwargs):
        chars = [chr(_PUA + i) for i in range(vocab_size)]
        # No word separator in a phoneme string: naming the blank as the space token keeps the library from
        # looking for one (the blank never reaches its word-splitting branch).
        super().__init__(blank_index=blank_index, vocab_list=chars, space_token=chars[blank_index],
                         beam_size=beam_size, **kwargs)
        self.insertion_bonus = float(insertion_bonus)

    def get_lm_beams(self, beams, cached_lm_scores, cached_partial_token_scores, is_eos=False):
        scored = super().get_lm_beams(beams, cached_lm_scores, cached_partial_token_scores, is_eos)
        if self.insertion_bonus:
            for b in scored:
                b.lm_score += self.insertion_bonus * len(b.text)
        return scored

    def decode_ids(self, log_probs: torch.Tensor, wav_lens: torch.Tensor) -> list[list[int]]:
        """Best hypothesis (token ids) per utterance of ``[B, T, V]`` log-probs with relative ``wav_lens``."""
        frames = M.abs_lengths(wav_lens, log_probs.shape[1]).tolist()
        lp = log_probs.detach().float().cpu().numpy()
        out = []
        for x, n in zip(lp, frames):
            hyps = self.decode_log_probs(x, int(n))
            out.append([ord(c) - _PUA for c in hyps[0].text] if hyps else [])
        return out


# --------------------------------------------------------------------------------------------------------------------
# Attention beam search with CTC prefix scoring
# --------------------------------------------------------------------------------------------------------------------
class AdjustedCTCHead(nn.Module):
    """``ctc_lin`` followed by the temperature / blank-penalty adjustment (normalized log-probs), for ``CTCScorer``
    (which applies its own log-softmax: a no-op on normalized log-probs)."""

    def __init__(self, ctc_lin: nn.Module, temperature: float = 1.0, blank_penalty: float = 0.0,
                 blank_id: int = BLANK_ID):
        super().__init__()
        (self.ctc_lin, self.temperature,
         self.blank_penalty, self.blank_id) = ctc_lin, temperature, blank_penalty, blank_id

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return adjust_log_probs(self.ctc_lin(x), self.temperature, self.blank_penalty, self.blank_id)


def build_attention_searcher(modules, hparams, vocab_size: int, *, beam_size: int, ctc_weight: float,
                             temperature: float = 1.0, blank_penalty: float = 0.0, insertion_bonus: float = 0.0,
                             lm=None, lm_weight: float = 0.0):
    """``S2SRNNBeamSearcher`` over the model's emb/dec/seq_lin, joint with ``CTCScorer`` (weight ``ctc_weight``),
    ``LengthScorer`` (weight ``insertion_bonus``) and a phone n-gram LM (``common.phone_lm``, weight
    ``lm_weight``). The recipe's yaml declares it (``attention_searcher: !name:...`` with the run's
    ``beam_size`` / ``beam_ctc_weight``): the test stage and recipes/decode.py call that one."""
    from speechbrain.decoders.scorer import CTCScorer, LengthScorer
    from speechbrain.decoders.seq2seq import S2SRNNBeamSearcher

    from common.phone_lm import PhoneNgramScorer, PhoneScorerBuilder as ScorerBuilder

    scorers, weights = [], {}
    if ctc_weight > 0:
        head = AdjustedCTCHead(modules["ctc_lin"], temperature, blank_penalty)
        scorers.append(CTCScorer(ctc_fc=head, blank_index=BLANK_ID, eos_index=EOS_ID))
        weights["ctc"] = float(ctc_weight)
    if insertion_bonus:
        scorers.append(LengthScorer(vocab_size=vocab_size))
        weights["length"] = float(insertion_bonus)
    if lm is not None and lm_weight:
        scorers.append(PhoneNgramScorer(lm))
        weights["phonengram"] = float(lm_weight)
    scorer = ScorerBuilder(full_scorers=scorers, weights=weights) if scorers else None
    return S2SRNNBeamSearcher(
        embedding=modules["emb"], decoder=modules["dec"], linear=modules["seq_lin"], temperature=float(temperature),
        bos_index=BOS_ID, eos_index=EOS_ID, beam_size=int(beam_size), scorer=scorer,
        min_decode_ratio=float(_get(hparams, "min_decode_ratio")),
        max_decode_ratio=float(_get(hparams, "max_decode_ratio")),
        length_normalization=not insertion_bonus,
    )


def _get(hparams, key):
    """``hparams[key]`` of a yaml dict or of a Brain's hparams namespace."""
    try:
        return hparams[key]
    except TypeError:
        return getattr(hparams, key)


# --------------------------------------------------------------------------------------------------------------------
# One object for scripts
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class DecodeOptions:
    decoder: str = "ctc_greedy"
    beam_size: int = 8
    ctc_weight: float = 0.4
    temperature: float = 1.0
    blank_penalty: float = 0.0
    insertion_bonus: float = 0.0
    lm_weight: float = 0.0  # phone n-gram LM (attention decoder only); the LM itself: ``lm``
    lm: object = None

    def check(self) -> "DecodeOptions":
        if self.decoder not in DECODERS:
            raise UserError(f"--decoder {self.decoder!r}: choose one of {', '.join(DECODERS)}")
        if not self.temperature > 0:
            raise UserError(f"--temperature must be > 0, got {self.temperature}")
        if int(self.beam_size) < 1:
            raise UserError(f"--beam_size must be >= 1, got {self.beam_size}")
        if not 0.0 <= self.ctc_weight <= 1.0:
            raise UserError(f"--ctc_weight must be in [0, 1], got {self.ctc_weight}")
        if self.lm_weight < 0:
            raise UserError(f"--lm_weight must be >= 0, got {self.lm_weight}")
        if self.lm_weight and self.decoder != "attention":
            raise UserError("--lm_weight needs --decoder attention (the phone LM is a scorer of its beam search)")
        if self.lm_weight and self.lm is None:
            raise UserError("--lm_weight > 0 but no phone LM was built")
        return self

    def describe(self) -> str:
        s = self.decoder
        if self.decoder != "ctc_greedy":
            s += f" beam {self.beam_size}"
        if self.decoder == "attention":
            s += f" ctc_weight {self.ctc_weight:g}"
            if self.lm_weight:
                s += f" phone-LM (order {self.lm.order}) weight {self.lm_weight:g}"
        return s + (f", temperature {self.temperature:g}, blank_penalty {self.blank_penalty:g}, "
                    f"insertion_bonus {self.insertion_bonus:g}")


class PhonemeDecoder:
    """``PhonemeDecoder(modules, hparams, vocab, DecodeOptions(...))(wavs, wav_lens) -> list of token lists``.

    ``modules, hparams, vocab`` come from ``common.model.load_for_inference``; ``wavs`` [B, N] at the model's
    sample rate with relative ``wav_lens`` (``common.model.batch_wavs``).
    """

    def __init__(self, modules, hparams, vocab, opts: DecodeOptions | None = None):
        self.modules, self.hparams, self.vocab = modules, hparams, vocab
        self.opts = (opts or DecodeOptions()).check()
        o = self.opts
        if o.decoder == "ctc_beam":
            sb_log = logging.getLogger("speechbrain.decoders.ctc")
            level = sb_log.level
            sb_log.setLevel(logging.WARNING)  # its "Found space_token" info line says nothing useful here
            try:
                self.searcher = PhonemePrefixBeamSearcher(len(vocab), beam_size=int(o.beam_size),
                                                          insertion_bonus=o.insertion_bonus)
            finally:
                sb_log.setLevel(level)
        elif o.decoder == "attention":
            try:
                build = _get(hparams, "attention_searcher")  # the run's yaml: the test stage's searcher
            except (KeyError, AttributeError):
                raise UserError("the run's hyperparams.yaml has no attention_searcher (trained with an older "
                                "version); retrain, or decode with --decoder ctc_greedy/ctc_beam") from None
            self.searcher = build(modules, hparams, len(vocab), beam_size=o.beam_size, ctc_weight=o.ctc_weight,
                                  temperature=o.temperature, blank_penalty=o.blank_penalty,
                                  insertion_bonus=o.insertion_bonus, lm=o.lm, lm_weight=o.lm_weight)

    @torch.no_grad()
    def decode_ids(self, wavs: torch.Tensor, wav_lens: torch.Tensor) -> list[list[int]]:
        o = self.opts
        feats = M.compute_feats(self.modules, self.hparams, wavs, wav_lens)
        enc = M.encode(self.modules, feats, wav_lens)
        if o.decoder == "attention":
            hyps = self.searcher(enc, wav_lens)[0]
            return [[int(i) for i in h] for h in hyps]
        logp = adjust_log_probs(M.ctc_log_probs(self.modules, self.hparams, enc), o.temperature, o.blank_penalty)
        if o.decoder == "ctc_beam":
            return self.searcher.decode_ids(logp, wav_lens)
        return ctc_greedy_decode(logp, wav_lens, o.insertion_bonus)

    def __call__(self, wavs: torch.Tensor, wav_lens: torch.Tensor) -> list[list[str]]:
        return [self.vocab.decode(h) for h in self.decode_ids(wavs, wav_lens)]


def length_sorted_batches(durations: Sequence[float], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar duration (longest first, so memory peaks early)."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    order = sorted(range(len(durations)), key=lambda i: (-float(durations[i]), i))
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]


__all__ = [
    "DECODERS", "DecodeOptions", "PhonemeDecoder", "adjust_log_probs", "best_path", "ctc_greedy_decode",
    "PhonemePrefixBeamSearcher", "AdjustedCTCHead", "build_attention_searcher", "length_sorted_batches",
]
