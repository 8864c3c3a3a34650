"""Phonological features of the units (common/phonology.py) and the tying of rare units they drive."""
from __future__ import annotations

import numpy as np
import pytest

from common.phonology import (CONTEXT_CLASSES, DIM, N_PANPHON, context_class, tie_units, token_features,
                              unit_features)


def test_ipa_arpabet_silence_and_symbols_without_features():
    a, a_long, e = np.array(token_features("a")), np.array(token_features("aː")), np.array(token_features("e"))
    assert a.shape == (DIM,) and a[-1] == 0 and np.abs(a[:N_PANPHON]).sum() > 10
    assert np.abs(a - a_long).sum() < np.abs(a - e).sum()  # a long a is nearer to a than e is
    # festival's / ARPAbet names are read as the IPA they stand for, not as letters
    assert token_features("ch") == token_features("t͡ʃ") and token_features("aa") == token_features("ɑ")
    assert token_features("g") == token_features("ɡ")  # ASCII g is IPA's script g
    # silence: the silence feature only; specials, separators and stress marks: nothing
    assert token_features("pau") == (0.0,) * N_PANPHON + (1.0,) == token_features("<blank>")
    for t in ("<unk>", "|", "ˈ", ","):
        assert token_features(t) == (0.0,) * DIM, t
    # a label of several segments: the mean over the segments that specify each feature
    ts = np.array(token_features("ts"))
    assert np.all(np.abs(ts) <= 1) and np.abs(ts).sum() > 0
    assert unit_features(["pau", "a", "|"]).shape == (3, DIM)


def test_rare_units_join_the_nearest_frequent_unit():
    tokens = ["pau", "a", "e", "t", "aː", "ã", "d", "|", "sil"]
    counts = [500, 200, 150, 120, 5, 3, 4, 2, 1]
    tied = tie_units(tokens, counts, min_count=30)
    assert tied[:4].tolist() == [0, 1, 2, 3]  # frequent units keep their class
    assert tied[4] == 1 and tied[5] == 1  # aː, ã -> a
    assert tied[6] == 3  # d -> t (only voicing differs)
    assert tied[7] == 7  # no features: keeps its own class
    assert tied[8] == 0  # a rare silence label joins the silence class, never a phone
    assert tie_units(tokens, counts, min_count=0).tolist() == list(range(len(tokens)))


@pytest.mark.parametrize("label", ["j͡a", "h̩͡ŋ", "a˥", "ŋ͡m"])
def test_contour_and_tone_labels_get_features(label):
    assert np.abs(np.array(token_features(label))[:N_PANPHON]).sum() > 0


def test_context_classes_of_ipa_arpabet_and_silence():
    got = {t: CONTEXT_CLASSES[context_class(t)] for t in
           ("a", "ɔɪ", "aa", "p", "t͡ʃ", "ch", "s", "ʃ", "m", "ŋ", "l", "j", "pau", "<sil>", "|")}
    assert got == {"a": "vowel", "ɔɪ": "vowel", "aa": "vowel", "p": "stop", "t͡ʃ": "stop", "ch": "stop",
                   "s": "fricative", "ʃ": "fricative", "m": "nasal", "ŋ": "nasal", "l": "approximant",
                   "j": "approximant", "pau": "silence", "<sil>": "silence", "|": "other"}
