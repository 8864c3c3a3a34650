"""align/export_durations.py end to end: a tiny trained model, our durations loaded by Matcha's own code."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from common.durations import read_alignments
from tests.utils import ROOT, one_line_error, run, subprocess_env, train_tiny

EXPORT = ROOT / "align" / "export_durations.py"
MATCHA_G2P = "matcha.text.cleaners:english_cleaners2"
MATCHA_SYMBOLS = "matcha.text.symbols:symbols"

matcha_text = pytest.importorskip("matcha.text", reason="matcha-tts not installed (scripts/setup.sh installs it)")


def export(corpus, model, *args, check=True, timeout=300):
    return run([sys.executable, EXPORT, "--corpus", corpus, "--model_dir", model, "--no_progress", *args],
               check=check, timeout=timeout)


def rows(corpus: Path) -> list[tuple[str, str]]:
    out = []
    for line in (corpus / "metadata.csv").read_text(encoding="utf-8").splitlines():
        rel, _, _, text = line.split("|")
        out.append((rel, text))
    return out


@pytest.fixture(scope="module")
def ipa_model(tiny_corpus, tmp_path_factory):
    """A tiny model trained on Matcha's own G2P (english_cleaners2) and symbol table."""
    root = tmp_path_factory.mktemp("ipa")
    corpus = tiny_corpus.parent / "corpus"
    run([sys.executable, ROOT / "data_prep/make_manifests.py", "--corpus", corpus, "--out", root / "man",
         "--g2p", MATCHA_G2P, "--symbols", MATCHA_SYMBOLS, "--valid_fraction", "0.15", "--test_fraction", "0.15",
         "--no_progress"])
    return corpus, train_tiny(root / "man", root / "run")


@pytest.fixture
def corpus_copy(ipa_model, tmp_path):
    src, model = ipa_model
    dst = tmp_path / "corpus"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("durations", "textgrids", "mels"))
    return dst, model


def matcha_ids(text: str) -> list[int]:
    from matcha.utils.utils import intersperse

    seq, _ = matcha_text.text_to_sequence(text, ["english_cleaners2"])
    return intersperse(seq, 0)


def check_generate_path(durs: list[torch.Tensor], mel_lens: list[int]) -> None:
    from matcha.utils.model import generate_path, sequence_mask

    xl, yl = torch.tensor([len(d) for d in durs]), torch.tensor(mel_lens)
    dur = torch.zeros(len(durs), int(xl.max()), dtype=torch.long)
    for i, d in enumerate(durs):
        dur[i, : len(d)] = d
    mask = (sequence_mask(xl, int(xl.max())).unsqueeze(-1).float()
            * sequence_mask(yl, int(yl.max())).unsqueeze(1).float())
    attn = generate_path(dur, mask)
    for i, (tx, ty) in enumerate(zip(xl.tolist(), yl.tolist())):
        assert torch.equal(attn[i, :tx, :ty].sum(0), torch.ones(ty))


def test_pt_layout_sums_to_matcha_mels(corpus_copy):
    from matcha.utils.audio import mel_spectrogram

    corpus, model = corpus_copy
    lens = {}
    for rel, _ in rows(corpus):  # Matcha's own mels, as a Matcha user has them
        y, sr = sf.read(corpus / "wavs" / f"{rel}.wav", dtype="float32")
        mel = mel_spectrogram(torch.from_numpy(y)[None], 1024, 80, sr, 256, 1024, 0, 8000, center=False)
        (corpus / "mels" / rel).parent.mkdir(parents=True, exist_ok=True)
        np.save(corpus / "mels" / f"{rel}.npy", mel[0].numpy())
        lens[rel] = mel.shape[-1]
    r = export(corpus, model, "--textgrid", "--plots", "1")
    assert "CUDA is not available: running on CPU" in r.stdout
    durs, mel_lens = [], []
    for rel, text in rows(corpus):
        d = torch.load(corpus / "durations" / f"{rel}.pt")
        assert d.dtype == torch.long and d.ndim == 1 and bool((d >= 0).all())
        assert len(d) == len(matcha_ids(text)), rel  # the interspersed sequence Matcha feeds
        assert int(d.sum()) == lens[rel], rel  # exactly the Matcha mel length
        assert (corpus / "textgrids" / f"{rel}.TextGrid").is_file()
        durs.append(d)
        mel_lens.append(lens[rel])
    check_generate_path(durs, mel_lens)
    rep = json.loads((corpus / "durations" / "export_report.json").read_text())
    assert rep["counts"] == {"success": len(lens), "failure": 0, "skipped_existing": 0, "total": len(lens)}
    al = read_alignments(corpus / "durations" / "alignments.jsonl")
    assert len(al) == len(lens)
    # boundary refinement ran (the default) and each token has its refiner confidence beside the CTC one
    assert len(rep["refine"]["rounds"]) == 8 and rep["refine"]["train_utts"] == len(lens)
    assert all(len(a["refine_confidence"]) == len(a["confidence"]) and 0 <= min(a["refine_confidence"])
               and max(a["refine_confidence"]) <= 1 for a in al.values())
    # ... then the two HMM-GMM alignments (common/hmm.py), each an ensemble of 3 variants over 2 rounds: one from
    # the first pass, one from a flat start; the fused boundaries lie on a 1 ms grid
    hmm = rep["refine"]["hmm"]
    assert set(hmm) == {"from_first_pass", "flat_start"}
    assert all(e["members"] == 3 and e["rounds"] == 2 and len(e["runs"]) == 6 for e in hmm.values())
    assert len(hmm["from_first_pass"]["runs"][0]["passes"]) == 5 and len(hmm["flat_start"]["runs"][0]["passes"]) == 12
    assert len(hmm["flat_start"]["runs"][3]["passes"]) == 5  # later rounds: the short schedule from the mean
    assert all(h["skipped_too_fast"] == 0 and h["frames"] > 0 for e in hmm.values() for h in e["runs"])
    # the 2nd and 3rd members have context-dependent edge states, the 1st (the flat start's first, MFA's monophones)
    # has none; then vowel|stop boundaries move towards the closure landmark (common/landmarks.py)
    assert all(["context_states" in h for h in e["runs"][:3]] == [False, True, True] for e in hmm.values())
    assert rep["refine"]["closures_snapped"] > 0
    # the review statistics: the HMM-GMM fit of every row beside the recognizer's
    assert all(u["hmm_fit"] > -1e-6 and "ctc_gap" in u for u in rep["utterances"].values())
    assert not _on_grid(al, 0.005) and _on_grid(al, 0.001)
    assert len(list((corpus / "durations" / "plots").glob("*.png"))) == 1
    # a second run skips everything; --no_add_blank gives one count per token
    r = export(corpus, model)
    assert "0 written" in r.stdout and f"{len(lens)} skipped" in r.stdout
    export(corpus, model, "--overwrite", "--hmm_weight", "0")  # the neural refinement alone: its 5 ms frames
    rep = json.loads((corpus / "durations" / "export_report.json").read_text())
    assert "hmm" not in rep["refine"] and _on_grid(read_alignments(corpus / "durations" / "alignments.jsonl"), 0.005)
    r = export(corpus, model, "--overwrite", "--hmm_weight", "1.5", check=False)
    assert r.returncode != 0 and "--hmm_weight must be in [0, 1]" in r.stderr
    export(corpus, model, "--no_add_blank", "--overwrite", "--no_refine")
    rep = json.loads((corpus / "durations" / "export_report.json").read_text())
    assert rep["refine"] is None and rep["counts"]["success"] == len(lens)
    for rel, text in rows(corpus)[:3]:
        d = torch.load(corpus / "durations" / f"{rel}.pt")
        assert len(d) == (len(matcha_ids(text)) - 1) // 2 and int(d.sum()) == lens[rel]


def test_npy_layout_loads_in_text_mel_dataset(corpus_copy, monkeypatch):
    import matcha.data.text_mel_datamodule as tmd

    corpus, model = corpus_copy
    export(corpus, model, "--format", "npy", "--no_mels")
    monkeypatch.setattr(tmd.ta, "load", lambda p: (torch.from_numpy(sf.read(str(p), dtype="float32",
                                                                             always_2d=True)[0].T.copy()),
                                                   sf.info(str(p)).samplerate))
    filelist = corpus / "filelist.txt"
    filelist.write_text("".join(f"{corpus / 'wavs' / rel}.wav|{text}\n" for rel, text in rows(corpus)))
    ds = tmd.TextMelDataset(str(filelist), 1, ["english_cleaners2"], add_blank=True, n_fft=1024, n_mels=80,
                            sample_rate=22050, hop_length=256, win_length=1024, f_min=0.0, f_max=8000,
                            load_durations=True)
    items = [ds[i] for i in range(len(ds))]
    for it in items:
        assert len(it["durations"]) == len(it["x"])  # Matcha's own add_blank text
        assert int(it["durations"].sum()) == it["y"].shape[-1]  # the mel Matcha itself computes
    check_generate_path([it["durations"] for it in items], [it["y"].shape[-1] for it in items])
    stems = {Path(rel).name for rel, _ in rows(corpus)}
    assert {p.stem for p in (corpus / "wavs" / "durations").glob("*.npy")} == stems


def test_missing_mels_is_an_error_listing_files(corpus_copy):
    corpus, model = corpus_copy
    r = export(corpus, model, check=False)
    one_line_error(r, "mel file(s) missing", "mels/", "--no_mels")
    assert not (corpus / "durations").exists()


def test_bad_rows(corpus_copy, tmp_path):
    corpus, model = corpus_copy
    meta = (corpus / "metadata.csv").read_text()
    first = meta.splitlines()[0].split("|")
    # rel_path escaping the corpus
    (corpus / "metadata.csv").write_text(meta + "../../etc/passwd|0|en-us|hello\n")
    one_line_error(export(corpus, model, "--no_mels", check=False), "leaves the corpus")
    # audio too short for its tokens
    sf.write(corpus / "wavs" / "short.wav", np.zeros(800, dtype="float32"), 22050)
    (corpus / "metadata.csv").write_text(meta + "short|0|en-us|" + "a very long sentence indeed " * 3 + "\n")
    one_line_error(export(corpus, model, "--no_mels", check=False), "short", "audio too short for its tokens")
    # a symbol outside the model's symbol table
    (corpus / "metadata.csv").write_text(meta + f"{first[0]}x|0|en-us|{first[3]}\n")
    shutil.copy(corpus / "wavs" / f"{first[0]}.wav", corpus / "wavs" / f"{first[0]}x.wav")
    (tmp_path / "narrow.py").write_text("from matcha.text.symbols import symbols\n"
                                        "symbols = [s for s in symbols if s != 'ə']\n")
    r2 = subprocess.run([sys.executable, EXPORT, "--corpus", str(corpus), "--model_dir", str(model), "--no_mels",
                         "--symbols", "narrow:symbols", "--no_progress"], capture_output=True, text=True, cwd=tmp_path,
                        env={**subprocess_env(), "PYTHONPATH": f"{ROOT}:{tmp_path}"})
    one_line_error(r2, "metadata.csv:", "'ə'", "not in --symbols")
    # model / vocabulary mismatch: a G2P whose symbols the model never saw (upper-case letters)
    (corpus / "metadata.csv").write_text(meta)
    (tmp_path / "upper.py").write_text("def g2p(text, language):\n    return text.upper()\n")
    r3 = subprocess.run([sys.executable, EXPORT, "--corpus", str(corpus), "--model_dir", str(model), "--no_mels",
                         "--g2p", "upper:g2p", "--no_progress"], capture_output=True, text=True, cwd=tmp_path,
                        env={**subprocess_env(), "PYTHONPATH": f"{ROOT}:{tmp_path}"})
    one_line_error(r3, "metadata.csv:1", "not in the model's tokens.txt")
    # no model
    one_line_error(export(corpus, tmp_path / "nomodel", "--no_mels", check=False), "not found")
    assert not (corpus / "durations").exists()


def test_precision_bf16_matches_fp32(corpus_copy):
    """--precision bf16 (autocast; the default on CPUs with native bf16 and on CUDA) moves few boundaries."""
    from common.export import cpu_has_bf16

    corpus, model = corpus_copy
    got = {}
    for prec in ("fp32", "bf16", "auto"):
        export(corpus, model, "--no_mels", "--no_refine", "--overwrite", "--precision", prec)
        rep = json.loads((corpus / "durations" / "export_report.json").read_text())
        assert rep["counts"]["failure"] == 0
        got[rep["precision"] if prec != "auto" else "auto"] = {
            rel: a["durations"] for rel, a in read_alignments(corpus / "durations" / "alignments.jsonl").items()}
        if prec == "auto":
            assert rep["precision"] == ("bf16" if cpu_has_bf16() else "fp32")
    # a boundary is the cumulative sum of the durations: compare those, token by token
    same = total = 0
    for rel, d32 in got["fp32"].items():
        c32, c16 = np.cumsum(d32), np.cumsum(got["bf16"][rel])
        assert len(c32) == len(c16) and c32[-1] == c16[-1], rel
        same += int(np.sum(np.abs(c32 - c16) <= 1))  # within one Matcha frame (11.6 ms)
        total += len(c32)
    assert same / total > 0.95, f"{same}/{total} boundaries within a frame"
    r = export(corpus, model, "--no_refine", "--precision", "fp16", check=False)
    assert r.returncode != 0 and "--precision" in r.stderr


def test_resume_after_kill_leaves_no_partial_files(corpus_copy):
    corpus, model = corpus_copy
    # the first pass alone writes batch by batch (with refinement every file is written at the very end, in well
    # under the polling interval); the resumed run refines (the default) and writes only what is missing
    cmd = [sys.executable, str(EXPORT), "--corpus", str(corpus), "--model_dir", str(model), "--no_mels",
           "--no_progress", "--batch_seconds", "4", "--no_refine"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = corpus / "durations"
    deadline = time.time() + 240
    while time.time() < deadline and len(list(out.rglob("*.pt"))) < 3 and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = list(out.rglob("*.pt"))
    total = len(rows(corpus))
    assert 0 < len(done) < total, "kill landed before the first or after the last file; cannot test resume"
    for p in done:  # whatever is there is whole
        assert torch.load(p).dtype == torch.long
    r = export(corpus, model, "--no_mels")
    rep = json.loads((out / "export_report.json").read_text())
    assert rep["counts"]["skipped_existing"] >= len(done) and rep["counts"]["failure"] == 0
    assert rep["refine"]["train_utts"] == total  # the refiner learned from every row, written or not
    assert len(list(out.rglob("*.pt"))) == total
    assert not list(out.rglob(".*.tmp"))
    assert set(read_alignments(out / "alignments.jsonl")) == {rel for rel, _ in rows(corpus)}
    assert "written" in r.stdout


def _on_grid(alignments: dict, hop_s: float) -> bool:
    """Every inner unit end is (k - 0.5) * hop_s (a boundary between two frames centred on that grid)."""
    ends = np.concatenate([np.asarray(a["aligned_ends_s"][:-1]) for a in alignments.values()])
    k = ends / hop_s + 0.5
    return bool(np.all(np.abs(k - np.round(k)) < 0.02))  # the file rounds to 10 us


def _outputs(corpus: Path) -> dict:
    """Every file the export wrote, by path (the timing file aside: wall-clock seconds)."""
    return {p.relative_to(corpus): p.read_bytes() for d in ("durations", "textgrids") for p in (corpus / d).rglob("*")
            if p.is_file() and p.name != "export_timing.json"}


def test_two_exports_are_byte_identical_and_record_what_made_them(corpus_copy):
    corpus, model = corpus_copy
    args = ["--no_mels", "--textgrid", "--overwrite", "--refine_rounds", "2"]
    export(corpus, model, *args)
    first = _outputs(corpus)
    export(corpus, model, *args)
    second = _outputs(corpus)
    assert first.keys() == second.keys() and len(first) > 2 * len(rows(corpus))
    assert [str(k) for k in first if first[k] != second[k]] == []
    rep = json.loads((corpus / "durations" / "export_report.json").read_text())
    assert Path(rep["checkpoint"]).parent == (model / "save").resolve()
    assert (Path(rep["checkpoint"]) / "model.ckpt").is_file()
    made = rep["made_by"]
    assert made["project"] == "phone-durations" and made["version"] and made["torch"] and made["speechbrain"]
    assert rep["options"]["refine_rounds"] == 2 and rep["options"]["refiner"]["rounds"] == 2
    assert rep["options"]["hmm_aligner"]["states"] == 3 and rep["phonemes"]["from"] == "run folder"
    timing = json.loads((corpus / "durations" / "export_timing.json").read_text())
    assert timing["realtime_factor"] > 0 and timing["first_pass_s"] > 0 and timing["refine_classifier_s"] > 0
    assert timing["refiner"] == "stored"  # the first export trained the refiner and saved it for the second
    assert timing["first_pass_scores"].startswith("ctc")  # ... whose first pass needs no attention decoder
    # the full first pass beside the stored refiner: the same files (the report records the option)
    export(corpus, model, *args, "--light_first_pass", "False")
    full = _outputs(corpus)
    timing = json.loads((corpus / "durations" / "export_timing.json").read_text())
    assert timing["refiner"] == "stored" and "first_pass_scores" not in timing
    report = Path("durations") / "export_report.json"
    assert [str(k) for k in first if k != report and first[k] != full[k]] == []


@pytest.mark.parametrize("refine", ["trained", "stored", "off"])
def test_two_process_export_writes_the_files_of_one_process(corpus_copy, tmp_path, refine):
    """torchrun --nproc_per_node 2 (gloo): each process aligns whole batches of one plan, the refiner and the
    HMM-GMMs are trained once and shared (or, stored, read by each process), rank 0 writes; every file equals a
    one-process export's."""
    corpus, model = corpus_copy
    args = ["--no_mels", "--textgrid", "--overwrite", "--batch_seconds", "8", "--refine_rounds", "2", "--device",
            "cpu", *({"off": ["--no_refine"], "trained": ["--refiner_model", "fit"]}.get(refine, []))]
    export(corpus, model, *args)  # (stored: it trains the refiner and saves it; the 2 processes read it)
    single = _outputs(corpus)
    r = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", EXPORT,
             "--corpus", corpus, "--model_dir", model, "--no_progress", *args], timeout=600)
    assert r.stdout.count("durations: ") == 1  # one summary, from rank 0
    timing = json.loads((corpus / "durations" / "export_timing.json").read_text())
    assert timing["processes"] == 2 and timing.get("refiner") == {"off": None, "stored": "stored"}.get(
        refine, "trained here (--refiner_model fit)")
    double = _outputs(corpus)
    assert single.keys() == double.keys() and len(single) > 2 * len(rows(corpus))
    stored = Path("durations") / "refiner.ckpt"  # trained by both: the same values (not bytes: a model shared
    assert [str(k) for k in single if k != stored and single[k] != double[k]] == []  # between processes is a copy)
    if refine != "off":
        (tmp_path / "single.ckpt").write_bytes(single[stored])
        _assert_same_values(torch.load(tmp_path / "single.ckpt", weights_only=True),
                            torch.load(corpus / stored, weights_only=True))


def _assert_same_values(a, b, where="refiner") -> None:
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same_values(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for k, (x, y) in enumerate(zip(a, b)):
            _assert_same_values(x, y, f"{where}[{k}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


def test_a_moved_run_folder_needs_nothing_else(corpus_copy, tmp_path):
    """The run folder is the contract: with its manifests gone, a copy elsewhere still exports and decodes (the
    phone LM from its train_phonemes.txt)."""
    corpus, model = corpus_copy
    moved = tmp_path / "elsewhere" / "run"
    shutil.copytree(model, moved, ignore=shutil.ignore_patterns("decode.jsonl"))
    man = Path(json.loads((model / "phonemes.json").read_text())["manifests"])
    test_csv = tmp_path / "test.csv"
    shutil.copy(man / "test.csv", test_csv)
    hidden = man.with_name(man.name + "_hidden")
    man.rename(hidden)
    try:
        export(corpus, moved, "--no_mels", "--no_refine", "--overwrite")
        rep = json.loads((corpus / "durations" / "export_report.json").read_text())
        assert rep["counts"]["success"] == len(rows(corpus)) and rep["phonemes"]["g2p"] == MATCHA_G2P
        r = run([sys.executable, ROOT / "recipes/decode.py", ROOT / "hparams/phoneme.yaml", "--model_dir", moved,
                 "--test_csv", test_csv, "--decoder", "attention", "--beam_size", "2"])
        assert "phone-LM" in r.stdout and (moved / "decode.jsonl").is_file()
    finally:
        hidden.rename(man)


def test_a_stored_refiner_aligns_as_the_one_trained_here_and_only_with_its_settings(corpus_copy, tmp_path):
    """--fit_refiner trains the refiner on the corpus and saves CORPUS/durations/refiner.ckpt (no durations written);
    an export with the same refiner settings aligns with it (nothing trained) and writes the files an export that
    trains it writes; other settings train it here and say why; a file named by --refiner_model must match, and a
    broken one is a one-line error."""
    corpus, model = corpus_copy
    args = ["--no_mels", "--textgrid", "--overwrite", "--refine_rounds", "2", "--device", "cpu"]
    r = export(corpus, model, *[a for a in args if a != "--no_mels"], "--fit_refiner")  # no mels/ needed
    stored_file = corpus / "durations" / "refiner.ckpt"
    assert f"refiner: trained on {len(rows(corpus))} rows" in r.stdout
    assert [p.name for p in (corpus / "durations").iterdir()] == ["refiner.ckpt"]
    stored = torch.load(stored_file, weights_only=True)
    assert stored["rows"] == len(rows(corpus)) and stored["settings"]["refine_rounds"] == 2
    assert set(stored["models"]) == {"classifier", "hmm", "detector", "classes"}
    export(corpus, model, *args)
    timing = json.loads((corpus / "durations" / "export_timing.json").read_text())
    assert timing["refiner"] == "stored" and timing["refine_features_s"] > 0 and timing["hmm_applied_s"] > 0
    rep = json.loads((corpus / "durations" / "export_report.json").read_text())
    assert rep["refine"]["refiner"] == {"file": str(stored_file), "fitted_on": str(corpus),
                                        "fitted_rows": len(rows(corpus))}
    assert len(rep["refine"]["rounds"]) == 2  # the training's stats
    applied = _outputs(corpus)
    export(corpus, model, *args, "--refiner_model", "fit")  # trained here (and saved again)
    timing = json.loads((corpus / "durations" / "export_timing.json").read_text())
    assert timing["refiner"] == "trained here (--refiner_model fit)" and "hmm_applied_s" not in timing
    trained = _outputs(corpus)
    report = Path("durations") / "export_report.json"  # it records --refiner_model
    assert applied.keys() == trained.keys() and len(applied) > 2 * len(rows(corpus))
    assert [str(k) for k in trained if k != report and trained[k] != applied[k]] == []
    # other refiner settings: trained here, and the timing file says why
    export(corpus, model, "--no_mels", "--overwrite", "--refine_rounds", "1", "--device", "cpu")
    why = json.loads((corpus / "durations" / "export_timing.json").read_text())["refiner"]
    assert why.startswith("trained here") and "--refine_rounds" in why
    assert len(json.loads((corpus / "durations" / "export_report.json").read_text())["refine"]["rounds"]) == 1
    # a file named must match (one-line errors)
    r = export(corpus, model, "--no_mels", "--overwrite", "--refine_rounds", "2", "--refiner_model", stored_file,
               check=False)
    one_line_error(r, "refiner.ckpt", "--refine_rounds", "--fit_refiner")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    one_line_error(export(corpus, model, "--no_mels", "--refiner_model", bad, check=False), "bad.pt",
                   "not a refiner file")
    one_line_error(export(corpus, model, "--no_mels", "--refiner_model", tmp_path / "none.pt", check=False),
                   "none.pt", "not found")
