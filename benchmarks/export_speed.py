#!/usr/bin/env python3
"""Export throughput: seconds of audio aligned per second of wall time, end to end.

    python benchmarks/export_speed.py --corpus DIR --model_dir RUN [--device cpu|cuda] [--repeat 2]

Runs ``common.export.export_corpus`` (audio load, features, model, CTC anchoring, MAS, Matcha frames, writing)
on the corpus, in-process after one warm-up run (imports, numba compilation; each timed run loads the model), and prints
real-time factors for the configurations that matter: CTC scores (no attention decoder), joint scores (the
decoder runs too), batch sizes, fp32 against ``--precision auto`` (bf16 where the CPU/GPU has it; all first pass
only, ``--no_refine``), the neural refinement alone
(``--hmm_weight 0``: it trains a frame classifier on the corpus) and the default (the refinement plus the two
HMM-GMM passes: the accuracy mode) twice: a corpus' first export, which trains the refiner and stores it in
``CORPUS/durations/refiner.ckpt``, and the next ones, which align with it (the stored refiner is trained once
here beforehand, untimed, with ``--fit_refiner``; their first pass scores CTC alone, ``--light_first_pass``, and
once more with the joint scores for comparison). The baseline in the same run is the per-utterance loop
(``--batch_seconds`` of one utterance, fp32), so the ratio shows what batching and bf16 buy on this machine;
the header names the precision ``auto`` resolved to.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.export import export_corpus, load_options  # noqa: E402


def run(corpus: Path, model: Path, device: str, fit: bool = False, refiner: Path | None = None, **kw) -> dict:
    """One export of a fresh copy of the corpus (``refiner``: with that refiner.ckpt stored in it, as an earlier
    export of the corpus leaves it; ``fit``: ``--fit_refiner``)."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "corpus"
        shutil.copytree(corpus, work, ignore=shutil.ignore_patterns("durations", "textgrids", "mels"))
        if refiner is not None:
            (work / "durations").mkdir()
            shutil.copy(refiner, work / "durations" / "refiner.ckpt")
        t = time.time()
        rep = export_corpus(load_options(dict(corpus=work, model_dir=model, device=device, no_mels=True,
                                              progress=False, **kw)), fit_refiner=fit)
        rep["wall"] = time.time() - t
        rep["audio_seconds"] = rep["timing"].get("audio_seconds")
        return rep


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, required=True)
    ap.add_argument("--model_dir", type=Path, required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=2)
    a = ap.parse_args()
    run(a.corpus, a.model_dir, a.device, limit=min(a.limit or 8, 8))  # warm-up: imports, numba compile
    first = dict(refine=False)
    fp32 = dict(precision="fp32")
    # the refiner a first export of the corpus trains and stores (--fit_refiner: the same, untimed, once)
    keep = tempfile.TemporaryDirectory()
    stored = Path(keep.name) / "refiner.ckpt"
    run(a.corpus, a.model_dir, a.device, fit=True, limit=a.limit, refiner_model=str(stored))
    run(a.corpus, a.model_dir, a.device, limit=min(a.limit or 8, 8), refiner=stored)  # its warm-up
    configs = [("per-utterance, ctc, fp32 (baseline)", dict(batch_seconds=1e-3, scores="ctc", **first, **fp32)),
               ("batched 200 s, ctc, fp32", dict(batch_seconds=200.0, scores="ctc", **first, **fp32)),
               ("batched 30 s, ctc", dict(batch_seconds=30.0, scores="ctc", **first)),
               ("batched 200 s, ctc", dict(batch_seconds=200.0, scores="ctc", **first)),
               ("batched 600 s, ctc", dict(batch_seconds=600.0, scores="ctc", **first)),
               ("batched 200 s, joint, fp32", dict(batch_seconds=200.0, scores="joint", **first, **fp32)),
               ("batched 200 s, joint (--no_refine)", dict(batch_seconds=200.0, scores="joint", **first)),
               ("joint + neural refinement only, trained", dict(batch_seconds=200.0, scores="joint",
                                                                hmm_weight=0.0)),
               ("default, a corpus' first export (trains)", dict(batch_seconds=200.0, scores="joint")),
               ("default, its next exports (stored refiner)", dict(batch_seconds=200.0, scores="joint",
                                                                   refiner=stored)),
               ("  the same, joint first pass (no light pass)", dict(batch_seconds=200.0, scores="joint",
                                                                    refiner=stored, light_first_pass=False))]
    base = None
    from common.export import resolve_precision
    print(f"device {a.device}; --precision auto -> {resolve_precision('auto', a.device)}")
    print(f"{'configuration':<44}{'audio s':>9}{'wall s':>9}{'x realtime':>12}{'vs baseline':>13}")
    for name, kw in configs:
        best = None
        for _ in range(a.repeat):
            rep = run(a.corpus, a.model_dir, a.device, limit=a.limit, **kw)
            if best is None or rep["wall"] < best["wall"]:
                best = rep
        rtf = best["audio_seconds"] / best["wall"]
        base = base or rtf
        print(f"{name:<44}{best['audio_seconds']:>9.1f}{best['wall']:>9.2f}{rtf:>12.1f}{rtf / base:>13.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
