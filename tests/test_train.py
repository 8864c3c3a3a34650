"""recipes/train.py + common/model.py on a tiny festival corpus (CPU, a few minutes in total).

The corpus (30 utterances, 3 voices, 22050 Hz so the 16 kHz resampling runs) is built once per session with
data_prep/synth_corpus.py + make_manifests.py --phones_tsv.
"""
from __future__ import annotations

import csv
import json
import multiprocessing
import os
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.io import read_manifest, write_manifest  # noqa: E402
from common.run_report import METRICS_CSV_HEADER, append_metrics_csv  # noqa: E402
from tests.utils import one_line_error  # noqa: E402

TINY = [  # a small model so a run takes seconds
    "--conv_channels", "96", "--rnn_neurons", "96", "--rnn_layers", "1", "--enc_dim", "96", "--dec_neurons", "96",
    "--attn_dim", "64", "--emb_size", "32", "--test_beam_search", "False", "--num_threads", "1",
    "--stop_align_shift_ms", "0",  # the tests count epochs (the stop rule has its own test)
    "--warmup_steps", "0",  # a few dozen steps per run: the full rate from the first
    "--ctc_blank_prior", "0",  # the random init the loss thresholds were set on (the prior has its own test)
]
SWEEP_HEADER = (
    "timestamp, run_id, run_stage, model, output_dir, dataset_part, train_fraction, validation_samples, epochs, wer, "
    "train_runtime, train_loss, eval_loss, device, gpu, per_device_train_batch_size, grad_accum, "
    "effective_batch_size, lora_r, lora_alpha, lora_dropout, quant_weights_dtype, quant_compute_dtype, "
    "inference_time_sec, peak_memory_mb, save_full_model, language, task, learning_rate, seed, eval_strategy, "
    "eval_steps"
).split(", ")


def train_cmd(data, out, *extra):
    given = {str(e) for e in extra}  # a key in extra replaces TINY's (one value per key on the command line)
    tiny = [a for k, v in zip(TINY[::2], TINY[1::2]) if k not in given for a in (k, v)]
    return [sys.executable, str(ROOT / "recipes/train.py"), str(ROOT / "hparams/phoneme.yaml"),
            "--data_folder", str(data), "--output_folder", str(out), "--noprogressbar", *tiny, *map(str, extra)]


def run_train(data, out, *extra, timeout=300):
    return subprocess.run(train_cmd(data, out, *extra), capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def logged_epochs(out) -> list[int]:
    lines = (Path(out) / "train_log.txt").read_text().splitlines()
    return [int(ln.split("epoch: ")[1].split(",")[0]) for ln in lines if ln.startswith("epoch: ")]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_corpus")
    subprocess.run([sys.executable, str(ROOT / "data_prep/synth_corpus.py"), str(root / "corpus"), "--num_utts",
                    "30", "--sample_rate", "22050", "--no_progress"], check=True, cwd=ROOT, capture_output=True)
    subprocess.run([sys.executable, str(ROOT / "data_prep/make_manifests.py"), "--corpus", str(root / "corpus"),
                    "--format", "matcha", "--out", str(root / "man"), "--phones_tsv",
                    str(root / "corpus/phones.tsv"), "--split_by", "text", "--valid_fraction", "0.15",
                    "--test_fraction", "0.15", "--no_progress"], check=True, cwd=ROOT, capture_output=True)
    return root / "man"


def copy_manifests(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for f in ("train.csv", "valid.csv", "test.csv", "tokens.txt"):
        shutil.copy(src / f, dst / f)
    return dst


# ------------------------------------------------------------------------------------------------------------------
def test_short_run_learns_and_writes_outputs(corpus, tmp_path):
    out, sweep = tmp_path / "run", tmp_path / "sweep.csv"
    r = run_train(corpus, out, "--number_of_epochs", "6", "--lr", "0.003", "--metrics_csv", sweep,
                  "--run_id", "t1", "--max_batch_length", "12", "--average_last", "3")
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["epochs"] == 6 and logged_epochs(out) == [1, 2, 3, 4, 5, 6]
    avg = m["averaged_checkpoints"]  # the last 3 epochs averaged, scored on valid, kept only if it is the best
    assert avg["epochs"] == [4, 5, 6] and 0 <= avg["valid_PER"] <= 100
    assert avg["used"] == (avg["valid_PER"] < avg["best_epoch_valid_PER"])
    losses = m["train_loss_history"]
    assert losses[-1] < 0.6 * losses[0], losses
    assert m["valid_history"][-1]["loss"] < m["valid_history"][0]["loss"]
    assert 0.0 <= m["padding_ratio"] < 0.5 and m["test_PER"] is not None
    for f in ("hyperparams.yaml", "tokens.txt", "train_log.txt", "model_card.json", "per_test.txt"):
        assert (out / f).is_file(), f
    card = json.loads((out / "model_card.json").read_text())
    assert card["vocabulary"]["size"] == len((corpus / "tokens.txt").read_text().splitlines())
    assert card["versions"]["speechbrain"] and card["hparams"]["ctc_weight"] == 0.8

    # the sweep CSV: exact header, one filled row
    with open(sweep, newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == SWEEP_HEADER == METRICS_CSV_HEADER and len(rows) == 2
    row = dict(zip(rows[0], rows[1]))
    assert row["task"] == "phoneme_recognition" and row["run_id"] == "t1" and row["epochs"] == "6"
    assert abs(float(row["wer"]) - m["best_valid_PER"]) < 1e-3 and row["device"] == "cpu"
    for k in ("timestamp", "model", "output_dir", "train_runtime", "train_loss", "eval_loss", "learning_rate",
              "seed", "peak_memory_mb", "per_device_train_batch_size", "quant_compute_dtype"):
        assert row[k] != "", k

    # the inference API on the trained folder
    from common import model as M
    from common.frames import num_feature_frames
    from common.vocab import BOS_ID

    modules, hp, vocab = M.load_for_inference(out)
    rows = read_manifest(corpus / "test.csv")[:2]
    wavs, wav_lens = M.batch_wavs([M.load_wav(r["wav"], hp) for r in rows])
    ids = [vocab.encode(r["phn"]) for r in rows]
    toks, tok_lens = M.batch_tokens_bos(ids)
    assert toks[0, 0] == BOS_ID
    res = M.forward_scores(modules, hp, wavs, wav_lens, toks, tok_lens)
    n_frames = [num_feature_frames(int(w), 160) for w in (wav_lens * wavs.shape[1]).round()]
    assert res["ctc_logp"].shape == (2, max(n_frames), len(vocab))
    assert res["enc_lens"].tolist() == n_frames  # one encoder frame per 10 ms feature frame
    assert res["attn"].shape == (2, toks.shape[1], max(n_frames))
    assert res["token_lens"].tolist() == [len(i) for i in ids]
    assert torch.allclose(res["ctc_logp"].exp().sum(-1), torch.ones(2, max(n_frames)), atol=1e-4)
    assert torch.allclose(res["attn"][0].sum(-1), torch.ones(toks.shape[1]), atol=1e-4)
    if n_frames[1] < max(n_frames):  # no attention on padding
        assert res["attn"][1, :, n_frames[1]:].abs().max() == 0


def test_train_fraction_and_validation_samples(corpus, tmp_path):
    out = tmp_path / "part"
    r = run_train(corpus, out, "--number_of_epochs", "1", "--train_fraction", "0.5", "--validation_samples", "2",
                  "--skip_test", "True")
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["data"]["train_utts"] == round(0.5 * len(read_manifest(corpus / "train.csv")))
    assert m["data"]["valid_utts"] == 2


def test_overfit_one_batch_reaches_zero_per(corpus, tmp_path):
    out = tmp_path / "overfit"
    r = run_train(corpus, out, "--overfit_one_batch", "True", "--overfit_batch_size", "2", "--overfit_epochs",
                  "18", "--lr", "0.003", "--dropout", "0.0")
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["overfit_one_batch"] and m["data"]["train_utts"] >= 2
    assert m["best_valid_PER"] <= 5.0, m["valid_history"][-3:]
    assert m["test_PER"] is None  # sanity mode does not test
    shifts = [v["align_shift_ms"] for v in m["valid_history"]]  # the first pass's drift, one validation to the next
    assert shifts[0] is None and all(isinstance(x, float) and x >= 0 for x in shifts[1:]), shifts


def test_stop_when_the_first_pass_settles(corpus, tmp_path):
    # a threshold every shift is under: the run stops at the first epoch the rule may (min epochs, patience)
    out = tmp_path / "settle"
    r = run_train(corpus, out, "--number_of_epochs", "8", "--train_subset", "6", "--validation_samples", "2",
                  "--skip_test", "True", "--stop_align_shift_ms", "1e6", "--stop_align_max_per", "1e9",
                  "--stop_align_patience", "2", "--stop_align_min_epochs", "4")
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["epochs"] == 4 and len(m["valid_history"]) == 4, m["valid_history"]
    assert "stopping after epoch 4" in (out / "log.txt").read_text()


def test_resume_after_kill(corpus, tmp_path):
    out = tmp_path / "resume"
    args = ["--number_of_epochs", "3", "--ckpt_interval_steps", "1", "--max_batch_length", "6",
            "--lr_schedule", "cosine", "--s2s_every", "2"]
    proc = subprocess.Popen(train_cmd(corpus, out, *args), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            log = out / "train_log.txt"
            # killed mid-epoch 2, after an intra-epoch checkpoint was written
            if log.is_file() and 1 in logged_epochs(out) and any(
                "intra_epoch" in p.read_text().lower() for p in (out / "save").glob("CKPT*/CKPT.yaml")
            ):
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert logged_epochs(out)[-1] < 3
    before = max(json.loads(f.read_text())["elapsed_s"] for f in (out / "save").glob("CKPT*/train_clock.ckpt"))
    r = run_train(corpus, out, *args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert logged_epochs(out) == [1, 2, 3]  # every epoch exactly once: the counter continued
    m = json.loads((out / "metrics.json").read_text())
    assert m["resumed_from_epoch"] >= 1 and m["epochs"] == 3
    assert "intra-epoch" in (out / "log.txt").read_text() or "Loading a checkpoint" in (out / "log.txt").read_text()
    # the training clock (max_train_minutes budget, cosine progress) continued from the killed run
    after = max(json.loads(f.read_text())["elapsed_s"] for f in (out / "save").glob("CKPT*/train_clock.ckpt"))
    assert after > before > 0
    lrs = [float(ln.split("lr: ")[1].split(",")[0]) for ln in (out / "train_log.txt").read_text().splitlines()
           if ln.startswith("epoch: ")]
    assert lrs[0] > lrs[1] > lrs[2], lrs  # cosine decay, also across the resume
    seq = [float(ln.split("train seq: ")[1].split(",")[0]) for ln in (out / "train_log.txt").read_text().splitlines()
           if ln.startswith("epoch: ")]
    assert all(v > 0 for v in seq)  # s2s_every 2: the decoder still trained on every other batch


def _append(args):
    path, i = args
    append_metrics_csv(path, {"run_id": f"r{i}", "task": "phoneme_recognition", "wer": i})


def test_metrics_csv_concurrent_appends(tmp_path):
    path = tmp_path / "sweep.csv"
    with multiprocessing.get_context("fork").Pool(4) as pool:
        pool.map(_append, [(str(path), i) for i in range(16)])
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == SWEEP_HEADER and len(rows) == 17
    assert sorted(int(dict(zip(rows[0], r))["wer"]) for r in rows[1:]) == list(range(16))


# ----------------------------------------------------------------------------------------------------------- bad input
def test_empty_manifest(corpus, tmp_path):
    data = copy_manifests(corpus, tmp_path / "d")
    write_manifest(data / "train.csv", [])
    one_line_error(run_train(data, tmp_path / "o"), "train.csv", "empty")


def test_unknown_token_names_row(corpus, tmp_path):
    data = copy_manifests(corpus, tmp_path / "d")
    rows = read_manifest(data / "valid.csv")
    rows[1]["phn"] += " QQ"
    write_manifest(data / "valid.csv", rows)
    one_line_error(run_train(data, tmp_path / "o"), "valid.csv:3", rows[1]["ID"], "'QQ'")


def test_metrics_csv_with_foreign_header(corpus, tmp_path):
    bad = tmp_path / "other.csv"
    bad.write_text("a,b\n1,2\n")
    one_line_error(run_train(corpus, tmp_path / "o", "--metrics_csv", bad), "other.csv", "header")


def test_infeasible_and_nan_rows_are_skipped(corpus, tmp_path):
    data = copy_manifests(corpus, tmp_path / "d")
    rows = read_manifest(data / "train.csv")[:6]
    rows[0]["phn"] = " ".join([rows[0]["phn"]] * 40)  # far more tokens than 10 ms frames: CTC-infeasible
    nan_wav = tmp_path / "nan.wav"
    sf.write(nan_wav, np.full(16000, np.nan, dtype=np.float32), 16000, subtype="FLOAT")
    rows[1]["wav"] = str(nan_wav)
    rows[1]["duration"] = "1.0"
    write_manifest(data / "train.csv", rows)
    out = tmp_path / "o"
    r = run_train(data, out, "--number_of_epochs", "1", "--dynamic_batching", "False", "--batch_size", "1",
                  "--skip_test", "True", "--speed_perturb", "False")
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["skipped"] == {"train_ctc_infeasible": 1} and m["data"]["train_utts"] == 5
    assert m["nonfinite_batches_skipped"] == 1
    assert all(np.isfinite(m["train_loss_history"])) and np.isfinite(m["valid_history"][0]["loss"])
    assert "ctc_infeasible=1" in (out / "train_log.txt").read_text()


def test_consecutive_nan_losses_stop_with_clear_error(corpus, tmp_path):
    data = copy_manifests(corpus, tmp_path / "d")
    nan_wav = tmp_path / "nan.wav"
    sf.write(nan_wav, np.full(16000, np.nan, dtype=np.float32), 16000, subtype="FLOAT")
    rows = read_manifest(data / "train.csv")[:4]
    for row in rows:
        row["wav"], row["duration"] = str(nan_wav), "1.0"
    write_manifest(data / "train.csv", rows)
    r = run_train(data, tmp_path / "o", "--dynamic_batching", "False", "--batch_size", "1",
                  "--max_nonfinite_batches", "3", "--skip_test", "True")
    one_line_error(r, "3 consecutive", "non-finite")


def test_overfit_and_speechbrain_debug_do_not_mix(corpus, tmp_path):
    one_line_error(run_train(corpus, tmp_path / "o", "--overfit_one_batch", "True", "--debug"), "--debug")


def test_training_aids_and_best_joint(corpus, tmp_path):
    # every AuxiliaryASR training aid on (loss aids after epoch 1); each validation logs the best_joint terms, the
    # run keeps the best checkpoint by the joint score beside the best by PER, and the export loads it when asked
    import yaml

    from common import train_aids as AIDS

    out = tmp_path / "aids"
    r = run_train(corpus, out, "--number_of_epochs", "3", "--train_subset", "12", "--validation_samples", "4",
                  "--skip_test", "True", "--mixup", "True", "--mixup_prob", "1.0", "--phoneme_dropout", "0.1",
                  "--frame_dropout", "0.05", "--vtlp", "True", "--adaptive_masking", "True", "--ctc_blank_bias", "0.06",
                  "--ctc_temperature", "1.1", "--ctc_aids_warmup_epochs", "1", "--blank_rate", "True",
                  "--coverage", "True", "--ctc_entropy_weight", "0.02", "--attn_duration", "True",
                  "--attn_duration_warmup_epochs", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [ln for ln in (out / "train_log.txt").read_text().splitlines() if ln.startswith("epoch: ")]
    aids = ("train blank_rate", "train coverage", "train entropy", "train attn_duration")
    assert not any(a in lines[0] for a in aids) and all(a in lines[1] and a in lines[2] for a in aids), lines
    m = json.loads((out / "metrics.json").read_text())
    assert m["train_loss_history"][-1] < m["train_loss_history"][0]
    for v in m["valid_history"]:
        assert 0 <= v["diagonality"] <= 1 and isinstance(v["ctc_length_gap"], float), v
        assert v["joint"] == pytest.approx(AIDS.joint_score(v["PER"], v["diagonality"], v["ctc_length_gap"], 0.3, 0.3,
                                                            4.0), abs=1e-3)
    metas = {p.parent.resolve(): yaml.safe_load(p.read_text()) for p in (out / "save").glob("CKPT+*/CKPT.yaml")}
    best = {"joint": min(v["joint"] for v in m["valid_history"]), "PER": min(v["PER"] for v in m["valid_history"])}
    for key, value in best.items():  # the best of each kept (ties: any epoch with that value)
        assert any(meta[key] == pytest.approx(value, abs=1e-4) for meta in metas.values()), (key, metas)
    # the export with --checkpoint joint: a copy of the corpus (the export writes into it)
    src, dst = corpus.parent / "corpus", tmp_path / "corpus"
    dst.mkdir()
    (dst / "wavs").symlink_to(src / "wavs")
    shutil.copy(src / "metadata.csv", dst / "metadata.csv")

    def export(run, *extra):
        return subprocess.run([sys.executable, str(ROOT / "align/export_durations.py"), "--corpus", str(dst),
                               "--model_dir", str(run), "--no_mels", "--device", "cpu", "--no_progress", *extra],
                              capture_output=True, text=True, cwd=ROOT, timeout=300)

    for pick, key in (("joint", "joint"), ("per", "PER")):
        r = export(out, "--checkpoint", pick, "--no_refine", "--limit", "3", "--overwrite")
        assert r.returncode == 0, r.stderr[-3000:]
        report = json.loads((dst / "durations/export_report.json").read_text())
        loaded = Path(report["checkpoint"]).resolve()
        assert metas[loaded][key] == pytest.approx(best[key], abs=1e-4) and report["options"]["checkpoint"] == pick
    # a run without joint scores: the export says so in one line
    r = subprocess.run(train_cmd(corpus, tmp_path / "nojoint", "--number_of_epochs", "1", "--train_subset", "4",
                                 "--validation_samples", "2", "--skip_test", "True", "--keep_best_joint", "False"),
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    one_line_error(export(tmp_path / "nojoint", "--checkpoint", "joint", "--limit", "2"), "--checkpoint joint",
                   "use --checkpoint per")
