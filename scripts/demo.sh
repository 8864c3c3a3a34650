#!/usr/bin/env bash
# Sets everything up, then runs the whole pipeline on the built-in synthetic corpus (CPU, ~20 min on 2 cores):
#   synthesize corpus -> manifests -> train -> decode (PER) -> export Matcha durations -> evaluate boundaries
# Outputs go to ${DEMO_DIR:-results/demo}. Re-running reuses the corpus and resumes/reuses training.
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
$PY data_prep/make_manifests.py --corpus "$OUT/corpus" --format matcha --out "$OUT/manifests" \
    --valid_fraction 0.08 --test_fraction 0.1
$PY recipes/train.py hparams/phoneme.yaml --data_folder "$OUT/manifests" --output_folder "$OUT/model" \
    --number_of_epochs "$EPOCHS"
$PY recipes/decode.py hparams/phoneme.yaml --model_dir "$OUT/model" --test_csv "$OUT/manifests/test.csv" \
    --decoder ctc_beam
$PY align/export_durations.py --corpus "$OUT/corpus" --model_dir "$OUT/model" --no_mels --textgrid --plots 3
$PY align/evaluate.py --reference "$OUT/corpus/phones.tsv" --durations "$OUT/corpus/durations" \
    --out "$OUT/boundary_report.json" --plot "$OUT/boundary_errors.png"
echo "[demo] durations for Matcha-TTS: $OUT/corpus/durations/<voice>/<id>.pt (TextGrids: $OUT/corpus/textgrids)"
