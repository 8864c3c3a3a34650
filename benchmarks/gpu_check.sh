#!/usr/bin/env bash
# The GPU checks for a lent GPU machine, one prepared run (<= 8 minutes): CUDA MAS exact against the CPU kernel,
# AMP bf16/fp16 training steps, the attention decoder's backward pass against SpeechBrain's, export throughput on CUDA,
# the torchrun export on one GPU; one table at the end.
#
# Prepare here (CPU), once:   bash benchmarks/gpu_check.sh --prepare      (writes gpu_check_pack/, git-ignored:
#   the Python wheels the GPU image lacks, a tiny trained run and its corpus)
# Then on the device (the device tool's run):
#   carry ["gpu_check_pack"], command: bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PACK=gpu_check_pack
if [ "${1:-}" = "--prepare" ]; then
  mkdir -p "$PACK/whl"
  grep -qx "/$PACK/" .git/info/exclude 2>/dev/null || echo "/$PACK/" >> .git/info/exclude
  for pkg in speechbrain==1.1.2 hyperpyyaml==1.2.3 soxr==1.1.0 soundfile==0.14.0 praatio==6.2.2 \
             phonemizer==3.4.0 ruamel.yaml ruamel.yaml.clib sentencepiece==0.2.3; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d "$PACK/whl" "$pkg" || python3 -m pip download -q --no-deps -d "$PACK/whl" "$pkg"
  done
  if [ ! -f "$PACK/run/metrics.json" ]; then
    python3 data_prep/synth_corpus.py "$PACK/corpus" --num_utts 40 --sample_rate 22050 --no_progress --overwrite
    python3 recipes/pipeline.py --corpus "$PACK/corpus" --work "$PACK/work" --stop_stage 1 \
      --prep "--phones_tsv $PACK/corpus/phones.tsv --no_progress" --train "--number_of_epochs 8 --noprogressbar"
    cp -r "$PACK/work/model" "$PACK/run"
  fi
  du -sh "$PACK"
  exit 0
fi
if ls "$PACK"/whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$PACK"/whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
OUTF=${OUT:-/tmp}/gpu_check.json
extra=()
[ -f "$PACK/run/metrics.json" ] && extra=(--model_dir "$PACK/run" --corpus "$PACK/corpus")
timeout 480 python3 benchmarks/gpu_check.py --out "$OUTF" "${extra[@]}"
