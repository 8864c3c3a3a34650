"""make_manifests.py on tiny fixtures of every corpus format, and every bad input it must name."""
from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from common.vocab import Vocab
from data_prep import make_manifests

ROOT = Path(__file__).resolve().parents[1]
TEXTS = [
    "Hello world.", "The quick brown fox jumps.", "How are you today?", "I like green apples, and pears.",
    "She sells sea shells.", "Seven silver swans swim south.", "A bird in the hand.", "Rain falls on the plain.",
    "Open the window please.", "Nobody knows the answer.",
]


def tone(path: Path, seconds: float = 0.6, sr: int = 16000, fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * sr)) / sr
    sf.write(str(path), (0.1 * np.sin(2 * np.pi * 220 * t)).astype("float32"), sr, format=fmt)


def run(argv, capsys=None):
    rc = make_manifests.main([str(a) for a in argv] + ["--no_progress"])
    err = capsys.readouterr().err if capsys else ""
    return rc, err


def rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def all_rows(out: Path) -> list[dict]:
    return [r for s in ("train", "valid", "test") for r in rows(out / f"{s}.csv")]


@pytest.fixture
def matcha(tmp_path):
    corpus = tmp_path / "corpus"
    lines = []
    for i, text in enumerate(TEXTS):
        rel = f"{i % 2}/{i:04d}"
        tone(corpus / "wavs" / f"{rel}.wav", 0.5 + 0.1 * i, sr=22050)
        lines.append(f"{rel}|{i % 2}|en-us|{text}")
    (corpus / "metadata.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return corpus


def test_matcha_format(matcha, tmp_path, capsys):
    out = tmp_path / "out"
    rc, _ = run(["--corpus", matcha, "--out", out, "--valid_fraction", 0.2, "--test_fraction", 0.2], capsys)
    assert rc == 0
    got = all_rows(out)
    assert len(got) == len(TEXTS)
    assert list(got[0]) == ["ID", "wav", "duration", "spk_id", "language", "text", "phn"]
    sizes = {s: len(rows(out / f"{s}.csv")) for s in ("train", "valid", "test")}
    assert sizes == {"train": 6, "valid": 2, "test": 2}
    by_id = {r["ID"]: r for r in got}
    r = by_id["0/0000"]
    assert Path(r["wav"]).is_file() and abs(float(r["duration"]) - 0.5) < 1e-3
    assert r["phn"].split()[:4] == ["h", "ə", "l", "ˈ"] and "|" in r["phn"].split()
    vocab = Vocab.load(out / "tokens.txt")
    for row in got:  # every token of every split is in the vocabulary
        vocab.encode(row["phn"])
    report = json.loads((out / "prep_report.json").read_text())
    assert report["rows_written"] == len(TEXTS) and report["skipped"] == {}
    # a re-run is served from the phonemizer cache
    rc, _ = run(["--corpus", matcha, "--out", out, "--valid_fraction", 0.2, "--test_fraction", 0.2], capsys)
    assert json.loads((out / "prep_report.json").read_text())["g2p_cache_hits"] == len(TEXTS)


def test_split_by_text_keeps_sentences_together(tmp_path, capsys):
    corpus = tmp_path / "c"
    lines = []
    for i, text in enumerate(TEXTS):
        for v in ("kal", "slt", "ked"):
            rel = f"{v}/{i:03d}"
            tone(corpus / "wavs" / f"{rel}.wav")
            lines.append(f"{rel}|{v}|en-us|{text}")
    (corpus / "metadata.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert run(["--corpus", corpus, "--out", out, "--valid_fraction", 0.2, "--test_fraction", 0.2], capsys)[0] == 0
    texts = {s: {r["text"] for r in rows(out / f"{s}.csv")} for s in ("train", "valid", "test")}
    assert texts["test"] and texts["valid"]
    assert not (texts["train"] & texts["test"]) and not (texts["train"] & texts["valid"])
    # deterministic for a seed, different for another
    out2 = tmp_path / "out2"
    run(["--corpus", corpus, "--out", out2, "--valid_fraction", 0.2, "--test_fraction", 0.2], capsys)
    assert (out / "test.csv").read_text() == (out2 / "test.csv").read_text()
    # by speaker: no speaker in two splits
    out3 = tmp_path / "out3"
    run(["--corpus", corpus, "--out", out3, "--split_by", "speaker", "--valid_fraction", 0.3,
         "--test_fraction", 0.3], capsys)
    spk = {s: {r["spk_id"] for r in rows(out3 / f"{s}.csv")} for s in ("train", "valid", "test")}
    assert not (spk["train"] & spk["test"]) and not (spk["train"] & spk["valid"])
    # --train_fraction / --validation_samples are training options (tests/test_train.py), not prep ones
    with pytest.raises(SystemExit):
        run(["--corpus", corpus, "--out", tmp_path / "out4", "--train_fraction", 0.5], capsys)


def test_explicit_split_lists_and_phones_tsv(matcha, tmp_path, capsys):
    (tmp_path / "test.txt").write_text("0/0000\n1/0001\n")
    (tmp_path / "valid.txt").write_text("0/0002\n")
    (tmp_path / "train.txt").write_text("\n".join(f"{i % 2}/{i:04d}" for i in range(3, 10)))
    phones = "\n".join(f"{i % 2}/{i:04d}\tpau hh ax l ow pau\t0.1 0.2 0.3 0.4 0.5 0.6" for i in range(10))
    (tmp_path / "phones.tsv").write_text(phones + "\n")
    out = tmp_path / "out"
    rc, _ = run(["--corpus", matcha, "--out", out, "--test_list", tmp_path / "test.txt", "--valid_list",
                 tmp_path / "valid.txt", "--train_list", tmp_path / "train.txt",
                 "--phones_tsv", tmp_path / "phones.tsv"], capsys)
    assert rc == 0
    assert {r["ID"] for r in rows(out / "test.csv")} == {"0/0000", "1/0001"}
    assert [r["ID"] for r in rows(out / "valid.csv")] == ["0/0002"]
    assert len(rows(out / "train.csv")) == 7
    assert all(r["phn"] == "pau hh ax l ow pau" for r in all_rows(out))
    assert Vocab.load(out / "tokens.txt").tokens[4:] == sorted({"pau", "hh", "ax", "l", "ow"})


def test_custom_g2p_and_symbols(matcha, tmp_path, capsys, monkeypatch):
    mod = tmp_path / "myg2p.py"
    mod.write_text("def g2p(text, language):\n    return text.lower()\nSYMS = list(' abcdefghijklmnopqrstuvwxyz.,?')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "out"
    rc, _ = run(["--corpus", matcha, "--out", out, "--g2p", "myg2p:g2p", "--symbols", "myg2p:SYMS"], capsys)
    assert rc == 0
    r = {x["ID"]: x for x in all_rows(out)}["0/0000"]
    assert r["phn"] == "h e l l o | w o r l d ."
    vocab = Vocab.load(out / "tokens.txt")
    syms = list(" abcdefghijklmnopqrstuvwxyz.,?")
    assert vocab.symbol_ids["|"] == syms.index(" ") and vocab.symbol_ids["h"] == syms.index("h")
    # a symbol outside --symbols names the row and the symbol, and writes nothing
    (tmp_path / "narrow.py").write_text("SYMS = list(' abcdefghijklmnopqrstuvwxyz.,')\n")
    out2 = tmp_path / "out2"
    rc, err = run(["--corpus", matcha, "--out", out2, "--g2p", "myg2p:g2p", "--symbols", "narrow:SYMS"], capsys)
    assert rc == 2 and "metadata.csv:3" in err and "'?'" in err and "--symbols" in err
    assert not (out2 / "train.csv").exists()


def test_auxasr_format(tmp_path, capsys):
    corpus = tmp_path / "aux"
    train, val = [], []
    for i in range(8):
        tone(corpus / "wavs" / f"u{i}.wav")
        (train if i < 6 else val).append(f"wavs/u{i}.wav|həlˈoʊ wˈɜːld{'d' * i}|{i % 3}")
    (corpus / "train_list.txt").write_text("\n".join(train) + "\n")
    (corpus / "val_list.txt").write_text("\n".join(val) + "\n")
    out = tmp_path / "out"
    rc, _ = run(["--corpus", corpus, "--format", "auxasr", "--out", out, "--test_fraction", 0.2], capsys)
    assert rc == 0
    assert {r["ID"] for r in rows(out / "valid.csv")} == {"wavs/u6", "wavs/u7"}
    assert len(rows(out / "test.csv")) == 1 and len(rows(out / "train.csv")) == 5
    assert all(r["phn"].startswith("h ə l ˈ o ʊ | w ˈ ɜ ː l d") for r in all_rows(out))
    assert {r["phn"].count("d") for r in all_rows(out)} == set(range(1, 9))


def test_ljspeech_format(tmp_path, capsys):
    corpus = tmp_path / "LJSpeech-1.1"
    lines = []
    for i, text in enumerate(TEXTS[:5]):
        tone(corpus / "wavs" / f"LJ001-{i:04d}.wav", sr=22050)
        lines.append(f"LJ001-{i:04d}|{text.upper()}|{text}")
    (corpus / "metadata.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert run(["--corpus", corpus, "--format", "ljspeech", "--out", out, "--valid_fraction", 0.2,
                "--test_fraction", 0.2], capsys)[0] == 0
    got = all_rows(out)
    assert len(got) == 5 and all(r["language"] == "en-us" and r["spk_id"] == "0" for r in got)
    assert {r["text"] for r in got} == set(TEXTS[:5])


def test_commonvoice_mp3(tmp_path, capsys):
    corpus = tmp_path / "cv" / "fr"
    header = "client_id\tpath\tsentence\tup_votes\tdown_votes\tage\tgender\taccent\tlocale\n"
    for split, n in (("train", 4), ("dev", 1), ("test", 1)):
        lines = []
        for i in range(n):
            name = f"common_voice_fr_{split}{i}.mp3"
            tone(corpus / "clips" / name, 0.8, sr=48000, fmt="MP3")
            lines.append(f"spk{i}\t{name}\tBonjour le monde numéro {i}.\t2\t0\t\t\t\tfr-fr")
        (corpus / f"{split}.tsv").write_text(header + "\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert run(["--corpus", corpus, "--format", "commonvoice", "--out", out], capsys)[0] == 0
    assert [len(rows(out / f"{s}.csv")) for s in ("train", "valid", "test")] == [4, 1, 1]
    r = rows(out / "train.csv")[0]
    assert r["language"] == "fr-fr" and abs(float(r["duration"]) - 0.8) < 0.06 and "ʒ" in r["phn"]


def test_hf_dataset_from_disk(tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    sr = 16000
    audio = []
    for i in range(6):  # audio stored as encoded WAV bytes, as hub datasets hold it
        buf = io.BytesIO()
        sf.write(buf, (0.1 * np.sin(np.arange(sr // 2) / (3 + i))).astype("float32"), sr, format="WAV")
        audio.append({"bytes": buf.getvalue(), "path": f"utt{i}.wav"})
    ds = datasets.Dataset.from_dict({"audio": audio, "text": TEXTS[:6], "speaker": [0, 1, 0, 1, 0, 1]})
    ds = ds.cast_column("audio", datasets.Audio(sampling_rate=sr))
    ds.save_to_disk(str(tmp_path / "hfds"))
    out = tmp_path / "out"
    rc, _ = run(["--corpus", tmp_path / "hfds", "--format", "hf", "--out", out, "--hf_speaker_column", "speaker",
                 "--valid_fraction", 0.2, "--test_fraction", 0.2], capsys)
    assert rc == 0
    got = all_rows(out)
    assert len(got) == 6 and {r["spk_id"] for r in got} == {"0", "1"}
    for r in got:
        assert Path(r["wav"]).parent == out / "wavs" and abs(float(r["duration"]) - 0.5) < 1e-3
    mtimes = {r["wav"]: Path(r["wav"]).stat().st_mtime_ns for r in got}
    run(["--corpus", tmp_path / "hfds", "--format", "hf", "--out", out], capsys)  # audio written once
    assert all(Path(w).stat().st_mtime_ns == m for w, m in mtimes.items())


def test_hf_gated_without_token(tmp_path, capsys, monkeypatch):
    import datasets

    def gated(*args, **kwargs):
        raise ConnectionError("Dataset 'org/gated' is a gated dataset on the Hub. "
                              "You must be authenticated to access it.")

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(datasets, "load_dataset", gated)
    rc, err = run(["--corpus", "org/gated", "--format", "hf", "--out", tmp_path / "out"], capsys)
    assert rc == 2 and "gated" in err and "HF_TOKEN" in err and "no HF_TOKEN found" in err
    # a token from .env is picked up (and never printed)
    (tmp_path / ".env").write_text("HF_TOKEN=hf_secret123\n")
    seen = {}

    def capture(*args, **kwargs):
        seen.update(kwargs)
        raise ConnectionError("401 Client Error: Unauthorized")

    monkeypatch.setattr(datasets, "load_dataset", capture)
    rc, err = run(["--corpus", "org/gated", "--format", "hf", "--out", tmp_path / "out"], capsys)
    assert rc == 2 and seen["token"] == "hf_secret123" and "hf_secret123" not in err and "refused" in err


def write_meta(corpus: Path, lines: list[str]) -> None:
    (corpus / "metadata.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.mark.parametrize("line,expect", [
    ("0/0001|0|en-us", "metadata.csv:2: expected 4 '|'-separated fields"),
    ("0/0000|0|en-us|Hello world", "metadata.csv:2: duplicate id '0/0000' (first at"),
    ("/etc/passwd|0|en-us|Hello", "metadata.csv:2: absolute path '/etc/passwd' not allowed"),
    ("../outside|0|en-us|Hello", "metadata.csv:2: path '../outside' leaves the corpus"),
    ("0/0001|0|xx-zz|Hello", "metadata.csv:2: language 'xx-zz' is not known to espeak-ng"),
])
def test_structural_errors(tmp_path, capsys, line, expect):
    corpus = tmp_path / "c"
    tone(corpus / "wavs" / "0" / "0000.wav")
    tone(corpus / "wavs" / "0" / "0001.wav")
    write_meta(corpus, ["0/0000|0|en-us|Hello world", line])
    out = tmp_path / "out"
    rc, err = run(["--corpus", corpus, "--out", out], capsys)
    assert rc == 2 and expect in err, err
    assert len(err.strip().splitlines()) == 1
    assert not (out / "train.csv").exists() and not (out / "tokens.txt").exists()


def test_counted_skips_and_strict(tmp_path, capsys):
    corpus = tmp_path / "c"
    for i in range(6):
        tone(corpus / "wavs" / f"{i}.wav", 0.5)
    tone(corpus / "wavs" / "long.wav", 3.0)
    sf.write(str(corpus / "wavs" / "empty.wav"), np.zeros(0, dtype="float32"), 16000)
    (corpus / "wavs" / "broken.wav").write_bytes(b"RIFF not really a wav")
    lines = [f"{i}|0|en-us|{TEXTS[i]}" for i in range(6)] + [
        "missing|0|en-us|No audio here", "long|0|en-us|Too long", "empty|0|en-us|Zero samples",
        "broken|0|en-us|Broken file", "5x|0|en-us| ",
    ]
    tone(corpus / "wavs" / "5x.wav")
    write_meta(corpus, lines)
    out = tmp_path / "out"
    rc, _ = run(["--corpus", corpus, "--out", out, "--max_duration", 2.0], capsys)
    assert rc == 0
    rep = json.loads((out / "prep_report.json").read_text())
    assert rep["skipped"] == {"missing_audio": 1, "duration_filtered": 1, "zero_length_audio": 1,
                              "unreadable_audio": 1, "empty_text": 1}
    assert rep["rows_written"] == 6
    assert "metadata.csv:7" in rep["skipped_examples"]["missing_audio"][0]
    # --strict turns the first skip into an error naming the row, and writes nothing
    out2 = tmp_path / "out2"
    rc, err = run(["--corpus", corpus, "--out", out2, "--max_duration", 2.0, "--strict"], capsys)
    assert rc == 2 and "metadata.csv:7" in err and "not found" in err and not (out2 / "train.csv").exists()


def test_cli_one_line_error_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "data_prep" / "make_manifests.py"), "--corpus",
                           str(tmp_path / "nope"), "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path / 'nope'}: corpus not found; check --corpus"]
