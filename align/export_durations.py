#!/usr/bin/env python3
"""Export per-phoneme durations for Matcha-TTS (``use_precomputed_durations=True``).

    python align/export_durations.py --corpus DIR [--device cuda] [--model_dir results/phoneme/1234]

Writes ``DIR/durations/{rel_path}.pt`` (int64, Matcha's add_blank token sequence; ``--format npy`` writes
upstream Matcha's ``durations/{stem}.npy`` beside the wav folder's parent), ``DIR/durations/alignments.jsonl``
and ``DIR/durations/export_report.json``. Existing outputs are skipped unless ``--overwrite``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.align import SCORE_KINDS  # noqa: E402
from common.export import PRECISIONS, Options, export_corpus  # noqa: E402
from common.io import UserError, cli  # noqa: E402

DEFAULT_MODEL_DIR = Path("results/phoneme/1234")  # hparams/phoneme.yaml: output_folder = results/phoneme/<seed>


def parse_args(argv=None) -> Options:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", required=True, type=Path, help="Matcha corpus: metadata.csv + wavs/ (+ mels/)")
    p.add_argument("--model_dir", type=Path, default=DEFAULT_MODEL_DIR, help="output_folder of recipes/train.py")
    p.add_argument("--device", default="cuda", help="cuda (default; falls back to CPU with a note) or cpu")
    p.add_argument("--scores", choices=SCORE_KINDS, default="joint",
                   help="what MAS maximizes (default joint: measured best, benchmarks/accuracy.py)")
    p.add_argument("--ctc_weight", type=float, default=0.5, help="weight of CTC in --scores joint")
    p.add_argument("--format", dest="fmt", choices=("pt", "npy"), default="pt")
    p.add_argument("--add_blank", dest="add_blank", action="store_true", default=True,
                   help="durations for Matcha's interspersed [0, p1, 0, ..., pN, 0] sequence (default, as Matcha)")
    p.add_argument("--no_add_blank", dest="add_blank", action="store_false", help="one duration per token")
    p.add_argument("--edge_silence", dest="edge_silence", action="store_true", default=True,
                   help="align leading/trailing silence to its own slot (-> the first/last blank; default)")
    p.add_argument("--no_edge_silence", dest="edge_silence", action="store_false")
    p.add_argument("--no_anchor", dest="anchor", action="store_false",
                   help="plain MAS, without pinning tokens to their CTC emissions (measured worse; see README)")
    p.add_argument("--no_refine", dest="refine", action="store_false",
                   help="skip boundary refinement (common/refine.py and common/hmm.py): ~7x faster, "
                        "boundaries ~2x less accurate (benchmarks/export_speed.py, benchmarks/accuracy.py)")
    p.add_argument("--refine_rounds", type=int, default=8, help="refinement rounds (re-train + re-align)")
    p.add_argument("--refine_minutes", type=float, default=0.0,
                   help="wall-clock cap on the refiner's training (0 = none; it trains on <= 2 h of audio)")
    p.add_argument("--hmm_weight", type=float, default=2 / 3,
                   help="weight of the two HMM-GMM alignments (common/hmm.py: one started from the frame "
                        "classifier's, one from a flat start; w/2 each) in the refined boundaries; the classifier's "
                        "get 1 - w (default 2/3: the plain mean of the three; 0 = no HMM-GMM pass)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="the recognizer's compute: auto (default) = bf16 on CUDA and on CPUs with native bf16 "
                        "(AVX512-BF16/AMX), else fp32; boundaries measured equal (benchmarks/export_speed.py)")
    p.add_argument("--calibration", type=Path, metavar="FILE",
                   help="move boundaries by the labelling convention learnt from hand-checked utterances "
                        "(align/calibrate.py writes FILE; fit it on an export with the same settings)")
    p.add_argument("--labelled", type=Path, metavar="PATH",
                   help="hand-checked rows: a folder of {rel_path}.TextGrid or a phones.tsv. Their boundaries train "
                        "the refiner, and the offsets between them and this export's boundaries are applied to every "
                        "row (saved as DIR/durations/calibration.json)")
    p.add_argument("--textgrid", action="store_true", help="also write DIR/textgrids/{rel_path}.TextGrid")
    p.add_argument("--plots", type=int, default=0, metavar="N", help="PNG plots of N utterances (DIR/durations/plots)")
    p.add_argument("--overwrite", action="store_true", help="recompute existing duration files")
    p.add_argument("--no_mels", action="store_true", help="take Matcha's mel length from the audio, not mels/*.npy")
    p.add_argument("--hop_length", type=int, default=256, help="Matcha's hop (default 256)")
    p.add_argument("--sample_rate", type=int, help="Matcha's sample rate; every wav must have it (default: as is)")
    p.add_argument("--batch_seconds", type=float, default=200.0, help="padded audio seconds per batch")
    p.add_argument("--g2p", help="module:function G2P (default: the one the model's manifests used)")
    p.add_argument("--symbols", help="module:attr symbol list (default: the one the model's manifests used)")
    p.add_argument("--phones_tsv", type=Path, help="phones per row (default: the model's manifests' phones_tsv)")
    p.add_argument("--metadata", type=Path, help="default DIR/metadata.csv")
    p.add_argument("--wav_dir", type=Path, help="default DIR/wavs")
    p.add_argument("--language", default="en-us")
    p.add_argument("--limit", type=int, default=0, help="only the first N rows (0 = all)")
    p.add_argument("--no_progress", action="store_true")
    a = p.parse_args(argv)
    if not 0.0 <= a.ctc_weight <= 1.0:
        p.error("--ctc_weight must be in [0, 1]")
    if a.refine_rounds < 1:
        p.error("--refine_rounds must be >= 1")
    if not 0.0 <= a.hmm_weight <= 1.0:
        p.error("--hmm_weight must be in [0, 1]")
    if a.batch_seconds <= 0:
        p.error("--batch_seconds must be > 0")
    kw = {k: v for k, v in vars(a).items() if k != "no_progress"}
    return Options(progress=not a.no_progress, **kw)


@cli
def main(argv=None) -> int:
    opts = parse_args(argv)
    if not opts.corpus.is_dir():
        raise UserError(f"{opts.corpus}: corpus folder not found")
    rep = export_corpus(opts)
    c = rep["counts"]
    where = opts.corpus / "durations"
    print(f"durations: {c['success']} written, {c['failure']} failed, {c['skipped_existing']} skipped (already there) "
          f"of {c['total']}; {len(rep['flagged'])} flagged for review; {rep['realtime_factor']}x real time; "
          f"report {where / 'export_report.json'}")
    for rel, err in list(rep["failures"].items())[:5]:
        print(f"  failed {rel}: {err}")
    return 1 if c["failure"] else 0


if __name__ == "__main__":
    sys.exit(main())
