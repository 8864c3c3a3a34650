"""Unit types (common/units.py, make_manifests.py --tokenizer_type char|spm): characters and SentencePiece pieces
through manifests, training, decoding (CER / WER) and the export (durations per character)."""
from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from common import units as U
from common.durations import read_alignments
from tests.utils import ROOT, one_line_error, run, train_tiny

MANIFESTS = ROOT / "data_prep" / "make_manifests.py"
EXPORT = ROOT / "align" / "export_durations.py"
M = U.SPM_MARK


# ---------------------------------------------------------------- pieces and symbols (no corpus)
def test_cleaner_pieces_and_symbols(tmp_path):
    assert U.basic_cleaner("  The  Cat,\tSAT! ") == "the cat, sat!"
    assert U.chars_of("the cat") == ["t", "h", "e", "|", "c", "a", "t"]
    # the marker before the first word is no character of the text; a marker standing alone is a space
    syms, owner = U.symbols_of_pieces([f"{M}th", "e", M, "c", "at"])
    assert syms == ["t", "h", "e", "|", "c", "a", "t"] and owner == [0, 0, 1, 2, 3, 4, 4]
    syms, owner = U.symbols_of_pieces([M, "x", f"{M}y"])
    assert syms == ["x", "|", "y"] and owner == [1, 2, 2]
    assert U.detokenize([f"{M}th", "e", f"{M}cat"], "spm") == "the cat"
    assert U.detokenize(["a", "|", "b", "c"], "char") == "a bc"
    texts = ["the cat sat on the mat.", "a dog, a log! hello world", "printing in the only sense"] * 4
    n = U.train_spm(texts, tmp_path / "m.model", 40)
    sp = U.SpmTokenizer(tmp_path / "m.model")
    assert sp.size == n <= 40
    for t in texts + ["an unseen word: quixotic"]:  # the pieces spell the text, unseen characters too
        assert U.symbols_of_pieces(sp.encode(t))[0] == U.chars_of(t)
    (tmp_path / "bad.model").write_text("not a model")
    with pytest.raises(U.UserError, match="not a SentencePiece model"):
        U.SpmTokenizer(tmp_path / "bad.model")


def test_piece_spans_are_divided_evenly_among_their_symbols():
    from common.export import Alignment, Item
    from common.vocab import SIL, Vocab

    pieces = [M, "ab", f"{M}cde"]
    vocab = Vocab(U.SPECIALS + sorted(set(pieces)))
    ex = U.ExportUnits({"units": "spm"}, vocab)
    assert ex.vocab.tokens == U.SPECIALS + ["a", "b", "c", "d", "e", "|"]
    it = Item("r", Path("r.wav"), pieces, vocab.encode(pieces), 16000, 16000, 62, Path("r.pt"), "row 1")
    # units pau, ▁, ab, ▁cde, pau at 10 ms frames: ends 0.095, 0.105, 0.295, 0.795, 1.0
    a = Alignment(it, [SIL, *pieces, SIL], True, True, np.array([10, 1, 19, 50, 20]), 0.01,
                  np.array([0.5, 0.6, 0.7]), 0.0)
    ex.expand([a])
    assert a.units == [SIL, "a", "b", "|", "c", "d", "e", SIL] and a.item.tokens == a.units[1:-1]
    assert a.item.ids == ex.vocab.encode(a.units[1:-1]) and a.hop_s == U.GRID_S
    # the standalone first marker's span goes to "ab": [0.095, 0.295] halved; "▁cde" [0.295, 0.795] in four
    want = [0.095, 0.195, 0.295, 0.42, 0.545, 0.67, 0.795, 1.0]
    assert np.allclose(a.unit_ends(), want, atol=U.GRID_S)
    assert a.confidence.tolist() == [0.6, 0.6, 0.7, 0.7, 0.7, 0.7] and int(a.frames.sum()) == 1000


# ---------------------------------------------------------------- the CLIs on the tiny corpus
def manifests(corpus: Path, out: Path, *args, check=True):
    return run([sys.executable, MANIFESTS, "--corpus", corpus, "--out", out, "--valid_fraction", "0.15",
                "--test_fraction", "0.15", "--no_progress", *args], check=check)


def rows(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def unit_runs(tiny_corpus, tmp_path_factory):
    """Manifests and a tiny trained run per unit type (char, spm)."""
    corpus = tiny_corpus.parent / "corpus"
    root = tmp_path_factory.mktemp("units")
    out = {}
    for kind, extra in (("char", []), ("spm", ["--spm_vocab_size", "60"])):
        manifests(corpus, root / f"man_{kind}", "--tokenizer_type", kind, *extra)
        out[kind] = (root / f"man_{kind}", train_tiny(root / f"man_{kind}", root / f"run_{kind}",
                                                      metrics_csv=root / "sweep.csv", run_id=kind))
    return corpus, root, out


def test_manifests_hold_characters_and_pieces(unit_runs, tmp_path):
    corpus, root, runs = unit_runs
    man_c, man_s = runs["char"][0], runs["spm"][0]
    for split in ("train", "valid", "test"):
        for rc, rs in zip(rows(man_c / f"{split}.csv"), rows(man_s / f"{split}.csv")):
            clean = U.basic_cleaner(rc["text"])
            assert rc["ID"] == rs["ID"] and rc["phn"].split() == U.chars_of(clean)
            assert U.symbols_of_pieces(rs["phn"].split())[0] == U.chars_of(clean)
    chars = [ln.split("\t")[0] for ln in (man_c / "tokens.txt").read_text(encoding="utf-8").splitlines()][4:]
    assert all(len(t) == 1 for t in chars) and "|" in chars and not any(c.isupper() for c in chars)
    pieces = [ln.split("\t")[0] for ln in (man_s / "tokens.txt").read_text(encoding="utf-8").splitlines()][4:]
    assert any(len(p) > 1 for p in pieces) and any(p.startswith(M) for p in pieces)
    rep = json.loads((man_s / "prep_report.json").read_text())
    assert rep["units"]["type"] == "spm" and 0 < rep["units"]["spm_pieces"] <= 60
    assert (man_s / U.SPM_FILE).is_file() and rep["options"]["g2p"] == U.CHAR_CLEANER
    # trained on the training split only: every train row's pieces are pieces of the model; a given model is reused
    sp = U.SpmTokenizer(man_s / U.SPM_FILE)
    assert all(sp.sp.piece_to_id(p) != sp.sp.unk_id() for r in rows(man_s / "train.csv") for p in r["phn"].split())
    manifests(corpus, tmp_path / "again", "--tokenizer_type", "spm", "--spm_model", man_s / U.SPM_FILE)
    assert (tmp_path / "again" / "train.csv").read_text() == (man_s / "train.csv").read_text()
    # bad input: one line, nothing written
    bad = tmp_path / "bad.model"
    bad.write_text("no")
    one_line_error(manifests(corpus, tmp_path / "b1", "--tokenizer_type", "spm", "--spm_model", bad, check=False),
                   "not a SentencePiece model", str(bad))
    one_line_error(manifests(corpus, tmp_path / "b2", "--tokenizer_type", "char", "--phones_tsv",
                             corpus / "phones.tsv", check=False), "--phones_tsv", "--tokenizer_type phoneme")
    one_line_error(manifests(corpus, tmp_path / "b3", "--spm_model", man_s / U.SPM_FILE, check=False),
                   "--spm_model goes with --tokenizer_type spm")
    for d in ("b1", "b2", "b3"):
        assert not (tmp_path / d / "train.csv").exists() and not (tmp_path / d / U.SPM_FILE).exists()


def test_run_folder_metrics_and_decode(unit_runs):
    corpus, root, runs = unit_runs
    sweep = {r["run_id"]: r for r in rows(root / "sweep.csv")}
    for kind, (man, model) in runs.items():
        m = json.loads((model / "metrics.json").read_text())
        assert m["units"] == {"type": kind, "error_rate": U.RATE_NAMES[kind]}
        assert sweep[kind]["task"] == U.TASKS[kind]  # the wer column: the valid error rate over the units
        assert float(sweep[kind]["wer"]) == pytest.approx(m["best_valid_PER"], abs=1e-3)
        src = json.loads((model / "phonemes.json").read_text())
        assert src["units"] == kind and src["g2p"] == U.CHAR_CLEANER
        assert (model / U.SPM_FILE).is_file() == (kind == "spm")
        r = run([sys.executable, ROOT / "recipes/decode.py", ROOT / "hparams/phoneme.yaml", "--model_dir", model,
                 "--test_csv", man / "train.csv", "--num_threads", "1", "--device", "cpu"])
        recs = [json.loads(ln) for ln in (model / "decode.jsonl").read_text(encoding="utf-8").splitlines()]
        keys = {"char": ["cer", "wer"], "spm": ["piece_er", "cer", "wer"]}[kind]
        assert list(recs[0])[3:] == keys
        if kind == "char":
            assert "CER" in r.stdout and "WER" in r.stdout and "PER" not in r.stdout
        else:
            assert "piece error rate" in r.stdout and "CER" in r.stdout
        # the overfit model decodes its training rows nearly right; an exact row scores 0 on every rate
        exact = [x for x in recs if x["ref"] == x["hyp"]]
        assert all(x[k] == 0 for x in exact for k in keys)
        assert all(x["wer"] >= 0 for x in recs)


def test_export_writes_durations_per_character(unit_runs, tmp_path):
    src_corpus, root, runs = unit_runs
    lines = (src_corpus / "metadata.csv").read_text(encoding="utf-8").splitlines()
    chars = {ln.split("|")[0]: U.chars_of(U.basic_cleaner(ln.split("|")[3])) for ln in lines}
    for kind, (_, model) in runs.items():
        corpus = tmp_path / kind
        shutil.copytree(src_corpus, corpus, ignore=shutil.ignore_patterns("durations", "textgrids", "mels"))
        for extra in (["--no_refine"], ["--refine_rounds", "2", "--textgrid"]):
            run([sys.executable, EXPORT, "--corpus", corpus, "--model_dir", model, "--no_mels", "--no_progress",
                 "--device", "cpu", "--overwrite", *extra])
            rep = json.loads((corpus / "durations" / "export_report.json").read_text())
            assert rep["counts"]["success"] == len(lines) and rep["phonemes"]["units"] == kind
            al = read_alignments(corpus / "durations" / "alignments.jsonl")
            for rel, c in chars.items():
                d = torch.load(corpus / "durations" / f"{rel}.pt")
                n = sf.info(corpus / "wavs" / f"{rel}.wav").frames
                assert d.dtype == torch.long and bool((d >= 0).all()) and int(d.sum()) == n // 256, rel
                assert al[rel]["tokens"][1::2] == c and len(d) == 2 * len(c) + 1, rel  # one per character
                assert al[rel]["aligned_tokens"][1:-1] == c and len(al[rel]["confidence"]) == len(c)
        assert len(rep["refine"]["rounds"]) == 2  # the refiner's classes are the characters
    assert (tmp_path / "spm" / "textgrids").is_dir()
