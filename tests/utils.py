"""Shared test helpers: a tiny festival corpus and a tiny trained recognizer (CPU, about a minute).

``tests/conftest.py`` wraps them in session fixtures (``tiny_corpus``, ``tiny_model``) so every test module that
needs a corpus or a trained model builds it once per session.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

# Small and fast: trains in well under a minute on one CPU thread.
# stop_align_shift_ms 0: the tests count epochs, so they train exactly number_of_epochs (the stop rule has its own
# test in test_train.py); warmup_steps 0: a run of a few dozen steps trains at the full rate from the first;
# ctc_blank_prior 0: the decode tests' thresholds were set on this model trained from the random init (the prior has
# its own test, and ALIGNER below trains with it)
TINY_MODEL = dict(conv_channels=96, rnn_neurons=96, rnn_layers=1, enc_dim=96, dec_neurons=96, attn_dim=64,
                  emb_size=32, dropout=0.0, test_beam_search=False, num_threads=1, stop_align_shift_ms=0,
                  warmup_steps=0, ctc_blank_prior=0)
# Overfit mode: the first OVERFIT_UTTS training rows, overfit_repeats (10) steps per epoch.
OVERFIT_UTTS = 4
OVERFIT = dict(overfit_one_batch=True, overfit_batch_size=OVERFIT_UTTS, overfit_epochs=15, lr=0.003,
               lr_annealing_factor=1.0, skip_test=True)


STYLETTS2_FIXTURE_ENV = "STYLETTS2_FIXTURE_DIR"


def styletts2_fixture() -> Path | None:
    """The StyleTTS2 ASR fixture folder (a checkpoint in StyleTTS2's format + reference outputs of its code): CI
    clones the repository with ``../shared`` beside it; elsewhere ``$STYLETTS2_FIXTURE_DIR``; None when absent."""
    for d in (ROOT.parent / "shared" / "fixtures" / "styletts2_asr", os.environ.get(STYLETTS2_FIXTURE_ENV)):
        if d and (Path(d) / "epoch_00080.pth").is_file():
            return Path(d)
    return None


def have_festival() -> bool:
    return shutil.which("festival") is not None


def subprocess_env() -> dict:
    """Environment for child processes: one BLAS/OpenMP thread (two threads on a busy shared CPU are ~50x slower)."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return env


def run(cmd: list, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                       env=subprocess_env())
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return r


def one_line_error(r: subprocess.CompletedProcess, *needles) -> str:
    """A CLI that rejected bad input: exit code 2, exactly one ``error: ...`` line naming every needle, no
    traceback. Returns that line."""
    assert r.returncode == 2, (r.returncode, r.stdout[-1000:] + r.stderr[-2000:])
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr[-2000:]
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def build_tiny_corpus(root: Path, num_utts: int = 30) -> Path:
    """festival corpus (22050 Hz, 3 voices) + manifests with festival phones; returns the manifest folder."""
    root = Path(root)
    run([sys.executable, ROOT / "data_prep/synth_corpus.py", root / "corpus", "--num_utts", num_utts,
         "--sample_rate", "22050", "--no_progress"])
    run([sys.executable, ROOT / "data_prep/make_manifests.py", "--corpus", root / "corpus", "--format", "matcha",
         "--out", root / "man", "--phones_tsv", root / "corpus/phones.tsv", "--split_by", "text",
         "--valid_fraction", "0.15", "--test_fraction", "0.15", "--no_progress"])
    return root / "man"


def train_tiny(data: Path, out: Path, timeout: float = 600, **overrides) -> Path:
    """``recipes/train.py`` with the tiny model in overfit mode (``overrides`` replace any key); returns the
    output folder."""
    args = []
    for k, v in {**TINY_MODEL, **OVERFIT, **overrides}.items():
        args += [f"--{k}", v]
    run([sys.executable, ROOT / "recipes/train.py", ROOT / "hparams/phoneme.yaml", "--data_folder", data,
         "--output_folder", out, "--noprogressbar", *args], timeout=timeout)
    return Path(out)


# A tiny model trained normally (not overfit) long enough to leave the CTC blank plateau: its alignments are
# meaningful on the whole tiny corpus (tests/test_accuracy.py). About 3-4 minutes on 2 idle cores.
ALIGNER = dict(conv_channels=96, rnn_neurons=96, enc_dim=96, dec_neurons=64, attn_dim=32, emb_size=16,
               speed_perturb=False, add_white_noise=False, spec_augment=True, lr=0.005, max_batch_length=6,
               lr_annealing_factor=1.0, number_of_epochs=45, skip_test=True, num_threads=1, stop_align_shift_ms=0,
               warmup_steps=0)


def train_aligner(data: Path, out: Path, timeout: float = 1200) -> Path:
    args = []
    for k, v in ALIGNER.items():
        args += [f"--{k}", v]
    run([sys.executable, ROOT / "recipes/train.py", ROOT / "hparams/phoneme.yaml", "--data_folder", data,
         "--output_folder", out, "--noprogressbar", *args], timeout=timeout)
    return Path(out)


# ---------------------------------------------------------------- synthetic "phones" for the alignment passes
TONE_SR = 16000
TONE_FREQS = [300.0, 700.0, 1300.0, 2100.0, 3300.0]  # one "phone" = one tone (class id = index + 1; 0 = silence)


def tone_corpus(n: int, seed: int):
    """Utterances of 4-7 tone segments (60-200 ms) with silence at both edges: (wavs, unit ids, true ends)."""
    rng = np.random.default_rng(seed)
    wavs, units, ends = [], [], []
    for _ in range(n):
        k = int(rng.integers(4, 8))
        seq = [0] + [int(c) + 1 for c in rng.integers(0, len(TONE_FREQS), k)] + [0]
        for j in range(2, len(seq) - 1):  # no two equal tones in a row: their boundary would be inaudible
            while seq[j] == seq[j - 1]:
                seq[j] = int(rng.integers(0, len(TONE_FREQS))) + 1
        durs = [float(rng.uniform(0.06, 0.2)) for _ in seq]
        parts = []
        for c, d in zip(seq, durs):
            t = np.arange(int(d * TONE_SR)) / TONE_SR
            parts.append(np.zeros_like(t) if c == 0 else 0.3 * np.sin(2 * np.pi * TONE_FREQS[c - 1] * t))
        w = np.concatenate(parts) + 0.003 * rng.standard_normal(sum(len(p) for p in parts))
        wavs.append(torch.from_numpy(w.astype(np.float32)))
        units.append(seq)
        ends.append(np.cumsum([len(p) for p in parts]) / TONE_SR)
    return wavs, units, ends


def tone_words(n: int, seed: int):
    """Word-like recordings: 3-5 tone "phones" between a short leading (0.1-0.2 s) and a long trailing (0.4-0.7 s)
    silence, as single-word field recordings are (about half of the audio is edge silence)."""
    rng = np.random.default_rng(seed)
    wavs, units, ends = [], [], []
    for _ in range(n):
        k = int(rng.integers(3, 6))
        seq = [0] + [int(c) + 1 for c in rng.integers(0, len(TONE_FREQS), k)] + [0]
        for j in range(2, len(seq) - 1):
            while seq[j] == seq[j - 1]:
                seq[j] = int(rng.integers(0, len(TONE_FREQS))) + 1
        durs = [float(rng.uniform(0.1, 0.2))] + [float(rng.uniform(0.06, 0.2)) for _ in range(k)] + \
            [float(rng.uniform(0.4, 0.7))]
        parts = []
        for c, d in zip(seq, durs):
            t = np.arange(int(d * TONE_SR)) / TONE_SR
            parts.append(np.zeros_like(t) if c == 0 else 0.3 * np.sin(2 * np.pi * TONE_FREQS[c - 1] * t))
        w = np.concatenate(parts) + 0.003 * rng.standard_normal(sum(len(p) for p in parts))
        wavs.append(torch.from_numpy(w.astype(np.float32)))
        units.append(seq)
        ends.append(np.cumsum([len(p) for p in parts]) / TONE_SR)
    return wavs, units, ends


def mean_inner_error_ms(ends_a, ends_b) -> float:
    return 1000 * float(np.mean(np.concatenate([np.abs(a[:-1] - b[:-1]) for a, b in zip(ends_a, ends_b)])))
