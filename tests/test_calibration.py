"""Boundary calibration (common/calibration.py, align/calibrate.py, export --calibration)."""
from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
import soundfile as sf

from common.boundary_eval import collapse_spans, spans_from_ends
from common.calibration import Calibration, apply, boundary_samples, cross_validate, fit, segments
from common.corpus import read_phones_tsv
from common.durations import matcha_num_frames, read_alignments, read_durations
from common.io import UserError
from tests.utils import ROOT, one_line_error, run

PHONES = list("abcde")


def synthetic(n_utts: int, bias: dict, noise_s: float, seed: int, speaker: str = "s1"):
    """Utterances whose exported boundaries sit ``bias[(left, right)]`` before the true ones, plus noise."""
    rng = np.random.default_rng(seed)
    utts, samples, utt_of = [], [], []
    for u in range(n_utts):
        seq = [str(p) for p in rng.choice(PHONES, 14)]
        seq = [p for k, p in enumerate(seq) if k == 0 or p != seq[k - 1]]
        true = np.cumsum(rng.uniform(0.06, 0.12, len(seq)))
        exp = true.copy()
        for k in range(len(seq) - 1):
            exp[k] = true[k] - bias[(seq[k], seq[k + 1])] + rng.normal(0.0, noise_s)
        s = boundary_samples(speaker, seq, exp, collapse_spans(spans_from_ends(seq, true)))
        utts.append((seq, exp, true))
        samples += s
        utt_of += [u] * len(s)
    return utts, samples, utt_of


@pytest.fixture(scope="module")
def biased():
    rng = np.random.default_rng(1)
    bias = {(a, b): float(rng.uniform(-0.02, 0.02)) for a in PHONES for b in PHONES if a != b}
    return bias, *synthetic(150, bias, 0.002, seed=2)


def test_fit_recovers_per_type_offsets_and_apply_removes_them(biased):
    bias, utts, samples, utt_of = biased
    cal = fit(samples, shrink=1.0)
    worst = max(abs(cal.offset("s1", a, b) - v) for (a, b), v in bias.items())
    assert worst < 0.002, worst
    before = after = 0.0
    for seq, exp, true in utts[:20]:
        new = apply(seq, exp, "s1", cal, 0.001)
        assert new[-1] == exp[-1] and np.all(np.diff(new) > 0)
        before += np.abs(exp - true)[:-1].mean()
        after += np.abs(new - true)[:-1].mean()
    assert after < 0.25 * before, (after, before)
    cv = cross_validate(samples, utt_of, 1.0)
    assert cv["after"]["mean_ms"] < 0.3 * cv["before"]["mean_ms"] and cv["after"]["within_20ms"] == 100.0, cv


def test_shrinkage_and_fallbacks():
    samples = [("s1", "a", "b", 0.010)] * 3 + [("s1", "c", "b", -0.004), ("s2", "a", "b", 0.002)]
    cal = fit(samples, shrink=1.0)
    top = (0.030 - 0.004 + 0.002) / 6.0                     # everything, pulled to 0 by one pseudo-observation
    s1 = (0.026 + top) / 5.0
    s1_b = (0.026 + s1) / 5.0                               # (s1, right b): all four of s1's boundaries
    assert cal.offset("s1", "a", "b") == pytest.approx((0.030 + s1_b) / 4.0)
    assert cal.offset("s1", "x", "b") == pytest.approx(s1_b)          # unseen pair: its right phone's offset
    assert cal.offset("s1", "x", "y") == pytest.approx(s1)            # nothing known: the speaker's
    right_b = (0.028 + top) / 6.0
    assert cal.offset("new", "a", "b") == pytest.approx((0.032 + right_b) / 5.0)  # unknown speaker: pooled
    assert cal.offset("new", "q", "r") == pytest.approx(top)
    raw = fit(samples, shrink=0.0)
    assert raw.offset("s1", "a", "b") == pytest.approx(0.010) and raw.offset("s2", "a", "b") == pytest.approx(0.002)
    with pytest.raises(UserError, match="no labelled boundary"):
        fit([])


def test_apply_keeps_order_minimum_length_and_moves_inner_tokens():
    tokens = ["<sil>", "a", "<blank>", "b", "c", "<sil>"]
    ends = np.array([0.10, 0.20, 0.22, 0.30, 0.40, 0.50])
    cal = fit([("s", "a", "b", -0.5), ("s", "b", "c", 0.5)], shrink=0.0)   # absurd offsets: must be clamped
    new = apply(tokens, ends, "s", cal, 0.01)
    segs = collapse_spans(spans_from_ends(tokens, new))
    assert [s.label for s in segs] == ["pau", "a", "pau", "b", "c", "pau"]
    assert all(s.end - s.start >= 0.01 - 1e-9 for s in segs), segs
    assert new[-1] == 0.5 and np.all(np.diff(new) >= 0)
    cal2 = fit([("s", "a", "pau", 0.01)], shrink=0.0)
    moved = apply(tokens, ends, "s", cal2, 0.001)
    assert moved[1] == pytest.approx(0.21)                  # a|blank moved by +10 ms ...
    assert moved[2] > moved[1] and moved[2] < moved[3]      # ... the blank's end follows within its gap


def test_word_separators_and_stress_marks_are_not_pauses():
    """espeak IPA alignments give ``|`` and stress marks time: it is split between the neighbours, so no pause
    boundary appears there; punctuation and silence stay pauses."""
    tokens = ["<sil>", "ˈ", "a", "|", "ˌ", "b", ",", "c", "<sil>"]
    ends = [0.10, 0.12, 0.20, 0.22, 0.24, 0.30, 0.40, 0.50, 0.60]
    segs = segments(tokens, ends)
    assert [(s.label, round(s.start, 3), round(s.end, 3)) for s in segs] == [
        ("pau", 0.0, 0.11), ("a", 0.11, 0.22), ("b", 0.22, 0.3), ("pau", 0.3, 0.4), ("c", 0.4, 0.5),
        ("pau", 0.5, 0.6)]
    cal = Calibration()
    cal.tables["all"][()] = cal.tables["speaker"][("s",)] = (0.0, 2)
    cal.tables["speaker_pair"][("s", "a", "b")] = (0.01, 1)
    moved = apply(tokens, ends, "s", cal, 0.001)
    assert moved[3] == pytest.approx(0.23)                              # a|b, the middle of "| ˌ", +10 ms
    assert moved[0] == pytest.approx(0.10) and moved[5:] == pytest.approx(ends[5:])   # other boundaries stay
    assert np.all(np.diff(moved) > 0)


def test_save_load_round_trip_and_bad_files(tmp_path, biased):
    cal = fit(biased[2], shrink=2.0, info={"utterances": 150})
    path = tmp_path / "cal.json"
    cal.save(path)
    back = Calibration.load(path)
    assert back.shrink == 2.0 and back.info == {"utterances": 150} and back.boundaries == len(biased[2])
    for a in PHONES:
        assert back.offset("s1", a, "b") == pytest.approx(cal.offset("s1", a, "b"), abs=1e-6)
    with pytest.raises(UserError, match="not found"):
        Calibration.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    for text, needle in (("{", "cannot read"), ('{"format": "x"}', "not a boundary calibration"),
                         (json.dumps({**json.loads(path.read_text()), "version": 9}), "version 9"),
                         (json.dumps({**json.loads(path.read_text()), "offsets_ms": {"all": {}}}), "malformed")):
        bad.write_text(text)
        with pytest.raises(UserError, match=needle):
            Calibration.load(bad)


def test_calibrate_cli_and_calibrated_export(tiny_corpus, aligner_model, tmp_path):
    """Fit on half the rows of a real export, re-export with the calibration: durations stay valid Matcha
    durations, the labelled rows' boundaries get closer to festival's, and the bad-input paths are one-line errors."""
    corpus = tmp_path / "corpus"
    shutil.copytree(tiny_corpus.parent / "corpus", corpus, ignore=shutil.ignore_patterns("durations", "textgrids"))
    export = [sys.executable, ROOT / "align/export_durations.py", "--corpus", corpus, "--model_dir", aligner_model,
              "--no_mels", "--no_progress", "--overwrite"]
    run([*export, "--textgrid"])
    ref = read_phones_tsv(corpus / "phones.tsv")
    lines = (corpus / "phones.tsv").read_text(encoding="utf-8").splitlines()
    labelled = sorted(ref)[::2]
    sub = tmp_path / "labelled.tsv"
    sub.write_text("".join(ln + "\n" for ln in lines if ln.split("\t")[0] in labelled), encoding="utf-8")
    cal = tmp_path / "cal.json"
    calibrate = [sys.executable, ROOT / "align/calibrate.py", "--durations", corpus / "durations", "--out", cal]
    out = run([*calibrate, "--reference", sub]).stdout
    assert f"{len(labelled)} labelled row(s)" in out and "cross-validated" in out, out
    info = json.loads(cal.read_text())["info"]
    assert info["utterances"] == len(labelled) and info["export"]["refined"] is True
    assert len(json.loads(cal.read_text())["offsets_ms"]["speaker"]) == 3    # the corpus' three voices

    def labelled_error(folder):
        rep = tmp_path / "rep.json"
        run([sys.executable, ROOT / "align/evaluate.py", "--reference", sub, "--durations", folder, "--out", rep])
        return json.loads(rep.read_text())["overall"]

    own = tmp_path / "own.json"   # the export's own TextGrids as the "hand-checked" ones: nothing to correct
    run([*calibrate[:-1], own, "--textgrids", corpus / "textgrids"])
    offsets = json.loads(own.read_text())["offsets_ms"]
    assert offsets["speaker_pair"] and max(abs(v[0]) for t in offsets.values() for v in t.values()) < 0.5, offsets
    other = tmp_path / "other.tsv"
    other.write_text("nobody/none\ta b\t0.1 0.2\n", encoding="utf-8")
    one_line_error(run([*calibrate, "--reference", other], check=False), "none of the 1 reference rows")
    sub_records = tmp_path / "sub_durations"
    before = _evaluate_subset(corpus, labelled, sub_records, labelled_error)
    run([*export, "--calibration", cal])
    after = _evaluate_subset(corpus, labelled, sub_records, labelled_error)
    print("labelled rows before / after calibration:", before["mean_ms"], after["mean_ms"])
    assert after["mean_ms"] < 0.9 * before["mean_ms"], (before, after)      # in-sample: the bias is removed
    records = read_alignments(corpus / "durations" / "alignments.jsonl")
    assert set(records) == set(ref)
    for rel, rec in records.items():
        durs = read_durations(corpus / "durations" / f"{rel}.pt")
        assert durs.tolist() == rec["durations"] and min(rec["durations"]) >= 0
        assert sum(rec["durations"]) == matcha_num_frames(sf.info(str(corpus / "wavs" / f"{rel}.wav")).frames, 256)
        assert rec["speaker"] in {"0", "1", "2"}
    rep = json.loads((corpus / "durations" / "export_report.json").read_text())
    assert rep["calibration"]["boundaries"] == info["boundaries"]
    one_line_error(run([*calibrate, "--reference", sub], check=False), "already calibrated")
    one_line_error(run([*export, "--calibration", tmp_path / "nope.json"], check=False), "nope.json", "not found")
    one_line_error(run([*export, "--calibration", cal, "--labelled", sub], check=False), "not both")
    one_line_error(run([*export, "--labelled", other], check=False), "none of its 1 row(s)")

    # one step: the labelled rows train the refiner, then calibrate every row (that refiner is this export's
    # alone: the one stored for the corpus stays)
    stored = (corpus / "durations" / "refiner.ckpt").read_bytes()
    run([*export, "--labelled", sub])
    assert (corpus / "durations" / "refiner.ckpt").read_bytes() == stored
    semi = _evaluate_subset(corpus, labelled, sub_records, labelled_error)
    print("labelled rows with --labelled:", semi["mean_ms"])
    assert semi["mean_ms"] < 0.9 * before["mean_ms"], (before, semi)
    rep = json.loads((corpus / "durations" / "export_report.json").read_text())
    assert rep["calibration"]["labelled_rows"] == len(labelled) and rep["refine"]["fixed_utts"] == len(labelled)
    assert rep["refine"]["refiner"]["file"] is None
    saved = Calibration.load(corpus / "durations" / "calibration.json")
    assert saved.info["utterances"] == len(labelled) and saved.boundaries == rep["calibration"]["boundaries"]
    records = read_alignments(corpus / "durations" / "alignments.jsonl")
    assert set(records) == set(ref) and all(
        sum(r["durations"]) == matcha_num_frames(sf.info(str(corpus / "wavs" / f"{rel}.wav")).frames, 256)
        for rel, r in records.items())


def _evaluate_subset(corpus, rels, folder, evaluate):
    """Score only ``rels``: evaluate.py scores every record of a folder, so copy those records into one."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir()
    records = read_alignments(corpus / "durations" / "alignments.jsonl")
    with open(folder / "alignments.jsonl", "w", encoding="utf-8") as fh:
        for rel in rels:
            fh.write(json.dumps(records[rel]) + "\n")
    return evaluate(folder)
