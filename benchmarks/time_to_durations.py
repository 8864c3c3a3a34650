#!/usr/bin/env python3
"""Wall time from a corpus to Matcha durations, the way a user runs it (recipes/pipeline.py with the defaults).

    python benchmarks/time_to_durations.py [--work /tmp/ttd] [--baseline] [--phones festival|ipa] [--threads 2]

1. builds the corpus the competitor was timed on: 180 festival utterances, 3 voices x the same 60 sentences, three
   speaking rates (0.85 / 1.0 / 1.2), 22050 Hz (data_prep/synth_corpus.py; the sentences are the second half of our
   list, which the tests do not use);
2. runs the pipeline's stages 0 manifests, 1 train, 3 export, 4 evaluate with the defaults (``--phones festival``:
   the manifests take festival's phones, as MFA was given a dictionary; ``ipa``: espeak-ng IPA, scored by
   edit-distance pairing), timing each stage;
3. with ``--baseline``, runs the same path again with the settings pinned in ``BASELINE`` (the defaults before the
   speed work) in the same call, on the same machine state;
4. prints one table: stage seconds, total, boundary error (mean, median, % within 20 ms), the total's ratio to
   MFA 3.4's recorded 494 s (train + align on this kind of corpus, 2 cores) and to the baseline.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.pipeline import Pipeline  # noqa: E402

MFA_SECONDS = 494.0  # MFA 3.4 train + align on a corpus of this kind, 2 cores (docs/design.md)
MFA_BOUNDARIES = (11.5, 85.5)  # its mean |error| (ms) and % within 20 ms there
# the defaults before the speed work (hparams/phoneme.yaml and hparams/export.yaml as of that commit)
BASELINE = {"train": ["--number_of_epochs", "30", "--stop_align_shift_ms", "0", "--warmup_steps", "0",
                       "--ctc_blank_prior", "0"], "export": []}


def build_corpus(work: Path) -> Path:
    corpus = work / "corpus"
    if (corpus / "phones.tsv").is_file():
        return corpus
    lines = (ROOT / "data_prep/sentences/en.txt").read_text(encoding="utf-8").splitlines()
    sentences = work / "sentences60.txt"
    sentences.write_text("\n".join(lines[len(lines) // 2:][:60]) + "\n", encoding="utf-8")
    subprocess.run([sys.executable, str(ROOT / "data_prep/synth_corpus.py"), str(corpus), "--num_utts", "180",
                    "--sentences", str(sentences), "--sample_rate", "22050", "--rates", "0.85,1.0,1.2",
                    "--seed", "11", "--no_progress", "--overwrite"], check=True, cwd=ROOT)
    return corpus


def run_path(name: str, corpus_src: Path, work: Path, phones: str, threads: int, train: list, export: list) -> dict:
    """One user path in WORK/<name> (its own copy of the corpus, so the exports do not share files)."""
    base = work / name
    if base.exists():
        shutil.rmtree(base)
    corpus = base / "corpus"
    shutil.copytree(corpus_src, corpus)
    prep = ["--split_by", "text", "--no_progress"] + (["--phones_tsv", str(corpus / "phones.tsv")]
                                                     if phones == "festival" else [])
    pipe = Pipeline(corpus, base, prep=prep, train=["--noprogressbar", "--num_threads", str(threads), *train],
                    export=["--no_mels", "--no_progress", "--device", "cpu", *export],
                    reference=corpus / "phones.tsv", quiet=True)
    times = {s: pipe.run_stage(s) for s in ("manifests", "train", "export", "evaluate")}
    rep = json.loads(pipe.boundary_report.read_text())["overall"]
    metrics = json.loads((pipe.model / "metrics.json").read_text())
    return {"seconds": {k: round(v, 1) for k, v in times.items() if v is not None},
            "total": round(sum(v for k, v in times.items() if v is not None and k != "evaluate"), 1),
            "mean_ms": rep["mean_ms"], "median_ms": rep["median_ms"], "within_20ms": rep["within_20ms"],
            "epochs": metrics["epochs"], "valid_PER": metrics["best_valid_PER"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/time_to_durations"))
    ap.add_argument("--baseline", action="store_true", help="also run the pinned pre-speed-work settings")
    ap.add_argument("--phones", choices=("festival", "ipa"), default="festival")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the training (the machine's cores)")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    corpus = build_corpus(a.work)
    rows = {"defaults": run_path("defaults", corpus, a.work, a.phones, a.threads, [], [])}
    if a.baseline:
        rows["baseline (pinned)"] = run_path("baseline", corpus, a.work, a.phones, a.threads, BASELINE["train"],
                                             BASELINE["export"])
    (a.work / "time_to_durations.json").write_text(json.dumps(rows, indent=2))
    base = rows.get("baseline (pinned)")
    print(f"\n{'path':<20}{'manifests':>10}{'train':>8}{'export':>8}{'total s':>9}{'epochs':>7}{'mean ms':>9}"
          f"{'median':>8}{'<=20 ms':>9}{'vs MFA':>8}{'vs base':>8}")
    for name, r in rows.items():
        s = r["seconds"]
        print(f"{name:<20}{s.get('manifests', 0):>10.1f}{s.get('train', 0):>8.1f}{s.get('export', 0):>8.1f}"
              f"{r['total']:>9.1f}{r['epochs']:>7}{r['mean_ms']:>9.2f}{r['median_ms']:>8.2f}{r['within_20ms']:>8.1f}%"
              f"{MFA_SECONDS / r['total']:>7.2f}x" + (f"{base['total'] / r['total']:>7.2f}x" if base else ""))
    print(f"{'MFA 3.4 (recorded)':<20}{'':>35}{MFA_SECONDS:>9.1f}{'':>7}{MFA_BOUNDARIES[0]:>9.2f}{'':>8}"
          f"{MFA_BOUNDARIES[1]:>8.1f}%")
    print("targets: total <= 120 s (4x faster than MFA) with boundaries no worse than the baseline's")
    return 0


if __name__ == "__main__":
    sys.exit(main())
