#!/usr/bin/env python3
"""Phone-boundary accuracy on a fresh built-in corpus, the way a user aligns their own corpus.

    python benchmarks/accuracy.py [--work /tmp/accuracy] [--num_utts 300] [--epochs N] [--skip_ipa]

1. synthesize a festival corpus (its own seed, and the second half of our sentence list: the tests use the first)
2. manifests with ``--phones_tsv`` (festival phones; test split = sentences never seen in training), train
   (stages 0-1 of ``recipes/pipeline.py``, in WORK/phones; the IPA run in WORK/ipa)
3. export durations for every row (+ TextGrids): the first pass alone with each score kind (ctc / attention /
   joint) and with / without CTC anchoring, the neural refinement alone (common/refine.py, ``--hmm_weight 0``),
   then the default (joint + neural refinement + HMM-GMM pass, common/hmm.py); evaluate against festival's phone
   times: all rows, and held-out sentences only
   + the competitor: a monophone HMM-GMM aligner (MFA's first stage) trained on the same corpus from a flat start
   (benchmarks/hmm_gmm.py)
   + calibration (semi-supervised, align/calibrate.py): the reference times of N random rows (``--calib``) teach
   the labelling convention; the default export with it, scored on the other rows; and ``--labelled`` (the same
   rows also train the refiner, then calibrate, in one export)
4. corpus cleaning: export with K transcripts swapped between utterances and check that the flagged utterances
   (export_report.json) are the ones with large boundary errors
5. the espeak-IPA path (G2P instead of --phones_tsv): train, export, evaluate (paired by edit distance)

Prints one table (mean / median |error| ms, % within 10/20/25/50 ms) and writes ``WORK/accuracy.json``.
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.hmm_gmm import align_flat_start  # noqa: E402
from common.pipeline import Pipeline  # noqa: E402
from common.boundary_eval import collapse_spans, evaluate, hyp_segments, spans_from_ends  # noqa: E402
from common.textgrid import read_textgrid  # noqa: E402
from common.corpus import read_phones_tsv  # noqa: E402
from common.durations import read_alignments  # noqa: E402


def sh(*cmd) -> None:
    print("+", " ".join(map(str, cmd)), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, cwd=ROOT)


def score(ref: dict, corpus: Path, ids=None, textgrids: bool = False) -> dict:
    al = read_alignments(corpus / "durations" / "alignments.jsonl")
    ids = sorted(set(ids or al) & set(al))
    if textgrids:
        hyps = {r: collapse_spans(read_textgrid(corpus / "textgrids" / f"{r}.TextGrid")) for r in ids}  # as evaluate.py
    else:
        hyps = {r: hyp_segments(al[r]["tokens"], al[r]["durations"], al[r]["sample_rate"], al[r]["hop_length"])
                for r in ids}
    return summary(evaluate({r: ref[r] for r in ids}, hyps)[0])


def summary(rep: dict) -> dict:
    """The figures a row of the table needs from a ``common.boundary_eval.evaluate`` report."""
    return {**rep["overall"], "speech_silence_mean_ms": rep["by_edge"].get("speech-silence", {}).get("mean_ms"),
            "one_to_one": rep["one_to_one_utterances"], "utts": rep["utterances"],
            "scored": rep["scored_boundaries"], "ref_boundaries": rep["reference_boundaries"]}


def export(corpus: Path, model: Path, *args) -> float:
    t = time.time()
    sh(sys.executable, "align/export_durations.py", "--corpus", corpus, "--model_dir", model, "--no_mels",
       "--overwrite", "--textgrid", "--no_progress", *args)
    return time.time() - t


def per_of(metrics: dict) -> dict:
    """Test PER of a training run (held-out sentences): CTC greedy and the attention beam search with CTC scores."""
    return {"test_PER": metrics["test_PER"], "test_PER_beam": metrics.get("test_PER_beam")}


def ids_of(csv: Path) -> list[str]:
    return [ln.split(",")[0] for ln in csv.read_text(encoding="utf-8").splitlines()[1:]]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/accuracy"))
    ap.add_argument("--num_utts", type=int, default=300)
    ap.add_argument("--epochs", type=int, help="training epochs (default: hparams/phoneme.yaml)")
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--swap", type=int, default=6, help="transcripts swapped for the corpus-cleaning check")
    ap.add_argument("--skip_ipa", action="store_true", help="skip the espeak-IPA training")
    ap.add_argument("--calib", default="25,100",
                    help="labelled-row counts for the calibration rows (align/calibrate.py); '' = skip")
    a = ap.parse_args()
    w = a.work
    w.mkdir(parents=True, exist_ok=True)
    lines = (ROOT / "data_prep/sentences/en.txt").read_text(encoding="utf-8").splitlines()
    sent = w / "sentences.txt"
    sent.write_text("\n".join(lines[len(lines) // 2:]) + "\n", encoding="utf-8")
    corpus = w / "corpus"
    if not (corpus / "phones.tsv").is_file():
        sh(sys.executable, "data_prep/synth_corpus.py", corpus, "--num_utts", a.num_utts, "--sample_rate", 22050,
           "--seed", a.seed, "--sentences", sent, "--no_progress", "--overwrite")
    ref = read_phones_tsv(corpus / "phones.tsv")
    epochs = ["--number_of_epochs", a.epochs] if a.epochs else []
    results, timing = {}, {}

    def train(name: str, *prep) -> tuple[Path, Path, dict]:
        """Stages 0-1 of the pipeline (manifests, training) in WORK/<name>; skipped when already done."""
        pipe = Pipeline(corpus, w / name, train=["--noprogressbar", *map(str, epochs)],
                        prep=["--split_by", "text", "--valid_fraction", "0.08", "--test_fraction", "0.12", "--seed",
                              str(a.seed), "--no_progress", *map(str, prep)])
        timing.update({f"{stage} {name}": s for stage, s in pipe.run(0, 1).items()})
        return pipe.manifests, pipe.model, json.loads((pipe.model / "metrics.json").read_text())

    man, model, m = train("phones", "--phones_tsv", corpus / "phones.tsv")
    results["PER festival phones (held-out sentences)"] = per_of(m)
    held_out = ids_of(man / "test.csv")
    first_pass = ["--no_refine"]
    for kind, extra in (("ctc", ["--scores", "ctc", *first_pass]),
                        ("ctc, no anchoring", ["--scores", "ctc", "--no_anchor", *first_pass]),
                        ("attention", ["--scores", "attention", *first_pass]),
                        ("joint", ["--scores", "joint", *first_pass]),
                        ("joint + neural refinement only", ["--hmm_weight", 0]),
                        ("joint + refinement (default)", [])):
        timing[f"export {kind}"] = round(export(corpus, model, *extra), 1)
        results[f"{kind}: durations, all rows"] = score(ref, corpus)
        results[f"{kind}: durations, held-out sentences"] = score(ref, corpus, held_out)
        results[f"{kind}: TextGrids, all rows"] = score(ref, corpus, textgrids=True)

    # the competitor: HMM-GMM (monophone, flat start) on the same audio and phone transcripts
    rels = sorted(ref)
    t = time.time()
    hmm_ends, _ = align_flat_start([corpus / "wavs" / f"{r}.wav" for r in rels], [ref[r][0] for r in rels], log=None)
    timing["HMM-GMM flat start"] = round(time.time() - t, 1)
    hyps = {r: collapse_spans(spans_from_ends(ref[r][0], e)) for r, e in zip(rels, hmm_ends) if e is not None}
    for name, ids in (("all rows", rels), ("held-out sentences", held_out)):
        kept = [r for r in ids if r in hyps]
        results[f"HMM-GMM monophone, flat start (MFA-like competitor): {name}"] = summary(
            evaluate({r: ref[r] for r in kept}, {r: hyps[r] for r in kept})[0])

    # calibration (semi-supervised): N labelled rows (reference times) teach the labelling convention; every row
    # is re-exported with it and scored on the rows nobody labelled, against the uncalibrated default on those rows
    rows = sorted(ref)
    tsv_lines = {ln.split("\t", 1)[0]: ln for ln in (corpus / "phones.tsv").read_text(encoding="utf-8").splitlines()}
    rng_c, fitted = random.Random(a.seed + 1), []
    for n in [int(x) for x in a.calib.split(",") if x.strip()]:
        if not 0 < n < len(rows):
            print(f"--calib {n}: needs 0 < N < {len(rows)} rows; skipped")
            continue
        labelled = set(rng_c.sample(rows, n))
        tsv, cal = w / f"phones_labelled_{n}.tsv", w / f"calibration_{n}.json"
        tsv.write_text("".join(tsv_lines[r] + "\n" for r in sorted(labelled)), encoding="utf-8")
        sh(sys.executable, "align/calibrate.py", "--durations", corpus / "durations", "--reference", tsv, "--out", cal)
        others = [r for r in rows if r not in labelled]
        results[f"default, rows not labelled ({n} labelled)"] = score(ref, corpus, others)
        fitted.append((n, tsv, cal, others, [r for r in held_out if r not in labelled]))
    for n, tsv, cal, others, held in fitted:
        timing[f"export calibrated ({n})"] = round(export(corpus, model, "--calibration", cal), 1)
        results[f"default + calibration ({n} labelled): durations, other rows"] = score(ref, corpus, others)
        results[f"default + calibration ({n} labelled): durations, other held-out sentences"] = score(ref, corpus, held)
        results[f"default + calibration ({n} labelled): TextGrids, other rows"] = score(ref, corpus, others, True)
        # --labelled: the same rows also train the refiner (semi-supervised), then calibrate, in one export
        t = export(corpus, model, "--labelled", tsv)
        timing[f"export --labelled ({n})"] = round(t, 1)
        results[f"--labelled ({n} rows): durations, other rows"] = score(ref, corpus, others)
        results[f"--labelled ({n} rows): durations, other held-out sentences"] = score(ref, corpus, held)
        results[f"--labelled ({n} rows): TextGrids, other rows"] = score(ref, corpus, others, True)

    # corpus cleaning: swap K phone transcripts, export, see what is flagged
    rng = random.Random(a.seed)
    swapped = rng.sample(rows, a.swap)
    bad_tsv = w / "phones_swapped.tsv"
    perm = swapped[1:] + swapped[:1]
    src = {r: s for r, s in zip(swapped, perm)}
    with open(bad_tsv, "w", encoding="utf-8") as fh:
        for r in rows:
            ph, ends = ref[src.get(r, r)]
            fh.write(f"{r}\t{' '.join(ph)}\t{' '.join(f'{e:.5f}' for e in ends)}\n")
    dirty = w / "corpus_dirty"
    if not dirty.exists():
        import shutil

        shutil.copytree(corpus, dirty, ignore=shutil.ignore_patterns("durations", "textgrids"))
    export(dirty, model, "--phones_tsv", bad_tsv)
    rep = json.loads((dirty / "durations" / "export_report.json").read_text())
    flagged = set(rep["flagged"])
    conf = {r: u["confidence"] for r, u in rep["utterances"].items()}
    lowest = sorted(conf, key=conf.get)[: a.swap]
    clean_rows = [r for r in rows if r not in swapped]
    results["cleaning"] = {
        "swapped": len(swapped), "flagged": len(flagged), "swapped_and_flagged": len(flagged & set(swapped)),
        "swapped_among_lowest_confidence": len(set(lowest) & set(swapped)),
        "mean_confidence_swapped": round(sum(conf[r] for r in swapped) / len(swapped), 3),
        "mean_confidence_clean": round(sum(conf[r] for r in clean_rows) / len(clean_rows), 3),
        "flagged_clean_rows": sorted(flagged - set(swapped))[:10],
    }

    if not a.skip_ipa:
        _, model_i, m = train("ipa")
        results["PER espeak IPA (held-out sentences)"] = per_of(m)
        ipa_corpus = w / "corpus_ipa"
        if not ipa_corpus.exists():
            import shutil

            shutil.copytree(corpus, ipa_corpus, ignore=shutil.ignore_patterns("durations", "textgrids"))
        timing["export ipa"] = round(export(ipa_corpus, model_i), 1)
        results["espeak IPA: durations, all rows (edit-distance pairing)"] = score(ref, ipa_corpus)
        results["espeak IPA: TextGrids, all rows"] = score(ref, ipa_corpus, textgrids=True)
        if fitted:  # calibration works across phone sets: IPA boundaries paired with festival's by edit distance
            n, tsv, _, others, _ = fitted[-1]
            cal = w / f"calibration_ipa_{n}.json"
            sh(sys.executable, "align/calibrate.py", "--durations", ipa_corpus / "durations", "--reference", tsv,
               "--out", cal)
            results[f"espeak IPA, rows not labelled ({n} labelled)"] = score(ref, ipa_corpus, others)
            results[f"espeak IPA, rows not labelled ({n} labelled): TextGrids"] = score(ref, ipa_corpus, others, True)
            timing[f"export ipa calibrated ({n})"] = round(export(ipa_corpus, model_i, "--calibration", cal), 1)
            results[f"espeak IPA + calibration ({n} labelled): durations, other rows"] = score(ref, ipa_corpus, others)
            results[f"espeak IPA + calibration ({n} labelled): TextGrids, other rows"] = score(ref, ipa_corpus,
                                                                                               others, True)

    results["timing_sec"] = timing
    (w / "accuracy.json").write_text(json.dumps(results, indent=2))
    print(f"\n{'setting':<58}{'n':>6}{'mean':>8}{'median':>8}{'<=10':>7}{'<=20':>7}{'<=25':>7}{'<=50':>7}{'sp/sil':>8}")
    for k, v in results.items():
        if "mean_ms" in v:
            print(f"{k:<58}{v['n']:>6}{v['mean_ms']:>8.2f}{v['median_ms']:>8.2f}{v['within_10ms']:>7.1f}"
                  f"{v['within_20ms']:>7.1f}{v['within_25ms']:>7.1f}{v['within_50ms']:>7.1f}"
                  + (f"{v['speech_silence_mean_ms']:>8.1f}" if v.get("speech_silence_mean_ms") is not None else
                     f"{'-':>8}"))
        else:
            print(f"{k:<58}{json.dumps(v)}")
    print("targets: mean <= 6 ms, >= 97 % within 20 ms (festival phones), PER <= 3 %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
