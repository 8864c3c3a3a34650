#!/usr/bin/env bash
# Sets everything up (once), then runs the whole pipeline on the built-in synthetic corpus (CPU, ~20 min on 2 cores):
#   synthesize corpus -> manifests -> train -> decode (PER) -> export Matcha durations -> evaluate boundaries
# Outputs go to ${DEMO_DIR:-results/demo}. Re-running reuses the corpus and every finished stage (recipes/pipeline.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PYTHON:-python3}
OUT=${DEMO_DIR:-results/demo}
N=${DEMO_UTTS:-300}
EPOCHS=${DEMO_EPOCHS:-15}
mkdir -p "$OUT"
if [ ! -f "$OUT/corpus/metadata.csv" ]; then
  $PY data_prep/synth_corpus.py "$OUT/corpus" --num_utts "$N" --sample_rate 22050 --seed 7
fi
# the way a user brings a corpus: text in metadata.csv, phonemes from espeak-ng (Matcha's IPA symbols)
$PY recipes/pipeline.py --corpus "$OUT/corpus" --work "$OUT" --reference "$OUT/corpus/phones.tsv" \
    --prep "--format matcha --valid_fraction 0.08 --test_fraction 0.1" \
    --train "--number_of_epochs $EPOCHS" \
    --decode "--decoder ctc_beam" \
    --export "--no_mels --textgrid --plots 3"
echo "[demo] durations for Matcha-TTS: $OUT/corpus/durations/<voice>/<id>.pt (TextGrids: $OUT/corpus/textgrids;"\
     "boundary scores: $OUT/boundary_report.json)"
