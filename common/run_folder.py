"""The training run folder is the contract between the stages: what ``recipes/train.py`` writes into its
``output_folder`` is all that decoding and the export read (besides the corpus they work on).

    <run>/hyperparams.yaml   the training yaml with the command-line overrides baked in (SpeechBrain)
    <run>/tokens.txt         the model vocabulary (copied from the manifests)
    <run>/phonemes.json      how the transcripts became tokens: the G2P / symbol table / phones.tsv and the
                             data-prep options (from the manifests' prep_report.json)
    <run>/phones.tsv         a copy of the phones.tsv the manifests took their phones from, when they did
    <run>/spm.model          the SentencePiece model of --tokenizer_type spm manifests (phonemes.json: "units")
    <run>/train_phonemes.txt the training transcripts' tokens, one row a line (decode.py's phone LM is fitted on it)
    <run>/save/              checkpoints (the best by valid PER and the latest); lora.json for adapter-only runs

A run folder can be moved or copied to another machine: nothing in it points back at the manifests.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from common.io import UserError, atomic_write, read_manifest, write_json

HPARAMS_FILE = "hyperparams.yaml"
TOKENS_FILE = "tokens.txt"
PHONEMES_FILE = "phonemes.json"
PHONES_TSV_FILE = "phones.tsv"
TRAIN_PHONEMES_FILE = "train_phonemes.txt"
LORA_FILE = "lora.json"  # adapters-only runs: LoRA settings + the base model's checkpoint folder
PREP_REPORT = "prep_report.json"  # written by data_prep/make_manifests.py


def save_phoneme_source(run: Path, data_folder: Path) -> dict:
    """Write ``phonemes.json`` (and the ``phones.tsv`` copy) from the manifests' ``prep_report.json``. Manifests
    written by hand (no report) record the default G2P (espeak-ng through phonemizer)."""
    run, data_folder = Path(run), Path(data_folder)
    report = data_folder / PREP_REPORT
    prep = json.loads(report.read_text(encoding="utf-8")) if report.is_file() else {}
    opts = prep.get("options", {})
    source = {"g2p": opts.get("g2p"), "symbols": opts.get("symbols"), "phones_tsv": None,
              "language": opts.get("language"), "phoneme_source": prep.get("phoneme_source", "espeak"),
              "manifests": str(data_folder.resolve()), "prep_options": opts,
              "units": opts.get("tokenizer_type") or "phoneme", "spm_model": None}
    if source["units"] == "spm":  # common/units.py: the pieces' model goes with the run
        from common.units import SPM_FILE

        if not (data_folder / SPM_FILE).is_file():
            raise UserError(f"{data_folder / SPM_FILE} not found: the manifests are SentencePiece units "
                            f"(--tokenizer_type spm) but their model is gone; re-run make_manifests.py")
        shutil.copyfile(data_folder / SPM_FILE, run / SPM_FILE)
        source["spm_model"] = SPM_FILE
    if opts.get("phones_tsv"):
        src = Path(opts["phones_tsv"])  # make_manifests.py records it as an absolute path
        if not src.is_file():
            raise UserError(f"{report}: the manifests took their phones from {src}, which is gone; the export needs "
                            f"it: put it back or re-run make_manifests.py")
        shutil.copyfile(src, run / PHONES_TSV_FILE)
        source["phones_tsv"] = PHONES_TSV_FILE
    write_json(run / PHONEMES_FILE, source)
    return source


def load_phoneme_source(run: Path) -> dict:
    """``phonemes.json`` of a run, with ``phones_tsv`` as a path (None when the run used a G2P)."""
    run = Path(run)
    path = run / PHONEMES_FILE
    if not path.is_file():
        raise UserError(f"{path} not found: {run} was trained before run folders recorded their phonemes; give "
                        f"--g2p/--symbols/--phones_tsv, or retrain")
    src = json.loads(path.read_text(encoding="utf-8"))
    if src.get("phones_tsv"):
        src["phones_tsv"] = run / src["phones_tsv"]
    return src


def save_train_phonemes(run: Path, train_csv: Path) -> None:
    """The training split's token rows (the phone LM's training text)."""
    with atomic_write(Path(run) / TRAIN_PHONEMES_FILE) as fh:
        for r in read_manifest(train_csv):
            if (r.get("phn") or "").strip():
                fh.write(r["phn"].strip() + "\n")


def train_phonemes(run: Path) -> list[str]:
    path = Path(run) / TRAIN_PHONEMES_FILE
    if not path.is_file():
        raise UserError(f"{path} not found (a run folder from an older version); pass --lm_train_csv or "
                        f"--lm_weight 0")
    return [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]


def prepare(hparams_file, overrides, hparams) -> None:
    """Start (or continue) a run folder: SpeechBrain's experiment directory (``hyperparams.yaml`` with the
    overrides baked in, ``env.log``), ``tokens.txt``, the phoneme source and the training transcripts. A folder
    whose checkpoints were trained with another vocabulary is refused."""
    import speechbrain as sb

    out = Path(hparams["output_folder"])
    sb.create_experiment_directory(experiment_directory=str(out), hyperparams_to_save=hparams_file,
                                   overrides=overrides)
    # SpeechBrain's log file takes DEBUG records: numba's compiler writes ~20,000 of them (seconds) on a first run
    logging.getLogger("numba").setLevel(logging.WARNING)
    src, dst = Path(hparams["tokens_file"]), out / TOKENS_FILE
    if dst.is_file() and dst.read_text(encoding="utf-8") != src.read_text(encoding="utf-8") \
            and any((out / "save").glob("CKPT*")):
        raise UserError(f"{dst} differs from {src}: this output_folder was trained with another vocabulary; use a "
                        f"new --output_folder")
    dst.write_bytes(src.read_bytes())
    save_phoneme_source(out, Path(hparams["data_folder"]))
    save_train_phonemes(out, Path(hparams["train_csv"]))
