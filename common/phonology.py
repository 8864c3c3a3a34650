"""Phonological features of the aligned units, so that phones share acoustic evidence.

A corpus of many languages (or a small one) has hundreds of phone labels with a handful of examples each: a model
with one independent output (or one GMM) per label learns each of them from almost nothing. Phones that share
features (voicing, place, manner, height, ...) sound alike in those respects, so a model that scores a phone
partly through its features learns from every phone that has them.

``unit_features(tokens)`` gives each token a fixed vector:

- the 24 articulatory features of PanPhon (Mortensen et al. 2016, the ``panphon`` package) for an IPA phone, each
  +1 / -1 / 0 (unspecified); a label of several segments (a contour, ``t͡s`` written ``ts``, a tone letter after a
  vowel) gets the mean of its segments' vectors (features a segment leaves unspecified, such as a tone letter's
  segmental ones, do not dilute the others);
- festival's / ARPAbet's English phone names (``aa``, ``ch``, ``dh``, ...) are read through their IPA equivalents;
- one more feature marks silence (``pau`` and the aligner's edge slots, the CTC blank's class);
- a token without features (a word separator, a stress mark, punctuation, an unknown label) gets zeros: its own
  free parameters only.

Used by the boundary refiner's frame classifier (``common.refine.FrameClassifier``: token logits = a free
embedding per token + a projection of its features) and by the HMM-GMM's state tying (``tie_units``).
"""
from __future__ import annotations

import functools
import unicodedata

import numpy as np

from common.vocab import BLANK, SILENCE_TOKENS, SPECIALS

# festival's radio / ARPAbet English phone set (the built-in corpus' --phones_tsv labels) -> IPA
ARPABET_IPA = {
    "aa": "ɑ", "ae": "æ", "ah": "ʌ", "ao": "ɔ", "aw": "aʊ", "ax": "ə", "axr": "ɚ", "ay": "aɪ", "b": "b", "ch": "t͡ʃ",
    "d": "d", "dh": "ð", "dx": "ɾ", "eh": "ɛ", "el": "l̩", "em": "m̩", "en": "n̩", "er": "ɝ", "ey": "eɪ", "f": "f",
    "g": "ɡ", "hh": "h", "ih": "ɪ", "ix": "ɨ", "iy": "i", "jh": "d͡ʒ", "k": "k", "l": "l", "m": "m", "n": "n",
    "ng": "ŋ", "nx": "ɾ̃", "ow": "oʊ", "oy": "ɔɪ", "p": "p", "r": "ɹ", "s": "s", "sh": "ʃ", "t": "t", "th": "θ",
    "uh": "ʊ", "uw": "u", "v": "v", "w": "w", "y": "j", "z": "z", "zh": "ʒ",
}
N_PANPHON = 24
DIM = N_PANPHON + 1  # + silence


@functools.lru_cache(maxsize=1)
def _table():
    import panphon

    return panphon.FeatureTable()


@functools.lru_cache(maxsize=None)
def token_features(token: str) -> tuple[float, ...]:
    """The feature vector (``DIM`` values) of one token."""
    if token in SILENCE_TOKENS or token == BLANK:
        return (0.0,) * N_PANPHON + (1.0,)
    if token in SPECIALS:
        return (0.0,) * DIM
    ipa = ARPABET_IPA.get(token.lower(), token) if token.isascii() and len(token) > 1 else token
    ipa = unicodedata.normalize("NFC", ipa.replace("g", "ɡ"))
    segs = np.asarray(_table().word_to_vector_list(ipa, numeric=True), dtype=np.float64).reshape(-1, N_PANPHON)
    if not len(segs):
        return (0.0,) * DIM
    spec = (segs != 0).sum(0)
    mean = np.where(spec > 0, segs.sum(0) / np.maximum(spec, 1), 0.0)
    return tuple(float(x) for x in mean) + (0.0,)


def unit_features(tokens: list[str]) -> np.ndarray:
    """[len(tokens), DIM] feature matrix of a vocabulary (class id -> token)."""
    return np.asarray([token_features(t) for t in tokens], dtype=np.float32).reshape(len(tokens), DIM)


def tie_units(tokens: list[str], counts, min_count: int) -> np.ndarray:
    """Tie rare units to similar ones: class id -> tied class id. Units seen at least ``min_count`` times keep their
    own class; every rarer unit with features joins the frequent unit nearest in feature space (the same silence
    flag, the fewest differing features, ties to the more frequent one); a rare unit without features, or one with
    no frequent unit to join, keeps its own class."""
    counts = np.asarray(counts, dtype=np.int64)
    feats = unit_features(tokens)
    has = np.abs(feats).sum(1) > 0
    frequent = np.flatnonzero((counts >= min_count) & has)
    out = np.arange(len(tokens))
    for k in np.flatnonzero((counts < min_count) & has):
        cand = frequent[feats[frequent, -1] == feats[k, -1]]
        if not len(cand):
            continue
        dist = np.abs(feats[cand] - feats[k]).sum(1)
        best = cand[np.lexsort((-counts[cand], dist))[0]]
        out[k] = best
    return out


CONTEXT_CLASSES = ("other", "silence", "vowel", "stop", "fricative", "nasal", "approximant")
CONTEXT_SILENCE = CONTEXT_CLASSES.index("silence")


@functools.lru_cache(maxsize=None)
def context_class(token: str) -> int:
    """A coarse manner class of a token (index into ``CONTEXT_CLASSES``), from its features: the context that
    shapes a neighbouring phone's edge (a vowel's end before a stop closure differs from its end before a nasal).
    A token without features (a word separator, an unknown label) is ``other``."""
    f = token_features(token)
    if f[-1] > 0:
        return CONTEXT_SILENCE
    if not any(f):
        return CONTEXT_CLASSES.index("other")
    v = dict(zip(_table().names, f[:N_PANPHON]))
    if v["syl"] > 0:
        name = "vowel"
    elif v["son"] > 0:
        name = "nasal" if v["nas"] > 0 else "approximant"
    else:
        name = "fricative" if v["cont"] > 0 else "stop"
    return CONTEXT_CLASSES.index(name)
