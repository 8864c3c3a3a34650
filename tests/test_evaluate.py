"""Boundary scoring (common/boundary_eval.py), TextGrids (common/textgrid.py) and the align/evaluate.py CLI."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from align.evaluate import main
from common.boundary_eval import (SIL, Segment, align_segments, boundary_pairs, collapse_spans, hyp_segments,
                               read_rates, reference_segments)
from common.durations import (BLANK, alignment_record, append_alignment, export_durations, matcha_num_frames,
                              write_durations)
from common.textgrid import read_textgrid, write_alignment_textgrid

SR, HOP = 22050, 256
HALF_HOP_MS = 1000.0 * HOP / SR / 2
ROOT = Path(__file__).resolve().parents[1]

# festival-style reference: rel_path -> (phones, end times in s)
REF = {
    "kal/a01": (["pau", "hh", "ax", "l", "ow", "pau", "w", "er", "l", "d", "pau"],
                [0.21, 0.27, 0.33, 0.41, 0.58, 0.80, 0.87, 1.01, 1.09, 1.16, 1.40]),
    "kal/a02": (["pau", "dh", "ih", "s", "pau"], [0.153, 0.204, 0.301, 0.437, 0.61]),
    "slt/a01": (["pau", "hh", "ax", "l", "ow", "pau"], [0.10, 0.19, 0.25, 0.33, 0.52, 0.73]),
}
RATES = {"kal/a01": 1.0, "kal/a02": 1.3, "slt/a01": 0.8}


def _write_reference(folder: Path, ref=REF, info=True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = [f"{rel}\t{' '.join(p)}\t{' '.join(f'{e:.3f}' for e in ends)}" for rel, (p, ends) in ref.items()]
    (folder / "phones.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    if info:
        (folder / "corpus_info.json").write_text(json.dumps(
            {"utterances": {rel: {"voice": rel.split("/")[0], "rate": r} for rel, r in RATES.items()}}))
    return folder / "phones.tsv"


def _export(out: Path, ref=REF, shift_ms=0, add_blank=True, keep_silence=False, textgrids: Path | None = None):
    """Durations made from the reference itself (1 ms 'ASR frames'), inner boundaries shifted by shift_ms."""
    for rel, (phones, ends) in ref.items():
        ms = np.round(np.asarray(ends) * 1000).astype(int)
        ms[:-1] += shift_ms
        frames = np.diff(ms, prepend=0)
        num_frames = matcha_num_frames(int(round(ends[-1] * SR)), HOP)
        seq, d = export_durations(phones, frames, asr_frame_s=0.001, num_frames=num_frames, sample_rate=SR,
                                  hop_length=HOP, add_blank=add_blank, keep_silence=keep_silence)
        write_durations(out / f"{rel}.pt", d, "pt")
        append_alignment(out / "alignments.jsonl",
                         alignment_record(rel, seq, d, add_blank=add_blank, sample_rate=SR, hop_length=HOP))
        if textgrids is not None:
            write_alignment_textgrid(textgrids / f"{rel}.TextGrid", seq, d.tolist(), SR, HOP)


def _run(args, capsys):
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("add_blank", [True, False])
def test_perfect_durations_score_only_hop_rounding(tmp_path, capsys, add_blank):
    ref = _write_reference(tmp_path / "corpus")
    _export(tmp_path / "dur", add_blank=add_blank, keep_silence=not add_blank)   # no blanks: pau stays a token
    rc, out, err = _run(["--reference", ref, "--durations", tmp_path / "dur", "--out", tmp_path / "r.json",
                         "--plot", tmp_path / "h.png"], capsys)
    assert rc == 0, err
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["one_to_one_utterances"] == 3 and rep["scored_boundaries"] == rep["reference_boundaries"] == 10 + 4 + 5
    assert rep["overall"]["mean_ms"] < HALF_HOP_MS and rep["overall"]["within_10ms"] == 100.0
    assert max(u["max_ms"] for u in rep["worst_utterances"]) <= HALF_HOP_MS + 0.51   # ref times are in whole ms
    assert set(rep["by_voice"]) == {"kal", "slt"} and set(rep["by_rate"]) == {"1", "1.3", "0.8"}
    assert rep["by_edge"]["speech-silence"]["n"] == 2 + 2 + 2 + 2 and rep["by_edge"]["speech-speech"]["n"] == 11
    assert (tmp_path / "h.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "overall" in out and "voice kal" in out and "rate 1.3" in out


def test_shifted_durations_score_the_shift(tmp_path, capsys):
    ref = _write_reference(tmp_path / "corpus", info=False)
    _export(tmp_path / "dur", shift_ms=30)
    rc, out, err = _run(["--reference", ref, "--durations", tmp_path / "dur", "--out", tmp_path / "r.json"], capsys)
    assert rc == 0, err
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["one_to_one_utterances"] == 3
    assert abs(rep["overall"]["mean_ms"] - 30) <= HALF_HOP_MS and abs(rep["mean_signed_ms"] - 30) <= HALF_HOP_MS
    assert rep["overall"]["within_20ms"] == 0.0 and rep["overall"]["within_50ms"] == 100.0
    assert set(rep["by_rate"]) == {"unknown"}


def test_ipa_against_festival_pairs_by_edit_distance():
    ref = reference_segments(*REF["kal/a01"])
    # espeak-like tokens: 'həlˈoʊ wˈɜːld.' with the pause after the comma; 'oʊ' is two tokens, 'ɜː' one segment
    toks = ["h", "ə", "l", "ˈ", "o", "ʊ", ",", "|", "w", "ˈ", "ɜ", "ː", "l", "d", "."]
    ends_ms = [270, 330, 410, 410, 500, 580, 580, 800, 870, 870, 960, 1010, 1090, 1160, 1160]
    frames = np.diff([210] + ends_ms + [1400], prepend=0)      # leading and trailing silence
    seq, d = export_durations(["pau"] + toks + ["pau"], frames, asr_frame_s=0.001,
                              num_frames=matcha_num_frames(int(1.4 * SR)),
                              sample_rate=SR, hop_length=HOP)
    hyp = hyp_segments(seq, d.tolist(), SR, HOP)
    assert [s.label for s in hyp] == ["pau", "h", "ə", "l", "o", "ʊ", "pau", "w", "ɜː", "l", "d", "pau"]
    pairs, one_to_one = boundary_pairs(ref, hyp)
    assert not one_to_one
    errs = [abs(hyp[j].end - ref[i].end) * 1000 for i, j in pairs]
    assert len(pairs) == len(ref) - 1 - 1         # 'ow' vs 'o ʊ': one boundary next to the split goes unscored
    assert max(errs) <= HALF_HOP_MS + 0.5
    labels = {(ref[i].label, hyp[j].label) for i, j in pairs}
    assert ("er", "ɜː") in labels and ("pau", "pau") in labels


def test_alignment_prefers_overlap_and_never_pairs_silence_with_speech():
    ref = [Segment(0, 0.1, "pau"), Segment(0.1, 0.2, "a"), Segment(0.2, 0.3, "b"), Segment(0.3, 0.4, "pau")]
    hyp = [Segment(0, 0.1, "pau"), Segment(0.1, 0.12, "x"), Segment(0.12, 0.2, "y"), Segment(0.2, 0.3, "z"),
           Segment(0.3, 0.4, "pau")]
    al = align_segments(ref, hyp)
    assert (1, 2) in al and (2, 3) in al and (0, 0) in al and (3, 4) in al
    assert all((ref[i].label == SIL) == (hyp[j].label == SIL) for i, j in al)


def test_textgrid_round_trip(tmp_path, capsys):
    ref = _write_reference(tmp_path / "corpus")
    _export(tmp_path / "dur", shift_ms=7, textgrids=tmp_path / "tg")
    tg = read_textgrid(tmp_path / "tg" / "kal" / "a01.TextGrid")
    assert tg[0].start == 0 and abs(tg[-1].end - matcha_num_frames(int(1.4 * SR)) * HOP / SR) < 1e-9
    seq_phones = [s.label for s in collapse_spans(tg)]
    assert seq_phones == [s.label for s in reference_segments(*REF["kal/a01"])]
    rc, _, err = _run(["--reference", ref, "--durations", tmp_path / "dur", "--out", tmp_path / "a.json"], capsys)
    assert rc == 0, err
    rc, _, err = _run(["--reference", ref, "--textgrids", tmp_path / "tg", "--out", tmp_path / "b.json"], capsys)
    assert rc == 0, err
    a, b = (json.loads((tmp_path / f"{x}.json").read_text()) for x in "ab")
    assert a["overall"] == b["overall"] and a["by_voice"] == b["by_voice"]
    assert abs(a["overall"]["mean_ms"] - 7) <= HALF_HOP_MS


def test_textgrid_words_tier(tmp_path):
    toks = ["h", "ə", "|", "w", "ɜ", "."]
    seq, d = export_durations(toks, [5, 5, 2, 5, 5, 3], asr_frame_s=0.01, num_frames=matcha_num_frames(int(.25 * SR)),
                              sample_rate=SR, hop_length=HOP)
    path = write_alignment_textgrid(tmp_path / "x.TextGrid", seq, d.tolist(), SR, HOP)
    words = [s for s in read_textgrid(path, "words") if s.label]
    assert [w.label for w in words] == ["hə", "wɜ"]
    assert words[0].end <= words[1].start


def test_rates_formats(tmp_path):
    p = tmp_path / "corpus_info.json"
    assert read_rates(p) == {}
    p.write_text(json.dumps({"utterances": [{"rel_path": "a/1", "speaking_rate": 1.2}]}))
    assert read_rates(p) == {"a/1": 1.2}
    # data_prep/synth_corpus.py's layout: a top-level 'rates' description plus per-utterance 'rate'
    p.write_text(json.dumps({"rates": {"kind": "choice", "values": [0.85, 1.0], "parameter": "Duration_Stretch"},
                             "utterances": [{"rel_path": "kal/kal_0000", "voice": "kal", "rate": 0.85}]}))
    assert read_rates(p) == {"kal/kal_0000": 0.85}
    p.write_text(json.dumps({"duration_stretch": {"a/1": 0.9}}))
    assert read_rates(p) == {"a/1": 0.9}
    p.write_text(json.dumps({"voices": ["kal"]}))
    assert read_rates(p) == {}


def test_cli_errors(tmp_path, capsys):
    ref = _write_reference(tmp_path / "corpus")
    rc, _, err = _run(["--reference", tmp_path / "nope.tsv", "--durations", tmp_path], capsys)
    assert rc == 2 and "nope.tsv: reference phones.tsv not found" in err
    rc, _, err = _run(["--reference", ref, "--durations", tmp_path / "missing"], capsys)
    assert rc == 2 and "durations folder not found" in err
    (tmp_path / "empty").mkdir()
    rc, _, err = _run(["--reference", ref, "--durations", tmp_path / "empty"], capsys)
    assert rc == 2 and "alignments.jsonl not found" in err
    rc, _, err = _run(["--reference", ref, "--textgrids", tmp_path / "empty"], capsys)
    assert rc == 2 and "no *.TextGrid" in err

    _export(tmp_path / "dur")
    rc, _, err = _run(["--reference", ref, "--durations", tmp_path / "dur", "--sample_rate", "24000"], capsys)
    assert rc == 2 and "sample_rate=22050 but --sample_rate 24000" in err
    # a row the reference does not have
    append_alignment(tmp_path / "dur" / "alignments.jsonl",
                     alignment_record("ked/zz", [BLANK, "a", BLANK], [1, 2, 3], add_blank=True, sample_rate=SR,
                                      hop_length=HOP))
    rc, _, err = _run(["--reference", ref, "--durations", tmp_path / "dur"], capsys)
    assert rc == 2 and "not in the reference" in err and "ked/zz" in err
    # a duration file that disagrees with its record
    _export(tmp_path / "dur2")
    write_durations(tmp_path / "dur2" / "kal" / "a02.pt", [1, 2, 3], "pt")
    rc, _, err = _run(["--reference", ref, "--durations", tmp_path / "dur2"], capsys)
    assert rc == 2 and "a02.pt" in err and "differ" in err
    # a reference row whose phones and times do not match
    bad = tmp_path / "bad" / "phones.tsv"
    bad.parent.mkdir()
    bad.write_text("kal/a01\tpau a b\t0.1 0.2\n", encoding="utf-8")
    rc, _, err = _run(["--reference", bad, "--durations", tmp_path / "dur2"], capsys)
    assert rc == 2 and "phones.tsv:1" in err and "3 phones but 2 end times" in err


def test_cli_runs_as_a_script(tmp_path):
    ref = _write_reference(tmp_path / "corpus")
    proc = subprocess.run([sys.executable, str(ROOT / "align" / "evaluate.py"), "--reference", str(ref),
                           "--durations", str(tmp_path / "none")], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
