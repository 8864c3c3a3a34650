#!/usr/bin/env bash
# Sets everything up, then runs the whole pipeline on the built-in synthetic corpus:
#   synthesize corpus -> manifests (-> train -> decode -> export durations -> evaluate, as those stages land)
# Outputs go to ${DEMO_DIR:-results/demo}. Re-running reuses what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PYTHON:-python3}
OUT=${DEMO_DIR:-results/demo}
N=${DEMO_UTTS:-120}
mkdir -p "$OUT"
if [ ! -f "$OUT/corpus/metadata.csv" ]; then
  $PY data_prep/synth_corpus.py "$OUT/corpus" --num_utts "$N" --sample_rate 22050 --seed 7
fi
$PY data_prep/make_manifests.py --corpus "$OUT/corpus" --format matcha --out "$OUT/manifests" \
    --valid_fraction 0.1 --test_fraction 0.1
echo "[demo] corpus: $OUT/corpus  manifests: $OUT/manifests"
