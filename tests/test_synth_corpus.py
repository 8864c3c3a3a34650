"""Built-in festival corpus: layout, exact phone timings, determinism, espeak rows, and clear errors."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf

from common.io import UserError
from data_prep.synth_corpus import SENTENCE_DIR, parse_rates, read_sentences, synthesize_corpus

REPO = Path(__file__).resolve().parents[1]
needs_festival = pytest.mark.skipif(shutil.which("festival") is None, reason="festival not installed")
needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")

KW = dict(num_utts=6, voices="kal,ked,slt", seed=7, sample_rate=22050, rates=(0.85, 1.0, 1.2),
          espeak_langs=("fr-fr", "de"), espeak_utts=2, progress=False)


def read_phones(out: Path) -> dict[str, tuple[list[str], list[float]]]:
    rows = {}
    for line in (out / "phones.tsv").read_text().splitlines():
        rel, phones, ends = line.split("\t")
        rows[rel] = (phones.split(), [float(t) for t in ends.split()])
    return rows


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    if shutil.which("festival") is None or shutil.which("espeak-ng") is None:
        pytest.skip("festival / espeak-ng not installed")
    out = tmp_path_factory.mktemp("synth") / "corpus"
    info = synthesize_corpus(out, **KW)
    return out, info


def test_layout_and_metadata(corpus):
    out, info = corpus
    rows = [line.split("|") for line in (out / "metadata.csv").read_text().splitlines()]
    assert len(rows) == 8 and all(len(r) == 4 for r in rows)
    fest = [r for r in rows if r[2] == "en-us"]
    assert len(fest) == 6
    assert {r[0].split("/")[0] for r in fest} == {"kal", "ked", "slt"}
    spk = {r[0].split("/")[0]: int(r[1]) for r in rows}
    assert spk["kal"] == 0 and spk["ked"] == 1 and spk["slt"] == 2
    assert len(set(spk.values())) == len(spk)
    stems = [r[0].split("/")[1] for r in rows]
    assert len(set(stems)) == len(stems)  # unique stems: upstream Matcha keys durations by stem
    for rel, _, _, text in rows:
        assert not rel.endswith(".wav") and text.strip()
        assert (out / "wavs" / f"{rel}.wav").is_file()
    assert info["counts"] == {"festival": 6, "espeak": 2, "total": 8, "phones_tsv_lines": 6}
    saved = json.loads((out / "corpus_info.json").read_text())
    assert saved["seed"] == 7 and saved["sample_rate"] == 22050
    assert all(u["rate"] in (0.85, 1.0, 1.2) for u in saved["utterances"])


def test_audio_format(corpus):
    out, _ = corpus
    for wav in (out / "wavs").rglob("*.wav"):
        meta = sf.info(str(wav))
        assert (meta.samplerate, meta.channels, meta.subtype) == (22050, 1, "PCM_16"), wav


def test_phones_match_audio(corpus):
    out, _ = corpus
    phones = read_phones(out)
    fest = [line.split("|")[0] for line in (out / "metadata.csv").read_text().splitlines() if "|en-us|" in line]
    assert sorted(phones) == sorted(fest)
    for rel, (ph, ends) in phones.items():
        assert len(ph) == len(ends) >= 3
        assert ph[0] == "pau" and ph[-1] == "pau"
        assert all(b > a for a, b in zip([0.0] + ends, ends)), rel
        meta = sf.info(str(out / "wavs" / f"{rel}.wav"))
        assert abs(ends[-1] - meta.frames / meta.samplerate) < 0.02, rel


def test_espeak_rows(corpus):
    out, _ = corpus
    rows = [line.split("|") for line in (out / "metadata.csv").read_text().splitlines()]
    esp = [r for r in rows if r[2] != "en-us"]
    assert sorted(r[2] for r in esp) == ["de", "fr-fr"]
    assert all(r[0].startswith(f"espeak-{r[2]}/") for r in esp)
    phones = read_phones(out)
    assert not any(r[0] in phones for r in esp)


def test_deterministic(corpus, tmp_path):
    out, _ = corpus
    again = tmp_path / "again"
    synthesize_corpus(again, **KW)
    for name in ("metadata.csv", "phones.tsv"):
        assert (again / name).read_text() == (out / name).read_text()
    for wav in (out / "wavs").rglob("*.wav"):
        assert (again / wav.relative_to(out)).read_bytes() == wav.read_bytes()


def test_refuses_non_empty_out(corpus):
    out, _ = corpus
    with pytest.raises(UserError, match="not empty"):
        synthesize_corpus(out, **KW)


@needs_festival
def test_overwrite_replaces_corpus(tmp_path):
    out = tmp_path / "c"
    synthesize_corpus(out, num_utts=3, voices="kal", progress=False)
    (out / "wavs" / "stale").mkdir()
    info = synthesize_corpus(out, num_utts=2, voices="kal", overwrite=True, progress=False)
    assert info["counts"]["total"] == 2 and not (out / "wavs" / "stale").exists()
    assert len((out / "metadata.csv").read_text().splitlines()) == 2


def test_cli_missing_sentences_file(tmp_path):
    res = subprocess.run([sys.executable, "data_prep/synth_corpus.py", str(tmp_path / "out"),
                          "--sentences", str(tmp_path / "nope.txt")], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.startswith("error: ") and "nope.txt" in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_bad_inputs(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# only a comment\n")
    with pytest.raises(UserError, match="no sentences"):
        read_sentences(empty)
    bad = tmp_path / "bad.txt"
    bad.write_text("fine line\nna\u00efve caf\u00e9\n")
    with pytest.raises(UserError, match=r"bad.txt:2"):
        read_sentences(bad)
    with pytest.raises(UserError, match="rates"):
        parse_rates("fast")
    with pytest.raises(UserError, match="0.3..3.0"):
        parse_rates("0.1,1.0")
    assert parse_rates("0.8:1.2") == ("uniform", (0.8, 1.2))
    with pytest.raises(UserError, match="unknown voice"):
        synthesize_corpus(tmp_path / "o", voices="bob", progress=False)
    with pytest.raises(UserError, match="num_utts"):
        synthesize_corpus(tmp_path / "o", num_utts=0, progress=False)


@needs_festival
def test_missing_voice_names_package(tmp_path):
    with pytest.raises(UserError, match="not installed"):
        synthesize_corpus(tmp_path / "o", voices="x=voice_not_a_real_voice", progress=False)


def test_shipped_sentence_lists():
    en = read_sentences(SENTENCE_DIR / "en.txt")
    assert len(en) >= 400
    lengths = [len(t.split()) for _, t in en]
    assert min(lengths) <= 3 and max(lengths) >= 18
    assert sum(t.endswith("?") for _, t in en) >= 40
    assert not any(ch.isdigit() for _, t in en for ch in t)  # numbers are spelled out
    for lang in ("fr-fr", "de"):
        assert len(read_sentences(SENTENCE_DIR / f"{lang}.txt", ascii_only=False)) >= 25
