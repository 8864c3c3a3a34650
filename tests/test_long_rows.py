"""Long recordings (common/long_rows.py): the anchoring pieces, and a 5-minute row aligned in pieces about as well as
the sentences it is made of, with bounded memory."""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np
import soundfile as sf

from common.corpus import read_phones_tsv
from common.long_rows import cut_after, match_tokens
from common.metrics import levenshtein
from tests.utils import ROOT, run


def test_match_tokens_pairs_equal_tokens_along_an_optimal_alignment():
    rng = random.Random(0)
    for _ in range(60):
        ref = [rng.randint(1, 12) for _ in range(rng.randint(1, 300))]
        hyp = list(ref)
        for _ in range(rng.randint(0, len(ref) // 4 + 1)):  # a recognizer's errors
            k = rng.randrange(len(hyp) + 1)
            op = rng.random()
            if op < 0.4 and hyp:
                del hyp[min(k, len(hyp) - 1)]
            elif op < 0.7:
                hyp.insert(k, rng.randint(1, 12))
            elif hyp:
                hyp[min(k, len(hyp) - 1)] = rng.randint(1, 12)
        pairs = match_tokens(ref, np.asarray(hyp))
        assert all(ref[i] == hyp[j] for i, j in pairs)
        assert all(i2 > i1 and j2 > j1 for (i1, j1), (i2, j2) in zip(pairs, pairs[1:]))
        # an alignment with this many matches costs at most the edit distance plus the unmatched of the longer one
        assert len(pairs) >= max(len(ref), len(hyp)) - levenshtein(ref, hyp) - 0, (len(pairs), levenshtein(ref, hyp))
    assert match_tokens([1, 2, 3], np.asarray([1, 2, 3])) == [(0, 0), (1, 1), (2, 2)]
    assert match_tokens([], np.asarray([1])) == []


def test_cuts_fall_in_the_widest_anchored_gaps():
    # 100 tokens of 10 frames (10 ms), a 300 ms pause after every 20th; every token anchored at its middle frames
    tokens, anchors, t = [], {}, 0
    for k in range(100):
        tokens.append("pau" if k % 20 == 19 else "a")
        anchors[k] = (t + 3, t + 6)
        t += 40 if k % 20 == 19 else 10
    cuts = cut_after(tokens, anchors, 0.01, 5.0, t * 0.01)
    assert cuts and all(tokens[k + 1] == "pau" or tokens[k] == "pau" for k, _ in cuts), cuts
    edges = [0.0] + [c for _, c in cuts] + [t * 0.01]
    assert all(b - a <= 5.0 + 1e-9 for a, b in zip(edges, edges[1:]))
    assert cut_after(tokens, {}, 0.01, 5.0, t * 0.01) == []  # nothing anchored: no cut


def _long_row(src: Path, out: Path, seconds: float = 300.0) -> Path:
    """One row made of the corpus' utterances end to end (repeated until ``seconds``), with their phone times."""
    ref = read_phones_tsv(src / "phones.tsv")
    rels = sorted(ref)
    (out / "wavs" / "long").mkdir(parents=True)
    wav, phones, ends, t, k, sr = [], [], [], 0.0, 0, None
    while t < seconds:
        rel = rels[k % len(rels)]
        k += 1
        w, sr = sf.read(src / "wavs" / f"{rel}.wav", dtype="float32")
        for p, e in zip(*ref[rel]):
            if phones and p == "pau" and phones[-1] == "pau":
                ends[-1] = t + e
            else:
                phones.append(p)
                ends.append(t + e)
        wav.append(w)
        t += len(w) / sr
    sf.write(out / "wavs" / "long" / "0000.wav", np.concatenate(wav), sr, subtype="PCM_16")
    ends[-1] = sum(len(w) for w in wav) / sr
    (out / "metadata.csv").write_text("long/0000|0|en-us|x\n")
    (out / "phones.tsv").write_text("long/0000\t" + " ".join(phones) + "\t" + " ".join(f"{e:.5f}" for e in ends) + "\n")
    return out


def _mean_error(corpus: Path) -> float:
    rep = corpus / "rep.json"
    run([sys.executable, ROOT / "align/evaluate.py", "--reference", corpus / "phones.tsv", "--durations",
         corpus / "durations", "--out", rep])
    return json.loads(rep.read_text())["overall"]["mean_ms"]


def test_five_minute_row_aligns_in_pieces(tiny_corpus, aligner_model, tmp_path):
    src = tiny_corpus.parent / "corpus"
    long = _long_row(src, tmp_path / "long")
    export = [sys.executable, ROOT / "align/export_durations.py", "--model_dir", aligner_model, "--no_mels",
              "--no_progress", "--device", "cpu"]
    run([*export, "--corpus", long, "--phones_tsv", long / "phones.tsv"], timeout=1500)
    rep = json.loads((long / "durations" / "export_report.json").read_text())
    timing = json.loads((long / "durations" / "export_timing.json").read_text())
    assert rep["counts"]["success"] == 1 and rep["pieces"]["long/0000"] >= 25  # 300 s in pieces of <= 10 s
    rec = json.loads((long / "durations" / "alignments.jsonl").read_text().splitlines()[0])
    assert sum(rec["durations"]) == sf.info(str(long / "wavs/long/0000.wav")).frames // 256
    sentences = tmp_path / "sentences"
    sentences.mkdir()
    for name in ("wavs", "metadata.csv", "phones.tsv"):
        (sentences / name).symlink_to(src / name)
    run([*export, "--corpus", sentences], timeout=900)
    e_long, e_utt = _mean_error(long), _mean_error(sentences)
    print(f"5-minute row {e_long:.2f} ms vs its sentences one by one {e_utt:.2f} ms; peak memory "
          f"{timing['peak_memory_mb']:.0f} MB")
    assert e_long <= 1.5 * e_utt, (e_long, e_utt)
    assert timing["peak_memory_mb"] < 2500  # the whole row at once: attention, MAS and HMM lattices of ~10^8 cells
