#!/usr/bin/env python3
"""The competitor baseline: a monophone HMM-GMM forced aligner trained on the corpus itself, from a flat start.

    python benchmarks/hmm_gmm.py --corpus DIR [--phones_tsv DIR/phones.tsv] [--out ends.json]

This is the first stage of what the Montreal Forced Aligner (Kaldi ``train_mono``) runs on a user's corpus:
MFCC + deltas, 3 left-to-right states per phone, diagonal GMMs, Viterbi training from a flat start, Gaussians
doubled every few passes (``common/hmm.py``, the same code our export runs after its neural refinement, but here
from a flat start and alone). MFA goes on to triphones and speaker adaptation; those are not here.

Prints the time taken; with ``--out`` writes ``{rel_path: [phone end times (s)]}``, which ``benchmarks/accuracy.py``
scores next to our export.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.audio import load_audio  # noqa: E402
from common.corpus import read_phones_tsv  # noqa: E402
from common.hmm import FLAT_START_SCHEDULE, HMMConfig, features, hmm_realign  # noqa: E402


def align_flat_start(wavs: list[Path], phones: list[list[str]], cfg: HMMConfig | None = None, log=print):
    """Phone end times (s) per utterance (None where an utterance is too fast for 3 states per phone), stats."""
    cfg = cfg or HMMConfig(schedule=FLAT_START_SCHEDULE)
    inventory = {p: i for i, p in enumerate(sorted({p for ph in phones for p in ph}))}
    feats, durations = features(lambda i: load_audio(str(wavs[i]), cfg.sample_rate)[0], len(wavs), cfg)
    return hmm_realign(feats, durations, [[inventory[p] for p in ph] for ph in phones], None, len(inventory), cfg,
                       log)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, required=True, help="a built-in corpus folder (wavs/ + phones.tsv)")
    ap.add_argument("--phones_tsv", type=Path, help="phone transcripts (default: CORPUS/phones.tsv)")
    ap.add_argument("--out", type=Path, help="write {rel_path: [phone end times]} here")
    a = ap.parse_args()
    ref = read_phones_tsv(a.phones_tsv or a.corpus / "phones.tsv")
    rels = sorted(ref)
    t = time.time()
    ends, stats = align_flat_start([a.corpus / "wavs" / f"{r}.wav" for r in rels], [ref[r][0] for r in rels])
    print(f"hmm-gmm: {len(rels)} utterances aligned in {time.time() - t:.1f} s "
          f"({stats['skipped_too_fast']} too fast for 3 states per phone)")
    if a.out:
        a.out.write_text(json.dumps({r: [round(float(x), 5) for x in e] for r, e in zip(rels, ends) if e is not None}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
