#!/usr/bin/env python3
"""Boundary accuracy by unit type (``make_manifests.py --tokenizer_type``): festival phones vs characters vs
SentencePiece pieces, on a fresh built-in corpus, every boundary scored against festival's phone times.

    python benchmarks/units_accuracy.py [--work /tmp/units_accuracy] [--num_utts 150] [--epochs 8]

1. synthesize a festival corpus (as benchmarks/accuracy.py: its own seed, the second half of the sentence list);
2. per unit type (festival phones, espeak-ng IPA phonemes, characters, pieces), manifests (test split = sentences
   never seen in training) and a training run (the recipe's
   defaults, ``--number_of_epochs``); the test error rate over its units (PER, CER, piece error rate);
3. export every row (the first pass alone, ``--no_refine``, then the default with refinement) and score the
   durations against festival's phones: the same sequence one to one (festival phones), otherwise paired by edit
   distance (``common/boundary_eval.py``: characters are letters, not phones, so only the boundaries whose two sides
   pair with two consecutive reference phones count: ``scored`` of ``ref_boundaries``).

Prints one table and writes ``WORK/units_accuracy.json``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.accuracy import export, score, sh  # noqa: E402
from common.corpus import read_phones_tsv  # noqa: E402
from common.pipeline import Pipeline  # noqa: E402


def split_rule_cost(w: Path, ref: dict) -> dict:
    """What the even split of a piece's span costs by itself: the char run's refined character ends, grouped into
    the spm run's pieces and each piece's span re-divided evenly, both scored on the alignment ends."""
    import numpy as np

    from common import units as U
    from common.boundary_eval import collapse_spans, evaluate, spans_from_ends
    from common.durations import read_alignments

    sp = U.SpmTokenizer(w / "spm" / "model" / U.SPM_FILE)
    al = read_alignments(w / "corpus_char" / "durations" / "alignments.jsonl")
    text = {ln.split("|")[0]: U.basic_cleaner(ln.split("|")[3])
            for ln in (w / "corpus" / "metadata.csv").read_text(encoding="utf-8").splitlines()}
    base, even = {}, {}
    for rel, a in al.items():
        units, ends = a["aligned_tokens"], np.array(a["aligned_ends_s"])
        base[rel] = collapse_spans(spans_from_ends(units, ends))
        _, owner = U.symbols_of_pieces(sp.encode(text[rel]))
        off, e, owner = (1 if units[0] == "pau" else 0), ends.copy(), np.asarray(owner)
        for k in np.unique(owner):
            idx = np.flatnonzero(owner == k) + off
            start = ends[idx[0] - 1] if idx[0] > 0 else 0.0
            e[idx] = start + (ends[idx[-1]] - start) * np.arange(1, len(idx) + 1) / len(idx)
        even[rel] = collapse_spans(spans_from_ends(units, e))
    return {name: evaluate({r: ref[r] for r in h}, h)[0]["overall"]
            for name, h in (("char refined, alignment ends", base), ("the same, pieces re-split evenly", even))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/units_accuracy"))
    ap.add_argument("--num_utts", type=int, default=150)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--spm_vocab_size", type=int, default=100)
    ap.add_argument("--units", default="phones,ipa,char,spm",
                    help="which to run: phones (festival's, --phones_tsv), ipa (espeak-ng G2P), char, spm")
    ap.add_argument("--train", default="", help="extra training arguments, e.g. '--num_threads 1'")
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
    preps = {"phones": ["--phones_tsv", corpus / "phones.tsv"], "ipa": [], "char": ["--tokenizer_type", "char"],
             "spm": ["--tokenizer_type", "spm", "--spm_vocab_size", a.spm_vocab_size]}
    out = w / "units_accuracy.json"
    old = json.loads(out.read_text()) if out.is_file() else {}  # earlier runs' rows (other --units) are kept
    timing = old.pop("timing_sec", {})
    results = old
    for name in a.units.split(","):
        pipe = Pipeline(corpus, w / name, train=["--noprogressbar", "--number_of_epochs", str(a.epochs),
                                                 *a.train.split()],
                        prep=["--split_by", "text", "--valid_fraction", "0.08", "--test_fraction", "0.12", "--seed",
                              str(a.seed), "--no_progress", *map(str, preps[name])])
        timing.update({f"{stage} {name}": s for stage, s in pipe.run(0, 1).items()})
        m = json.loads((pipe.model / "metrics.json").read_text())
        results[f"{name}: test {m['units']['error_rate']} (greedy, held-out sentences)"] = {
            "test": m["test_PER"], "test_beam": m.get("test_PER_beam"), "train_utts": m["data"].get("train_utts")}
        c = w / f"corpus_{name}"
        if not c.exists():
            shutil.copytree(corpus, c, ignore=shutil.ignore_patterns("durations", "textgrids"))
        for kind, extra in (("first pass", ["--no_refine"]), ("default (refined)", [])):
            t = time.time()
            export(c, pipe.model, *extra)
            timing[f"export {name} {kind}"] = round(time.time() - t, 1)
            results[f"{name}, {kind}: durations vs festival phones"] = score(ref, c)
        (w / "units_accuracy.json").write_text(json.dumps({**results, "timing_sec": timing}, indent=2))
    if (w / "corpus_char" / "durations").is_dir() and (w / "spm" / "model").is_dir():
        for k, v in split_rule_cost(w, ref).items():
            results[f"split rule: {k}"] = {**v, "scored": v["n"], "ref_boundaries": "-"}
        out.write_text(json.dumps({**results, "timing_sec": timing}, indent=2))
    print(f"\n{'setting':<62}{'scored':>12}{'mean':>8}{'median':>8}{'<=20':>7}{'<=50':>7}")
    for k, v in results.items():
        if "mean_ms" in v:
            print(f"{k:<62}{str(v['scored']) + '/' + str(v['ref_boundaries']):>12}{v['mean_ms']:>8.2f}"
                  f"{v['median_ms']:>8.2f}{v['within_20ms']:>7.1f}{v['within_50ms']:>7.1f}")
        else:
            print(f"{k:<62}{json.dumps(v)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
